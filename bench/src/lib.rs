//! Shared pieces of Malla's benchmarks: guards that delete every namespace and lab they made
//! (also on error, panic or Ctrl-C), percentiles, child processes with a deadline, and the
//! default locations of the `malla` and `malla-cni` binaries.
//!
//! Every namespace a benchmark creates is named `malla-bench-<pid>-...` and is deleted by that
//! exact name; labs are named `bench-<pid>-...`, so their namespaces share the prefix.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use malla_dataplane::netns;
use malla_lab::topology::{self, UpOptions};
use malla_lab::{LabPaths, LabState};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into a flag the benchmark loops check, so a stopped run still
/// unwinds through its guards and leaves nothing behind.
pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Fails once the run was interrupted or ran past `deadline`.
pub fn check(deadline: Instant) -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    if Instant::now() > deadline {
        bail!("time budget exhausted (raise --max-seconds)");
    }
    Ok(())
}

/// The prefix of every namespace this process creates.
pub fn ns_prefix() -> String {
    format!("malla-bench-{}-", std::process::id())
}

/// The name of a lab owned by this process (its namespaces are `malla-bench-<pid>-<what>-...`).
pub fn lab_name(what: &str) -> String {
    format!("bench-{}-{what}", std::process::id())
}

/// Refuses to start when namespaces with our prefix already exist (a recycled pid): we only
/// ever delete what we created.
pub fn ensure_prefix_unused() -> anyhow::Result<()> {
    let prefix = ns_prefix();
    let stale: Vec<String> = netns::list_named()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    if !stale.is_empty() {
        bail!(
            "namespaces with our prefix {prefix} already exist ({}); not touching them",
            stale.join(", ")
        );
    }
    Ok(())
}

/// Named namespaces this process created; whatever is still listed when dropped is deleted.
#[derive(Default)]
pub struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    /// Creates `malla-bench-<pid>-<suffix>` (it must not exist yet) and returns its name.
    pub fn create(&mut self, suffix: &str) -> anyhow::Result<String> {
        let name = format!("{}{suffix}", ns_prefix());
        if netns::exists(&name) {
            bail!("namespace {name} already exists");
        }
        // Recorded first, so a half-made namespace is still cleaned up.
        self.names.push(name.clone());
        netns::create(&name).with_context(|| format!("creating namespace {name}"))?;
        Ok(name)
    }

    /// Deletes one of ours by exact name.
    pub fn delete(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.names.iter().any(|n| n == name) {
            bail!("namespace {name} was not created by this run");
        }
        netns::delete(name).with_context(|| format!("deleting namespace {name}"))?;
        self.names.retain(|n| n != name);
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.names.drain(..).rev() {
            if let Err(e) = netns::delete(&name) {
                eprintln!("warning: deleting namespace {name}: {e}");
            }
        }
    }
}

/// A lab brought up for a benchmark in a private state directory; `topology::down` on drop.
pub struct Lab {
    pub paths: LabPaths,
    pub state: LabState,
    // Dropped after `down` has run (fields drop after `Drop::drop`).
    _root: tempfile::TempDir,
}

impl Lab {
    pub fn up(what: &str, opts: &UpOptions) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("malla-bench-")
            .tempdir()
            .context("creating the lab's state root")?;
        let paths = LabPaths::new(&lab_name(what), Some(root.path()))?;
        // A guard without state yet, so a failing `up` is torn down too.
        let mut lab = Self {
            paths,
            state: placeholder_state(),
            _root: root,
        };
        lab.state = topology::up(&lab.paths, opts)
            .with_context(|| format!("bringing up lab {}", lab.paths.name))?;
        Ok(lab)
    }

    /// Re-reads the lab's state (after `runtime::apply`).
    pub fn reload(&mut self) -> anyhow::Result<()> {
        self.state = LabState::require(&self.paths)?;
        Ok(())
    }
}

fn placeholder_state() -> LabState {
    LabState::default()
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = topology::down(&self.paths) {
            eprintln!("warning: tearing down lab {}: {e:#}", self.paths.name);
        }
    }
}

/// The directory of the running benchmark binary (`target/release` or `target/debug`), where
/// cargo also puts `malla` and `malla-cni`.
pub fn default_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join(name)
}

/// Fails with a hint when a binary the benchmark needs is missing.
pub fn require_file(path: &Path, hint: &str) -> anyhow::Result<()> {
    if !path.is_file() {
        bail!("{} not found ({hint})", path.display());
    }
    Ok(())
}

/// A child process we started; killed (by its pid, through `Child::kill`) and reaped on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion, killing it after `timeout`; stdout and stderr are captured.
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard(cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?);
    let mut out = child.0.stdout.take().context("no stdout")?;
    let mut err = child.0.stderr.take().context("no stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline || INTERRUPTED.load(Ordering::SeqCst) {
            let _ = child.0.kill();
            let _ = child.0.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// The nearest-rank percentile (`p` in 0..=100) of unsorted samples.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut v = samples.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// `a / b`, or NaN when `b` is zero.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=200).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(100));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(198));
        assert_eq!(percentile(&s, 100.0), Duration::from_millis(200));
        assert_eq!(percentile(&s[..1], 99.0), Duration::from_millis(200));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn names_share_the_prefix() {
        let lab = LabPaths::new(&lab_name("vxlan"), None).unwrap();
        assert!(lab.prefix().starts_with(&ns_prefix()));
    }
}
