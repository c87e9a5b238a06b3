//! What `malla audit` makes of what it saw: plain values in ([`Observations`]: sockets, probe
//! outcomes, HTTP answers, process flags), findings out, each with a severity and a remediation.
//! No sockets, no namespaces here, so every rule is tested without root.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

/// How bad a finding is; the table and the JSON list the worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Anyone who reaches it can read or change the cluster.
    High,
    /// A hole that widens what a compromised pod can do.
    Medium,
    /// Worth tightening.
    Low,
    /// What was found, nothing wrong with it.
    Info,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::High => "high",
            Severity::Medium => "medium",
            Severity::Low => "low",
            Severity::Info => "info",
        }
    }
}

/// One row of the audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub severity: Severity,
    /// A stable name for the rule (e.g. `reachable-from-pods`), for scripts.
    pub check: String,
    pub what: String,
    /// The node (or `control-plane`) and, for a port, the address it listens on.
    #[serde(rename = "where")]
    pub place: String,
    /// The port, when the finding is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub evidence: String,
    pub remediation: String,
}

/// An HTTP(S) request's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpOutcome {
    /// Status code and (the start of) the body.
    Answered { status: u16, body: String },
    /// No HTTP answer: why (refused, TLS refused, timeout, not HTTP).
    Failed(String),
}

impl HttpOutcome {
    fn status(&self) -> Option<u16> {
        match self {
            HttpOutcome::Answered { status, .. } => Some(*status),
            HttpOutcome::Failed(_) => None,
        }
    }
    fn body(&self) -> &str {
        match self {
            HttpOutcome::Answered { body, .. } => body,
            HttpOutcome::Failed(_) => "",
        }
    }
    /// `HTTP 403: {…first words…}` or the failure, for the evidence column.
    pub fn words(&self) -> String {
        match self {
            HttpOutcome::Answered { status, body } => {
                let short: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
                let short: String = short.chars().take(80).collect();
                if short.is_empty() {
                    format!("HTTP {status}")
                } else {
                    format!("HTTP {status}: {short}")
                }
            }
            HttpOutcome::Failed(why) => why.clone(),
        }
    }
}

/// What a port's own protocol answered (asked from inside the host that listens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceObs {
    /// Anonymous `GET /pods` over HTTPS (port 10250).
    Kubelet(HttpOutcome),
    /// `GET /pods` over plain HTTP (port 10255).
    KubeletReadOnly(HttpOutcome),
    /// `GET /version` over plain HTTP (port 8080, the API server's old insecure port).
    InsecureHttp(HttpOutcome),
    /// etcd's client port: `GET /version` in plain HTTP, then over TLS without a client
    /// certificate, and how many keys a range request without credentials counted.
    Etcd {
        plain: HttpOutcome,
        tls_without_cert: HttpOutcome,
        keys_counted: Option<u64>,
    },
}

impl ServiceObs {
    /// etcd ended the TLS handshake of a client without a certificate with a certificate
    /// alert (`BadCertificate`, `CertificateRequired`): it wants a client certificate.
    fn etcd_wants_client_cert(&self) -> bool {
        match self {
            ServiceObs::Etcd {
                tls_without_cert: HttpOutcome::Failed(why),
                ..
            } => why.contains("alert") && why.to_ascii_lowercase().contains("certificate"),
            _ => false,
        }
    }
}

/// Whether a connection from one source got through.
pub type Reach = Result<(), String>;

/// A listening TCP socket on one of the audited ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerObs {
    pub port: u16,
    /// The local addresses it is bound to (`0.0.0.0` and `::` mean all).
    pub bound: Vec<IpAddr>,
    /// Connections tried from pods, by pod (`namespace/name`). Empty when none was tried.
    pub from_pods: Vec<(String, Reach)>,
    /// The connection tried from outside the cluster; `None` when none was tried.
    pub from_outside: Option<Reach>,
    /// Whether connections were tried at all (the lab); on a real node only the binding is known.
    pub probed: bool,
    pub service: Option<ServiceObs>,
}

