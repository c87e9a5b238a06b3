//! A single-member etcd for benchmarks, as `crates/malla-store/tests/etcd.rs` starts one:
//! Debian's `/usr/bin/etcd` on 127.0.0.1 of the caller's network namespace, free ports, its data
//! directory (and log) on `/dev/shm` (etcd fsyncs every write), killed and reaped on drop, and
//! also when the thread that started it dies (`PR_SET_PDEATHSIG`), so not even a `kill -9` of
//! the benchmark leaves it running.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use malla_store::EtcdStore;

use crate::{check, require_file, ChildGuard};

/// Debian's etcd (package `etcd-server`).
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// A running etcd; killed on drop, then its data directory is removed.
pub struct Etcd {
    // Dropped (killed) before the directory below.
    child: ChildGuard,
    client_port: u16,
    log: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free loopback port")?
        .port())
}

/// Makes the child of `cmd` receive SIGKILL when the thread that spawns it dies (spawn it from
/// the main thread): nothing outlives the benchmark, even a `kill -9` of it.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Etcd {
    /// Starts `bin` and waits (bounded by `deadline` and 30 s) until a client gets an answer.
    pub fn start(bin: &Path, deadline: Instant) -> anyhow::Result<Etcd> {
        require_file(bin, "install Debian's etcd-server (scripts/deps)")?;
        let tmpfs = Path::new("/dev/shm");
        let mut builder = tempfile::Builder::new();
        builder.prefix("malla-bench-etcd-");
        let dir = if tmpfs.is_dir() {
            builder.tempdir_in(tmpfs)
        } else {
            builder.tempdir()
        }
        .context("creating etcd's data directory")?;
        let client_port = free_port()?;
        let mut peer_port = free_port()?;
        while peer_port == client_port {
            peer_port = free_port()?;
        }
        let data = dir.path().join("data");
        let log = dir.path().join("etcd.log");
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let logf = std::fs::File::create(&log).context("creating etcd's log")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--name=bench")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=bench={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        die_with_parent(&mut cmd);
        let child = ChildGuard(
            cmd.spawn()
                .with_context(|| format!("starting {}", bin.display()))?,
        );
        let mut etcd = Etcd {
            child,
            client_port,
            log,
            data,
            _dir: dir,
        };
        let limit = Instant::now() + Duration::from_secs(30);
        loop {
            check(deadline)?;
            if let Some(status) = etcd.child.0.try_wait()? {
                bail!("etcd exited with {status}: {}", etcd.log_tail());
            }
            if std::net::TcpStream::connect(("127.0.0.1", client_port)).is_ok()
                && EtcdStore::connect(&[etcd.endpoint()], "/ready", Duration::from_secs(2)).is_ok()
            {
                return Ok(etcd);
            }
            if Instant::now() > limit {
                bail!("etcd did not answer within 30 s: {}", etcd.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The datastore spec of `prefix` on this etcd (`etcd://127.0.0.1:PORT/prefix`).
    pub fn spec(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}{prefix}", self.client_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Size of etcd's backend file (`member/snap/db`) in bytes, 0 when unreadable.
    pub fn db_bytes(&self) -> u64 {
        std::fs::metadata(self.data.join("member/snap/db"))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// The last 20 lines of etcd's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}
