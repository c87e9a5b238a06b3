//! The lab's DNS server: Debian's `dnsmasq` (package `dnsmasq-base`, no system service) run in
//! one of the lab's namespaces — normally `external`, the world outside the cluster — answering
//! the names it is given (each name and its subdomains) with a fixed TTL, and nothing else (no
//! upstream, no hosts file). DNS-name policy tests resolve through it from pods.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

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
