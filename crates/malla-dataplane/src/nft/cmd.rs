//! Applies nftables rulesets as text through `nft -f -`: one atomic transaction per call, as
//! kube-proxy's nftables mode does. Rendering the text is the calculation's job.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::netns::NetNs;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft rejected the ruleset: {0}")]
    Rejected(String),
}

/// Runs `nft ARGS` with `input` on stdin, inside `netns` when given.
pub fn run(netns: Option<&NetNs>, args: &[&str], input: &str) -> Result<String, NftError> {
    let mut cmd = Command::new("nft");
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        ns.enter_on_exec(&mut cmd, false)
            .map_err(|e| NftError::Spawn(std::io::Error::other(e)))?;
    }
    let mut child = cmd.spawn().map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NftError::Rejected(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Applies a ruleset file's text atomically.
pub fn apply(netns: Option<&NetNs>, ruleset: &str) -> Result<(), NftError> {
    run(netns, &["-f", "-"], ruleset).map(|_| ())
}

/// Whether the table exists (lists table names only, however big the table).
pub fn table_exists(netns: Option<&NetNs>, family: &str, table: &str) -> Result<bool, NftError> {
    let out = run(netns, &["list", "tables", family], "")?;
    Ok(out
        .lines()
        .any(|l| l.trim() == format!("table {family} {table}")))
}

/// Lists one table (never the whole ruleset: other software's tables are not ours).
pub fn list_table(netns: Option<&NetNs>, family: &str, table: &str) -> Result<String, NftError> {
    run(netns, &["list", "table", family, table], "")
}
