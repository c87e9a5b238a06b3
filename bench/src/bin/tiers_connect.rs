//! `tiers-connect-bench`: issue 15's "per-packet cost flat in tiers and policies" — TCP
//! connection setup (connect() to established) with **1** policy vs **1000** policies spread
//! over 3 tiers, in one 2-node lab (`--routing direct`), target p50 ratio 1000/1 ≤ 1.05.
//!
//! Pods in `default`: `a` (client) and `b` (server) on node-1, `c` (server) on node-2, `d` (a
//! probe pod) on node-1; `x` in `team-01` on node-1 and `y` in `team-02` on node-2 stand for the
//! rest of the cluster. Setting "1": the Kubernetes NetworkPolicy `zz-allow-client` (servers
//! accept TCP 9300 from the client) alone. Setting "1000": the same policy plus 999 more and
//! two Calico tiers:
//! - tier `security` (order 100, defaultAction Pass): 333 GlobalNetworkPolicies — every
//!   `--share`-th selects the client and the servers (ingress: deny a blocked /32 and `env ==
//!   'dev'` namespaces; egress: deny a blocked /32), one quarantines the probe pod from the client,
//!   the others select other apps (allow the web tier on 8080, deny dev namespaces, Pass), and
//!   the last (`security.zz-pass`, `all()`) passes everything on;
//! - tier `platform` (order 200, defaultAction Pass): 333 namespaced Calico NetworkPolicies —
//!   every `--share`-th in `default` selects the servers (deny a blocked /32, deny a team's
//!   namespaces on 9300), the others live in the 20 `team-NN` namespaces, and the last
//!   (`platform.zz-pass`, `default`, `all()`) passes;
//! - tier `default`: 333 Kubernetes NetworkPolicies — every `--share`-th in `default` selects the
//!   servers (allow a /32 on another port), the others select apps of the team namespaces — and
//!   `zz-allow-client` last, which is what lets the measured connections in.
//!
//! So the measured SYN walks every rule of the policies that select its pods and is allowed at
//! the end. The switch between the settings applies or deletes the 999 (and the two tiers)
//! through the lab (`malla lab apply`/`delete`, which wait until every agent applied them); the
//! setting is then verified: the probe `d → a` (denied only by the 1000-set) and the rules
//! reachable from `a`'s egress and `b`'s and `c`'s ingress dispatch entries in the node's `inet
//! malla` table (`nft -j`), printed per setting. Each round measures both settings, in
//! alternating order, `--connections` sequential connects a→b (same node) and a→c (cross node).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::{keys, RoutingMode, WorkloadEndpoint};
use malla_bench::{
    begin, check, connect_times, first_ipv4, listen, median_f64, per_round_ratios, percentile,
    ratio, secs, us, yes, BinArgs, Lab,
};
use malla_calc::masquerade;
use malla_calc::policy::render::{EGRESS_DISPATCH, INGRESS_DISPATCH};
use malla_dataplane::netns::NetNs;
use malla_dataplane::nft;
use malla_lab::{manifest, runtime, store as lab_store};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(
    name = "tiers-connect-bench",
    version,
    about = "pod-to-pod connect latency with 1 vs 1000 policies over 3 tiers"
)]
struct Args {
    /// Rounds (each setting once per round, order alternating).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// TCP connects per round, setting and path.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Every `share`-th policy of each tier selects the measured pods.
    #[arg(long, default_value_t = 20)]
    share: usize,
    /// Write node-1's `inet malla` table of each setting (first round) into this directory.
    #[arg(long)]
    dump_ruleset: Option<std::path::PathBuf>,
    #[command(flatten)]
    bins: BinArgs,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 1800)]
    max_seconds: u64,
}

/// The port of the listeners in `a`, `b` and `c`.
const PORT: u16 = 9300;
/// Policies per tier in the 1000 setting (3 × 333 + `zz-allow-client`).
const PER_TIER: usize = 333;
/// Team namespaces (no measured pods in them).
const TEAMS: usize = 20;
/// Apps of the team namespaces.
const APPS: usize = 40;
/// Discarded connects before each measured batch.
const WARMUP: usize = 20;

/// The tiers, in evaluation order, as the census and the report name them.
const TIERS: [&str; 3] = ["security", "platform", "default"];

