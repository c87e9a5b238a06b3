//! What the agent does for the CNI plugin on its node, apart from the main loop:
//! - writes the node-name file the plugin falls back to when its configuration names no node
//!   ([`malla_cni::config::node_name_file_beside`] the ready file, as calico-node writes
//!   `/var/lib/calico/nodename`);
//! - keeps the plugin's kubeconfig in the host's CNI configuration directory current with the
//!   pod's rotating service-account token ([`start_token_refresh`], every [`TOKEN_INTERVAL`]),
//!   as calico-node does for the kubeconfig its install-cni wrote;
//! - reclaims what killed ADDs left (addresses, host veths) every [`RECLAIM_INTERVAL`], once
//!   they have been left for [`malla_cni::reclaim::DEFAULT_GRACE`], never touching a live
//!   attachment ([`malla_cni::reclaim`]), without waiting for the runtime's GC.
//!
//! [`crate::run`] writes the node-name file first and starts the reclaimer once the datastore is
//! open, on a thread of its own sharing the agent's datastore connection; failures are logged,
//! never fatal to the agent.

use std::path::Path;
use std::sync::Arc;

use std::time::Duration;

use malla_cni::reclaim::{Reclaimer, DEFAULT_GRACE};
use malla_ipam::node_cache::NodeCache;
use malla_store::Store;

use crate::AgentConfig;

/// How often the reclaimer looks.
pub const RECLAIM_INTERVAL: Duration = Duration::from_secs(30);

/// Writes the node-name file beside `cfg`'s ready file (none without one: the plugin finds the
/// agent's files beside it). Done first, before the datastore answers.
pub fn write_node_name_file(cfg: &AgentConfig) {
    if let Some(ready) = &cfg.ready_file {
        let file = malla_cni::config::node_name_file_beside(ready);
        if let Err(e) = write_node_name(&file, &cfg.node) {
            tracing::warn!(error = %e, "writing the node-name file {}", file.display());
        }
    }
}

/// How often the service-account token is compared with the plugin's kubeconfig (the kubelet
/// renews a projected token well before it expires: after 80% of its life, an hour at least).
pub const TOKEN_INTERVAL: Duration = Duration::from_secs(60);

/// Starts refreshing the plugin's kubeconfig in `cfg`'s CNI configuration directory, inside a
/// cluster only (`KUBERNETES_SERVICE_HOST` set) and when a directory is given.
pub fn start_token_refresh(cfg: &AgentConfig) {
    let Some(dir) = cfg.cni_conf_dir.clone() else {
        return;
    };
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("cni-token".into())
        .spawn(move || loop {
            if crate::uninstall::stop_requested() {
                // Stopping (maybe to uninstall): the kubeconfig is not written back.
                return;
            }
            let sa = Path::new(malla_cni::install::SERVICE_ACCOUNT_DIR);
            let env = |k: &str| std::env::var(k).ok();
            match malla_cni::install::refresh_in_cluster_kubeconfig(&dir, sa, &env) {
                Ok(true) => tracing::info!(dir = %dir.display(), "the CNI kubeconfig follows the rotated service-account token"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "refreshing the CNI kubeconfig"),
            }
            std::thread::sleep(TOKEN_INTERVAL);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "starting the CNI token refresh");
    }
}

/// Starts the reclaimer for `cfg`'s node on a thread of its own, over the agent's `store`.
pub fn start_reclaimer(cfg: &AgentConfig, store: Arc<dyn Store>) {
    let node = cfg.node.clone();
    let cache_path = cfg.ready_file.as_deref().map(NodeCache::path_beside);
    let spawned = std::thread::Builder::new()
        .name("cni-reclaim".into())
        .spawn(move || reclaim_forever(&node, &*store, cache_path.as_deref()));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "starting the CNI reclaimer");
    }
}

fn reclaim_forever(node: &str, store: &dyn Store, cache: Option<&Path>) {
    let mut reclaimer = Reclaimer::new(DEFAULT_GRACE);
    loop {
        std::thread::sleep(RECLAIM_INTERVAL);
        let cache = cache.and_then(|p| NodeCache::open(p).ok());
        match reclaimer.pass(store, node, cache.as_ref()) {
            Ok(r) if !r.addrs.is_empty() || !r.veths.is_empty() || !r.handles.is_empty() => {
                tracing::info!(addrs = ?r.addrs, veths = ?r.veths, handles = ?r.handles, "reclaimed what killed CNI ADDs left");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "CNI reclaim pass skipped"),
        }
    }
}

/// Writes `node` to `path` atomically (unless it already says so).
fn write_node_name(path: &Path, node: &str) -> Result<(), malla_cni::install::InstallError> {
    if std::fs::read_to_string(path).is_ok_and(|s| s.trim() == node) {
        return Ok(());
    }
    malla_cni::install::write_atomically(path, format!("{node}\n").as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_reads_the_name_the_agent_writes() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("agent.ready");
        let file = malla_cni::config::node_name_file_beside(&ready);
        write_node_name(&file, "node-3").unwrap();
        write_node_name(&file, "node-3").unwrap();
        assert_eq!(
            malla_cni::config::default_node_name(&file).as_deref(),
            Some("node-3")
        );
    }
}
