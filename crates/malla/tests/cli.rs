//! kubectl's habits on the command line (issue 19): `-o table|wide|json|yaml` on every data
//! command (YAML equal to JSON, anything else refused), camelCase keys in every JSON output,
//! `-f FILE|DIR|-` (repeatable), `lab get` of every kind, global flags before and after the
//! subcommand, `MALLA_DATASTORE`, `--version` on every binary, completion scripts, exit codes,
//! filters that match nothing. The lab checks share one lab (one test) to keep CI short.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::Lab;
use serde_json::Value;

fn malla() -> Command {
    Command::new(common::malla_bin())
}

fn cni_bin() -> PathBuf {
    common::malla_bin().with_file_name("malla-cni")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The sample app, as `lab demo` and the docs use it.
fn shop_yaml() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop.yaml")
}

/// Keys that hold user data (labels, selectors, `ip:port` maps), not field names.
const MAP_KEYS: [&str; 5] = [
    "labels",
    "matchLabels",
    "selector",
    "connections",
    "annotations",
];

/// Every object key in `v` is camelCase (`^[a-z][A-Za-z0-9]*$`), apart from user maps.
fn assert_camel_case(v: &Value, path: &str, what: &str) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                assert!(
                    k.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                        && k.chars().all(|c| c.is_ascii_alphanumeric()),
                    "{what}: key {path}.{k} is not camelCase"
                );
                if !MAP_KEYS.contains(&k.as_str()) {
                    assert_camel_case(child, &format!("{path}.{k}"), what);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                assert_camel_case(x, &format!("{path}[{i}]"), what);
            }
        }
        _ => {}
    }
}

/// Every command that prints data, as argument lists (without `-o`).
fn data_commands() -> Vec<Vec<&'static str>> {
    vec![
        vec!["ipam", "show"],
        vec!["services", "--node", "node-1"],
        vec!["policy", "trace", "--all"],
        vec!["lab", "get", "nodes"],
        vec!["lab", "get", "pods"],
        vec!["lab", "get", "services"],
        vec!["lab", "get", "endpointslices"],
        vec!["lab", "get", "networkpolicies"],
        vec!["lab", "probe", "--from", "shop/api", "--to", "shop/cache"],
        vec!["status"],
    ]
}

#[test]
fn every_binary_prints_its_version() {
    let out = malla().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(text(&out).0.starts_with("malla "), "{:?}", text(&out));
    let out = malla().args(["lab", "--version"]).output().unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    // Run by hand, outside a runtime (no CNI_COMMAND): a version, not a CNI error.
    let out = Command::new(cni_bin())
        .arg("--version")
        .env_remove("CNI_COMMAND")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).0.starts_with("malla-cni "), "{:?}", text(&out));
}

