//! The lab's datastore: the embedded file by default, or a real etcd that the lab runs in its
//! fabric namespace (`198.19.0.1:2379`), reached by the agents and CNI plugins over the
//! underlay exactly as on real nodes, and by the lab's own commands from inside that namespace.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use malla_dataplane::netns::NetNs;
use malla_store::{DatastoreSpec, Store};

use crate::process;
use crate::state::{LabPaths, LabState};

/// Where the lab's etcd listens for clients (the fabric bridge's address).
pub const ETCD_CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 19, 0, 1), 2379);

/// Which backend a lab uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Local,
    Etcd,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Backend::Local),
            "etcd" => Ok(Backend::Etcd),
            "kubernetes" => {
                Err("--datastore kubernetes is not available yet (local or etcd)".into())
            }
            other => Err(format!("--datastore {other:?}: expected local or etcd")),
        }
    }
}

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
    }
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
        Backend::Etcd => {
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
