//! The flags every command takes, before or after the subcommand (as kubectl's `-n` and
//! `--kubeconfig`): `--lab`, `--datastore` (or `MALLA_DATASTORE`, as calicoctl's
//! `DATASTORE_TYPE`) and `--log-format`; and the way errors are put into words.

use std::io::IsTerminal;

use anyhow::Context;
use clap::{Args, ValueEnum};
use malla_lab::{LabPaths, LabState};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// One line per event; colour only when writing to a terminal.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

#[derive(Args, Clone)]
pub struct Globals {
    /// The lab to act on: its namespaces are called malla-<lab>-*.
    #[arg(
        long,
        global = true,
        env = "MALLA_LAB",
        default_value = "demo",
        help_heading = "Global options"
    )]
    pub lab: String,
    /// The datastore: a file path, etcd://HOST:PORT[,HOST:PORT]/PREFIX, or kubernetes[:KUBECONFIG]
    /// (KUBECONFIG, ~/.kube/config or the in-cluster service account). Commands that read a lab
    /// default to the lab's. For `lab up` and `lab demo` it names the lab's backend instead:
    /// local, etcd or kubernetes.
    #[arg(
        long,
        global = true,
        env = "MALLA_DATASTORE",
        value_name = "DATASTORE",
        help_heading = "Global options"
    )]
    pub datastore: Option<String>,
    /// Log lines as text or json (the agent's logs; stderr).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "MALLA_LOG_FORMAT",
        default_value = "text",
        help_heading = "Global options"
    )]
    pub log_format: LogFormat,
    /// Whether --datastore came from MALLA_DATASTORE (then `lab up` ignores a value that is not
    /// a backend name, so one environment serves both kinds of command).
    #[arg(skip)]
    pub datastore_from_env: bool,
}

impl Globals {
    /// `--datastore` as a datastore address, if given.
    pub fn spec(&self) -> anyhow::Result<Option<malla_store::DatastoreSpec>> {
        self.datastore
            .as_deref()
            .map(|s| {
                malla_store::DatastoreSpec::parse(s)
                    .map_err(|e| anyhow::anyhow!("--datastore: {e}"))
            })
            .transpose()
    }

    /// `--datastore`, which `what` needs.
    pub fn require_spec(&self, what: &str) -> anyhow::Result<malla_store::DatastoreSpec> {
        self.spec()?.with_context(|| {
            format!("{what} needs --datastore (or MALLA_DATASTORE): a file path, etcd://HOST:PORT/PREFIX or kubernetes")
        })
    }

    /// `--datastore` read as a lab backend (`lab up`, `lab demo`).
    pub fn backend(&self) -> anyhow::Result<malla_lab::store::Backend> {
        match self.datastore.as_deref() {
            None => Ok(malla_lab::store::Backend::Local),
            Some(s) => match s.parse() {
                Ok(b) => Ok(b),
                Err(_) if self.datastore_from_env => Ok(malla_lab::store::Backend::Local),
                Err(e) => Err(anyhow::anyhow!("{e}")),
            },
        }
    }

    pub fn lab_paths(&self) -> anyhow::Result<LabPaths> {
        LabPaths::new(&self.lab, crate::lab_cmd::state_root().as_deref())
    }

    /// The lab's record, or an error that says how to bring the lab up.
    pub fn lab_state(&self) -> anyhow::Result<LabState> {
        LabState::require(&self.lab_paths()?)
    }

    /// Opens `--datastore`, or the lab's.
    pub fn open_store(&self) -> anyhow::Result<Box<dyn malla_store::Store>> {
        match self.spec()? {
            Some(spec) => Ok(spec.open()?),
            None => {
                let paths = self.lab_paths()?;
                let state = self.lab_state()?;
                malla_lab::store::open(&paths, &state)
            }
        }
    }

    /// Sets up logging to stderr in `--log-format`, colour only on a terminal.
    pub fn init_logging(&self) -> anyhow::Result<()> {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        let done = match self.log_format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        };
        done.map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
    }
}

/// An error chain as one line of words: `a: b: c`, without the raw `(os error N)` codes.
pub fn in_words(e: &anyhow::Error) -> String {
    strip_os_error(&format!("{e:#}"))
}

/// Removes ` (os error N)` from a message.
pub fn strip_os_error(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(" (os error ") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + " (os error ".len()..];
        match tail.find(')') {
            Some(j) if tail[..j].chars().all(|c| c.is_ascii_digit()) => rest = &tail[j + 1..],
            _ => {
                out.push_str(" (os error ");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn os_error_codes_are_left_out() {
        assert_eq!(
            super::strip_os_error("reading x: No such file or directory (os error 2)"),
            "reading x: No such file or directory"
        );
        assert_eq!(
            super::strip_os_error("odd (os error x)"),
            "odd (os error x)"
        );
    }
}
