//! The Malla CNI plugin: parses a runtime's request (environment + stdin config, CNI spec 1.1),
//! reserves addresses through IPAM, wires the pod's veth, records the endpoint in the datastore,
//! and answers with the spec result or the spec error.
//!
//! Like Calico's plugin it talks to the datastore directly, so DEL works when the node agent is
//! down and ADD costs no daemon round trip; the agent converges routes from the endpoint records.

pub mod commands;
pub mod config;
pub mod error;
pub mod install;
pub mod pod;
pub mod result;

use std::collections::BTreeMap;

use config::{CniEnv, NetConf};
pub use error::CniError;
use malla_api::{keys, ClusterConfig, Node, WorkloadEndpoint};
use malla_store::Store;

/// CNI versions this plugin reads configurations of and writes results for.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Runs one plugin invocation; `Ok(Some(json))` is printed on stdout.
pub fn run(env: &BTreeMap<String, String>, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        return Ok(Some(result::version_json()));
    }
    if !["ADD", "DEL", "CHECK", "GC", "STATUS"].contains(&command) {
        return Err(CniError::new(
            error::INVALID_ENV,
            format!("CNI_COMMAND {command:?} is not supported"),
            "supported: ADD, DEL, CHECK, GC, STATUS, VERSION",
        ));
    }
    let conf = NetConf::parse(stdin)?;
    let version = conf.cni_version.clone();
    let outcome = match command {
        "GC" => commands::gc(&conf).map(|_| None),
        "STATUS" => commands::status(&conf).map(|_| None),
        _ => {
            let env = CniEnv::from_env(env, command)?;
            match command {
                "ADD" => add(&conf, &env).map(Some),
                "DEL" => del(&conf, &env).map(|_| None),
                _ => commands::check(&conf, &env).map(|_| None),
            }
        }
    };
    outcome.map_err(|e| e.with_version(&version))
}

pub(crate) fn open_store(conf: &NetConf) -> Result<Box<dyn Store>, CniError> {
    conf.datastore.open().map_err(|e| {
        CniError::new(
            error::TRY_AGAIN_LATER,
            "cannot open the Malla datastore",
            format!("{}: {e}", conf.datastore),
        )
    })
}

pub(crate) fn store_err(what: &str) -> impl FnOnce(malla_store::StoreError) -> CniError + '_ {
    move |e| {
        CniError::new(
            error::TRY_AGAIN_LATER,
            format!("datastore: {what}"),
            e.to_string(),
        )
    }
}

