//! Test helpers: golden files and the `nft -c` check.

use std::path::PathBuf;
use std::process::Command;

/// Compares `got` with the golden file `testdata/<name>` (its content is `want`); with
/// `MALLA_UPDATE_GOLDEN=1` rewrites the file instead.
pub fn golden(name: &str, got: &str, want: &str) {
    if std::env::var_os("MALLA_UPDATE_GOLDEN").is_some() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name);
        std::fs::write(&p, got).expect("writing golden file");
        return;
    }
    assert_eq!(
        got, want,
        "golden testdata/{name} differs (MALLA_UPDATE_GOLDEN=1 rewrites it)"
    );
}

/// Runs `nft -c -f` (check only, nothing applied) on `text`. Returns `None` when the check
/// cannot run here (no `nft`, not root), else the result.
pub fn nft_check(text: &str) -> Option<Result<(), String>> {
    let euid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&euid.stdout).trim() != "0" {
        eprintln!("skipping nft -c: not root");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("malla-calc-nft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let file = dir.join(format!("check-{}.nft", fnv(text)));
    std::fs::write(&file, text).ok()?;
    let out = match Command::new("nft").arg("-c").arg("-f").arg(&file).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipping nft -c: {e}");
            return None;
        }
    };
    let _ = std::fs::remove_file(&file);
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Applies `rulesets` one after the other with `nft -f`, in a network namespace of their own
/// (`unshare -n`: private to the command, gone with it). Returns `None` when that cannot run
/// here (no `unshare`, not root), else whether every ruleset applied, with nft's complaint.
pub fn nft_apply_in_private_netns(rulesets: &[String]) -> Option<Result<(), String>> {
    let dir = std::env::temp_dir().join(format!(
        "malla-calc-netns-{}-{}",
        std::process::id(),
        fnv(&rulesets.concat())
    ));
    std::fs::create_dir_all(&dir).ok()?;
    let mut script = String::from("set -e");
    for (i, text) in rulesets.iter().enumerate() {
        let file = dir.join(format!("{i}.nft"));
        std::fs::write(&file, text).ok()?;
        script.push_str(&format!("; nft -f {}", file.display()));
    }
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipping: unshare: {e}");
            return None;
        }
    };
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() && err.contains("unshare failed") {
        eprintln!("skipping: {err}");
        return None;
    }
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(err)
    })
}

/// A node with its underlay addresses (and its VTEP MAC derived from its name).
pub fn node(name: &str, v4: &str, v6: Option<&str>) -> malla_api::Node {
    malla_api::Node {
        name: name.into(),
        underlay_ipv4: Some(v4.parse().unwrap()),
        underlay_ipv6: v6.map(|s| s.parse().unwrap()),
        underlay_mtu: 1500,
        vtep_mac: malla_api::format_mac(&malla_api::mac_from_name(name)),
    }
}

/// A pod on `node` with the one address `ip`.
pub fn ep(node: &str, ip: &str) -> malla_api::WorkloadEndpoint {
    malla_api::WorkloadEndpoint {
        namespace: "default".into(),
        pod: format!("p-{ip}"),
        node: node.into(),
        container_id: ip.into(),
        ifname: "eth0".into(),
        host_ifname: format!("mla{ip}"),
        ips: vec![ipnet::IpNet::from(ip.parse::<std::net::IpAddr>().unwrap())],
        mac: "02:00:00:00:00:01".into(),
        ipam_handle: ip.into(),
    }
}
