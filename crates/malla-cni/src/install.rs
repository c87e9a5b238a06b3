//! `malla install-cni`: puts the plugin binary in the CNI bin dir and Malla's conflist in the
//! CNI conf dir, each atomically (write a temp file, then rename), the way CNI DaemonSets
//! install. A conflist that is not Malla's is never overwritten without `force`.

use std::os::unix::fs::PermissionsExt;
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

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
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
    std::fs::create_dir_all(conf_dir).map_err(io(conf_dir))?;
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
    write_atomically(&target, &text, 0o644)?;
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
