//! `malla lab …`: up, down, apply, delete, get (nodes, pods, services, endpointslices,
//! networkpolicies), probe, demo (and the hidden probe server).

use std::collections::BTreeSet;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use malla_api::RoutingMode;
use malla_lab::manifest;
use malla_lab::probe::{self, Filter, ProbeResult};
use malla_lab::runtime;
use malla_lab::topology::{self, UpOptions};
use malla_lab::{LabPaths, LabState};
use serde::Serialize;

use crate::output::{Output, Table};
use crate::{exit, ExitWith, Globals};

#[derive(Args)]
pub struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Create the lab: fabric, nodes with agents, external. Idempotent.
    ///
    /// --datastore names the backend here: local (default), etcd or kubernetes.
    ///
    /// Example: malla lab up --lab demo --nodes 3 --routing vxlan --ipv6
    /// Example: malla lab up --lab k8s --kubelet --image malla-image.tar   (then:
    /// malla lab kubectl --lab k8s apply -f deploy/)
    /// Example: malla lab up --lab demo --routing bgp --router frr
    Up(UpArgs),
    /// Run kubectl against the lab's API server (`--datastore kubernetes` or `--kubelet`
    /// labs), from the lab's fabric namespace, with the lab's admin kubeconfig. Exits with
    /// kubectl's status.
    ///
    /// Example: malla lab kubectl --lab k8s -- get nodes -o wide
    Kubectl {
        /// kubectl's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Remove everything the lab created (also leftovers after a crash).
    ///
    /// Example: malla lab down --lab demo
    Down,
    /// Create Namespaces, Pods, Services, EndpointSlices and NetworkPolicies from Kubernetes
    /// manifests (the lab acts as the runtime). Every file is parsed and checked before
    /// anything is applied.
    ///
    /// On a `lab up --kubelet` lab everything goes through the API server and the kubelets run
    /// the pods (through containerd and the installed CNI plugin: install Malla first). What
    /// differs: a pod without `spec.nodeName` goes where kube-scheduler puts it; its container
    /// is the lab's probe server (`malla lab probe-server` serving the declared ports) from the
    /// Malla image `lab up --image` imported, whatever `image` and `command` the manifest
    /// names; apply waits until the pods are Ready; objects made with `lab kubectl` are left
    /// alone (neither probed nor removed).
    ///
    /// Example: malla lab apply --lab demo -f examples/shop.yaml -f examples/policies/
    Apply(FileArgs),
    /// Delete the objects of manifests (Pods through CNI DEL; on a `--kubelet` lab through the
    /// API server, the kubelet stopping them).
    ///
    /// Example: malla lab delete --lab demo -f examples/policies/
    Delete(FileArgs),
    /// Show lab objects.
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
    /// Probe reachability: every pod→pod pair on every declared port and protocol, node→pod
    /// for the node's own pods, pod→external, and every Service port. `--to node/NAME` probes
    /// the node's own ports (`--port`, else those its `hostNetwork` pods declare) from every
    /// pod, every other node and external (narrow with `--from external`, `--from node/NAME`).
    ///
    /// Exit status: 0 when every probe connected; 3 when the probes ran and some did not
    /// connect (a NetworkPolicy may deny them on purpose: the table says which; `malla policy
    /// trace` says why); 1 when a filter matches nothing or the probes could not run.
    ///
    /// Example: malla lab probe --lab demo --from shop/web --protocol tcp -o json
    /// Example: malla lab probe --lab demo --to node/node-1 --port 10250 --protocol tcp
    Probe(ProbeArgs),
    /// Up + the sample app (examples/shop.yaml: pods, a Service, NetworkPolicies) + probe,
    /// printed as a matrix in which a connection a policy denies on purpose reads `denied`.
    ///
    /// Example: malla lab demo --lab demo
    Demo {
        #[command(flatten)]
        up: UpArgs,
        /// Manifests to apply instead of the built-in sample app (FILE, DIR or -; repeatable).
        #[arg(short = 'f', long = "filename", value_name = "FILE|DIR|-")]
        files: Vec<String>,
    },
    /// BGP sessions of a `--routing bgp` lab: every node's speaker and the router, with each
    /// session's state and the routes received and sent.
    ///
    /// Exit status: 0 when every session is established, 3 when some are not, 1 when a
    /// speaker could not be asked.
    ///
    /// Example: malla lab bgp --lab demo -o json
    Bgp(GetArgs),
    /// (internal) The probe server a lab pod runs.
    #[command(hide = true)]
    ProbeServer {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: String,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

#[derive(Args)]
struct FileArgs {
    /// A manifest file, a directory (its *.yaml, *.yml and *.json files, in name order) or `-`
    /// (stdin). Repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        required = true
    )]
    files: Vec<String>,
}

