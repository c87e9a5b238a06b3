//! `malla install-cni`: puts the plugin binary in the CNI bin dir and Malla's conflist in the
//! CNI conf dir, each atomically (write a temp file, then rename), the way CNI DaemonSets
//! install. A conflist that is not Malla's is never overwritten without `force`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The name runtimes look the plugin up by (`"type": "malla"`).
pub const PLUGIN_NAME: &str = "malla";
/// The conflist file Malla owns.
pub const CONFLIST_NAME: &str = "10-malla.conflist";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists and is not Malla's; pass --force to overwrite it")]
    Foreign(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What was installed, and conflists that a runtime would pick before ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub binary: PathBuf,
    pub conflist: PathBuf,
    pub shadowed_by: Vec<PathBuf>,
}

/// A conflist is Malla's when its first plugin is of type `malla`.
pub fn is_mallas(conflist: &Value) -> bool {
    conflist["plugins"][0]["type"] == PLUGIN_NAME
}

/// Creates `dir` (and missing parents) mode 0700 when missing; an existing one is left as is.
fn create_private_dir(dir: &Path) -> Result<(), InstallError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Writes `bytes` to `path` atomically: a temporary beside it, created with `mode` (never more
/// open for a moment), renamed over it.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        std::process::id()
    ));
    // Created with its final mode (never readable by others for a moment), then renamed.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    // The umask may have narrowed the mode (e.g. the binary's 0755); never widened past it.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Installs `plugin_binary` as `<bin_dir>/malla` and `conflist` as `<conf_dir>/10-malla.conflist`.
pub fn install(
    plugin_binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    conflist: &Value,
    force: bool,
) -> Result<Installed, InstallError> {
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    create_private_dir(conf_dir)?;
    let target = conf_dir.join(CONFLIST_NAME);
    if let Ok(existing) = std::fs::read(&target) {
        let ours = serde_json::from_slice::<Value>(&existing).is_ok_and(|v| is_mallas(&v));
        if !ours && !force {
            return Err(InstallError::Foreign(target));
        }
    }
    let bytes = std::fs::read(plugin_binary).map_err(io(plugin_binary))?;
    let binary = bin_dir.join(PLUGIN_NAME);
    write_atomically(&binary, &bytes, 0o755)?;
    let text = serde_json::to_vec_pretty(conflist).unwrap_or_default();
    // The conflist names the datastore (and may name credentials): root only.
    write_atomically(&target, &text, 0o600)?;
    let mut shadowed_by: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.')
                && [".conf", ".conflist", ".json"]
                    .iter()
                    .any(|ext| name.ends_with(ext))
                && name < CONFLIST_NAME
        })
        .collect();
    shadowed_by.sort();
    Ok(Installed {
        binary,
        conflist: target,
        shadowed_by,
    })
}

/// Where a pod finds its service account's token and CA.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Inside a pod (the DaemonSet's init container), the kubeconfig the plugin on the host uses to
/// reach the API server: the pod's service-account token and CA copied into `conf_dir`
/// (`malla-kubeconfig`, `malla-ca.crt`, mode 0600) and the API server's in-cluster address from
/// `KUBERNETES_SERVICE_HOST`/`_PORT`. None outside a cluster. Returns the kubeconfig's path.
pub fn write_in_cluster_kubeconfig(
    conf_dir: &Path,
    service_account_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<PathBuf>, InstallError> {
    let Some(files) = in_cluster_kubeconfig(conf_dir, service_account_dir, env)? else {
        return Ok(None);
    };
    create_private_dir(conf_dir)?;
    files.write()?;
    Ok(Some(files.kubeconfig.0))
}

/// [`write_in_cluster_kubeconfig`] again when the service account's token or CA changed since
/// it was written, else nothing: a projected token rotates (the kubelet renews it before it
/// expires), and the plugin on the host must follow it (run by the agent, which mounts the
/// same service account and the host's CNI configuration directory). Returns whether it wrote.
pub fn refresh_in_cluster_kubeconfig(
    conf_dir: &Path,
    service_account_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<bool, InstallError> {
    let Some(files) = in_cluster_kubeconfig(conf_dir, service_account_dir, env)? else {
        return Ok(false);
    };
    let same =
        |(path, bytes): &(PathBuf, Vec<u8>)| std::fs::read(path).is_ok_and(|have| have == *bytes);
    if same(&files.kubeconfig) && same(&files.ca) {
        return Ok(false);
    }
    create_private_dir(conf_dir)?;
    files.write()?;
    Ok(true)
}

/// The CNI kubeconfig and CA files, as (path, content).
struct KubeconfigFiles {
    kubeconfig: (PathBuf, Vec<u8>),
    ca: (PathBuf, Vec<u8>),
}

impl KubeconfigFiles {
    /// The CA first: the kubeconfig names it.
    fn write(&self) -> Result<(), InstallError> {
        write_atomically(&self.ca.0, &self.ca.1, 0o600)?;
        write_atomically(&self.kubeconfig.0, &self.kubeconfig.1, 0o600)
    }
}

fn in_cluster_kubeconfig(
    conf_dir: &Path,
    service_account_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<KubeconfigFiles>, InstallError> {
    let (Some(host), Some(port)) = (
        env("KUBERNETES_SERVICE_HOST"),
        env("KUBERNETES_SERVICE_PORT"),
    ) else {
        return Ok(None);
    };
    let token_path = service_account_dir.join("token");
    let ca_path = service_account_dir.join("ca.crt");
    let token = std::fs::read_to_string(&token_path).map_err(io(&token_path))?;
    let ca = std::fs::read(&ca_path).map_err(io(&ca_path))?;
    let ca_target = conf_dir.join("malla-ca.crt");
    let server = if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    };
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": {"server": server, "certificate-authority": ca_target}}],
        "users": [{"name": "malla", "user": {"token": token.trim()}}],
        "contexts": [{"name": "malla", "context": {"cluster": "cluster", "user": "malla"}}],
        "current-context": "malla",
    });
    Ok(Some(KubeconfigFiles {
        kubeconfig: (
            conf_dir.join("malla-kubeconfig"),
            serde_json::to_vec_pretty(&kubeconfig).unwrap_or_default(),
        ),
        ca: (ca_target, ca),
    }))
}

