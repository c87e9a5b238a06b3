//! `pod-start`: pod start to Ready through real kubelets (`malla lab up --kubelet`), with Malla
//! installed from `deploy/` against the reference `bridge` + `host-local` conflist, on the same
//! cluster in the same run.
//!
//! The cluster: a `--kubelet` lab of `--nodes` nodes (containerd and kubelet v1.20 on each).
//! First the reference: every node gets a `bridge` + `host-local` conflist (a `/24` per node
//! from 198.19.200.0/21, host-local's state in the node's directory) and turns Ready; then,
//! that conflist removed, Malla is applied from `deploy/` (the image given with `--image`) and
//! every node turns Ready again. In each variant `-n` pods are started one after the other,
//! round-robin over the nodes (`nodeName`, the image's probe server as command); a sample is
//! the time from just before `kubectl create` to the return of `kubectl wait
//! --for=condition=Ready` (a watch): the API server, the kubelet's sync, containerd's sandbox
//! with the CNI ADD, the container start and the status update. Both variants carry the same
//! two kubectl process starts. The agent's RSS (`VmRSS` of every `malla agent`) and the
//! DaemonSet's rollout time are printed too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::RoutingMode;
use malla_bench::{begin, check, ms, percentile, ratio_d, require_file, BinArgs, Lab};
use malla_lab::control_plane::Access;

#[derive(Parser, Debug)]
#[command(
    name = "pod-start",
    version,
    about = "pod start to Ready through kubelet: Malla from deploy/ vs bridge+host-local"
)]
struct Args {
    /// Malla's image (an OCI archive from scripts/build-image).
    #[arg(long)]
    image: PathBuf,
    /// Timed pods per variant.
    #[arg(long, short = 'n', default_value_t = 30)]
    pods: usize,
    /// Nodes of the cluster.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// The manifests to install (deploy/ of this repository).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))]
    deploy: PathBuf,
    #[command(flatten)]
    bins: BinArgs,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
}

fn kubectl(access: &Access, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    access.kubectl_run(args, stdin)
}

/// The reference conflist of node `i` (1-based): a bridge with a host-local /24.
fn reference_conflist(i: usize, state_dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "bridge",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": state_dir,
                "ranges": [[{"subnet": format!("198.19.{}.0/24", 200 + i)}]],
            },
        }],
    })
}

/// Starts `n` pods one by one; the start-to-Ready time of each.
fn start_pods(
    access: &Access,
    tag: &str,
    n: usize,
    nodes: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for k in 0..n {
        check(deadline)?;
        let name = format!("{tag}-{k}");
        let node = format!("node-{}", k % nodes + 1);
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{bench: {tag}}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: probe\n    image: ghcr.io/malla-net/malla:0.1.0\n    imagePullPolicy: Never\n    command: [malla, lab, probe-server, --name, {name}, --listen, \"8080/tcp\"]\n"
        );
        let t = Instant::now();
        kubectl(access, &["create", "-f", "-"], Some(&pod))?;
        kubectl(
            access,
            &[
                "wait",
                "--for=condition=Ready",
                &format!("pod/{name}"),
                "--timeout=120s",
            ],
            None,
        )
        .with_context(|| format!("pod {name} on {node}"))?;
        samples.push(t.elapsed());
    }
    kubectl(
        access,
        &[
            "delete",
            "pod",
            "-l",
            &format!("bench={tag}"),
            "--wait=true",
            "--timeout=180s",
        ],
        None,
    )?;
    Ok(samples)
}

fn wait_nodes_ready(access: &Access) -> anyhow::Result<()> {
    kubectl(
        access,
        &[
            "wait",
            "--for=condition=Ready",
            "node",
            "--all",
            "--timeout=180s",
        ],
        None,
    )?;
    Ok(())
}

/// The summed VmRSS (KiB) of every running `malla agent`.
fn agent_rss_kib() -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let p = e.path();
        let Ok(cmd) = std::fs::read(p.join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.starts_with("malla\0agent\0") {
            continue;
        }
        let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    malla_bench::install_signal_handlers();
    let deadline = begin(args.max_seconds)?;
    let bins = args.bins.required()?;
    require_file(&args.image, "build it: scripts/build-image FILE")?;
    if args.nodes == 0 || args.pods == 0 {
        bail!("--nodes and --pods must be at least 1");
    }
    let mut opts = bins.up_options(args.nodes, RoutingMode::Direct);
    opts.kubelet = true;
    opts.datastore = malla_lab::store::Backend::Kubernetes;
    opts.images = vec![args.image.clone()];
    eprintln!("pod-start: bringing up a {}-node --kubelet lab", args.nodes);
    let t = Instant::now();
    let lab = Lab::up("podstart", &opts)?;
    eprintln!("pod-start: lab up in {:.1} s", t.elapsed().as_secs_f64());
    let access = malla_lab::control_plane::access(&malla_lab::store::control_plane_options(
        &lab.paths,
        &lab.state.fabric_netns,
    ))?;

    // The reference conflist on every node.
    for (i, node) in lab.state.nodes.iter().enumerate() {
        let files = malla_lab::kubelet::NodeFiles::new(&lab.paths, &node.name);
        let state = files.dir.join("host-local");
        std::fs::create_dir_all(&state)?;
        std::fs::write(
            files.net_d().join("10-bridge.conflist"),
            serde_json::to_vec_pretty(&reference_conflist(i + 1, &state))?,
        )?;
    }
    wait_nodes_ready(&access)?;
    eprintln!("pod-start: bridge+host-local: {} pods", args.pods);
    let reference = start_pods(&access, "ref", args.pods, args.nodes, deadline)?;
    for node in &lab.state.nodes {
        let files = malla_lab::kubelet::NodeFiles::new(&lab.paths, &node.name);
        std::fs::remove_file(files.net_d().join("10-bridge.conflist"))?;
    }

    // Malla from deploy/.
    let work = malla_bench::temp_dir("the edited deploy/")?;
    let deploy = malla_lab::kubelet::deploy_for_lab(&args.deploy, &work.path().join("deploy"))?;
    let t = Instant::now();
    kubectl(
        &access,
        &["apply", "-f", &deploy.display().to_string()],
        None,
    )?;
    kubectl(
        &access,
        &[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "daemonset/malla",
            "--timeout=240s",
        ],
        None,
    )?;
    let rollout = t.elapsed();
    wait_nodes_ready(&access)?;
    eprintln!("pod-start: malla: {} pods", args.pods);
    let malla = start_pods(&access, "malla", args.pods, args.nodes, deadline)?;
    let rss = agent_rss_kib();

    println!(
        "pod start to Ready through kubelet, {} pods one by one over {} nodes (ms)",
        args.pods, args.nodes
    );
    println!("{:<22} {:>9} {:>9}", "variant", "p50", "p99");
    for (name, v) in [("malla", &malla), ("bridge+host-local", &reference)] {
        println!(
            "{:<22} {:>9} {:>9}",
            name,
            ms(percentile(v, 50.0)),
            ms(percentile(v, 99.0))
        );
    }
    println!(
        "ratio malla/reference: p50 {:.2}, p99 {:.2}",
        ratio_d(percentile(&malla, 50.0), percentile(&reference, 50.0)),
        ratio_d(percentile(&malla, 99.0), percentile(&reference, 99.0))
    );
    println!(
        "DaemonSet apply to rolled out on {} nodes: {:.1} s; agent RSS: {:.1} MiB per node",
        args.nodes,
        rollout.as_secs_f64(),
        rss as f64 / 1024.0 / args.nodes as f64
    );
    drop(lab);
    Ok(())
}
