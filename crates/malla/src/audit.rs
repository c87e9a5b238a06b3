//! `malla audit`: a node and a cluster against the control-plane communications of the
//! Kubernetes docs — which control-plane ports listen (SSH 22, API server 6443, etcd
//! 2379–2380, kubelet 10250, kube-proxy 10256, controller manager 10257, scheduler 10259, and
//! the insecure ones: 8080, the kubelet's read-only 10255), whether pods and the world outside
//! the cluster reach them, whether the kubelet serves anonymous requests and how it authorizes
//! them, whether the API server accepts anonymous requests and verifies kubelet serving
//! certificates, and whether etcd answers without a client certificate.
//!
//! **In a lab** (`--lab NAME`, the default): every node's namespace and the control-plane
//! (fabric) namespace, where `--datastore etcd` runs etcd and `--datastore kubernetes` a real
//! kube-apiserver and its etcd. Listening sockets come from each namespace's kernel table;
//! reachability is tried for real, from one pod per node (inside the pod's namespace) and from
//! `external`, to the node's addresses; each port's protocol is asked from inside the host
//! (an anonymous `GET /pods` to the kubelet, `GET /api` to the API server, `GET /version` and
//! a key count to etcd without credentials); the API server's flags are read from its command
//! line; the embedded store's file mode is checked.
//!
//! **On a real node** (`--datastore` given, as `malla status`): this host only — the listening
//! sockets of the current network namespace (`/proc/thread-self/net/tcp{,6}`) judged by what
//! they are bound to (all addresses, or loopback), each port's protocol asked on this host
//! (127.0.0.1 for sockets bound to all addresses), a kube-apiserver process running here (its
//! command line), the API server of the kubeconfig (`--datastore kubernetes[:KUBECONFIG]`,
//! asked anonymously), the etcd endpoints of `--datastore etcd://…` (asked without
//! credentials) and the mode of a datastore file. Reachability from pods is not tried there:
//! run the audit in a lab, or from a pod, for that. Kubelet flags and configz are not read:
//! the kubelet's answer to an anonymous request says what its settings do.
//!
//! Every connection has a 300 ms connect timeout and every exchange a 1.5 s deadline; probes
//! run in parallel, so a 3-node lab takes a few seconds. The findings come from
//! [`findings::findings`] (pure, unit-tested).

pub mod findings;
pub mod http;
pub mod sockets;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use malla_dataplane::netns::NetNs;
use serde::Serialize;

use crate::output::{Output, Table};
use crate::{exit, ExitWith, Globals};
use findings::{
    ApiEndpointObs, ApiServerProcess, DatastoreFile, Finding, HostObs, HttpOutcome, ListenerObs,
    Observations, Reach, ServiceObs, Severity,
};
use http::Request;

/// How long a connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// How long one HTTP(S) exchange may take, all in.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Connections tried at once from one source namespace.
const THREADS_PER_SOURCE: usize = 8;

#[derive(Args)]
pub struct AuditArgs {
    /// Output format: table, wide (adds the rule's name), json or yaml.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// Exit with status 3 when a finding of this severity or worse is found.
    #[arg(long, value_enum, default_value = "high")]
    fail_on: Severity,
}

/// The audit's document (`-o json|yaml`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The lab audited; absent on a real node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lab: Option<String>,
    /// The hosts whose sockets were read.
    pub hosts: Vec<String>,
    /// The pods reachability was tried from (one per node with pods).
    pub probed_from_pods: Vec<String>,
    /// Where "outside the cluster" was tried from (`external` in a lab).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probed_from_outside: Option<String>,
    /// Findings by severity.
    pub counts: Counts,
    pub findings: Vec<Finding>,
}

