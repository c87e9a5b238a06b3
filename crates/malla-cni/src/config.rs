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
    pub node_name: String,
    /// `{"type": "local", "path": …}` or `{"type": "etcd", "endpoints": […], "prefix": …}`.
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
        let conf: NetConf = serde_json::from_value(raw).map_err(|e| {
            CniError::new(
                error::INVALID_CONFIG,
                "invalid network configuration",
                e.to_string(),
            )
            .with_version(&version)
        })?;
        if conf.node_name.is_empty() {
            return Err(CniError::new(
                error::INVALID_CONFIG,
                "nodeName: must not be empty",
                "",
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
        if ifname.len() > 15 || ifname.contains('/') || ifname.is_empty() {
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

    /// The IPAM handle of this attachment: one per network, container and interface.
    pub fn ipam_handle(&self, network: &str) -> String {
        format!("{network}.{}.{}", self.container_id, self.ifname)
    }
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
        let e = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"malla"}"#).unwrap_err();
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
}
