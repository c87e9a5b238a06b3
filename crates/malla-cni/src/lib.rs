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
pub mod reclaim;
pub mod result;

use std::collections::BTreeMap;

use config::{CniEnv, NetConf};
pub use error::CniError;
use malla_api::{keys, ClusterConfig, Node, WorkloadEndpoint};
use malla_ipam::node_cache::NodeCache;
use malla_store::{Store, StoreError};

/// CNI versions this plugin reads configurations of and writes results for.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The process environment as [`run`] takes it. Variables that are not UTF-8 never stop the
/// plugin (a runtime's environment may hold anything); those that the plugin reads (`CNI_*`)
/// are returned by name, so the command that needs them fails with code 4 instead.
pub fn env_from_os(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut env = BTreeMap::new();
    let mut undecodable = Vec::new();
    for (k, v) in vars {
        match (k.into_string(), v.into_string()) {
            (Ok(k), Ok(v)) => {
                env.insert(k, v);
            }
            (k, _) => {
                let name = match k {
                    Ok(k) => k,
                    Err(k) => k.to_string_lossy().into_owned(),
                };
                if name.starts_with("CNI_") {
                    undecodable.push(name);
                }
            }
        }
    }
    (env, undecodable)
}

/// [`run`] over the raw process environment ([`env_from_os`]): VERSION always answers; any
/// other command with an undecodable `CNI_*` variable is refused with code 4, naming it.
pub fn run_os(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    stdin: &[u8],
) -> Result<Option<String>, CniError> {
    let (env, undecodable) = env_from_os(vars);
    if env.get("CNI_COMMAND").map(String::as_str) != Some("VERSION") {
        if let Some(name) = undecodable.first() {
            return Err(CniError::new(
                error::INVALID_ENV,
                format!("{name} is not valid UTF-8"),
                "the CNI_* variables must be UTF-8 text",
            ));
        }
    }
    run(&env, stdin)
}

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

