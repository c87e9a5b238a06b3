//! Calls CNI plugins the way a container runtime does (libcni): reads a conflist, runs each
//! plugin binary from `CNI_PATH` with the `CNI_*` environment and its network configuration on
//! stdin, threads `prevResult` through ADD, and runs DEL in reverse order.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context};
use malla_dataplane::netns::NetNs;
use serde_json::Value;

/// One attachment's runtime parameters.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns_path: String,
    pub ifname: String,
    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME`.
    pub pod_namespace: String,
    pub pod_name: String,
}

impl Attachment {
    /// No attachment: the network-wide commands (GC, STATUS) set no `CNI_CONTAINERID` etc.
    pub fn none() -> Self {
        Self {
            container_id: String::new(),
            netns_path: String::new(),
            ifname: String::new(),
            pod_namespace: String::new(),
            pod_name: String::new(),
        }
    }

    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.pod_namespace, self.pod_name, self.container_id
        )
    }
}

/// A plugin's error result, as the spec defines it.
#[derive(Debug, Clone)]
pub struct PluginError {
    pub plugin: String,
    pub code: Option<u64>,
    pub msg: String,
    pub details: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plugin {} failed", self.plugin)?;
        if let Some(c) = self.code {
            write!(f, " with code {c}")?;
        }
        write!(f, ": {}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for PluginError {}

/// A parsed conflist plus where its plugins live and which namespace runs them.
pub struct Runtime {
    pub conflist: Value,
    pub cni_path: PathBuf,
    /// The namespace the plugins run in (the node's host namespace); `None` = ours.
    pub host_netns: Option<String>,
    /// Capability arguments (`portMappings`, `bandwidth`, `ips`, `mac`, …): each plugin gets,
    /// as `runtimeConfig`, those its `capabilities` enable — as libcni does.
    pub capability_args: serde_json::Map<String, Value>,
}

impl Runtime {
    pub fn load(
        conflist: &Path,
        cni_path: &Path,
        host_netns: Option<String>,
    ) -> anyhow::Result<Self> {
        let text =
            std::fs::read(conflist).with_context(|| format!("reading {}", conflist.display()))?;
        let conflist: Value = serde_json::from_slice(&text)
            .with_context(|| format!("parsing {}", conflist.display()))?;
        if !conflist.get("plugins").is_some_and(Value::is_array) {
            bail!("{}: plugins must be a list", conflist);
        }
        Ok(Self {
            conflist,
            cni_path: cni_path.to_path_buf(),
            host_netns,
            capability_args: serde_json::Map::new(),
        })
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn plugin_config(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let enabled: serde_json::Map<String, Value> = self
            .capability_args
            .iter()
            .filter(|(k, _)| plugin["capabilities"][k.as_str()] == Value::Bool(true))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !enabled.is_empty() {
            conf["runtimeConfig"] = Value::Object(enabled);
        }
        if let Some(o) = conf.as_object_mut() {
            o.remove("capabilities");
        }
        conf
    }

    /// ADD through the whole chain; returns the last plugin's result.
    pub fn add(&self, att: &Attachment) -> anyhow::Result<Value> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let conf = self.plugin_config(&plugin, prev.as_ref());
            let out = self.exec("ADD", &plugin, &conf, att)?;
            prev = Some(out.ok_or_else(|| anyhow!("plugin returned no result on ADD"))?);
        }
        prev.ok_or_else(|| anyhow!("conflist has no plugins"))
    }

    /// DEL through the chain in reverse, with the cached result as prevResult.
    pub fn del(&self, att: &Attachment, cached: Option<&Value>) -> anyhow::Result<()> {
        let mut first_err = None;
        for plugin in self.plugins().iter().rev() {
            let conf = self.plugin_config(plugin, cached);
            if let Err(e) = self.exec("DEL", plugin, &conf, att) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// CHECK through the chain, each plugin given the cached result as prevResult.
    pub fn check(&self, att: &Attachment, cached: &Value) -> anyhow::Result<()> {
        for plugin in self.plugins() {
            let conf = self.plugin_config(&plugin, Some(cached));
            self.exec("CHECK", &plugin, &conf, att)?;
        }
        Ok(())
    }

    /// GC through the chain with the attachments that are still valid.
    pub fn gc(&self, valid: &[(String, String)]) -> anyhow::Result<()> {
        let list: Vec<Value> = valid
            .iter()
            .map(|(cid, ifname)| serde_json::json!({"containerID": cid, "ifname": ifname}))
            .collect();
        let mut first_err = None;
        for plugin in self.plugins() {
            let mut conf = self.plugin_config(&plugin, None);
            conf["cni.dev/valid-attachments"] = Value::Array(list.clone());
            if let Err(e) = self.exec("GC", &plugin, &conf, &Attachment::none()) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// STATUS of every plugin of the chain.
    pub fn status(&self) -> anyhow::Result<()> {
        for plugin in self.plugins() {
            let conf = self.plugin_config(&plugin, None);
            self.exec("STATUS", &plugin, &conf, &Attachment::none())?;
        }
        Ok(())
    }

    fn exec(
        &self,
        command: &str,
        plugin: &Value,
        conf: &Value,
        att: &Attachment,
    ) -> anyhow::Result<Option<Value>> {
        let kind = plugin["type"]
            .as_str()
            .ok_or_else(|| anyhow!("plugin without a type"))?;
        if kind.contains('/') {
            bail!("plugin type {kind:?} must be a bare name");
        }
        let bin = self.cni_path.join(kind);
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !att.container_id.is_empty() {
            cmd.env("CNI_CONTAINERID", &att.container_id)
                .env("CNI_NETNS", &att.netns_path)
                .env("CNI_IFNAME", &att.ifname)
                .env("CNI_ARGS", att.cni_args());
        }
        let ns = match &self.host_netns {
            Some(name) => Some(NetNs::open_named(name)?),
            None => None,
        };
        if let Some(ns) = &ns {
            ns.enter_on_exec(&mut cmd, false)?;
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("executing CNI plugin {}", bin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(conf.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let v: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
            return Err(PluginError {
                plugin: kind.to_string(),
                code: v["code"].as_u64(),
                msg: v["msg"].as_str().unwrap_or(stdout.trim()).to_string(),
                details: v["details"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string()),
            }
            .into());
        }
        if stdout.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(stdout.trim()).with_context(
            || format!("plugin {kind} printed non-JSON: {stdout}"),
        )?))
    }
}

/// The addresses of a CNI result (`ips[].address` without prefix).
pub fn result_ips(result: &Value) -> Vec<std::net::IpAddr> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str())
                .filter_map(|a| a.parse::<ipnet::IpNet>().ok())
                .map(|n| n.addr())
                .collect()
        })
        .unwrap_or_default()
}
