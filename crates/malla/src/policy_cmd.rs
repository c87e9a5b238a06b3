//! `malla policy trace`: why a connection is allowed or denied — for each direction, which
//! NetworkPolicies select the endpoint and which rule allowed the traffic, or that none did. A
//! pod's traffic to its own node (`node/NAME`, or one of its addresses) also takes the
//! cluster's endpoint-to-host action after its egress policy, as the dataplane does. Traffic
//! from or to a node's address also meets the nodes' host endpoint policy (Calico's
//! `HostEndpoint` and `GlobalNetworkPolicy`: failsafe ports, pre-DNAT, input, output), read
//! with `malla_calc::host::reference`. A pod's DNS-name rules are read with what its node's
//! agent learned from the pod's DNS answers ([`dns`]): which name and answer put the
//! destination in a rule's set, or that it expired.

use std::net::IpAddr;

use anyhow::{bail, Context};
use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use malla_api::service::Protocol;
use malla_api::EndpointToHostAction;
use malla_calc::policy::{explain, Connection, Endpoint, PolicyPod};
use serde::Serialize;

use crate::output::{Output, Table};

mod dns;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Explain the verdict for FROM → TO (pods as namespace/name, nodes as node/NAME, or an IP
    /// address).
    ///
    /// Example: malla policy trace x/b x/a --port 80 --protocol TCP
    Trace(TraceArgs),
    /// What staged policies would do: per staged policy and rule, the connections the agents
    /// saw that it would have denied and allowed (from their flow records), while the enforced
    /// policies decided.
    ///
    /// Example: malla policy staged -o json
    Staged(StagedArgs),
}

#[derive(Args)]
pub struct StagedArgs {
    /// Only connections of the last DURATION (e.g. 30s, 5m, 1h).
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Output format: table, wide, json or yaml.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// The agent's HTTP address (its --http-listen), in each node's namespace in a lab.
    #[arg(long, value_name = "ADDR", default_value = malla_agent::DEFAULT_HTTP_LISTEN)]
    agent_address: std::net::SocketAddr,
}

/// One staged rule's effect.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StagedEffect {
    /// `staged:deny-all`, `shop/staged:web`, `knp.default.shop/staged:db`…
    policy: String,
    /// `ingress[0]`, `egress[end of tier]`…
    rule: String,
    would_deny: u64,
    would_allow: u64,
    connections: Vec<StagedConnection>,
}

#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
struct StagedConnection {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    /// What the enforced policies did: allowed, denied…
    enforced: String,
    /// would-deny or would-allow.
    staged: String,
    count: u64,
}

