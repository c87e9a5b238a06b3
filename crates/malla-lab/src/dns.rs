//! The lab's DNS server: Debian's `dnsmasq` (package `dnsmasq-base`, no system service) run in
//! one of the lab's namespaces — normally `external`, the world outside the cluster — answering
//! the names it is given (each name and its subdomains) with a fixed TTL, and nothing else (no
//! upstream, no hosts file). DNS-name policy tests resolve through it from pods.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::{Name, RData, RecordType};

/// A running dnsmasq, stopped (by its own pid) when dropped.
pub struct DnsServer {
    child: Child,
}

impl DnsServer {
    /// Starts dnsmasq in namespace `netns` on `listen`:53 (UDP and TCP), answering each
    /// `(name, address)` for the name and all its subdomains with TTL `ttl` seconds. Its
    /// configuration is written to `dir`. Returns once it answers on port 53.
    pub fn start(
        netns: &str,
        listen: Ipv4Addr,
        records: &[(String, IpAddr)],
        ttl: u32,
        dir: &Path,
    ) -> anyhow::Result<DnsServer> {
        let conf = dir.join(format!("dnsmasq-{netns}.conf"));
        let mut f =
            std::fs::File::create(&conf).with_context(|| format!("writing {}", conf.display()))?;
        writeln!(f, "no-resolv\nno-hosts\nbind-interfaces\nlisten-address={listen}\nport=53\nlocal-ttl={ttl}\nuser=root")?;
        for (name, ip) in records {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
            {
                bail!("{name:?} is not a name dnsmasq can serve");
            }
            writeln!(f, "address=/{name}/{ip}")?;
        }
        drop(f);
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "dnsmasq",
                "--keep-in-foreground",
                "--pid-file",
            ])
            .arg(format!("--conf-file={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq (Debian package dnsmasq-base)")?;
        let server = DnsServer { child };
        // Ready once port 53 is bound in the namespace.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", netns, "ss", "-Hlun", "sport", "=", ":53"])
                .output()
                .context("ss")?;
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("dnsmasq did not listen on {listen}:53 in {netns} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // `ip netns exec` execs dnsmasq: the child's pid is dnsmasq's.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A query for the A records of `name` (recursion desired), as bytes.
pub fn a_query(id: u16, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut q = Message::new();
    q.set_id(id);
    q.set_recursion_desired(true);
    q.add_query(Query::query(
        Name::from_ascii(format!("{name}."))?,
        RecordType::A,
    ));
    Ok(q.to_vec()?)
}

/// The first A record of `name` from `server`, asked from the calling thread's namespace
/// (2 s for the answer, which must come from `server` with the query's ID).
pub fn resolve_a(server: SocketAddrV4, name: &str) -> anyhow::Result<Ipv4Addr> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(&a_query(0x4d41, name)?, server)?;
    let mut buf = [0u8; 4096];
    let (n, from) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("the answer for {name}"))?;
    if from != SocketAddr::V4(server) {
        bail!("{name}: answer from {from}");
    }
    let m = Message::from_vec(&buf[..n])?;
    if m.id() != 0x4d41 || m.message_type() != MessageType::Response {
        bail!("{name}: not the answer to our query");
    }
    m.answers()
        .iter()
        .find_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .with_context(|| format!("{name}: no A record"))
}
