//! A Kubernetes control plane owned by a test: [`ControlPlane::start`] with [`loopback`]
//! options runs etcd, kube-apiserver and (optionally) kube-controller-manager on 127.0.0.1
//! with free ports as children of this process, lets a test stop and restart each component,
//! and kills them (by the exact pids it spawned) when dropped, also when the test panics.
//!
//! How a component is prepared, started and found ready is the lab's
//! ([`malla_lab::control_plane::Plan`]); this harness only owns the processes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::bail;
/// The etcd key prefix the API server stores objects under (tests reach into etcd).
pub use malla_lab::control_plane::ETCD_PREFIX;
use malla_lab::control_plane::{
    default_service_cidr, Access, Component, ControlPlanePids, EtcdSource, Options, Plan,
    READY_TIMEOUT, STOP_GRACE,
};

/// On 127.0.0.1 in this namespace, with free ports (picked now), etcd started, the controller
/// manager on.
pub fn loopback(state_dir: impl Into<PathBuf>) -> Options {
    Options {
        state_dir: state_dir.into(),
        netns: None,
        address: Ipv4Addr::LOCALHOST,
        apiserver_port: crate::free_port(),
        etcd: EtcdSource::Start {
            client_port: crate::free_port(),
            peer_port: crate::free_port(),
        },
        controller_manager: true,
        kubelets: false,
        service_cidr: default_service_cidr(),
        binaries: None,
        ready_timeout: READY_TIMEOUT,
    }
}

/// Stops a child we spawned: SIGTERM, SIGKILL after `grace`, then reaps it.
fn stop_child(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running control plane owned by this process; dropping it stops every process it started
/// (by the pids it spawned).
#[derive(Debug)]
pub struct ControlPlane {
    plan: Plan,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    controller_manager: Option<Child>,
    scheduler: Option<Child>,
}

impl ControlPlane {
    /// Generates what the state directory lacks, starts etcd (unless an existing one is
    /// given), the API server (waiting for `/readyz`) and the controller manager.
    pub fn start(opts: Options) -> anyhow::Result<Self> {
        let plan = Plan::prepare(&opts)?;
        let mut cp = Self {
            plan,
            etcd: None,
            apiserver: None,
            controller_manager: None,
            scheduler: None,
        };
        // On error, `cp` is dropped and stops what was started.
        if cp.plan.starts_etcd() {
            cp.start_etcd()?;
        }
        cp.start_apiserver()?;
        if cp.plan.options().controller_manager {
            cp.start_controller_manager()?;
        }
        Ok(cp)
    }

    /// How to reach the API server.
    pub fn access(&self) -> &Access {
        self.plan.access()
    }

    /// The admin kubeconfig (server, embedded CA, token).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.plan.access().kubeconfig
    }

    /// `https://ADDRESS:PORT`.
    pub fn server_url(&self) -> &str {
        &self.plan.access().server
    }

    /// The etcd endpoint the API server uses.
    pub fn etcd_endpoint(&self) -> String {
        self.plan.options().etcd_endpoint()
    }

    pub fn state_dir(&self) -> &Path {
        self.plan.state_dir()
    }

    /// The log file of a component.
    pub fn log_path(&self, c: Component) -> PathBuf {
        self.plan.log_path(c)
    }

    /// `kubectl --kubeconfig …` in the control plane's namespace.
    pub fn kubectl(&self) -> anyhow::Result<Command> {
        self.plan.access().kubectl()
    }

    /// Runs kubectl; its stdout, or an error with its stderr.
    pub fn kubectl_run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        self.plan.access().kubectl_run(args, stdin)
    }

    /// The pids of the running processes.
    pub fn pids(&self) -> ControlPlanePids {
        let id = |c: &Option<Child>| c.as_ref().map(Child::id);
        ControlPlanePids {
            etcd: id(&self.etcd),
            apiserver: id(&self.apiserver),
            controller_manager: id(&self.controller_manager),
            scheduler: id(&self.scheduler),
        }
    }

    fn slot(&mut self, c: Component) -> &mut Option<Child> {
        match c {
            Component::Etcd => &mut self.etcd,
            Component::ApiServer => &mut self.apiserver,
            Component::ControllerManager => &mut self.controller_manager,
            Component::Scheduler => &mut self.scheduler,
        }
    }

    /// Starts a stopped component again (same state) and waits until it answers; a no-op
    /// when it runs.
    pub fn start_component(&mut self, c: Component) -> anyhow::Result<()> {
        if c == Component::Etcd && !self.plan.starts_etcd() {
            bail!("this control plane uses an existing etcd; it does not run one");
        }
        if let Some(child) = self.slot(c) {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(());
            }
        }
        let child = self.plan.spawn(c, false)?;
        let plan = self.plan.clone();
        let slot = self.slot(c);
        *slot = Some(child);
        let child = slot.as_mut().expect("just set");
        plan.wait_ready(c, || matches!(child.try_wait(), Ok(None)))
    }

    /// Stops a component (SIGTERM, SIGKILL after 10 s); its state stays.
    pub fn stop_component(&mut self, c: Component) {
        if let Some(mut child) = self.slot(c).take() {
            stop_child(&mut child, STOP_GRACE);
        }
    }

    pub fn start_etcd(&mut self) -> anyhow::Result<()> {
        self.start_component(Component::Etcd)
    }
    pub fn stop_etcd(&mut self) {
        self.stop_component(Component::Etcd)
    }
    pub fn start_apiserver(&mut self) -> anyhow::Result<()> {
        self.start_component(Component::ApiServer)
    }
    pub fn stop_apiserver(&mut self) {
        self.stop_component(Component::ApiServer)
    }
    pub fn start_controller_manager(&mut self) -> anyhow::Result<()> {
        self.start_component(Component::ControllerManager)
    }
    pub fn stop_controller_manager(&mut self) {
        self.stop_component(Component::ControllerManager)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for c in [
            Component::Scheduler,
            Component::ControllerManager,
            Component::ApiServer,
            Component::Etcd,
        ] {
            self.stop_component(c);
        }
    }
}