#[test]
fn completion_scripts_generate() {
    for shell in ["bash", "zsh", "fish"] {
        let out = malla().args(["completion", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {:?}", text(&out));
        let script = text(&out).0;
        for word in ["lab", "probe", "ipam", "datastore", "networkpolicies"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
    }
    // The bash script is valid bash.
    let out = malla().args(["completion", "bash"]).output().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("malla.bash");
    std::fs::write(&f, &out.stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&f).output().unwrap();
    assert!(check.status.success(), "{:?}", text(&check));
    let out = malla().args(["completion", "tcsh-ish"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_invalid_output_format_is_refused_everywhere() {
    for cmd in data_commands() {
        let out = malla().args(&cmd).args(["-o", "foo"]).output().unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "{cmd:?} printed {stdout}");
        assert!(
            stderr.contains("'foo'") && stderr.contains("table, wide, json, yaml"),
            "{cmd:?}: {stderr}"
        );
    }
}

#[test]
fn exit_codes_are_documented() {
    let out = malla().arg("--help").output().unwrap();
    let help = text(&out).0;
    for line in [
        "Exit status:",
        "  0 ",
        "  1 ",
        "  2 ",
        "  3 ",
        "MALLA_DATASTORE",
    ] {
        assert!(help.contains(line), "--help lacks {line:?}:\n{help}");
    }
    let out = malla().args(["lab", "probe", "--help"]).output().unwrap();
    assert!(text(&out).0.contains("Exit status"), "{:?}", text(&out));
}

#[test]
fn global_flags_go_before_or_after_the_subcommand() {
    let state = tempfile::tempdir().unwrap();
    for args in [
        vec!["--lab", "nolab", "ipam", "show"],
        vec!["ipam", "show", "--lab", "nolab"],
        vec!["--lab", "nolab", "lab", "get", "pods"],
        vec!["lab", "--lab", "nolab", "get", "pods"],
        vec!["lab", "get", "pods", "--lab", "nolab"],
    ] {
        let out = malla()
            .args(&args)
            .env("MALLA_LAB_STATE_DIR", state.path())
            .env_remove("MALLA_LAB")
            .env_remove("MALLA_DATASTORE")
            .output()
            .unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("lab \"nolab\" is not up (run `malla lab up --lab nolab`)"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn malla_datastore_selects_the_datastore() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    // A datastore of its own, no lab at all: MALLA_DATASTORE alone decides where to read.
    let out = malla()
        .args(["ipam", "show", "-o", "json"])
        .env("MALLA_DATASTORE", &db)
        .env("MALLA_LAB_STATE_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pools"], serde_json::json!([]));
    assert!(db.exists(), "the store file was not opened");
    // A malformed one is refused, naming the flag.
    let out = malla()
        .args(["ipam", "show"])
        .env("MALLA_DATASTORE", "etcd://")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("--datastore"), "{:?}", text(&out));
}

/// One lab for every check that needs one.
#[test]
fn kubectl_habits_on_a_lab() {
    let lab = Lab::new(&common::malla_bin(), "cli");
    lab.run(&["lab", "up", "--nodes", "3"]);

    // `-f -`: the namespace and pods from stdin; then a directory and a file, repeated `-f`.
    let shop = std::fs::read_to_string(shop_yaml()).unwrap();
    let (pods_part, rest) = shop.split_at(shop.find("kind: Service").unwrap());
    let pods_part = &pods_part[..pods_part.rfind("---").unwrap()];
    let mut child = lab
        .cmd()
        .args(["lab", "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pods_part.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "apply -f -: {stdout}{stderr}");
    assert!(stdout.contains("pod/shop/api-2 created"), "{stdout}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("10-services.yaml"),
        format!("apiVersion: v1\n{rest}"),
    )
    .unwrap();
    std::fs::write(dir.path().join("README.txt"), "not a manifest").unwrap();
    let out = lab.run(&[
        "lab",
        "apply",
        "-f",
        dir.path().to_str().unwrap(),
        "-f",
        shop_yaml().to_str().unwrap(),
    ]);
    assert!(out.contains("service/shop/api created"), "{out}");
    assert!(
        out.contains("networkpolicy/shop/cache-from-api created"),
        "{out}"
    );
    assert!(out.contains("pod/shop/web unchanged"), "{out}");
    // A missing file is an error naming it, and nothing is applied.
    let out = lab.try_run(&[
        "lab",
        "apply",
        "-f",
        shop_yaml().to_str().unwrap(),
        "-f",
        "/nonexistent.yaml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("-f /nonexistent.yaml: No such file"),
        "{:?}",
        text(&out)
    );
    assert!(!text(&out).1.contains("os error"), "{:?}", text(&out));

    // `get` of every kind: names in the table, the same objects in JSON and YAML.
    let expect = [
        ("nodes", "node-3"),
        ("pods", "api-2"),
        ("services", "198.19."),
        ("endpointslices", "api-ipv4-1"),
        ("networkpolicies", "cache-from-api"),
    ];
    for (kind, name) in expect {
        let table = lab.run(&["lab", "get", kind]);
        assert!(
            table.lines().next().unwrap().starts_with("NAME"),
            "{kind}: {table}"
        );
        assert!(table.contains(name), "{kind}: {table}");
        let wide = lab.run(&["lab", "get", kind, "-o", "wide"]);
        assert!(wide.contains(name), "{kind}: {wide}");
    }
    let svcs: Value = serde_json::from_str(&lab.run(&["lab", "get", "svc", "-o", "json"])).unwrap();
    assert_eq!(svcs.as_array().unwrap().len(), 2, "{svcs}");
    assert_eq!(svcs[1]["type"], "NodePort", "{svcs}");
    let nodes: Value =
        serde_json::from_str(&lab.run(&["lab", "get", "nodes", "-o", "json"])).unwrap();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["agentRunning"] == true),
        "{nodes}"
    );

    // Every data command: YAML is the JSON document, and every JSON key is camelCase.
    for cmd in data_commands() {
        let run = |o: &str| {
            let out = lab.try_run(&[cmd.as_slice(), &["-o", o]].concat());
            assert!(out.status.success(), "{cmd:?} -o {o}: {:?}", text(&out));
            text(&out).0
        };
        let json: Value =
            serde_json::from_str(&run("json")).unwrap_or_else(|e| panic!("{cmd:?} -o json: {e}"));
        let yaml: Value =
            serde_yaml::from_str(&run("yaml")).unwrap_or_else(|e| panic!("{cmd:?} -o yaml: {e}"));
        assert_eq!(json, yaml, "{cmd:?}: YAML and JSON differ");
        assert_camel_case(&json, "", &format!("{cmd:?}"));
        assert!(!run("table").is_empty(), "{cmd:?}");
        assert!(!run("wide").is_empty(), "{cmd:?}");
    }

    // Probe: the table shows who answered; a filter that matches nothing names itself; a
    // policy denial exits 3 with the cause in words.
    let table = lab.run(&["lab", "probe", "--from", "shop/api", "--to", "shop/cache"]);
    assert!(
        table.contains("ANSWERED BY") && table.contains("shop/cache"),
        "{table}"
    );
    for (flag, value) in [("--from", "shop/nope"), ("--to", "svc/shop/nope")] {
        let out = lab.try_run(&["lab", "probe", flag, value]);
        assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
        assert!(
            text(&out)
                .1
                .contains(&format!("{flag} \"{value}\" matches no")),
            "{:?}",
            text(&out)
        );
    }
    let out = lab.try_run(&["lab", "probe", "--from", "shop/web", "--port", "9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out)
            .1
            .contains("--from shop/web --port 9 together match no probe"),
        "{:?}",
        text(&out)
    );
    let out = lab.try_run(&[
        "lab",
        "probe",
        "--from",
        "shop/cache",
        "--to",
        "shop/api",
        "--timeout-ms",
        "300",
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("denied"), "{stdout}");
    assert!(!stdout.contains("os error"), "{stdout}");
    assert!(stdout.contains("no answer within 300 ms"), "{stdout}");

    // The demo on this lab (same shape: `up` is a no-op, the app is already there): its matrix
    // tells the policy's intended denials from failures, and its next commands name the lab.
    let out = lab.run(&["lab", "demo", "--nodes", "3"]);
    let row = |from: &str| {
        out.lines()
            .find(|l| l.starts_with(from))
            .unwrap_or_else(|| panic!("no row {from}: {out}"))
            .to_string()
    };
    assert!(row("shop/web").contains("denied"), "{out}");
    assert!(row("shop/web").contains("ok/denied"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(
        out.contains(" denied by NetworkPolicy as intended, 0 failed"),
        "{out}"
    );
    assert!(
        out.contains(&format!("`malla lab down --lab {}`", lab.name)),
        "{out}"
    );

    // A failure no policy explains reads FAIL, in words: the cache's server stopped (last,
    // since it changes the lab).
    let pid = lab.state()["pods"]["shop/cache"]["probe_pid"]
        .as_i64()
        .unwrap();
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = lab.try_run(&["lab", "probe", "--from", "shop/api", "--to", "shop/cache"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("FAIL") && stdout.contains("connection refused"),
        "{stdout}"
    );

    // status: every node healthy, with what it programmed.
    let status: Value = serde_json::from_str(&lab.run(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["healthy"], true, "{status}");
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{status}");
    for n in nodes {
        for k in [
            "agentRunning",
            "healthy",
            "ready",
            "inSync",
            "datastoreReachable",
        ] {
            assert_eq!(n[k], true, "{k}: {n}");
        }
        assert!(n["programmed"]["routes"].as_u64().unwrap() >= 2, "{n}");
    }
    let table = lab.run(&["status"]);
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("node-") && l.contains(" running "))
            .count(),
        3,
        "{table}"
    );

    // diags: one archive with every part.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("d.tar.gz");
    lab.run(&["diags", "--out", archive.to_str().unwrap()]);
    let list = Command::new("tar")
        .arg("tzf")
        .arg(&archive)
        .output()
        .unwrap();
    let list = text(&list).0;
    for part in [
        "/versions.txt",
        "/config/lab.json",
        "/config/node-1/10-malla.conflist",
        "/logs/agent-node-1.log",
        "/nodes/node-2/nft.txt",
        "/nodes/node-2/routes.txt",
        "/nodes/node-2/links.txt",
        "/nodes/node-2/metrics.txt",
        "/datastore.txt",
        "/status.json",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(part)),
            "{part} missing:\n{list}"
        );
    }
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    assert!(Command::new("tar")
        .arg("xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap()
        .success());
    let top = std::fs::read_dir(&x)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let read = |p: &str| std::fs::read_to_string(top.join(p)).unwrap();
    assert!(
        read("versions.txt").contains("malla-cni "),
        "{}",
        read("versions.txt")
    );
    assert!(read("nodes/node-2/nft.txt").contains("table inet malla"));
    assert!(read("nodes/node-2/routes.txt").contains("198.18."));
    assert!(read("nodes/node-2/links.txt").contains("ul0"));
    assert!(
        read("datastore.txt").contains("/malla/pods"),
        "{}",
        read("datastore.txt")
    );
    assert!(
        !std::fs::read_to_string(lab.dir().join("logs/agent-node-1.log"))
            .unwrap()
            .contains('\u{1b}'),
        "colour codes in the agent's log file"
    );

    // An agent stopped: status says which node and exits 3.
    let pid = lab.state()["nodes"][1]["agent_pid"].as_i64().unwrap();
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = lab.try_run(&["status"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    let row = stdout.lines().find(|l| l.starts_with("node-2")).unwrap();
    assert!(row.contains("STOPPED") && row.contains(" NO "), "{stdout}");
    assert!(stdout.contains("not healthy"), "{stdout}");
    let status: Value =
        serde_json::from_slice(&lab.try_run(&["status", "-o", "json"]).stdout).unwrap();
    assert_eq!(status["healthy"], false);
    assert_eq!(status["nodes"][1]["agentRunning"], false);
    assert_eq!(status["nodes"][0]["agentRunning"], true);
}

/// `--log-format json` (here through MALLA_LOG_FORMAT, which the lab's agents inherit): every
/// line of the agent's log is a JSON object, and none carries colour codes.
#[test]
fn agent_logs_switch_to_json() {
    let lab = Lab::new(&common::malla_bin(), "log");
    let out = lab
        .cmd()
        .args(["lab", "up", "--nodes", "1"])
        .env("MALLA_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let log = lab.dir().join("logs/agent-node-1.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty(), "{} is empty", log.display());
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    assert!(!text.contains('\u{1b}'), "colour codes: {text}");
    // A format that does not exist is refused before anything runs.
    let out = malla()
        .args(["--log-format", "xml", "lab", "get", "pods"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
