//! `policy-bench`: NetworkPolicy at scale.
//!
//! 1. Programming from cold: a synthetic cluster (10k pods over 50 namespaces, most of them on
//!    other nodes, 1k policies mixing pod selectors, namespace selectors, ipBlocks, named ports,
//!    egress and default-deny) through `policy_pods` + `compile` (*calc*), the node table +
//!    `render_policy` + `render_full` (*render*) and `nft -f -` inside a namespace of ours
//!    (*apply*). The floor is an `nft -f -` of an empty table in the same run.
//! 2. One pod label change: a remote pod's labels change so it enters a peer selector; the
//!    program is recomputed, `render_diff`-ed and applied to the same namespace; and the same
//!    changes through the agent's member path ([`PolicyNode`]: follow the pod, plan the set
//!    element changes against the applied table, send them over nfnetlink) into a second
//!    namespace holding the same table, checked equal to the rebuild's table after each change.
//!    2b. The same kind of change through the calculation graph's policy node
//!    ([`PolicyIndex`]) at each size of `--index-pods` (1k and 10k pods, same policies): the
//!    index's time for the change (it must not grow with the pods), beside a full compile's.
//! 3. Connection setup with 1 vs N policies on the path: a 1-node lab, pods `client` and
//!    `server`; 0, 1 or N policies select the server (N-1 allow other ipBlocks on other ports,
//!    or with `--shared-port` on the server's port); TCP connect + first byte from the client's
//!    namespace.
//! 4. Agent RSS: a 1-node lab whose datastore gets the synthetic cluster of part 1 (pods,
//!    endpoint records on remote nodes, their nodes and blocks, namespaces, policies).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::policy::{
    EgressRule, IngressRule, IpBlock, LabelSelector, LabelSelectorRequirement, NetworkPolicy,
    NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec, Operator, PolicyType,
};
use malla_api::service::{Protocol, TargetPort};
use malla_api::{keys, ContainerPort, Namespace, Node, Pod, WorkloadEndpoint};
use malla_bench::{
    begin, check, cpu_time, default_pool, first_ipv4, measure_connections, mib, ms, nft_floor,
    percentile, ratio, ratio_d, require_agent, unless, yes, BinArgs, Bins, ChangeStats, Namespaces,
};
use malla_calc::nft as model;
use malla_calc::policy::{
    compile, PolicyIndex, PolicyInputs, PolicyNode, PolicyPod, PolicyProgram,
};
use malla_calc::{masquerade, ClusterView};
use malla_dataplane::netns::NetNs;
use malla_dataplane::nft;
use malla_dataplane::nft::elements::ElementSocket;
use malla_lab::store as lab_store;
use malla_lab::topology;
use malla_store::Store;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "policy-bench",
    version,
    about = "NetworkPolicy: programming time, one label change, connection setup with 1 vs N policies, agent RSS"
)]
struct Args {
    /// Part 5 only: the synthetic cluster with two thirds of its policies turned into
    /// Calico's (global ones in tier `security`, namespaced ones in tier `platform`, the rest
    /// Kubernetes NetworkPolicies in `default`): programming from cold, a label change
    /// through the agent's tier member path and through the whole-node path, and (unless
    /// `--skip-rss`) the agent's RSS holding it all.
    #[arg(long)]
    tiers: bool,
    /// Synthetic pods (parts 1, 2 and 4).
    #[arg(long, default_value_t = 10000)]
    pods: usize,
    /// Of those, pods on the measured node (`node-1`); the rest are on remote nodes.
    #[arg(long, default_value_t = 100)]
    local_pods: usize,
    /// Synthetic NetworkPolicies.
    #[arg(long, default_value_t = 1000)]
    policies: usize,
    /// Namespaces the pods and policies are spread over.
    #[arg(long, default_value_t = 50)]
    namespaces: usize,
    /// Remote nodes the remote pods are spread over (by /26 block).
    #[arg(long, default_value_t = 50)]
    remote_nodes: usize,
    /// Single label changes (part 2; the median is reported).
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// Part 2b: cluster sizes (pods) at which the incremental policy index is timed.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    index_pods: Vec<usize>,
    /// Policies selecting the server in the large case of part 3.
    #[arg(long, default_value_t = 1000)]
    path_policies: usize,
    /// Part 3: the fillers allow their /32 on the server's port too (every filler's peer set is
    /// then on the path of the client's connections: the worst case for the port dispatch).
    #[arg(long)]
    shared_port: bool,
    /// TCP connections per case in part 3 (split over the rounds).
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Rounds of part 3; each measures every case once, interleaved, to cancel drift.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Skip parts 1 and 2 (programming, label change).
    #[arg(long)]
    skip_programming: bool,
    /// Skip part 3 (connection latency).
    #[arg(long)]
    skip_latency: bool,
    /// Skip part 4 (agent RSS).
    #[arg(long)]
    skip_rss: bool,
    #[command(flatten)]
    bins: BinArgs,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 1800)]
    max_seconds: u64,
}

/// The measured node.
const NODE: &str = "node-1";
/// Local synthetic pods: 198.18.60.0 + k (k < 512).
const LOCAL_BASE: u32 = u32::from_be_bytes([198, 18, 60, 0]);
/// Remote synthetic pods: 198.18.64.0/18, cut into /26 blocks affine to the remote nodes.
const REMOTE_BASE: u32 = u32::from_be_bytes([198, 18, 64, 0]);
const REMOTE_SPAN: usize = 16384;
/// Port of the server pod's probe server (part 3).
const SERVER_PORT: u16 = 8080;
/// Apps per namespace; tiers by app.
const APPS: usize = 20;
const TIERS: [&str; 4] = ["web", "api", "db", "cache"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];

// ---------------------------------------------------------------------------------------------
// The synthetic cluster

fn ns_name(n: usize) -> String {
    format!("ns-{n:02}")
}

fn app(a: usize) -> String {
    format!("app-{}", a % APPS)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: vec![],
    }
}

fn expr(key: &str, operator: Operator, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

fn port(protocol: Protocol, port: u16, end_port: Option<u16>) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol,
        port: Some(TargetPort::Number(port)),
        end_port,
    }
}

fn named(name: &str) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Protocol::Tcp,
        port: Some(TargetPort::Name(name.into())),
        end_port: None,
    }
}

fn pods_peer(s: LabelSelector) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(s),
        ..Default::default()
    }
}

fn ns_peer(ns: LabelSelector, pods: Option<LabelSelector>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(ns),
        pod_selector: pods,
        ip_block: None,
    }
}

fn block_peer(cidr: String, except: Vec<String>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IpBlock { cidr, except }),
        ..Default::default()
    }
}

fn ingress(from: Vec<NetworkPolicyPeer>, ports: Vec<NetworkPolicyPort>) -> IngressRule {
    IngressRule { from, ports }
}

fn egress(to: Vec<NetworkPolicyPeer>, ports: Vec<NetworkPolicyPort>) -> EgressRule {
    EgressRule { to, ports }
}

