//! `malla`: the command line. `malla agent` runs the node daemon, `malla ipam show` reads the
//! IPAM state, `malla status` and `malla diags` check the nodes, and `malla lab …` builds and
//! exercises a multi-node lab on this machine. Flags, outputs and exit codes follow kubectl's
//! habits: `-o table|wide|json|yaml`, global flags before or after the subcommand.

mod audit;
mod bgp_cmd;
mod diags;
mod flows_cmd;
mod globals;
mod ipam_cmd;
mod lab_cmd;
mod output;
mod policy_cmd;
mod reference;
mod services_cmd;
mod status_cmd;
mod ui_cmd;

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub use globals::Globals;

/// Exit statuses, the same for every command (printed in `malla --help`).
pub mod exit {
    /// The command did what was asked.
    pub const OK: i32 = 0;
    /// The command failed; the message on stderr names the cause.
    pub const ERROR: i32 = 1;
    /// Wrong usage: an unknown flag, a bad value (e.g. `-o foo`), a missing argument.
    pub const USAGE: i32 = 2;
    /// The command ran and found a problem: `lab probe` saw pairs that did not connect,
    /// `status` saw a node that is not healthy, `audit` found a finding of `--fail-on`'s severity.
    pub const FOUND_PROBLEM: i32 = 3;
}

const EXIT_HELP: &str = "\
Exit status:
  0  the command did what was asked
  1  error (the message on stderr names the cause, e.g. a --from/--to that matches nothing)
  2  wrong usage: unknown flag, invalid value (e.g. -o foo), missing argument
  3  the check ran and found a problem: `lab probe` saw pairs that did not connect,
     `status` saw a node that is not healthy, `audit` found a high-severity finding

Environment:
  MALLA_LAB         the lab to act on (as --lab)
  MALLA_DATASTORE   the datastore (as --datastore)
  MALLA_LOG_FORMAT  text or json (as --log-format)";