fn staged(g: &crate::Globals, a: StagedArgs) -> anyhow::Result<()> {
    let nodes = crate::flows_cmd::agents(g)?;
    let f = malla_flows::Filter {
        since: match &a.since {
            Some(s) => Some(crate::flows_cmd::since(s)?),
            None => None,
        },
        ..malla_flows::Filter::default()
    };
    let (flows, errors) = crate::flows_cmd::collect(&nodes, a.agent_address, &f);
    for e in errors {
        eprintln!("{e}");
    }
    let mut by_rule: std::collections::BTreeMap<(String, String), StagedEffect> =
        Default::default();
    for flow in &flows {
        let k = &flow.key;
        for text in &k.staged {
            let (deny, rest) = match text.strip_prefix(malla_flows::STAGED_WOULD_DENY) {
                Some(r) => (true, r),
                None => match text.strip_prefix(malla_flows::STAGED_WOULD_ALLOW) {
                    Some(r) => (false, r),
                    None => continue,
                },
            };
            let (policy, rule) = rest.split_once(' ').unwrap_or((rest, ""));
            let e = by_rule
                .entry((policy.to_string(), rule.to_string()))
                .or_insert_with(|| StagedEffect {
                    policy: policy.to_string(),
                    rule: rule.to_string(),
                    would_deny: 0,
                    would_allow: 0,
                    connections: Vec::new(),
                });
            if deny {
                e.would_deny += flow.started;
            } else {
                e.would_allow += flow.started;
            }
            let c = StagedConnection {
                from: k.src.label(),
                to: k.service.clone().unwrap_or_else(|| k.dst.label()),
                port: k.port,
                protocol: k.proto.clone(),
                enforced: k.verdict.word().to_string(),
                staged: if deny { "would-deny" } else { "would-allow" }.to_string(),
                count: flow.started,
            };
            match e.connections.iter_mut().find(|x| {
                (&x.from, &x.to, x.port, &x.protocol, &x.enforced, &x.staged)
                    == (&c.from, &c.to, c.port, &c.protocol, &c.enforced, &c.staged)
            }) {
                Some(x) => x.count += c.count,
                None => e.connections.push(c),
            }
        }
    }
    let mut effects: Vec<StagedEffect> = by_rule.into_values().collect();
    for e in &mut effects {
        e.connections.sort();
    }
    if a.output.document(&effects)? {
        return Ok(());
    }
    let wide = a.output == Output::Wide;
    if wide {
        let mut t = Table::new(&[
            "POLICY", "RULE", "FROM", "TO", "PORT", "ENFORCED", "STAGED", "COUNT",
        ]);
        for e in &effects {
            for c in &e.connections {
                t.row(vec![
                    e.policy.clone(),
                    e.rule.clone(),
                    c.from.clone(),
                    c.to.clone(),
                    format!("{}/{}", c.port, c.protocol),
                    c.enforced.clone(),
                    c.staged.clone(),
                    c.count.to_string(),
                ]);
            }
        }
        t.print();
    } else {
        let mut t = Table::new(&["POLICY", "RULE", "WOULD-DENY", "WOULD-ALLOW", "CONNECTIONS"]);
        for e in &effects {
            t.row(vec![
                e.policy.clone(),
                e.rule.clone(),
                e.would_deny.to_string(),
                e.would_allow.to_string(),
                e.connections.len().to_string(),
            ]);
        }
        t.print();
    }
    Ok(())
}

#[derive(Args)]
pub struct TraceArgs {
    /// Source: namespace/name of a pod, or an IP address.
    from: Option<String>,
    /// Destination: namespace/name of a pod, node/NAME, or an IP address.
    to: Option<String>,
    /// The destination port.
    #[arg(long)]
    port: Option<u16>,
    /// TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP")]
    protocol: String,
    /// Every pod to every other pod on each of the destination's declared ports.
    #[arg(long, conflicts_with_all = ["from", "to", "port"])]
    all: bool,
    /// Output format: table, wide, json or yaml.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// The agent's HTTP address (its --http-listen), in each node's namespace in a lab: asked
    /// what pods with DNS-name rules learned (`/dns`).
    #[arg(long, value_name = "ADDR", default_value = malla_agent::DEFAULT_HTTP_LISTEN)]
    agent_address: std::net::SocketAddr,
}

fn protocol(s: &str) -> anyhow::Result<Protocol> {
    match s.to_ascii_uppercase().as_str() {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => bail!("--protocol: {other:?} is not TCP, UDP or SCTP"),
    }
}

/// Addresses of a pod (`ns/name`), of a node (`node/NAME`: its underlay addresses) or the
/// address itself.
fn addresses(
    view: &malla_calc::ClusterView,
    pods: &[PolicyPod],
    who: &str,
) -> anyhow::Result<Vec<IpAddr>> {
    if let Ok(ip) = who.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    if let Some(name) = who.strip_prefix("node/") {
        let ips = malla_calc::routes::node_ips(view, name);
        if ips.is_empty() {
            bail!("no node {name} with an address");
        }
        return Ok(ips);
    }
    let (ns, name) = who
        .split_once('/')
        .with_context(|| format!("{who:?} is neither namespace/name nor an IP"))?;
    let pod = pods
        .iter()
        .find(|p| p.namespace == ns && p.name == name)
        .with_context(|| format!("no pod {who} with an address"))?;
    Ok(pod.ips.clone())
}

