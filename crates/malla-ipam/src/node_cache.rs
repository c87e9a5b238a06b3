//! The node's IPAM cache: how a node keeps handing out addresses from its own affine blocks
//! while the datastore is unreachable, and settles them with the datastore when it returns.
//!
//! One small file per node (SQLite through [`LocalStore`], shared by the agent and every CNI
//! call on the node) holds one JSON document, changed only by compare-and-swap, so concurrent
//! plugin calls never hand out the same address:
//!
//! - `blocks`: the node's affine blocks as the agent last read them from the datastore, with
//!   the node record and cluster configuration (what ADD needs for the pod's MTU);
//! - `held`: addresses handed out after that snapshot (online ADDs note theirs), so an offline
//!   ADD cannot pick one the snapshot does not show yet;
//! - `pending`: offline ADDs to replay into the datastore (addresses, attributes, endpoint);
//! - `releases`: offline DELs of pods the datastore knows, to release there later.
//!
//! The agent refreshes the snapshot after each sync and, as soon as the datastore answers,
//! replays `pending` and `releases` ([`NodeCache::settle`]). A replayed address is assigned
//! with the datastore's compare-and-swap like any other, so if another node took it meanwhile
//! (only possible if it borrowed from this node's block during the outage) the conflict is
//! reported, never hidden.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use malla_api::{ClusterConfig, Node, WorkloadEndpoint};
use malla_store::{LocalStore, Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::{Block, Ipam, IpamError, ReleaseHints};

const KEY: &str = "/node-cache";
/// How long an online allocation stays in `held` when the snapshot does not show it (the
/// agent refreshes the snapshot within moments of the allocation; this only bounds growth).
const HELD_SECS: u64 = 600;

/// The cache document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheState {
    #[serde(default)]
    pub node: Option<Node>,
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    #[serde(default)]
    pub blocks: Vec<Block>,
    /// Address → (handle, unix seconds noted).
    #[serde(default)]
    pub held: BTreeMap<IpAddr, (String, u64)>,
    /// Handle → what an offline ADD did.
    #[serde(default)]
    pub pending: BTreeMap<String, PendingAdd>,
    /// Handle → the endpoint key to delete, for offline DELs.
    #[serde(default)]
    pub releases: BTreeMap<String, String>,
}

impl CacheState {
    /// The node's blocks as [`crate::AutoAssign::affine_hint`]: those the snapshot shows with
    /// room first (so an ADD usually reads one block), then the full ones, each in address
    /// order.
    pub fn affine_hint(&self) -> Vec<ipnet::IpNet> {
        let mut blocks: Vec<&Block> = self.blocks.iter().collect();
        blocks.sort_by_key(|b| (b.used() >= b.capacity(), b.cidr));
        blocks.iter().map(|b| b.cidr).collect()
    }
}

/// An ADD made while the datastore was away.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingAdd {
    pub node: String,
    pub addrs: Vec<IpAddr>,
    pub attrs: BTreeMap<String, String>,
    /// Written once the pod is wired.
    #[serde(default)]
    pub endpoint: Option<(String, WorkloadEndpoint)>,
}

/// What [`NodeCache::settle`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    pub added: usize,
    pub released: usize,
    /// Offline addresses the datastore had given to another handle meanwhile.
    pub conflicts: Vec<(IpAddr, String)>,
}