/// Synthetic policy `p`: 20 kinds, round-robin over the namespaces.
fn synthetic_policy(p: usize, namespaces: usize) -> NetworkPolicy {
    let n = p % namespaces;
    let q = (p / namespaces) % 20;
    let mut spec = NetworkPolicySpec::default();
    let kind = match q {
        0 => {
            // Default deny ingress for the namespace.
            spec.policy_types = Some(vec![PolicyType::Ingress]);
            "default-deny"
        }
        1..=10 => {
            let a = (q - 1) * 2;
            spec.pod_selector = sel(&[("app", &app(a))]);
            spec.ingress = vec![
                ingress(
                    vec![pods_peer(sel(&[("app", &app(a + 1))]))],
                    vec![port(Protocol::Tcp, 8080, None)],
                ),
                ingress(
                    vec![ns_peer(
                        sel(&[("team", &format!("team-{}", n % 10))]),
                        Some(sel(&[("tier", "web")])),
                    )],
                    vec![named("http")],
                ),
            ];
            "allow-app"
        }
        11..=13 => {
            spec.pod_selector = LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![expr("tier", Operator::In, &["web", "api"])],
            };
            spec.ingress = vec![ingress(
                vec![ns_peer(sel(&[("env", "prod")]), None)],
                vec![
                    port(Protocol::Tcp, 443, None),
                    port(Protocol::Tcp, 8443, Some(8450)),
                ],
            )];
            "allow-prod"
        }
        14 | 15 => {
            spec.pod_selector = sel(&[("tier", TIERS[q - 14])]);
            let c = 128 + p % 32;
            let wide = 192 + 16 * (p % 4);
            spec.ingress = vec![ingress(
                vec![
                    block_peer(
                        format!("198.19.{c}.0/24"),
                        vec![format!("198.19.{c}.128/26")],
                    ),
                    block_peer(
                        format!("198.19.{wide}.0/20"),
                        vec![format!("198.19.{}.0/24", wide + p % 16)],
                    ),
                ],
                vec![port(Protocol::Tcp, 443, None)],
            )];
            "allow-cidr"
        }
        16 | 17 => {
            spec.pod_selector = sel(&[("app", &app(q))]);
            spec.policy_types = Some(vec![PolicyType::Egress]);
            spec.egress = vec![
                egress(vec![pods_peer(sel(&[("tier", "db")]))], vec![named("db")]),
                egress(
                    vec![ns_peer(
                        sel(&[("kubernetes.io/metadata.name", &ns_name(0))]),
                        Some(sel(&[("app", &app(0))])),
                    )],
                    vec![port(Protocol::Udp, 53, None), port(Protocol::Tcp, 53, None)],
                ),
                egress(
                    vec![block_peer(format!("198.19.{}.0/24", 160 + p % 32), vec![])],
                    vec![port(Protocol::Tcp, 443, None)],
                ),
            ];
            "egress"
        }
        18 => {
            spec.pod_selector = LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![
                    expr("app", Operator::NotIn, &[&app(0), &app(1)]),
                    expr("version", Operator::Exists, &[]),
                ],
            };
            spec.ingress = vec![ingress(
                vec![pods_peer(LabelSelector {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![expr("version", Operator::In, &["v1", "v2"])],
                })],
                vec![],
            )];
            "allow-versions"
        }
        _ => {
            spec.ingress = vec![ingress(
                vec![ns_peer(
                    sel(&[("team", "team-0")]),
                    Some(sel(&[("app", &app(APPS - 1))])),
                )],
                vec![named("metrics")],
            )];
            "allow-monitoring"
        }
    };
    NetworkPolicy {
        namespace: ns_name(n),
        name: format!("np-{p:04}-{kind}"),
        spec,
    }
}

/// The synthetic cluster: pod `i` is in namespace `i % NS`; pods `0..local` are on `node-1`,
/// the others in /26 blocks spread over `node-2..`.
struct Synthetic {
    view: ClusterView,
    /// Remote blocks with their node, for the datastore.
    remote_blocks: Vec<(String, String)>,
    local: usize,
}

fn remote_node(k: usize) -> String {
    format!("node-{}", 2 + k)
}