/// The endpoint-to-host action when `src` is a pod and `dst` an address of that pod's own
/// node: the traffic takes the input hook there, after the pod's egress policy.
fn to_host(
    view: &malla_calc::ClusterView,
    pods: &[PolicyPod],
    src: IpAddr,
    dst: IpAddr,
) -> Option<EndpointToHostAction> {
    let pod = pods.iter().find(|p| p.ips.contains(&src))?;
    malla_calc::routes::node_ips(view, &pod.node)
        .contains(&dst)
        .then_some(view.config.default_endpoint_to_host_action)
}

/// Host endpoint policy on the way: one stage on one node.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HostTrace {
    node: String,
    stage: &'static str,
    /// The host endpoint whose policy applied (none: exempt or no endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    host_endpoint: Option<String>,
    passes: bool,
    decided_by: malla_calc::host::reference::DecidedBy,
}

/// The interface a node's host endpoint policy is evaluated on for traffic to or from its
/// underlay address `addr`: a named host endpoint expecting that address, else the
/// all-interfaces one (`*`).
fn node_interface(heps: &[malla_api::calico::HostEndpoint], addr: IpAddr) -> String {
    heps.iter()
        .find(|h| !h.all_interfaces() && h.spec.expected_ips.contains(&addr))
        .and_then(|h| h.spec.interface_name.clone())
        .unwrap_or_else(|| "*".into())
}

/// Host endpoint policy between `s` and `d`: the source node's output stage when `s` is a
/// node's address, the destination node's pre-DNAT and input stages when `d` is one (a pod
/// reaching its own node is the endpoint-to-host action's, not host endpoint policy's).
fn host_trace(
    view: &malla_calc::ClusterView,
    pods: &[PolicyPod],
    s: IpAddr,
    d: IpAddr,
    port: u16,
    proto: Protocol,
) -> Vec<HostTrace> {
    use malla_calc::host::{self, reference, Stage};
    let node_of = |a: IpAddr| {
        view.nodes
            .iter()
            .find(|n| malla_calc::routes::node_ips(view, &n.name).contains(&a))
            .map(|n| n.name.clone())
    };
    let p = reference::HostPacket {
        src: s,
        dst: d,
        proto: match proto {
            Protocol::Tcp => malla_api::calico::Proto::TCP,
            Protocol::Udp => malla_api::calico::Proto::UDP,
            Protocol::Sctp => malla_api::calico::Proto::SCTP,
        },
        sport: 40000,
        dport: port,
        icmp: None,
    };
    let ents = host::labelled(view);
    let mut out = Vec::new();
    let mut stage = |node: &str, stage: Stage, name: &'static str, addr: IpAddr| {
        let heps = host::local_host_endpoints(&view.calico, node, view.config.auto_host_endpoints);
        let others: Vec<IpAddr> = view
            .nodes
            .iter()
            .filter(|n| n.name != node)
            .flat_map(|n| malla_calc::routes::node_ips(view, &n.name))
            .collect();
        let iface = node_interface(&heps, addr);
        let (decision, hep, by) = reference::verdict_explained(
            &view.calico,
            &view.config,
            &heps,
            &others,
            stage,
            &iface,
            &p,
            &ents,
        );
        out.push(HostTrace {
            node: node.to_string(),
            stage: name,
            host_endpoint: hep,
            passes: decision.passes(),
            decided_by: by,
        });
    };
    if let Some(n) = node_of(s) {
        stage(&n, Stage::Output, "output", s);
    }
    if let Some(n) = node_of(d) {
        let own_pod = pods.iter().any(|x| x.ips.contains(&s) && x.node == n);
        // A node port is DNATed after pre-DNAT: the connection is forwarded to a pod, not
        // delivered to the node's processes.
        let node_port = view.services.iter().any(|svc| {
            svc.ports
                .iter()
                .any(|sp| sp.node_port == Some(port) && sp.protocol == proto)
        });
        if !own_pod {
            stage(&n, Stage::PreDnat, "preDNAT", d);
            if !node_port {
                stage(&n, Stage::Input, "input", d);
            }
        }
    }
    out
}

