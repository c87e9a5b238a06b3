//! The lab's datastore: the embedded file by default, a real etcd that the lab runs in its
//! fabric namespace (`https://198.19.0.1:2379`, client-certificate authentication: a CA, a
//! serving and a client certificate made per lab in `etcd-pki/`, mode 0700, keys 0600), or a real Kubernetes control plane there (etcd,
//! kube-apiserver on `198.19.0.1:6443` and kube-controller-manager, whose endpoint-slice
//! controller then makes the Services' EndpointSlices). Agents and CNI plugins reach it over
//! the underlay exactly as on real nodes, the lab's own commands from inside that namespace.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use malla_dataplane::netns::NetNs;
use malla_store::{DatastoreSpec, Store};

pub use crate::state::Backend;
use crate::state::{LabPaths, LabState};
use crate::{control_plane, process};

/// Where the lab's etcd listens for clients (the fabric bridge's address).
pub const ETCD_CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 19, 0, 1), 2379);

/// The datastore the lab's agents and plugins are configured with.
pub fn spec(paths: &LabPaths, backend: Backend) -> DatastoreSpec {
    match backend {
        Backend::Local => DatastoreSpec::Local {
            path: paths.store(),
        },
        Backend::Etcd => {
            let pki = etcd_pki_dir(paths);
            DatastoreSpec::Etcd {
                endpoints: vec![format!("https://{}:{}", ETCD_CLIENT.0, ETCD_CLIENT.1)],
                prefix: format!("/malla-{}", paths.name),
                tls: Some(malla_store::EtcdTls {
                    ca: pki.join("ca.crt"),
                    cert: Some(pki.join("client.crt")),
                    key: Some(pki.join("client.key")),
                }),
                username: None,
                password_file: None,
            }
        }
        Backend::Kubernetes => DatastoreSpec::Kubernetes {
            kubeconfig: Some(control_plane_dir(paths).join("kubeconfig")),
        },
    }
}

/// The lab's control plane state (certificates, kubeconfig, etcd data, logs).
pub fn control_plane_dir(paths: &LabPaths) -> std::path::PathBuf {
    paths.dir.join("kubernetes")
}

/// How the lab runs its control plane: in the fabric namespace on the fabric's address.
pub fn control_plane_options(paths: &LabPaths, fabric_netns: &str) -> control_plane::Options {
    control_plane::Options::in_netns(control_plane_dir(paths), fabric_netns, ETCD_CLIENT.0)
}

/// Starts (or keeps) the lab's Kubernetes control plane, installs Malla's CRDs and registers
/// the lab's nodes as `Node` objects (the kubelet's part; the endpoint-slice controller reads
/// them) — unless `kubelets`: then real kubelets register them ([`crate::kubelet`]).
pub fn start_control_plane(
    paths: &LabPaths,
    fabric_netns: &str,
    running: &control_plane::ControlPlanePids,
    nodes: &[String],
    kubelets: bool,
) -> anyhow::Result<control_plane::ControlPlanePids> {
    let mut opts = control_plane_options(paths, fabric_netns);
    opts.kubelets = kubelets;
    let (pids, access) = control_plane::start_detached(&opts, running)
        .context("starting the lab's Kubernetes control plane")?;
    let ns = NetNs::open_named(fabric_netns)?;
    let spec = spec(paths, Backend::Kubernetes);
    ns.run(move || -> anyhow::Result<()> {
        let kubeconfig = match &spec {
            DatastoreSpec::Kubernetes { kubeconfig } => kubeconfig.clone(),
            _ => None,
        };
        let store =
            malla_store::KubeStore::connect(kubeconfig.as_deref(), Duration::from_secs(10))?;
        store.install_crds()?;
        Ok(())
    })??;
    let mut manifest = String::new();
    for n in nodes.iter().filter(|_| !kubelets) {
        manifest.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {n}\n  labels:\n    kubernetes.io/hostname: {n}\n"
        ));
    }
    if !manifest.is_empty() {
        access
            .kubectl_run(&["apply", "-f", "-"], Some(&manifest))
            .context("registering the lab's nodes")?;
    }
    Ok(pids)
}

/// Opens the lab's datastore from this process (etcd: from inside the fabric namespace).
pub fn open(paths: &LabPaths, state: &LabState) -> anyhow::Result<Box<dyn Store>> {
    open_backend(paths, state.datastore, &state.fabric_netns)
}

