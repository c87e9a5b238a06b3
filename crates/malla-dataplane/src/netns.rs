//! Network namespaces: open by name or path, run code inside one on a dedicated thread, and
//! create/delete named namespaces with iproute2 (a separate process, so no fork in ours).
//!
//! `setns` changes only the calling thread, so work inside a namespace always happens on a
//! fresh thread that exits afterwards; tokio workers never switch namespaces.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::{setns, CloneFlags};

/// Where iproute2 keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("open netns {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("enter netns: {0}")]
    Enter(nix::Error),
    #[error("{cmd}: {msg}")]
    Command { cmd: String, msg: String },
    #[error("thread inside netns panicked")]
    Panicked,
}

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens a namespace by path (`/run/netns/x`, `/proc/PID/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Self { file, path })
    }

    /// Opens a namespace by its iproute2 name.
    pub fn open_named(name: &str) -> Result<Self, NetnsError> {
        Self::open(Path::new(NETNS_DIR).join(name))
    }

    /// The namespace the calling thread is in.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Makes `cmd`'s child enter this namespace between fork and exec (and, with
    /// `new_session`, start a session of its own, detached from ours). The child's hook owns a
    /// duplicate of the namespace file, so it stays open until `cmd` is spawned whatever
    /// becomes of `self`.
    pub fn enter_on_exec(&self, cmd: &mut Command, new_session: bool) -> Result<(), NetnsError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let file = self.file.try_clone().map_err(|source| NetnsError::Open {
            path: self.path.clone(),
            source,
        })?;
        // SAFETY: between fork and exec the hook calls only setns(2) and setsid(2), both
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if new_session {
                    libc::setsid();
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Moves the calling thread into this namespace. Only for threads that exit afterwards
    /// (or for a child between fork and exec).
    pub fn enter_this_thread(&self) -> Result<(), NetnsError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(NetnsError::Enter)
    }

    /// Runs `f` on a new thread inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let fd = self.file.try_clone().map_err(|source| NetnsError::Open {
            path: self.path.clone(),
            source,
        })?;
        std::thread::spawn(move || {
            setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(NetnsError::Enter)?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Panicked)?
    }
}

/// Whether a named namespace exists.
pub fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Creates a named namespace (no error if it exists) and brings its loopback up.
pub fn create(name: &str) -> Result<(), NetnsError> {
    if !exists(name) {
        run_ip(&["netns", "add", name])?;
    }
    run_ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Deletes a named namespace (no error if it is already gone).
pub fn delete(name: &str) -> Result<(), NetnsError> {
    if !exists(name) {
        return Ok(());
    }
    run_ip(&["netns", "delete", name])
}

/// Names of every iproute2 namespace on the machine.
pub fn list_named() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Runs `ip ARGS`, turning a failure into an error that carries its stderr.
pub fn run_ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetnsError::Command {
            cmd: format!("ip {}", args.join(" ")),
            msg: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Command {
            cmd: format!("ip {}", args.join(" ")),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
