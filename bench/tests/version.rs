//! Every benchmark binary answers `--version` (as every Malla binary does).

use std::process::Command;

#[test]
fn every_benchmark_prints_its_version() {
    for (name, exe) in [
        ("cni-latency", env!("CARGO_BIN_EXE_cni-latency")),
        ("throughput", env!("CARGO_BIN_EXE_throughput")),
        ("ctr-start", env!("CARGO_BIN_EXE_ctr-start")),
        ("services-bench", env!("CARGO_BIN_EXE_services-bench")),
        ("policy-bench", env!("CARGO_BIN_EXE_policy-bench")),
        ("datastore-scale", env!("CARGO_BIN_EXE_datastore-scale")),
        ("kube-proxy-bench", env!("CARGO_BIN_EXE_kube-proxy-bench")),
    ] {
        let out = Command::new(exe).arg("--version").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {out:?}");
        assert!(stdout.starts_with(&format!("{name} ")), "{name}: {stdout}");
    }
}