fn synthetic(args: &Args) -> anyhow::Result<Synthetic> {
    let ns_count = args.namespaces;
    let namespaces: Vec<Namespace> = (0..ns_count)
        .map(|n| Namespace {
            name: ns_name(n),
            labels: labels(&[
                ("kubernetes.io/metadata.name", &ns_name(n)),
                ("team", &format!("team-{}", n % 10)),
                ("env", ENVS[n % 3]),
            ]),
        })
        .collect();
    let mut nodes = vec![Node {
        name: NODE.into(),
        underlay_ipv4: Some(Ipv4Addr::new(198, 19, 0, 11)),
        underlay_ipv6: None,
        underlay_mtu: 1500,
        vtep_mac: malla_api::format_mac(&malla_api::mac_from_name(NODE)),
    }];
    for k in 0..args.remote_nodes {
        let name = remote_node(k);
        nodes.push(Node {
            underlay_ipv4: Some(Ipv4Addr::new(198, 19, 0, 100 + k as u8)),
            underlay_ipv6: None,
            underlay_mtu: 1500,
            vtep_mac: malla_api::format_mac(&malla_api::mac_from_name(&name)),
            name,
        });
    }
    let mut pods = Vec::with_capacity(args.pods);
    let mut endpoints = Vec::with_capacity(args.pods);
    let mut remote_blocks = Vec::new();
    for i in 0..args.pods {
        let n = i % ns_count;
        let w = i / ns_count;
        let a = (w + n) % APPS;
        let tier = TIERS[a % TIERS.len()];
        let version = format!("v{}", w % 3);
        let mut ports = vec![
            ContainerPort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 8080,
            },
            ContainerPort {
                name: Some("metrics".into()),
                protocol: Protocol::Tcp,
                port: 9090,
            },
        ];
        if tier == "db" {
            ports.push(ContainerPort {
                name: Some("db".into()),
                protocol: Protocol::Tcp,
                port: if a < APPS / 2 { 5432 } else { 3306 },
            });
        }
        let (node, ip) = if i < args.local_pods {
            (NODE.to_string(), Ipv4Addr::from(LOCAL_BASE + i as u32))
        } else {
            let j = i - args.local_pods;
            let block = j / 64;
            let node = remote_node(block % args.remote_nodes);
            if j.is_multiple_of(64) {
                let b = Ipv4Addr::from(REMOTE_BASE + (block * 64) as u32);
                remote_blocks.push((format!("{b}/26"), node.clone()));
            }
            (node, Ipv4Addr::from(REMOTE_BASE + j as u32))
        };
        let name = format!("pod-{i:05}");
        pods.push(Pod {
            namespace: ns_name(n),
            name: name.clone(),
            labels: labels(&[("app", &app(a)), ("tier", tier), ("version", &version)]),
            node: node.clone(),
            ports,
            ips: vec![],
            allowed_source_prefixes: Vec::new(),
            host_network: false,
        });
        let container_id = format!("bench{i:08}");
        endpoints.push(WorkloadEndpoint {
            namespace: ns_name(n),
            pod: name,
            node,
            ipam_handle: format!("malla.{container_id}.eth0"),
            container_id,
            ifname: "eth0".into(),
            host_ifname: format!("mla{i:011x}"),
            ips: vec![format!("{ip}/32").parse()?],
            mac: malla_api::format_mac(&malla_api::mac_from_name(&format!("pod-{i}"))),
        });
    }
    let policies: Vec<NetworkPolicy> = (0..args.policies)
        .map(|p| synthetic_policy(p, ns_count))
        .collect();
    if let Some(bad) = policies.iter().find(|p| p.validate().is_err()) {
        bail!(
            "synthetic policy {} is invalid: {:?}",
            bad.key(),
            bad.validate()
        );
    }
    let blocks = remote_blocks
        .iter()
        .map(|(c, n)| Ok((c.parse()?, Some(n.clone()))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Synthetic {
        view: ClusterView {
            config: malla_api::ClusterConfig::default(),
            nodes,
            pools: vec![default_pool()?],
            blocks,
            endpoints,
            services: vec![],
            endpoint_slices: vec![],
            pods,
            namespaces,
            policies,
            calico: Default::default(),
        },
        remote_blocks,
        local: args.local_pods,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=100).contains(&args.namespaces) || !(1..=100).contains(&args.remote_nodes) {
        bail!("--namespaces and --remote-nodes must be in 1..=100");
    }
    if !(1..=512).contains(&args.local_pods)
        || args.pods <= args.local_pods
        || args.pods - args.local_pods > REMOTE_SPAN
    {
        bail!("--local-pods in 1..=512, and --pods minus --local-pods in 1..={REMOTE_SPAN}");
    }
    if !(1..=20000).contains(&args.policies) || !(2..=1024).contains(&args.path_policies) {
        bail!("--policies in 1..=20000, --path-policies in 2..=1024");
    }
    if args
        .index_pods
        .iter()
        .any(|&n| n <= args.local_pods || n - args.local_pods > REMOTE_SPAN)
    {
        bail!("each --index-pods must exceed --local-pods by 1..={REMOTE_SPAN}");
    }
    if !(1..=50).contains(&args.changes) || !(1..=10).contains(&args.rounds) {
        bail!("--changes in 1..=50, --rounds in 1..=10");
    }
    if !(10..=20000).contains(&args.connections) || args.connections < args.rounds * 10 {
        bail!("--connections in 10..=20000 (at least 10 per round)");
    }
    let deadline = begin(args.max_seconds)?;
    let bins = args.bins.resolve();
    if args.tiers {
        return tiers_part(&args, &bins, deadline);
    }
    if !(args.skip_latency && args.skip_rss) {
        bins.require()?;
    }

    let programming = unless(args.skip_programming, || programming(&args, deadline))?;
    let incremental = unless(args.skip_programming, || incremental(&args, deadline))?;
    let latency = unless(args.skip_latency, || latency(&args, &bins, deadline))?;
    let rss = unless(args.skip_rss, || agent_rss(&args, &bins, deadline))?;

    println!();
    if let Some(p) = &programming {
        report_programming(&args, p);
    }
    if let Some(i) = &incremental {
        report_incremental(&args, i);
    }
    if let Some(l) = &latency {
        report_latency(&args, l);
    }
    if let Some(r) = &rss {
        report_rss(&args, r);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Programming from cold, 2. one label change

struct ProgramStats {
    endpoints: usize,
    ingress_isolated: usize,
    egress_isolated: usize,
    sets: usize,
    set_elements: usize,
    chain_rules: usize,
    bytes: usize,
}

/// One label change: rebuild (calc + render into the model), diff, apply, diff lines, whether
/// the diff only adds/deletes elements.
struct Change {
    rebuild: Duration,
    diff: Duration,
    apply: Duration,
    lines: usize,
    elements_only: bool,
    /// The same change through the agent's member path: the policy node follows it and plans
    /// the element changes (follow + plan + encoding), sent over nfnetlink (apply), and how
    /// many elements; None when the path declined (more than set members).
    member: Option<(Duration, Duration, usize)>,
}

struct Programming {
    floor: Duration,
    calc: Duration,
    render: Duration,
    apply: Duration,
    /// `malla_calc::compute` (routes, services, policy, render_full): the agent's whole calc.
    compute: Duration,
    stats: ProgramStats,
    changes: Vec<Change>,
    /// One policy created through the agent's policy path: plan, apply, lines or elements.
    created: (Duration, Duration, usize),
    /// The same computed whole: rebuild, diff, apply, lines.
    created_whole: (Duration, Duration, Duration, usize),
}

/// `policy_pods` + `compile`.
/// Part 5: tiers. Every third policy stays a NetworkPolicy (tier `default`); the others become
/// a GlobalNetworkPolicy in `security` (order 100, defaultAction Pass: an allow from the web
/// tier on 8080, a deny of `env == 'dev'` namespaces, then Pass) or a Calico NetworkPolicy in
/// `platform` (order 200: allow from the team's namespaces, Log, deny the rest).
/// The synthetic cluster with two thirds of its policies turned into Calico's (see `--tiers`).
fn tiered(args: &Args) -> anyhow::Result<Synthetic> {
    use malla_api::calico::{CalicoNetworkPolicy, GlobalNetworkPolicy, Tier};
    let mut syn = synthetic(args)?;
    let knps = std::mem::take(&mut syn.view.policies);
    let (mut globals, mut namespaced, mut kept) = (0, 0, Vec::new());
    for (p, np) in knps.into_iter().enumerate() {
        let a = app(p % APPS);
        match p % 3 {
            0 => kept.push(np),
            1 => {
                globals += 1;
                let spec = serde_json::json!({
                    "tier": "security", "order": p,
                    "selector": format!("app == '{a}' && projectcalico.org/namespace == '{}'", np.namespace),
                    "types": ["Ingress"],
                    "ingress": [
                        {"action": "Allow", "protocol": "TCP", "source": {"selector": "tier == 'web'"}, "destination": {"ports": [8080]}},
                        {"action": "Deny", "source": {"namespaceSelector": "env == 'dev'"}},
                        {"action": "Pass"}
                    ]
                });
                syn.view.calico.policies.push(GlobalNetworkPolicy {
                    name: format!("gnp-{p:04}"),
                    spec: serde_json::from_value(spec)?,
                });
            }
            _ => {
                namespaced += 1;
                let spec = serde_json::json!({
                    "tier": "platform", "order": p,
                    "selector": format!("app == '{a}'"),
                    "types": ["Ingress"],
                    "ingress": [
                        {"action": "Allow", "source": {"namespaceSelector": format!("team == 'team-{}'", p % 10)}},
                        {"action": "Log"},
                        {"action": "Deny"}
                    ]
                });
                syn.view.calico.network_policies.push(CalicoNetworkPolicy {
                    namespace: np.namespace.clone(),
                    name: format!("cnp-{p:04}"),
                    spec: serde_json::from_value(spec)?,
                });
            }
        }
    }
    syn.view.policies = kept;
    for (name, order) in [("security", 100.0), ("platform", 200.0)] {
        syn.view.calico.tiers.push(Tier {
            name: name.into(),
            order: Some(malla_api::calico::Order(order)),
            default_action: Some(malla_api::calico::Action::Pass),
        });
    }
    eprintln!(
        "tiers: {} pods ({} on {NODE}), {} NetworkPolicies, {globals} global and {namespaced} namespaced Calico policies over 3 tiers",
        args.pods,
        args.local_pods,
        syn.view.policies.len()
    );
    Ok(syn)
}

fn tiers_part(args: &Args, bins: &Bins, deadline: Instant) -> anyhow::Result<()> {
    let mut nss = Namespaces::default();
    let floor = nft_floor(&mut nss, "pol-tier-floor")?;
    let mut syn = tiered(args)?;
    check(deadline)?;
    let t = Instant::now();
    let prog = calc(&syn.view);
    let mut current = table(&syn.view, &prog);
    let text = model::render_full(&current);
    let calc_t = t.elapsed();
    let tier_chains = current
        .chains
        .keys()
        .filter(|c| c.starts_with("tpol-"))
        .count();
    let ns = nss.create("pol-tiers")?;
    let h = NetNs::open_named(&ns)?;
    let t = Instant::now();
    nft::apply(Some(&h), &text).context("applying the tiered table")?;
    let apply_t = t.elapsed();
    println!(
        "tiers, from cold: calc+render {} ms, apply {} ms (nft floor {} ms), total {} ms; {} tier chains, {} rules, {:.1} MB",
        ms(calc_t),
        ms(apply_t),
        ms(floor),
        ms(calc_t + apply_t),
        tier_chains,
        current.chains.values().map(|c| c.rules.len()).sum::<usize>(),
        text.len() as f64 / 1e6
    );
    // Label changes: a remote pod's `tier` label flips to `web` (it enters the security
    // tier's source selector). The agent's path first: its policy node (built as at its first
    // full apply) follows the pod and plans the set elements against the applied table, sent
    // as the driver sends them (nfnetlink, or one `nft` transaction for interval sets); then
    // the whole-node path it falls back to (recompute, diff, apply), whose table the member
    // path's must equal.
    let member_ns = nss.create("pol-tier-member")?;
    let member_h = NetNs::open_named(&member_ns)?;
    nft::apply(Some(&member_h), &text).context("applying the tiered table (member path)")?;
    let sock = ElementSocket::open(Some(&member_h)).context("a netlink socket")?;
    let mut node = PolicyNode::new(&syn.view, NODE);
    let mut member_table = current.clone();
    let (mut times, mut member_times, mut declined) = (Vec::new(), Vec::new(), 0);
    for k in 0..args.changes {
        check(deadline)?;
        let i = args.local_pods + 7 + k * 13;
        syn.view.pods[i].labels.insert("tier".into(), "web".into());
        let inputs = PolicyInputs {
            pods: [(
                syn.view.pods[i].namespace.clone(),
                syn.view.pods[i].name.clone(),
            )]
            .into(),
            ..PolicyInputs::default()
        };
        let t = Instant::now();
        let member = match node.plan_tiered(&syn.view, &inputs, &mut member_table) {
            Some(plan) => Some(malla_bench::send_plan(
                &plan,
                &member_table,
                &sock,
                &member_h,
                t,
            )?),
            None => None,
        };
        let member_t = t.elapsed();
        let t = Instant::now();
        let prog = calc(&syn.view);
        let next = table(&syn.view, &prog);
        if let Some(diff) = model::render_diff(&current, &next) {
            nft::apply(Some(&h), &diff).context("applying a label change")?;
        }
        times.push(t.elapsed());
        match member {
            Some((plan, apply, size)) => {
                if member_table != next {
                    bail!("pod {i}: the tier member path's table differs from a rebuild's");
                }
                eprintln!(
                    "  tier member path: plan {:.3} ms, apply {:.3} ms, {size} elements or lines",
                    plan.as_secs_f64() * 1e3,
                    apply.as_secs_f64() * 1e3
                );
                member_times.push(member_t);
            }
            None => {
                // The agent would compute the whole node: what the rebuild just did.
                declined += 1;
                eprintln!("  tier member path declined");
                if let Some(d) = model::render_diff(&member_table, &next) {
                    nft::apply(Some(&member_h), &d).context("applying the diff (member path)")?;
                }
                member_table = next.clone();
                node = PolicyNode::new(&syn.view, NODE);
            }
        }
        current = next;
    }
    times.sort();
    member_times.sort();
    println!(
        "tiers, one label change (whole-node path, {} changes): p50 {} ms, max {} ms",
        times.len(),
        ms(percentile(&times, 50.0)),
        ms(*times.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "tiers, one label change (the agent's tier member path, {} changes, {declined} declined): p50 {:.2} ms, max {:.2} ms (target < 25 ms: {})",
        member_times.len(),
        percentile(&member_times, 50.0).as_secs_f64() * 1e3,
        member_times.last().unwrap_or(&Duration::ZERO).as_secs_f64() * 1e3,
        yes(!member_times.is_empty()
            && declined == 0
            && *member_times.last().unwrap_or(&Duration::ZERO) < Duration::from_millis(25))
    );
    drop(sock);
    drop(member_h);
    nss.delete(&member_ns)?;
    if !args.skip_rss {
        tiers_rss(args, bins, deadline)?;
    }
    Ok(())
}

/// The agent's VmRSS holding the tiered cluster (target < 64 MiB): the synthetic cluster and
/// its Calico tiers and policies written to a 1-node lab's datastore, the agent converged, its
/// tier chains counted against the calculation's.
fn tiers_rss(args: &Args, bins: &Bins, deadline: Instant) -> anyhow::Result<()> {
    bins.require()?;
    let syn = tiered(args)?;
    let expected = table(&syn.view, &calc(&syn.view))
        .chains
        .keys()
        .filter(|c| c.starts_with("tpol-"))
        .count();
    let lab = bins.one_node_lab("tiers, agent RSS", "poltrss")?;
    let node = &lab.state.nodes[0];
    let pid = node.agent_pid.context("the lab's agent has no pid")?;
    require_agent(pid)?;
    let base_rss_kib = status_kib(pid, "VmRSS")?;
    let t = Instant::now();
    write_view(&lab, &syn, deadline)?;
    let store = lab_store::open(&lab.paths, &lab.state)?;
    let store: &dyn Store = &*store;
    let c = &syn.view.calico;
    for tier in &c.tiers {
        malla_store::put_json(store, &keys::tier(&tier.name), tier)?;
    }
    for p in &c.policies {
        malla_store::put_json(store, &keys::global_network_policy(&p.name), p)?;
    }
    for p in &c.network_policies {
        malla_store::put_json(
            store,
            &keys::calico_network_policy(&p.namespace, &p.name),
            p,
        )?;
    }
    let write = t.elapsed();
    let t = Instant::now();
    topology::wait_converged(&lab.paths, &lab.state, Duration::from_secs(600))
        .context("waiting for the agent")?;
    let converge = t.elapsed();
    // Settled: the agent hands the heap of its last computations back once its feed is quiet.
    std::thread::sleep(Duration::from_secs(2));
    let rss_kib = status_kib(pid, "VmRSS")?;
    let hwm_kib = status_kib(pid, "VmHWM")?;
    let node_ns = NetNs::open_named(&node.netns)?;
    let listed = nft::list_table(Some(&node_ns), masquerade::FAMILY, masquerade::TABLE)
        .context("listing the node's table")?;
    let have = listed
        .lines()
        .filter(|l| l.trim_start().starts_with("chain tpol-"))
        .count();
    drop(node_ns);
    eprintln!(
        "  written in {:.1} s, converged {:.1} s later; bare agent {} KiB",
        write.as_secs_f64(),
        converge.as_secs_f64(),
        base_rss_kib
    );
    if have != expected {
        bail!("the agent programmed {have} tier chains, the calculation has {expected}");
    }
    println!(
        "tiers, agent with {} pods and {} policies over 3 tiers: VmRSS {:.1} MiB, VmHWM {:.1} MiB, {have}/{expected} tier chains (target < 64 MiB: {})",
        syn.view.pods.len(),
        syn.view.policies.len() + c.policies.len() + c.network_policies.len(),
        mib(rss_kib),
        mib(hwm_kib),
        yes(mib(rss_kib) < 64.0)
    );
    drop(lab);
    Ok(())
}

fn calc(view: &ClusterView) -> PolicyProgram {
    let pods = malla_calc::routes::policy_pods(view);
    compile(&view.policies, &view.namespaces, &pods, NODE)
}

/// The node table (no services) with the program rendered into it.
/// The node's whole table with `prog` as its policy program, as the agent computes it (pool
/// sets, services, policy, anti-spoofing of the local pods, the endpoint-to-host action).
fn table(view: &ClusterView, prog: &PolicyProgram) -> model::Table {
    malla_calc::routes::compute_with_policy(view, NODE, prog).nft_table
}

fn stats(prog: &PolicyProgram, t: &model::Table, text: &str) -> ProgramStats {
    ProgramStats {
        endpoints: prog.endpoints.len(),
        ingress_isolated: prog
            .endpoints
            .iter()
            .filter(|e| e.ingress.is_some())
            .count(),
        egress_isolated: prog.endpoints.iter().filter(|e| e.egress.is_some()).count(),
        sets: t.sets.len(),
        set_elements: t.sets.values().map(|s| s.elements.len()).sum(),
        chain_rules: t.chains.values().map(|c| c.rules.len()).sum(),
        bytes: text.len(),
    }
}

/// Label changes that put a remote pod into a peer selector of a policy that isolates a local
/// pod: (pod index, label, value). Each pod is changed at most once.
fn pick_changes(s: &Synthetic, n: usize) -> Vec<(usize, String, String)> {
    let v = &s.view;
    let local: Vec<&Pod> = v.pods[..s.local].iter().collect();
    let mut out: Vec<(usize, String, String)> = Vec::new();
    for p in &v.policies {
        if out.len() >= n {
            break;
        }
        let isolates_local = local
            .iter()
            .any(|l| l.namespace == p.namespace && p.spec.pod_selector.matches(&l.labels));
        if !isolates_local {
            continue;
        }
        for r in &p.spec.ingress {
            let Some(peer) = r.from.iter().find(|f| {
                f.namespace_selector.is_none()
                    && f.ip_block.is_none()
                    && f.pod_selector.as_ref().is_some_and(|s| {
                        s.match_expressions.is_empty() && s.match_labels.len() == 1
                    })
            }) else {
                continue;
            };
            let Some((k, val)) = peer
                .pod_selector
                .as_ref()
                .and_then(|s| s.match_labels.iter().next())
            else {
                continue;
            };
            let candidate = (s.local..v.pods.len()).find(|&i| {
                let q = &v.pods[i];
                q.namespace == p.namespace
                    && q.labels.get(k) != Some(val)
                    && !out.iter().any(|(j, _, _)| *j == i)
            });
            if let Some(i) = candidate {
                out.push((i, k.clone(), val.clone()));
                break;
            }
        }
    }
    out
}

fn programming(args: &Args, deadline: Instant) -> anyhow::Result<Programming> {
    let mut nss = Namespaces::default();
    let floor = nft_floor(&mut nss, "pol-floor")?;

    eprintln!(
        "programming: {} pods ({} on {NODE}), {} policies, {} namespaces",
        args.pods, args.local_pods, args.policies, args.namespaces
    );
    let mut syn = synthetic(args)?;
    let changes_wanted = pick_changes(&syn, args.changes);
    if changes_wanted.len() < args.changes {
        bail!(
            "found only {} label changes that enter a selector",
            changes_wanted.len()
        );
    }
    check(deadline)?;
    let t = Instant::now();
    let prog = calc(&syn.view);
    let calc_t = t.elapsed();
    let t = Instant::now();
    let mut current = table(&syn.view, &prog);
    let text = model::render_full(&current);
    let render_t = t.elapsed();
    let ns = nss.create("pol-prog")?;
    let h = NetNs::open_named(&ns)?;
    let t = Instant::now();
    nft::apply(Some(&h), &text).context("applying the full table")?;
    let apply_t = t.elapsed();
    let stats = stats(&prog, &current, &text);
    eprintln!(
        "  calc {} ms, render {} ms, apply {} ms ({} sets, {} elements, {} rules, {:.1} MB)",
        ms(calc_t),
        ms(render_t),
        ms(apply_t),
        stats.sets,
        stats.set_elements,
        stats.chain_rules,
        text.len() as f64 / 1e6
    );
    check(deadline)?;
    let t = Instant::now();
    let whole = malla_calc::compute(&syn.view, NODE);
    let compute_t = t.elapsed();
    if whole.nft_table != current {
        bail!("malla_calc::compute disagrees with compile + render_policy");
    }
    drop(whole);
    // The member path's namespace: the same table, the same changes, as the agent applies
    // them (its policy node, element changes over a kept nfnetlink socket).
    let member_ns = nss.create("pol-member")?;
    let member_h = NetNs::open_named(&member_ns)?;
    nft::apply(Some(&member_h), &text).context("applying the full table (member path)")?;
    let sock = ElementSocket::open(Some(&member_h)).context("a netlink socket")?;
    let mut node = PolicyNode::new(&syn.view, NODE);
    let mut member_table = current.clone();

    let mut changes = Vec::new();
    for (i, k, val) in changes_wanted {
        check(deadline)?;
        syn.view.pods[i].labels.insert(k.clone(), val.clone());
        // The member path first (it reads only the changed pod).
        let t = Instant::now();
        let pod_key = (
            syn.view.pods[i].namespace.clone(),
            syn.view.pods[i].name.clone(),
        );
        let inputs = PolicyInputs {
            pods: [pod_key].into(),
            ..PolicyInputs::default()
        };
        let plan = node
            .follow(&syn.view, &inputs)
            .and_then(|delta| node.plan(&mut member_table, &delta));
        let member = match plan {
            Some(plan) => {
                let (member_plan, apply, elements) =
                    malla_bench::send_plan(&plan, &member_table, &sock, &member_h, t)?;
                Some((member_plan, apply, elements))
            }
            None => None,
        };
        // Then the rebuild.
        let t = Instant::now();
        let pods = malla_calc::routes::policy_pods(&syn.view);
        let pods_t = t.elapsed();
        let prog = compile(&syn.view.policies, &syn.view.namespaces, &pods, NODE);
        drop(pods);
        let compile_t = t.elapsed() - pods_t;
        let new = table(&syn.view, &prog);
        let rebuild = t.elapsed();
        let render_t = rebuild - pods_t - compile_t;
        let t = Instant::now();
        let diff = model::render_diff(&current, &new)
            .with_context(|| format!("setting {k}={val} on pod {i} changed nothing"))?;
        let diff_t = t.elapsed();
        let t = Instant::now();
        nft::apply(Some(&h), &diff).context("applying the diff")?;
        let apply = t.elapsed();
        let elements_only = diff
            .lines()
            .all(|l| l.starts_with("add element ") || l.starts_with("delete element "));
        match member {
            Some((plan, apply, elements)) => {
                if member_table != new {
                    bail!("{k}={val} on pod {i}: the member path's table differs from a rebuild's");
                }
                eprintln!(
                    "  member path: plan {:.3} ms, apply {:.3} ms, {elements} elements",
                    plan.as_secs_f64() * 1e3,
                    apply.as_secs_f64() * 1e3,
                );
            }
            None => {
                // More than members: the agent's full path (the rebuild's diff), untimed.
                eprintln!("  member path declined (more than set members)");
                let d = model::render_diff(&member_table, &new).unwrap_or_default();
                nft::apply(Some(&member_h), &d).context("applying the diff (member path)")?;
                member_table = new.clone();
                node = PolicyNode::new(&syn.view, NODE);
            }
        }
        eprintln!(
            "  {}/{}: {k}={val}: rebuild {} ms (pods {}, compile {}, render {}), diff {} ms, apply {} ms, {} lines{}",
            syn.view.pods[i].namespace,
            syn.view.pods[i].name,
            ms(rebuild),
            ms(pods_t),
            ms(compile_t),
            ms(render_t),
            ms(diff_t),
            ms(apply),
            diff.lines().count(),
            if elements_only {
                ""
            } else {
                " (not element-only)"
            }
        );
        changes.push(Change {
            rebuild,
            diff: diff_t,
            apply,
            lines: diff.lines().count(),
            elements_only,
            member,
        });
        current = new;
    }
    // One policy created, as the agent applies it: the policy node follows it and the policy
    // part of the table is re-rendered alone and patched (its text through `nft`); then the
    // same creation computed whole (compile, render, text diff, `nft`) in the same run.
    check(deadline)?;
    // An `allow-app` policy (every (namespace, kind) pair has one already) on a port no other
    // policy opens: new rules for the pods it selects.
    let mut new_policy = synthetic_policy(args.policies + args.namespaces, args.namespaces);
    new_policy.name = format!("{}-new", new_policy.name);
    if let Some(rule) = new_policy.spec.ingress.first_mut() {
        rule.ports = vec![port(Protocol::Tcp, 9999, None)];
    }
    let key = (new_policy.namespace.clone(), new_policy.name.clone());
    syn.view.policies.push(new_policy);
    let t = Instant::now();
    let inputs = PolicyInputs {
        policies: [key].into(),
        ..PolicyInputs::default()
    };
    let plan = node
        .follow(&syn.view, &inputs)
        .and_then(|delta| node.plan(&mut member_table, &delta))
        .context("the policy node declined a new policy")?;
    let created = malla_bench::send_plan(&plan, &member_table, &sock, &member_h, t)?;
    let t = Instant::now();
    let new = table(&syn.view, &calc(&syn.view));
    let rebuild = t.elapsed();
    if member_table != new {
        bail!("a new policy: the policy path's table differs from a rebuild's");
    }
    let diff = model::render_diff(&current, &new).unwrap_or_default();
    let diff_t = t.elapsed() - rebuild;
    let t = Instant::now();
    nft::apply(Some(&h), &diff).context("applying the diff (new policy)")?;
    let created_whole = (rebuild, diff_t, t.elapsed(), diff.lines().count());
    drop(h);
    nss.delete(&ns)?;
    drop(sock);
    drop(member_h);
    nss.delete(&member_ns)?;
    Ok(Programming {
        created,
        created_whole,
        floor,
        calc: calc_t,
        render: render_t,
        apply: apply_t,
        compute: compute_t,
        stats,
        changes,
    })
}

/// Part 2b at one size: the index's start-up, its median time for one label change, and a
/// full compile's (pods + compile) for the same change.
struct IndexTiming {
    pods: usize,
    start: Duration,
    change: Duration,
    full: Duration,
}

/// The policy view of pod `i` (its labels, ports and endpoint record).
fn policy_pod(view: &ClusterView, i: usize) -> anyhow::Result<PolicyPod<'_>> {
    let pod = &view.pods[i];
    let ep = view
        .endpoints
        .iter()
        .find(|e| e.namespace == pod.namespace && e.pod == pod.name)
        .with_context(|| format!("pod {} has no endpoint record", pod.name))?;
    Ok(PolicyPod {
        namespace: pod.namespace.as_str().into(),
        name: pod.name.as_str().into(),
        labels: std::borrow::Cow::Borrowed(&pod.labels),
        ips: ep.addrs().collect(),
        node: ep.node.as_str().into(),
        ports: pod.ports[..].into(),
        host_ifname: ep.host_ifname.as_str().into(),
    })
}

fn incremental(args: &Args, deadline: Instant) -> anyhow::Result<Vec<IndexTiming>> {
    let mut out = Vec::new();
    for &n in &args.index_pods {
        check(deadline)?;
        let sized = Args {
            pods: n,
            ..args.clone()
        };
        let mut syn = synthetic(&sized)?;
        let wanted = pick_changes(&syn, args.changes);
        if wanted.is_empty() {
            bail!("{n} pods: found no label change that enters a selector");
        }
        let t = Instant::now();
        let pods = malla_calc::routes::policy_pods(&syn.view);
        let mut index = PolicyIndex::new(NODE, &syn.view.policies, &syn.view.namespaces, &pods);
        let start = t.elapsed();
        drop(pods);
        let (mut changes, mut fulls) = (Vec::new(), Vec::new());
        for (i, k, val) in wanted {
            syn.view.pods[i].labels.insert(k.clone(), val.clone());
            let pod = policy_pod(&syn.view, i)?;
            let t = Instant::now();
            let delta = index.upsert_pod(&pod);
            changes.push(t.elapsed());
            if delta.is_empty() {
                bail!("{n} pods: setting {k}={val} on pod {i} changed nothing");
            }
            let t = Instant::now();
            let full = calc(&syn.view);
            fulls.push(t.elapsed());
            if index.program() != full {
                bail!("{n} pods: the index disagrees with a full compile after {k}={val}");
            }
        }
        changes.sort();
        fulls.sort();
        let timing = IndexTiming {
            pods: n,
            start,
            change: changes[changes.len() / 2],
            full: fulls[fulls.len() / 2],
        };
        eprintln!(
            "  index at {n} pods: start {} ms, one label change {:.3} ms (full compile {} ms)",
            ms(timing.start),
            timing.change.as_secs_f64() * 1e3,
            ms(timing.full)
        );
        out.push(timing);
    }
    Ok(out)
}

fn report_incremental(args: &Args, v: &[IndexTiming]) {
    println!(
        "2b. One pod label change through the policy index ({} policies, {} local pods), median of {}:",
        args.policies, args.local_pods, args.changes
    );
    for t in v {
        println!(
            "  {:>6} pods: index {:.3} ms, full compile {} ms (index start-up {} ms)",
            t.pods,
            t.change.as_secs_f64() * 1e3,
            ms(t.full),
            ms(t.start)
        );
    }
    if let (Some(a), Some(b)) = (v.first(), v.last()) {
        if a.pods != b.pods {
            println!(
                "  ratio {} / {} pods: index {:.2}, full compile {:.2}",
                b.pods,
                a.pods,
                b.change.as_secs_f64() / a.change.as_secs_f64(),
                b.full.as_secs_f64() / a.full.as_secs_f64()
            );
        }
    }
}

fn report_programming(args: &Args, p: &Programming) {
    let s = &p.stats;
    println!(
        "1. Programming from cold: {} pods ({} on {NODE}), {} policies, {} namespaces; one `nft -f -` (floor: empty table {} ms)",
        args.pods,
        args.local_pods,
        args.policies,
        args.namespaces,
        ms(p.floor)
    );
    println!(
        "   program: {} local endpoints ({} isolated for ingress, {} for egress), {} sets / {} elements, {} chain rules, {:.2} MB of nft text",
        s.endpoints,
        s.ingress_isolated,
        s.egress_isolated,
        s.sets,
        s.set_elements,
        s.chain_rules,
        s.bytes as f64 / 1e6
    );
    let total = p.calc + p.render + p.apply;
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>8} {:>4}",
        "calc ms", "render ms", "apply ms", "total ms", "target", "met"
    );
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>8} {:>4}",
        ms(p.calc),
        ms(p.render),
        ms(p.apply),
        ms(total),
        "< 3000",
        yes(total < Duration::from_secs(3))
    );
    println!(
        "   calc = policy_pods + compile; render = node table + render_policy + render_full. The agent's whole calculation (malla_calc::compute: routes, services, policy, render_full) takes {} ms; apply / floor = {:.1}x",
        ms(p.compute),
        ratio_d(p.apply, p.floor)
    );
    println!();
    let c = ChangeStats::of(
        p.changes
            .iter()
            .map(|c| (c.rebuild, c.diff, c.apply, c.lines)),
    );
    println!(
        "2. One pod label change (a remote pod enters a peer selector), median of {}: rebuild = calc + render into the model",
        p.changes.len()
    );
    println!(
        "{} {:>14} {:>7} {:>4}",
        ChangeStats::heads(),
        "elements only",
        "target",
        "met"
    );
    println!(
        "{} {:>14} {:>7} {:>4}",
        c.cells(),
        yes(p.changes.iter().all(|c| c.elements_only)),
        "< 50",
        yes(c.total < Duration::from_millis(50))
    );
    let member: Vec<(Duration, Duration, usize)> =
        p.changes.iter().filter_map(|c| c.member).collect();
    let med = |f: fn(&(Duration, Duration, usize)) -> Duration| {
        percentile(&member.iter().map(f).collect::<Vec<_>>(), 50.0)
    };
    let mut elements: Vec<usize> = member.iter().map(|m| m.2).collect();
    elements.sort();
    println!(
        "   the same changes through the agent's member path ({} of {} taken; policy node follow + plan, elements over nfnetlink, a second namespace with the same table): plan {:.3} ms, apply {:.3} ms, total {:.3} ms, {} elements (medians)",
        member.len(),
        p.changes.len(),
        med(|m| m.0).as_secs_f64() * 1e3,
        med(|m| m.1).as_secs_f64() * 1e3,
        med(|m| m.0 + m.1).as_secs_f64() * 1e3,
        elements.get(elements.len() / 2).copied().unwrap_or(0)
    );
    let (plan, apply, size) = p.created;
    let (rebuild, diff, whole_apply, lines) = p.created_whole;
    let whole = rebuild + diff + whole_apply;
    println!(
        "   one policy created through the agent's policy path (follow + the policy part re-rendered and patched, its text through nft): plan {:.3} ms, apply {:.3} ms, total {:.3} ms, {size} lines; computed whole: rebuild {:.3} ms, diff {:.3} ms, apply {:.3} ms, total {:.3} ms, {lines} lines ({:.1}x)",
        plan.as_secs_f64() * 1e3,
        apply.as_secs_f64() * 1e3,
        (plan + apply).as_secs_f64() * 1e3,
        rebuild.as_secs_f64() * 1e3,
        diff.as_secs_f64() * 1e3,
        whole_apply.as_secs_f64() * 1e3,
        whole.as_secs_f64() * 1e3,
        whole.as_secs_f64() / (plan + apply).as_secs_f64().max(1e-9)
    );
    println!();
}

