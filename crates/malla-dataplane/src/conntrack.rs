//! Conntrack through the `conntrack` tool, in the calling thread's namespace: cleanup (when a
//! UDP endpoint goes away, its flows must not keep being sent to it; UDP has no connection to
//! fail), as kube-proxy does, and the list of translated flows `malla services` counts per
//! endpoint.

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

/// A tracked flow whose destination was translated: where the client sent it, and who answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnatFlow {
    /// `tcp`, `udp`, `sctp`.
    pub protocol: String,
    pub orig_dst: IpAddr,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

/// One line of `conntrack -L`: `tcp 6 117 TIME_WAIT src=… dst=… sport=… dport=… src=… dst=…
/// sport=… dport=… [ASSURED] …` (the second tuple is the reply). None for a flow that was not
/// DNATed (it is answered by its original destination) or a line of another shape.
pub fn parse_dnat_flow(line: &str) -> Option<DnatFlow> {
    let mut words = line.split_whitespace();
    let protocol = words.next()?.to_string();
    let mut values: Vec<(&str, &str)> = Vec::new();
    for w in words {
        if let Some((k, v)) = w.split_once('=') {
            values.push((k, v));
        }
    }
    let nth = |key: &str, n: usize| {
        values
            .iter()
            .filter(|(k, _)| *k == key)
            .nth(n)
            .map(|(_, v)| *v)
    };
    let flow = DnatFlow {
        protocol,
        orig_dst: nth("dst", 0)?.parse().ok()?,
        orig_dport: nth("dport", 0)?.parse().ok()?,
        reply_src: nth("src", 1)?.parse().ok()?,
        reply_sport: nth("sport", 1)?.parse().ok()?,
    };
    (flow.reply_src != flow.orig_dst || flow.reply_sport != flow.orig_dport).then_some(flow)
}

/// The DNATed flows of both families the kernel tracks, in the calling thread's namespace.
pub fn dnat_flows() -> std::io::Result<Vec<DnatFlow>> {
    let mut flows = Vec::new();
    for family in ["ipv4", "ipv6"] {
        let out = Command::new("conntrack")
            .args(["-L", "-f", family])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        flows.extend(text.lines().filter_map(parse_dnat_flow));
    }
    Ok(flows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_translated_flow_names_its_frontend_and_endpoint() {
        let line = "tcp      6 117 TIME_WAIT src=198.18.0.2 dst=198.19.64.10 sport=40000 \
                    dport=80 src=198.18.0.65 dst=198.18.0.2 sport=8080 dport=40000 [ASSURED] \
                    mark=0 use=1";
        assert_eq!(
            parse_dnat_flow(line),
            Some(DnatFlow {
                protocol: "tcp".into(),
                orig_dst: "198.19.64.10".parse().unwrap(),
                orig_dport: 80,
                reply_src: "198.18.0.65".parse().unwrap(),
                reply_sport: 8080,
            })
        );
        let udp6 = "udp      17 29 src=fd00::2 dst=fd00:96::16 sport=5000 dport=53 [UNREPLIED] \
                    src=fd00::45 dst=fd00::2 sport=5353 dport=5000 mark=0 use=1";
        assert_eq!(parse_dnat_flow(udp6).unwrap().reply_sport, 5353);
    }

    #[test]
    fn an_untranslated_flow_or_other_text_is_not_one() {
        let direct = "tcp 6 117 TIME_WAIT src=198.18.0.2 dst=198.18.0.65 sport=40000 dport=8080 \
                      src=198.18.0.65 dst=198.18.0.2 sport=8080 dport=40000 [ASSURED] use=1";
        assert_eq!(parse_dnat_flow(direct), None);
        assert_eq!(
            parse_dnat_flow("conntrack v1.4.7 (conntrack-tools): 3 flow entries"),
            None
        );
        assert_eq!(parse_dnat_flow(""), None);
    }
}