/// How long each datastore request may take when the node cache can serve instead: a hung
/// server sends ADD to the node's own blocks after this, not after the backend's default.
const DATASTORE_TIMEOUT_WITH_CACHE: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) fn open_store(conf: &NetConf) -> Result<Box<dyn Store>, CniError> {
    let timeout = node_cache_path(conf).map(|_| DATASTORE_TIMEOUT_WITH_CACHE);
    conf.datastore.open_with_timeout(timeout).map_err(|e| {
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

/// The node's IPAM cache, if the conflist names the agent's ready file (beside which it lives).
fn node_cache_path(conf: &NetConf) -> Option<std::path::PathBuf> {
    conf.agent_ready_file
        .as_ref()
        .map(|f| NodeCache::path_beside(std::path::Path::new(f)))
}

/// The node cache's view of this node's blocks, if the cache exists and the agent wrote it
/// ([`malla_ipam::node_cache::CacheState::affine_hint`]); empty (the full path) otherwise.
fn affine_hint(cache: Option<&NodeCache>) -> Vec<ipnet::IpNet> {
    cache
        .and_then(|c| c.state().ok())
        .map(|s| s.affine_hint())
        .unwrap_or_default()
}

/// Where DEL looks for what the handle holds besides its handle record (borrowed addresses
/// only): the node cache's blocks and the addresses it noted for the handle, and the
/// addresses of the endpoint record.
fn release_hints(
    cache: Option<&NodeCache>,
    store: &dyn Store,
    handle: &str,
    endpoint_key: &str,
) -> Result<malla_ipam::ReleaseHints, StoreError> {
    let mut hints = malla_ipam::ReleaseHints::default();
    if let Some(state) = cache.and_then(|c| c.state().ok()) {
        hints.blocks = state.blocks.iter().map(|b| b.cidr).collect();
        // What the ADD noted, e.g. in a block the snapshot does not show yet (just claimed).
        hints.addrs = state
            .held
            .iter()
            .filter(|(_, (h, _))| h == handle)
            .map(|(ip, _)| *ip)
            .collect();
    }
    if let Some((ep, _)) = malla_store::get_json::<WorkloadEndpoint>(store, endpoint_key)? {
        hints.addrs.extend(ep.addrs());
    }
    Ok(hints)
}

/// Whether a datastore error means "cannot reach it" (rather than a refusal).
fn unreachable(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(_))
}

/// Why the online ADD stopped before reserving anything.
enum Online {
    Done(String),
    /// The datastore did not answer: the node cache may serve the ADD.
    Unreachable(CniError),
}

fn add(conf: &NetConf, env: &CniEnv) -> Result<String, CniError> {
    let online = match open_store(conf) {
        Ok(store) => add_online(conf, env, &*store)?,
        Err(e) => Online::Unreachable(e),
    };
    match online {
        Online::Done(result) => Ok(result),
        Online::Unreachable(e) => match node_cache_path(conf) {
            Some(cache) if conf.requested_ips()?.is_empty() => add_offline(conf, env, &cache, e),
            _ => Err(e),
        },
    }
}

fn attrs_of(conf: &NetConf, env: &CniEnv) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    attrs.insert("node".to_string(), conf.node_name.clone());
    attrs.insert("containerID".to_string(), env.container_id.clone());
    if let Some(ns) = &env.pod_namespace {
        attrs.insert("namespace".to_string(), ns.clone());
    }
    if let Some(p) = &env.pod_name {
        attrs.insert("pod".to_string(), p.clone());
    }
    attrs
}

fn add_online(conf: &NetConf, env: &CniEnv, store: &dyn Store) -> Result<Online, CniError> {
    let node_name = conf.node_name.as_str();
    let offline = |what: &'static str| move |e: StoreError| Online::Unreachable(store_err(what)(e));
    let node = match malla_store::get_json::<Node>(store, &keys::node(node_name)) {
        Ok(n) => n,
        Err(e) if unreachable(&e) => return Ok(offline("read node")(e)),
        Err(e) => return Err(store_err("read node")(e)),
    };
    let (node, _) = node.ok_or_else(|| {
        CniError::new(
            error::TRY_AGAIN_LATER,
            format!("node {node_name} is not registered yet"),
            "the Malla agent registers the node when it starts; is it running?",
        )
    })?;
    let cluster = match malla_store::get_json::<ClusterConfig>(store, keys::CLUSTER_CONFIG) {
        Ok(c) => c.map(|(c, _)| c).unwrap_or_default(),
        Err(e) if unreachable(&e) => return Ok(offline("read cluster config")(e)),
        Err(e) => return Err(store_err("read cluster config")(e)),
    };
    let mtu = conf.mtu.unwrap_or_else(|| pod::pod_mtu(&node, &cluster));

    let ipam = malla_ipam::Ipam::new(store);
    let pools = match ipam.pools() {
        Ok(p) => p,
        Err(malla_ipam::IpamError::Store(e)) if unreachable(&e) => {
            return Ok(offline("IPAM: read pools")(e))
        }
        Err(e) => {
            return Err(CniError::new(
                error::TRY_AGAIN_LATER,
                "IPAM: cannot read pools",
                e.to_string(),
            ))
        }
    };
    let has = |v6: bool| {
        pools
            .iter()
            .any(|p| !p.disabled && p.cidr.addr().is_ipv6() == v6)
    };
    let (want_v4, want_v6) = families(conf, has(false), has(true))?;

    let handle = env.ipam_handle(&conf.name);
    let attrs = attrs_of(conf, env);
    let requested = conf.requested_ips()?;
    // An ADD for an attachment that exists (the spec forbids it without a DEL between) is
    // refused before it touches anything: its veth has this attachment's name.
    let key = keys::endpoint(node_name, &env.container_id, &env.ifname);
    match store.get(&key) {
        Ok(None) => {}
        Ok(Some(_)) => return Err(exists(&key)),
        Err(e) if unreachable(&e) => return Ok(offline("read endpoint")(e)),
        Err(e) => return Err(store_err("read endpoint")(e)),
    }
    // Refused before anything is reserved (wire_pod reads it again behind its undo).
    conf.requested_mac()?;
    let cache = node_cache_path(conf).and_then(|p| NodeCache::open(&p).ok());
    let assigned = if requested.is_empty() {
        let req = malla_ipam::AutoAssign {
            handle: handle.clone(),
            node: node_name.to_string(),
            ipv4: want_v4,
            ipv6: want_v6,
            attrs,
            affine_hint: affine_hint(cache.as_ref()),
        };
        match ipam.auto_assign_in(&req, &pools) {
            Ok(a) => a,
            Err(malla_ipam::IpamError::Store(e)) if unreachable(&e) => {
                // Nothing half-written stays behind a lost connection for long: GC (or the
                // next ADD of this handle) cleans a reservation that did land.
                return Ok(offline("IPAM: assign")(e));
            }
            Err(e) => {
                return Err(CniError::new(
                    error::TRY_AGAIN_LATER,
                    "IPAM: no address",
                    e.to_string(),
                ))
            }
        }
    } else {
        // The `ips` capability: exactly the addresses the runtime asked for, all or none.
        let mut got = Vec::new();
        for ip in &requested {
            match ipam.assign_ip(*ip, &handle, node_name, &attrs) {
                Ok(a) => got.push(a),
                Err(e) => {
                    let mine: Vec<std::net::IpAddr> =
                        got.iter().map(|a: &malla_ipam::Assigned| a.addr).collect();
                    let _ = ipam.release_addrs_of_handle(&handle, &mine);
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
    if let Some(c) = &cache {
        // So that an ADD during a later outage cannot pick these before the agent's next
        // snapshot shows them (and DEL finds them in a block the snapshot does not show yet).
        // Best effort: the cache only ever narrows offline choices.
        let _ = c.note_held(&addrs, &handle);
    }
    // Exactly what this ADD reserved: a live attachment under the same handle (an ADD
    // repeated for an attachment that exists) keeps its own.
    let undo = || {
        let _ = ipam.release_addrs_of_handle(&handle, &addrs);
    };
    let (endpoint, wired) = wire_pod(conf, env, &addrs, mtu, &handle, &undo)?;
    if let Err(e) = malla_store::put_json(store, &key, &endpoint) {
        let _ = pod::unwire(&endpoint.host_ifname);
        undo();
        return Err(store_err("write endpoint")(e));
    }
    Ok(Online::Done(result::add_result(
        &conf.cni_version,
        env,
        &endpoint,
        &wired,
        mtu,
    )))
}

fn exists(key: &str) -> CniError {
    CniError::new(
        error::INVALID_CONFIG,
        "the attachment already exists (DEL it before adding it again)",
        key,
    )
}

/// Which families to assign: the configuration's, else those that have an enabled pool.
fn families(conf: &NetConf, has_v4: bool, has_v6: bool) -> Result<(bool, bool), CniError> {
    let want_v4 = conf.ipam.ipv4.unwrap_or(has_v4);
    let want_v6 = conf.ipam.ipv6.unwrap_or(has_v6);
    if !want_v4 && !want_v6 {
        return Err(CniError::new(
            error::INVALID_CONFIG,
            "no address family to assign",
            "no enabled IP pool exists and ipam.ipv4/ipam.ipv6 do not ask for one",
        ));
    }
    Ok((want_v4, want_v6))
}

/// Wires the pod's interface with `addrs` and builds its endpoint record; on failure removes
/// the veth and calls `undo` (which frees the reservation).
fn wire_pod(
    conf: &NetConf,
    env: &CniEnv,
    addrs: &[std::net::IpAddr],
    mtu: u32,
    handle: &str,
    undo: &dyn Fn(),
) -> Result<(WorkloadEndpoint, pod::Wired), CniError> {
    let host_ifname = pod::host_ifname(&env.container_id, &env.ifname);
    let wired = conf
        .requested_mac()
        .map_err(pod::WireFailure::from)
        .and_then(|mac| {
            pod::wire(&pod::WireRequest {
                netns: env.netns.clone(),
                ifname: env.ifname.clone(),
                host_ifname: host_ifname.clone(),
                addrs: addrs.to_vec(),
                mtu,
                mac,
            })
        });
    let wired = match wired {
        Ok(w) => w,
        Err(f) => {
            // Nothing half-done survives a failed ADD: the veth it made and the reservation go
            // (a veth it did not make stays: it may be a live attachment's).
            if f.created_veth {
                let _ = pod::unwire(&host_ifname);
            }
            undo();
            return Err(f.error);
        }
    };
    fault_point("after-wire");
    let endpoint = WorkloadEndpoint {
        namespace: env.pod_namespace.clone().unwrap_or_default(),
        pod: env.pod_name.clone().unwrap_or_default(),
        node: conf.node_name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        host_ifname,
        ips: addrs.iter().map(|a| ipnet::IpNet::from(*a)).collect(),
        mac: malla_api::format_mac(&wired.pod_mac),
        ipam_handle: handle.to_string(),
    };
    Ok((endpoint, wired))
}

/// ADD while the datastore is unreachable: an address from the node's own blocks through the
/// node cache, recorded there for the agent to write to the datastore when it returns.
fn add_offline(
    conf: &NetConf,
    env: &CniEnv,
    cache_path: &std::path::Path,
    cause: CniError,
) -> Result<String, CniError> {
    let cache_err = |e: &dyn std::fmt::Display| {
        CniError::new(
            error::TRY_AGAIN_LATER,
            "the datastore is unreachable and the node cache cannot serve",
            format!("{e}; the datastore: {}", cause.msg),
        )
    };
    let cache = NodeCache::open(cache_path).map_err(|e| cache_err(&e))?;
    let state = cache.state().map_err(|e| cache_err(&e))?;
    let node = state
        .node
        .clone()
        .ok_or_else(|| cache_err(&"the agent has not written the node cache yet"))?;
    let mtu = conf
        .mtu
        .unwrap_or_else(|| pod::pod_mtu(&node, &state.cluster.clone().unwrap_or_default()));
    let has = |v6: bool| state.blocks.iter().any(|b| b.cidr.addr().is_ipv6() == v6);
    let (want_v4, want_v6) = families(conf, has(false), has(true))?;
    conf.requested_mac()?;
    let handle = env.ipam_handle(&conf.name);
    let key = keys::endpoint(&conf.node_name, &env.container_id, &env.ifname);
    if state
        .pending
        .get(&handle)
        .is_some_and(|p| p.endpoint.is_some())
    {
        return Err(exists(&key));
    }
    let addrs = cache
        .assign_offline(
            &handle,
            &conf.node_name,
            want_v4,
            want_v6,
            &attrs_of(conf, env),
        )
        .map_err(|e| cache_err(&e))?;
    let undo = || {
        let _ = cache.release_offline(&handle, &key);
    };
    let (endpoint, wired) = wire_pod(conf, env, &addrs, mtu, &handle, &undo)?;
    if let Err(e) = cache.set_pending_endpoint(&handle, &key, &endpoint) {
        let _ = pod::unwire(&endpoint.host_ifname);
        undo();
        return Err(cache_err(&e));
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
    let handle = env.ipam_handle(&conf.name);
    let key = keys::endpoint(&conf.node_name, &env.container_id, &env.ifname);
    let offline = |cause: CniError| -> Result<(), CniError> {
        // DEL must not fail for an unreachable datastore: the node cache remembers the
        // release and the agent makes it when the datastore returns.
        match node_cache_path(conf).map(|p| NodeCache::open(&p)) {
            Some(Ok(cache)) => cache
                .release_offline(&handle, &key)
                .map_err(|e| CniError::new(error::TRY_AGAIN_LATER, "IPAM release", e.to_string())),
            _ => Err(cause),
        }
    };
    if let malla_store::DatastoreSpec::Local { path } = &conf.datastore {
        if !path.exists() && node_cache_path(conf).is_none() {
            // No datastore file (e.g. a minimal conflist on a node whose agent never ran):
            // nothing was ever recorded here, so there is nothing to release; not creating it.
            return Ok(());
        }
    }
    let store = match open_store(conf) {
        Ok(s) => s,
        Err(e) => return offline(e),
    };
    let store: &dyn Store = &*store;
    let cache = node_cache_path(conf).and_then(|p| NodeCache::open(&p).ok());
    let hints = match release_hints(cache.as_ref(), store, &handle, &key) {
        Ok(h) => h,
        Err(e) if unreachable(&e) => return offline(store_err("read endpoint")(e)),
        Err(e) => return Err(store_err("read endpoint")(e)),
    };
    // The attachment's own record names its handle: one an earlier version wrote (the
    // ambiguous encoding) is released as well.
    let recorded = match malla_store::get_json::<WorkloadEndpoint>(store, &key) {
        Ok(ep) => ep.map(|(ep, _)| ep.ipam_handle).filter(|h| *h != handle),
        Err(e) if unreachable(&e) => return offline(store_err("read endpoint")(e)),
        Err(e) => return Err(store_err("read endpoint")(e)),
    };
    let ipam = malla_ipam::Ipam::new(store);
    for h in std::iter::once(&handle).chain(recorded.as_ref()) {
        match ipam.release_by_handle_hinted(h, &hints) {
            Ok(_) => {}
            Err(malla_ipam::IpamError::Store(e)) if unreachable(&e) => {
                return offline(store_err("IPAM release")(e))
            }
            Err(e) => {
                return Err(CniError::new(
                    error::TRY_AGAIN_LATER,
                    "IPAM release",
                    e.to_string(),
                ))
            }
        }
    }
    if let Some(cache) = &cache {
        // An ADD made offline and deleted before the agent settled it.
        let _ = cache.release_offline(&handle, &key);
    }
    store
        .delete(&key, None)
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
