//! The dataplane driver: what the agent hands the calculation's output to. A small trait, as
//! netavark's `FirewallDriver`: [`Driver::start`] once, [`Driver::apply`] for the first desired
//! state and then for each delta the calculation graph emits (links added and removed, set
//! elements changed; a whole desired state again only when a change is not followed by a node), [`Driver::resync`] periodically to
//! repair drift without computing anything again. [`crate::linux::LinuxDriver`] (netlink and
//! nftables) implements it today; another (eBPF) can consume the same calculation output later.

use malla_calc::links::LinkDelta;
use malla_calc::nft::Table;
use malla_calc::services::{EndpointPlan, ServiceMap};
use malla_calc::NodeDataplane;

use crate::netlink::NetlinkError;
use crate::nft::NftError;

/// What the driver is asked to apply.
#[derive(Debug)]
pub enum Update {
    /// The node's whole desired state: the start-up case, and any change the fast path does not
    /// cover. The driver diffs it against the kernel (and its last apply) and keeps it.
    Full(Box<NodeDataplane>),
    /// Services created, deleted or changed (and policy set members, which ride the same
    /// plan): the changes the calculation planned against [`Driver::service_model`] (the
    /// service path). The driver sends them and nothing else; when it cannot, it puts the
    /// model back and fails, and the caller applies a [`Update::Full`].
    Endpoints(EndpointPlan),
    /// Routes, VXLAN peers or local pods added and removed (the calculation's links node,
    /// [`malla_calc::links::LinksNode`]): the driver changes those objects and nothing else,
    /// and keeps the result as the base of its next resync. Needs a [`Update::Full`] first.
    Links(LinkDelta),
}

/// What one apply (or resync) changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub routes_added: usize,
    pub routes_removed: usize,
    pub neighbours_changed: usize,
    pub fdb_changed: usize,
    pub pods_repaired: usize,
    pub nft_applied: bool,
}

impl ApplyStats {
    pub fn changed(&self) -> bool {
        self.routes_added
            + self.routes_removed
            + self.neighbours_changed
            + self.fdb_changed
            + self.pods_repaired
            > 0
            || self.nft_applied
    }
}

/// Why an apply failed, naming the kernel object kind.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("{what}: {source}")]
    Nft {
        what: &'static str,
        source: NftError,
    },
    #[error("sysctl: {0}")]
    Sysctl(std::io::Error),
    #[error("underlay interface {0} not found")]
    NoUnderlay(String),
    #[error("vxlan needs an IPv4 address on {0}")]
    NoUnderlayIpv4(String),
    #[error("{0} vanished after creation")]
    Vanished(String),
    #[error("an endpoint update needs a full apply first")]
    NoBase,
    /// Not a fault: the update is left to a full computation.
    #[error("a full computation is needed: {0}")]
    Recompute(&'static str),
    #[error("routes: {}", .0.join("; "))]
    Routes(Vec<String>),
}

/// A dataplane backend. The agent runs on a current-thread runtime, so the futures need not be
/// `Send`.
#[allow(async_fn_in_trait)]
pub trait Driver {
    /// Prepares the node once, before the first apply (forwarding on).
    async fn start(&mut self) -> Result<(), DriverError>;
    /// Makes the kernel what `update` says, adopting what is already there: only what is
    /// missing is added and only what is stale removed.
    async fn apply(&mut self, update: Update) -> Result<ApplyStats, DriverError>;
    /// Checks the kernel against the last apply and repairs drift; computes nothing.
    async fn resync(&mut self) -> Result<ApplyStats, DriverError>;
    /// The services' model as last applied (the rendered table and the service map), for the
    /// calculation to plan an [`Update::Endpoints`] against (it changes it as planned); None
    /// before the first apply.
    fn service_model(&mut self) -> Option<(&mut Table, &mut ServiceMap)>;
}
