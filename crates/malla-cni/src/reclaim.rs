//! Reclaiming what killed ADDs left on a node, without waiting for the runtime's GC: addresses
//! reserved under a handle that no attachment records, and host veths (`mla…`) that no
//! attachment records. The node agent calls [`Reclaimer::pass`] periodically.
//!
//! What is live, never touched: every endpoint record of the node (any network: its handle's
//! recorded addresses and its host veth) and every ADD or DEL the node cache holds pending
//! (made while the datastore was away). Everything else of the node made by the plugin
//! (handles whose attributes name this node and a container, including a recorded handle's
//! addresses beyond its record's, left by an earlier try of the same attachment) is a suspect; a suspect is reclaimed once it has been seen, unchanged,
//! for the whole grace period — an ADD in flight records its endpoint within that time. Identity
//! includes what could change under a retried ADD of the same attachment: a handle's exact
//! addresses (a retry reserves another one while the leaked one is held) and a veth's index
//! (a retry deletes and recreates it), so a retry restarts the clock instead of being hit.
//! Reclaiming releases exactly the suspect addresses ([`malla_ipam::Ipam::release_addrs_of_handle`])
//! and deletes the veth by index: a reservation or veth made after the last look survives.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use malla_api::{keys, WorkloadEndpoint};
use malla_dataplane::netlink::Netlink;
use malla_ipam::node_cache::NodeCache;
use malla_store::Store;

use crate::pod::HOST_IFNAME_PREFIX;