/// One host (a node, or the lab's control-plane namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostObs {
    pub name: String,
    pub listeners: Vec<ListenerObs>,
}

/// An anonymous request to an API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiEndpointObs {
    pub place: String,
    pub url: String,
    /// Anonymous `GET /api`.
    pub anonymous: HttpOutcome,
}

/// A kube-apiserver process and its command-line flags (`--name=value` or `--name value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServerProcess {
    pub place: String,
    pub pid: u32,
    pub flags: BTreeMap<String, String>,
}

/// A datastore kept in a file (the embedded store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatastoreFile {
    pub path: String,
    pub mode: u32,
}

/// Everything the audit saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observations {
    pub hosts: Vec<HostObs>,
    pub api_endpoints: Vec<ApiEndpointObs>,
    pub apiserver_processes: Vec<ApiServerProcess>,
    pub datastore_files: Vec<DatastoreFile>,
}

/// A control-plane port of the seed's list (and the old insecure ones), with how bad it is to
/// reach it from a pod and from outside the cluster.
#[derive(Debug, Clone, Copy)]
pub struct PortInfo {
    pub port: u16,
    pub component: &'static str,
    pub from_pods: Severity,
    pub from_outside: Severity,
    /// How to close it.
    pub restrict: &'static str,
}

const FIREWALL: &str = "or drop it in a host firewall";

/// The audited ports: the seed's control-plane ports, and the insecure ones.
pub const PORTS: &[PortInfo] = &[
    PortInfo {
        port: 22,
        component: "SSH",
        from_pods: Severity::Medium,
        from_outside: Severity::Low,
        restrict: "sshd ListenAddress on the management network only",
    },
    PortInfo {
        port: 6443,
        component: "kube-apiserver",
        from_pods: Severity::Info,
        from_outside: Severity::Info,
        restrict: "pods and clients need the API server; keep authentication on and anonymous access off",
    },
    PortInfo {
        port: 2379,
        component: "etcd client",
        from_pods: Severity::High,
        from_outside: Severity::High,
        restrict: "etcd --listen-client-urls on 127.0.0.1 or the control-plane network only, with --client-cert-auth",
    },
    PortInfo {
        port: 2380,
        component: "etcd peer",
        from_pods: Severity::High,
        from_outside: Severity::High,
        restrict: "etcd --listen-peer-urls on the control-plane network only, with --peer-client-cert-auth",
    },
    PortInfo {
        port: 8080,
        component: "insecure HTTP (the API server's old --insecure-port)",
        from_pods: Severity::Medium,
        from_outside: Severity::Medium,
        restrict: "kube-apiserver --insecure-port=0; whatever else listens there: bind it to 127.0.0.1",
    },
    PortInfo {
        port: 10250,
        component: "kubelet",
        from_pods: Severity::Medium,
        from_outside: Severity::Medium,
        restrict: "let only the API server reach it: kubelet --address on the node's control-plane address",
    },
    PortInfo {
        port: 10255,
        component: "kubelet read-only",
        from_pods: Severity::High,
        from_outside: Severity::High,
        restrict: "kubelet --read-only-port=0 (readOnlyPort: 0)",
    },
    PortInfo {
        port: 10256,
        component: "kube-proxy health",
        from_pods: Severity::Low,
        from_outside: Severity::Low,
        restrict: "kube-proxy --healthz-bind-address on the node's address for the load balancer only",
    },
    PortInfo {
        port: 10257,
        component: "kube-controller-manager",
        from_pods: Severity::Medium,
        from_outside: Severity::Medium,
        restrict: "kube-controller-manager --bind-address=127.0.0.1",
    },
    PortInfo {
        port: 10259,
        component: "kube-scheduler",
        from_pods: Severity::Medium,
        from_outside: Severity::Medium,
        restrict: "kube-scheduler --bind-address=127.0.0.1",
    },
];