/// How many policies of each tier apply to the measured pods, per direction.
#[derive(Default, Debug)]
struct Census {
    /// Per tier: policies selecting the servers for ingress.
    servers_in: [usize; 3],
    /// Per tier: policies selecting the client for egress.
    client_out: [usize; 3],
}

/// A blocked /32 no lab address uses (198.19.160.0/19).
fn blocked(i: usize) -> String {
    format!("198.19.{}.{}/32", 160 + i / 256, i % 256)
}

fn team(i: usize) -> String {
    format!("team-{:02}", i % TEAMS)
}

fn app(i: usize) -> String {
    format!("svc-{}", i % APPS)
}

/// Namespaces, pods and the one policy of setting "1".
fn base_manifest() -> String {
    let mut t = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {env: prod, team: team-core}}\n",
    );
    for k in 0..TEAMS {
        let env = if k % 4 == 3 { "dev" } else { "prod" };
        t.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {{env: {env}, team: {}}}}}\n",
            team(k),
            team(k)
        ));
    }
    for (ns, pod, node, labels) in [
        ("default", "a", "node-1", "{app: client, tier: web}"),
        ("default", "b", "node-1", "{app: server}"),
        ("default", "c", "node-2", "{app: server}"),
        ("default", "d", "node-1", "{app: probe}"),
        ("team-01", "x", "node-1", "{app: svc-1}"),
        ("team-02", "y", "node-2", "{app: svc-2}"),
    ] {
        t.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {labels}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: bench}}]}}\n"
        ));
    }
    t.push_str(&format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: zz-allow-client, namespace: default}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  \
         - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{protocol: TCP, port: {PORT}}}]\n"
    ));
    t
}