/// Why a pass did nothing (it never acts on a partial view).
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    #[error("datastore: {0}")]
    Store(#[from] malla_store::StoreError),
    #[error("IPAM: {0}")]
    Ipam(#[from] malla_ipam::IpamError),
    #[error("node cache: {0}")]
    Cache(String),
    #[error("netlink: {0}")]
    Netlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Suspect {
    Handle { id: String, addrs: Vec<IpAddr> },
    Veth { name: String, index: u32 },
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// Addresses released.
    pub addrs: Vec<IpAddr>,
    /// Handles whose leftovers were released (or whose empty record was dropped).
    pub handles: Vec<String>,
    /// Host veths deleted.
    pub veths: Vec<String>,
    /// Suspects still within their grace period.
    pub waiting: usize,
}

/// Remembers since when each suspect has been seen; one per node, kept across passes.
#[derive(Debug)]
pub struct Reclaimer {
    grace: Duration,
    seen: HashMap<Suspect, Instant>,
}

/// The agent's default grace period: far longer than any ADD (the runtime's own timeout is
/// typically 4 minutes for the whole sandbox setup).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);

impl Reclaimer {
    pub fn new(grace: Duration) -> Reclaimer {
        Reclaimer {
            grace,
            seen: HashMap::new(),
        }
    }

    /// One look at `node` (whose host namespace the calling thread is in): suspects seen for the
    /// whole grace period are reclaimed, new ones start their clock, gone ones are forgotten.
    pub fn pass(
        &mut self,
        store: &dyn Store,
        node: &str,
        cache: Option<&NodeCache>,
    ) -> Result<Reclaimed, ReclaimError> {
        self.pass_at(store, node, cache, Instant::now())
    }

    /// [`Reclaimer::pass`] at a given time (tests).
    pub fn pass_at(
        &mut self,
        store: &dyn Store,
        node: &str,
        cache: Option<&NodeCache>,
        now: Instant,
    ) -> Result<Reclaimed, ReclaimError> {
        // The live set first: whatever is recorded after this read was made after the suspects
        // below were listed, so it cannot be one of them (different addresses, a new veth).
        let (endpoints, _) =
            malla_store::list_json::<WorkloadEndpoint>(store, &keys::endpoints_of_node(node))?;
        // Handle → the addresses its attachment holds (None: hands off the whole handle).
        let mut live_handles: HashMap<String, Option<BTreeSet<IpAddr>>> = HashMap::new();
        let mut live_veths: BTreeSet<String> = BTreeSet::new();
        for (_, ep, _) in endpoints {
            let addrs = ep.addrs().collect::<BTreeSet<_>>();
            match live_handles.entry(ep.ipam_handle) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    if let Some(have) = e.get_mut() {
                        have.extend(addrs);
                    }
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Some(addrs));
                }
            }
            live_veths.insert(ep.host_ifname);
        }
        // The node's own blocks, from its cache's snapshot (None: no cache; every block is read).
        let mut own_blocks: Option<Vec<ipnet::IpNet>> = None;
        if let Some(cache) = cache {
            let state = cache
                .state()
                .map_err(|e| ReclaimError::Cache(e.to_string()))?;
            own_blocks = Some(state.blocks.iter().map(|b| b.cidr).collect());
            for (handle, pending) in state.pending {
                if let Some((_, ep)) = pending.endpoint {
                    live_veths.insert(ep.host_ifname);
                }
                live_handles.insert(handle, None);
            }
            // Offline DELs are the agent's to settle.
            for handle in state.releases.into_keys() {
                live_handles.insert(handle, None);
            }
        }

        let ipam = malla_ipam::Ipam::new(store);
        let mut suspects = Vec::new();
        // This node's handles: from its own blocks (the node cache's snapshot) and its handle
        // records; without a node cache, from every block.
        let handles = match &own_blocks {
            Some(own) => ipam.handles_of_node(node, own)?,
            None => ipam.handles()?,
        };
        for h in handles {
            let ours = h
                .attrs
                .get(malla_ipam::ATTR_NODE)
                .is_some_and(|n| n == node)
                && h.attrs.contains_key("containerID");
            if !ours {
                continue;
            }
            // A live handle's addresses beyond its attachment's are an earlier, killed try's.
            let leftover: Vec<IpAddr> = match live_handles.get(&h.id) {
                None => h.addrs,
                Some(None) => continue,
                Some(Some(live)) => {
                    let extra: Vec<IpAddr> =
                        h.addrs.into_iter().filter(|a| !live.contains(a)).collect();
                    if extra.is_empty() {
                        continue;
                    }
                    extra
                }
            };
            suspects.push(Suspect::Handle {
                id: h.id,
                addrs: leftover,
            });
        }
        for l in host_links()? {
            if l.name.starts_with(HOST_IFNAME_PREFIX)
                && l.kind.as_deref() == Some("veth")
                && !live_veths.contains(&l.name)
            {
                suspects.push(Suspect::Veth {
                    name: l.name,
                    index: l.index,
                });
            }
        }

        let mut out = Reclaimed::default();
        let mut next = HashMap::new();
        let mut due = Vec::new();
        for s in suspects {
            let since = self.seen.get(&s).copied().unwrap_or(now);
            if now.saturating_duration_since(since) >= self.grace {
                due.push(s);
            } else {
                out.waiting += 1;
                next.insert(s, since);
            }
        }
        self.seen = next;
        let mut veths = Vec::new();
        for s in due {
            match s {
                Suspect::Handle { id, addrs } => {
                    out.addrs.extend(ipam.release_addrs_of_handle(&id, &addrs)?);
                    out.handles.push(id);
                }
                Suspect::Veth { name, index } => veths.push((name, index)),
            }
        }
        if !veths.is_empty() {
            out.veths = delete_links(veths)?;
        }
        out.addrs.sort();
        Ok(out)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ReclaimError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ReclaimError::Netlink(format!("tokio runtime: {e}")))
}

fn host_links() -> Result<Vec<malla_dataplane::netlink::Link>, ReclaimError> {
    runtime()?.block_on(async {
        let host = Netlink::connect().map_err(|e| ReclaimError::Netlink(e.to_string()))?;
        host.links()
            .await
            .map_err(|e| ReclaimError::Netlink(e.to_string()))
    })
}

/// Deletes each link by index if it still has that name; returns the names deleted.
fn delete_links(links: Vec<(String, u32)>) -> Result<Vec<String>, ReclaimError> {
    runtime()?.block_on(async {
        let host = Netlink::connect().map_err(|e| ReclaimError::Netlink(e.to_string()))?;
        let now: HashMap<u32, String> = host
            .links()
            .await
            .map_err(|e| ReclaimError::Netlink(e.to_string()))?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let mut deleted = Vec::new();
        for (name, index) in links {
            if now.get(&index) != Some(&name) {
                continue;
            }
            match host.delete_link(index).await {
                Ok(()) => deleted.push(name),
                // Gone meanwhile (its pod's namespace went, or DEL came).
                Err(e) if e.errno() == Some(19) => {}
                Err(e) => return Err(ReclaimError::Netlink(e.to_string())),
            }
        }
        Ok(deleted)
    })
}
