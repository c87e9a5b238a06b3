//! Uninstall: `kubectl delete -f deploy/` leaves the node as Malla found it.
//!
//! On SIGTERM an agent started with `--uninstall-with NAMESPACE/DAEMONSET` asks the API server
//! whether the DaemonSet that runs it still exists ([`verdict`]). It does (a rolling update, a
//! restart, a node shutting down): the agent exits and leaves the kernel as it is, so
//! established traffic keeps flowing and the next agent adopts it. It is gone or being deleted,
//! or the agent's own identity went with it (its ServiceAccount or ClusterRoleBinding, deleted
//! by the same `kubectl delete`: 401 or 403): the agent removes everything Malla put on the
//! node ([`cleanup`]). An API server that does not answer means *keep*: cleaning a node that
//! still runs Malla's pods is the one mistake not to make.
//!
//! [`cleanup`] is also `malla cleanup`, by hand, as Cilium's `cilium-dbg cleanup` and Calico's
//! `calico-node -cleanup` are: the `inet malla` nftables table, the routes stamped with Malla's
//! protocol (and BIRD's, when the node ran Malla's BIRD, which is stopped first), the VXLAN
//! device, the host side of pod veths, the CNI conflist, plugin, kubeconfig and CA, and the
//! agent's state files (ready file, lock, node name, node cache, BIRD's directory).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use malla_dataplane::netlink::Netlink;

/// How long the API server is given to say whether the DaemonSet exists.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the agent's loop is given to stop before the cleanup starts anyway.
const PARK_TIMEOUT: Duration = Duration::from_secs(3);
/// BIRD's `rtm_protocol` (`RTPROT_BIRD`): the routes its kernel protocol installs.
const BIRD_ROUTE_PROTOCOL: u8 = 12;

static STOP: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicBool = AtomicBool::new(false);

/// Whether the agent is stopping to clean up: its loop must change nothing more.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Called by the agent's loop once [`stop_requested`]: never returns, so nothing it would apply
/// races the cleanup.
pub async fn park() -> ! {
    PARKED.store(true, Ordering::SeqCst);
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// The DaemonSet whose deletion means "uninstall", as `NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
}

impl FromStr for Owner {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Owner {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!("{s:?}: expected NAMESPACE/DAEMONSET")),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a SIGTERM means, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A restart or an update: leave the node as it is.
    Keep(String),
    /// Malla is being removed: clean the node.
    Uninstall(String),
}

/// Asks the API server (through `kubeconfig`, or in-cluster) whether `owner` still exists.
pub async fn verdict(kubeconfig: Option<&Path>, owner: &Owner) -> Verdict {
    match tokio::time::timeout(ASK_TIMEOUT, ask(kubeconfig, owner)).await {
        Ok(v) => v,
        Err(_) => Verdict::Keep(format!(
            "the API server did not answer within {ASK_TIMEOUT:?}"
        )),
    }
}

async fn ask(kubeconfig: Option<&Path>, owner: &Owner) -> Verdict {
    let config = match kubeconfig {
        Some(p) => match kube::config::Kubeconfig::read_from(p) {
            Ok(kc) => kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", p.display())),
            Err(e) => Err(format!("kubeconfig {}: {e}", p.display())),
        },
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("kubernetes config: {e}")),
    };
    let client = match config.and_then(|c| kube::Client::try_from(c).map_err(|e| e.to_string())) {
        Ok(c) => c,
        Err(e) => return Verdict::Keep(e),
    };
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, &owner.namespace);
    match api.get_opt(&owner.name).await {
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => {
            Verdict::Uninstall(format!("DaemonSet {owner} is being deleted"))
        }
        Ok(Some(_)) => Verdict::Keep(format!("DaemonSet {owner} exists")),
        Ok(None) => Verdict::Uninstall(format!("DaemonSet {owner} is gone")),
        Err(e) => match api_code(&e) {
            Some(code @ (401 | 403)) => Verdict::Uninstall(format!(
                "the agent's service account or its role is gone with DaemonSet {owner} ({code})"
            )),
            _ => Verdict::Keep(format!("asking for DaemonSet {owner}: {e}")),
        },
    }
}

