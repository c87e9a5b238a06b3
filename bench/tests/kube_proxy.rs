//! `kube-proxy-bench` end to end at 10 Services (~25 s): a real kube-proxy v1.20 in a lab
//! node's namespace serves the lab's Services while Malla's agent runs with `--no-services`,
//! and the machine-wide settings are unchanged afterwards. Needs root, the lab's binaries
//! (`cargo build --workspace --bins`) and `scripts/k8s-control-plane`'s cache.

use std::process::Command;

#[test]
fn kube_proxy_serves_the_labs_services_and_leaves_the_machine_alone() {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-proxy-bench"))
        .args([
            "--sizes",
            "10",
            "--endpoints",
            "2",
            "--creations",
            "1",
            "--connections",
            "100",
            "--program-timeout",
            "60",
            "--max-seconds",
            "300",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("machine-wide settings unchanged"),
        "{stdout}"
    );
    // A row for each proxy: it programmed the fresh Service and the new one, answered the
    // connections, and has an RSS.
    for proxy in ["Malla", "kube-proxy"] {
        let row = stdout
            .lines()
            .find(|l| {
                l.starts_with(&format!("{proxy} ")) && l.split_whitespace().nth(1) == Some("10")
            })
            .unwrap_or_else(|| panic!("no {proxy} row: {stdout}"));
        assert_eq!(row.split_whitespace().count(), 10, "{row}");
    }
}