/// The two tiers and the 999 policies of setting "1000", and how many select the measured pods.
fn extra_manifest(share: usize) -> (String, Census) {
    let mut c = Census::default();
    let mut t = String::new();
    for (name, order) in [("security", 100), ("platform", 200)] {
        t.push_str(&format!(
            "---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: {name}}}\nspec: {{order: {order}, defaultAction: Pass}}\n"
        ));
    }
    let doc = |kind: &str, name: &str, ns: Option<&str>, spec: &str| {
        let ns = ns.map(|n| format!(", namespace: {n}")).unwrap_or_default();
        format!("---\napiVersion: projectcalico.org/v3\nkind: {kind}\nmetadata: {{name: {name}{ns}}}\nspec:\n{spec}")
    };
    // Tier `security`: global policies.
    for i in 0..PER_TIER {
        let spec = if i == PER_TIER - 1 {
            t.push_str(&doc(
                "GlobalNetworkPolicy",
                "security.zz-pass",
                None,
                "  tier: security\n  order: 10000\n  selector: all()\n  types: [Ingress, Egress]\n  \
                 ingress: [{action: Pass}]\n  egress: [{action: Pass}]\n",
            ));
            c.servers_in[0] += 1;
            c.client_out[0] += 1;
            continue;
        } else if i == 1 {
            // The probe: only this set denies d → a.
            format!(
                "  tier: security\n  order: {i}\n  selector: app == 'client'\n  types: [Ingress]\n  \
                 ingress:\n  - {{action: Deny, source: {{selector: app == 'probe'}}}}\n"
            )
        } else if i % share == 0 {
            c.servers_in[0] += 1;
            c.client_out[0] += 1;
            format!(
                "  tier: security\n  order: {i}\n  selector: app in {{'client', 'server'}}\n  types: [Ingress, Egress]\n  \
                 ingress:\n  - {{action: Deny, source: {{nets: [{b}]}}}}\n  \
                 - {{action: Deny, source: {{namespaceSelector: env == 'dev'}}}}\n  \
                 egress:\n  - {{action: Deny, destination: {{nets: [{b}]}}}}\n",
                b = blocked(i)
            )
        } else {
            format!(
                "  tier: security\n  order: {i}\n  selector: app == '{a}' && projectcalico.org/namespace == '{n}'\n  \
                 types: [Ingress]\n  ingress:\n  \
                 - {{action: Allow, protocol: TCP, source: {{selector: tier == 'web'}}, destination: {{ports: [8080]}}}}\n  \
                 - {{action: Deny, source: {{namespaceSelector: env == 'dev'}}}}\n  - {{action: Pass}}\n",
                a = app(i),
                n = team(i)
            )
        };
        t.push_str(&doc(
            "GlobalNetworkPolicy",
            &format!("security.gnp-{i:03}"),
            None,
            &spec,
        ));
    }
    // Tier `platform`: namespaced Calico policies.
    for i in 0..PER_TIER {
        let (ns, name, spec) = if i == PER_TIER - 1 {
            c.servers_in[1] += 1;
            (
                "default".to_string(),
                "platform.zz-pass".to_string(),
                "  tier: platform\n  order: 10000\n  selector: all()\n  types: [Ingress]\n  ingress: [{action: Pass}]\n"
                    .to_string(),
            )
        } else if i % share == 0 {
            c.servers_in[1] += 1;
            (
                "default".to_string(),
                format!("platform.cnp-{i:03}"),
                format!(
                    "  tier: platform\n  order: {i}\n  selector: app == 'server'\n  types: [Ingress]\n  \
                     ingress:\n  - {{action: Deny, source: {{nets: [{b}]}}}}\n  \
                     - {{action: Deny, protocol: TCP, source: {{namespaceSelector: team == '{t}'}}, destination: {{ports: [{PORT}]}}}}\n",
                    b = blocked(1000 + i),
                    t = team(i / share + 1)
                ),
            )
        } else {
            (
                team(i),
                format!("platform.cnp-{i:03}"),
                format!(
                    "  tier: platform\n  order: {i}\n  selector: app == '{a}'\n  types: [Ingress]\n  \
                     ingress:\n  - {{action: Allow, source: {{namespaceSelector: team == '{t}'}}}}\n  - {{action: Deny}}\n",
                    a = app(i),
                    t = team(i + 3)
                ),
            )
        };
        t.push_str(&doc("NetworkPolicy", &name, Some(&ns), &spec));
    }
    // Tier `default`: Kubernetes NetworkPolicies (before `zz-allow-client` by name).
    for i in 0..PER_TIER {
        let (ns, spec) = if i % share == 0 {
            c.servers_in[2] += 1;
            (
                "default".to_string(),
                format!(
                    "  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  \
                     - from: [{{ipBlock: {{cidr: {b}}}}}]\n    ports: [{{protocol: TCP, port: {p}}}]\n",
                    b = blocked(2000 + i),
                    p = 10000 + i
                ),
            )
        } else {
            (
                team(i),
                format!(
                    "  podSelector: {{matchLabels: {{app: {a}}}}}\n  ingress:\n  \
                     - from: [{{namespaceSelector: {{matchLabels: {{team: {t}}}}}}}]\n",
                    a = app(i),
                    t = team(i + 5)
                ),
            )
        };
        t.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: knp-{i:03}, namespace: {ns}}}\nspec:\n{spec}"
        ));
    }
    // `zz-allow-client` selects the servers in both settings.
    c.servers_in[2] += 1;
    (t, c)
}

/// The two settings.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setting {
    One,
    Thousand,
}

impl Setting {
    fn label(self) -> &'static str {
        match self {
            Setting::One => "1 policy",
            Setting::Thousand => "1000 policies",
        }
    }

    fn file(self) -> &'static str {
        match self {
            Setting::One => "1",
            Setting::Thousand => "1000",
        }
    }
}

/// Chains and rules reachable from one endpoint's dispatch entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct Reach {
    chains: usize,
    rules: usize,
}