/// The HTTP status of an API server's refusal.
fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// What [`cleanup`] removes beside the kernel objects.
#[derive(Debug, Clone, Default)]
pub struct Leftovers {
    /// The host's CNI configuration directory (conflist, plugin kubeconfig and CA).
    pub cni_conf_dir: Option<PathBuf>,
    /// The host's CNI plugin directory (the `malla` plugin).
    pub cni_bin_dir: Option<PathBuf>,
    /// The agent's ready file: it, its lock, the node-name file, the node cache and BIRD's
    /// directory beside it.
    pub ready_file: Option<PathBuf>,
}

/// What [`cleanup`] did.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub removed: Vec<String>,
    pub errors: Vec<String>,
}

/// BIRD's state directory, as [`crate::bgp::BgpNode`] chooses it.
fn bird_dir(ready_file: Option<&Path>) -> PathBuf {
    ready_file
        .and_then(Path::parent)
        .map(|d| d.join("bird"))
        .unwrap_or_else(|| PathBuf::from("/run/malla/bird"))
}

/// Removes what Malla put on this node (this thread's network namespace), carrying on past
/// errors: every object it can remove is removed, every failure reported. Needs a tokio runtime.
pub async fn cleanup(what: &Leftovers) -> Cleaned {
    let mut done = Cleaned::default();
    let err = |done: &mut Cleaned, e: String| {
        tracing::warn!(error = %e, "cleanup");
        done.errors.push(e);
    };
    // BIRD first: it would put back the routes it persisted.
    let bird = bird_dir(what.ready_file.as_deref());
    let ran_bird = bird.is_dir();
    if ran_bird {
        if let Some(pid) = stop_bird(&bird.join("bird.pid")) {
            done.removed.push(format!("BIRD (pid {pid})"));
        }
    }
    match malla_dataplane::nft::table_exists(None, "inet", "malla") {
        Ok(true) => {
            match malla_dataplane::nft::run(None, &["delete", "table", "inet", "malla"], "") {
                Ok(_) => done.removed.push("nftables table inet malla".into()),
                Err(e) => err(&mut done, format!("deleting table inet malla: {e}")),
            }
        }
        Ok(false) => {}
        Err(e) => err(&mut done, format!("listing nftables tables: {e}")),
    }
    match Netlink::connect() {
        Ok(nl) => {
            match nl.links().await {
                Ok(links) => {
                    for l in links.iter().filter(|l| {
                        l.name == malla_dataplane::linux::vxlan::VXLAN_DEVICE
                            || (l.name.starts_with(malla_cni::pod::HOST_IFNAME_PREFIX)
                                && l.kind.as_deref() == Some("veth"))
                    }) {
                        match nl.delete_link(l.index).await {
                            Ok(()) => done.removed.push(format!("link {}", l.name)),
                            Err(e) => err(&mut done, format!("deleting link {}: {e}", l.name)),
                        }
                    }
                }
                Err(e) => err(&mut done, format!("listing links: {e}")),
            }
            let mut protocols = vec![malla_dataplane::MALLA_ROUTE_PROTOCOL];
            if ran_bird {
                protocols.push(BIRD_ROUTE_PROTOCOL);
            }
            for p in protocols {
                match nl.delete_routes_with_protocol(p).await {
                    Ok(0) => {}
                    Ok(n) => done.removed.push(format!("{n} routes of protocol {p}")),
                    Err(e) => err(&mut done, format!("deleting routes of protocol {p}: {e}")),
                }
            }
        }
        Err(e) => err(&mut done, format!("netlink: {e}")),
    }
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(conf) = &what.cni_conf_dir {
        let conflist = conf.join(malla_cni::install::CONFLIST_NAME);
        // Only Malla's: a conflist of that name someone else wrote is theirs.
        let ours = std::fs::read(&conflist)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| malla_cni::install::is_mallas(&v));
        if ours {
            files.push(conflist);
        }
        files.push(conf.join("malla-kubeconfig"));
        files.push(conf.join("malla-ca.crt"));
    }
    if let Some(bin) = &what.cni_bin_dir {
        files.push(bin.join(malla_cni::install::PLUGIN_NAME));
    }
    if let Some(ready) = &what.ready_file {
        let mut lock = ready.as_os_str().to_owned();
        lock.push(".lock");
        let cache = malla_ipam::node_cache::NodeCache::path_beside(ready);
        for suffix in ["-wal", "-shm", "-journal"] {
            let mut p = cache.as_os_str().to_owned();
            p.push(suffix);
            files.push(p.into());
        }
        files.extend([
            ready.clone(),
            lock.into(),
            malla_cni::config::node_name_file_beside(ready),
            cache,
        ]);
    }
    for f in files {
        match std::fs::remove_file(&f) {
            Ok(()) => done.removed.push(f.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => err(&mut done, format!("removing {}: {e}", f.display())),
        }
    }
    if ran_bird {
        match std::fs::remove_dir_all(&bird) {
            Ok(()) => done.removed.push(bird.display().to_string()),
            Err(e) => err(&mut done, format!("removing {}: {e}", bird.display())),
        }
    }
    done
}

