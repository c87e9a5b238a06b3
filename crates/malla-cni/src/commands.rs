//! CHECK, GC and STATUS (ADD and DEL are in the crate root).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use malla_api::{keys, WorkloadEndpoint};
use malla_dataplane::netlink::Netlink;
use malla_dataplane::netns::NetNs;
use malla_dataplane::{HOST_VETH_MAC, MALLA_ROUTE_PROTOCOL};
use malla_store::Store;

use crate::config::{CniEnv, NetConf};
use crate::error::{self, CniError};
use crate::{open_store, pod, store_err};

/// Plugin-specific code (the spec leaves 100+ to plugins): CHECK found a difference.
pub const CHECK_FAILED: u32 = 100;
/// STATUS: the plugin cannot serve ADD.
pub const NOT_AVAILABLE: u32 = 50;
/// STATUS: not available, and existing pods may have limited connectivity.
pub const LIMITED_CONNECTIVITY: u32 = 51;

fn v11_only(conf: &NetConf, command: &str) -> Result<(), CniError> {
    if conf.cni_version != "1.1.0" {
        return Err(CniError::new(
            error::INCOMPATIBLE_VERSION,
            format!("{command} needs cniVersion 1.1.0"),
            format!("the configuration says {}", conf.cni_version),
        ));
    }
    Ok(())
}

/// CHECK: compares the attachment with prevResult and reports every difference.
pub fn check(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    if conf.cni_version.starts_with("0.3") {
        return Err(CniError::new(
            error::INCOMPATIBLE_VERSION,
            "CHECK needs cniVersion 0.4.0 or later",
            conf.cni_version.clone(),
        ));
    }
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(error::INVALID_CONFIG, "prevResult: required for CHECK", "")
    })?;
    let want: Vec<IpNet> = prev["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|i| i["address"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut problems = Vec::new();
    if want.is_empty() {
        problems.push("prevResult has no ips".to_string());
    }

    let store = open_store(conf)?;
    let store: &dyn Store = &*store;
    let key = keys::endpoint(&conf.node_name, &env.container_id, &env.ifname);
    // The record names the handle (one an earlier version wrote may differ from ours).
    let mut handle = env.ipam_handle(&conf.name);
    match malla_store::get_json::<WorkloadEndpoint>(store, &key)
        .map_err(store_err("read endpoint"))?
    {
        None => problems.push(format!("no endpoint record {key}")),
        Some((ep, _)) => {
            handle = ep.ipam_handle.clone();
            let have: BTreeSet<IpAddr> = ep.addrs().collect();
            let wanted: BTreeSet<IpAddr> = want.iter().map(IpNet::addr).collect();
            if have != wanted {
                problems.push(format!(
                    "endpoint record has {have:?}, prevResult {wanted:?}"
                ));
            }
        }
    }
    let held: BTreeSet<IpAddr> = malla_ipam::Ipam::new(store)
        .handles()
        .map_err(|e| CniError::new(error::TRY_AGAIN_LATER, "IPAM", e.to_string()))?
        .into_iter()
        .filter(|h| h.id == handle)
        .flat_map(|h| h.addrs)
        .collect();
    for net in &want {
        if !held.contains(&net.addr()) {
            problems.push(format!("IPAM does not hold {} for {handle}", net.addr()));
        }
    }

    let host_ifname = pod::host_ifname(&env.container_id, &env.ifname);
    let ns = NetNs::open(&env.netns).map_err(|e| {
        CniError::new(
            error::UNKNOWN_CONTAINER,
            "cannot open the pod's network namespace",
            e.to_string(),
        )
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(error::IO_FAILURE, "tokio runtime", e.to_string()))?;
    rt.block_on(async {
        let nl_err = |e: malla_dataplane::netlink::NetlinkError| {
            CniError::new(error::IO_FAILURE, "netlink", e.to_string())
        };
        let host = Netlink::connect().map_err(nl_err)?;
        let pod_nl = Netlink::connect_in(&ns).map_err(nl_err)?;
        match pod_nl.link_by_name(&env.ifname).await.map_err(nl_err)? {
            None => problems.push(format!("no interface {} in the pod", env.ifname)),
            Some(eth) => {
                if !eth.up {
                    problems.push(format!("{} is down", env.ifname));
                }
                let addrs = pod_nl.addresses(eth.index).await.map_err(nl_err)?;
                for net in &want {
                    if !addrs.iter().any(|a| a.addr() == net.addr()) {
                        problems.push(format!("{} lacks address {}", env.ifname, net.addr()));
                    }
                }
                let routes = pod_nl.routes_with_protocol(3).await.map_err(nl_err)?;
                let wanted_addrs: Vec<IpAddr> = want.iter().map(IpNet::addr).collect();
                for gw in pod::gateways(&wanted_addrs) {
                    if !routes.iter().any(|r| {
                        r.dst.prefix_len() == 0 && r.gateway == Some(gw) && r.oif == eth.index
                    }) {
                        problems.push(format!("no default route via {gw} on {}", env.ifname));
                    }
                    let neigh = pod_nl
                        .permanent_neighbours(eth.index)
                        .await
                        .map_err(nl_err)?;
                    if !neigh.iter().any(|n| n.ip == gw && n.mac == HOST_VETH_MAC) {
                        problems.push(format!("no static neighbour for gateway {gw}"));
                    }
                }
            }
        }
        match host.link_by_name(&host_ifname).await.map_err(nl_err)? {
            None => problems.push(format!("no host interface {host_ifname}")),
            Some(veth) => {
                if !veth.up {
                    problems.push(format!("{host_ifname} is down"));
                }
                let routes = host
                    .routes_with_protocol(MALLA_ROUTE_PROTOCOL)
                    .await
                    .map_err(nl_err)?;
                for net in &want {
                    let host_route = IpNet::from(net.addr());
                    if !routes
                        .iter()
                        .any(|r| r.dst == host_route && r.oif == veth.index)
                    {
                        problems.push(format!("no host route to {} via {host_ifname}", net.addr()));
                    }
                }
            }
        }
        Ok::<_, CniError>(())
    })?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            CHECK_FAILED,
            "the attachment differs from prevResult",
            problems.join("; "),
        ))
    }
}

