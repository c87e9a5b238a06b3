//! Starting long-lived lab processes (agents, probe servers) inside a namespace, detached from
//! the CLI that started them, waiting for their ready files, and stopping them by pid.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use malla_dataplane::netns::NetNs;

/// Spawns `cmd` inside the named namespace in its own session, output appended to `log`.
pub fn spawn_detached(mut cmd: Command, netns: &str, log: &Path) -> anyhow::Result<u32> {
    let ns = NetNs::open_named(netns)?;
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    ns.enter_on_exec(&mut cmd, true)?;
    let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let pid = child.id();
    // Reap it in the background if it dies while we are still running; otherwise init adopts it.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(pid)
}

/// Whether `pid` is alive and is one of the lab's processes (not a recycled pid).
pub fn is_ours(pid: u32) -> bool {
    // Anywhere in the command line: the lab's etcd is `etcd --data-dir /run/malla-lab/…`.
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("malla"))
        .unwrap_or(false)
        && !is_zombie(pid)
}

/// Whether `pid` has exited but is not reaped yet (or is gone).
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// Stops a process we started: SIGTERM, then SIGKILL after a short grace period.
pub fn stop(pid: u32) {
    if !is_ours(pid) {
        return;
    }
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..50 {
        if !is_ours(pid) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
}

/// Waits until `path` exists (a started process's ready file), at most `timeout`.
pub fn wait_for_file(path: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            anyhow::bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