/// The catalog entry of `port`.
pub fn port_info(port: u16) -> Option<&'static PortInfo> {
    PORTS.iter().find(|p| p.port == port)
}

fn bound_words(bound: &[IpAddr]) -> String {
    let v: Vec<String> = bound
        .iter()
        .map(|a| match a {
            IpAddr::V4(_) => a.to_string(),
            IpAddr::V6(_) => format!("[{a}]"),
        })
        .collect();
    v.join(", ")
}

/// Bound only to loopback addresses: nothing outside the host reaches it.
pub fn loopback_only(bound: &[IpAddr]) -> bool {
    !bound.is_empty() && bound.iter().all(|a| a.is_loopback())
}

fn reach_words(list: &[(String, Reach)]) -> (usize, String) {
    let ok: Vec<&str> = list
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(s, _)| s.as_str())
        .collect();
    let words = format!(
        "connected from {}/{} pods probed ({})",
        ok.len(),
        list.len(),
        ok.join(", ")
    );
    (ok.len(), words)
}

/// Turns observations into findings, worst first.
pub fn findings(obs: &Observations) -> Vec<Finding> {
    let mut out = Vec::new();
    for host in &obs.hosts {
        for l in &host.listeners {
            port_findings(&host.name, l, &mut out);
        }
    }
    for e in &obs.api_endpoints {
        api_endpoint_findings(e, &mut out);
    }
    for p in &obs.apiserver_processes {
        apiserver_flag_findings(p, &mut out);
    }
    for f in &obs.datastore_files {
        if f.mode & 0o077 != 0 {
            out.push(Finding {
                severity: Severity::Medium,
                check: "datastore-file-open".into(),
                what: "the embedded datastore file is readable by other users".into(),
                place: f.path.clone(),
                port: None,
                evidence: format!("mode {:04o}", f.mode & 0o7777),
                remediation: format!("chmod 0600 {}", f.path),
            });
        }
    }
    out.sort_by(|a, b| {
        (a.severity, &a.place, a.port, &a.check).cmp(&(b.severity, &b.place, b.port, &b.check))
    });
    out
}

fn port_findings(host: &str, l: &ListenerObs, out: &mut Vec<Finding>) {
    let Some(info) = port_info(l.port) else {
        return;
    };
    let place = format!("{host} {}:{}", bound_words(&l.bound), l.port);
    let finding =
        |severity, check: &str, what: String, evidence: String, remediation: String| Finding {
            severity,
            check: check.into(),
            what,
            place: place.clone(),
            port: Some(l.port),
            evidence,
            remediation,
        };
    let remediation = format!("{}, {FIREWALL}", info.restrict);
    let (pods_ok, mut pods_words) = reach_words(&l.from_pods);
    let mut outside_words = "connected from outside the cluster".to_string();
    // An etcd that wants a client certificate gives nothing to whoever reaches it: the open
    // port is a wider attack surface, not an open datastore.
    let cert_required = l
        .service
        .as_ref()
        .is_some_and(ServiceObs::etcd_wants_client_cert);
    let (sev_pods, sev_outside) = if cert_required {
        for w in [&mut pods_words, &mut outside_words] {
            w.push_str("; etcd requires a client certificate");
        }
        (
            info.from_pods.max(Severity::Medium),
            info.from_outside.max(Severity::Medium),
        )
    } else {
        (info.from_pods, info.from_outside)
    };
    let outside_ok = matches!(l.from_outside, Some(Ok(())));
    if l.probed {
        if pods_ok > 0 {
            out.push(finding(
                sev_pods,
                "reachable-from-pods",
                format!("{} port {} is reachable from pods", info.component, l.port),
                pods_words.clone(),
                remediation.clone(),
            ));
        }
        if outside_ok {
            out.push(finding(
                sev_outside,
                "reachable-from-outside",
                format!(
                    "{} port {} is reachable from outside the cluster",
                    info.component, l.port
                ),
                outside_words,
                remediation.clone(),
            ));
        }
        if pods_ok == 0 && !outside_ok {
            let tried = match (&l.from_pods.is_empty(), &l.from_outside) {
                (true, None) => "no connection tried (loopback only)".to_string(),
                _ => {
                    let mut w = Vec::new();
                    if !l.from_pods.is_empty() {
                        w.push(format!("not from {} pods probed", l.from_pods.len()));
                    }
                    if let Some(Err(e)) = &l.from_outside {
                        w.push(format!("not from outside ({e})"));
                    }
                    w.join("; ")
                }
            };
            out.push(finding(
                Severity::Info,
                "listening",
                format!("{} port {} is listening", info.component, l.port),
                format!("reachable only from the host: {tried}"),
                "nothing to do".into(),
            ));
        }
    } else if loopback_only(&l.bound) {
        out.push(finding(
            Severity::Info,
            "listening",
            format!("{} port {} is listening", info.component, l.port),
            "bound to loopback only".into(),
            "nothing to do".into(),
        ));
    } else {
        out.push(finding(
            info.from_pods.min(info.from_outside), // the worse of the two
            "listening-on-network",
            format!(
                "{} port {} listens on the network: pods and outside reach it unless a firewall drops them",
                info.component, l.port
            ),
            format!("bound to {} (not probed from a pod)", bound_words(&l.bound)),
            remediation.clone(),
        ));
    }
    if let Some(s) = &l.service {
        service_findings(info, s, &finding, out);
    }
}

