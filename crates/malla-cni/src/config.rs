//! The runtime's request: the network configuration on stdin and the `CNI_*` environment.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{self, CniError};

/// Which families to assign; unset means "every family that has an enabled pool".
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    pub ipv4: Option<bool>,
    pub ipv6: Option<bool>,
}

/// The plugin's network configuration (one entry of a conflist, with `name` and
/// `cniVersion` filled in by the runtime).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// This node's name. Unset (a minimal conflist): resolved by [`NetConf::parse`] as
    /// Calico does, from [`NetConf::node_name_file`] (which the agent writes), else the host
    /// name.
    #[serde(default)]
    pub node_name: String,
    /// Where the agent writes the node's name (default [`DEFAULT_NODE_NAME_FILE`]).
    #[serde(default)]
    pub node_name_file: Option<String>,
    /// `{"type": "local", "path": …}` or `{"type": "etcd", "endpoints": […], "prefix": …}`;
    /// unset: the local file [`DEFAULT_LOCAL_DATASTORE`] (the agent's default).
    #[serde(default = "default_datastore")]
    pub datastore: malla_store::DatastoreSpec,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub ipam: IpamConf,
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    #[serde(default)]
    pub runtime_config: Option<serde_json::Value>,
    /// GC: the attachments the runtime still knows (`cni.dev/valid-attachments`).
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// A file the node agent rewrites after each sync; STATUS reads it (and its lock).
    #[serde(default)]
    pub agent_ready_file: Option<String>,
}

/// Where the agent writes its node's name and the plugin reads it when the configuration has
/// no `nodeName` (the agent writes `nodename` beside its ready file, `/var/run/malla/agent.ready`
/// in the DaemonSet), as Calico's plugin reads `/var/lib/calico/nodename`.
pub const DEFAULT_NODE_NAME_FILE: &str = "/var/run/malla/nodename";

/// The datastore of a configuration without `datastore`: the agent's default local file.
pub const DEFAULT_LOCAL_DATASTORE: &str = "/var/lib/malla/store.db";

fn default_datastore() -> malla_store::DatastoreSpec {
    malla_store::DatastoreSpec::Local {
        path: DEFAULT_LOCAL_DATASTORE.into(),
    }
}

/// The node-name file beside an agent's ready file (what the agent writes).
pub fn node_name_file_beside(ready_file: &std::path::Path) -> std::path::PathBuf {
    ready_file.with_file_name("nodename")
}

/// The node's name when the configuration names none: the first line of `file` if it has one,
/// else the host name (None when neither gives a usable name).
pub fn default_node_name(file: &std::path::Path) -> Option<String> {
    let from_file = std::fs::read(file)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .filter(|n| valid_node_name(n));
    from_file.or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .map(|h| h.trim().to_string())
            .filter(|n| valid_node_name(n))
    })
}

