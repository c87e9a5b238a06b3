//! Staged policies in a 2-node lab, real kernel (issue 15 item 4): a
//! `StagedGlobalNetworkPolicy` denying all ingress to `web` is evaluated on real traffic and
//! never enforced: every connection the test makes to web succeeds, and `malla policy staged
//! -o json` shows exactly those connections as would-deny, put down to the staged policy's tier
//! end; `malla flows` carries the same staged verdict. A `StagedKubernetesNetworkPolicy` with
//! `stagedAction: Delete` of the enforced policy isolating `db` shows db's denied connection
//! as would-allow while it stays denied. A malformed staged policy is refused with the field
//! named, and nothing of its manifest is applied.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::Lab;
use malla_dataplane::netns::NetNs;
use serde_json::Value;

fn manifests() -> String {
    let pod = common::http_pod;
    let mut y = pod("client", "node-1") + &pod("web", "node-2") + &pod("other", "node-2");
    y += &pod("db", "node-2");
    y.push_str(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-deny}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n\
         ---\napiVersion: projectcalico.org/v3\nkind: StagedGlobalNetworkPolicy\nmetadata: {name: web-deny-all}\nspec:\n  stagedAction: Set\n  selector: app == 'web'\n  types: [Ingress]\n\
         ---\napiVersion: projectcalico.org/v3\nkind: StagedKubernetesNetworkPolicy\nmetadata: {name: db-deny, namespace: default}\nspec:\n  stagedAction: Delete\n  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n",
    );
    y
}

fn connect(netns: &str, to: SocketAddr) -> bool {
    NetNs::open_named(netns)
        .unwrap()
        .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(700)).is_ok())
        .unwrap()
}

fn staged(lab: &Lab) -> Vec<Value> {
    let out = lab.run(&["policy", "staged", "-o", "json"]);
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
        .as_array()
        .cloned()
        .expect("an array")
}