// ---------------------------------------------------------------------------------------------
// 3. Connection setup with 1 vs N policies on the path

struct Case {
    policies: usize,
    samples: Vec<Duration>,
    elapsed: Duration,
    agent_cpu: Duration,
    /// Port segments in the server's ingress port map (None: no map).
    segments: Option<usize>,
}

struct Latency {
    cases: Vec<Case>,
}

/// The policy that lets the client in; its name sorts after every filler's, so its rule is
/// the last of the server's chain.
fn allow_client(client: Ipv4Addr) -> NetworkPolicy {
    NetworkPolicy {
        namespace: "default".into(),
        name: "zz-allow-client".into(),
        spec: NetworkPolicySpec {
            pod_selector: sel(&[("app", "server")]),
            ingress: vec![ingress(
                vec![block_peer(format!("{client}/32"), vec![])],
                vec![port(Protocol::Tcp, SERVER_PORT, None)],
            )],
            ..Default::default()
        },
    }
}

/// Filler `i`: selects the server, allows another /32 (198.19.128.0/17) on another port (on
/// the server's port if `shared`).
fn filler(i: usize, shared: bool) -> NetworkPolicy {
    NetworkPolicy {
        namespace: "default".into(),
        name: format!("np-{i:04}"),
        spec: NetworkPolicySpec {
            pod_selector: sel(&[("app", "server")]),
            ingress: vec![ingress(
                vec![block_peer(
                    format!("198.19.{}.{}/32", 128 + i / 256, i % 256),
                    vec![],
                )],
                vec![port(
                    Protocol::Tcp,
                    if shared {
                        SERVER_PORT
                    } else {
                        10000 + i as u16
                    },
                    None,
                )],
            )],
            ..Default::default()
        },
    }
}

