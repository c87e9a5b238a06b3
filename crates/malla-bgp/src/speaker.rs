//! The node's BIRD process: started in the calling process's network namespace (the agent runs
//! in the node's), its configuration, control socket, pid file and log in one state directory,
//! adopted when the agent restarts (BIRD keeps running when the agent dies: nothing is
//! withdrawn), reloaded with `birdc configure` when the configuration changes, and started
//! again if it died (its kernel routes persist, and graceful restart keeps the peers' routes to
//! this node while it comes back).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What went wrong driving BIRD.
#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("BIRD rejected {path}: {message}")]
    Rejected { path: PathBuf, message: String },
    #[error("BIRD did not answer on {socket} within {waited:?}")]
    NoAnswer { socket: PathBuf, waited: Duration },
    #[error("birdc {command}: {message}")]
    Birdc { command: String, message: String },
}

/// What [`Bird::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The running BIRD already has this configuration.
    Unchanged,
    /// BIRD was not running and was started with it.
    Started,
    /// The running BIRD (perhaps one a previous agent started) was reconfigured.
    Reconfigured,
}

/// One BIRD instance and its state directory.
#[derive(Debug)]
pub struct Bird {
    dir: PathBuf,
    bird: PathBuf,
    birdc: PathBuf,
    /// The configuration this process last saw applied.
    applied: Option<String>,
}

impl Bird {
    /// The instance kept in `dir` (created on first apply), with Debian's `bird` and `birdc`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            bird: PathBuf::from("/usr/sbin/bird"),
            birdc: PathBuf::from("/usr/sbin/birdc"),
            applied: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("bird.conf")
    }
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }
    pub fn pid_path(&self) -> PathBuf {
        self.dir.join("bird.pid")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("bird.log")
    }

    /// BIRD's pid, if its pid file names a live process.
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_path())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// Whether BIRD answers on its control socket.
    pub fn running(&self) -> bool {
        self.socket_path().exists()
            && birdc(&self.birdc, &self.socket_path(), &["show", "status"]).is_ok()
    }

    /// Makes BIRD run with `config`: unchanged, started or reconfigured.
    pub fn apply(&mut self, config: &str) -> Result<Applied, SpeakerError> {
        let running = self.running();
        if running && self.applied.as_deref() == Some(config) {
            return Ok(Applied::Unchanged);
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| SpeakerError::Write {
            path: self.dir.clone(),
            source,
        })?;
        let path = self.config_path();
        let tmp = self.dir.join("bird.conf.tmp");
        std::fs::write(&tmp, config).map_err(|source| SpeakerError::Write {
            path: tmp.clone(),
            source,
        })?;
        // Parse only: a configuration BIRD refuses never replaces the one it runs.
        let out = Command::new(&self.bird)
            .arg("-p")
            .arg("-c")
            .arg(&tmp)
            .output()
            .map_err(|source| SpeakerError::Spawn {
                program: self.bird.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(SpeakerError::Rejected {
                path: tmp,
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        std::fs::rename(&tmp, &path).map_err(|source| SpeakerError::Write {
            path: path.clone(),
            source,
        })?;
        let done = if running {
            let c = path.to_string_lossy().to_string();
            let text = birdc(
                &self.birdc,
                &self.socket_path(),
                &["configure", &format!("\"{c}\"")],
            )?;
            if !(text.contains("Reconfigured") || text.contains("Reconfiguration")) {
                return Err(SpeakerError::Birdc {
                    command: "configure".into(),
                    message: text.trim().to_string(),
                });
            }
            Applied::Reconfigured
        } else {
            self.start()?;
            Applied::Started
        };
        self.applied = Some(config.to_string());
        Ok(done)
    }

    /// Starts BIRD with the configuration on disk (it daemonizes: it outlives the caller).
    fn start(&self) -> Result<(), SpeakerError> {
        let _ = std::fs::remove_file(self.socket_path());
        // Its output to a file, not a pipe: the daemon keeps what it inherits.
        let err_path = self.dir.join("bird.stderr");
        let err = std::fs::File::create(&err_path).map_err(|source| SpeakerError::Write {
            path: err_path.clone(),
            source,
        })?;
        // `-R`: graceful restart recovery. The kernel protocol keeps the routes a previous BIRD
        // left until the sessions are back and have sent everything again.
        let status = Command::new(&self.bird)
            .arg("-R")
            .arg("-c")
            .arg(self.config_path())
            .arg("-s")
            .arg(self.socket_path())
            .arg("-P")
            .arg(self.pid_path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .status()
            .map_err(|source| SpeakerError::Spawn {
                program: self.bird.display().to_string(),
                source,
            })?;
        if !status.success() {
            return Err(SpeakerError::Rejected {
                path: self.config_path(),
                message: std::fs::read_to_string(&err_path)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            });
        }
        let waited = Duration::from_secs(5);
        let deadline = Instant::now() + waited;
        while !self.running() {
            if Instant::now() > deadline {
                return Err(SpeakerError::NoAnswer {
                    socket: self.socket_path(),
                    waited,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `birdc show protocols all`, parsed.
    pub fn protocols(&self) -> Result<Vec<crate::status::Protocol>, SpeakerError> {
        protocols(&self.birdc, &self.socket_path())
    }
}

/// `birdc show protocols all` on `socket`, parsed.
pub fn protocols(
    birdc_bin: &Path,
    socket: &Path,
) -> Result<Vec<crate::status::Protocol>, SpeakerError> {
    let text = birdc(birdc_bin, socket, &["show", "protocols", "all"])?;
    Ok(crate::status::parse_protocols(&text))
}

/// Runs one `birdc` command against `socket`; its output.
pub fn birdc(birdc_bin: &Path, socket: &Path, args: &[&str]) -> Result<String, SpeakerError> {
    let out = Command::new(birdc_bin)
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .map_err(|source| SpeakerError::Spawn {
            program: birdc_bin.display().to_string(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || text.contains("Unable to connect") {
        return Err(SpeakerError::Birdc {
            command: args.join(" "),
            message: format!(
                "{}{}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(text)
}