fn service_findings(
    info: &PortInfo,
    s: &ServiceObs,
    finding: &dyn Fn(Severity, &str, String, String, String) -> Finding,
    out: &mut Vec<Finding>,
) {
    match s {
        ServiceObs::Kubelet(o) => {
            let evidence = format!("anonymous GET /pods: {}", o.words());
            let (severity, check, what, remediation) = match o.status() {
                Some(200) => (
                    Severity::High,
                    "kubelet-anonymous-allowed",
                    "the kubelet serves anonymous requests: anonymous authentication on and authorization AlwaysAllow",
                    "kubelet --anonymous-auth=false --authorization-mode=Webhook (authentication.anonymous.enabled: false, authorization.mode: Webhook)",
                ),
                Some(401) => (
                    Severity::Info,
                    "kubelet-anonymous-off",
                    "the kubelet refuses anonymous requests (anonymous authentication off)",
                    "nothing to do",
                ),
                Some(403) => (
                    Severity::Low,
                    "kubelet-anonymous-authn",
                    "the kubelet authenticates anonymous requests and its authorization (Webhook) refuses them",
                    "kubelet --anonymous-auth=false (authentication.anonymous.enabled: false)",
                ),
                Some(_) => (
                    Severity::Low,
                    "kubelet-unexpected-answer",
                    "the kubelet port answered an anonymous request unexpectedly",
                    "check what listens on the kubelet's port",
                ),
                None => (
                    Severity::Info,
                    "kubelet-no-https",
                    "the kubelet port gave no HTTPS answer to an anonymous request",
                    "check what listens on the kubelet's port",
                ),
            };
            out.push(finding(
                severity,
                check,
                what.into(),
                evidence,
                remediation.into(),
            ));
        }
        ServiceObs::KubeletReadOnly(o) => {
            if o.status() == Some(200) {
                out.push(finding(
                    Severity::High,
                    "kubelet-read-only-port",
                    "the kubelet's read-only port serves pod details without authentication".into(),
                    format!("GET /pods: {}", o.words()),
                    info.restrict.into(),
                ));
            }
        }
        ServiceObs::InsecureHttp(o) => {
            if o.status() == Some(200) && o.body().contains("gitVersion") {
                out.push(finding(
                    Severity::High,
                    "apiserver-insecure-port",
                    "the API server's insecure port answers: no authentication, no authorization"
                        .into(),
                    format!("GET /version: {}", o.words()),
                    "kube-apiserver --insecure-port=0".into(),
                ));
            }
        }
        ServiceObs::Etcd {
            plain,
            tls_without_cert,
            keys_counted,
        } => {
            let is_etcd = |o: &HttpOutcome| o.status() == Some(200) && o.body().contains("etcd");
            let keys = keys_counted
                .map(|n| format!("; a range request without credentials counted {n} keys"))
                .unwrap_or_default();
            if is_etcd(plain) {
                out.push(finding(
                    Severity::High,
                    "etcd-plaintext",
                    "etcd answers plain HTTP: no TLS, no client authentication".into(),
                    format!("GET /version: {}{keys}", plain.words()),
                    "etcd --listen-client-urls https://… --client-cert-auth --trusted-ca-file …"
                        .into(),
                ));
            } else if is_etcd(tls_without_cert) {
                out.push(finding(
                    Severity::High,
                    "etcd-no-client-cert",
                    "etcd answers over TLS without a client certificate".into(),
                    format!("GET /version over TLS: {}{keys}", tls_without_cert.words()),
                    "etcd --client-cert-auth --trusted-ca-file …".into(),
                ));
            } else if s.etcd_wants_client_cert() {
                // Nothing answered without a certificate: not etcd, or not reached; the port
                // rows say enough.
                out.push(finding(
                    Severity::Info,
                    "etcd-client-cert-required",
                    "etcd refuses clients without a certificate".into(),
                    format!(
                        "plain HTTP: {}; TLS without a client certificate: {}",
                        plain.words(),
                        tls_without_cert.words()
                    ),
                    "nothing to do".into(),
                ));
            }
        }
    }
}

