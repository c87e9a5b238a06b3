//! A single-member etcd on loopback, for the etcd store tests and the datastore benchmark:
//! Debian's `/usr/bin/etcd` (package `etcd-server`, installed by `scripts/deps`) on 127.0.0.1
//! of the caller's network namespace, free ports, its data directory and log in a temp dir on
//! `/dev/shm` when there is one (etcd fsyncs every write), killed and reaped on drop — also when
//! the test panics — and then its directory removed.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use malla_store::EtcdStore;

/// Debian's etcd (package `etcd-server`).
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long etcd gets to answer a client after it was started.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// The request timeout of the store handles [`Etcd::store`] opens.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A running etcd; killed on drop, then its data directory is removed.
pub struct Etcd {
    bin: PathBuf,
    before_spawn: fn(&mut Command),
    child: Option<Child>,
    pid: u32,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    log: PathBuf,
    // Removed after `drop` has killed etcd.
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Debian's etcd for a test; panics (with the end of etcd's log) when it does not answer.
    pub fn start() -> Etcd {
        Self::launch(Path::new(ETCD_BIN), |_| {}, || Ok(())).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts `bin` (`before_spawn` may add to its command, e.g. a parent-death signal) and
    /// waits, at most 30 s, until a client gets an answer; `check` is asked while waiting (a
    /// caller's own deadline or interruption ends the wait with its error).
    pub fn launch(
        bin: &Path,
        before_spawn: fn(&mut Command),
        check: impl Fn() -> anyhow::Result<()>,
    ) -> anyhow::Result<Etcd> {
        if !bin.is_file() {
            bail!(
                "{} not found: install Debian's etcd-server (scripts/deps)",
                bin.display()
            );
        }
        let tmpfs = Path::new("/dev/shm");
        let mut builder = tempfile::Builder::new();
        builder.prefix("malla-etcd-");
        let dir = if tmpfs.is_dir() {
            builder.tempdir_in(tmpfs)
        } else {
            builder.tempdir()
        }
        .context("creating etcd's data directory")?;
        let client_port = crate::free_port();
        let mut peer_port = crate::free_port();
        while peer_port == client_port {
            peer_port = crate::free_port();
        }
        let mut etcd = Etcd {
            bin: bin.to_path_buf(),
            before_spawn,
            child: None,
            pid: 0,
            client_port,
            peer_port,
            data: dir.path().join("data"),
            log: dir.path().join("etcd.log"),
            _dir: dir,
        };
        etcd.spawn(check)?;
        Ok(etcd)
    }

    /// Starts the process (its log appended to) and waits until it answers.
    fn spawn(&mut self, check: impl Fn() -> anyhow::Result<()>) -> anyhow::Result<()> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("opening etcd's log")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--name=malla")
            .arg(format!("--data-dir={}", self.data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=malla={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        (self.before_spawn)(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.pid = child.id();
        self.child = Some(child);
        let limit = Instant::now() + ANSWER_WITHIN;
        loop {
            check()?;
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                bail!("etcd exited with {status}: {}", self.log_tail());
            }
            if TcpStream::connect(("127.0.0.1", self.client_port)).is_ok()
                && EtcdStore::connect(&[self.endpoint()], "/ready", Duration::from_secs(2)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > limit {
                bail!("etcd did not answer within 30 s: {}", self.log_tail());
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

    /// The pid of the process last started (after [`Etcd::kill`], of the one killed).
    pub fn pid(&self) -> u32 {
        self.pid
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

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same ports and data directory; panics when it does not answer.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(|| Ok(())).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// A store handle under `prefix` ([`REQUEST_TIMEOUT`]); panics when it cannot connect.
    pub fn store(&self, prefix: &str) -> EtcdStore {
        EtcdStore::connect(&[self.endpoint()], prefix, REQUEST_TIMEOUT)
            .unwrap_or_else(|e| panic!("connecting to etcd at {}: {e}", self.endpoint()))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