pub fn run(g: &Globals, a: AuditArgs) -> anyhow::Result<()> {
    let report = match g.spec()? {
        Some(spec) => audit_this_host(&spec)?,
        None => audit_lab(g)?,
    };
    if !a.output.document(&report)? {
        let wide = a.output == Output::Wide;
        let mut head = vec!["SEVERITY", "WHERE", "WHAT", "EVIDENCE", "REMEDIATION"];
        if wide {
            head.insert(1, "CHECK");
        }
        let mut t = Table::new(&head);
        for f in &report.findings {
            let mut row = vec![
                f.severity.name().to_string(),
                f.place.clone(),
                f.what.clone(),
                f.evidence.clone(),
                f.remediation.clone(),
            ];
            if wide {
                row.insert(1, f.check.clone());
            }
            t.row(row);
        }
        t.print();
        let c = &report.counts;
        println!(
            "\n{} findings ({} high, {} medium, {} low, {} info) on {}; reachability tried from {}",
            report.findings.len(),
            c.high,
            c.medium,
            c.low,
            c.info,
            report.hosts.join(", "),
            match (&report.probed_from_pods[..], &report.probed_from_outside) {
                ([], None) => "nowhere (only what the sockets are bound to)".to_string(),
                (pods, outside) => pods
                    .iter()
                    .cloned()
                    .chain(outside.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        );
    }
    if findings::worst(&report.findings).is_some_and(|w| w <= a.fail_on) {
        return Err(ExitWith(exit::FOUND_PROBLEM).into());
    }
    Ok(())
}

/// How many findings of each severity.
#[derive(Debug, Serialize)]
pub struct Counts {
    pub high: usize,
    pub medium: usize,
    pub low: usize,
    pub info: usize,
}

fn counts(f: &[Finding]) -> Counts {
    let n = |s| f.iter().filter(|x| x.severity == s).count();
    Counts {
        high: n(Severity::High),
        medium: n(Severity::Medium),
        low: n(Severity::Low),
        info: n(Severity::Info),
    }
}

/// A host to audit: a node, or the lab's control-plane namespace.
#[derive(Debug, Clone)]
struct Host {
    name: String,
    netns: Option<String>,
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
}

/// A place connections start from.
#[derive(Debug, Clone)]
struct Source {
    name: String,
    netns: String,
    v4: bool,
    v6: bool,
}

/// Runs `f` in `netns` (on a thread of its own), or here.
fn in_netns<T: Send + 'static>(
    netns: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    match netns {
        None => Ok(f()),
        Some(ns) => Ok(NetNs::open_named(ns)
            .with_context(|| format!("opening network namespace {ns}"))?
            .run(f)
            .with_context(|| format!("entering network namespace {ns}"))?),
    }
}

/// Audited ports listening in `host`'s namespace, with their bound addresses.
fn listeners(host: &Host) -> anyhow::Result<BTreeMap<u16, Vec<IpAddr>>> {
    let all = in_netns(host.netns.as_deref(), sockets::listening_here)?
        .with_context(|| format!("reading the listening sockets of {}", host.name))?;
    Ok(all
        .into_iter()
        .filter(|(port, _)| findings::port_info(*port).is_some())
        .collect())
}

/// The addresses of `host` a connection to a socket bound to `bound` can use from outside it.
fn targets(host: &Host, bound: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for b in bound {
        let ips: Vec<IpAddr> = match b {
            a if a.is_loopback() => vec![],
            IpAddr::V4(a) if a.is_unspecified() => host.v4.iter().map(|a| (*a).into()).collect(),
            // `::` takes IPv4 too unless IPV6_V6ONLY: trying both tells.
            IpAddr::V6(a) if a.is_unspecified() => host
                .v4
                .iter()
                .map(|a| IpAddr::from(*a))
                .chain(host.v6.iter().map(|a| (*a).into()))
                .collect(),
            a => vec![*a],
        };
        for ip in ips {
            let s = SocketAddr::new(ip, port);
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

/// The address to ask a port's protocol on, from inside the host.
fn local_target(bound: &[IpAddr], port: u16) -> Option<SocketAddr> {
    // IPv4 first: a socket on `::` usually takes IPv4 too, and loopback always has 127.0.0.1.
    let pick = match bound.iter().min_by_key(|b| b.is_ipv6())? {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        a => *a,
    };
    Some(SocketAddr::new(pick, port))
}

/// Tries every `(key, address)` from inside `netns`, a few at a time; `Ok` when it connected.
fn connect_all(netns: &str, list: Vec<(usize, SocketAddr)>) -> anyhow::Result<Vec<(usize, Reach)>> {
    let lanes = THREADS_PER_SOURCE.min(list.len()).max(1);
    let mut chunks: Vec<Vec<(usize, SocketAddr)>> = vec![Vec::new(); lanes];
    for (i, item) in list.into_iter().enumerate() {
        chunks[i % lanes].push(item);
    }
    let mut threads = Vec::new();
    for chunk in chunks {
        let ns = NetNs::open_named(netns).with_context(|| format!("opening {netns}"))?;
        threads.push(std::thread::spawn(move || -> anyhow::Result<_> {
            ns.enter_this_thread()?;
            Ok(chunk
                .into_iter()
                .map(|(k, addr)| {
                    let r = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                        .map(drop)
                        .map_err(|e| match e.kind() {
                            std::io::ErrorKind::ConnectionRefused => "refused".to_string(),
                            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                                format!("no connection within {} ms", CONNECT_TIMEOUT.as_millis())
                            }
                            _ => crate::globals::strip_os_error(&e.to_string()),
                        });
                    (k, r)
                })
                .collect::<Vec<_>>())
        }));
    }
    let mut out = Vec::new();
    for t in threads {
        out.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("probe thread panicked"))??,
        );
    }
    Ok(out)
}

fn get(addr: SocketAddr, tls: bool, path: &str) -> HttpOutcome {
    http::send(
        &Request::get(addr, tls, path),
        CONNECT_TIMEOUT,
        EXCHANGE_TIMEOUT,
    )
}

/// etcd asked without credentials: plain HTTP, TLS without a client certificate, and (when one
/// of them is answered) how many keys a range request counts.
fn etcd_probe(addr: SocketAddr) -> ServiceObs {
    let (plain, tls_without_cert) = std::thread::scope(|s| {
        let tls = s.spawn(|| get(addr, true, "/version"));
        let plain = get(addr, false, "/version");
        (
            plain,
            tls.join()
                .unwrap_or_else(|_| HttpOutcome::Failed("probe panicked".into())),
        )
    });
    let is_etcd = |o: &HttpOutcome| matches!(o, HttpOutcome::Answered { status: 200, body } if body.contains("etcd"));
    let open_tls = if is_etcd(&plain) {
        Some(false)
    } else if is_etcd(&tls_without_cert) {
        Some(true)
    } else {
        None
    };
    // key "\0", range_end "\0": every key.
    let keys_counted = open_tls.and_then(|tls| {
        let answer = http::send(
            &Request {
                addr,
                tls,
                method: "POST",
                path: "/v3/kv/range".into(),
                body: Some(r#"{"key":"AA==","range_end":"AA==","count_only":true}"#.into()),
            },
            CONNECT_TIMEOUT,
            EXCHANGE_TIMEOUT,
        );
        match answer {
            HttpOutcome::Answered { status: 200, body } => {
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                // int64 travels as a string in etcd's JSON; an empty store has no "count".
                match &v["count"] {
                    serde_json::Value::String(s) => s.parse().ok(),
                    serde_json::Value::Number(n) => n.as_u64(),
                    _ => v.get("header").map(|_| 0),
                }
            }
            _ => None,
        }
    });
    ServiceObs::Etcd {
        plain,
        tls_without_cert,
        keys_counted,
    }
}

/// Asks each audited port's protocol, from inside the host: the service findings, and the
/// API server's anonymous answer.
fn service_probes(
    host: &Host,
    ports: &BTreeMap<u16, Vec<IpAddr>>,
) -> anyhow::Result<(BTreeMap<u16, ServiceObs>, Vec<ApiEndpointObs>)> {
    let wanted: Vec<(u16, SocketAddr)> = ports
        .iter()
        .filter_map(|(p, bound)| local_target(bound, *p).map(|a| (*p, a)))
        .collect();
    let name = host.name.clone();
    in_netns(host.netns.as_deref(), move || {
        std::thread::scope(|s| {
            let handles: Vec<_> = wanted
                .iter()
                .map(|(port, addr)| {
                    let (port, addr) = (*port, *addr);
                    s.spawn(move || -> (u16, Option<ServiceObs>, Option<HttpOutcome>) {
                        match port {
                            10250 => (
                                port,
                                Some(ServiceObs::Kubelet(get(addr, true, "/pods"))),
                                None,
                            ),
                            10255 => (
                                port,
                                Some(ServiceObs::KubeletReadOnly(get(addr, false, "/pods"))),
                                None,
                            ),
                            8080 => (
                                port,
                                Some(ServiceObs::InsecureHttp(get(addr, false, "/version"))),
                                None,
                            ),
                            2379 => (port, Some(etcd_probe(addr)), None),
                            6443 => (port, None, Some(get(addr, true, "/api"))),
                            _ => (port, None, None),
                        }
                    })
                })
                .collect();
            let mut services = BTreeMap::new();
            let mut apis = Vec::new();
            for (h, (_, addr)) in handles.into_iter().zip(&wanted) {
                let Ok((port, service, api)) = h.join() else {
                    continue;
                };
                if let Some(s) = service {
                    services.insert(port, s);
                }
                if let Some(o) = api {
                    apis.push(ApiEndpointObs {
                        place: name.clone(),
                        url: format!("https://{addr}"),
                        anonymous: o,
                    });
                }
            }
            (services, apis)
        })
    })
}

/// The flags of a running kube-apiserver, from its command line.
fn apiserver_process(place: &str, pid: u32) -> Option<ApiServerProcess> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let program = args.first()?;
    if !program.ends_with("kube-apiserver") {
        return None;
    }
    Some(ApiServerProcess {
        place: place.into(),
        pid,
        flags: findings::parse_flags(&args[1..]),
    })
}

fn datastore_file(path: &std::path::Path) -> Option<DatastoreFile> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(DatastoreFile {
        path: path.display().to_string(),
        mode: meta.permissions().mode(),
    })
}

