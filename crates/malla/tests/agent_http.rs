//! The agent's HTTP home, in a 2-node lab on a real etcd, read the way a kubelet's probes and a
//! Prometheus scrape read it: `curl` from inside each node's namespace to the node's own
//! loopback, `127.0.0.1:9099`.
//!
//! - Every node: `/healthz` and `/readyz` 200; `/metrics` passes `promtool check metrics`
//!   (Debian's `prometheus`, extracted by scripts/deps) and holds every series the agent
//!   promises, with what the node programmed.
//! - An agent started while etcd is away answers `/healthz` 200 and `/readyz` 503 for as long
//!   as etcd stays away, and 200 once etcd is back and its first sync is applied. The agent
//!   that lived through the outage stays alive and ready, and counts a datastore reconnect.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Lab;

const ADDR: &str = "127.0.0.1:9099";

/// Every series `/metrics` must hold (names as the classic text format spells them).
const SERIES: [&str; 13] = [
    "malla_sync_duration_seconds_bucket",
    "malla_sync_duration_seconds_count",
    "malla_apply_duration_seconds_bucket{le=\"+Inf\",path=\"full\"}",
    "malla_apply_duration_seconds_count{path=\"endpoints\"}",
    "malla_apply_duration_seconds_count{path=\"repair\"}",
    "malla_programmed_objects{kind=\"routes\"}",
    "malla_programmed_objects{kind=\"local_workloads\"}",
    "malla_programmed_objects{kind=\"service_endpoints\"}",
    "malla_programmed_objects{kind=\"network_policies\"}",
    "malla_apply_errors_total",
    "malla_datastore_reconnects_total",
    "malla_sync_pending_seconds",
    "malla_reverse_path_drops_total",
];

/// promtool, where scripts/deps puts it (or the Debian package's, if installed).
fn promtool() -> PathBuf {
    ["/var/cache/malla/promtool/promtool", "/usr/bin/promtool"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("promtool: run scripts/deps (it extracts Debian's prometheus promtool into /var/cache/malla/promtool)")
}

/// `curl` of `path` on the agent's address from inside `netns`: (HTTP status, body); status 0
/// when nothing answered.
fn curl(netns: &str, path: &str) -> (u16, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-s", "-m", "5"])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://{ADDR}{path}"))
        .output()
        .expect("running curl (Debian package curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Polls `path` in `netns` until it answers 200, failing after `timeout`.
fn wait_for_200(netns: &str, path: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, body) = curl(netns, path);
        if code == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{netns}: {path} still answers {code} after {timeout:?}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the sample that starts with `series ` (exact name and labels).
fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} missing from:\n{metrics}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

/// Scrapes `netns`'s agent, checks the text with promtool and that every series is there.
fn scrape(netns: &str) -> String {
    let (code, text) = curl(netns, "/metrics");
    assert_eq!(code, 200, "{netns}: /metrics answered {code}: {text}");
    let mut check = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{netns}: promtool check metrics rejected the text: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for s in SERIES {
        assert!(
            text.lines().any(|l| l.starts_with(s)),
            "{netns}: {s} missing from:\n{text}"
        );
    }
    text
}

fn pid_of(lab: &Lab, what: &str) -> i32 {
    let state = lab.state();
    let v = match what {
        "etcd" => &state["etcd_pid"],
        _ => &state["nodes"][0]["agent_pid"],
    };
    v.as_u64().expect("the lab records the pid") as i32
}