/// Brings the store to `n` policies selecting the server (0: none; else the allowing one and
/// `n - 1` fillers, on the server's port if `shared`); `have` is the current count.
fn set_path_policies(
    store: &dyn Store,
    client: Ipv4Addr,
    have: usize,
    n: usize,
    shared: bool,
) -> anyhow::Result<()> {
    let allow = allow_client(client);
    let fillers = |c: usize| c.saturating_sub(1);
    if n > 0 && have == 0 {
        malla_store::put_json(store, &keys::network_policy("default", &allow.name), &allow)?;
    }
    for i in fillers(have)..fillers(n) {
        let p = filler(i, shared);
        malla_store::put_json(store, &keys::network_policy(&p.namespace, &p.name), &p)?;
    }
    for i in fillers(n)..fillers(have) {
        store.delete(
            &keys::network_policy("default", &filler(i, shared).name),
            None,
        )?;
    }
    if n == 0 && have > 0 {
        store.delete(&keys::network_policy("default", &allow.name), None)?;
    }
    Ok(())
}

/// Segments of the server's ingress TCP port map in the node's table (None: no map). Every
/// segment of the benchmark's policies allows one peer set (`goto pol-peers-…`).
fn server_port_segments(node_ns: &NetNs, host_ifname: &str) -> Option<usize> {
    use malla_calc::policy::render::{ingress_chain, ports_map};
    let map = ports_map(&ingress_chain(host_ifname), Protocol::Tcp);
    nft::run(
        Some(node_ns),
        &["list", "map", "inet", masquerade::TABLE, &map],
        "",
    )
    .ok()
    .map(|text| text.matches("goto pol-peers-").count())
}

