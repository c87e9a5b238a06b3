//! A real Kubernetes control plane (v1.20) for the lab (`malla lab up --datastore kubernetes`):
//! etcd (Debian's `/usr/bin/etcd`), kube-apiserver and, optionally, kube-controller-manager with
//! only the controllers a cluster without kubelets wants (endpoints, endpoint slices, namespaces,
//! service accounts, garbage collection; no node lifecycle, so nothing marks pods NotReady).
//! With [`Options::kubelets`] (`malla lab up --kubelet`, real kubelets on the nodes:
//! [`crate::kubelet`]) it is a cluster as kubeadm makes one: kube-scheduler too, the workload
//! controllers (DaemonSets, Deployments, ReplicaSets), the ServiceAccount and NodeRestriction
//! admission plugins, the `kubernetes` Service's endpoints kept by the API server, and a client
//! certificate the API server shows the kubelets (`apiserver-kubelet-client`, system:masters).
//!
//! The binaries come from `$MALLA_K8S_DIR/bin` (default `/var/cache/malla/k8s-1.20.2/bin`),
//! built once by `scripts/k8s-control-plane`. Everything else is generated in the state
//! directory:
//!
//! ```text
//! STATE/pki/ca.{crt,key}              the cluster CA (EC P-256, 10 years)
//! STATE/pki/apiserver.{crt,key}       the API server's serving certificate (SANs: the listen
//!                                     address, 127.0.0.1, the `kubernetes` Service's IP and names)
//! STATE/pki/service-account.{key,pub} the service-account token signing pair (RSA 2048)
//! STATE/tokens.csv                    static tokens: `admin` and `system:kube-controller-manager`,
//!                                     both in group system:masters
//! STATE/kubeconfig                    admin kubeconfig (server, embedded CA, token): kubectl,
//!                                     `KUBECONFIG`, `kube::Config::from_custom_kubeconfig`
//! STATE/controller-manager.kubeconfig the controller manager's
//! STATE/scheduler.kubeconfig          the scheduler's (static token of system:kube-scheduler)
//! STATE/pki/apiserver-kubelet-client.{crt,key}  what the API server shows kubelets (kubelets)
//! STATE/etcd/                         etcd's data (when this module starts etcd)
//! STATE/logs/{etcd,kube-apiserver,kube-controller-manager}.log
//! ```
//!
//! This module is what the lab needs at run time: a [`Plan`] (binaries found, state directory
//! made) that spawns each component and waits until it answers, and [`start_detached`], which
//! spawns them in their own sessions and returns their pids for [`stop_detached`] to kill later
//! — `malla lab up` / `down`, with [`Options::in_netns`] in the lab's fabric namespace. Tests
//! want a control plane they own instead, on 127.0.0.1 with free ports and killed (by the exact
//! pids it spawned) when dropped: that harness is `malla-test-kit`'s `control_plane`, a dev-only
//! crate built on this [`Plan`]. Both reuse the state directory, so a restart keeps the cluster.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use malla_dataplane::netns::NetNs;
use serde::{Deserialize, Serialize};

/// Where `scripts/k8s-control-plane` puts the binaries (under `bin/`) unless `MALLA_K8S_DIR`
/// says otherwise.
pub const DEFAULT_K8S_DIR: &str = "/var/cache/malla/k8s-1.20.2";
/// The environment variable naming the cache directory.
pub const K8S_DIR_ENV: &str = "MALLA_K8S_DIR";
/// The script that builds the binaries.
pub const BUILD_SCRIPT: &str = "scripts/k8s-control-plane";
/// The API server's port in the lab.
pub const LAB_APISERVER_PORT: u16 = 6443;
/// The lab's etcd ports (client on the fabric address, peer on the fabric's loopback).
pub const LAB_ETCD_PORTS: (u16, u16) = (2379, 2380);
/// Issuer of service-account tokens.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc";
/// Where the API server keeps its objects in etcd (its default; Malla's own keys in a shared
/// etcd live under `/malla-<lab>`).
pub const ETCD_PREFIX: &str = "/registry";

/// The controllers kube-controller-manager runs.
pub const CONTROLLERS: &str = "endpoint,endpointslice,endpointslicemirroring,namespace,serviceaccount,serviceaccount-token,garbagecollector";