fn api_endpoint_findings(e: &ApiEndpointObs, out: &mut Vec<Finding>) {
    let evidence = format!("anonymous GET {}/api: {}", e.url, e.anonymous.words());
    let (severity, check, what, remediation) = match e.anonymous.status() {
        Some(200) => (
            Severity::High,
            "apiserver-anonymous-allowed",
            "the API server answers anonymous requests for resources",
            "kube-apiserver --anonymous-auth=false, and remove bindings to system:anonymous / system:unauthenticated",
        ),
        Some(403) => (
            Severity::Low,
            "apiserver-anonymous-auth",
            "the API server accepts anonymous requests (authorization refuses them)",
            "kube-apiserver --anonymous-auth=false (health checks then need credentials)",
        ),
        Some(401) => (
            Severity::Info,
            "apiserver-anonymous-off",
            "the API server refuses anonymous requests",
            "nothing to do",
        ),
        Some(_) => (
            Severity::Low,
            "apiserver-unexpected-answer",
            "the API server answered an anonymous request unexpectedly",
            "check the API server's authentication settings",
        ),
        None => (
            Severity::Info,
            "apiserver-unreachable",
            "the API server gave no HTTPS answer",
            "check the address (the kubeconfig's server) and the API server",
        ),
    };
    out.push(Finding {
        severity,
        check: check.into(),
        what: what.into(),
        place: e.place.clone(),
        port: None,
        evidence,
        remediation: remediation.into(),
    });
}