#[derive(Args, Clone)]
struct UpArgs {
    /// How many nodes (node-1 … node-N).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// direct, vxlan or bgp (nodes on two segments joined by a BGP router: `--router`).
    #[arg(long, default_value = "direct")]
    routing: RoutingMode,
    /// Dual-stack: an IPv6 pool and underlay too.
    #[arg(long)]
    ipv6: bool,
    /// A real cluster: a kubelet and containerd on every node and kube-scheduler with the
    /// control plane (implies --datastore kubernetes); no lab agents: install Malla with
    /// `malla lab kubectl -- apply -f deploy/`.
    #[arg(long)]
    kubelet: bool,
    /// With --kubelet: an OCI archive (e.g. from scripts/build-image) to import into every
    /// node's containerd. Repeatable.
    #[arg(long = "image", value_name = "FILE", requires = "kubelet")]
    images: Vec<PathBuf>,
    /// With `--routing bgp`: the top-of-rack router in the fabric, bird or frr.
    #[arg(long, default_value = "bird")]
    router: malla_lab::bgp::RouterKind,
    /// With `--routing bgp`: the router is the nodes' route reflector (no node mesh).
    #[arg(long)]
    route_reflector: bool,
}

#[derive(Args, Clone, Copy)]
struct GetArgs {
    /// Output format: table, wide, json or yaml.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Subcommand)]
enum GetWhat {
    /// Nodes with their namespace, addresses and agent.
    #[command(visible_alias = "no", visible_alias = "node")]
    Nodes(GetArgs),
    /// Pods with their node and addresses.
    #[command(visible_alias = "po", visible_alias = "pod")]
    Pods(GetArgs),
    /// Services with their cluster IPs and ports.
    #[command(visible_alias = "svc", visible_alias = "service")]
    Services(GetArgs),
    /// EndpointSlices: the endpoints behind each Service (derived from its selector, or given).
    #[command(visible_alias = "endpointslice")]
    Endpointslices(GetArgs),
    /// NetworkPolicies with the pods they select.
    #[command(visible_alias = "netpol", visible_alias = "networkpolicy")]
    Networkpolicies(GetArgs),
}

#[derive(Args)]
struct ProbeArgs {
    /// Output format: table, wide, json or yaml.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// How long each probe waits to connect and for the answer, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Only from this source: namespace/name of a pod, node/NAME or external.
    #[arg(long)]
    from: Option<String>,
    /// Only to this destination: namespace/name of a pod, external, svc/NAMESPACE/NAME,
    /// nodeport/NODE or node/NAME (the node's own ports).
    #[arg(long)]
    to: Option<String>,
    /// Only to this port.
    #[arg(long)]
    port: Option<u16>,
    /// Only tcp or udp.
    #[arg(long)]
    protocol: Option<String>,
    /// Separate connections per source and target (see load spread and affinity).
    #[arg(long, default_value_t = 1)]
    count: usize,
}

/// The state root, overridable for tests.
pub fn state_root() -> Option<PathBuf> {
    std::env::var_os("MALLA_LAB_STATE_DIR").map(PathBuf::from)
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MALLA_CNI_BIN").filter(|_| name == "malla-cni") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    anyhow::ensure!(p.exists(), "{} not found next to {}", name, exe.display());
    Ok(p)
}

fn up_options(g: &Globals, a: &UpArgs) -> anyhow::Result<UpOptions> {
    Ok(UpOptions {
        nodes: a.nodes,
        routing: a.routing,
        ipv6: a.ipv6,
        malla_bin: std::env::current_exe()?,
        cni_bin: sibling_binary("malla-cni")?,
        datastore: if a.kubelet {
            // --kubelet implies the kubernetes datastore; another one named on the command
            // line is a contradiction, not something to override silently.
            if g.datastore.is_some()
                && !g.datastore_from_env
                && g.backend()? != malla_lab::store::Backend::Kubernetes
            {
                anyhow::bail!("--kubelet runs on the kubernetes datastore: drop --datastore or say kubernetes");
            }
            malla_lab::store::Backend::Kubernetes
        } else {
            g.backend()?
        },
        kubelet: a.kubelet,
        images: a.images.clone(),
        router: a.router,
        route_reflector: a.route_reflector,
    })
}

/// The sample app `lab demo` applies: examples/shop.yaml.
pub const SAMPLE_APP: &str = include_str!("../../../examples/shop.yaml");

pub fn run(g: &Globals, args: LabArgs) -> anyhow::Result<()> {
    let paths = g.lab_paths()?;
    match args.command {
        LabCommand::Up(a) => {
            let state = topology::up(&paths, &up_options(g, &a)?)?;
            println!(
                "lab {} is up: {} nodes, routing {}, {}, datastore {:?}",
                state.name,
                state.nodes.len(),
                state.routing,
                if state.ipv6 { "dual-stack" } else { "IPv4" },
                state.datastore
            );
            if state.kubelet {
                println!(
                    "next: install Malla: malla lab kubectl --lab {} -- apply -f DEPLOY_DIR (deploy/ edited as docs/install.md says)",
                    state.name
                );
            } else {
                println!(
                    "next: malla lab apply --lab {} -f examples/shop.yaml",
                    state.name
                );
            }
        }
        LabCommand::Down => {
            let removed = topology::down(&paths)?;
            println!(
                "lab {} is down ({} namespaces removed)",
                paths.name,
                removed.len()
            );
        }
        LabCommand::Apply(f) => {
            for o in runtime::apply(
                &paths,
                &std::env::current_exe()?,
                &read_manifests(&f.files)?,
            )? {
                println!("{o}");
            }
        }
        LabCommand::Delete(f) => {
            for o in runtime::delete(&paths, &read_manifests(&f.files)?)? {
                println!("{o}");
            }
        }
        LabCommand::Get { what } => get(g, &what)?,
        LabCommand::Kubectl { args } => {
            let state = g.lab_state()?;
            if state.datastore != malla_lab::store::Backend::Kubernetes {
                anyhow::bail!(
                    "lab {} runs on the {:?} datastore: kubectl needs `lab up --datastore kubernetes` or `--kubelet`",
                    state.name,
                    state.datastore
                );
            }
            let access = malla_lab::control_plane::access(
                &malla_lab::store::control_plane_options(&paths, &state.fabric_netns),
            )?;
            let status = access
                .kubectl()?
                .args(&args)
                .status()
                .context("running kubectl")?;
            if !status.success() {
                return Err(ExitWith(status.code().unwrap_or(1)).into());
            }
        }
        LabCommand::Probe(a) => {
            let mut state = g.lab_state()?;
            if state.kubelet {
                // The pods' current containers (a restarted one is another process).
                malla_lab::kube_pods::refresh(&paths, &mut state)?;
            }
            let filter = Filter {
                from: a.from,
                to: a.to,
                port: a.port,
                protocol: a.protocol,
                count: a.count,
            };
            let results = probe::run(
                probe::plan(&state, &filter)?,
                Duration::from_millis(a.timeout_ms),
            )?;
            let denied = policy_denied(g, &state, &results);
            if !a.output.document(&results)? {
                print_probes(&results, &denied, a.output == Output::Wide);
            }
            if results.iter().any(|r| !r.connected) {
                return Err(ExitWith(exit::FOUND_PROBLEM).into());
            }
        }
        LabCommand::Bgp(a) => bgp_status(g, &paths, a.output)?,
        LabCommand::Demo { up, files } => demo(g, &paths, &up, &files)?,
        LabCommand::ProbeServer {
            name,
            listen,
            ready_file,
        } => probe::serve(&name, &probe::parse_listen(&listen)?, ready_file.as_deref())?,
    }
    Ok(())
}

fn opt(ip: Option<IpAddr>) -> String {
    ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into())
}