/// What one setting measured.
#[derive(Default)]
struct Samples {
    same: Vec<Duration>,
    cross: Vec<Duration>,
    /// Each round's p50 (same node, cross node).
    same_p50: Vec<Duration>,
    cross_p50: Vec<Duration>,
    /// a's egress, b's ingress (node-1), c's ingress (node-2).
    reach: Option<[Reach; 3]>,
    /// How long the switch to this setting took (apply or delete, agents converged).
    switch: Vec<Duration>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=20).contains(&args.rounds)
        || !(10..=100_000).contains(&args.connections)
        || !(2..=PER_TIER).contains(&args.share)
    {
        bail!(
            "--rounds must be in 1..=20, --connections in 10..=100000, --share in 2..={PER_TIER}"
        );
    }
    let deadline = begin(args.max_seconds)?;
    let bins = args.bins.required()?;
    let opts = bins.up_options(2, RoutingMode::Direct);
    eprintln!("tiers-connect: bringing up a 2-node lab");
    let mut lab = Lab::up("tiers", &opts)?;
    lab.apply_pods(&bins.malla, &base_manifest())
        .context("applying the namespaces, pods and the one policy")?;
    let (extra_text, census) = extra_manifest(args.share);
    let extra = manifest::parse(&extra_text).map_err(|e| anyhow::anyhow!("the 999: {e}"))?;

    let addr = |name: &str| -> anyhow::Result<SocketAddr> {
        let p = lab.pod(name)?;
        let ip = first_ipv4(&p.ips).with_context(|| format!("pod {name} has no IPv4 address"))?;
        Ok(SocketAddr::new(IpAddr::V4(ip), PORT))
    };
    let (a, b, c, d) = (lab.pod("a")?, lab.pod("b")?, lab.pod("c")?, lab.pod("d")?);
    let (a_at, b_at, c_at) = (addr("a")?, addr("b")?, addr("c")?);
    for (ns, at) in [(&a.netns, a_at), (&b.netns, b_at), (&c.netns, c_at)] {
        listen(ns, at)?;
    }
    let ifname = host_ifnames(&lab)?;
    let node_ns = |node: &str| -> anyhow::Result<NetNs> {
        let n = lab
            .state
            .node(node)
            .with_context(|| format!("no node {node}"))?;
        Ok(NetNs::open_named(&n.netns)?)
    };
    let (node1, node2) = (node_ns("node-1")?, node_ns("node-2")?);
    // a's egress and b's ingress on node-1, c's ingress on node-2.
    let reach = || -> anyhow::Result<[Reach; 3]> {
        let r1 = Ruleset::read(&node1)?;
        let r2 = Ruleset::read(&node2)?;
        Ok([
            r1.reach(EGRESS_DISPATCH, ifname_of(&ifname, "a")?),
            r1.reach(INGRESS_DISPATCH, ifname_of(&ifname, "b")?),
            r2.reach(INGRESS_DISPATCH, ifname_of(&ifname, "c")?),
        ])
    };

    let mut one = Samples::default();
    let mut thousand = Samples::default();
    let mut current = Setting::One;
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [Setting::One, Setting::Thousand]
        } else {
            [Setting::Thousand, Setting::One]
        };
        for setting in order {
            check(deadline)?;
            let m = match setting {
                Setting::One => &mut one,
                Setting::Thousand => &mut thousand,
            };
            if setting != current {
                let t = Instant::now();
                match setting {
                    Setting::Thousand => {
                        runtime::apply(&lab.paths, &bins.malla, &extra)
                            .context("applying the 999 policies")?;
                    }
                    Setting::One => {
                        runtime::delete(&lab.paths, &extra).context("deleting the 999 policies")?;
                    }
                }
                m.switch.push(t.elapsed());
                current = setting;
            }
            // The setting is in place: the probe d → a is denied by the 1000-set alone, and the
            // rule counts on the measured paths are those of the setting's first round.
            let probe = reachable(&d.netns, a_at)?;
            if probe != (setting == Setting::One) {
                bail!(
                    "round {}, {}: the probe d -> a is {}",
                    round + 1,
                    setting.label(),
                    if probe { "allowed" } else { "denied" }
                );
            }
            let now = reach()?;
            match m.reach {
                None => {
                    m.reach = Some(now);
                    if let Some(dir) = &args.dump_ruleset {
                        let text = nft::list_table(Some(&node1), "inet", masquerade::TABLE)?;
                        let file = dir.join(format!("node-1-{}.nft", setting.file()));
                        std::fs::write(&file, text)
                            .with_context(|| format!("writing {}", file.display()))?;
                    }
                }
                Some(seen) if seen != now => {
                    bail!(
                        "{}: the measured paths changed: {seen:?} then {now:?}",
                        setting.label()
                    )
                }
                Some(_) => {}
            }
            connect_times(&a.netns, b_at, WARMUP)?;
            let same = connect_times(&a.netns, b_at, args.connections)?;
            check(deadline)?;
            connect_times(&a.netns, c_at, WARMUP)?;
            let cross = connect_times(&a.netns, c_at, args.connections)?;
            eprintln!(
                "round {}, {}: a->b p50 {} µs p99 {} µs, a->c p50 {} µs p99 {} µs",
                round + 1,
                setting.label(),
                us(percentile(&same, 50.0)),
                us(percentile(&same, 99.0)),
                us(percentile(&cross, 50.0)),
                us(percentile(&cross, 99.0))
            );
            m.same_p50.push(percentile(&same, 50.0));
            m.cross_p50.push(percentile(&cross, 50.0));
            m.same.extend(same);
            m.cross.extend(cross);
        }
    }
    drop((node1, node2));
    drop(lab);
    report(&args, &census, &one, &thousand);
    Ok(())
}