/// Audits a list of hosts: sockets, reachability from `sources`, protocols.
fn observe(
    hosts: &[Host],
    pods: &[Source],
    outside: Option<&Source>,
) -> anyhow::Result<Observations> {
    // Sockets and protocols, every host at once.
    let per_host: Vec<anyhow::Result<_>> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|h| {
                s.spawn(move || -> anyhow::Result<_> {
                    let ports = listeners(h)?;
                    let (services, apis) = service_probes(h, &ports)?;
                    Ok((ports, services, apis))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("audit thread panicked"))?
            })
            .collect()
    });
    let mut obs = Observations::default();
    let mut plan: Vec<(usize, usize, SocketAddr)> = Vec::new(); // (host, port index) per target
    let mut hosts_obs = Vec::new();
    for (hi, (host, r)) in hosts.iter().zip(per_host).enumerate() {
        let (ports, mut services, apis) = r?;
        obs.api_endpoints.extend(apis);
        let mut listeners = Vec::new();
        for (port, bound) in ports {
            for t in targets(host, &bound, port) {
                plan.push((hi, listeners.len(), t));
            }
            listeners.push(ListenerObs {
                port,
                service: services.remove(&port),
                bound,
                from_pods: Vec::new(),
                from_outside: None,
                probed: !pods.is_empty() || outside.is_some(),
            });
        }
        hosts_obs.push(HostObs {
            name: host.name.clone(),
            listeners,
        });
    }
    // Reachability, every source at once.
    let sources: Vec<(bool, &Source)> = pods
        .iter()
        .map(|p| (false, p))
        .chain(outside.map(|o| (true, o)))
        .collect();
    let results: Vec<anyhow::Result<Vec<(usize, Reach)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|(_, src)| {
                let list: Vec<(usize, SocketAddr)> = plan
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, _, a))| if a.is_ipv4() { src.v4 } else { src.v6 })
                    .map(|(i, (_, _, a))| (i, *a))
                    .collect();
                s.spawn(move || connect_all(&src.netns, list))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
            })
            .collect()
    });
    for ((is_outside, src), r) in sources.iter().zip(results) {
        // Per listener: connected if any of its targets did.
        let mut by_listener: BTreeMap<(usize, usize), Reach> = BTreeMap::new();
        for (i, reach) in r? {
            let (h, l, _) = plan[i];
            let e = by_listener
                .entry((h, l))
                .or_insert_with(|| Err("no address of this family".into()));
            if e.is_err() {
                *e = reach;
            }
        }
        for ((h, l), reach) in by_listener {
            let listener = &mut hosts_obs[h].listeners[l];
            if *is_outside {
                listener.from_outside = Some(reach);
            } else {
                listener.from_pods.push((src.name.clone(), reach));
            }
        }
    }
    obs.hosts = hosts_obs;
    Ok(obs)
}

