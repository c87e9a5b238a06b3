//! The calculation: turns the cluster's objects into one node's desired dataplane state.
//!
//! It knows nothing of Linux: it is fed plain values (a [`ClusterView`]) and returns plain values
//! (a [`NodeDataplane`]), so tests drive it without a kernel. The agent's managers diff the
//! result against the kernel.

pub mod guard;
pub mod host;
pub mod links;
pub mod masquerade;
pub mod nft;
pub mod policy;
pub mod routes;
pub mod services;

#[cfg(test)]
mod testutil;

pub use routes::{compute, ClusterView, NodeDataplane, RemoteRoute, VxlanPeer};
pub use services::ServiceMap;