fn report(args: &Args, census: &Census, one: &Samples, thousand: &Samples) {
    println!();
    println!(
        "connection setup (connect() to established), 1 vs 1000 policies over 3 tiers (every {}th selects the measured pods); {} round(s), {} connects per round, setting and path",
        args.share, args.rounds, args.connections
    );
    let tiers = |v: &[usize; 3]| {
        TIERS
            .iter()
            .zip(v)
            .map(|(t, n)| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "policies applying with 1000: servers' ingress: {} (total {}); client's egress: {} (total {})",
        tiers(&census.servers_in),
        census.servers_in.iter().sum::<usize>(),
        tiers(&census.client_out),
        census.client_out.iter().sum::<usize>()
    );
    for (name, s) in [("1", one), ("1000", thousand)] {
        if let Some([a, b, c]) = s.reach {
            let sw = if s.switch.is_empty() {
                String::new()
            } else {
                let mut v = s.switch.clone();
                v.sort();
                format!(
                    "; switching to it took {} ms (median, agents converged)",
                    v[v.len() / 2].as_millis()
                )
            };
            println!(
                "rules reachable with {name:>4}: a egress {} ({} chains), b ingress {} ({} chains), c ingress {} ({} chains){sw}",
                a.rules, a.chains, b.rules, b.chains, c.rules, c.chains
            );
        }
    }
    println!(
        "{:<28} {:>10} {:>10} {:>8} {:>8} {:>6}",
        "case", "1", "1000", "ratio", "paired", "<=1.05"
    );
    for (name, o, t, o50, t50) in [
        (
            "connect same node",
            &one.same,
            &thousand.same,
            &one.same_p50,
            &thousand.same_p50,
        ),
        (
            "connect cross node",
            &one.cross,
            &thousand.cross,
            &one.cross_p50,
            &thousand.cross_p50,
        ),
    ] {
        // `paired`: the median of the rounds' own 1000/1 ratios (both settings measured back
        // to back, so free of slow drift); the verdict reads it.
        let paired = median_f64(&per_round_ratios(
            name,
            "1000/1 p50",
            &secs(t50),
            &secs(o50),
        ));
        for p in [50.0, 99.0] {
            let (po, pt) = (percentile(o, p), percentile(t, p));
            let r = ratio(pt.as_secs_f64(), po.as_secs_f64());
            // p99 has no per-round pairing worth the name: its own ratio is shown twice.
            let paired = if p == 50.0 { paired } else { r };
            println!(
                "{:<28} {:>10} {:>10} {:>8.3} {:>8.3} {:>6}",
                format!("{name} p{p:.0} (µs)"),
                us(po),
                us(pt),
                r,
                paired,
                yes(paired <= 1.05)
            );
        }
    }
}

/// Whether a TCP connect from `netns` to `to` succeeds within half a second.
fn reachable(netns: &str, to: SocketAddr) -> anyhow::Result<bool> {
    let ns = NetNs::open_named(netns)?;
    std::thread::spawn(move || -> anyhow::Result<bool> {
        ns.enter_this_thread()?;
        Ok(TcpStream::connect_timeout(&to, Duration::from_millis(500)).is_ok())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
}

/// The host-side interface of each pod of `default`, from the endpoint records.
fn host_ifnames(lab: &Lab) -> anyhow::Result<BTreeMap<String, String>> {
    let store = lab_store::open(&lab.paths, &lab.state)?;
    let (eps, _) = malla_store::list_json::<WorkloadEndpoint>(&*store, keys::ENDPOINTS)?;
    Ok(eps
        .into_iter()
        .map(|(_, e, _)| e)
        .filter(|e| e.namespace == "default")
        .map(|e| (e.pod, e.host_ifname))
        .collect())
}

fn ifname_of<'a>(names: &'a BTreeMap<String, String>, pod: &str) -> anyhow::Result<&'a str> {
    names
        .get(pod)
        .map(String::as_str)
        .with_context(|| format!("no endpoint record for pod {pod}"))
}

/// The node's `inet malla` table as a graph: per chain its rule count and the chains and maps
/// its rules name; per map its elements' keys and the chains they jump to.
struct Ruleset {
    chains: BTreeMap<String, (usize, BTreeSet<String>, BTreeSet<String>)>,
    maps: BTreeMap<String, Vec<(Value, BTreeSet<String>)>>,
}

impl Ruleset {
    fn read(node: &NetNs) -> anyhow::Result<Self> {
        let text = nft::run(
            Some(node),
            &["-j", "list", "table", "inet", masquerade::TABLE],
            "",
        )
        .context("listing the node's table")?;
        let doc: Value = serde_json::from_str(&text).context("parsing nft -j")?;
        let items = doc
            .get("nftables")
            .and_then(Value::as_array)
            .context("nft -j: no `nftables` array")?;
        let mut r = Ruleset {
            chains: BTreeMap::new(),
            maps: BTreeMap::new(),
        };
        for item in items {
            if let Some(ch) = item.get("chain") {
                if let Some(name) = ch.get("name").and_then(Value::as_str) {
                    r.chains.entry(name.to_string()).or_default();
                }
            } else if let Some(rule) = item.get("rule") {
                let Some(chain) = rule.get("chain").and_then(Value::as_str) else {
                    continue;
                };
                let e = r.chains.entry(chain.to_string()).or_default();
                e.0 += 1;
                if let Some(expr) = rule.get("expr") {
                    targets(expr, &mut e.1);
                    refs(expr, &mut e.2);
                }
            } else if let Some(map) = item.get("map") {
                let Some(name) = map.get("name").and_then(Value::as_str) else {
                    continue;
                };
                let elems = map
                    .get("elem")
                    .and_then(Value::as_array)
                    .map(|v| v.as_slice())
                    .unwrap_or_default();
                let mut out = Vec::new();
                for el in elems {
                    let (key, val) = match el.as_array().map(|v| v.as_slice()) {
                        Some([k, v]) => (k.clone(), v),
                        _ => continue,
                    };
                    let mut t = BTreeSet::new();
                    targets(val, &mut t);
                    out.push((key, t));
                }
                r.maps.insert(name.to_string(), out);
            }
        }
        Ok(r)
    }

    /// Chains and rules reachable from `dispatch`'s entry for `ifname` (jumps, gotos and the
    /// verdict maps rules look up).
    fn reach(&self, dispatch: &str, ifname: &str) -> Reach {
        let mut queue: VecDeque<String> = self
            .maps
            .get(dispatch)
            .into_iter()
            .flatten()
            .filter(|(k, _)| key_names(k, ifname))
            .flat_map(|(_, t)| t.iter().cloned())
            .collect();
        let mut seen = BTreeSet::new();
        let mut out = Reach::default();
        while let Some(chain) = queue.pop_front() {
            if !seen.insert(chain.clone()) {
                continue;
            }
            let Some((rules, jumps, maps)) = self.chains.get(&chain) else {
                continue;
            };
            out.chains += 1;
            out.rules += rules;
            queue.extend(jumps.iter().cloned());
            for m in maps {
                for (_, t) in self.maps.get(m).into_iter().flatten() {
                    queue.extend(t.iter().cloned());
                }
            }
        }
        out
    }
}

/// Whether a map key is (or holds) the interface name.
fn key_names(key: &Value, ifname: &str) -> bool {
    match key {
        Value::String(s) => s == ifname,
        Value::Array(v) => v.iter().any(|k| key_names(k, ifname)),
        Value::Object(o) => o.values().any(|k| key_names(k, ifname)),
        _ => false,
    }
}

/// The chains `jump`/`goto` verdicts anywhere in `v` name.
fn targets(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "jump" || k == "goto" {
                    if let Some(t) = x.get("target").and_then(Value::as_str) {
                        out.insert(t.to_string());
                    }
                } else {
                    targets(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| targets(x, out)),
        _ => {}
    }
}

/// The named sets and maps (`@name`) `v` refers to.
fn refs(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) => {
            if let Some(n) = s.strip_prefix('@') {
                out.insert(n.to_string());
            }
        }
        Value::Object(o) => o.values().for_each(|x| refs(x, out)),
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}
