//! A kube-apiserver of a test's own (v1.20 with its etcd on loopback, no controller manager)
//! and clients of it, for the Kubernetes datastore's tests.

#![allow(dead_code)] // each test binary uses a subset

use std::time::Duration;

use malla_store::KubeStore;
use malla_test_kit::control_plane::{loopback, ControlPlane};

/// Starts the control plane; its state lives in the returned directory.
pub fn start(prefix: &str) -> (ControlPlane, tempfile::TempDir) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let cp = ControlPlane::start(loopback(dir.path()).without_controller_manager())
        .expect("starting kube-apiserver (run scripts/k8s-control-plane to build it)");
    (cp, dir)
}

/// Another client of the control plane's API server.
pub fn connect(cp: &ControlPlane) -> KubeStore {
    KubeStore::connect(Some(cp.kubeconfig_path()), Duration::from_secs(10)).unwrap()
}