fn print_probes(results: &[ProbeResult], denied: &BTreeSet<usize>, wide: bool) {
    let mut head = vec!["FROM", "TO", "IP", "PORT", "PROTO", "RESULT", "ANSWERED BY"];
    if wide {
        head.push("CLIENT -> SEEN");
    }
    head.push("ERROR");
    let mut t = Table::new(&head).right(3);
    for (i, r) in results.iter().enumerate() {
        let result = if r.connected {
            if r.no_nat() {
                "ok"
            } else {
                "ok (nat)"
            }
        } else if denied.contains(&i) {
            "denied"
        } else {
            "FAIL"
        };
        let mut row = vec![
            r.from.clone(),
            r.to.clone(),
            r.ip.to_string(),
            r.port.to_string(),
            r.protocol.clone(),
            result.to_string(),
            r.answered_by.clone().unwrap_or_else(|| "-".into()),
        ];
        if wide {
            row.push(format!("{} -> {}", opt(r.client_ip), opt(r.seen_source_ip)));
        }
        row.push(r.error.clone().unwrap_or_default());
        t.row(row);
    }
    t.print();
}

/// The probes (by index) that did not connect because a NetworkPolicy denies them: the
/// policy verdict for pod and node sources (to a pod, to external, or to every endpoint of a
/// Service).
/// Empty when the datastore cannot be read (then every failure reads FAIL).
fn policy_denied(g: &Globals, state: &LabState, results: &[ProbeResult]) -> BTreeSet<usize> {
    use malla_calc::policy::{explain, Connection, Endpoint};
    let Ok(store) = g.open_store() else {
        return BTreeSet::new();
    };
    let Ok(view) = malla_agent::read_view(&*store) else {
        return BTreeSet::new();
    };
    if view.policies.is_empty() {
        return BTreeSet::new();
    }
    let pods = malla_calc::routes::policy_pods(&view);
    let pod_list: Vec<&malla_lab::state::PodState> = state.pods.values().collect();
    let proto = |p: &str| match p {
        "udp" => malla_api::service::Protocol::Udp,
        _ => malla_api::service::Protocol::Tcp,
    };
    let denies = |src: IpAddr, dst: IpAddr, port: u16, p: &str| {
        let c = Connection {
            src: Endpoint::resolve(&pods, src),
            dst: Endpoint::resolve(&pods, dst),
            port,
            proto: proto(p),
        };
        !explain(&view.policies, &view.namespaces, &c).allowed
    };
    let mut out = BTreeSet::new();
    for (i, r) in results.iter().enumerate() {
        if r.connected {
            continue;
        }
        // The source's own address: a pod's, or a node's underlay (`external` has no
        // expectation: node ports are not policy's business here).
        let src_ips: Vec<IpAddr> = if let Some(pod) = state.pods.get(&r.from) {
            pod.ips.clone()
        } else if let Some(node) = r.from.strip_prefix("node/").and_then(|n| state.node(n)) {
            std::iter::once(IpAddr::V4(node.underlay_ipv4))
                .chain(node.underlay_ipv6.map(IpAddr::V6))
                .collect()
        } else {
            continue;
        };
        let Some(src_ip) = src_ips.iter().find(|s| s.is_ipv4() == r.ip.is_ipv4()) else {
            continue;
        };
        let denied = match r.to.strip_prefix("svc/") {
            None => denies(*src_ip, r.ip, r.port, &r.protocol),
            Some(key) => {
                // Every endpoint of the Service port, after DNAT.
                let Some(svc) = state.services.get(key) else {
                    continue;
                };
                let Some(sp) = svc
                    .ports
                    .iter()
                    .find(|p| p.port == r.port && p.protocol.nft() == r.protocol)
                else {
                    continue;
                };
                let slices = malla_lab::services::derive_slices(svc, &pod_list);
                let mut targets = Vec::new();
                for s in slices.iter().chain(
                    state
                        .manual_slices
                        .values()
                        .filter(|s| s.namespace == svc.namespace && s.service == svc.name),
                ) {
                    let Some(port) = s.ports.iter().find(|p| p.name == sp.name) else {
                        continue;
                    };
                    for ep in &s.endpoints {
                        for a in ep
                            .addresses
                            .iter()
                            .filter(|a| a.is_ipv4() == r.ip.is_ipv4())
                        {
                            targets.push((*a, port.port));
                        }
                    }
                }
                !targets.is_empty()
                    && targets
                        .iter()
                        .all(|(ip, port)| denies(*src_ip, *ip, *port, &r.protocol))
            }
        };
        if denied {
            out.insert(i);
        }
    }
    out
}

