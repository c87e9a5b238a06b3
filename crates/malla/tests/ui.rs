//! The flow page (`malla ui`) in headless Chromium (Debian `chromium`), 2-node lab, real
//! kernel: one connection allowed by a policy rule and one denied by an isolating policy. The
//! page, served on this host's loopback and asking each node's agent inside the node's
//! namespace, must show both flows in its table and graph with their verdicts and deciding
//! policies, and the denied flow's policy trace (the command and its DENIED result) when its
//! row is opened. Screenshots are kept as artifacts in
//! `$CARGO_TARGET_TMPDIR/ui-screenshots/` (under the target dir: `target/tmp/`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Lab;
use serde_json::Value;

/// client (node-1) → web (node-2): allowed by web-allow's rule 0; client → db (node-2):
/// denied by db-deny, which selects db and allows nothing.
fn manifests() -> String {
    let pod = common::http_pod;
    let mut y = pod("client", "node-1") + &pod("web", "node-2") + &pod("db", "node-2");
    y.push_str(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-allow}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 8080}]\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-deny}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n",
    );
    y
}

/// `malla ui` for the lab on a free loopback port, killed on drop.
struct Ui {
    child: Child,
    url: String,
}

impl Ui {
    fn start(lab: &Lab) -> Self {
        let mut child = lab
            .cmd()
            .args(["ui", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("malla ui");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("malla ui's first line");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://127.0.0.1:"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_string();
        Ui { child, url }
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Headless Chromium on `url` with a throwaway profile; `what` is `--dump-dom` or
/// `--screenshot=PATH`. The page's timers and fetches run for a 4 s virtual-time budget.
fn chromium(profile: &Path, url: &str, what: &str) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--window-size=1400,1000",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(what)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("running chromium (Debian package chromium; scripts/deps installs it)");
    assert!(
        out.status.success(),
        "chromium {what} {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the elements of `dom` (Chromium's serialised DOM) that open with `open`
/// (e.g. `<tr data-verdict="denied"`), tags stripped, one string each.
fn texts(dom: &str, open: &str, close: &str) -> Vec<String> {
    dom.match_indices(open)
        .map(|(i, _)| {
            let rest = &dom[i..];
            let end = rest.find(close).map_or(rest.len(), |e| e + close.len());
            let mut t = String::new();
            let mut tag = false;
            for c in rest[..end].chars() {
                match c {
                    '<' => tag = true,
                    '>' => {
                        tag = false;
                        t.push(' ');
                    }
                    c if !tag => t.push(c),
                    _ => {}
                }
            }
            t.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace("&gt;", ">")
                .replace("&lt;", "<")
                .replace("&quot;", "\"")
                .replace("&amp;", "&")
        })
        .collect()
}

fn artifacts() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&d).expect("artifact dir");
    d
}

/// Polls `malla flows -o json` until both flows are recorded (10 s).
fn wait_both(lab: &Lab) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = lab.run(&["flows", "-o", "json", "--port", "8080"]);
        let f: Vec<Value> = serde_json::from_str(&out).expect("json");
        let has = |v: &str, to: &str| {
            f.iter()
                .any(|x| x["verdict"] == v && x["dst"]["name"] == to)
        };
        if (has("allowed", "web") && has("denied", "db")) || Instant::now() > deadline {
            return f;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_flow_page_shows_verdicts_policies_and_traces_in_chromium() {
    assert!(
        Command::new("chromium")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "chromium is not installed (scripts/deps installs Debian's chromium)"
    );
    let lab = Lab::new(&common::malla_bin(), "ui");
    lab.run(&["lab", "up", "--nodes", "2"]);
    lab.apply(&manifests());
    let to = |pod: &str| {
        lab.probe(&[
            "--from",
            "default/client",
            "--to",
            pod,
            "--port",
            "8080",
            "--protocol",
            "tcp",
        ])
    };
    let web = to("default/web");
    assert!(web.iter().all(|r| r["connected"] == true), "{web:?}");
    let db = to("default/db");
    assert!(db.iter().all(|r| r["connected"] == false), "{db:?}");
    let recorded = wait_both(&lab);

    let ui = Ui::start(&lab);
    let profile = tempfile::tempdir().expect("profile dir");
    let shots = artifacts();

    // 1. The whole page: both flows in the table, both edges in the graph.
    let dom = chromium(profile.path(), &ui.url, "--dump-dom");
    let rows = |v: &str| texts(&dom, &format!("<tr data-verdict=\"{v}\""), "</tr>");
    let allowed = rows("allowed");
    let denied = rows("denied");
    let allowed_web: Vec<_> = allowed
        .iter()
        .filter(|r| r.contains("default/client default/web 8080/tcp"))
        .collect();
    assert!(
        !allowed_web.is_empty(),
        "no allowed client → web row; rows {allowed:?} {denied:?}; agents said {recorded:#?}"
    );
    // web's node names the rule that let it in (client's node saw it leave: no egress policy).
    let on_web_node: Vec<_> = allowed_web
        .iter()
        .filter(|r| r.contains(" node-2 "))
        .collect();
    assert!(
        !on_web_node.is_empty(),
        "no row from web's node: {allowed_web:?}"
    );
    for r in &on_web_node {
        assert!(r.contains("allowed default/web-allow ingress[0]"), "{r}");
    }
    let denied_db: Vec<_> = denied
        .iter()
        .filter(|r| r.contains("default/client default/db 8080/tcp"))
        .collect();
    assert!(
        !denied_db.is_empty(),
        "no denied client → db row: {denied:?}"
    );
    for r in &denied_db {
        assert!(r.contains("denied default/db-deny ingress"), "{r}");
    }
    assert!(
        dom.contains(
            "data-from=\"default/client\" data-to=\"default/web\" data-verdict=\"allowed\""
        ),
        "no allowed edge client → web in the graph"
    );
    assert!(
        dom.contains("data-from=\"default/client\" data-to=\"default/db\" data-verdict=\"denied\""),
        "no denied edge client → db in the graph"
    );
    // client's node passed the denied connection out; the graph shows its outcome only.
    assert!(
        !dom.contains(
            "data-from=\"default/client\" data-to=\"default/db\" data-verdict=\"allowed\""
        ),
        "the denied connection has an allowed edge"
    );
    assert!(
        dom.contains("data-namespace=\"default\""),
        "no namespace box"
    );
    chromium(
        profile.path(),
        &ui.url,
        &format!("--screenshot={}", shots.join("flows.png").display()),
    );

    // 2. Filtered to denied flows, the first row opened: its policy trace, command and result.
    let url = format!("{}?verdict=denied&open=0", ui.url);
    let dom = chromium(profile.path(), &url, "--dump-dom");
    assert!(
        texts(&dom, "<tr data-verdict=\"allowed\"", "</tr>").is_empty(),
        "the verdict filter let an allowed flow through"
    );
    let command = texts(&dom, "<code id=\"trace-command\"", "</code>");
    assert_eq!(
        command,
        ["malla policy trace default/client default/db --port 8080 --protocol TCP"],
        "{dom}"
    );
    let result = texts(&dom, "<pre id=\"trace-output\"", "</pre>").join(" ");
    assert!(
        result.contains("default/client -> default/db tcp/8080: DENIED")
            && result.contains("db-deny"),
        "the trace's result: {result}"
    );
    assert!(
        dom.contains("data-state=\"done\""),
        "the trace did not finish"
    );
    chromium(
        profile.path(),
        &url,
        &format!("--screenshot={}", shots.join("denied-trace.png").display()),
    );
    for s in ["flows.png", "denied-trace.png"] {
        let len = std::fs::metadata(shots.join(s)).map_or(0, |m| m.len());
        assert!(len > 10_000, "{s}: {len} bytes");
    }
    eprintln!("screenshots in {}", shots.display());

    // 3. A bad filter is refused naming it, on the page.
    let dom = chromium(
        profile.path(),
        &format!("{}?port=http", ui.url),
        "--dump-dom",
    );
    let errors = texts(&dom, "<div id=\"errors\"", "</div>").join(" ");
    assert!(errors.contains("port"), "{errors}");
}
