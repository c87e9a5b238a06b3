//! `malla`: the command line. `malla agent` runs the node daemon, `malla ipam show` reads the
//! IPAM state, and `malla lab …` builds and exercises a multi-node lab on this machine.

mod ipam_cmd;
mod lab_cmd;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "malla",
    version,
    about = "Kubernetes pod networking: agent, IPAM and lab"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (one per node).
    ///
    /// Example: malla agent --node node-1 --datastore /var/lib/malla/store.db --underlay-interface eth1
    Agent {
        /// This node's name.
        #[arg(long)]
        node: String,
        /// Path of the local datastore file.
        #[arg(long)]
        datastore: PathBuf,
        /// Interface facing the other nodes.
        #[arg(long)]
        underlay_interface: String,
        /// File written once the first sync is applied.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Seconds between full resyncs that repair drift.
        #[arg(long, default_value_t = 10)]
        resync_secs: u64,
    },
    /// Inspect IP address management.
    Ipam {
        #[command(subcommand)]
        command: ipam_cmd::IpamCommand,
    },
    /// Build and exercise a lab cluster made of network namespaces.
    Lab(lab_cmd::LabArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent {
            node,
            datastore,
            underlay_interface,
            ready_file,
            resync_secs,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            malla_agent::run(malla_agent::AgentConfig {
                node,
                store_path: datastore,
                underlay_interface,
                resync: Duration::from_secs(resync_secs.max(1)),
                ready_file,
            })
        }
        Command::Ipam { command } => ipam_cmd::run(command),
        Command::Lab(args) => lab_cmd::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
