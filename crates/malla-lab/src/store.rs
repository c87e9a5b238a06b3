//! The lab's datastore: the embedded file by default, a real etcd that the lab runs in its
//! fabric namespace (`198.19.0.1:2379`), or a real Kubernetes control plane there (etcd,
//! kube-apiserver on `198.19.0.1:6443` and kube-controller-manager, whose endpoint-slice
//! controller then makes the Services' EndpointSlices). Agents and CNI plugins reach it over
//! the underlay exactly as on real nodes, the lab's own commands from inside that namespace.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use malla_dataplane::netns::NetNs;
use malla_store::{DatastoreSpec, Store};

pub use crate::state::Backend;
use crate::state::{LabPaths, LabState};
use crate::{control_plane, process};

/// Where the lab's etcd listens for clients (the fabric bridge's address).
pub const ETCD_CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 19, 0, 1), 2379);

/// The datastore the lab's agents and plugins are configured with.
pub fn spec(paths: &LabPaths, backend: Backend) -> DatastoreSpec {
    match backend {
        Backend::Local => DatastoreSpec::Local {
            path: paths.store(),
        },
        Backend::Etcd => DatastoreSpec::Etcd {
            endpoints: vec![format!("http://{}:{}", ETCD_CLIENT.0, ETCD_CLIENT.1)],
            prefix: format!("/malla-{}", paths.name),
        },
        Backend::Kubernetes => DatastoreSpec::Kubernetes {
            kubeconfig: Some(control_plane_dir(paths).join("kubeconfig")),
        },
    }
}

/// The lab's control plane state (certificates, kubeconfig, etcd data, logs).
pub fn control_plane_dir(paths: &LabPaths) -> std::path::PathBuf {
    paths.dir.join("kubernetes")
}

/// How the lab runs its control plane: in the fabric namespace on the fabric's address.
pub fn control_plane_options(paths: &LabPaths, fabric_netns: &str) -> control_plane::Options {
    control_plane::Options::in_netns(control_plane_dir(paths), fabric_netns, ETCD_CLIENT.0)
}

/// Starts (or keeps) the lab's Kubernetes control plane, installs Malla's CRDs and registers
/// the lab's nodes as `Node` objects (the kubelet's part; the endpoint-slice controller reads
/// them).
pub fn start_control_plane(
    paths: &LabPaths,
    fabric_netns: &str,
    running: &control_plane::ControlPlanePids,
    nodes: &[String],
) -> anyhow::Result<control_plane::ControlPlanePids> {
    let opts = control_plane_options(paths, fabric_netns);
    let (pids, access) = control_plane::start_detached(&opts, running)
        .context("starting the lab's Kubernetes control plane")?;
    let ns = NetNs::open_named(fabric_netns)?;
    let spec = spec(paths, Backend::Kubernetes);
    ns.run(move || -> anyhow::Result<()> {
        let kubeconfig = match &spec {
            DatastoreSpec::Kubernetes { kubeconfig } => kubeconfig.clone(),
            _ => None,
        };
        let store =
            malla_store::KubeStore::connect(kubeconfig.as_deref(), Duration::from_secs(10))?;
        store.install_crds()?;
        Ok(())
    })??;
    let mut manifest = String::new();
    for n in nodes {
        manifest.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {n}\n  labels:\n    kubernetes.io/hostname: {n}\n"
        ));
    }
    if !manifest.is_empty() {
        access
            .kubectl_run(&["apply", "-f", "-"], Some(&manifest))
            .context("registering the lab's nodes")?;
    }
    Ok(pids)
}

/// Opens the lab's datastore from this process (etcd: from inside the fabric namespace).
pub fn open(paths: &LabPaths, state: &LabState) -> anyhow::Result<Box<dyn Store>> {
    open_backend(paths, state.datastore, &state.fabric_netns)
}

pub fn open_backend(
    paths: &LabPaths,
    backend: Backend,
    fabric_netns: &str,
) -> anyhow::Result<Box<dyn Store>> {
    let spec = spec(paths, backend);
    match backend {
        Backend::Local => spec.open().with_context(|| format!("opening {spec}")),
        Backend::Etcd | Backend::Kubernetes => {
            // The client's sockets and runtime thread are created inside the fabric namespace.
            let ns = NetNs::open_named(fabric_netns)?;
            let shown = spec.to_string();
            ns.run(move || spec.open())?
                .with_context(|| format!("connecting to {shown}"))
        }
    }
}

/// Starts the lab's etcd in the fabric namespace (unless running) and waits until it answers.
pub fn start_etcd(
    paths: &LabPaths,
    fabric_netns: &str,
    running: Option<u32>,
) -> anyhow::Result<u32> {
    if let Some(pid) = running.filter(|p| process::is_ours(*p)) {
        return Ok(pid);
    }
    let data = paths.dir.join("etcd");
    std::fs::create_dir_all(&data)?;
    let client = format!("http://{}:{}", ETCD_CLIENT.0, ETCD_CLIENT.1);
    let mut cmd = Command::new("etcd");
    cmd.arg("--name")
        .arg(format!("malla-{}", paths.name))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
        ])
        .arg("--initial-cluster")
        .arg(format!("malla-{}=http://127.0.0.1:2380", paths.name));
    let pid = process::spawn_detached(cmd, fabric_netns, &paths.log("etcd"))
        .context("starting etcd (Debian package etcd-server)")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if open_backend(paths, Backend::Etcd, fabric_netns)
            .and_then(|s| Ok(s.revision()?))
            .is_ok()
        {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!(
                "etcd did not answer within 20 s (see {})",
                paths.log("etcd").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