/// One verdict of `policy trace -o json|yaml`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TraceView<'a> {
    from: &'a str,
    to: &'a str,
    port: u16,
    protocol: &'static str,
    /// null when it cannot be known (a pod's DNS-name rules, and its agent could not say what
    /// the pod learned: `dns.error`).
    allowed: Option<bool>,
    egress: &'a malla_calc::policy::DirectionTrace,
    ingress: &'a malla_calc::policy::DirectionTrace,
    /// A pod's traffic to its own node: the endpoint-to-host action after its egress policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    to_host: Option<EndpointToHostAction>,
    /// Host endpoint policy on the source node's way out and the destination node's way in.
    #[serde(skip_serializing_if = "<[HostTrace]>::is_empty")]
    host_endpoints: &'a [HostTrace],
    /// Calico's tiers, where a Calico policy applies to a pod: per direction, the verdict and
    /// what decided (the tier, policy and rule; Kubernetes NetworkPolicies count in the
    /// `default` tier as `knp.default.NAMESPACE/NAME`).
    #[serde(skip_serializing_if = "Option::is_none")]
    tiers: Option<&'a TierTrace>,
    /// What staged policies would decide, per direction they change (beside the enforced
    /// verdict above, which they never change).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    staged: &'a BTreeMap<&'static str, malla_calc::policy::staged::PendingVerdict>,
    /// The source pod's DNS-name rules: whether the destination is in each rule's set, and
    /// which name and answer put it there.
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<&'a dns::DnsTrace>,
}

/// Tiered policy of a connection, per direction (None: no Calico policy applies there).
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct TierTrace {
    #[serde(skip_serializing_if = "Option::is_none")]
    egress: Option<TierVerdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingress: Option<TierVerdict>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TierVerdict {
    allowed: bool,
    decided_by: malla_calc::host::reference::DecidedBy,
}

/// The staged verdicts of a connection (`malla_calc::policy::staged`).
fn staged_trace(
    inp: &malla_calc::policy::tiers::TierInputs,
    c: &Connection,
) -> BTreeMap<&'static str, malla_calc::policy::staged::PendingVerdict> {
    if inp.calico.staged.is_empty() {
        return BTreeMap::new();
    }
    malla_calc::policy::staged::pending_points(inp, c)
}

fn tier_trace(inp: &malla_calc::policy::tiers::TierInputs, c: &Connection) -> Option<TierTrace> {
    use malla_calc::policy::{tiers, Direction};
    let one = |dir| {
        tiers::explain_direction(inp, dir, c).map(|(allowed, decided_by)| TierVerdict {
            allowed,
            decided_by,
        })
    };
    let t = TierTrace {
        egress: one(Direction::Egress),
        ingress: one(Direction::Ingress),
    };
    (t.egress.is_some() || t.ingress.is_some()).then_some(t)
}