/// SIGKILLs one of the lab's processes, by the pid the lab recorded, and waits until it is gone.
fn kill(pid: i32) {
    assert!(malla_lab::process::is_ours(pid as u32));
    // SAFETY: signalling the lab's own process, by the pid the lab recorded.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while malla_lab::process::is_ours(pid as u32) {
        assert!(Instant::now() < deadline, "{pid} did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn each_nodes_agent_serves_health_readiness_and_metrics() {
    let lab = Lab::new(&common::malla_bin(), "http");
    lab.run(&["lab", "up", "--nodes", "2", "--datastore", "etcd"]);
    lab.apply(&common::two_pods_per_node(2));
    lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: test}\n  ports:\n  - {port: 80, targetPort: 8080}\n");
    lab.run(&["lab", "up", "--nodes", "2", "--datastore", "etcd"]);
    let nodes = [lab.netns("node-1"), lab.netns("node-2")];

    for ns in &nodes {
        assert_eq!(curl(ns, "/healthz").0, 200, "{ns}: /healthz");
        assert_eq!(curl(ns, "/readyz").0, 200, "{ns}: /readyz");
        let m = scrape(ns);
        // What the node programmed: a route to the other node's block, its own two pods, the
        // service's four endpoints.
        assert!(
            value(&m, "malla_programmed_objects{kind=\"routes\"}") >= 1.0,
            "{m}"
        );
        assert_eq!(
            value(&m, "malla_programmed_objects{kind=\"local_workloads\"}"),
            2.0,
            "{m}"
        );
        assert_eq!(
            value(&m, "malla_programmed_objects{kind=\"service_ports\"}"),
            1.0,
            "{m}"
        );
        assert_eq!(
            value(&m, "malla_programmed_objects{kind=\"service_endpoints\"}"),
            4.0,
            "{m}"
        );
        assert!(
            value(&m, "malla_apply_duration_seconds_count{path=\"full\"}") >= 1.0,
            "{m}"
        );
        assert!(value(&m, "malla_sync_duration_seconds_count") >= 1.0, "{m}");
        assert_eq!(value(&m, "malla_apply_errors_total"), 0.0, "{m}");
    }
    // The addresses are each node's own: the same port answers in both namespaces, and not
    // in the fabric's.
    assert_eq!(curl(&lab.netns("fabric"), "/healthz").0, 0);

    // etcd goes away, and node-1's agent is started afresh meanwhile.
    kill(pid_of(&lab, "etcd"));
    kill(pid_of(&lab, "agent"));
    let paths = malla_lab::state::LabPaths::new(&lab.name, Some(lab.state_root.path())).unwrap();
    let mut state = malla_lab::state::LabState::load(&paths).unwrap().unwrap();
    let pid = malla_lab::topology::start_agent(
        &paths,
        &common::malla_bin(),
        &state.nodes[0],
        malla_lab::store::Backend::Etcd,
    )
    .unwrap();
    // Recorded, so the next `lab up` keeps it (and brings it down with the lab).
    state.nodes[0].agent_pid = Some(pid);
    state.save(&paths).unwrap();

    wait_for_200(&nodes[0], "/healthz", Duration::from_secs(15));
    // Not ready for as long as etcd is away (the agent cannot list the cluster).
    let away = Instant::now();
    while away.elapsed() < Duration::from_secs(4) {
        let (code, body) = curl(&nodes[0], "/readyz");
        assert_eq!(code, 503, "node-1's /readyz while etcd is away: {body}");
        assert_eq!(
            curl(&nodes[0], "/healthz").0,
            200,
            "node-1 alive while etcd is away"
        );
        // The agent that synced before stays ready, and alive, its loop going round.
        assert_eq!(curl(&nodes[1], "/readyz").0, 200);
        assert_eq!(curl(&nodes[1], "/healthz").0, 200);
        std::thread::sleep(Duration::from_millis(250));
    }
    scrape(&nodes[0]);

    // etcd returns (`lab up` restarts it and waits until every agent has applied its revision).
    lab.run(&["lab", "up", "--nodes", "2", "--datastore", "etcd"]);
    assert_eq!(
        pid_of(&lab, "agent"),
        pid as i32,
        "the lab kept the agent started above"
    );
    wait_for_200(&nodes[0], "/readyz", Duration::from_secs(20));
    let m = scrape(&nodes[0]);
    assert_eq!(
        value(&m, "malla_programmed_objects{kind=\"local_workloads\"}"),
        2.0,
        "{m}"
    );
    // node-2's agent noticed etcd return.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(&nodes[1]);
        if value(&m, "malla_datastore_reconnects_total") >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-2 counted no reconnect:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