fn latency(args: &Args, bins: &Bins, deadline: Instant) -> anyhow::Result<Latency> {
    let mut lab = bins.one_node_lab("latency", "pol")?;
    let text = format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: default\n\
         spec:\n  nodeName: {NODE}\n  containers:\n  - name: c\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: server\n  namespace: default\n  labels:\n    app: server\n\
         spec:\n  nodeName: {NODE}\n  containers:\n  - name: s\n    ports:\n    - containerPort: {SERVER_PORT}\n"
    );
    lab.apply_pods(&bins.malla, &text)?;
    let v4 = |name: &str| -> anyhow::Result<(String, Ipv4Addr)> {
        let p = lab.pod(name)?;
        let ip = first_ipv4(&p.ips).with_context(|| format!("pod {name} has no IPv4 address"))?;
        Ok((p.netns.clone(), ip))
    };
    let (client_ns, client_ip) = v4("client")?;
    let (_, server_ip) = v4("server")?;
    let node = &lab.state.nodes[0];
    let node_ns = NetNs::open_named(&node.netns)?;
    let agent_pid = node.agent_pid;
    let store = lab_store::open(&lab.paths, &lab.state)?;
    let store: &dyn Store = &*store;
    let (eps, _) = malla_store::list_json::<WorkloadEndpoint>(store, keys::ENDPOINTS)?;
    let server_if = eps
        .into_iter()
        .map(|(_, e, _)| e)
        .find(|e| e.namespace == "default" && e.pod == "server")
        .context("no endpoint record for the server")?
        .host_ifname;
    let addr = SocketAddr::new(IpAddr::V4(server_ip), SERVER_PORT);

    let sizes = [0, 1, args.path_policies];
    let mut cases: Vec<Case> = sizes
        .iter()
        .map(|&n| Case {
            policies: n,
            samples: Vec::new(),
            elapsed: Duration::ZERO,
            agent_cpu: Duration::ZERO,
            segments: None,
        })
        .collect();
    let per_round = args.connections / args.rounds;
    let mut have = 0;
    for round in 0..args.rounds {
        for case in cases.iter_mut() {
            check(deadline)?;
            let n = case.policies;
            set_path_policies(store, client_ip, have, n, args.shared_port)?;
            have = n;
            let t = Instant::now();
            topology::wait_converged(&lab.paths, &lab.state, Duration::from_secs(300))
                .context("waiting for the agent")?;
            let converged = t.elapsed();
            let segments = server_port_segments(&node_ns, &server_if);
            // One segment per filler port and the client's, or all on the server's port.
            let want = (n > 0).then_some(if args.shared_port { 1 } else { n });
            if segments != want {
                bail!("the server's port map has {segments:?} segments, expected {want:?}");
            }
            case.segments = segments;
            let cpu0 = agent_pid.map(cpu_time).unwrap_or_default();
            let (v, elapsed) =
                measure_connections(&client_ns, addr, "default/server", per_round, deadline)?;
            let cpu1 = agent_pid.map(cpu_time).unwrap_or_default();
            eprintln!(
                "  round {}, {n} policies (agent converged in {} ms): p50 {} ms, p99 {} ms",
                round + 1,
                converged.as_millis(),
                ms(percentile(&v, 50.0)),
                ms(percentile(&v, 99.0))
            );
            case.samples.extend(v);
            case.elapsed += elapsed;
            case.agent_cpu += cpu1.saturating_sub(cpu0);
        }
    }
    drop(node_ns);
    drop(lab);
    Ok(Latency { cases })
}

