//! The node agent: registers its node, then keeps the kernel equal to the calculation's desired
//! state — routes to other nodes' blocks (direct or VXLAN), the host side of local pods, and the
//! masquerade table — re-reading the datastore on every change and resyncing periodically.
//!
//! A restart adopts what the kernel has: it diffs against the routes stamped with Malla's
//! protocol, the VXLAN device's neighbours and FDB, and only adds what is missing and removes
//! what is stale. Nothing is torn down at start or exit, so established traffic never notices.

pub mod config_dir;
pub mod dataplane;
pub mod registration;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use malla_api::service::{EndpointSlice, Service};
use malla_api::{keys, ClusterConfig, IpPool, Node, WorkloadEndpoint};
use malla_calc::ClusterView;
use malla_ipam::node_cache::NodeCache;
use malla_store::Store;

/// How the agent is started.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub datastore: malla_store::DatastoreSpec,
    /// The interface facing the other nodes.
    pub underlay_interface: String,
    /// Full resync period, repairing drift even without datastore changes.
    pub resync: Duration,
    /// A directory of cluster settings (a mounted ConfigMap: `routing`, `pools.yaml`, …) whose
    /// missing parts the agent writes to the datastore at start ([`config_dir`]).
    pub config_dir: Option<PathBuf>,
    /// Written after each sync with the datastore revision applied (readiness for the CNI
    /// plugin's STATUS, and convergence for tests).
    pub ready_file: Option<PathBuf>,
}

/// Reads everything the calculation needs.
pub fn read_view(store: &dyn Store) -> anyhow::Result<ClusterView> {
    Ok(read_view_and_blocks(store)?.0)
}

/// [`read_view`], also returning the IPAM blocks in full (the node cache keeps the node's own).
pub fn read_view_and_blocks(
    store: &dyn Store,
) -> anyhow::Result<(ClusterView, Vec<malla_ipam::Block>)> {
    let config = malla_store::get_json::<ClusterConfig>(store, keys::CLUSTER_CONFIG)?
        .map(|(c, _)| c)
        .unwrap_or_default();
    let (nodes, _) = malla_store::list_json::<Node>(store, keys::NODES)?;
    let (pools, _) = malla_store::list_json::<IpPool>(store, keys::POOLS)?;
    let (endpoints, _) = malla_store::list_json::<WorkloadEndpoint>(store, keys::ENDPOINTS)?;
    let (services, _) = malla_store::list_json::<Service>(store, keys::SERVICES)?;
    let (slices, _) = malla_store::list_json::<EndpointSlice>(store, keys::ENDPOINT_SLICES)?;
    let (pods, _) = malla_store::list_json::<malla_api::Pod>(store, keys::PODS)?;
    let (namespaces, _) = malla_store::list_json::<malla_api::Namespace>(store, keys::NAMESPACES)?;
    let (policies, _) =
        malla_store::list_json::<malla_api::policy::NetworkPolicy>(store, keys::NETWORK_POLICIES)?;
    let full_blocks = malla_ipam::Ipam::new(store).blocks()?;
    let blocks = full_blocks
        .iter()
        .map(|b| (b.cidr, b.affinity.clone()))
        .collect();
    let view = ClusterView {
        config,
        nodes: nodes.into_iter().map(|(_, n, _)| n).collect(),
        pools: pools.into_iter().map(|(_, p, _)| p).collect(),
        blocks,
        endpoints: endpoints.into_iter().map(|(_, e, _)| e).collect(),
        services: services.into_iter().map(|(_, s, _)| s).collect(),
        endpoint_slices: slices.into_iter().map(|(_, s, _)| s).collect(),
        pods: pods.into_iter().map(|(_, p, _)| p).collect(),
        namespaces: namespaces.into_iter().map(|(_, n, _)| n).collect(),
        policies: policies.into_iter().map(|(_, p, _)| p).collect(),
    };
    Ok((view, full_blocks))
}

