//! Which datastore to use, as configuration: a local file, etcd endpoints with a key prefix, or
//! a Kubernetes API server. One string form for command lines (`/var/lib/malla/store.db`,
//! `etcd://10.0.0.1:2379,10.0.0.2:2379/malla`, `kubernetes` or `kubernetes:/path/kubeconfig`)
//! and one JSON form for CNI configurations (`{"type": "local", "path": …}`,
//! `{"type": "etcd", "endpoints": […], "prefix": …}`, `{"type": "kubernetes", "kubeconfig": …}`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{EtcdStore, KubeStore, LocalStore, Store, StoreError};

/// Default key prefix of an etcd datastore.
pub const DEFAULT_ETCD_PREFIX: &str = "/malla";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum DatastoreSpec {
    Local {
        path: PathBuf,
    },
    Etcd {
        endpoints: Vec<String>,
        #[serde(default = "default_prefix")]
        prefix: String,
    },
    /// The API server named by this kubeconfig, or when None the usual way (`KUBECONFIG`,
    /// `~/.kube/config`, in-cluster service account).
    Kubernetes {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kubeconfig: Option<PathBuf>,
    },
}

fn default_prefix() -> String {
    DEFAULT_ETCD_PREFIX.to_string()
}

impl DatastoreSpec {
    /// Parses the command-line form: a path, or `etcd://host:port[,host:port…][/prefix]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "kubernetes" {
            return Ok(DatastoreSpec::Kubernetes { kubeconfig: None });
        }
        if let Some(path) = s.strip_prefix("kubernetes:") {
            if path.is_empty() {
                return Err(format!("{s:?}: expected kubernetes:/path/to/kubeconfig"));
            }
            return Ok(DatastoreSpec::Kubernetes {
                kubeconfig: Some(PathBuf::from(path)),
            });
        }
        let Some(rest) = s.strip_prefix("etcd://") else {
            if s.is_empty() {
                return Err("the datastore must not be empty".into());
            }
            return Ok(DatastoreSpec::Local {
                path: PathBuf::from(s),
            });
        };
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, default_prefix()),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(format!("{s:?}: no etcd endpoint (etcd://host:port/prefix)"));
        }
        Ok(DatastoreSpec::Etcd { endpoints, prefix })
    }

    /// Opens the store this spec names (requests bounded by 5 s, 10 s for Kubernetes).
    pub fn open(&self) -> Result<Box<dyn Store>, StoreError> {
        self.open_with_timeout(None)
    }

    /// Opens the store with every request (and the connection) bounded by `timeout` instead
    /// of the backend's default: a caller with a fallback (the CNI plugin's node cache) does
    /// not wait long on a server that hangs.
    pub fn open_with_timeout(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Box<dyn Store>, StoreError> {
        match self {
            DatastoreSpec::Local { path } => Ok(Box::new(LocalStore::open(path)?)),
            DatastoreSpec::Etcd { endpoints, prefix } => Ok(Box::new(EtcdStore::connect(
                endpoints,
                prefix,
                timeout.unwrap_or(Duration::from_secs(5)),
            )?)),
            DatastoreSpec::Kubernetes { kubeconfig } => Ok(Box::new(KubeStore::connect(
                kubeconfig.as_deref(),
                timeout.unwrap_or(Duration::from_secs(10)),
            )?)),
        }
    }
}

impl std::fmt::Display for DatastoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatastoreSpec::Local { path } => write!(f, "{}", path.display()),
            DatastoreSpec::Etcd { endpoints, prefix } => {
                let hosts: Vec<&str> = endpoints
                    .iter()
                    .map(|e| {
                        e.trim_start_matches("http://")
                            .trim_start_matches("https://")
                    })
                    .collect();
                write!(f, "etcd://{}{prefix}", hosts.join(","))
            }
            DatastoreSpec::Kubernetes { kubeconfig: None } => write!(f, "kubernetes"),
            DatastoreSpec::Kubernetes {
                kubeconfig: Some(p),
            } => write!(f, "kubernetes:{}", p.display()),
        }
    }
}

impl std::str::FromStr for DatastoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms_and_round_trips() {
        assert_eq!(
            DatastoreSpec::parse("/var/lib/malla/store.db").unwrap(),
            DatastoreSpec::Local {
                path: "/var/lib/malla/store.db".into()
            }
        );
        let e = DatastoreSpec::parse("etcd://198.19.0.1:2379,198.19.0.2:2379/malla-lab").unwrap();
        assert_eq!(
            e,
            DatastoreSpec::Etcd {
                endpoints: vec![
                    "http://198.19.0.1:2379".into(),
                    "http://198.19.0.2:2379".into()
                ],
                prefix: "/malla-lab".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "etcd://198.19.0.1:2379,198.19.0.2:2379/malla-lab"
        );
        assert_eq!(DatastoreSpec::parse(&e.to_string()).unwrap(), e);
        assert!(DatastoreSpec::parse("etcd:///x").is_err());
        let json: DatastoreSpec =
            serde_json::from_str(r#"{"type":"etcd","endpoints":["http://a:1"]}"#).unwrap();
        assert_eq!(
            json,
            DatastoreSpec::Etcd {
                endpoints: vec!["http://a:1".into()],
                prefix: "/malla".into()
            }
        );
        let local: DatastoreSpec = serde_json::from_str(r#"{"type":"local","path":"/x"}"#).unwrap();
        assert_eq!(local, DatastoreSpec::Local { path: "/x".into() });
        assert!(serde_json::from_str::<DatastoreSpec>(r#"{"type":"zookeeper"}"#).is_err());
        for k in ["kubernetes", "kubernetes:/etc/malla/kubeconfig"] {
            let spec = DatastoreSpec::parse(k).unwrap();
            assert_eq!(spec.to_string(), k);
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<DatastoreSpec>(&json).unwrap(), spec);
        }
        assert!(DatastoreSpec::parse("kubernetes:").is_err());
    }
}