fn apiserver_flag_findings(p: &ApiServerProcess, out: &mut Vec<Finding>) {
    let place = format!("{} kube-apiserver (pid {})", p.place, p.pid);
    let flag = |name: &str| p.flags.get(name).map(String::as_str);
    let mut push = |severity, check: &str, what: &str, evidence: String, remediation: &str| {
        out.push(Finding {
            severity,
            check: check.into(),
            what: what.into(),
            place: place.clone(),
            port: None,
            evidence,
            remediation: remediation.into(),
        })
    };
    match flag("kubelet-certificate-authority") {
        Some(ca) if !ca.is_empty() => push(
            Severity::Info,
            "apiserver-verifies-kubelets",
            "the API server verifies kubelet serving certificates",
            format!("--kubelet-certificate-authority={ca}"),
            "nothing to do",
        ),
        _ => push(
            Severity::Medium,
            "apiserver-kubelet-ca-missing",
            "the API server does not verify kubelet serving certificates: its connections to kubelets can be intercepted",
            "no --kubelet-certificate-authority on its command line".into(),
            "kube-apiserver --kubelet-certificate-authority=<CA of the kubelets' serving certificates> (and kubelet serverTLSBootstrap)",
        ),
    }
    if flag("kubelet-client-certificate").is_none_or(str::is_empty) {
        push(
            Severity::Low,
            "apiserver-kubelet-client-cert-missing",
            "the API server shows no client certificate to kubelets: they must allow it some other way",
            "no --kubelet-client-certificate on its command line".into(),
            "kube-apiserver --kubelet-client-certificate and --kubelet-client-key",
        );
    }
    if let Some(modes) = flag("authorization-mode") {
        if modes.split(',').any(|m| m.trim() == "AlwaysAllow") {
            push(
                Severity::High,
                "apiserver-always-allow",
                "the API server authorizes every request",
                format!("--authorization-mode={modes}"),
                "kube-apiserver --authorization-mode=Node,RBAC",
            );
        }
    }
    match flag("insecure-port") {
        Some(port) if port != "0" => push(
            Severity::High,
            "apiserver-insecure-port",
            "the API server has an insecure port: no authentication, no authorization",
            format!("--insecure-port={port}"),
            "kube-apiserver --insecure-port=0",
        ),
        given => push(
            Severity::Info,
            "apiserver-insecure-port-off",
            "the API server has no insecure port",
            match given {
                Some(p) => format!("--insecure-port={p}"),
                None => "no --insecure-port (off by default since Kubernetes 1.20)".into(),
            },
            "nothing to do",
        ),
    }
    if flag("anonymous-auth") == Some("false") {
        push(
            Severity::Info,
            "apiserver-anonymous-off",
            "the API server refuses anonymous requests",
            "--anonymous-auth=false".into(),
            "nothing to do",
        );
    }
}

/// `--name=value` and `--name value` flags of a command line (arguments after the program);
/// a flag without a value reads `true`.
pub fn parse_flags(args: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        if let Some(f) = args[i].strip_prefix("--") {
            if let Some((k, v)) = f.split_once('=') {
                out.insert(k.to_string(), v.to_string());
            } else if let Some(v) = args.get(i + 1).filter(|v| !v.starts_with("--")) {
                out.insert(f.to_string(), v.clone());
                i += 1;
            } else {
                out.insert(f.to_string(), "true".into());
            }
        }
        i += 1;
    }
    out
}