#[derive(Parser)]
#[command(
    name = "malla",
    version,
    propagate_version = true,
    about = "Kubernetes pod networking: agent, IPAM, status and lab",
    after_help = EXIT_HELP
)]
struct Cli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (one per node).
    ///
    /// Logs go to stderr (the lab writes them to <state dir>/logs/agent-<node>.log, a
    /// DaemonSet to the container log); colour only on a terminal.
    ///
    /// Example: malla agent --node node-1 --datastore /var/lib/malla/store.db --underlay-interface eth1
    Agent {
        /// This node's name.
        #[arg(long)]
        node: String,
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
        /// The host's CNI configuration directory (as mounted in the agent's pod): inside a
        /// cluster, the agent keeps the plugin's kubeconfig there current with its rotating
        /// service-account token. Unset: nothing is refreshed.
        #[arg(long)]
        cni_conf_dir: Option<PathBuf>,
        /// Do not collect flow logs (conntrack events and the ruleset's NFLOG samples behind
        /// `/flows` and `malla flows`).
        #[arg(long, env = "MALLA_NO_FLOW_LOGS")]
        no_flow_logs: bool,
        /// The host's CNI plugin directory (as mounted in the agent's pod), whose `malla`
        /// plugin an uninstall removes (--uninstall-with).
        #[arg(long)]
        cni_bin_dir: Option<PathBuf>,
        /// The DaemonSet running this agent, as NAMESPACE/NAME (Kubernetes datastore). On
        /// SIGTERM the agent asks whether it still exists: yes (an update, a restart) and the
        /// node keeps its dataplane; gone (`kubectl delete -f deploy/`) and the agent removes
        /// everything Malla put on the node, as `malla cleanup` does.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        uninstall_with: Option<malla_agent::uninstall::Owner>,
        /// Do not serve Services: another proxy (kube-proxy) does. Malla still networks pods
        /// and enforces policy; Services and EndpointSlices are ignored.
        #[arg(long, env = "MALLA_NO_SERVICES")]
        no_services: bool,
    },
    /// Remove everything Malla put on this node: its nftables table, routes, VXLAN device and
    /// pod veths (pods on the node lose their network), the CNI conflist, plugin and kubeconfig,
    /// the agent's state files. Run with the agent stopped, to uninstall by hand.
    ///
    /// Example: malla cleanup --cni-conf-dir /etc/cni/net.d --cni-bin-dir /opt/cni/bin --ready-file /var/run/malla/agent.ready
    Cleanup {
        /// The CNI configuration directory (conflist, plugin kubeconfig and CA).
        #[arg(long)]
        cni_conf_dir: Option<PathBuf>,
        /// The CNI plugin directory.
        #[arg(long)]
        cni_bin_dir: Option<PathBuf>,
        /// The agent's ready file (its state files beside it).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Inspect IP address management.
    Ipam {
        #[command(subcommand)]
        command: ipam_cmd::IpamCommand,
    },
    /// Build and exercise a lab cluster made of network namespaces.
    Lab(lab_cmd::LabArgs),
    /// BGP (`routing: bgp`): this node's sessions.
    Bgp {
        #[command(subcommand)]
        command: bgp_cmd::BgpCommand,
    },
    /// Explain NetworkPolicy verdicts.
    Policy {
        #[command(subcommand)]
        command: policy_cmd::PolicyCommand,
    },
    /// Show this node's programmed services, their endpoints and connection counters.
    ///
    /// Example: malla services --lab demo --node node-1
    Services(services_cmd::ServicesArgs),
    /// Per node: agent up, in sync, datastore reachable, objects programmed, last error.
    ///
    /// Reads each agent's /healthz, /readyz and /metrics (in a lab, inside each node's
    /// namespace; with --datastore, this host's agent). Exit status 3 when a node is not healthy.
    ///
    /// Example: malla status --lab demo
    Status(status_cmd::StatusArgs),
    /// Flows every node's agent saw, like `hubble observe`.
    ///
    /// Who talked to whom (pods, nodes, Services and the endpoint chosen), allowed or denied
    /// and by which policy rule, with connections and bytes per 15 s window. A denied flow
    /// names the `malla policy trace` command explaining it.
    ///
    /// Example: malla flows --lab demo --verdict denied --namespace shop --since 5m
    ///
    /// Example: malla flows --lab demo --to shop/db --follow
    Flows(flows_cmd::FlowsArgs),
    /// A web page of the flows: a live graph of namespaces, workloads and Services with
    /// allowed and denied edges, a flow table with `malla flows`' filters, and a flow's
    /// `malla policy trace` on click.
    ///
    /// Serves on this host (default 127.0.0.1:9098) and asks every node's agent (`/flows`; in a
    /// lab, inside each node's namespace). Everything is in the binary: it works offline. No
    /// authentication: keep it on a loopback address.
    ///
    /// Example: malla ui --lab demo --listen 127.0.0.1:9098
    Ui(ui_cmd::UiArgs),
    /// Everything a bug report needs, in one archive: versions, config, agent logs, each node's
    /// nft ruleset, routes and links, the agents' endpoints, status and a datastore summary.
    ///
    /// Example: malla diags --lab demo --out /tmp/malla-diags.tar.gz
    Diags(diags::DiagsArgs),
    /// Check a node and the cluster against the control plane's communications: which
    /// control-plane ports listen and whether pods and the outside reach them, the kubelet's
    /// anonymous access and authorization, the API server's anonymous access and kubelet
    /// certificate verification, whether etcd answers without a client certificate, insecure
    /// ports. One row per finding, with a remediation.
    ///
    /// In a lab: its nodes and control-plane namespace, probed from one pod per node and from
    /// `external`. With --datastore (on a real node): this host's sockets, its kube-apiserver
    /// and the datastore's API server or etcd. Exit status 3 when a finding is as severe as
    /// --fail-on (default high).
    ///
    /// Example: malla audit --lab demo -o json
    Audit(audit::AuditArgs),
    /// Print the CustomResourceDefinitions of the Kubernetes datastore (deploy/crds.yaml).
    ///
    /// Example: malla crds | kubectl apply -f -
    Crds,
    /// Print a shell completion script (bash, zsh or fish).
    ///
    /// Example: malla completion bash > /etc/bash_completion.d/malla
    Completion { shell: clap_complete::Shell },
    /// (internal) Print the command reference, docs/reference/cli.md.
    #[command(hide = true)]
    Reference,
    /// Install the CNI plugin and Malla's conflist on this node (atomically).
    ///
    /// --datastore defaults to /var/lib/malla/store.db here.
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

/// The command line's definition, for the generated reference and completion scripts.
pub fn cli_command() -> clap::Command {
    Cli::command()
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
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    cli.globals.datastore_from_env =
        matches.value_source("datastore") == Some(clap::parser::ValueSource::EnvVariable);
    // Like other Unix tools, end quietly when the reader of our output goes away (`| head`).
    // Not the agent: a daemon with sockets must see EPIPE as an error, not die of the signal
    // when a datastore server it writes to goes away (killed silently, mid-outage).
    // Nor the page's server (`malla ui`): a browser may close a connection mid-answer.
    if !matches!(cli.command, Command::Agent { .. } | Command::Ui(_)) {
        // SAFETY: restoring the default disposition of a signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let g = cli.globals;
    let result = match cli.command {
        Command::Crds => {
            print!("{}", malla_store::kubernetes::kinds::crds_yaml());
            Ok(())
        }
        Command::Reference => {
            print!("{}", reference::markdown());
            Ok(())
        }
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "malla", &mut std::io::stdout());
            Ok(())
        }
        Command::Agent {
            node,
            underlay_interface,
            ready_file,
            resync_secs,
            config_dir,
            http_listen,
            cni_conf_dir,
            no_flow_logs,
            cni_bin_dir,
            uninstall_with,
            no_services,
        } => g.init_logging().and_then(|()| {
            malla_agent::run(malla_agent::AgentConfig {
                node,
                datastore: g.require_spec("malla agent")?,
                underlay_interface,
                resync: Duration::from_secs(resync_secs.max(1)),
                ready_file,
                config_dir,
                http_listen: http_listen.0,
                cni_conf_dir,
                flow_logs: !no_flow_logs,
                cni_bin_dir,
                uninstall_with,
                services: !no_services,
            })
        }),
        Command::Cleanup {
            cni_conf_dir,
            cni_bin_dir,
            ready_file,
        } => cleanup(malla_agent::uninstall::Leftovers {
            cni_conf_dir,
            cni_bin_dir,
            ready_file,
        }),
        Command::Ipam { command } => ipam_cmd::run(&g, command),
        Command::Lab(args) => lab_cmd::run(&g, args),
        Command::Bgp { command } => bgp_cmd::run(&g, command),
        Command::Services(args) => services_cmd::run(&g, args),
        Command::Policy { command } => policy_cmd::run(&g, command),
        Command::Status(args) => status_cmd::run(&g, args),
        Command::Flows(args) => flows_cmd::run(&g, args),
        Command::Ui(args) => ui_cmd::run(&g, args),
        Command::Diags(args) => diags::run(&g, args),
        Command::Audit(args) => audit::run(&g, args),
        Command::InstallCni {
            bin_dir,
            conf_dir,
            node_name,
            agent_ready_file,
            cni_version,
            plugin_binary,
            force,
        } => g
            .spec()
            .map(|s| {
                s.unwrap_or(malla_store::DatastoreSpec::Local {
                    path: "/var/lib/malla/store.db".into(),
                })
            })
            .and_then(|datastore| in_cluster_datastore(datastore, &conf_dir))
            .and_then(|datastore| {
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
    match result {
        Ok(()) => std::process::exit(exit::OK),
        Err(e) => {
            if let Some(code) = e.downcast_ref::<ExitWith>() {
                std::process::exit(code.0);
            }
            eprintln!("error: {}", globals::in_words(&e));
            std::process::exit(exit::ERROR);
        }
    }
}

/// Ends the command with this exit status after it printed its findings (e.g. [`exit::FOUND_PROBLEM`]).
#[derive(Debug)]
pub struct ExitWith(pub i32);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

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

/// `malla cleanup`: the node cleaned, what was removed printed, an error if anything failed.
fn cleanup(leftovers: malla_agent::uninstall::Leftovers) -> anyhow::Result<()> {
    let done = malla_agent::uninstall::cleanup_blocking(&leftovers)?;
    for r in &done.removed {
        println!("removed {r}");
    }
    anyhow::ensure!(
        done.errors.is_empty(),
        "cleanup: {}",
        done.errors.join("; ")
    );
    Ok(())
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