fn audit_lab(g: &Globals) -> anyhow::Result<Report> {
    let paths = g.lab_paths()?;
    let state = g.lab_state()?;
    let mut hosts: Vec<Host> = state
        .nodes
        .iter()
        .map(|n| Host {
            name: n.name.clone(),
            netns: Some(n.netns.clone()),
            v4: vec![n.underlay_ipv4],
            v6: n.underlay_ipv6.into_iter().collect(),
        })
        .collect();
    hosts.push(Host {
        name: "control-plane".into(),
        netns: Some(state.fabric_netns.clone()),
        v4: vec![malla_lab::store::ETCD_CLIENT.0],
        v6: if state.ipv6 {
            vec![Ipv6Addr::new(0xfd00, 0x198, 0x19, 0, 0, 0, 0, 1)]
        } else {
            vec![]
        },
    });
    // One pod per node (the first by name): same-node and cross-node paths both get tried. A
    // pod in its node's own namespace (hostNetwork) is the node, not a pod.
    let mut pods: Vec<Source> = Vec::new();
    for n in &state.nodes {
        if let Some(p) = state
            .pods
            .values()
            .find(|p| p.node == n.name && p.netns != n.netns)
        {
            pods.push(Source {
                name: p.key(),
                netns: p.netns.clone(),
                v4: p.ips.iter().any(IpAddr::is_ipv4),
                v6: p.ips.iter().any(IpAddr::is_ipv6),
            });
        }
    }
    let outside = Source {
        name: "external".into(),
        netns: state.external.netns.clone(),
        v4: true,
        v6: state.external.ipv6.is_some(),
    };
    let mut obs = observe(&hosts, &pods, Some(&outside))?;
    if let Some(pid) = state.control_plane.and_then(|c| c.apiserver) {
        obs.apiserver_processes
            .extend(apiserver_process("control-plane", pid));
    }
    if state.datastore == malla_lab::store::Backend::Local {
        obs.datastore_files.extend(datastore_file(&paths.store()));
    }
    let findings = findings::findings(&obs);
    Ok(Report {
        lab: Some(state.name.clone()),
        hosts: hosts.iter().map(|h| h.name.clone()).collect(),
        probed_from_pods: pods.iter().map(|p| p.name.clone()).collect(),
        probed_from_outside: Some(outside.name),
        counts: counts(&findings),
        findings,
    })
}