/// A node name usable in datastore keys: non-empty, at most 253 bytes, no `/`, no control
/// characters or whitespace.
fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && !n
            .chars()
            .any(|c| c == '/' || c.is_control() || c.is_whitespace())
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// The `ips` capability (`runtimeConfig.ips`): addresses with optional prefix.
    pub fn requested_ips(&self) -> Result<Vec<std::net::IpAddr>, CniError> {
        let Some(ips) = self.runtime_config.as_ref().and_then(|r| r.get("ips")) else {
            return Ok(Vec::new());
        };
        let list = ips.as_array().ok_or_else(|| {
            CniError::new(
                error::INVALID_CONFIG,
                "runtimeConfig.ips: must be a list of addresses",
                ips.to_string(),
            )
        })?;
        list.iter()
            .map(|v| {
                let s = v.as_str().unwrap_or_default();
                s.parse::<ipnet::IpNet>()
                    .map(|n| n.addr())
                    .or_else(|_| s.parse::<std::net::IpAddr>())
                    .map_err(|_| {
                        CniError::new(
                            error::INVALID_CONFIG,
                            "runtimeConfig.ips: not an IP address",
                            v.to_string(),
                        )
                    })
            })
            .collect()
    }

    /// The `mac` capability (`runtimeConfig.mac`).
    pub fn requested_mac(&self) -> Result<Option<[u8; 6]>, CniError> {
        let Some(mac) = self.runtime_config.as_ref().and_then(|r| r.get("mac")) else {
            return Ok(None);
        };
        let s = mac.as_str().unwrap_or_default();
        let parsed = malla_api::parse_mac(s)
            .filter(|m| m[0] & 1 == 0)
            .ok_or_else(|| {
                CniError::new(
                    error::INVALID_CONFIG,
                    "runtimeConfig.mac: not a unicast MAC address",
                    mac.to_string(),
                )
            })?;
        Ok(Some(parsed))
    }

    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let raw: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                error::DECODE_FAILURE,
                "network configuration is not JSON",
                e.to_string(),
            )
        })?;
        let version = raw
            .get("cniVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if !crate::SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(CniError::new(
                error::INCOMPATIBLE_VERSION,
                format!("cniVersion {version:?} is not supported"),
                format!("supported: {}", crate::SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let mut conf: NetConf = serde_json::from_value(raw).map_err(|e| {
            CniError::new(
                error::INVALID_CONFIG,
                "invalid network configuration",
                e.to_string(),
            )
            .with_version(&version)
        })?;
        if conf.node_name.is_empty() {
            let file = conf
                .node_name_file
                .clone()
                .unwrap_or_else(|| DEFAULT_NODE_NAME_FILE.to_string());
            conf.node_name = default_node_name(std::path::Path::new(&file)).ok_or_else(|| {
                CniError::new(
                    error::INVALID_CONFIG,
                    "nodeName: not set, and neither the node-name file nor the host name gives one",
                    file,
                )
            })?;
        } else if !valid_node_name(&conf.node_name) {
            return Err(CniError::new(
                error::INVALID_CONFIG,
                "invalid network configuration",
                format!(
                    "nodeName {:?}: must be 1-253 bytes without '/', whitespace or control characters",
                    conf.node_name
                ),
            ));
        }
        Ok(conf)
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

impl CniEnv {
    /// Reads the variables the command needs; DEL tolerates a missing `CNI_NETNS`.
    pub fn from_env(env: &BTreeMap<String, String>, command: &str) -> Result<Self, CniError> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let require = |k: &str| {
            get(k).ok_or_else(|| {
                CniError::new(
                    error::INVALID_ENV,
                    format!("{k} is not set"),
                    format!("required for {command}"),
                )
            })
        };
        let container_id = require("CNI_CONTAINERID")?;
        if !container_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(CniError::new(
                error::INVALID_ENV,
                "CNI_CONTAINERID has characters outside [A-Za-z0-9_.-]",
                container_id,
            ));
        }
        let ifname = require("CNI_IFNAME")?;
        // The kernel's rule (dev_valid_name): 1-15 bytes, not `.`/`..`, no `/`, `:` or space.
        if ifname.len() > 15
            || ifname == "."
            || ifname == ".."
            || ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(CniError::new(
                error::INVALID_ENV,
                "CNI_IFNAME is not a valid interface name",
                ifname,
            ));
        }
        let netns = if command == "ADD" {
            require("CNI_NETNS")?
        } else {
            get("CNI_NETNS").unwrap_or_default()
        };
        let args = parse_cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""));
        Ok(Self {
            container_id,
            netns,
            ifname,
            pod_namespace: args.get("K8S_POD_NAMESPACE").cloned(),
            pod_name: args.get("K8S_POD_NAME").cloned(),
        })
    }

    /// The IPAM handle of this attachment: one per network, container and interface
    /// ([`ipam_handle`]).
    pub fn ipam_handle(&self, network: &str) -> String {
        ipam_handle(network, &self.container_id, &self.ifname)
    }

    /// The handle earlier versions gave this attachment ([`legacy_ipam_handle`]).
    pub fn legacy_ipam_handle(&self, network: &str) -> String {
        legacy_ipam_handle(network, &self.container_id, &self.ifname)
    }
}

/// The IPAM handle of an attachment: `NETWORK.CONTAINERID.IFNAME` with each part escaped
/// ([`escape_handle_part`]) so that `.` only ever separates parts: distinct attachments never
/// share a handle (`a.b`+`c` and `a`+`b.c` did when the parts were joined as they are). For
/// parts without `.`, `%` or unusual characters (e.g. `malla`, a hex container ID, `eth0`) the
/// handle is the one earlier versions wrote.
pub fn ipam_handle(network: &str, container_id: &str, ifname: &str) -> String {
    format!(
        "{}.{}.{}",
        escape_handle_part(network),
        escape_handle_part(container_id),
        escape_handle_part(ifname)
    )
}

/// The handle earlier versions wrote (parts joined unescaped; ambiguous when a part has a
/// `.`). Only read, to release or keep what such versions reserved: DEL takes it from the
/// attachment's own endpoint record, never from this function alone.
pub fn legacy_ipam_handle(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{network}.{container_id}.{ifname}")
}

/// The handle prefix of a network's attachments ([`ipam_handle`]'s first part and its dot).
pub fn ipam_handle_prefix(network: &str) -> String {
    format!("{}.", escape_handle_part(network))
}