/// Reads and parses every manifest of `-f` (files, directories, `-` for stdin), each checked
/// before anything is applied; errors name the file and the document.
fn read_manifests(files: &[String]) -> anyhow::Result<Vec<manifest::Object>> {
    let mut objects = Vec::new();
    let mut stdin_read = false;
    for f in files {
        if f == "-" {
            anyhow::ensure!(!stdin_read, "-f -: stdin can be read only once");
            stdin_read = true;
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the manifest from stdin")?;
            objects.extend(manifest::parse(&text).context("stdin")?);
            continue;
        }
        let path = Path::new(f);
        let meta = std::fs::metadata(path).with_context(|| format!("-f {f}"))?;
        let list = if meta.is_dir() {
            let mut list: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading directory {f}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                })
                .collect();
            list.sort();
            anyhow::ensure!(
                !list.is_empty(),
                "-f {f}: the directory holds no *.yaml, *.yml or *.json file"
            );
            list
        } else {
            vec![path.to_path_buf()]
        };
        for file in list {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            objects.extend(manifest::parse(&text).with_context(|| format!("{}", file.display()))?);
        }
    }
    // The same document given twice (a file and the directory holding it) is applied once, as
    // kubectl's second apply of it would change nothing.
    let mut seen = std::collections::HashSet::new();
    Ok(objects
        .into_iter()
        .filter(|o| seen.insert(format!("{o:?}")))
        .collect())
}

