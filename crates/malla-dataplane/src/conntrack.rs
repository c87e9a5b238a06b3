//! Conntrack cleanup: when a UDP endpoint goes away, its flows must not keep being sent to it
//! (UDP has no connection to fail). Deletes the entries with the `conntrack` tool, in the
//! calling thread's namespace, as kube-proxy does.

use std::net::IpAddr;
use std::process::Command;

/// Deletes UDP conntrack entries that were DNATed to `endpoint`, optionally only those whose
/// original destination was `frontend:port` (a ClusterIP) or any address on `port` (a node port).
/// Returns how many entries were deleted.
pub fn delete_udp_flows(
    frontend: Option<IpAddr>,
    port: u16,
    endpoint: IpAddr,
) -> std::io::Result<usize> {
    let mut cmd = Command::new("conntrack");
    cmd.args(["-D", "-p", "udp"]);
    if endpoint.is_ipv6() {
        cmd.args(["-f", "ipv6"]);
    }
    if let Some(f) = frontend {
        cmd.arg("--orig-dst").arg(f.to_string());
    }
    cmd.arg("--orig-port-dst").arg(port.to_string());
    cmd.arg("--dst-nat").arg(endpoint.to_string());
    let out = cmd.output()?;
    // conntrack exits 1 when nothing matched; its summary goes to stderr.
    let text = String::from_utf8_lossy(&out.stderr);
    let deleted = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1].starts_with("flow"))
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0);
    Ok(deleted)
}
