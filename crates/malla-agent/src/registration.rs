//! Registers this node in the datastore: its underlay addresses, MTU and VTEP MAC.

use anyhow::Context;
use malla_api::{keys, Node};
use malla_store::Store;

use malla_dataplane::linux::LinuxDriver;

/// Writes the node object, only when it differs from what is stored (no needless revisions).
pub async fn register(store: &dyn Store, name: &str, plane: &LinuxDriver) -> anyhow::Result<Node> {
    let underlay = plane.underlay().await?;
    let node = Node {
        name: name.to_string(),
        underlay_ipv4: underlay.ipv4,
        underlay_ipv6: underlay.ipv6,
        underlay_mtu: underlay.mtu,
        vtep_mac: malla_api::format_mac(&malla_api::mac_from_name(name)),
    };
    let key = keys::node(name);
    let current = malla_store::get_json::<Node>(store, &key)?;
    if current.as_ref().map(|(n, _)| n) != Some(&node) {
        malla_store::put_json(store, &key, &node)
            .with_context(|| format!("registering node {name}"))?;
        tracing::info!(node = name, ?node.underlay_ipv4, ?node.underlay_ipv6, "registered");
    }
    Ok(node)
}