fn add(conf: &NetConf, env: &CniEnv) -> Result<String, CniError> {
    let store = open_store(conf)?;
    let store: &dyn Store = &*store;
    let node_name = conf.node_name.as_str();
    let (node, _) = malla_store::get_json::<Node>(store, &keys::node(node_name))
        .map_err(store_err("read node"))?
        .ok_or_else(|| {
            CniError::new(
                error::TRY_AGAIN_LATER,
                format!("node {node_name} is not registered yet"),
                "the Malla agent registers the node when it starts; is it running?",
            )
        })?;
    let cluster = malla_store::get_json::<ClusterConfig>(store, keys::CLUSTER_CONFIG)
        .map_err(store_err("read cluster config"))?
        .map(|(c, _)| c)
        .unwrap_or_default();
    let mtu = conf.mtu.unwrap_or_else(|| pod::pod_mtu(&node, &cluster));

    let ipam = malla_ipam::Ipam::new(store);
    let pools = ipam.pools().map_err(|e| {
        CniError::new(
            error::TRY_AGAIN_LATER,
            "IPAM: cannot read pools",
            e.to_string(),
        )
    })?;
    let has = |v6: bool| {
        pools
            .iter()
            .any(|p| !p.disabled && p.cidr.addr().is_ipv6() == v6)
    };
    let want_v4 = conf.ipam.ipv4.unwrap_or_else(|| has(false));
    let want_v6 = conf.ipam.ipv6.unwrap_or_else(|| has(true));
    if !want_v4 && !want_v6 {
        return Err(CniError::new(
            error::INVALID_CONFIG,
            "no address family to assign",
            "no enabled IP pool exists and ipam.ipv4/ipam.ipv6 do not ask for one",
        ));
    }

    let handle = env.ipam_handle(&conf.name);
    let mut attrs = BTreeMap::new();
    attrs.insert("node".to_string(), node_name.to_string());
    attrs.insert("containerID".to_string(), env.container_id.clone());
    if let Some(ns) = &env.pod_namespace {
        attrs.insert("namespace".to_string(), ns.clone());
    }
    if let Some(p) = &env.pod_name {
        attrs.insert("pod".to_string(), p.clone());
    }
    let requested = conf.requested_ips()?;
    let assigned = if requested.is_empty() {
        ipam.auto_assign(&malla_ipam::AutoAssign {
            handle: handle.clone(),
            node: node_name.to_string(),
            ipv4: want_v4,
            ipv6: want_v6,
            attrs,
        })
        .map_err(|e| CniError::new(error::TRY_AGAIN_LATER, "IPAM: no address", e.to_string()))?
    } else {
        // The `ips` capability: exactly the addresses the runtime asked for, all or none.
        let mut got = Vec::new();
        for ip in &requested {
            match ipam.assign_ip(*ip, &handle, node_name, &attrs) {
                Ok(a) => got.push(a),
                Err(e) => {
                    let _ = ipam.release_by_handle(&handle);
                    let code = match e {
                        malla_ipam::IpamError::AddressInUse(_)
                        | malla_ipam::IpamError::NotInPool(_)
                        | malla_ipam::IpamError::PoolDisabled(_) => error::INVALID_CONFIG,
                        _ => error::TRY_AGAIN_LATER,
                    };
                    return Err(CniError::new(
                        code,
                        format!("runtimeConfig.ips: cannot assign {ip}"),
                        e.to_string(),
                    ));
                }
            }
        }
        got
    };
    fault_point("after-ipam");
    let addrs: Vec<std::net::IpAddr> = assigned.iter().map(|a| a.addr).collect();

    let host_ifname = pod::host_ifname(&env.container_id, &env.ifname);
    let wired = pod::wire(&pod::WireRequest {
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        host_ifname: host_ifname.clone(),
        addrs: addrs.clone(),
        mtu,
        mac: conf.requested_mac()?,
    });
    let wired = match wired {
        Ok(w) => w,
        Err(e) => {
            // Nothing half-done survives a failed ADD: the veth and the reservation go.
            let _ = pod::unwire(&host_ifname);
            let _ = ipam.release_by_handle(&handle);
            return Err(e);
        }
    };

    fault_point("after-wire");
    let endpoint = WorkloadEndpoint {
        namespace: env.pod_namespace.clone().unwrap_or_default(),
        pod: env.pod_name.clone().unwrap_or_default(),
        node: node_name.to_string(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        host_ifname: host_ifname.clone(),
        ips: addrs.iter().map(|a| ipnet::IpNet::from(*a)).collect(),
        mac: malla_api::format_mac(&wired.pod_mac),
        ipam_handle: handle.clone(),
    };
    if let Err(e) = malla_store::put_json(
        store,
        &keys::endpoint(node_name, &env.container_id, &env.ifname),
        &endpoint,
    ) {
        let _ = pod::unwire(&host_ifname);
        let _ = ipam.release_by_handle(&handle);
        return Err(store_err("write endpoint")(e));
    }
    Ok(result::add_result(
        &conf.cni_version,
        env,
        &endpoint,
        &wired,
        mtu,
    ))
}

fn del(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    let host_ifname = pod::host_ifname(&env.container_id, &env.ifname);
    // The veth goes first: it needs neither the datastore nor the pod's namespace.
    pod::unwire(&host_ifname)?;
    let store = open_store(conf)?;
    let store: &dyn Store = &*store;
    malla_ipam::Ipam::new(store)
        .release_by_handle(&env.ipam_handle(&conf.name))
        .map_err(|e| CniError::new(error::TRY_AGAIN_LATER, "IPAM release", e.to_string()))?;
    store
        .delete(
            &keys::endpoint(&conf.node_name, &env.container_id, &env.ifname),
            None,
        )
        .map_err(store_err("delete endpoint"))?;
    Ok(())
}

/// Crash-safety tests set `MALLA_CNI_FAULT=<point>` to kill the plugin at that point, as a
/// runtime timeout or an OOM kill would.
fn fault_point(name: &str) {
    if std::env::var("MALLA_CNI_FAULT").is_ok_and(|v| v == name) {
        eprintln!("malla-cni: fault injected at {name}");
        std::process::abort();
    }
}