/// Runs the agent until the process is killed.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let store = cfg
        .datastore
        .open()
        .with_context(|| format!("opening datastore {}", cfg.datastore))?;
    let store: &dyn Store = &*store;
    // Held for the agent's lifetime: the CNI plugin's STATUS knows the agent runs while it is
    // locked, and a second agent for the same node refuses to start.
    let _lock = match &cfg.ready_file {
        Some(ready) => Some(hold_agent_lock(ready)?),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async {
        let mut plane = dataplane::Dataplane::connect(&cfg.node, &cfg.underlay_interface).await?;
        plane.enable_forwarding()?;
        if let Some(dir) = &cfg.config_dir {
            while let Err(e) = config_dir::apply(store, dir) {
                tracing::warn!(error = %format!("{e:#}"), "applying cluster settings from {}; retrying", dir.display());
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        while let Err(e) = registration::register(store, &cfg.node, &plane).await {
            tracing::warn!(node = %cfg.node, error = %format!("{e:#}"), "registering the node failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let node_cache = match &cfg.ready_file {
            Some(f) => {
                let path = NodeCache::path_beside(f);
                Some(NodeCache::open(&path).with_context(|| format!("opening {}", path.display()))?)
            }
            None => None,
        };
        let mut applied_rev = -1;
        let mut last_full = Instant::now() - cfg.resync;
        let mut ready = false;
        loop {
            // The datastore may be away (restarting, partitioned): keep what the kernel has,
            // which keeps established traffic flowing, and retry until it answers again.
            let rev = match store.revision() {
                Ok(rev) => rev,
                Err(e) => {
                    tracing::warn!(node = %cfg.node, error = %e, "datastore unreachable; keeping the dataplane as it is");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if let Some(cache) = &node_cache {
                // What pods got while the datastore was away goes in before anything else.
                if cache.has_pending().unwrap_or(false) {
                    match cache.settle(store) {
                        Ok(done) => {
                            tracing::info!(node = %cfg.node, added = done.added, released = done.released, "settled offline IPAM changes");
                            for (ip, handle) in &done.conflicts {
                                tracing::error!(node = %cfg.node, %ip, %handle, "an address given out offline was taken meanwhile");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(node = %cfg.node, error = %e, "settling offline IPAM changes; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                    continue;
                }
            }
            if rev != applied_rev || last_full.elapsed() >= cfg.resync {
                let (view, blocks) = match read_view_and_blocks(store) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(node = %cfg.node, error = %format!("{e:#}"), "reading the datastore failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                if let (Some(cache), Some(me)) =
                    (&node_cache, view.nodes.iter().find(|n| n.name == cfg.node))
                {
                    if let Err(e) = cache.snapshot(me, &view.config, blocks) {
                        tracing::warn!(node = %cfg.node, error = %e, "writing the node cache");
                    }
                }
                let desired = malla_calc::compute(&view, &cfg.node);
                for p in &desired.problems {
                    tracing::warn!(node = %cfg.node, problem = %p, "cannot route");
                }
                match plane.apply(&desired).await {
                    Ok(stats) => {
                        if stats.changed() {
                            tracing::info!(node = %cfg.node, revision = rev, ?stats, "dataplane converged");
                        }
                        if rev != applied_rev {
                            if let Some(f) = &cfg.ready_file {
                                // The ready file holds the revision the kernel now reflects.
                                let tmp = f.with_extension("tmp");
                                std::fs::write(&tmp, format!("{rev}\n"))
                                    .and_then(|_| std::fs::rename(&tmp, f))
                                    .with_context(|| format!("writing {}", f.display()))?;
                            }
                        }
                        applied_rev = rev;
                        last_full = Instant::now();
                        if !ready {
                            ready = true;
                            tracing::info!(node = %cfg.node, revision = rev, "in sync");
                        }
                    }
                    Err(e) => tracing::error!(node = %cfg.node, error = %format!("{e:#}"), "apply failed; retrying"),
                }
            }
            // Blocking here is fine: netlink replies are only awaited inside `apply`.
            if let Err(e) = store.wait_for_change(rev, Duration::from_millis(500)) {
                tracing::warn!(error = %e, "watching the datastore");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    })
}

/// Takes the agent's exclusive lock beside its ready file.
fn hold_agent_lock(ready: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut path = ready.as_os_str().to_owned();
    path.push(".lock");
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!(
                "another agent holds {}",
                std::path::Path::new(&path).display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).context("locking the agent lock file"),
    }
}
