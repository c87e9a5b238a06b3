//! Which datastore to use, as configuration: a local file, etcd endpoints with a key prefix, or
//! a Kubernetes API server. One string form for command lines (`/var/lib/malla/store.db`,
//! `etcd://10.0.0.1:2379,10.0.0.2:2379/malla`, `kubernetes` or `kubernetes:/path/kubeconfig`)
//! and one JSON form for CNI configurations (`{"type": "local", "path": …}`,
//! `{"type": "etcd", "endpoints": […], "prefix": …}`, `{"type": "kubernetes", "kubeconfig": …}`).
//!
//! A secured etcd: TLS with the CA that signs etcd's serving certificate and, for client-
//! certificate authentication, this client's certificate and key; and/or etcd's own users (a
//! name and a password read from a file, or from `MALLA_ETCD_PASSWORD`). String form: query
//! parameters, `etcd://10.0.0.1:2379/malla?ca=/etc/malla/etcd-ca.crt&cert=/etc/malla/etcd.crt&key=/etc/malla/etcd.key&user=malla&password-file=/etc/malla/etcd-password`
//! (with `ca`, the endpoints are `https://`); JSON form: `"tls": {"ca": …, "cert": …, "key": …}`,
//! `"username": …`, `"passwordFile": …`.

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
        /// TLS to etcd (the endpoints are then `https://`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<EtcdTls>,
        /// An etcd user (etcd's own authentication), with [`DatastoreSpec::Etcd::password_file`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username: Option<String>,
        /// The user's password, in a file (first line); unset: `MALLA_ETCD_PASSWORD`.
        #[serde(
            default,
            rename = "passwordFile",
            skip_serializing_if = "Option::is_none"
        )]
        password_file: Option<PathBuf>,
    },
    /// The API server named by this kubeconfig, or when None the usual way (`KUBECONFIG`,
    /// `~/.kube/config`, in-cluster service account).
    Kubernetes {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kubeconfig: Option<PathBuf>,
    },
}

/// TLS to etcd: the CA that signs etcd's serving certificate, and this client's certificate and
/// key (PEM files) for client-certificate authentication (both or neither).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    pub ca: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// The environment variable an etcd user's password is read from when no file names it.
pub const ETCD_PASSWORD_ENV: &str = "MALLA_ETCD_PASSWORD";

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
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, default_prefix()),
        };
        let (mut ca, mut cert, mut key, mut username, mut password_file) =
            (None, None, None, None, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .filter(|(_, v)| !v.is_empty())
                .ok_or_else(|| format!("{s:?}: {pair:?}: expected NAME=VALUE"))?;
            let slot = match k {
                "ca" => &mut ca,
                "cert" => &mut cert,
                "key" => &mut key,
                "user" => &mut username,
                "password-file" => &mut password_file,
                _ => {
                    return Err(format!(
                        "{s:?}: unknown parameter {k:?} (known: ca, cert, key, user, password-file)"
                    ))
                }
            };
            *slot = Some(v.to_string());
        }
        let tls = match (ca, cert, key) {
            (None, None, None) => None,
            (Some(ca), cert, key) => Some(EtcdTls {
                ca: ca.into(),
                cert: cert.map(PathBuf::from),
                key: key.map(PathBuf::from),
            }),
            (None, _, _) => {
                return Err(format!(
                    "{s:?}: cert and key need ca (the CA of etcd's serving certificate)"
                ))
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(format!("{s:?}: no etcd endpoint (etcd://host:port/prefix)"));
        }
        let spec = DatastoreSpec::Etcd {
            endpoints,
            prefix,
            tls,
            username,
            password_file: password_file.map(PathBuf::from),
        };
        spec.check()?;
        Ok(spec)
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
            DatastoreSpec::Etcd {
                endpoints, prefix, ..
            } => {
                self.check().map_err(StoreError::Backend)?;
                Ok(Box::new(EtcdStore::connect_with(
                    endpoints,
                    prefix,
                    timeout.unwrap_or(Duration::from_secs(5)),
                    &self.etcd_access()?,
                )?))
            }
            DatastoreSpec::Kubernetes { kubeconfig } => Ok(Box::new(KubeStore::connect(
                kubeconfig.as_deref(),
                timeout.unwrap_or(Duration::from_secs(10)),
            )?)),
        }
    }
}