/// The highest severity found, if any.
pub fn worst(findings: &[Finding]) -> Option<Severity> {
    findings.iter().map(|f| f.severity).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any4() -> Vec<IpAddr> {
        vec!["0.0.0.0".parse().unwrap()]
    }

    fn listener(
        port: u16,
        bound: Vec<IpAddr>,
        pods: &[bool],
        outside: Option<bool>,
    ) -> ListenerObs {
        ListenerObs {
            port,
            bound,
            from_pods: pods
                .iter()
                .enumerate()
                .map(|(i, ok)| {
                    (
                        format!("default/p{i}"),
                        if *ok { Ok(()) } else { Err("refused".into()) },
                    )
                })
                .collect(),
            from_outside: outside.map(|ok| if ok { Ok(()) } else { Err("timeout".into()) }),
            probed: true,
            service: None,
        }
    }

    fn one_host(l: ListenerObs) -> Observations {
        Observations {
            hosts: vec![HostObs {
                name: "node-1".into(),
                listeners: vec![l],
            }],
            ..Default::default()
        }
    }

    fn checks(f: &[Finding]) -> Vec<(&str, Severity)> {
        f.iter().map(|f| (f.check.as_str(), f.severity)).collect()
    }

    #[test]
    fn etcd_reachable_from_pods_and_outside_is_high_and_goes_when_bound_to_loopback() {
        let open = findings(&one_host(listener(2379, any4(), &[true, true], Some(true))));
        assert_eq!(
            checks(&open),
            vec![
                ("reachable-from-outside", Severity::High),
                ("reachable-from-pods", Severity::High)
            ]
        );
        assert!(
            open[1].evidence.contains("2/2 pods"),
            "{}",
            open[1].evidence
        );
        assert!(open[0].remediation.contains("--listen-client-urls"));
        assert_eq!(open[0].place, "node-1 0.0.0.0:2379");
        let fixed = findings(&one_host(listener(
            2379,
            vec!["127.0.0.1".parse().unwrap()],
            &[],
            None,
        )));
        assert_eq!(checks(&fixed), vec![("listening", Severity::Info)]);
    }

    #[test]
    fn a_port_no_probe_reached_is_only_listening() {
        let f = findings(&one_host(listener(
            10250,
            any4(),
            &[false, false],
            Some(false),
        )));
        assert_eq!(checks(&f), vec![("listening", Severity::Info)]);
        assert!(
            f[0].evidence.contains("not from 2 pods"),
            "{}",
            f[0].evidence
        );
    }

    #[test]
    fn unknown_ports_are_not_reported() {
        assert!(findings(&one_host(listener(9099, any4(), &[true], Some(true)))).is_empty());
    }

    #[test]
    fn on_a_real_node_the_binding_decides() {
        let mut l = listener(10259, any4(), &[], None);
        l.probed = false;
        assert_eq!(
            checks(&findings(&one_host(l.clone()))),
            vec![("listening-on-network", Severity::Medium)]
        );
        l.bound = vec!["::1".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        assert_eq!(
            checks(&findings(&one_host(l))),
            vec![("listening", Severity::Info)]
        );
    }

    fn answered(status: u16, body: &str) -> HttpOutcome {
        HttpOutcome::Answered {
            status,
            body: body.into(),
        }
    }

    #[test]
    fn kubelet_answers_name_its_authentication_and_authorization() {
        for (o, check, sev) in [
            (
                answered(200, "{\"items\":[]}"),
                "kubelet-anonymous-allowed",
                Severity::High,
            ),
            (
                answered(401, "Unauthorized"),
                "kubelet-anonymous-off",
                Severity::Info,
            ),
            (
                answered(403, "Forbidden (user=system:anonymous"),
                "kubelet-anonymous-authn",
                Severity::Low,
            ),
            (
                HttpOutcome::Failed("TLS handshake failed".into()),
                "kubelet-no-https",
                Severity::Info,
            ),
        ] {
            let mut l = listener(10250, vec!["127.0.0.1".parse().unwrap()], &[], None);
            l.service = Some(ServiceObs::Kubelet(o));
            let f = findings(&one_host(l));
            assert!(
                f.iter().any(|f| f.check == check && f.severity == sev),
                "{check}: {f:?}"
            );
        }
    }

    #[test]
    fn etcd_answers_say_whether_a_client_certificate_is_needed() {
        let version = answered(200, "{\"etcdserver\":\"3.4.23\",\"etcdcluster\":\"3.4.0\"}");
        let refused = HttpOutcome::Failed("received fatal alert: BadCertificate".into());
        let bad_request = answered(400, "Client sent an HTTP request to an HTTPS server.");
        let case = |plain: HttpOutcome, tls: HttpOutcome| {
            let mut l = listener(2379, vec!["127.0.0.1".parse().unwrap()], &[], None);
            l.service = Some(ServiceObs::Etcd {
                plain,
                tls_without_cert: tls,
                keys_counted: Some(7),
            });
            findings(&one_host(l))
                .into_iter()
                .find(|f| f.check.starts_with("etcd-"))
                .unwrap()
        };
        let f = case(version.clone(), HttpOutcome::Failed("not TLS".into()));
        assert_eq!(
            (f.check.as_str(), f.severity),
            ("etcd-plaintext", Severity::High)
        );
        assert!(f.evidence.contains("counted 7 keys"), "{}", f.evidence);
        let f = case(bad_request.clone(), version);
        assert_eq!(f.check, "etcd-no-client-cert");
        let f = case(bad_request, refused.clone());
        assert_eq!(
            (f.check.as_str(), f.severity),
            ("etcd-client-cert-required", Severity::Info)
        );
        // Something else on the port (no TLS, no HTTP): no etcd finding.
        let mut l = listener(2379, vec!["127.0.0.1".parse().unwrap()], &[], None);
        let silent = HttpOutcome::Failed("no answer within 1500 ms".into());
        l.service = Some(ServiceObs::Etcd {
            plain: silent.clone(),
            tls_without_cert: silent,
            keys_counted: None,
        });
        assert!(!findings(&one_host(l))
            .iter()
            .any(|f| f.check.starts_with("etcd-")));
        // Reached by pods, but wanting a client certificate: medium, not high.
        let mut l = listener(2379, any4(), &[true], Some(true));
        l.service = Some(ServiceObs::Etcd {
            plain: HttpOutcome::Failed("empty answer".into()),
            tls_without_cert: refused,
            keys_counted: None,
        });
        let f = findings(&one_host(l));
        assert_eq!(
            checks(&f),
            vec![
                ("reachable-from-outside", Severity::Medium),
                ("reachable-from-pods", Severity::Medium),
                ("etcd-client-cert-required", Severity::Info)
            ]
        );
        assert!(f[1]
            .evidence
            .ends_with("etcd requires a client certificate"));
    }

    #[test]
    fn apiserver_flags_and_anonymous_answers() {
        let args: Vec<String> = [
            "--authorization-mode=Node,RBAC",
            "--insecure-port=0",
            "--client-ca-file",
            "/pki/ca.crt",
            "--profiling=false",
            "--v",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let flags = parse_flags(&args);
        assert_eq!(flags["client-ca-file"], "/pki/ca.crt");
        assert_eq!(flags["v"], "true");
        let mut obs = Observations {
            apiserver_processes: vec![ApiServerProcess {
                place: "control-plane".into(),
                pid: 42,
                flags,
            }],
            api_endpoints: vec![ApiEndpointObs {
                place: "control-plane".into(),
                url: "https://198.19.0.1:6443".into(),
                anonymous: answered(403, "forbidden: User \"system:anonymous\""),
            }],
            ..Default::default()
        };
        let f = findings(&obs);
        assert_eq!(
            checks(&f),
            vec![
                ("apiserver-kubelet-ca-missing", Severity::Medium),
                ("apiserver-anonymous-auth", Severity::Low),
                ("apiserver-kubelet-client-cert-missing", Severity::Low),
                ("apiserver-insecure-port-off", Severity::Info),
            ]
        );
        let p = &mut obs.apiserver_processes[0];
        p.flags
            .insert("kubelet-certificate-authority".into(), "/pki/k.crt".into());
        p.flags
            .insert("authorization-mode".into(), "AlwaysAllow".into());
        p.flags.insert("insecure-port".into(), "8080".into());
        let f = findings(&obs);
        assert!(!f.iter().any(|f| f.check == "apiserver-kubelet-ca-missing"));
        assert!(f.iter().any(|f| f.check == "apiserver-always-allow"));
        assert!(f.iter().any(|f| f.check == "apiserver-insecure-port"));
        assert_eq!(worst(&f), Some(Severity::High));
    }

    #[test]
    fn a_world_readable_store_file_is_reported() {
        let obs = Observations {
            datastore_files: vec![
                DatastoreFile {
                    path: "/a".into(),
                    mode: 0o100644,
                },
                DatastoreFile {
                    path: "/b".into(),
                    mode: 0o100600,
                },
            ],
            ..Default::default()
        };
        let f = findings(&obs);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].place, "/a");
        assert_eq!(f[0].evidence, "mode 0644");
    }
}
