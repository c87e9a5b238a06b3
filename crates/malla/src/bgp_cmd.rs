//! `malla bgp status`: this node's BGP sessions, read from its BIRD's control socket (the
//! agent's speaker with `routing: bgp`); `malla lab bgp` prints a lab's the same way.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use malla_lab::bgp::Session;

use crate::output::{Output, Table};
use crate::{exit, ExitWith, Globals};

#[derive(Subcommand)]
pub enum BgpCommand {
    /// This node's BGP sessions: peer, state, routes received and sent.
    ///
    /// Exit status: 0 when every session is established, 3 when some are not, 1 when BIRD
    /// could not be asked. In a lab: `malla lab bgp`.
    ///
    /// Example: malla bgp status --socket /run/malla/bird/bird.ctl -o json
    Status(StatusArgs),
}

#[derive(Args)]
pub struct StatusArgs {
    /// The node's BIRD control socket (the agent keeps it beside its ready file, else here).
    #[arg(long, default_value = "/run/malla/bird/bird.ctl")]
    socket: PathBuf,
    /// The speaker's name in the output.
    #[arg(long, default_value = "this node")]
    node: String,
    /// Output format: table, wide, json or yaml.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

pub fn run(_g: &Globals, command: BgpCommand) -> anyhow::Result<()> {
    match command {
        BgpCommand::Status(a) => {
            let protocols =
                malla_bgp::speaker::protocols(std::path::Path::new("/usr/sbin/birdc"), &a.socket)?;
            let sessions: Vec<Session> = protocols
                .iter()
                .map(|p| Session::from_bird(&a.node, p))
                .collect();
            print_sessions(&sessions, a.output)
        }
    }
}

/// Prints sessions as a table (or a document); exit status 3 when one is not established.
pub fn print_sessions(sessions: &[Session], output: Output) -> anyhow::Result<()> {
    if !output.document(&sessions)? {
        let wide = output == Output::Wide;
        let mut head = vec!["SPEAKER", "PEER", "NEIGHBOR", "STATE", "RECEIVED", "SENT"];
        if wide {
            head.extend(["AS", "SINCE", "SESSION"]);
        }
        let mut t = Table::new(&head).right(4).right(5);
        for s in sessions {
            let mut row = vec![
                s.speaker.clone(),
                s.description.clone().unwrap_or_else(|| s.name.clone()),
                s.neighbor.clone().unwrap_or_default(),
                s.state.clone(),
                s.received.to_string(),
                s.sent.to_string(),
            ];
            if wide {
                row.extend([
                    s.neighbor_as.map(|a| a.to_string()).unwrap_or_default(),
                    s.since.clone(),
                    s.name.clone(),
                ]);
            }
            t.row(row);
        }
        t.print();
    }
    if sessions.iter().any(|s| !s.established) {
        return Err(ExitWith(exit::FOUND_PROBLEM).into());
    }
    Ok(())
}