/// (from, to, enforced, staged) → count, of one staged rule's connections.
fn connections(e: &Value) -> BTreeMap<(String, String, String, String), u64> {
    e["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (
                (s("from"), s("to"), s("enforced"), s("staged")),
                c["count"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn staged_policies_show_what_they_would_do_and_enforce_nothing() {
    let lab = Lab::new(&common::malla_bin(), "stg");
    lab.run(&["lab", "up", "--nodes", "2"]);

    // Malformed: refused naming the field; the good documents beside it are not applied.
    let bad = common::http_pod("early", "node-1")
        + "---\napiVersion: projectcalico.org/v3\nkind: StagedGlobalNetworkPolicy\nmetadata: {name: bad}\nspec:\n  stagedAction: Enforce\n  selector: all()\n";
    let f = std::env::temp_dir().join(format!("malla-stg-bad-{}.yaml", std::process::id()));
    std::fs::write(&f, bad).unwrap();
    let out = lab.try_run(&["lab", "apply", "-f", f.to_str().unwrap()]);
    let _ = std::fs::remove_file(&f);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad stagedAction was accepted");
    assert!(
        err.contains("document 2") && err.contains("spec.stagedAction"),
        "{err}"
    );
    assert!(lab.state()["pods"].get("default/early").is_none());

    lab.apply(&manifests());
    let state = lab.state();
    let ip = |p: &str| state["pods"][p]["ips"][0].as_str().unwrap().to_string();
    let web: SocketAddr = format!("{}:8080", ip("default/web")).parse().unwrap();
    let db: SocketAddr = format!("{}:8080", ip("default/db")).parse().unwrap();

    // Enforced: web is open to everyone, db is closed; the staged policies change nothing.
    let (client, other) = (
        lab.netns("pod-default-client"),
        lab.netns("pod-default-other"),
    );
    let mut made = 0;
    for _ in 0..3 {
        assert!(connect(&client, web), "client -> web refused");
        made += 1;
    }
    for _ in 0..2 {
        assert!(connect(&other, web), "other -> web refused");
        made += 1;
    }
    assert!(!connect(&client, db), "client -> db should stay denied");

    // What the staged policies would have done, from the agents' flow records.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (deny_all, delete) = loop {
        let effects = staged(&lab);
        let find = |policy: &str| {
            effects
                .iter()
                .find(|e| e["policy"].as_str() == Some(policy))
                .cloned()
        };
        let deny_all = find("staged:web-deny-all");
        let delete = effects
            .iter()
            .find(|e| e["wouldAllow"].as_u64().unwrap_or(0) > 0)
            .cloned();
        let done = deny_all
            .as_ref()
            .is_some_and(|e| e["wouldDeny"].as_u64() == Some(made))
            && delete.is_some();
        if done || Instant::now() > deadline {
            break (deny_all, delete);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let deny_all = deny_all.expect("the staged deny-all's effect");
    assert_eq!(deny_all["rule"], "ingress[end of tier]", "{deny_all}");
    assert_eq!(deny_all["wouldDeny"].as_u64(), Some(made), "{deny_all}");
    assert_eq!(deny_all["wouldAllow"].as_u64(), Some(0), "{deny_all}");
    let want: BTreeMap<_, _> = [
        (("default/client", "default/web"), 3u64),
        (("default/other", "default/web"), 2u64),
    ]
    .into_iter()
    .map(|((f, t), n)| {
        (
            (
                f.to_string(),
                t.to_string(),
                "allowed".to_string(),
                "would-deny".to_string(),
            ),
            n,
        )
    })
    .collect();
    assert_eq!(connections(&deny_all), want, "{deny_all}");

    // The Delete of db-deny: db's denied connection would be allowed.
    let delete = delete.expect("the staged delete's effect");
    let got = connections(&delete);
    assert_eq!(
        got.get(&(
            "default/client".to_string(),
            "default/db".to_string(),
            "denied".to_string(),
            "would-allow".to_string()
        )),
        Some(&1),
        "{delete}"
    );

    // The trace shows the staged verdict beside the enforced one, for each probed pair.
    for (from, to, enforced, would) in [
        ("default/client", "default/web", true, false),
        ("default/client", "default/db", false, true),
    ] {
        let out = lab.run(&["policy", "trace", from, to, "--port", "8080", "-o", "json"]);
        let t: Value = serde_json::from_str(&out).expect("json");
        let t = &t[0];
        assert_eq!(t["allowed"], enforced, "{t}");
        assert_eq!(t["staged"]["ingress"]["allowed"], would, "{t}");
        assert!(t["staged"].get("egress").is_none(), "{t}");
    }
    let text = lab.run(&[
        "policy",
        "trace",
        "default/client",
        "default/web",
        "--port",
        "8080",
    ]);
    assert!(
        text.contains("staged, ingress: would DENY by staged:web-deny-all ingress[end of tier]"),
        "{text}"
    );

    // The same verdict in `malla flows`, filtered by the staged policy.
    let out = lab.run(&["flows", "-o", "json", "--policy", "staged:web-deny-all"]);
    let flows: Value = serde_json::from_str(&out).expect("json");
    let flows = flows.as_array().expect("array");
    assert!(!flows.is_empty(), "{out}");
    for f in flows {
        assert_eq!(f["verdict"], "allowed", "{f}");
        assert_eq!(
            f["staged"][0], "would-deny staged:web-deny-all ingress[end of tier]",
            "{f}"
        );
    }

    // Removing the staged policies removes their pending chains: nothing more is counted.
    lab.apply_delete(
        "apiVersion: projectcalico.org/v3\nkind: StagedGlobalNetworkPolicy\nmetadata: {name: web-deny-all}\nspec:\n  selector: app == 'web'\n  types: [Ingress]\n",
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(connect(&client, web));
    std::thread::sleep(Duration::from_secs(2));
    let after = staged(&lab);
    let n = after
        .iter()
        .find(|e| e["policy"] == "staged:web-deny-all")
        .and_then(|e| e["wouldDeny"].as_u64());
    assert_eq!(
        n,
        Some(made),
        "counted after the staged policy went: {after:?}"
    );
}