/// The controllers kube-controller-manager runs when the nodes run kubelets: the above and the
/// workload controllers, pod GC and the `kube-root-ca.crt` publisher (no node IPAM: Malla
/// allocates; no cloud, volume or certificate controllers: the lab signs its own).
pub const KUBELET_CONTROLLERS: &str = "endpoint,endpointslice,endpointslicemirroring,namespace,serviceaccount,serviceaccount-token,garbagecollector,daemonset,deployment,replicaset,podgc,ttl,root-ca-cert-publisher,nodelifecycle";

/// Where kube-scheduler answers `/healthz` (plain HTTP, the control plane namespace's loopback).
pub const SCHEDULER_HEALTHZ_PORT: u16 = 10251;

/// The service range: the lab's own (198.19.64.0/18, [`crate::addresses::SERVICE_CIDR_V4`]), so
/// the API server hands out the addresses the lab would.
pub fn default_service_cidr() -> String {
    let (base, count) = crate::addresses::SERVICE_CIDR_V4;
    format!("{base}/{}", 32 - count.trailing_zeros())
}

/// One process of the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    Etcd,
    ApiServer,
    ControllerManager,
    Scheduler,
}

impl Component {
    /// The program's name (and its log file's).
    pub fn name(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::ApiServer => "kube-apiserver",
            Component::ControllerManager => "kube-controller-manager",
            Component::Scheduler => "kube-scheduler",
        }
    }
}

/// The Kubernetes binaries (kube-scheduler and kubelet are needed only with kubelets:
/// [`Binaries::require_kubelet`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kubectl: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kubelet: PathBuf,
}

impl Binaries {
    /// The cache directory: `$MALLA_K8S_DIR` or [`DEFAULT_K8S_DIR`].
    pub fn cache_dir() -> PathBuf {
        std::env::var_os(K8S_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_K8S_DIR))
    }

    /// The binaries in `$MALLA_K8S_DIR/bin`; an error naming `scripts/k8s-control-plane` when
    /// any is missing.
    pub fn find() -> anyhow::Result<Self> {
        Self::in_dir(&Self::cache_dir().join("bin"))
    }

    /// The binaries in `dir`.
    pub fn in_dir(dir: &Path) -> anyhow::Result<Self> {
        let b = Self {
            kube_apiserver: dir.join("kube-apiserver"),
            kube_controller_manager: dir.join("kube-controller-manager"),
            kubectl: dir.join("kubectl"),
            kube_scheduler: dir.join("kube-scheduler"),
            kubelet: dir.join("kubelet"),
        };
        let missing: Vec<String> = [&b.kube_apiserver, &b.kube_controller_manager, &b.kubectl]
            .into_iter()
            .filter(|p| !is_executable(p))
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            bail!(
                "the Kubernetes control plane binaries are missing ({}): run {BUILD_SCRIPT} \
                 (as root; it builds kube-apiserver, kube-controller-manager and kubectl v1.20 \
                 once into {}, ~8 min)",
                missing.join(", "),
                dir.display()
            );
        }
        Ok(b)
    }

    /// An error naming `scripts/k8s-control-plane` unless kube-scheduler and kubelet are
    /// there too (`malla lab up --kubelet`).
    pub fn require_kubelet(&self) -> anyhow::Result<()> {
        let missing: Vec<String> = [&self.kube_scheduler, &self.kubelet]
            .into_iter()
            .filter(|p| !is_executable(p))
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            bail!(
                "kube-scheduler and kubelet are missing ({}): run {BUILD_SCRIPT} (as root; it \
                 builds what is missing once, ~5-15 min per binary)",
                missing.join(", ")
            );
        }
        Ok(())
    }
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Which etcd the API server uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EtcdSource {
    /// Start one on the control plane's address (client port) and 127.0.0.1 (peer port), data
    /// in `STATE/etcd`.
    Start { client_port: u16, peer_port: u16 },
    /// Use a running one, e.g. `http://198.19.0.1:2379` (the lab's own etcd).
    Existing { endpoint: String },
}

/// How and where to run the control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// Certificates, tokens, kubeconfigs, etcd data and logs.
    pub state_dir: PathBuf,
    /// The network namespace (iproute2 name) every process runs in; `None`: this process's.
    pub netns: Option<String>,
    /// The address the API server (and a started etcd) listens on and advertises.
    pub address: Ipv4Addr,
    pub apiserver_port: u16,
    pub etcd: EtcdSource,
    /// Run kube-controller-manager too.
    pub controller_manager: bool,
    /// The nodes run kubelets: kube-scheduler, the workload controllers, admission and
    /// certificates as kubeadm sets them up (see the module's doc).
    pub kubelets: bool,
    /// `--service-cluster-ip-range`.
    pub service_cidr: String,
    /// The binaries; `None`: [`Binaries::find`].
    pub binaries: Option<Binaries>,
    /// How long to wait for etcd and the API server to answer.
    pub ready_timeout: Duration,
}