/// Every kube-apiserver process of this host: in this network namespace (others, e.g. a lab's
/// on the same machine, are other hosts).
fn local_apiservers(place: &str) -> Vec<ApiServerProcess> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let ours = std::fs::read_link("/proc/thread-self/ns/net").ok();
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "kube-apiserver")
                && std::fs::read_link(format!("/proc/{pid}/ns/net")).ok() == ours
        })
        .filter_map(|pid| apiserver_process(place, pid))
        .collect()
}

/// `https://host:port[/…]` as a socket address (resolved), and whether it is TLS.
fn url_addr(url: &str) -> anyhow::Result<(SocketAddr, bool)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        (false, url)
    };
    let hostport = rest.split('/').next().unwrap_or(rest);
    let with_port = if hostport.ends_with(']') || !hostport.contains(':') {
        format!("{hostport}:{}", if tls { 443 } else { 80 })
    } else {
        hostport.to_string()
    };
    let addr = with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {url}"))?
        .next()
        .with_context(|| format!("{url} resolves to no address"))?;
    Ok((addr, tls))
}

fn audit_this_host(spec: &malla_store::DatastoreSpec) -> anyhow::Result<Report> {
    use malla_store::DatastoreSpec;
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this-node".into());
    let host = Host {
        name: name.clone(),
        netns: None,
        v4: vec![],
        v6: vec![],
    };
    let mut obs = observe(std::slice::from_ref(&host), &[], None)?;
    obs.apiserver_processes = local_apiservers(&name);
    match spec {
        DatastoreSpec::Local { path } => obs.datastore_files.extend(datastore_file(path)),
        DatastoreSpec::Kubernetes { kubeconfig } => {
            let config = match kubeconfig {
                Some(p) => kube::config::Kubeconfig::read_from(p),
                None => kube::config::Kubeconfig::read(),
            }
            .context("reading the kubeconfig")?;
            let current = config.current_context.clone().unwrap_or_default();
            let cluster_name = config
                .contexts
                .iter()
                .find(|c| c.name == current)
                .and_then(|c| c.context.as_ref())
                .map(|c| c.cluster.clone());
            let server = config
                .clusters
                .iter()
                .find(|c| Some(&c.name) == cluster_name.as_ref())
                .or(config.clusters.first())
                .and_then(|c| c.cluster.as_ref()?.server.clone())
                .context("the kubeconfig names no API server")?;
            let (addr, tls) = url_addr(&server)?;
            // Asked already if it listens here.
            if !obs
                .api_endpoints
                .iter()
                .any(|e| e.url == format!("https://{addr}"))
            {
                obs.api_endpoints.push(ApiEndpointObs {
                    place: "kubeconfig".into(),
                    url: server.trim_end_matches('/').to_string(),
                    anonymous: get(addr, tls, "/api"),
                });
            }
        }
        DatastoreSpec::Etcd { endpoints, .. } => {
            for e in endpoints {
                let (addr, _) = url_addr(e)?;
                obs.hosts.push(HostObs {
                    name: format!("datastore {e}"),
                    listeners: vec![ListenerObs {
                        port: 2379,
                        bound: vec![addr.ip()],
                        from_pods: vec![],
                        from_outside: None,
                        probed: false,
                        service: Some(etcd_probe(addr)),
                    }],
                });
            }
        }
    }
    let findings = findings::findings(&obs);
    Ok(Report {
        lab: None,
        hosts: vec![name],
        probed_from_pods: vec![],
        probed_from_outside: None,
        counts: counts(&findings),
        findings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_the_binding() {
        let h = Host {
            name: "node-1".into(),
            netns: None,
            v4: vec![Ipv4Addr::new(198, 19, 0, 11)],
            v6: vec!["fd00:198:19::11".parse().unwrap()],
        };
        let any4: IpAddr = "0.0.0.0".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            targets(&h, &[any4], 10250),
            vec!["198.19.0.11:10250".parse().unwrap()]
        );
        assert_eq!(targets(&h, &[any6, any4], 22).len(), 2);
        assert!(targets(&h, &[lo], 2379).is_empty());
        assert_eq!(
            local_target(&[any6], 10250),
            Some("[::1]:10250".parse().unwrap())
        );
        assert_eq!(
            local_target(&["198.19.0.1".parse().unwrap()], 6443),
            Some("198.19.0.1:6443".parse().unwrap())
        );
    }

    #[test]
    fn urls_become_addresses() {
        assert_eq!(
            url_addr("https://198.19.0.1:6443").unwrap(),
            ("198.19.0.1:6443".parse().unwrap(), true)
        );
        assert_eq!(
            url_addr("http://127.0.0.1/").unwrap(),
            ("127.0.0.1:80".parse().unwrap(), false)
        );
        assert_eq!(
            url_addr("https://[fd00::1]").unwrap(),
            ("[fd00::1]:443".parse().unwrap(), true)
        );
    }
}