/// The node's cache file.
pub struct NodeCache {
    store: LocalStore,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl NodeCache {
    /// The cache beside an agent's ready file (`node-1.ready` → `node-1.ready.ipam-cache`):
    /// both the agent and the plugin know that path.
    pub fn path_beside(ready_file: &Path) -> PathBuf {
        let mut p = ready_file.as_os_str().to_owned();
        p.push(".ipam-cache");
        PathBuf::from(p)
    }

    pub fn open(path: &Path) -> Result<NodeCache, StoreError> {
        Ok(NodeCache {
            store: LocalStore::open(path)?,
        })
    }

    /// The current document.
    pub fn state(&self) -> Result<CacheState, StoreError> {
        Ok(malla_store::get_json::<CacheState>(&self.store, KEY)?
            .map(|(s, _)| s)
            .unwrap_or_default())
    }

    /// Applies `change` by compare-and-swap, retrying on concurrent writers; `change` returns
    /// what the caller wants back, or an error that aborts without writing.
    fn modify<T>(
        &self,
        mut change: impl FnMut(&mut CacheState) -> Result<T, IpamError>,
    ) -> Result<T, IpamError> {
        for _ in 0..1000 {
            let (mut state, rev) = match malla_store::get_json::<CacheState>(&self.store, KEY)? {
                Some((s, rev)) => (s, Some(rev)),
                None => (CacheState::default(), None),
            };
            let before = state.clone();
            let out = change(&mut state)?;
            if state == before {
                return Ok(out);
            }
            let json = malla_store::to_json(KEY, &state)?;
            let written = match rev {
                Some(rev) => self.store.update(KEY, &json, rev),
                None => self.store.create(KEY, &json),
            };
            match written {
                Ok(_) => return Ok(out),
                Err(StoreError::Conflict { .. } | StoreError::AlreadyExists(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention(KEY.into()))
    }

    /// The agent: records the node's affine blocks, node record and cluster configuration as
    /// the datastore has them now, and forgets `held` addresses the snapshot shows (or that
    /// are old).
    pub fn snapshot(
        &self,
        node: &Node,
        cluster: &ClusterConfig,
        blocks: Vec<Block>,
    ) -> Result<(), IpamError> {
        let mut mine: Vec<Block> = blocks
            .into_iter()
            .filter(|b| b.affinity.as_deref() == Some(node.name.as_str()))
            .collect();
        mine.sort_by_key(|b| b.cidr);
        let t = now();
        self.modify(|s| {
            s.node = Some(node.clone());
            s.cluster = Some(cluster.clone());
            s.blocks = mine.clone();
            let blocks = &s.blocks;
            s.held.retain(|ip, (handle, at)| {
                let shown = blocks
                    .iter()
                    .any(|b| b.holder(*ip).is_some_and(|a| a.handle == *handle));
                !shown && t.saturating_sub(*at) < HELD_SECS
            });
            Ok(())
        })
    }

    /// The plugin, after an online ADD: these addresses are taken even if the snapshot does
    /// not show it yet.
    pub fn note_held(&self, addrs: &[IpAddr], handle: &str) -> Result<(), IpamError> {
        let t = now();
        self.modify(|s| {
            for ip in addrs {
                s.held.insert(*ip, (handle.to_string(), t));
            }
            Ok(())
        })
    }

    /// The plugin, offline: one free address per wanted family from the node's own blocks
    /// (free in the snapshot, not held, not pending), recorded as pending for `handle`. An
    /// ADD retried under the same handle gets the same addresses.
    pub fn assign_offline(
        &self,
        handle: &str,
        node: &str,
        ipv4: bool,
        ipv6: bool,
        attrs: &BTreeMap<String, String>,
    ) -> Result<Vec<IpAddr>, IpamError> {
        self.modify(|s| {
            if let Some(p) = s.pending.get(handle) {
                return Ok(p.addrs.clone());
            }
            let taken = |s: &CacheState, ip: IpAddr| {
                s.held.contains_key(&ip) || s.pending.values().any(|p| p.addrs.contains(&ip))
            };
            let mut addrs = Vec::new();
            for (want, v6) in [(ipv4, false), (ipv6, true)] {
                if !want {
                    continue;
                }
                let found = s
                    .blocks
                    .iter()
                    .filter(|b| b.cidr.addr().is_ipv6() == v6)
                    .flat_map(|b| {
                        (0..b.capacity().min(u64::from(u32::MAX)) as u32)
                            .filter(|o| !b.allocations.contains_key(o))
                            .filter_map(|o| b.addr_of(o))
                    })
                    .find(|ip| !taken(s, *ip));
                match found {
                    Some(ip) => addrs.push(ip),
                    None => {
                        return Err(IpamError::Exhausted {
                            family: if v6 {
                                "IPv6 (offline, in this node's blocks)"
                            } else {
                                "IPv4 (offline, in this node's blocks)"
                            },
                        })
                    }
                }
            }
            s.pending.insert(
                handle.to_string(),
                PendingAdd {
                    node: node.to_string(),
                    addrs: addrs.clone(),
                    attrs: attrs.clone(),
                    endpoint: None,
                },
            );
            Ok(addrs)
        })
    }

    /// The plugin, offline, once the pod is wired: the endpoint record to write later.
    pub fn set_pending_endpoint(
        &self,
        handle: &str,
        key: &str,
        endpoint: &WorkloadEndpoint,
    ) -> Result<(), IpamError> {
        self.modify(|s| {
            if let Some(p) = s.pending.get_mut(handle) {
                p.endpoint = Some((key.to_string(), endpoint.clone()));
            }
            Ok(())
        })
    }

    /// The plugin, offline DEL: drops a pending ADD of `handle`, or queues the release of what
    /// the datastore holds for it (and the endpoint record at `endpoint_key`).
    pub fn release_offline(&self, handle: &str, endpoint_key: &str) -> Result<(), IpamError> {
        self.modify(|s| {
            if s.pending.remove(handle).is_none() {
                s.releases
                    .insert(handle.to_string(), endpoint_key.to_string());
            }
            s.held.retain(|_, (h, _)| h != handle);
            Ok(())
        })
    }

    /// Whether anything waits for the datastore.
    pub fn has_pending(&self) -> Result<bool, StoreError> {
        let s = self.state()?;
        Ok(!s.pending.is_empty() || !s.releases.is_empty())
    }

    /// The agent, with the datastore back: writes every pending ADD (addresses, endpoint
    /// record) and release into it, removing each from the cache once done. Stops at the first
    /// datastore error (the rest waits for the next call).
    pub fn settle(&self, store: &dyn Store) -> Result<Settled, IpamError> {
        let ipam = Ipam::new(store);
        let mut out = Settled::default();
        let state = self.state()?;
        for (handle, p) in &state.pending {
            if p.endpoint.is_none() {
                // The ADD is still running (or died before wiring): GC's, not ours.
                continue;
            }
            let mut lost = false;
            for ip in &p.addrs {
                match ipam.assign_ip(*ip, handle, &p.node, &p.attrs) {
                    Ok(_) => {}
                    Err(IpamError::AddressInUse(_)) => {
                        out.conflicts.push((*ip, handle.clone()));
                        lost = true;
                    }
                    Err(e) => return Err(e),
                }
            }
            if let (false, Some((key, ep))) = (lost, &p.endpoint) {
                malla_store::put_json(store, key, ep)?;
            }
            self.modify(|s| {
                if let Some(done) = s.pending.remove(handle) {
                    for ip in done.addrs {
                        s.held.insert(ip, (handle.clone(), now()));
                    }
                }
                Ok(())
            })?;
            out.added += 1;
        }
        // The node's blocks, and the addresses the endpoint record names: where the datastore
        // holds what these handles got (a borrowed address is found through its handle record).
        let blocks: Vec<ipnet::IpNet> = state.blocks.iter().map(|b| b.cidr).collect();
        for (handle, key) in &state.releases {
            let addrs = malla_store::get_json::<WorkloadEndpoint>(store, key)?
                .map(|(ep, _)| ep.addrs().collect())
                .unwrap_or_default();
            let hints = ReleaseHints {
                blocks: blocks.clone(),
                addrs,
            };
            ipam.release_by_handle_hinted(handle, &hints)?;
            store.delete(key, None)?;
            self.modify(|s| {
                s.releases.remove(handle);
                Ok(())
            })?;
            out.released += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use malla_api::{keys, IpPool};

    fn node(name: &str) -> Node {
        Node {
            name: name.into(),
            underlay_ipv4: None,
            underlay_ipv6: None,
            underlay_mtu: 1500,
            vtep_mac: String::new(),
        }
    }

    fn endpoint(handle: &str, ip: IpAddr) -> WorkloadEndpoint {
        WorkloadEndpoint {
            namespace: "default".into(),
            pod: handle.into(),
            node: "node-1".into(),
            container_id: handle.into(),
            ifname: "eth0".into(),
            host_ifname: "x".into(),
            ips: vec![ipnet::IpNet::from(ip)],
            mac: String::new(),
            ipam_handle: handle.into(),
        }
    }

    #[test]
    fn offline_addresses_come_from_the_nodes_blocks_and_settle_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("store.db")).unwrap();
        let ipam = Ipam::new(&store);
        ipam.ensure_pool(&IpPool {
            name: "p".into(),
            cidr: "198.18.0.0/24".parse().unwrap(),
            block_size: 30,
            nat_outgoing: false,
            disabled: false,
        })
        .unwrap();
        let online = ipam
            .auto_assign(&crate::AutoAssign {
                handle: "h0".into(),
                node: "node-1".into(),
                ipv4: true,
                ipv6: false,
                attrs: BTreeMap::new(),
                affine_hint: vec![],
            })
            .unwrap()[0]
            .addr;
        let cache = NodeCache::open(&dir.path().join("cache")).unwrap();
        cache
            .snapshot(
                &node("node-1"),
                &ClusterConfig::default(),
                ipam.blocks().unwrap(),
            )
            .unwrap();
        // Allocated online after the snapshot: the plugin notes it.
        let later = ipam
            .auto_assign(&crate::AutoAssign {
                handle: "h1".into(),
                node: "node-1".into(),
                ipv4: true,
                ipv6: false,
                attrs: BTreeMap::new(),
                affine_hint: vec![],
            })
            .unwrap()[0]
            .addr;
        cache.note_held(&[later], "h1").unwrap();

        // The datastore goes away: the block (/30, 4 addresses) has two left.
        let a = cache
            .assign_offline("h2", "node-1", true, false, &BTreeMap::new())
            .unwrap();
        let b = cache
            .assign_offline("h3", "node-1", true, false, &BTreeMap::new())
            .unwrap();
        assert_eq!(
            cache
                .assign_offline("h2", "node-1", true, false, &BTreeMap::new())
                .unwrap(),
            a,
            "retried ADD"
        );
        for ip in [a[0], b[0]] {
            assert!(ip != online && ip != later, "{ip} handed out twice");
        }
        assert_ne!(a, b);
        assert!(matches!(
            cache.assign_offline("h4", "node-1", true, false, &BTreeMap::new()),
            Err(IpamError::Exhausted { .. })
        ));
        cache
            .set_pending_endpoint(
                "h2",
                &keys::endpoint("node-1", "h2", "eth0"),
                &endpoint("h2", a[0]),
            )
            .unwrap();
        cache
            .set_pending_endpoint(
                "h3",
                &keys::endpoint("node-1", "h3", "eth0"),
                &endpoint("h3", b[0]),
            )
            .unwrap();
        // An offline DEL of a pod the datastore knows, and of one it does not.
        cache
            .release_offline("h0", &keys::endpoint("node-1", "h0", "eth0"))
            .unwrap();
        cache
            .release_offline("h3", &keys::endpoint("node-1", "h3", "eth0"))
            .unwrap();
        assert!(cache.has_pending().unwrap());

        // Back: h2 is assigned with its endpoint, h0 released, h3 never reaches the datastore.
        let done = cache.settle(&store).unwrap();
        assert_eq!(
            done,
            Settled {
                added: 1,
                released: 1,
                conflicts: vec![]
            }
        );
        assert!(!cache.has_pending().unwrap());
        let held: BTreeMap<IpAddr, String> = ipam
            .blocks()
            .unwrap()
            .iter()
            .flat_map(|b| b.allocated())
            .collect();
        assert_eq!(
            held,
            [(later, "h1".to_string()), (a[0], "h2".to_string())].into()
        );
        assert!(store
            .get(&keys::endpoint("node-1", "h2", "eth0"))
            .unwrap()
            .is_some());
    }
}