/// [`cleanup`] on a runtime of its own (`malla cleanup`).
pub fn cleanup_blocking(what: &Leftovers) -> std::io::Result<Cleaned> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(cleanup(what)))
}

/// Stops the BIRD whose pid file is `pid_file` (checked to be a `bird` process: a stale pid
/// file names nobody's process) and waits up to 3 s for it to exit. Its pid when it ran.
fn stop_bird(pid_file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if comm.trim() != "bird" || pid <= 1 {
        return None;
    }
    // SAFETY: a plain kill(2) of the process just checked to be our BIRD.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(pid)
}

/// With `cfg.uninstall_with`: a thread that waits for SIGTERM, asks for the verdict, cleans up
/// the node on [`Verdict::Uninstall`] (after the agent's loop [`park`]ed), and ends the process.
/// Without it, SIGTERM keeps its default action (the process ends, the kernel is kept).
pub fn watch_sigterm(cfg: &crate::AgentConfig) -> anyhow::Result<()> {
    let Some(owner) = cfg.uninstall_with.clone() else {
        return Ok(());
    };
    let kubeconfig = match &cfg.datastore {
        malla_store::DatastoreSpec::Kubernetes { kubeconfig } => kubeconfig.clone(),
        other => anyhow::bail!("--uninstall-with needs the Kubernetes datastore, not {other}"),
    };
    let leftovers = Leftovers {
        cni_conf_dir: cfg.cni_conf_dir.clone(),
        cni_bin_dir: cfg.cni_bin_dir.clone(),
        ready_file: cfg.ready_file.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered here, before the agent does anything: a SIGTERM from now on is ours.
    let mut term = {
        let _guard = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?
    };
    std::thread::Builder::new()
        .name("uninstall".into())
        .spawn(move || {
            rt.block_on(async {
                term.recv().await;
                STOP.store(true, Ordering::SeqCst);
                match verdict(kubeconfig.as_deref(), &owner).await {
                    Verdict::Keep(why) => {
                        tracing::info!(%why, "SIGTERM: exiting, the node's dataplane kept");
                    }
                    Verdict::Uninstall(why) => {
                        tracing::info!(%why, "SIGTERM: Malla is uninstalled; cleaning the node");
                        let deadline = Instant::now() + PARK_TIMEOUT;
                        while !PARKED.load(Ordering::SeqCst) && Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let done = cleanup(&leftovers).await;
                        tracing::info!(removed = ?done.removed, errors = done.errors.len(), "node cleaned");
                    }
                }
            });
            std::process::exit(0);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_namespace_slash_name() {
        assert_eq!(
            "kube-system/malla".parse::<Owner>(),
            Ok(Owner {
                namespace: "kube-system".into(),
                name: "malla".into()
            })
        );
        for bad in ["malla", "/malla", "kube-system/", "a/b/c", ""] {
            assert!(bad.parse::<Owner>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bird_dir_follows_the_ready_file() {
        assert_eq!(
            bird_dir(Some(Path::new("/var/run/malla/agent.ready"))),
            Path::new("/var/run/malla/bird")
        );
        assert_eq!(bird_dir(None), Path::new("/run/malla/bird"));
    }
}
