//! `malla`: the command line. `malla agent` runs the node daemon, `malla ipam show` reads the
//! IPAM state, and `malla lab …` builds and exercises a multi-node lab on this machine.

mod ipam_cmd;
mod lab_cmd;
mod policy_cmd;
mod services_cmd;

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
        /// The datastore: a local file path, etcd://HOST:PORT[,HOST:PORT]/PREFIX, or kubernetes[:KUBECONFIG]
        /// (the API server from KUBECONFIG, ~/.kube/config or the in-cluster service account).
        #[arg(long)]
        datastore: malla_store::DatastoreSpec,
        /// Interface facing the other nodes.
        #[arg(long)]
        underlay_interface: String,
        /// File written once the first sync is applied.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Cluster settings to seed the datastore with (a mounted ConfigMap: routing, vxlanVni,
        /// vxlanPort, pools.yaml); what the datastore already has is kept.
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// Seconds between full resyncs that repair drift.
        #[arg(long, default_value_t = 10)]
        resync_secs: u64,
        /// Where to serve /healthz, /readyz and /metrics (Prometheus), as ADDR:PORT; `none`
        /// serves nothing.
        #[arg(long, value_name = "ADDR", default_value = malla_agent::DEFAULT_HTTP_LISTEN, value_parser = parse_http_listen)]
        http_listen: HttpListen,
    },
    /// Inspect IP address management.
    Ipam {
        #[command(subcommand)]
        command: ipam_cmd::IpamCommand,
    },
    /// Build and exercise a lab cluster made of network namespaces.
    Lab(lab_cmd::LabArgs),
    /// Explain NetworkPolicy verdicts.
    Policy {
        #[command(subcommand)]
        command: policy_cmd::PolicyCommand,
    },
    /// Show this node's programmed services, their endpoints and connection counters.
    ///
    /// Example: malla services --lab demo --node node-1
    Services(services_cmd::ServicesArgs),
    /// Print the CustomResourceDefinitions of the Kubernetes datastore (deploy/crds.yaml).
    ///
    /// Example: malla crds | kubectl apply -f -
    Crds,
    /// Install the CNI plugin and Malla's conflist on this node (atomically).
    ///
    /// Example: malla install-cni --node-name node-1 --datastore /var/lib/malla/store.db
    InstallCni {
        /// Where runtimes look for CNI plugin binaries.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// Where runtimes look for network configurations.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// This node's name, as the agent registers it.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// The datastore: a local file path, etcd://HOST:PORT[,HOST:PORT]/PREFIX, or kubernetes[:KUBECONFIG]
        /// (the API server from KUBECONFIG, ~/.kube/config or the in-cluster service account).
        #[arg(long, default_value = "/var/lib/malla/store.db")]
        datastore: malla_store::DatastoreSpec,
        /// The agent's ready file (enables CNI STATUS to see the agent).
        #[arg(long)]
        agent_ready_file: Option<PathBuf>,
        /// cniVersion of the conflist.
        #[arg(long, default_value = "1.1.0")]
        cni_version: String,
        /// The plugin binary to install (default: malla-cni next to this program).
        #[arg(long)]
        plugin_binary: Option<PathBuf>,
        /// Overwrite a conflist of ours that is not Malla's.
        #[arg(long)]
        force: bool,
    },
}

/// `--http-listen`: an address, or none.
#[derive(Debug, Clone, Copy)]
struct HttpListen(Option<std::net::SocketAddr>);

fn parse_http_listen(s: &str) -> Result<HttpListen, String> {
    if s == "none" {
        return Ok(HttpListen(None));
    }
    s.parse()
        .map(|a| HttpListen(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (expected ADDR:PORT, e.g. 127.0.0.1:9099, or none)"))
}

fn main() {
    let cli = Cli::parse();
    // Like other Unix tools, end quietly when the reader of our output goes away (`| head`).
    // Not the agent: a daemon with sockets must see EPIPE as an error, not die of the signal
    // when a datastore server it writes to goes away (killed silently, mid-outage).
    if !matches!(cli.command, Command::Agent { .. }) {
        // SAFETY: restoring the default disposition of a signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Crds => {
            print!("{}", malla_store::kubernetes::kinds::crds_yaml());
            Ok(())
        }
        Command::Agent {
            node,
            datastore,
            underlay_interface,
            ready_file,
            resync_secs,
            config_dir,
            http_listen,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            malla_agent::run(malla_agent::AgentConfig {
                node,
                datastore,
                underlay_interface,
                resync: Duration::from_secs(resync_secs.max(1)),
                ready_file,
                config_dir,
                http_listen: http_listen.0,
            })
        }
        Command::Ipam { command } => ipam_cmd::run(command),
        Command::Lab(args) => lab_cmd::run(args),
        Command::Services(args) => services_cmd::run(args),
        Command::Policy { command } => policy_cmd::run(command),
        Command::InstallCni {
            bin_dir,
            conf_dir,
            node_name,
            datastore,
            agent_ready_file,
            cni_version,
            plugin_binary,
            force,
        } => in_cluster_datastore(datastore, &conf_dir).and_then(|datastore| {
            install_cni(
                plugin_binary,
                &bin_dir,
                &conf_dir,
                &malla_cni::install::conflist(
                    &node_name,
                    &datastore,
                    agent_ready_file.as_deref(),
                    &cni_version,
                ),
                force,
            )
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `--datastore kubernetes` without a kubeconfig, run in a pod: the plugin runs on the host,
/// outside the pod, so it gets a kubeconfig of its own with the pod's service account.
fn in_cluster_datastore(
    datastore: malla_store::DatastoreSpec,
    conf_dir: &std::path::Path,
) -> anyhow::Result<malla_store::DatastoreSpec> {
    if datastore != (malla_store::DatastoreSpec::Kubernetes { kubeconfig: None }) {
        return Ok(datastore);
    }
    let written = malla_cni::install::write_in_cluster_kubeconfig(
        conf_dir,
        std::path::Path::new(malla_cni::install::SERVICE_ACCOUNT_DIR),
        &|k| std::env::var(k).ok(),
    )?;
    Ok(match written {
        Some(path) => malla_store::DatastoreSpec::Kubernetes {
            kubeconfig: Some(path),
        },
        None => datastore,
    })
}

fn install_cni(
    plugin_binary: Option<PathBuf>,
    bin_dir: &std::path::Path,
    conf_dir: &std::path::Path,
    conflist: &serde_json::Value,
    force: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        malla_cni::SUPPORTED_VERSIONS.contains(&conflist["cniVersion"].as_str().unwrap_or("")),
        "--cni-version: {} is not one of {}",
        conflist["cniVersion"],
        malla_cni::SUPPORTED_VERSIONS.join(", ")
    );
    let binary = match plugin_binary {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("malla-cni"),
    };
    let done = malla_cni::install::install(&binary, bin_dir, conf_dir, conflist, force)?;
    println!(
        "installed {} and {}",
        done.binary.display(),
        done.conflist.display()
    );
    for other in &done.shadowed_by {
        eprintln!(
            "warning: {} sorts before {} and runtimes will use it instead",
            other.display(),
            done.conflist.display()
        );
    }
    Ok(())
}
