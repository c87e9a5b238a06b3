//! The lab's record of itself (`lab.json` in its state directory), read and written under a
//! file lock so concurrent `malla lab` commands never lose each other's changes.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use malla_api::RoutingMode;
use serde::{Deserialize, Serialize};

/// Root of every lab's state directory.
pub const DEFAULT_STATE_ROOT: &str = "/run/malla-lab";

/// Where one lab keeps its files.
#[derive(Debug, Clone)]
pub struct LabPaths {
    pub name: String,
    pub dir: PathBuf,
}

impl LabPaths {
    pub fn new(name: &str, root: Option<&Path>) -> anyhow::Result<Self> {
        if name.is_empty()
            || name.len() > 24
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            anyhow::bail!("lab name {name:?}: use 1-24 characters of [A-Za-z0-9-]");
        }
        let root = root
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT));
        Ok(Self {
            name: name.to_string(),
            dir: root.join(name),
        })
    }
    /// Every namespace of this lab starts with this.
    pub fn prefix(&self) -> String {
        format!("malla-{}-", self.name)
    }
    pub fn netns(&self, what: &str) -> String {
        format!("{}{what}", self.prefix())
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("lab.json")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("lab.lock")
    }
    pub fn store(&self) -> PathBuf {
        self.dir.join("store.db")
    }
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni/bin")
    }
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }
    pub fn conflist(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("net.d/10-malla.conflist")
    }
    pub fn ready_file(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.ready")
    }
    pub fn log(&self, what: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{what}.log"))
    }
}

/// Which backend a lab uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Local,
    Etcd,
    Kubernetes,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Backend::Local),
            "etcd" => Ok(Backend::Etcd),
            "kubernetes" => Ok(Backend::Kubernetes),
            other => Err(format!(
                "--datastore {other:?}: expected local, etcd or kubernetes"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub underlay_ipv4: std::net::Ipv4Addr,
    pub underlay_ipv6: Option<std::net::Ipv6Addr>,
    pub agent_pid: Option<u32>,
    /// `lab up --kubelet`: the node runtime's script (containerd, kubelet: [`crate::kubelet`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The container port's name, which a Service's `targetPort` may refer to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ips: Vec<std::net::IpAddr>,
    pub ports: Vec<PortSpec>,
    pub labels: BTreeMap<String, String>,
    pub probe_pid: Option<u32>,
    /// The pod's `malla.dev/allowed-source-prefixes` annotation, parsed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_source_prefixes: Vec<ipnet::IpNet>,
    /// `spec.hostNetwork`: the pod runs in its node's namespace; its addresses are the node's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
}

impl PodState {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod as the API server would hold it.
    pub fn api_object(&self) -> malla_api::Pod {
        malla_api::Pod {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            labels: self.labels.clone(),
            node: self.node.clone(),
            ports: self
                .ports
                .iter()
                .map(|p| malla_api::ContainerPort {
                    name: p.name.clone(),
                    protocol: if p.protocol == "udp" {
                        malla_api::service::Protocol::Udp
                    } else {
                        malla_api::service::Protocol::Tcp
                    },
                    port: p.port,
                })
                .collect(),
            ips: self.ips.clone(),
            allowed_source_prefixes: self.allowed_source_prefixes.clone(),
            host_network: self.host_network,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExternalState {
    pub netns: String,
    pub ipv4: std::net::Ipv4Addr,
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub port: u16,
    pub probe_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct LabState {
    pub name: String,
    pub routing: RoutingMode,
    pub ipv6: bool,
    /// The datastore backend (the embedded file, or etcd in the fabric namespace).
    #[serde(default)]
    pub datastore: Backend,
    #[serde(default)]
    pub etcd_pid: Option<u32>,
    /// The Kubernetes control plane's processes (`--datastore kubernetes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<crate::control_plane::ControlPlanePids>,
    /// `lab up --kubelet`: every node runs containerd and a kubelet; Malla comes from `deploy/`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kubelet: bool,
    pub fabric_netns: String,
    /// `--routing bgp`: the router running in the fabric namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<crate::bgp::RouterState>,
    pub nodes: Vec<NodeState>,
    pub external: ExternalState,
    pub namespaces: Vec<String>,
    /// Labels of each namespace (with `kubernetes.io/metadata.name`, as the API server adds).
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<String, PodState>,
    /// Services with their allocated cluster IPs and node ports, by `namespace/name`.
    #[serde(default)]
    pub services: BTreeMap<String, malla_api::service::Service>,
    /// NetworkPolicies by `namespace/name`.
    #[serde(default)]
    pub policies: BTreeMap<String, malla_api::policy::NetworkPolicy>,
    /// EndpointSlices given in manifests (not derived from a selector), by `namespace/name`.
    #[serde(default)]
    pub manual_slices: BTreeMap<String, malla_api::service::EndpointSlice>,
    /// Calico's `projectcalico.org/v3` objects, by datastore key: their stored JSON.
    #[serde(default)]
    pub calico: BTreeMap<String, String>,
}

impl Default for ExternalState {
    fn default() -> Self {
        Self {
            netns: String::new(),
            ipv4: std::net::Ipv4Addr::UNSPECIFIED,
            ipv6: None,
            port: 0,
            probe_pid: None,
        }
    }
}

impl LabState {
    pub fn load(paths: &LabPaths) -> anyhow::Result<Option<Self>> {
        let f = paths.state_file();
        match std::fs::read(&f) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("parsing {}", f.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", f.display())),
        }
    }

    /// The lab's state, or an error telling the user to bring it up.
    pub fn require(paths: &LabPaths) -> anyhow::Result<Self> {
        Self::load(paths)?.ok_or_else(|| {
            anyhow::anyhow!(
                "lab {:?} is not up (run `malla lab up --lab {}`)",
                paths.name,
                paths.name
            )
        })
    }

    /// Writes atomically (temp file + rename).
    pub fn save(&self, paths: &LabPaths) -> anyhow::Result<()> {
        let tmp = paths.dir.join("lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, paths.state_file())?;
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// An exclusive lock on a lab's state, held until dropped.
pub struct LabLock(#[allow(dead_code)] File);

impl LabLock {
    pub fn acquire(paths: &LabPaths) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&paths.dir)
            .with_context(|| format!("creating {}", paths.dir.display()))?;
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(paths.lock_file())?;
        f.lock().context("locking lab state")?;
        Ok(Self(f))
    }
}
