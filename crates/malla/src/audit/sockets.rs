//! Listening TCP sockets of a network namespace, from the kernel's own table
//! (`/proc/thread-self/net/tcp` and `tcp6`: the calling thread's namespace, so a thread that
//! entered a node's namespace sees that node's sockets, whichever process owns them).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The kernel's state number for LISTEN.
const TCP_LISTEN: &str = "0A";

/// `(local address, port)` of every listening socket in a `/proc/net/tcp` or `tcp6` text.
/// Lines that do not parse are skipped (the header, a future column layout).
pub fn parse_listening(text: &str) -> Vec<(IpAddr, u16)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state)) = (cols.get(1), cols.get(3)) else {
            continue;
        };
        if *state != TCP_LISTEN {
            continue;
        }
        let Some((addr, port)) = local.split_once(':') else {
            continue;
        };
        let (Some(addr), Ok(port)) = (parse_addr(addr), u16::from_str_radix(port, 16)) else {
            continue;
        };
        out.push((addr, port));
    }
    out
}

/// The kernel prints addresses as 32-bit words in host byte order (little-endian here).
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<u32>> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect();
    let words = words?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&bytes);
            Some(IpAddr::V6(Ipv6Addr::from(b)).to_canonical())
        }
        _ => None,
    }
}

/// The calling thread's listening TCP sockets (IPv4 and IPv6), as `port → bound addresses`.
pub fn listening_here() -> std::io::Result<BTreeMap<u16, Vec<IpAddr>>> {
    let mut out: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
    for file in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            // No IPv6 in this kernel.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.ends_with('6') => continue,
            Err(e) => return Err(e),
        };
        for (addr, port) in parse_listening(&text) {
            let v = out.entry(port).or_default();
            if !v.contains(&addr) {
                v.push(addr);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_of_both_families() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2383 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:280A 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0A0013C6:0016 0B0013C6:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: 010013C6:094B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";
        assert_eq!(
            parse_listening(tcp),
            vec![
                ("127.0.0.1".parse().unwrap(), 0x2383),
                ("0.0.0.0".parse().unwrap(), 10250),
                ("198.19.0.1".parse().unwrap(), 2379),
            ]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6 1 0 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:2710 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1 0 100 0 0 10 0
   3: garbage
";
        assert_eq!(
            parse_listening(tcp6),
            vec![
                ("::".parse().unwrap(), 8080),
                ("::1".parse().unwrap(), 22),
                ("127.0.0.1".parse().unwrap(), 10000),
            ]
        );
    }

    #[test]
    fn this_threads_table_reads() {
        // Every Linux has a table to read, even with nothing listening.
        assert!(listening_here().is_ok());
    }
}
