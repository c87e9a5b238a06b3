//! BGP sessions as `birdc show protocols all` reports them (BIRD 2 has no JSON output): one
//! [`Protocol`] per BGP protocol with its state and its routes per channel.

use serde::Serialize;

/// One BGP session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Protocol {
    pub name: String,
    /// BIRD's protocol state (`up`, `start`, `down`, …).
    pub state: String,
    /// Since when, as BIRD prints it.
    pub since: String,
    /// The BGP state (`Established`, `Active`, `Connect`, …) and its last error, if any.
    pub info: String,
    pub description: Option<String>,
    pub neighbor_address: Option<String>,
    pub neighbor_as: Option<u32>,
    /// The session's negotiated hold time and keepalive interval in seconds (BIRD's `Hold
    /// timer: left/hold`), while established.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<u32>,
    /// Per channel (`ipv4`, `ipv6`): routes imported (received and accepted) and exported
    /// (sent).
    pub channels: Vec<Channel>,
}

/// A BGP session's routes in one address family.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Channel {
    pub name: String,
    pub state: String,
    pub imported: u64,
    pub exported: u64,
}

impl Protocol {
    /// Whether the session is established.
    pub fn established(&self) -> bool {
        self.state == "up" && self.info.starts_with("Established")
    }
    /// Routes received and accepted, all families.
    pub fn received(&self) -> u64 {
        self.channels.iter().map(|c| c.imported).sum()
    }
    /// Routes sent, all families.
    pub fn sent(&self) -> u64 {
        self.channels.iter().map(|c| c.exported).sum()
    }
}

/// The BGP protocols in `birdc show protocols all`'s output (other protocols are skipped;
/// lines it does not know are ignored, never a panic).
pub fn parse_protocols(text: &str) -> Vec<Protocol> {
    let mut out: Vec<Protocol> = Vec::new();
    let mut current: Option<Protocol> = None;
    let mut channel: Option<Channel> = None;
    let flush_channel = |p: &mut Option<Protocol>, c: &mut Option<Channel>| {
        if let (Some(p), Some(c)) = (p.as_mut(), c.take()) {
            p.channels.push(c);
        }
    };
    for line in text.lines() {
        if line.starts_with("BIRD ") || line.starts_with("Name ") || line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            flush_channel(&mut current, &mut channel);
            out.extend(current.take());
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[1] != "BGP" {
                continue;
            }
            // `timeformat protocol iso long`: the date and the time are two fields.
            let (since, rest) = if f.len() >= 6 && f[4].contains('-') && f[5].contains(':') {
                (format!("{} {}", f[4], f[5]), &f[6..])
            } else if f.len() >= 5 {
                (f[4].to_string(), &f[5..])
            } else {
                (String::new(), &f[4..])
            };
            current = Some(Protocol {
                name: f[0].to_string(),
                state: f[3].to_string(),
                since,
                info: rest.join(" "),
                ..Protocol::default()
            });
            continue;
        }
        let Some(p) = current.as_mut() else { continue };
        let t = line.trim();
        let (key, value) = match t.split_once(':') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (t, ""),
        };
        match key {
            "Description" => p.description = Some(value.to_string()),
            "Neighbor address" => p.neighbor_address = Some(value.to_string()),
            "Neighbor AS" => p.neighbor_as = value.parse().ok(),
            "Hold timer" => p.hold_time = timer_total(value),
            "Keepalive timer" => p.keepalive_time = timer_total(value),
            _ if t.starts_with("Channel ") => {
                if let Some(c) = channel.take() {
                    p.channels.push(c);
                }
                channel = Some(Channel {
                    name: t["Channel ".len()..].trim().to_string(),
                    ..Channel::default()
                });
            }
            "State" => {
                if let Some(c) = channel.as_mut() {
                    c.state = value.to_string();
                }
            }
            "Routes" => {
                if let Some(c) = channel.as_mut() {
                    for part in value.split(',') {
                        let mut w = part.split_whitespace();
                        let (Some(n), Some(what)) = (w.next(), w.next()) else {
                            continue;
                        };
                        let Ok(n) = n.parse::<u64>() else { continue };
                        match what {
                            "imported" => c.imported = n,
                            "exported" => c.exported = n,
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    flush_channel(&mut current, &mut channel);
    out.extend(current);
    out
}

/// The total of a BIRD timer shown as `left/total` (`5.071/9`).
fn timer_total(value: &str) -> Option<u32> {
    value.rsplit_once('/')?.1.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_birds_output() {
        let text = include_str!("../tests/golden/show-protocols-all.txt");
        let p = parse_protocols(text);
        let names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"mesh4_node_2"), "{names:?}");
        let up = p.iter().find(|p| p.name == "mesh4_node_2").unwrap();
        assert!(up.established(), "{up:?}");
        assert_eq!(up.neighbor_as, Some(64512));
        assert_eq!(up.received(), 1);
        assert_eq!(up.sent(), 1);
        assert_eq!((up.hold_time, up.keepalive_time), (Some(9), Some(3)));
    }

    #[test]
    fn garbage_is_not_a_panic() {
        for t in [
            "",
            "x",
            "a BGP",
            "  Routes: x y, 5",
            "n BGP --- up 2020-01-01",
            "\u{0}\n  Channel",
        ] {
            let _ = parse_protocols(t);
        }
    }
}