/// How long [`Options::in_netns`] waits for etcd and the API server to answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

impl Options {
    /// Inside `netns` on `address` (the lab: its fabric namespace, 198.19.0.1), the API server
    /// on 6443, etcd started on 2379 (peer 127.0.0.1:2380) unless [`Self::with_etcd`] says
    /// otherwise, the controller manager on.
    pub fn in_netns(state_dir: impl Into<PathBuf>, netns: &str, address: Ipv4Addr) -> Self {
        Self {
            state_dir: state_dir.into(),
            netns: Some(netns.to_string()),
            address,
            apiserver_port: LAB_APISERVER_PORT,
            etcd: EtcdSource::Start {
                client_port: LAB_ETCD_PORTS.0,
                peer_port: LAB_ETCD_PORTS.1,
            },
            controller_manager: true,
            kubelets: false,
            service_cidr: default_service_cidr(),
            binaries: None,
            ready_timeout: READY_TIMEOUT,
        }
    }

    /// For nodes that run kubelets ([`Options::kubelets`]).
    pub fn with_kubelets(mut self) -> Self {
        self.kubelets = true;
        self
    }

    /// Use a running etcd (`http://host:port`) instead of starting one.
    pub fn with_etcd(mut self, endpoint: &str) -> Self {
        self.etcd = EtcdSource::Existing {
            endpoint: endpoint.to_string(),
        };
        self
    }

    /// Run without kube-controller-manager.
    pub fn without_controller_manager(mut self) -> Self {
        self.controller_manager = false;
        self
    }

    /// The API server's URL.
    pub fn server_url(&self) -> String {
        format!("https://{}:{}", self.address, self.apiserver_port)
    }

    /// The etcd endpoint the API server uses.
    pub fn etcd_endpoint(&self) -> String {
        match &self.etcd {
            EtcdSource::Start { client_port, .. } => {
                format!("http://{}:{client_port}", self.address)
            }
            EtcdSource::Existing { endpoint } => endpoint.clone(),
        }
    }
}

/// What a client needs to reach the API server: its URL, the kubeconfig and the namespace to
/// run in. Cheap to clone; also available for a detached control plane ([`access`]).
#[derive(Debug, Clone)]
pub struct Access {
    pub server: String,
    pub kubeconfig: PathBuf,
    pub ca_cert: PathBuf,
    /// The admin's bearer token (group system:masters).
    pub token: String,
    pub netns: Option<String>,
    pub kubectl_bin: PathBuf,
}

impl Access {
    /// `kubectl --kubeconfig STATE/kubeconfig --cache-dir STATE/kubectl-cache`, run inside the
    /// control plane's namespace.
    pub fn kubectl(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(&self.kubectl_bin);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        // Discovery and HTTP caches beside the kubeconfig, not in the caller's home.
        if let Some(dir) = self.kubeconfig.parent() {
            cmd.arg("--cache-dir").arg(dir.join("kubectl-cache"));
        }
        in_netns(&mut cmd, self.netns.as_deref(), false)?;
        Ok(cmd)
    }

    /// Runs kubectl with `args` (and `stdin` when given); its stdout, or an error carrying its
    /// stderr.
    pub fn kubectl_run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut cmd = self.kubectl()?;
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("running kubectl")?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().context("kubectl stdin")?;
            pipe.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether `GET /readyz` answers `ok`.
    pub fn is_ready(&self) -> bool {
        self.kubectl_run(&["get", "--raw", "/readyz", "--request-timeout=5s"], None)
            .map(|s| s.trim() == "ok")
            .unwrap_or(false)
    }
}

/// The files of a state directory.
#[derive(Debug, Clone)]
struct Files {
    dir: PathBuf,
}

impl Files {
    fn pki(&self, name: &str) -> PathBuf {
        self.dir.join("pki").join(name)
    }
    fn tokens(&self) -> PathBuf {
        self.dir.join("tokens.csv")
    }
    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    fn kcm_kubeconfig(&self) -> PathBuf {
        self.dir.join("controller-manager.kubeconfig")
    }
    fn scheduler_kubeconfig(&self) -> PathBuf {
        self.dir.join("scheduler.kubeconfig")
    }
    fn etcd_data(&self) -> PathBuf {
        self.dir.join("etcd")
    }
    fn log(&self, c: Component) -> PathBuf {
        self.dir.join("logs").join(format!("{}.log", c.name()))
    }
}

