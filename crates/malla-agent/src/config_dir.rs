//! Cluster settings from a directory of files, one per setting (a mounted ConfigMap, as
//! `deploy/configmap.yaml`): `routing`, `vxlanVni`, `vxlanPort` and `pools.yaml` (a YAML list
//! of IP pools). At start the agent writes what the datastore lacks: the cluster configuration
//! when there is none, and each pool whose name is not there yet. What is already stored wins,
//! so every node's agent can run this at once and an operator's later edits are not undone.

use std::path::Path;

use anyhow::Context;
use malla_api::{keys, ClusterConfig, IpPool};
use malla_store::{Store, StoreError};

/// Reads one setting, None when its file is missing.
fn setting(dir: &Path, name: &str) -> anyhow::Result<Option<String>> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The settings of `dir`: the cluster configuration and pools (validated, the file and
/// field named on error).
pub fn read(dir: &Path) -> anyhow::Result<(ClusterConfig, Vec<IpPool>)> {
    let mut config = ClusterConfig::default();
    if let Some(r) = setting(dir, "routing")? {
        config.routing = r
            .parse()
            .map_err(|e: String| anyhow::anyhow!("{}: {e}", dir.join("routing").display()))?;
    }
    if let Some(v) = setting(dir, "vxlanVni")? {
        config.vxlan_vni = v
            .parse()
            .with_context(|| format!("{}: not a VNI", dir.join("vxlanVni").display()))?;
    }
    if let Some(v) = setting(dir, "vxlanPort")? {
        config.vxlan_port = v
            .parse()
            .with_context(|| format!("{}: not a port", dir.join("vxlanPort").display()))?;
    }
    let pools = match setting(dir, "pools.yaml")? {
        None => Vec::new(),
        Some(text) => {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase", deny_unknown_fields)]
            struct PoolFile {
                name: String,
                cidr: ipnet::IpNet,
                block_size: Option<u8>,
                #[serde(default)]
                nat_outgoing: bool,
                #[serde(default)]
                disabled: bool,
            }
            let path = dir.join("pools.yaml");
            let de = serde_yaml::Deserializer::from_str(&text);
            let list: Vec<PoolFile> = serde_path_to_error::deserialize(de)
                .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))?;
            let mut pools = Vec::new();
            for (i, p) in list.into_iter().enumerate() {
                let pool = IpPool {
                    block_size: p.block_size.unwrap_or(if p.cidr.addr().is_ipv6() {
                        122
                    } else {
                        26
                    }),
                    name: p.name,
                    cidr: p.cidr,
                    nat_outgoing: p.nat_outgoing,
                    disabled: p.disabled,
                };
                pool.validate()
                    .map_err(|e| anyhow::anyhow!("{}: [{i}]: {e}", path.display()))?;
                pools.push(pool);
            }
            pools
        }
    };
    Ok((config, pools))
}

/// Writes the settings of `dir` that the datastore does not have yet.
pub fn apply(store: &dyn Store, dir: &Path) -> anyhow::Result<()> {
    let (config, pools) = read(dir)?;
    match store.create(keys::CLUSTER_CONFIG, &serde_json::to_string(&config)?) {
        Ok(_) | Err(StoreError::AlreadyExists(_)) => {}
        Err(e) => return Err(e).context("writing the cluster configuration"),
    }
    let ipam = malla_ipam::Ipam::new(store);
    let existing = ipam.pools()?;
    for pool in pools {
        if existing.iter().any(|p| p.name == pool.name) {
            continue;
        }
        ipam.ensure_pool(&pool)
            .with_context(|| format!("adding pool {}", pool.name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_fill_what_is_missing_and_bad_files_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routing"), "vxlan\n").unwrap();
        std::fs::write(
            dir.path().join("pools.yaml"),
            "- name: default-ipv4\n  cidr: 198.18.0.0/16\n  natOutgoing: true\n- name: v6\n  cidr: fd00:1::/64\n",
        )
        .unwrap();
        let store = malla_store::LocalStore::open(&dir.path().join("s.db")).unwrap();
        apply(&store, dir.path()).unwrap();
        let (cfg, _) = malla_store::get_json::<ClusterConfig>(&store, keys::CLUSTER_CONFIG)
            .unwrap()
            .unwrap();
        assert_eq!(cfg.routing, malla_api::RoutingMode::Vxlan);
        let pools = malla_ipam::Ipam::new(&store).pools().unwrap();
        assert_eq!(pools.len(), 2);
        assert_eq!(pools[1].block_size, 122);
        // Already stored wins.
        std::fs::write(dir.path().join("routing"), "direct").unwrap();
        apply(&store, dir.path()).unwrap();
        let (cfg, _) = malla_store::get_json::<ClusterConfig>(&store, keys::CLUSTER_CONFIG)
            .unwrap()
            .unwrap();
        assert_eq!(cfg.routing, malla_api::RoutingMode::Vxlan);

        std::fs::write(
            dir.path().join("pools.yaml"),
            "- name: x\n  cidr: 198.18.0.0/16\n  blockSiz: 26\n",
        )
        .unwrap();
        let e = format!("{:#}", read(dir.path()).unwrap_err());
        assert!(e.contains("blockSiz"), "{e}");
        std::fs::write(dir.path().join("routing"), "ospf").unwrap();
        assert!(format!("{:#}", read(dir.path()).unwrap_err()).contains("routing"));
    }
}