/// GC: releases every reservation, endpoint record and host veth of this network on this node
/// that is not among the valid attachments. Keeps going on errors and reports them all.
pub fn gc(conf: &NetConf) -> Result<(), CniError> {
    v11_only(conf, "GC")?;
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    // Both encodings: a valid attachment an earlier version made keeps its handle.
    let valid_handles: BTreeSet<String> = valid
        .iter()
        .flat_map(|a| {
            [
                crate::config::ipam_handle(&conf.name, &a.container_id, &a.ifname),
                crate::config::legacy_ipam_handle(&conf.name, &a.container_id, &a.ifname),
            ]
        })
        .collect();
    let valid_veths: BTreeSet<String> = valid
        .iter()
        .map(|a| pod::host_ifname(&a.container_id, &a.ifname))
        .collect();
    let (prefix, legacy_prefix) = (
        crate::config::ipam_handle_prefix(&conf.name),
        format!("{}.", conf.name),
    );
    let ours = |h: &str| h.starts_with(&prefix) || h.starts_with(&legacy_prefix);
    let mut errors = Vec::new();

    let store = open_store(conf)?;
    let store: &dyn Store = &*store;
    let (endpoints, _) = malla_store::list_json::<WorkloadEndpoint>(
        store,
        &keys::endpoints_of_node(&conf.node_name),
    )
    .map_err(store_err("list endpoints"))?;
    for (key, ep, _) in endpoints {
        if !ours(&ep.ipam_handle) || valid_handles.contains(&ep.ipam_handle) {
            continue;
        }
        if let Err(e) = pod::unwire(&ep.host_ifname) {
            errors.push(format!("{}: {}", ep.host_ifname, e.details));
        }
        if let Err(e) = store.delete(&key, None) {
            errors.push(format!("{key}: {e}"));
        }
    }

    let ipam = malla_ipam::Ipam::new(store);
    let node = conf.node_name.clone();
    let released = ipam.release_unless(&|h: &malla_ipam::Handle| {
        let on_this_node = h
            .attrs
            .get(malla_ipam::ATTR_NODE)
            .is_none_or(|n| *n == node);
        !ours(&h.id) || !on_this_node || valid_handles.contains(&h.id)
    });
    if let Err(e) = released {
        errors.push(format!("IPAM: {e}"));
    }

    // Host veths left by an ADD that died before recording its endpoint.
    if let Err(e) = remove_stray_veths(&valid_veths, store, &conf.node_name) {
        errors.push(e);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            error::TRY_AGAIN_LATER,
            "GC left some objects behind",
            errors.join("; "),
        ))
    }
}