pub fn run(g: &crate::Globals, cmd: PolicyCommand) -> anyhow::Result<()> {
    let a = match cmd {
        PolicyCommand::Trace(a) => a,
        PolicyCommand::Staged(a) => return staged(g, a),
    };
    let store = g.open_store()?;
    let view = malla_agent::read_view(&*store)?;
    let pods = malla_calc::routes::policy_pods(&view);
    let mut out = Vec::new();
    let mut hosts: Vec<Vec<HostTrace>> = Vec::new();
    let mut tiered: Vec<Option<TierTrace>> = Vec::new();
    let mut staged = Vec::new();
    // What tiers read, once for every connection traced.
    let ents = malla_calc::host::labelled(&view);
    let nodes = malla_calc::routes::node_addresses(&view);
    let mut inp = malla_calc::policy::tiers::TierInputs::of(&view, &pods, &ents, &nodes);
    // What the traced pods learned from DNS, from their nodes' agents.
    let sources: Vec<&PolicyPod> = match (a.all, a.from.as_deref()) {
        (true, _) => pods.iter().collect(),
        (false, Some(from)) => {
            let ips = addresses(&view, &pods, from)?;
            pods.iter()
                .filter(|p| p.ips.iter().any(|i| ips.contains(i)))
                .collect()
        }
        (false, None) => Vec::new(),
    };
    let learned = dns::Learned::fetch(g, &inp, &sources, a.agent_address)?;
    let dns_view = learned.view();
    inp.dns = &dns_view;
    let mut dns_traces: Vec<Option<dns::DnsTrace>> = Vec::new();
    if a.all {
        for src in &pods {
            for dst in pods
                .iter()
                .filter(|d| (&d.namespace, &d.name) != (&src.namespace, &src.name))
            {
                let (Some(s), Some(d)) = (
                    src.ips.first(),
                    dst.ips.iter().find(|d| d.is_ipv4() == src.ips[0].is_ipv4()),
                ) else {
                    continue;
                };
                for port in dst.ports.iter() {
                    let c = Connection {
                        src: Endpoint::resolve(&pods, *s),
                        dst: Endpoint::resolve(&pods, *d),
                        port: port.port,
                        proto: port.protocol,
                    };
                    let e = explain(&view.policies, &view.namespaces, &c);
                    tiered.push(tier_trace(&inp, &c));
                    staged.push(staged_trace(&inp, &c));
                    dns_traces.push(learned.explain(&inp, &c));
                    out.push((
                        format!("{}/{}", src.namespace, src.name),
                        format!("{}/{}", dst.namespace, dst.name),
                        port.port,
                        port.protocol,
                        e,
                        None,
                    ));
                }
            }
        }
    } else {
        let (Some(from), Some(to), Some(port)) = (a.from.as_deref(), a.to.as_deref(), a.port)
        else {
            bail!("give FROM, TO and --port (or --all)");
        };
        let proto = protocol(&a.protocol)?;
        let srcs = addresses(&view, &pods, from)?;
        let dsts = addresses(&view, &pods, to)?;
        let (s, d) = srcs
            .iter()
            .find_map(|s| {
                dsts.iter()
                    .find(|d| d.is_ipv4() == s.is_ipv4())
                    .map(|d| (*s, *d))
            })
            .with_context(|| format!("{from} and {to} share no address family"))?;
        let c = Connection {
            src: Endpoint::resolve(&pods, s),
            dst: Endpoint::resolve(&pods, d),
            port,
            proto,
        };
        out.push((
            from.to_string(),
            to.to_string(),
            port,
            proto,
            explain(&view.policies, &view.namespaces, &c),
            to_host(&view, &pods, s, d),
        ));
        hosts.push(host_trace(&view, &pods, s, d, port, proto));
        tiered.push(tier_trace(&inp, &c));
        staged.push(staged_trace(&inp, &c));
        dns_traces.push(learned.explain(&inp, &c));
    }
    hosts.resize_with(out.len(), Vec::new);
    // Dropped by the endpoint-to-host action even when the egress policy allows it, or by
    // host endpoint policy.
    let allowed = |i: usize| {
        let (_, _, _, _, e, h) = &out[i];
        // Where tiers apply they decide the direction; elsewhere NetworkPolicy does.
        let t = tiered[i].as_ref();
        let egress = t
            .and_then(|t| t.egress.as_ref())
            .map_or(e.egress.allowed(), |v| v.allowed);
        let ingress = t
            .and_then(|t| t.ingress.as_ref())
            .map_or(e.ingress.allowed(), |v| v.allowed);
        let rest =
            ingress && *h != Some(EndpointToHostAction::Drop) && hosts[i].iter().all(|t| t.passes);
        // Egress by DNS-name rules the agent could not inform: unknown, unless the rest denies.
        match dns_traces[i].as_ref().is_some_and(|d| d.unknown()) {
            true if rest => None,
            _ => Some(egress && rest),
        }
    };
    let word = |v: Option<bool>| match v {
        Some(true) => "ALLOWED",
        Some(false) => "DENIED",
        None => "UNKNOWN",
    };
    let views: Vec<TraceView> = out
        .iter()
        .enumerate()
        .map(|(i, (f, t, p, pr, e, h))| TraceView {
            from: f,
            to: t,
            port: *p,
            protocol: pr.nft(),
            allowed: allowed(i),
            egress: &e.egress,
            ingress: &e.ingress,
            to_host: *h,
            host_endpoints: &hosts[i],
            tiers: tiered[i].as_ref(),
            staged: &staged[i],
            dns: dns_traces[i].as_ref(),
        })
        .collect();
    if a.output.document(&views)? {
        return Ok(());
    }
    if a.output == Output::Wide {
        let mut t = Table::new(&["FROM", "TO", "PORT", "VERDICT", "EGRESS", "INGRESS"]);
        for (i, (f, tt, p, pr, e, _)) in out.iter().enumerate() {
            t.row(vec![
                f.clone(),
                tt.clone(),
                format!("{}/{p}", pr.nft()),
                word(allowed(i)).into(),
                e.egress.selected_by.join(","),
                e.ingress.selected_by.join(","),
            ]);
        }
        t.print();
        return Ok(());
    }
    for (i, (f, t, p, pr, e, h)) in out.iter().enumerate() {
        println!("{f} -> {t} {}/{p}: {}", pr.nft(), word(allowed(i)));
        for line in e.to_string().lines() {
            println!("  {line}");
        }
        if let Some(h) = h {
            println!("  to its own node: the cluster's endpoint-to-host action is {h:?}");
        }
        let describe = |d: &malla_calc::host::reference::DecidedBy| {
            use malla_calc::host::reference::DecidedBy;
            match d {
                DecidedBy::Rule {
                    tier,
                    policy,
                    index,
                } => {
                    format!("rule {index} of {tier}/{policy}")
                }
                DecidedBy::EndOfTier { tier } => format!("the end of tier {tier}"),
                DecidedBy::Default => "the default after every tier".into(),
                DecidedBy::Exempt { why } => format!("exempt: {why}"),
            }
        };
        if let Some(t) = &tiered[i] {
            for (dir, v) in [("egress", &t.egress), ("ingress", &t.ingress)] {
                if let Some(v) = v {
                    println!(
                        "  tiers, {dir}: {} by {}",
                        if v.allowed { "allowed" } else { "DENIED" },
                        describe(&v.decided_by)
                    );
                }
            }
        }
        for line in dns_traces[i].iter().flat_map(|d| d.lines()) {
            println!("  {line}");
        }
        for (dir, v) in &staged[i] {
            println!(
                "  staged, {dir}: would {} by {}{} (enforced: unchanged)",
                if v.allowed { "allow" } else { "DENY" },
                v.point.rule_text(),
                v.tier
                    .as_deref()
                    .map(|t| format!(" in tier {t}"))
                    .unwrap_or_default()
            );
        }
        for ht in &hosts[i] {
            let by = describe(&ht.decided_by);
            println!(
                "  host endpoint {} on {} ({}): {} by {by}",
                ht.host_endpoint.as_deref().unwrap_or("-"),
                ht.node,
                ht.stage,
                if ht.passes { "passes" } else { "DENIED" },
            );
        }
    }
    Ok(())
}