/// Everything needed to (re)start a component: options, binaries, generated files. The lab
/// spawns its components detached ([`start_detached`]); the test kit's owned control plane
/// spawns them as its children. Either way a component is [`Plan::spawn`]ed, then
/// [`Plan::wait_ready`] until it answers.
#[derive(Debug, Clone)]
pub struct Plan {
    opts: Options,
    bins: Binaries,
    files: Files,
    access: Access,
}

impl Plan {
    /// Finds the binaries and creates whatever of the state directory is missing.
    pub fn prepare(opts: &Options) -> anyhow::Result<Self> {
        let bins = match &opts.binaries {
            Some(b) => b.clone(),
            None => Binaries::find()?,
        };
        if opts.kubelets {
            bins.require_kubelet()?;
        }
        let files = Files {
            dir: opts.state_dir.clone(),
        };
        for d in ["pki", "logs"] {
            let p = files.dir.join(d);
            std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        std::fs::set_permissions(
            files.dir.join("pki"),
            std::fs::Permissions::from_mode(0o700),
        )?;
        pki(&files, opts).context("generating the control plane's certificates and keys")?;
        let admin = tokens(&files)?;
        let kcm = token_of(&files, "system:kube-controller-manager")?;
        let scheduler = token_of(&files, "system:kube-scheduler")?;
        let ca = std::fs::read(files.pki("ca.crt"))?;
        write_private(
            &files.scheduler_kubeconfig(),
            &kubeconfig(&opts.server_url(), &ca, "scheduler", &scheduler),
        )?;
        write_private(
            &files.kubeconfig(),
            &kubeconfig(&opts.server_url(), &ca, "admin", &admin),
        )?;
        write_private(
            &files.kcm_kubeconfig(),
            &kubeconfig(&opts.server_url(), &ca, "controller-manager", &kcm),
        )?;
        let access = Access {
            server: opts.server_url(),
            kubeconfig: files.kubeconfig(),
            ca_cert: files.pki("ca.crt"),
            token: admin,
            netns: opts.netns.clone(),
            kubectl_bin: bins.kubectl.clone(),
        };
        Ok(Self {
            opts: opts.clone(),
            bins,
            files,
            access,
        })
    }

    /// Whether this control plane runs its own etcd (rather than an existing one).
    pub fn starts_etcd(&self) -> bool {
        matches!(self.opts.etcd, EtcdSource::Start { .. })
    }

    /// The options it was prepared with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// How to reach the API server.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.files.dir
    }

    /// The log file of a component.
    pub fn log_path(&self, c: Component) -> PathBuf {
        self.files.log(c)
    }