pub fn open_backend(
    paths: &LabPaths,
    backend: Backend,
    fabric_netns: &str,
) -> anyhow::Result<Box<dyn Store>> {
    let spec = spec(paths, backend);
    match backend {
        Backend::Local => spec.open().with_context(|| format!("opening {spec}")),
        Backend::Etcd | Backend::Kubernetes => {
            // The client's sockets and runtime thread are created inside the fabric namespace.
            let ns = NetNs::open_named(fabric_netns)?;
            let shown = spec.to_string();
            ns.run(move || spec.open())?
                .with_context(|| format!("connecting to {shown}"))
        }
    }
}

/// The lab etcd's certificates: `ca.crt`, `server.crt`/`.key` (etcd's, for 198.19.0.1 and
/// 127.0.0.1), `client.crt`/`.key` (the agents' and plugins').
pub fn etcd_pki_dir(paths: &LabPaths) -> std::path::PathBuf {
    paths.dir.join("etcd-pki")
}

/// Makes the lab etcd's CA and certificates (what exists is kept): the directory is 0700 and
/// every key file is created 0600 before openssl writes it.
fn etcd_pki(paths: &LabPaths) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = etcd_pki_dir(paths);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let p = |n: &str| dir.join(n).display().to_string();
    let private = |n: &str| -> anyhow::Result<()> {
        let path = dir.join(n);
        let _ = std::fs::remove_file(&path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    if !dir.join("ca.crt").exists() || !dir.join("ca.key").exists() {
        private("ca.key")?;
        let (key, crt) = (p("ca.key"), p("ca.crt"));
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "3650",
            "-subj",
            "/CN=malla-lab-etcd-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ]);
        control_plane::openssl(&args)?;
        let _ = std::fs::remove_file(dir.join("server.crt"));
        let _ = std::fs::remove_file(dir.join("client.crt"));
    }
    let server_sans = format!("IP:{},IP:127.0.0.1", ETCD_CLIENT.0);
    for (name, cn, ext) in [
        (
            "server",
            "malla-lab-etcd",
            format!("subjectAltName={server_sans}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        ),
        (
            "client",
            "malla",
            "extendedKeyUsage=clientAuth\n".to_string(),
        ),
    ] {
        if dir.join(format!("{name}.crt")).exists() && dir.join(format!("{name}.key")).exists() {
            continue;
        }
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{ext}"),
        )?;
        private(&format!("{name}.key"))?;
        let (key, csr, crt, extfile) = (
            p(&format!("{name}.key")),
            p(&format!("{name}.csr")),
            p(&format!("{name}.crt")),
            p(&format!("{name}.ext")),
        );
        let subj = format!("/CN={cn}");
        let mut args = vec!["req", "-new"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        control_plane::openssl(&args)?;
        let (ca, ca_key) = (p("ca.crt"), p("ca.key"));
        control_plane::openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            &extfile,
            "-out",
            &crt,
        ])?;
    }
    Ok(())
}

/// Starts the lab's etcd in the fabric namespace (unless running) and waits until it answers.
pub fn start_etcd(
    paths: &LabPaths,
    fabric_netns: &str,
    running: Option<u32>,
) -> anyhow::Result<u32> {
    if let Some(pid) = running.filter(|p| process::is_ours(*p)) {
        return Ok(pid);
    }
    let data = paths.dir.join("etcd");
    std::fs::create_dir_all(&data)?;
    etcd_pki(paths).context("making the lab etcd's certificates (Debian package openssl)")?;
    let pki = etcd_pki_dir(paths);
    let client = format!("https://{}:{}", ETCD_CLIENT.0, ETCD_CLIENT.1);
    let mut cmd = Command::new("etcd");
    // Clients must show a certificate of the lab's CA: a pod that reaches the address gets
    // nothing without the client key.
    cmd.arg("--client-cert-auth")
        .arg("--trusted-ca-file")
        .arg(pki.join("ca.crt"))
        .arg("--cert-file")
        .arg(pki.join("server.crt"))
        .arg("--key-file")
        .arg(pki.join("server.key"));
    cmd.arg("--name")
        .arg(format!("malla-{}", paths.name))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
        ])
        .arg("--initial-cluster")
        .arg(format!("malla-{}=http://127.0.0.1:2380", paths.name));
    let pid = process::spawn_detached(cmd, fabric_netns, &paths.log("etcd"))
        .context("starting etcd (Debian package etcd-server)")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if open_backend(paths, Backend::Etcd, fabric_netns)
            .and_then(|s| Ok(s.revision()?))
            .is_ok()
        {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!(
                "etcd did not answer within 20 s (see {})",
                paths.log("etcd").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