/// Malla's conflist for a node.
pub fn conflist(
    node: &str,
    datastore: &malla_store::DatastoreSpec,
    agent_ready_file: Option<&Path>,
    cni_version: &str,
) -> Value {
    let mut plugin = serde_json::json!({
        "type": PLUGIN_NAME,
        "nodeName": node,
        "datastore": datastore,
        "capabilities": {"ips": true, "mac": true},
    });
    if let Some(f) = agent_ready_file {
        plugin["agentReadyFile"] = serde_json::json!(f);
    }
    serde_json::json!({"cniVersion": cni_version, "name": "malla", "plugins": [plugin]})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service-account directory under `dir` holding `token` and the CA `CA`.
    fn service_account(dir: &Path, token: &str) -> PathBuf {
        let sa = dir.join("sa");
        std::fs::create_dir_all(&sa).unwrap();
        std::fs::write(sa.join("token"), token).unwrap();
        std::fs::write(sa.join("ca.crt"), "CA").unwrap();
        sa
    }

    /// The environment of a pod whose API server is at `host`:443.
    fn in_cluster(host: &'static str) -> impl Fn(&str) -> Option<String> {
        move |k: &str| match k {
            "KUBERNETES_SERVICE_HOST" => Some(host.to_string()),
            "KUBERNETES_SERVICE_PORT" => Some("443".to_string()),
            _ => None,
        }
    }

    #[test]
    fn in_cluster_kubeconfig_carries_the_service_account() {
        let dir = tempfile::tempdir().unwrap();
        let sa = service_account(dir.path(), "tok\n");
        let confs = dir.path().join("net.d");
        assert_eq!(
            write_in_cluster_kubeconfig(&confs, &sa, &|_| None).unwrap(),
            None,
            "outside a cluster"
        );
        let env = in_cluster("fd00::1");
        let path = write_in_cluster_kubeconfig(&confs, &sa, &env)
            .unwrap()
            .unwrap();
        let kc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            kc["clusters"][0]["cluster"]["server"],
            "https://[fd00::1]:443"
        );
        assert_eq!(kc["users"][0]["user"]["token"], "tok");
        assert_eq!(std::fs::read(confs.join("malla-ca.crt")).unwrap(), b"CA");

        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    /// A rotated token reaches the kubeconfig at the next refresh; an unchanged one writes
    /// nothing (the file is not replaced); outside a cluster nothing happens.
    #[test]
    fn a_rotated_token_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let sa = service_account(dir.path(), "first\n");
        let confs = dir.path().join("net.d");
        let env = in_cluster("198.19.64.1");
        assert!(!refresh_in_cluster_kubeconfig(&confs, &sa, &|_| None).unwrap());
        let path = write_in_cluster_kubeconfig(&confs, &sa, &env)
            .unwrap()
            .unwrap();
        let token = |p: &Path| -> Value {
            let kc: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            kc["users"][0]["user"]["token"].clone()
        };
        assert_eq!(token(&path), "first");
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(&path).unwrap().ino();
        assert!(!refresh_in_cluster_kubeconfig(&confs, &sa, &env).unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            inode,
            "not replaced"
        );
        std::fs::write(sa.join("token"), "second\n").unwrap();
        assert!(refresh_in_cluster_kubeconfig(&confs, &sa, &env).unwrap());
        assert_eq!(token(&path), "second");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A rotated CA too.
        std::fs::write(sa.join("ca.crt"), "CA2").unwrap();
        assert!(refresh_in_cluster_kubeconfig(&confs, &sa, &env).unwrap());
        assert_eq!(std::fs::read(confs.join("malla-ca.crt")).unwrap(), b"CA2");
    }

    #[test]
    fn installs_atomically_and_refuses_foreign_conflists() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("plugin");
        std::fs::write(&bin, b"#!/bin/true\n").unwrap();
        let (bins, confs) = (dir.path().join("bin"), dir.path().join("net.d"));
        let conf = conflist(
            "n1",
            &malla_store::DatastoreSpec::Local {
                path: "/var/lib/malla/store.db".into(),
            },
            None,
            "1.1.0",
        );
        let got = install(&bin, &bins, &confs, &conf, false).unwrap();
        assert_eq!(std::fs::read(&got.binary).unwrap(), b"#!/bin/true\n");
        assert!(std::fs::metadata(&got.binary).unwrap().permissions().mode() & 0o111 != 0);
        // Re-installing over our own conflist is fine.
        install(&bin, &bins, &confs, &conf, false).unwrap();
        // A foreign file under our name is refused without force, replaced with it.
        std::fs::write(
            confs.join(CONFLIST_NAME),
            br#"{"name":"x","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            install(&bin, &bins, &confs, &conf, false),
            Err(InstallError::Foreign(_))
        ));
        install(&bin, &bins, &confs, &conf, true).unwrap();
        // A conflist that sorts first is reported: runtimes would use it instead.
        std::fs::write(confs.join("05-other.conflist"), b"{}").unwrap();
        let got = install(&bin, &bins, &confs, &conf, false).unwrap();
        assert_eq!(got.shadowed_by, vec![confs.join("05-other.conflist")]);
        // No temp files left behind.
        assert!(std::fs::read_dir(&confs).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')));
    }
}
