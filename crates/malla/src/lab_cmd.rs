//! `malla lab …`: up, down, apply, delete, get pods, probe, demo (and the hidden probe server).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use malla_api::RoutingMode;
use malla_lab::manifest;
use malla_lab::probe::{self, Filter};
use malla_lab::runtime;
use malla_lab::topology::{self, UpOptions};
use malla_lab::{LabPaths, LabState};

#[derive(Args)]
pub struct LabArgs {
    /// Lab name: namespaces are called malla-<lab>-*.
    #[arg(long, global = true, env = "MALLA_LAB", default_value = "demo")]
    lab: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Create the lab: fabric, nodes with agents, external. Idempotent.
    ///
    /// Example: malla lab up --nodes 3 --routing vxlan --ipv6
    Up(UpArgs),
    /// Remove everything the lab created (also leftovers after a crash).
    Down,
    /// Create Namespaces and Pods from Kubernetes manifests (the lab acts as the runtime).
    ///
    /// Example: malla lab apply -f examples/shop.yaml
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete the Pods (and Namespaces) of a manifest through CNI DEL.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Show lab objects.
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
    /// Probe reachability: every pod→pod pair on every declared port and protocol, node→pod
    /// for the node's own pods, and pod→external.
    ///
    /// Example: malla lab probe --from default/client --protocol tcp -o json
    Probe(ProbeArgs),
    /// Up + the sample app from examples/ + probe, printed as a matrix.
    Demo {
        #[command(flatten)]
        up: UpArgs,
        /// Manifest to apply (default: the built-in sample app).
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
    },
    /// (internal) The probe server a lab pod runs.
    #[command(hide = true)]
    ProbeServer {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: String,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct UpArgs {
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// direct or vxlan.
    #[arg(long, default_value = "direct")]
    routing: RoutingMode,
    /// Dual-stack: an IPv6 pool and underlay too.
    #[arg(long)]
    ipv6: bool,
    /// The datastore: local (an embedded file), etcd (a real etcd the lab runs on its fabric) or
    /// kubernetes (a real kube-apiserver + kube-controller-manager v1.20 there, from
    /// scripts/k8s-control-plane).
    #[arg(long, default_value = "local")]
    datastore: malla_lab::store::Backend,
}

#[derive(Subcommand)]
enum GetWhat {
    /// Pods with their node and addresses.
    Pods {
        /// table, wide or json.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
}

#[derive(Args)]
struct ProbeArgs {
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Only from this source (namespace/name, node/NAME).
    #[arg(long)]
    from: Option<String>,
    /// Only to this destination (namespace/name or external).
    #[arg(long)]
    to: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// tcp or udp.
    #[arg(long)]
    protocol: Option<String>,
    /// Separate connections per source and target (see load spread and affinity).
    #[arg(long, default_value_t = 1)]
    count: usize,
}

/// Where a read-only command finds the datastore: `--datastore`, or the lab's.
#[derive(Args)]
pub struct StoreArgs {
    /// The datastore: a file path or etcd://HOST:PORT/PREFIX (default: the lab's).
    #[arg(long)]
    pub datastore: Option<malla_store::DatastoreSpec>,
    /// The lab whose datastore (and namespaces) to read.
    #[arg(long, env = "MALLA_LAB", default_value = "demo")]
    pub lab: String,
}

impl StoreArgs {
    /// Opens the datastore given, or the lab's.
    pub fn open(&self) -> anyhow::Result<Box<dyn malla_store::Store>> {
        match &self.datastore {
            Some(spec) => Ok(spec.open()?),
            None => {
                let paths = LabPaths::new(&self.lab, state_root().as_deref())?;
                let state = LabState::require(&paths)?;
                malla_lab::store::open(&paths, &state)
            }
        }
    }
}

/// The state root, overridable for tests.
pub fn state_root() -> Option<PathBuf> {
    std::env::var_os("MALLA_LAB_STATE_DIR").map(PathBuf::from)
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MALLA_CNI_BIN").filter(|_| name == "malla-cni") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    anyhow::ensure!(p.exists(), "{} not found next to {}", name, exe.display());
    Ok(p)
}

fn up_options(a: &UpArgs) -> anyhow::Result<UpOptions> {
    Ok(UpOptions {
        nodes: a.nodes,
        routing: a.routing,
        ipv6: a.ipv6,
        malla_bin: std::env::current_exe()?,
        cni_bin: sibling_binary("malla-cni")?,
        datastore: a.datastore,
    })
}

const SAMPLE_APP: &str = include_str!("../../../examples/demo.yaml");

pub fn run(args: LabArgs) -> anyhow::Result<()> {
    let paths = LabPaths::new(&args.lab, state_root().as_deref())?;
    match args.command {
        LabCommand::Up(a) => {
            let state = topology::up(&paths, &up_options(&a)?)?;
            println!(
                "lab {} is up: {} nodes, routing {}, {}",
                state.name,
                state.nodes.len(),
                state.routing,
                if state.ipv6 { "dual-stack" } else { "IPv4" }
            );
        }
        LabCommand::Down => {
            let removed = topology::down(&paths)?;
            println!(
                "lab {} is down ({} namespaces removed)",
                paths.name,
                removed.len()
            );
        }
        LabCommand::Apply { file } => {
            for o in runtime::apply(&paths, &std::env::current_exe()?, &read_manifest(&file)?)? {
                println!("{o}");
            }
        }
        LabCommand::Delete { file } => {
            for o in runtime::delete(&paths, &read_manifest(&file)?)? {
                println!("{o}");
            }
        }
        LabCommand::Get {
            what: GetWhat::Pods { output },
        } => print_pods(&LabState::require(&paths)?, &output)?,
        LabCommand::Probe(a) => {
            let state = LabState::require(&paths)?;
            let filter = Filter {
                from: a.from,
                to: a.to,
                port: a.port,
                protocol: a.protocol,
                count: a.count,
            };
            let results = probe::run(
                probe::plan(&state, &filter)?,
                Duration::from_millis(a.timeout_ms),
            )?;
            if a.output == "json" {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                println!(
                    "{:<22} {:<22} {:<24} {:>5} {:<4} {:<5} {:<24} ERROR",
                    "FROM", "TO", "IP", "PORT", "PROTO", "OK", "CLIENT -> SEEN"
                );
                for r in &results {
                    println!(
                        "{:<22} {:<22} {:<24} {:>5} {:<4} {:<5} {:<24} {}",
                        r.from,
                        r.to,
                        r.ip.to_string(),
                        r.port,
                        r.protocol,
                        r.connected,
                        format!("{} -> {}", opt(r.client_ip), opt(r.seen_source_ip)),
                        r.error.as_deref().unwrap_or("")
                    );
                }
            }
            if results.iter().any(|r| !r.connected) {
                std::process::exit(3);
            }
        }
        LabCommand::Demo { up, file } => demo(&paths, &up, file.as_deref())?,
        LabCommand::ProbeServer {
            name,
            listen,
            ready_file,
        } => probe::serve(&name, &probe::parse_listen(&listen)?, ready_file.as_deref())?,
    }
    Ok(())
}

fn opt(ip: Option<std::net::IpAddr>) -> String {
    ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into())
}

fn read_manifest(file: &Path) -> anyhow::Result<Vec<manifest::Object>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    manifest::parse(&text).with_context(|| format!("{}", file.display()))
}

fn print_pods(state: &LabState, output: &str) -> anyhow::Result<()> {
    match output {
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(&state.pods.values().collect::<Vec<_>>())?
        ),
        "table" | "wide" => {
            let wide = output == "wide";
            print!(
                "{:<16} {:<20} {:<10} {:<40}",
                "NAMESPACE", "NAME", "NODE", "IPS"
            );
            if wide {
                print!(" {:<20} NETNS", "PORTS");
            }
            println!();
            for p in state.pods.values() {
                let ips: Vec<String> = p.ips.iter().map(|i| i.to_string()).collect();
                print!(
                    "{:<16} {:<20} {:<10} {:<40}",
                    p.namespace,
                    p.name,
                    p.node,
                    ips.join(",")
                );
                if wide {
                    let ports: Vec<String> = p
                        .ports
                        .iter()
                        .map(|x| format!("{}/{}", x.port, x.protocol))
                        .collect();
                    print!(" {:<20} {}", ports.join(","), p.netns);
                }
                println!();
            }
        }
        other => anyhow::bail!("-o {other}: expected table, wide or json"),
    }
    Ok(())
}

