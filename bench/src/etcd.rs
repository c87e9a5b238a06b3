//! The benchmarks' etcd: the test kit's single-member etcd (`malla_test_kit::etcd`, as
//! `crates/malla-store/tests/etcd.rs` starts one), here also killed when the thread that started
//! it dies (`PR_SET_PDEATHSIG`), so not even a `kill -9` of the benchmark leaves it running, and
//! bounded by the run's deadline.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

pub use malla_test_kit::etcd::{Etcd, ETCD_BIN};

use crate::check;

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

/// Starts `bin` and waits (bounded by `deadline` and 30 s) until a client gets an answer.
pub fn start(bin: &Path, deadline: Instant) -> anyhow::Result<Etcd> {
    Etcd::launch(bin, die_with_parent, || check(deadline))
}
