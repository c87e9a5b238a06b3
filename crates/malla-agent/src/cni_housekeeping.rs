//! What the agent does for the CNI plugin on its node, apart from the main loop: writes the
//! node-name file the plugin falls back to when its configuration names no node
//! ([`malla_cni::config::node_name_file_beside`] the ready file, as calico-node writes
//! `/var/lib/calico/nodename`).
//!
//! Started by one call from [`crate::run`]; failures are logged, never fatal to the agent.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::AgentConfig;

/// Starts the housekeeping for `cfg`'s node (nothing without a ready file: the plugin then
/// finds the agent's files nowhere either).
pub fn start(cfg: &AgentConfig) {
    let Some(ready) = &cfg.ready_file else {
        return;
    };
    let file = malla_cni::config::node_name_file_beside(ready);
    if let Err(e) = write_node_name(&file, &cfg.node) {
        tracing::warn!(error = %e, "writing the node-name file {}", file.display());
    }
}

/// Writes `node` to `path` atomically (a temporary beside it, renamed over it).
fn write_node_name(path: &Path, node: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|s| s.trim() == node) {
        return Ok(());
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(format!("{node}\n").as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)
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