/// A node as `lab get nodes -o json|yaml` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeView {
    name: String,
    netns: String,
    addresses: Vec<IpAddr>,
    agent_pid: Option<u32>,
    /// Whether the agent process runs.
    agent_running: bool,
    /// Pods scheduled on the node.
    pods: usize,
}

/// A pod as `lab get pods -o json|yaml` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PodView<'a> {
    namespace: &'a str,
    name: &'a str,
    node: &'a str,
    netns: &'a str,
    container_id: &'a str,
    ips: &'a [IpAddr],
    ports: &'a [malla_lab::state::PortSpec],
    labels: &'a std::collections::BTreeMap<String, String>,
}

/// Whether process `pid` runs.
pub fn pid_alive(pid: Option<u32>) -> bool {
    pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
}

/// In a `--kubelet` lab the agent is the DaemonSet's pod, started by the node's kubelet: the
/// process running `malla agent` in the node's network namespace `netns`, if any.
fn daemonset_agent_pid(netns: &str) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(format!("/run/netns/{netns}")).ok()?;
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let mut args = cmdline.split(|b| *b == 0);
        if !args.next()?.ends_with(b"malla") || args.next()? != b"agent" {
            return None;
        }
        let ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
        (ns.dev() == want.dev() && ns.ino() == want.ino()).then_some(pid)
    })
}

