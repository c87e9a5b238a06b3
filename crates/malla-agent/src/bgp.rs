//! `routing: bgp`: the agent keeps the node's BIRD ([`malla_bgp::speaker::Bird`]) running in its
//! namespace with the configuration the cluster calls for ([`malla_bgp::NodeSpeaker`]): its
//! peers, its blocks and borrowed addresses. The configuration is rendered again when the
//! mirror changed, BIRD is reloaded only when the text differs, and it is started again if it
//! died. Another routing mode leaves a running BIRD alone (stopping it would withdraw routes
//! mid-migration; `malla lab down` or the node's shutdown stops it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use malla_bgp::speaker::{Applied, Bird};

use crate::mirror::Mirror;

/// How often a BIRD that should run is checked for being alive when nothing changed.
const LIVENESS: Duration = Duration::from_secs(2);

/// The node's speaker as the agent keeps it.
pub struct BgpNode {
    bird: Bird,
    /// The cluster changed since the configuration was last rendered.
    dirty: bool,
    last_check: Instant,
}

impl BgpNode {
    /// BIRD's state directory: beside the agent's ready file (the node's state directory), or
    /// `/run/malla/bird`.
    pub fn new(ready_file: Option<&std::path::Path>) -> Self {
        let dir = ready_file
            .and_then(|f| f.parent())
            .map(|d| d.join("bird"))
            .unwrap_or_else(|| PathBuf::from("/run/malla/bird"));
        Self {
            bird: Bird::new(dir),
            dirty: true,
            last_check: Instant::now(),
        }
    }

    /// Something the speaker reads (nodes, blocks, endpoints, the cluster config) changed.
    pub fn mark(&mut self) {
        self.dirty = true;
    }

    /// Brings BIRD in line with the mirror when it changed (or every few seconds, to restart it
    /// if it died). Errors are logged and retried on the next turn; they never stop the agent.
    pub fn sync(&mut self, mirror: &mut Mirror, node: &str) {
        if mirror.view().config.routing != malla_api::RoutingMode::Bgp {
            self.dirty = false;
            return;
        }
        if !self.dirty && self.last_check.elapsed() < LIVENESS {
            return;
        }
        self.last_check = Instant::now();
        let (blocks, borrowed) = mirror.links_mut().announced(node);
        let view = mirror.view();
        let mut speaker = match malla_bgp::NodeSpeaker::new(
            node,
            &view.config,
            &view.nodes,
            &blocks,
            &borrowed,
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%node, error = %e, "cannot configure the BGP speaker");
                return;
            }
        };
        speaker.services = malla_bgp::services::advertised(
            &view.config.bgp.clone().unwrap_or_default(),
            &service_addresses(view, node),
        );
        speaker.log = Some(self.bird.log_path());
        match self.bird.apply(&speaker.render()) {
            Ok(Applied::Unchanged) => {}
            Ok(done) => {
                tracing::info!(%node, ?done, peers = speaker.peers.len(), blocks = speaker.blocks.len(), borrowed = speaker.borrowed.len(), dir = %self.bird.dir().display(), "BGP speaker configured");
            }
            Err(e) => {
                tracing::error!(%node, error = %e, "configuring the BGP speaker; retrying");
                return;
            }
        }
        self.dirty = false;
    }
}

/// The Services' addresses as the speaker reads them: kind, `externalTrafficPolicy: Local`,
/// and whether this node holds a ready endpoint.
fn service_addresses(
    view: &malla_calc::ClusterView,
    node: &str,
) -> Vec<malla_bgp::services::ServiceAddresses> {
    use malla_bgp::services::{AddressKind, ServiceAddresses};
    use malla_calc::services::FrontendKind;
    let ready_here: std::collections::BTreeSet<&str> = view
        .endpoint_slices
        .iter()
        .filter(|s| {
            s.endpoints
                .iter()
                .any(|e| e.conditions.ready && e.node.is_some_and(|n| n.as_str() == node))
        })
        .map(|s| &*s.service)
        .collect();
    view.services
        .iter()
        .map(|s| ServiceAddresses {
            addresses: s
                .frontends
                .iter()
                .map(|(ip, k)| {
                    let kind = match k {
                        FrontendKind::ClusterIp => AddressKind::ClusterIp,
                        FrontendKind::ExternalIp => AddressKind::ExternalIp,
                        FrontendKind::LoadBalancer => AddressKind::LoadBalancer,
                    };
                    (*ip, kind)
                })
                .collect(),
            local: s.external_traffic_policy == malla_api::service::TrafficPolicy::Local,
            ready_here: ready_here.contains(&*s.key),
        })
        .collect()
}