impl DatastoreSpec {
    /// Refuses an etcd spec whose security settings do not fit together, naming the field.
    pub fn check(&self) -> Result<(), String> {
        let DatastoreSpec::Etcd {
            endpoints,
            tls,
            username,
            password_file,
            ..
        } = self
        else {
            return Ok(());
        };
        if let Some(t) = tls {
            if t.cert.is_some() != t.key.is_some() {
                return Err(
                    "etcd tls: cert and key go together (client-certificate authentication)".into(),
                );
            }
            if let Some(e) = endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(format!("etcd tls: endpoint {e} is plain http"));
            }
        }
        if password_file.is_some() && username.is_none() {
            return Err("etcd passwordFile: needs username".into());
        }
        Ok(())
    }

    /// The credentials an etcd spec names, read from their files (None for other backends).
    fn etcd_access(&self) -> Result<crate::etcd::EtcdAccess, StoreError> {
        let DatastoreSpec::Etcd {
            tls,
            username,
            password_file,
            ..
        } = self
        else {
            return Ok(Default::default());
        };
        let read = |what: &str, p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| StoreError::Backend(format!("etcd {what} {}: {e}", p.display())))
        };
        let tls = match tls {
            None => None,
            Some(t) => Some(crate::etcd::EtcdTlsPem {
                ca: read("tls.ca", &t.ca)?,
                identity: match (&t.cert, &t.key) {
                    (Some(c), Some(k)) => Some((read("tls.cert", c)?, read("tls.key", k)?)),
                    _ => None,
                },
            }),
        };
        let user = match username {
            None => None,
            Some(u) => {
                let password = match password_file {
                    Some(p) => String::from_utf8_lossy(&read("passwordFile", p)?)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string(),
                    None => std::env::var(ETCD_PASSWORD_ENV).map_err(|_| {
                        StoreError::Backend(format!(
                            "etcd user {u}: no passwordFile and {ETCD_PASSWORD_ENV} is unset"
                        ))
                    })?,
                };
                Some((u.clone(), password))
            }
        };
        Ok(crate::etcd::EtcdAccess { tls, user })
    }
}

impl std::fmt::Display for DatastoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatastoreSpec::Local { path } => write!(f, "{}", path.display()),
            DatastoreSpec::Etcd {
                endpoints,
                prefix,
                tls,
                username,
                password_file,
            } => {
                let hosts: Vec<&str> = endpoints
                    .iter()
                    .map(|e| {
                        e.trim_start_matches("http://")
                            .trim_start_matches("https://")
                    })
                    .collect();
                write!(f, "etcd://{}{prefix}", hosts.join(","))?;
                let mut params = Vec::new();
                if let Some(t) = tls {
                    params.push(format!("ca={}", t.ca.display()));
                    if let Some(c) = &t.cert {
                        params.push(format!("cert={}", c.display()));
                    }
                    if let Some(k) = &t.key {
                        params.push(format!("key={}", k.display()));
                    }
                }
                if let Some(u) = username {
                    params.push(format!("user={u}"));
                }
                if let Some(p) = password_file {
                    params.push(format!("password-file={}", p.display()));
                }
                if !params.is_empty() {
                    write!(f, "?{}", params.join("&"))?;
                }
                Ok(())
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
                prefix: "/malla-lab".into(),
                tls: None,
                username: None,
                password_file: None,
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
                prefix: "/malla".into(),
                tls: None,
                username: None,
                password_file: None,
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

    #[test]
    fn etcd_security_in_both_forms() {
        let s = "etcd://198.19.0.1:2379/m?ca=/p/ca.crt&cert=/p/c.crt&key=/p/c.key&user=u&password-file=/p/pw";
        let spec = DatastoreSpec::parse(s).unwrap();
        assert_eq!(
            spec,
            DatastoreSpec::Etcd {
                endpoints: vec!["https://198.19.0.1:2379".into()],
                prefix: "/m".into(),
                tls: Some(EtcdTls {
                    ca: "/p/ca.crt".into(),
                    cert: Some("/p/c.crt".into()),
                    key: Some("/p/c.key".into()),
                }),
                username: Some("u".into()),
                password_file: Some("/p/pw".into()),
            }
        );
        assert_eq!(spec.to_string(), s);
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""tls":{"ca":"/p/ca.crt""#), "{json}");
        assert!(json.contains(r#""passwordFile":"/p/pw""#), "{json}");
        assert_eq!(serde_json::from_str::<DatastoreSpec>(&json).unwrap(), spec);
        // Without security the JSON is what it was.
        let plain = DatastoreSpec::parse("etcd://a:1/m").unwrap();
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"type":"etcd","endpoints":["http://a:1"],"prefix":"/m"}"#
        );
        // Refused, naming what is wrong.
        for (bad, why) in [
            ("etcd://a:1/m?cert=/c&key=/k", "need ca"),
            ("etcd://a:1/m?ca=/ca&cert=/c", "go together"),
            ("etcd://a:1/m?password-file=/p", "needs username"),
            ("etcd://a:1/m?bogus=1", "unknown parameter"),
            ("etcd://a:1/m?ca=", "NAME=VALUE"),
        ] {
            let e = DatastoreSpec::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(serde_json::from_str::<DatastoreSpec>(
            r#"{"type":"etcd","endpoints":["https://a:1"],"tls":{"ca":"/x","bogus":1}}"#
        )
        .is_err());
        let e = DatastoreSpec::Etcd {
            endpoints: vec!["http://a:1".into()],
            prefix: "/m".into(),
            tls: Some(EtcdTls {
                ca: "/x".into(),
                cert: None,
                key: None,
            }),
            username: None,
            password_file: None,
        }
        .check()
        .unwrap_err();
        assert!(e.contains("plain http"), "{e}");
    }
}