fn remove_stray_veths(
    valid: &BTreeSet<String>,
    store: &dyn Store,
    node: &str,
) -> Result<(), String> {
    // Veths of endpoints still recorded (of any Malla network on this node) stay.
    let (endpoints, _) =
        malla_store::list_json::<WorkloadEndpoint>(store, &keys::endpoints_of_node(node))
            .map_err(|e| e.to_string())?;
    let recorded: BTreeSet<String> = endpoints
        .into_iter()
        .map(|(_, ep, _)| ep.host_ifname)
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let links = rt.block_on(async {
        let host = Netlink::connect().map_err(|e| e.to_string())?;
        host.links().await.map_err(|e| e.to_string())
    })?;
    let mut errors = Vec::new();
    for l in links {
        if l.name.starts_with(pod::HOST_IFNAME_PREFIX)
            && l.kind.as_deref() == Some("veth")
            && !valid.contains(&l.name)
            && !recorded.contains(&l.name)
        {
            if let Err(e) = pod::unwire(&l.name) {
                errors.push(format!("{}: {}", l.name, e.details));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// STATUS: ready when the datastore answers, the node agent runs and has synced, and an
/// address can be handed out.
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    v11_only(conf, "STATUS")?;
    let store = open_store(conf)
        .map_err(|e| CniError::new(NOT_AVAILABLE, "datastore unavailable", e.details))?;
    if let Some(ready) = &conf.agent_ready_file {
        let ready = Path::new(ready);
        if !agent_running(ready) {
            return Err(CniError::new(
                LIMITED_CONNECTIVITY,
                format!("the Malla agent of node {} is not running", conf.node_name),
                format!("no process holds {}", lock_path(ready).display()),
            ));
        }
        // Written by the agent once its first full sync is applied, in the format
        // `malla_store::barrier::ReadyFile` reads.
        if malla_store::barrier::ReadyFile::read(ready).is_none() {
            return Err(CniError::new(
                NOT_AVAILABLE,
                "the Malla agent has not synced yet",
                ready.display().to_string(),
            ));
        }
    }
    let node_known = store
        .get(&keys::node(&conf.node_name))
        .map_err(|e| CniError::new(NOT_AVAILABLE, "datastore unavailable", e.to_string()))?
        .is_some();
    if !node_known {
        return Err(CniError::new(
            NOT_AVAILABLE,
            format!("node {} is not registered", conf.node_name),
            "",
        ));
    }
    let ipam = malla_ipam::Ipam::new(&*store);
    let err =
        |e: malla_ipam::IpamError| CniError::new(NOT_AVAILABLE, "IPAM unavailable", e.to_string());
    let pools = ipam.pools().map_err(err)?;
    let blocks = ipam.blocks().map_err(err)?;
    let free_in_block = blocks
        .iter()
        .any(|b| b.used() < b.capacity() && pools.iter().any(|p| p.name == b.pool && !p.disabled));
    let claimable = pools.iter().filter(|p| !p.disabled).any(|p| {
        let bits = u32::from(p.block_size - p.cidr.prefix_len());
        let total = if bits >= 63 { u64::MAX } else { 1u64 << bits };
        (blocks.iter().filter(|b| b.pool == p.name).count() as u64) < total
    });
    if !free_in_block && !claimable {
        return Err(CniError::new(
            NOT_AVAILABLE,
            "no free address: every pool is exhausted or disabled",
            "",
        ));
    }
    Ok(())
}

/// The lock file an agent holds while it runs, beside its ready file.
pub fn lock_path(ready_file: &Path) -> std::path::PathBuf {
    let mut p = ready_file.as_os_str().to_owned();
    p.push(".lock");
    p.into()
}

/// Whether a process holds the agent's lock (a shared lock would be refused).
pub fn agent_running(ready_file: &Path) -> bool {
    let Ok(f) = std::fs::File::open(lock_path(ready_file)) else {
        return false;
    };
    matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock))
}