fn get(g: &Globals, what: &GetWhat) -> anyhow::Result<()> {
    let state = g.lab_state()?;
    match what {
        GetWhat::Nodes(a) => {
            let nodes: Vec<NodeView> = state
                .nodes
                .iter()
                .map(|n| {
                    let agent_pid = if state.kubelet {
                        daemonset_agent_pid(&n.netns)
                    } else {
                        n.agent_pid
                    };
                    NodeView {
                        name: n.name.clone(),
                        netns: n.netns.clone(),
                        addresses: std::iter::once(IpAddr::V4(n.underlay_ipv4))
                            .chain(n.underlay_ipv6.map(IpAddr::V6))
                            .collect(),
                        agent_pid,
                        agent_running: pid_alive(agent_pid),
                        pods: state.pods.values().filter(|p| p.node == n.name).count(),
                    }
                })
                .collect();
            if a.output.document(&nodes)? {
                return Ok(());
            }
            let wide = a.output == Output::Wide;
            let mut head = vec!["NAME", "AGENT", "PODS", "ADDRESSES"];
            if wide {
                head.extend(["PID", "NETNS"]);
            }
            let mut t = Table::new(&head).right(2);
            for n in &nodes {
                let mut row = vec![
                    n.name.clone(),
                    if n.agent_running {
                        "running"
                    } else {
                        "stopped"
                    }
                    .into(),
                    n.pods.to_string(),
                    join(&n.addresses),
                ];
                if wide {
                    row.push(n.agent_pid.map(|p| p.to_string()).unwrap_or("-".into()));
                    row.push(n.netns.clone());
                }
                t.row(row);
            }
            t.print();
        }
        GetWhat::Pods(a) => {
            let mut state = state;
            if state.kubelet {
                malla_lab::kube_pods::refresh(&g.lab_paths()?, &mut state)?;
            }
            print_pods(&state, a.output)?
        }
        GetWhat::Services(a) => {
            let svcs: Vec<&malla_api::service::Service> = state.services.values().collect();
            if a.output.document(&svcs)? {
                return Ok(());
            }
            let wide = a.output == Output::Wide;
            let mut head = vec!["NAMESPACE", "NAME", "TYPE", "CLUSTER-IPS", "PORTS"];
            if wide {
                head.push("SELECTOR");
            }
            let mut t = Table::new(&head);
            for s in svcs {
                let ports: Vec<String> = s
                    .ports
                    .iter()
                    .map(|p| match p.node_port {
                        Some(np) => format!("{}:{np}/{}", p.port, p.protocol.nft().to_uppercase()),
                        None => format!("{}/{}", p.port, p.protocol.nft().to_uppercase()),
                    })
                    .collect();
                let mut row = vec![
                    s.namespace.clone(),
                    s.name.clone(),
                    format!("{:?}", s.kind),
                    join(&s.cluster_ips),
                    ports.join(","),
                ];
                if wide {
                    row.push(match &s.selector {
                        Some(sel) => labels(sel),
                        None => "<none>".into(),
                    });
                }
                t.row(row);
            }
            t.print();
        }
        GetWhat::Endpointslices(a) => {
            let pods: Vec<&malla_lab::state::PodState> = state.pods.values().collect();
            let mut slices: Vec<malla_api::service::EndpointSlice> = state
                .services
                .values()
                .flat_map(|s| malla_lab::services::derive_slices(s, &pods))
                .chain(state.manual_slices.values().cloned())
                .collect();
            slices.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            if a.output.document(&slices)? {
                return Ok(());
            }
            let wide = a.output == Output::Wide;
            let mut head = vec![
                "NAMESPACE",
                "NAME",
                "SERVICE",
                "ADDRESSTYPE",
                "PORTS",
                "ENDPOINTS",
            ];
            if wide {
                head.push("TARGETS");
            }
            let mut t = Table::new(&head);
            for s in &slices {
                let ports: Vec<String> = s.ports.iter().map(|p| p.port.to_string()).collect();
                let eps: Vec<String> = s
                    .endpoints
                    .iter()
                    .flat_map(|e| e.addresses.iter().map(|a| a.to_string()))
                    .collect();
                let mut row = vec![
                    s.namespace.clone(),
                    s.name.clone(),
                    s.service.clone(),
                    format!("{:?}", s.address_type),
                    ports.join(","),
                    if eps.is_empty() {
                        "<none>".into()
                    } else {
                        eps.join(",")
                    },
                ];
                if wide {
                    let targets: Vec<String> = s
                        .endpoints
                        .iter()
                        .filter_map(|e| e.target.clone())
                        .collect();
                    row.push(targets.join(","));
                }
                t.row(row);
            }
            t.print();
        }
        GetWhat::Networkpolicies(a) => {
            let pols: Vec<&malla_api::policy::NetworkPolicy> = state.policies.values().collect();
            if a.output.document(&pols)? {
                return Ok(());
            }
            let mut t = Table::new(&["NAMESPACE", "NAME", "POD-SELECTOR", "TYPES", "SELECTED"]);
            for p in pols {
                let selected = state
                    .pods
                    .values()
                    .filter(|pod| {
                        pod.namespace == p.namespace && p.spec.pod_selector.matches(&pod.labels)
                    })
                    .count();
                let types = p.effective_policy_types();
                let mut tt = Vec::new();
                if types.ingress {
                    tt.push("Ingress");
                }
                if types.egress {
                    tt.push("Egress");
                }
                t.row(vec![
                    p.namespace.clone(),
                    p.name.clone(),
                    selector_text(&p.spec.pod_selector),
                    tt.join(","),
                    selected.to_string(),
                ]);
            }
            t.print();
        }
    }
    Ok(())
}

fn join<T: ToString>(items: &[T]) -> String {
    let v: Vec<String> = items.iter().map(ToString::to_string).collect();
    if v.is_empty() {
        "<none>".into()
    } else {
        v.join(",")
    }
}