fn report_latency(args: &Args, l: &Latency) {
    println!(
        "3. Connection setup: TCP connect + first byte, client pod -> server pod (1-node lab), {} connections per case over {} interleaved rounds{}",
        l.cases.first().map_or(0, |c| c.samples.len()),
        args.rounds,
        if args.shared_port {
            "; every filler allows its peer on the server's port"
        } else {
            ""
        }
    );
    println!(
        "{:<34} {:>13} {:>8} {:>8} {:>8} {:>13}",
        "policies selecting the server",
        "port segments",
        "p50 ms",
        "p99 ms",
        "conn/s",
        "agent CPU ms"
    );
    for c in &l.cases {
        println!(
            "{:<34} {:>13} {:>8} {:>8} {:>8.0} {:>13}",
            c.policies,
            c.segments.map_or("-".to_string(), |r| r.to_string()),
            ms(percentile(&c.samples, 50.0)),
            ms(percentile(&c.samples, 99.0)),
            ratio(c.samples.len() as f64, c.elapsed.as_secs_f64()),
            c.agent_cpu.as_millis()
        );
    }
    let find = |n: usize| l.cases.iter().find(|c| c.policies == n);
    let pr =
        |a: &Case, b: &Case, p: f64| ratio_d(percentile(&a.samples, p), percentile(&b.samples, p));
    if let (Some(none), Some(one), Some(many)) = (find(0), find(1), l.cases.last()) {
        println!();
        println!(
            "{:<34} {:>10} {:>10} {:>8} {:>4}",
            "ratio", "p50", "p99", "target", "met"
        );
        let r50 = pr(many, one, 50.0);
        println!(
            "{:<34} {:>10.3} {:>10.3} {:>8} {:>4}",
            format!("{} policies / 1 policy", many.policies),
            r50,
            pr(many, one, 99.0),
            "<= 1.05",
            yes(r50 <= 1.05)
        );
        println!(
            "{:<34} {:>10.3} {:>10.3} {:>8} {:>4}",
            "1 policy / none (not isolated)",
            pr(one, none, 50.0),
            pr(one, none, 99.0),
            "-",
            ""
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// 4. Agent RSS

struct Rss {
    base_rss_kib: u64,
    rss_kib: u64,
    hwm_kib: u64,
    write: Duration,
    converge: Duration,
    /// Endpoint chains in the node's table (`pol-in-*`, `pol-out-*`) and the expected number.
    chains: (usize, usize),
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    malla_bench::status_kib(pid, field)?
        .with_context(|| format!("{field} missing from /proc/{pid}/status"))
}

/// Writes the synthetic cluster (namespaces, remote nodes and blocks, pods, endpoints,
/// NetworkPolicies) to the lab's datastore.
fn write_view(lab: &malla_bench::Lab, syn: &Synthetic, deadline: Instant) -> anyhow::Result<()> {
    let store = lab_store::open(&lab.paths, &lab.state)?;
    let store: &dyn Store = &*store;
    let v = &syn.view;
    for n in &v.namespaces {
        malla_store::put_json(store, &keys::namespace(&n.name), n)?;
    }
    for n in v.nodes.iter().filter(|n| n.name != NODE) {
        malla_store::put_json(store, &keys::node(&n.name), n)?;
    }
    for (cidr, node) in &syn.remote_blocks {
        let cidr = cidr.parse()?;
        let b = malla_ipam::Block::new(cidr, "default-ipv4", Some(node));
        malla_store::put_json(store, &keys::block(&cidr), &b)?;
    }
    for (i, (p, e)) in v.pods.iter().zip(&v.endpoints).enumerate() {
        if i % 1000 == 0 {
            check(deadline)?;
        }
        malla_store::put_json(store, &keys::pod(&p.namespace, &p.name), p)?;
        malla_store::put_json(
            store,
            &keys::endpoint(&e.node, &e.container_id, &e.ifname),
            e,
        )?;
    }
    for p in &v.policies {
        malla_store::put_json(store, &keys::network_policy(&p.namespace, &p.name), p)?;
    }
    Ok(())
}

fn agent_rss(args: &Args, bins: &Bins, deadline: Instant) -> anyhow::Result<Rss> {
    let syn = synthetic(args)?;
    let expected = {
        let prog = calc(&syn.view);
        prog.endpoints
            .iter()
            .map(|e| usize::from(e.ingress.is_some()) + usize::from(e.egress.is_some()))
            .sum()
    };
    let lab = bins.one_node_lab("agent RSS", "polrss")?;
    let node = &lab.state.nodes[0];
    let pid = node.agent_pid.context("the lab's agent has no pid")?;
    require_agent(pid)?;
    let base_rss_kib = status_kib(pid, "VmRSS")?;
    eprintln!(
        "  bare agent {base_rss_kib} KiB; writing {} pods, {} policies",
        args.pods, args.policies
    );
    let t = Instant::now();
    write_view(&lab, &syn, deadline)?;
    let write = t.elapsed();
    let t = Instant::now();
    topology::wait_converged(&lab.paths, &lab.state, Duration::from_secs(600))
        .context("waiting for the agent")?;
    let converge = t.elapsed();
    let rss_kib = status_kib(pid, "VmRSS")?;
    let hwm_kib = status_kib(pid, "VmHWM")?;
    let node_ns = NetNs::open_named(&node.netns)?;
    let listed = nft::list_table(Some(&node_ns), masquerade::FAMILY, masquerade::TABLE)
        .context("listing the node's table")?;
    let have = listed
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("chain pol-in-") || l.starts_with("chain pol-out-")
        })
        .count();
    drop(node_ns);
    eprintln!(
        "  written in {:.1} s, converged {:.1} s later: VmRSS {rss_kib} KiB, VmHWM {hwm_kib} KiB, {have}/{expected} endpoint chains",
        write.as_secs_f64(),
        converge.as_secs_f64()
    );
    if have != expected {
        bail!("the agent programmed {have} endpoint chains, the calculation has {expected}");
    }
    drop(lab);
    Ok(Rss {
        base_rss_kib,
        rss_kib,
        hwm_kib,
        write,
        converge,
        chains: (have, expected),
    })
}

fn report_rss(args: &Args, r: &Rss) {
    println!(
        "4. Agent RSS with {} pods ({} on {NODE}) and {} policies in its datastore (1-node lab; baseline: the same agent before the writes)",
        args.pods, args.local_pods, args.policies
    );
    println!(
        "{:<26} {:>10} {:>10} {:>9} {:>12} {:>8} {:>4}",
        "case", "VmRSS MiB", "VmHWM MiB", "write s", "converge s", "target", "met"
    );
    println!(
        "{:<26} {:>10.1} {:>10} {:>9} {:>12} {:>8} {:>4}",
        "agent, empty lab",
        mib(r.base_rss_kib),
        "-",
        "-",
        "-",
        "-",
        ""
    );
    println!(
        "{:<26} {:>10.1} {:>10.1} {:>9.1} {:>12.1} {:>8} {:>4}",
        format!("agent, {} pods", args.pods),
        mib(r.rss_kib),
        mib(r.hwm_kib),
        r.write.as_secs_f64(),
        r.converge.as_secs_f64(),
        "< 64",
        yes(mib(r.rss_kib) < 64.0)
    );
    println!(
        "   ratio to the bare agent: {:.1}x; endpoint chains programmed {} (expected {})",
        ratio(r.rss_kib as f64, r.base_rss_kib as f64),
        r.chains.0,
        r.chains.1
    );
    println!();
}