/// Percent-encodes every byte of `part` outside `[A-Za-z0-9_-]` (so `.` and `%` are encoded).
pub fn escape_handle_part(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `A=1;B=2` into a map; malformed pairs are ignored, as the reference plugins do with IgnoreUnknown.
pub fn parse_cni_args(s: &str) -> BTreeMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn args_and_env() {
        let e = CniEnv::from_env(
            &env(&[
                ("CNI_CONTAINERID", "abc"),
                ("CNI_NETNS", "/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1",
                ),
            ]),
            "ADD",
        )
        .unwrap();
        assert_eq!(e.pod_name.as_deref(), Some("web-1"));
        assert_eq!(e.ipam_handle("malla"), "malla.abc.eth0");
    }

    #[test]
    fn missing_env_is_code_4() {
        let err = CniEnv::from_env(
            &env(&[("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")]),
            "ADD",
        )
        .unwrap_err();
        assert_eq!(err.code, error::INVALID_ENV);
        assert!(err.msg.contains("CNI_NETNS"));
        // DEL without a netns is fine.
        assert!(CniEnv::from_env(
            &env(&[("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")]),
            "DEL"
        )
        .is_ok());
    }

    #[test]
    fn config_errors_have_spec_codes() {
        assert_eq!(
            NetConf::parse(b"{nope").unwrap_err().code,
            error::DECODE_FAILURE
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"malla"}"#)
                .unwrap_err()
                .code,
            error::INCOMPATIBLE_VERSION
        );
        // A malformed nodeName is refused, naming the field.
        let e =
            NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"malla","nodeName":"a/b"}"#)
                .unwrap_err();
        assert_eq!(e.code, error::INVALID_CONFIG);
        assert!(e.details.contains("nodeName"), "{e:?}");
        let ok = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"malla","nodeName":"a","datastore":{"type":"local","path":"/x"}}"#,
        )
        .unwrap();
        assert_eq!(
            ok.datastore,
            malla_store::DatastoreSpec::Local { path: "/x".into() }
        );
        let e = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"malla","nodeName":"a","datastore":{"type":"zk","path":"/x"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, error::INVALID_CONFIG);
        assert!(e.details.contains("zk"), "{e:?}");
    }

    #[test]
    fn minimal_conflist_defaults_node_name_and_datastore() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nodename");
        let conf = |f: &std::path::Path| {
            format!(
                r#"{{"cniVersion":"1.1.0","name":"n","type":"malla","nodeNameFile":{:?}}}"#,
                f.to_str().unwrap()
            )
        };
        // No file: the host name.
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        let c = NetConf::parse(conf(&file).as_bytes()).unwrap();
        assert_eq!(c.node_name, host.trim());
        assert_eq!(
            c.datastore,
            malla_store::DatastoreSpec::Local {
                path: DEFAULT_LOCAL_DATASTORE.into()
            }
        );
        // The agent's file wins over the host name; blank or hostile contents do not count.
        std::fs::write(&file, "node-7\n").unwrap();
        assert_eq!(
            NetConf::parse(conf(&file).as_bytes()).unwrap().node_name,
            "node-7"
        );
        std::fs::write(&file, "a/b\n").unwrap();
        assert_eq!(
            NetConf::parse(conf(&file).as_bytes()).unwrap().node_name,
            host.trim()
        );
        // nodeName wins over both.
        let explicit =
            NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"malla","nodeName":"x"}"#)
                .unwrap();
        assert_eq!(explicit.node_name, "x");
        // The bare minimum parses.
        NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"malla"}"#).unwrap();
    }

    #[test]
    fn handles_are_injective_and_keep_the_old_form_when_unambiguous() {
        assert_eq!(ipam_handle("malla", "abc123", "eth0"), "malla.abc123.eth0");
        assert_eq!(
            ipam_handle("malla", "abc123", "eth0"),
            legacy_ipam_handle("malla", "abc123", "eth0")
        );
        // The old encoding joined these two to one handle.
        assert_eq!(
            legacy_ipam_handle("n", "a.b", "c"),
            legacy_ipam_handle("n", "a", "b.c")
        );
        assert_ne!(ipam_handle("n", "a.b", "c"), ipam_handle("n", "a", "b.c"));
        assert_ne!(ipam_handle("n.a", "b", "c"), ipam_handle("n", "a.b", "c"));
        assert_ne!(ipam_handle("n", "a%2Eb", "c"), ipam_handle("n", "a.b", "c"));
        // Exactly two separators whatever the parts hold.
        for (n, c, i) in [("a.b", "c.d", "e.f"), ("%", "..", "é.x"), ("", "", "")] {
            assert_eq!(ipam_handle(n, c, i).matches('.').count(), 2);
            assert!(ipam_handle(n, c, i).starts_with(&ipam_handle_prefix(n)));
        }
    }

    #[test]
    fn undecodable_variables_are_named_not_fatal() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![0xff, 0xfe]);
        let (env, undecodable) = crate::env_from_os([
            (OsString::from("CNI_COMMAND"), OsString::from("VERSION")),
            (OsString::from("OTHER"), bad.clone()),
            (OsString::from("CNI_ARGS"), bad.clone()),
            (bad.clone(), OsString::from("x")),
        ]);
        assert_eq!(env.len(), 1);
        assert_eq!(undecodable, vec!["CNI_ARGS".to_string()]);
        assert!(crate::run_os(
            [
                (OsString::from("CNI_COMMAND"), OsString::from("VERSION")),
                (OsString::from("CNI_ARGS"), bad.clone()),
            ],
            b""
        )
        .is_ok());
        let e = crate::run_os(
            [
                (OsString::from("CNI_COMMAND"), OsString::from("DEL")),
                (OsString::from("CNI_ARGS"), bad),
            ],
            b"{}",
        )
        .unwrap_err();
        assert_eq!(e.code, error::INVALID_ENV);
        assert!(e.msg.contains("CNI_ARGS"), "{e:?}");
    }
}