fn labels(m: &std::collections::BTreeMap<String, String>) -> String {
    let v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.join(",")
}

/// A selector as kubectl prints one: `app=api,tier in (a,b)`; `<all pods>` when empty.
fn selector_text(s: &malla_api::policy::LabelSelector) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in &s.match_expressions {
        let op = serde_json::to_value(&e.operator)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        parts.push(if e.values.is_empty() {
            format!("{} {op}", e.key)
        } else {
            format!("{} {op} ({})", e.key, e.values.join(","))
        });
    }
    if parts.is_empty() {
        "<all pods>".into()
    } else {
        parts.join(",")
    }
}

fn print_pods(state: &LabState, output: Output) -> anyhow::Result<()> {
    let pods: Vec<PodView> = state
        .pods
        .values()
        .map(|p| PodView {
            namespace: &p.namespace,
            name: &p.name,
            node: &p.node,
            netns: &p.netns,
            container_id: &p.container_id,
            ips: &p.ips,
            ports: &p.ports,
            labels: &p.labels,
        })
        .collect();
    if output.document(&pods)? {
        return Ok(());
    }
    let wide = output == Output::Wide;
    let mut head = vec!["NAMESPACE", "NAME", "NODE", "IPS"];
    if wide {
        head.extend(["PORTS", "NETNS"]);
    }
    let mut t = Table::new(&head);
    for p in &pods {
        let mut row = vec![
            p.namespace.to_string(),
            p.name.to_string(),
            p.node.to_string(),
            join(p.ips),
        ];
        if wide {
            let ports: Vec<String> = p
                .ports
                .iter()
                .map(|x| format!("{}/{}", x.port, x.protocol))
                .collect();
            row.push(ports.join(","));
            row.push(p.netns.to_string());
        }
        t.row(row);
    }
    t.print();
    Ok(())
}

fn demo(g: &Globals, paths: &LabPaths, up: &UpArgs, files: &[String]) -> anyhow::Result<()> {
    let state = topology::up(paths, &up_options(g, up)?)?;
    println!(
        "lab {} is up: {} nodes, routing {}{}",
        state.name,
        state.nodes.len(),
        state.routing,
        if state.ipv6 { ", dual-stack" } else { "" }
    );
    let objects = if files.is_empty() {
        manifest::parse(SAMPLE_APP).context("built-in sample app (examples/shop.yaml)")?
    } else {
        read_manifests(files)?
    };
    for o in runtime::apply(paths, &std::env::current_exe()?, &objects)? {
        println!("{o}");
    }
    let state = LabState::require(paths)?;
    println!();
    print_pods(&state, Output::Table)?;
    println!();
    let results = probe::run(
        probe::plan(&state, &Filter::default())?,
        Duration::from_millis(1000),
    )?;
    let denied = policy_denied(g, &state, &results);
    print!("{}", probe::matrix(&results, &denied));
    let direct = results
        .iter()
        .filter(|r| r.to != "external" && r.no_nat())
        .count();
    let pod_pairs = results
        .iter()
        .filter(|r| r.to != "external" && r.connected)
        .count();
    println!("{direct}/{pod_pairs} connected probes to pods and Services saw the client's own address (no NAT)");
    let lab = &paths.name;
    println!(
        "\nNext: `malla lab probe --lab {lab} -o wide`, `malla policy trace --lab {lab} --all`, \
         `malla status --lab {lab}`, `malla ipam show --lab {lab}`, `malla lab down --lab {lab}`."
    );
    let failed = results
        .iter()
        .enumerate()
        .filter(|(i, r)| !r.connected && !denied.contains(i))
        .count();
    if failed > 0 {
        eprintln!("{failed} probes failed that no NetworkPolicy denies");
        return Err(ExitWith(exit::FOUND_PROBLEM).into());
    }
    Ok(())
}

/// `malla lab bgp`: every speaker's sessions.
fn bgp_status(g: &Globals, paths: &LabPaths, output: Output) -> anyhow::Result<()> {
    let state = g.lab_state()?;
    anyhow::ensure!(
        state.routing == RoutingMode::Bgp,
        "lab {:?} routes with {}, not bgp (malla lab up --routing bgp)",
        state.name,
        state.routing
    );
    crate::bgp_cmd::print_sessions(&malla_lab::bgp::sessions(paths, &state)?, output)
}