fn demo(paths: &LabPaths, up: &UpArgs, file: Option<&Path>) -> anyhow::Result<()> {
    let state = topology::up(paths, &up_options(up)?)?;
    println!(
        "lab {} is up: {} nodes, routing {}{}",
        state.name,
        state.nodes.len(),
        state.routing,
        if state.ipv6 { ", dual-stack" } else { "" }
    );
    let objects = match file {
        Some(f) => read_manifest(f)?,
        None => manifest::parse(SAMPLE_APP).context("built-in sample app")?,
    };
    for o in runtime::apply(paths, &std::env::current_exe()?, &objects)? {
        println!("{o}");
    }
    let state = LabState::require(paths)?;
    println!();
    print_pods(&state, "table")?;
    println!();
    let results = probe::run(
        probe::plan(&state, &Filter::default())?,
        Duration::from_millis(1000),
    )?;
    print!("{}", probe::matrix(&results));
    let direct = results
        .iter()
        .filter(|r| r.to != "external" && r.no_nat())
        .count();
    let pod_pairs = results.iter().filter(|r| r.to != "external").count();
    println!("{direct}/{pod_pairs} pod probes saw the client's own address (no NAT)");
    println!("\nNext: `malla lab probe -o json`, `malla ipam show`, `malla lab down`.");
    Ok(())
}