    /// The command line of a component.
    fn command(&self, c: Component) -> Command {
        let o = &self.opts;
        let f = &self.files;
        let addr = o.address.to_string();
        let mut cmd;
        match c {
            Component::Etcd => {
                let (client, peer) = match o.etcd {
                    EtcdSource::Start {
                        client_port,
                        peer_port,
                    } => (
                        format!("http://{addr}:{client_port}"),
                        format!("http://127.0.0.1:{peer_port}"),
                    ),
                    EtcdSource::Existing { .. } => (String::new(), String::new()),
                };
                cmd = Command::new("etcd");
                cmd.arg("--name=malla-control-plane")
                    .arg(format!("--data-dir={}", f.etcd_data().display()))
                    .arg(format!("--listen-client-urls={client}"))
                    .arg(format!("--advertise-client-urls={client}"))
                    .arg(format!("--listen-peer-urls={peer}"))
                    .arg(format!("--initial-advertise-peer-urls={peer}"))
                    .arg(format!("--initial-cluster=malla-control-plane={peer}"))
                    .arg("--initial-cluster-state=new")
                    .arg("--logger=zap")
                    .arg("--log-outputs=stderr");
            }
            Component::ApiServer => {
                cmd = Command::new(&self.bins.kube_apiserver);
                cmd.arg(format!("--etcd-servers={}", o.etcd_endpoint()))
                    .arg(format!("--etcd-prefix={ETCD_PREFIX}"))
                    .arg(format!("--bind-address={addr}"))
                    .arg(format!("--advertise-address={addr}"))
                    .arg(format!("--secure-port={}", o.apiserver_port))
                    .arg("--insecure-port=0")
                    .arg(format!(
                        "--tls-cert-file={}",
                        f.pki("apiserver.crt").display()
                    ))
                    .arg(format!(
                        "--tls-private-key-file={}",
                        f.pki("apiserver.key").display()
                    ))
                    .arg(format!("--client-ca-file={}", f.pki("ca.crt").display()))
                    .arg(format!("--token-auth-file={}", f.tokens().display()))
                    .arg("--authorization-mode=Node,RBAC")
                    .arg(format!(
                        "--service-account-key-file={}",
                        f.pki("service-account.pub").display()
                    ))
                    .arg(format!(
                        "--service-account-signing-key-file={}",
                        f.pki("service-account.key").display()
                    ))
                    .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
                    .arg(format!("--service-cluster-ip-range={}", o.service_cidr))
                    .arg("--allow-privileged=true")
                    .arg("--profiling=false");
                if o.kubelets {
                    // As kubeadm: pods get their service account's token, kubelets change
                    // only their own Node and pods, the `kubernetes` Service has endpoints,
                    // and the API server shows kubelets a certificate (logs, exec).
                    cmd.arg("--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,NodeRestriction")
                        .arg("--endpoint-reconciler-type=lease")
                        .arg(format!(
                            "--kubelet-client-certificate={}",
                            f.pki("apiserver-kubelet-client.crt").display()
                        ))
                        .arg(format!(
                            "--kubelet-client-key={}",
                            f.pki("apiserver-kubelet-client.key").display()
                        ))
                        .arg(format!(
                            "--kubelet-certificate-authority={}",
                            f.pki("ca.crt").display()
                        ))
                        .arg("--kubelet-preferred-address-types=InternalIP");
                } else {
                    cmd.arg("--endpoint-reconciler-type=none")
                        .arg("--enable-admission-plugins=NamespaceLifecycle")
                        .arg("--disable-admission-plugins=ServiceAccount");
                }
            }
            Component::ControllerManager => {
                cmd = Command::new(&self.bins.kube_controller_manager);
                cmd.arg(format!("--kubeconfig={}", f.kcm_kubeconfig().display()))
                    .arg("--leader-elect=false")
                    .arg(format!(
                        "--controllers={}",
                        if o.kubelets {
                            KUBELET_CONTROLLERS
                        } else {
                            CONTROLLERS
                        }
                    ))
                    .arg("--use-service-account-credentials=false")
                    .arg(format!(
                        "--service-account-private-key-file={}",
                        f.pki("service-account.key").display()
                    ))
                    .arg(format!("--root-ca-file={}", f.pki("ca.crt").display()))
                    .arg("--port=0")
                    .arg("--secure-port=0")
                    .arg("--profiling=false");
            }
            Component::Scheduler => {
                cmd = Command::new(&self.bins.kube_scheduler);
                cmd.arg(format!(
                    "--kubeconfig={}",
                    f.scheduler_kubeconfig().display()
                ))
                .arg("--leader-elect=false")
                .arg("--address=127.0.0.1")
                .arg(format!("--port={SCHEDULER_HEALTHZ_PORT}"))
                .arg("--secure-port=0")
                .arg("--profiling=false");
            }
        }
        cmd
    }

    /// Starts a component; `detach`: in its own session, to outlive this process.
    pub fn spawn(&self, c: Component, detach: bool) -> anyhow::Result<Child> {
        let log_path = self.files.log(c);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = self.command(c);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        in_netns(&mut cmd, self.opts.netns.as_deref(), detach)?;
        cmd.spawn()
            .with_context(|| format!("starting {} ({:?})", c.name(), cmd.get_program()))
    }

