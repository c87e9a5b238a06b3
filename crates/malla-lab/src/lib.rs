//! The lab: a multi-node Malla cluster built from network namespaces on one machine.
//!
//! A fabric namespace holds the underlay bridge (and routes to the `external` namespace that
//! stands for the world outside the cluster); each node is a namespace with its own agent
//! process; the lab itself plays the container runtime, creating a namespace per pod and calling
//! the installed CNI plugin exactly as containerd or CRI-O would (on a `lab up --kubelet` lab, real
//! kubelets and containerd run the pods: [`kube_pods`]). Every name starts with
//! `malla-<lab>-`, and teardown deletes by exact name.

pub mod addresses;
pub mod bgp;
pub mod cni_exec;
pub mod control_plane;
pub mod dns;
pub mod kube_pods;
pub mod kubelet;
pub mod manifest;
pub mod oci;
pub mod probe;
pub mod process;
pub mod runtime;
pub mod services;
pub mod state;
pub mod store;
pub mod topology;

pub use state::{LabPaths, LabState};
