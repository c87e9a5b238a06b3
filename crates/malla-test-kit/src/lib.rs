//! Malla's test harnesses, apart from the code they test: a dev-only crate (`publish = false`)
//! that tests take as a dev-dependency and the benchmarks (dev tooling themselves) as a
//! dependency. Nothing a user runs links it.
//!
//! - [`runtimes`]: real container runtimes on a lab node — containerd driven by `ctr run
//!   --cni`, podman with its CNI backend, a busybox OCI image built locally, the node checks
//!   and the precise cleanup of what a runtime leaves behind (the runtime tests and the
//!   `ctr-start` benchmark).
//! - [`lab`]: a lab driven through the `malla` CLI with a unique name and a private state
//!   directory, brought down on drop (the lab tests and the runtime harness).
//! - [`etcd`]: a single-member etcd on loopback, killed on drop (the etcd store tests and the
//!   datastore benchmark).
//! - [`control_plane`]: a Kubernetes control plane (etcd, kube-apiserver, kube-controller-
//!   manager) owned by the test, on 127.0.0.1 with free ports, stopped by the pids it spawned
//!   when dropped (the Kubernetes datastore, `deploy/` and control-plane tests).
//!
//! The split with the lab: `malla lab up --datastore kubernetes` runs a control plane too, so
//! what starts one at run time — the binaries, certificates, kubeconfigs, the component
//! command lines, readiness, and the detached start and stop the lab records pids for — stays
//! in `malla_lab::control_plane`. This crate adds only what tests want on top of it: the
//! loopback options and a control plane whose processes are this process's children.

pub mod control_plane;
pub mod etcd;
pub mod lab;
pub mod runtimes;

/// A free TCP port on 127.0.0.1 (free when asked; the kernel hands out ephemeral ports in
/// order, so a recently returned one is not reused at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}