    /// Waits until `c` answers; `alive` says whether its process still runs.
    pub fn wait_ready(&self, c: Component, mut alive: impl FnMut() -> bool) -> anyhow::Result<()> {
        let started = Instant::now();
        let deadline = started + self.opts.ready_timeout;
        loop {
            let ready = match c {
                Component::Etcd => self.etcd_healthy(),
                Component::ApiServer => self.access.is_ready(),
                // It serves no port to ask; still running after its flags were parsed and
                // its kubeconfig read is what we can check.
                Component::ControllerManager => started.elapsed() > Duration::from_millis(1500),
                Component::Scheduler => self
                    .in_own_netns(|| {
                        http_get_plain(
                            SocketAddr::from((Ipv4Addr::LOCALHOST, SCHEDULER_HEALTHZ_PORT)),
                            "/healthz",
                        )
                        .unwrap_or_default()
                    })
                    .ends_with("\r\n\r\nok"),
            };
            if ready && alive() {
                return Ok(());
            }
            if !alive() {
                bail!(
                    "{} exited while starting; the end of {}:\n{}",
                    c.name(),
                    self.files.log(c).display(),
                    log_tail(&self.files.log(c), 20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer within {:?}; the end of {}:\n{}",
                    c.name(),
                    self.opts.ready_timeout,
                    self.files.log(c).display(),
                    log_tail(&self.files.log(c), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `GET /health` on etcd's client URL answers `"health":"true"`.
    fn etcd_healthy(&self) -> bool {
        let EtcdSource::Start { client_port, .. } = self.opts.etcd else {
            return true;
        };
        let addr = SocketAddr::from((self.opts.address, client_port));
        self.in_own_netns(move || http_get_plain(addr, "/health").unwrap_or_default())
            .contains("\"health\":\"true\"")
    }

    /// `probe`'s answer, run in the control plane's namespace ("" when it cannot be entered).
    fn in_own_netns(&self, probe: impl FnOnce() -> String + Send + 'static) -> String {
        match &self.opts.netns {
            None => probe(),
            Some(ns) => match NetNs::open_named(ns) {
                Ok(ns) => ns.run(probe).unwrap_or_default(),
                Err(_) => String::new(),
            },
        }
    }
}

/// A GET over plain HTTP/1.0; the whole response.
fn http_get_plain(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Makes `cmd` run inside the named namespace (and in its own session when `detach`).
fn in_netns(cmd: &mut Command, netns: Option<&str>, detach: bool) -> anyhow::Result<()> {
    match netns {
        Some(name) => NetNs::open_named(name)
            .and_then(|ns| ns.enter_on_exec(cmd, detach))
            .with_context(|| format!("entering network namespace {name}"))?,
        None if detach => {
            // SAFETY: between fork and exec the hook calls only setsid(2), async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
        None => {}
    }
    Ok(())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub(crate) fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (Debian package openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The first address of the service range: the `kubernetes` Service's cluster IP.
fn first_service_ip(cidr: &str) -> Option<Ipv4Addr> {
    let net: ipnet::Ipv4Net = cidr.parse().ok()?;
    Some(Ipv4Addr::from(u32::from(net.network()) + 1))
}

/// The CA, the serving certificate (reissued when its SANs change) and the service-account
/// key pair; what exists is kept.
fn pki(files: &Files, opts: &Options) -> anyhow::Result<()> {
    let p = |n: &str| files.pki(n).display().to_string();
    if !files.pki("ca.crt").exists() || !files.pki("ca.key").exists() {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
            "-days",
            "3650",
            "-subj",
            "/CN=malla-control-plane-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ])?;
        // A new CA invalidates the serving certificate.
        let _ = std::fs::remove_file(files.pki("apiserver.crt"));
    }
    let mut sans = vec![
        format!("IP:{}", opts.address),
        "IP:127.0.0.1".to_string(),
        "DNS:localhost".to_string(),
        "DNS:kubernetes".to_string(),
        "DNS:kubernetes.default".to_string(),
        "DNS:kubernetes.default.svc".to_string(),
        "DNS:kubernetes.default.svc.cluster.local".to_string(),
    ];
    if let Some(ip) = first_service_ip(&opts.service_cidr) {
        sans.push(format!("IP:{ip}"));
    }
    sans.dedup();
    let san_line = format!("subjectAltName={}", sans.join(","));
    issue_cert(
        &files.dir.join("pki"),
        "apiserver",
        "/CN=kube-apiserver",
        &format!("{san_line}\nextendedKeyUsage=serverAuth\n"),
    )?;
    if opts.kubelets {
        // kubeadm's apiserver-kubelet-client: the kubelets' webhook authorizer asks the API
        // server about this user, who is in system:masters.
        issue_cert(
            &files.dir.join("pki"),
            "apiserver-kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "extendedKeyUsage=clientAuth\n",
        )?;
    }
    if !files.pki("service-account.key").exists() || !files.pki("service-account.pub").exists() {
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &p("service-account.key"),
        ])?;
        openssl(&[
            "pkey",
            "-in",
            &p("service-account.key"),
            "-pubout",
            "-out",
            &p("service-account.pub"),
        ])?;
    }
    for key in ["ca.key", "service-account.key"] {
        std::fs::set_permissions(files.pki(key), std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// `DIR/NAME.{crt,key}`: an EC P-256 key and a certificate for `subject` (`/O=…/CN=…`) signed by
/// `DIR/ca.{crt,key}` with the extensions `ext` (openssl extfile lines, after
/// `basicConstraints=CA:FALSE` and the key usages). Kept while `DIR/NAME.ext` still says the
/// same; reissued when the extensions (the SANs) change. The key is 0600.
pub(crate) fn issue_cert(dir: &Path, name: &str, subject: &str, ext: &str) -> anyhow::Result<()> {
    let p = |suffix: &str| dir.join(format!("{name}.{suffix}")).display().to_string();
    let ext_text = format!(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{ext}"
    );
    let ext_file = dir.join(format!("{name}.ext"));
    let current = std::fs::read_to_string(&ext_file).unwrap_or_default();
    let have = |suffix: &str| dir.join(format!("{name}.{suffix}")).exists();
    if current == ext_text && have("crt") && have("key") {
        return Ok(());
    }
    std::fs::write(&ext_file, &ext_text)?;
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &p("key"),
        "-out",
        &p("csr"),
        "-subj",
        subject,
    ])?;
    std::fs::set_permissions(
        dir.join(format!("{name}.key")),
        std::fs::Permissions::from_mode(0o600),
    )?;
    let ca = |f: &str| dir.join(f).display().to_string();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("csr"),
        "-CA",
        &ca("ca.crt"),
        "-CAkey",
        &ca("ca.key"),
        "-CAcreateserial",
        "-days",
        "3650",
        "-extfile",
        &p("ext"),
        "-out",
        &p("crt"),
    ])?;
    Ok(())
}

/// The static token file: `admin`, the controller manager's and the scheduler's users, all in
/// system:masters; a user missing from it is added (with a new token), existing tokens are
/// kept. Returns the admin's token.
fn tokens(files: &Files) -> anyhow::Result<String> {
    let mut text = std::fs::read_to_string(files.tokens()).unwrap_or_default();
    let before = text.len();
    for user in [
        "admin",
        "system:kube-controller-manager",
        "system:kube-scheduler",
    ] {
        if token_of_text(&text, user).is_none() {
            text.push_str(&format!(
                "{},{user},{user},\"system:masters\"\n",
                random_token()?
            ));
        }
    }
    if text.len() != before {
        write_private(&files.tokens(), &text)?;
    }
    token_of(files, "admin")
}

fn token_of_text(text: &str, user: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let mut parts = l.split(',');
        let token = parts.next()?;
        (parts.next()? == user).then(|| token.to_string())
    })
}

fn token_of(files: &Files, user: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(files.tokens())
        .with_context(|| format!("reading {}", files.tokens().display()))?;
    token_of_text(&text, user)
        .with_context(|| format!("no token for {user} in {}", files.tokens().display()))
}

fn random_token() -> anyhow::Result<String> {
    let mut b = [0u8; 24];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn kubeconfig(server: &str, ca_pem: &[u8], user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: malla\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: malla\n  context:\n    cluster: malla\n    user: {user}\ncurrent-context: malla\n",
        ca = base64(ca_pem)
    )
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How long a stopped component gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The pids of a control plane's processes (what the lab state stores).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlPlanePids {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apiserver: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_manager: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<u32>,
}

impl ControlPlanePids {
    /// The pid of `c`, if it runs.
    pub fn get(&self, c: Component) -> Option<u32> {
        match c {
            Component::Etcd => self.etcd,
            Component::ApiServer => self.apiserver,
            Component::ControllerManager => self.controller_manager,
            Component::Scheduler => self.scheduler,
        }
    }
    /// Records (or clears) the pid of `c`.
    pub fn set(&mut self, c: Component, pid: Option<u32>) {
        match c {
            Component::Etcd => self.etcd = pid,
            Component::ApiServer => self.apiserver = pid,
            Component::ControllerManager => self.controller_manager = pid,
            Component::Scheduler => self.scheduler = pid,
        }
    }
}

/// Whether `pid` runs and is a control plane process of `state_dir` (its command line names
/// a file there), not a recycled pid.
pub fn is_running(pid: u32, state_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    !crate::process::is_zombie(pid)
        && String::from_utf8_lossy(&cmdline).contains(&*state_dir.to_string_lossy())
}

/// Starts the control plane detached from this process (each process in its own session,
/// reaped by init once we exit) and waits until the API server answers; components whose pid
/// in `running` is still alive are kept. Returns the pids for [`stop_detached`].
pub fn start_detached(
    opts: &Options,
    running: &ControlPlanePids,
) -> anyhow::Result<(ControlPlanePids, Access)> {
    let plan = Plan::prepare(opts)?;
    let mut pids = ControlPlanePids::default();
    let mut components = vec![Component::ApiServer];
    if plan.starts_etcd() {
        components.insert(0, Component::Etcd);
    }
    if opts.controller_manager {
        components.push(Component::ControllerManager);
    }
    if opts.kubelets {
        components.push(Component::Scheduler);
    }
    let result = (|| {
        for c in components {
            if let Some(pid) = running.get(c).filter(|p| is_running(*p, &opts.state_dir)) {
                pids.set(c, Some(pid));
                continue;
            }
            let child = plan.spawn(c, true)?;
            let pid = child.id();
            pids.set(c, Some(pid));
            // Reap it if it dies while we run; once we exit, init does.
            std::thread::spawn(move || {
                let mut child = child;
                let _ = child.wait();
            });
            plan.wait_ready(c, || is_running(pid, &opts.state_dir))?;
        }
        anyhow::Ok(())
    })();
    if let Err(e) = result {
        // Leave nothing half-started behind (what was already running stays).
        let mut started = pids;
        for c in [
            Component::Etcd,
            Component::ApiServer,
            Component::ControllerManager,
            Component::Scheduler,
        ] {
            if running.get(c) == pids.get(c) {
                started.set(c, None);
            }
        }
        stop_detached(&opts.state_dir, &started);
        return Err(e);
    }
    Ok((pids, plan.access))
}

/// Stops detached control plane processes by pid (scheduler, controller manager, API server,
/// etcd), each only if it still is one of `state_dir`'s: SIGTERM, SIGKILL after 10 s.
pub fn stop_detached(state_dir: &Path, pids: &ControlPlanePids) {
    for pid in [
        pids.scheduler,
        pids.controller_manager,
        pids.apiserver,
        pids.etcd,
    ]
    .into_iter()
    .flatten()
    {
        if !is_running(pid, state_dir) {
            continue;
        }
        let p = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while is_running(pid, state_dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if is_running(pid, state_dir) {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// How to reach a control plane started (e.g. detached, by another process) with `opts`:
/// reads the state directory, starts nothing.
pub fn access(opts: &Options) -> anyhow::Result<Access> {
    let bins = match &opts.binaries {
        Some(b) => b.clone(),
        None => Binaries::find()?,
    };
    let files = Files {
        dir: opts.state_dir.clone(),
    };
    Ok(Access {
        server: opts.server_url(),
        kubeconfig: files.kubeconfig(),
        ca_cert: files.pki("ca.crt"),
        token: token_of(&files, "admin")?,
        netns: opts.netns.clone(),
        kubectl_bin: bins.kubectl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn service_range_is_the_labs() {
        assert_eq!(default_service_cidr(), "198.19.64.0/18");
        assert_eq!(
            first_service_ip(&default_service_cidr()),
            Some(Ipv4Addr::new(198, 19, 64, 1))
        );
    }

    #[test]
    fn tokens_add_missing_users_and_keep_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            dir: dir.path().to_path_buf(),
        };
        // A state directory from before the scheduler existed.
        std::fs::write(
            files.tokens(),
            "aaa,admin,admin,\"system:masters\"\nbbb,system:kube-controller-manager,system:kube-controller-manager,\"system:masters\"\n",
        )
        .unwrap();
        assert_eq!(tokens(&files).unwrap(), "aaa");
        assert_eq!(
            token_of(&files, "system:kube-controller-manager").unwrap(),
            "bbb"
        );
        let scheduler = token_of(&files, "system:kube-scheduler").unwrap();
        assert_eq!(scheduler.len(), 48);
        // Stable from then on.
        tokens(&files).unwrap();
        assert_eq!(
            token_of(&files, "system:kube-scheduler").unwrap(),
            scheduler
        );
        assert_eq!(
            std::fs::read_to_string(files.tokens())
                .unwrap()
                .lines()
                .count(),
            3
        );
    }

    #[test]
    fn missing_binaries_name_the_script() {
        let dir = tempfile::tempdir().unwrap();
        let e = Binaries::in_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains(BUILD_SCRIPT), "{e}");
    }
}
