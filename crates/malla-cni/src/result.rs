//! The ADD result and VERSION answer, in the version the runtime asked for.

use serde_json::{json, Value};

use crate::config::CniEnv;
use crate::pod::{gateways, Wired};
use malla_api::WorkloadEndpoint;

pub fn version_json() -> String {
    json!({"cniVersion": "1.1.0", "supportedVersions": crate::SUPPORTED_VERSIONS}).to_string()
}

/// Builds the ADD result: the host and pod interfaces, the addresses, the default routes.
pub fn add_result(
    version: &str,
    env: &CniEnv,
    ep: &WorkloadEndpoint,
    wired: &Wired,
    mtu: u32,
) -> String {
    let legacy = version.starts_with("0.");
    let mut pod_if = json!({
        "name": ep.ifname,
        "mac": malla_api::format_mac(&wired.pod_mac),
        "sandbox": env.netns,
    });
    let mut host_if =
        json!({"name": ep.host_ifname, "mac": malla_api::format_mac(&wired.host_mac)});
    if version == "1.1.0" {
        pod_if["mtu"] = json!(mtu);
        host_if["mtu"] = json!(mtu);
    }
    let gws = gateways(&ep.addrs().collect::<Vec<_>>());
    let ips: Vec<Value> = ep
        .ips
        .iter()
        .map(|net| {
            let gw = gws.iter().find(|g| g.is_ipv4() == net.addr().is_ipv4());
            let mut ip = json!({"address": net.to_string(), "interface": 1});
            if let Some(gw) = gw {
                ip["gateway"] = json!(gw.to_string());
            }
            if legacy {
                ip["version"] = json!(if net.addr().is_ipv4() { "4" } else { "6" });
            }
            ip
        })
        .collect();
    let routes: Vec<Value> = gws
        .iter()
        .map(|gw| {
            let dst = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            json!({"dst": dst, "gw": gw.to_string()})
        })
        .collect();
    json!({
        "cniVersion": version,
        "interfaces": [host_if, pod_if],
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
    .to_string()
}
