//! `malla ui`: the flow page (issue 16). One page served from this host, asking every node's
//! agent for its flows: a live graph of namespaces, workloads and Services with allowed and
//! denied edges, a flow table with `malla flows`' filters, and a flow's `malla policy trace`
//! (the command and its result) on click.
//!
//! Why the CLI and not the agent: an agent sees only its own node's flows, while the page
//! shows the cluster's, and the trace needs the datastore's view, which the CLI already reads.
//! So `malla ui` does what `malla flows` does (asks each agent's `/flows`, in a lab inside the
//! node's namespace) and listens on this host's loopback, where a browser (or the headless
//! Chromium of the test) reaches it without any change to the lab's networks.
//!
//! Routes: `/` the page; `/app.js`, `/style.css` its assets (in the binary: `include_str!`,
//! written by hand, no CDN: it works offline); `GET /api/flows?from=&to=&namespace=&verdict=
//! &policy=&port=&since=` (the agents' filter, `since` in unix seconds) → `{"now", "flows",
//! "errors"}` with each flow's trace command; `GET /api/trace?from=&to=&port=&protocol=` →
//! `{"command", "ok", "output"}`, running this binary's `policy trace`. The page polls
//! `/api/flows` every 2 s: the agents' windows change as connections come and go, and a
//! poll shows them as they are (counts, ends) where a stream of single events would not.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Args;
use malla_flows::{Filter, Flow};
use serde::Serialize;

use crate::flows_cmd;
use crate::Globals;

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

#[derive(Args)]
pub struct UiArgs {
    /// Where to serve the page (this host's namespace; there is no authentication: keep it on
    /// a loopback address).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9098")]
    listen: SocketAddr,
    /// The agents' HTTP address (their --http-listen), in each node's namespace in a lab.
    #[arg(long, value_name = "ADDR", default_value = malla_agent::DEFAULT_HTTP_LISTEN)]
    agent_address: SocketAddr,
}

#[derive(Clone)]
struct Shared {
    globals: Globals,
    agent_address: SocketAddr,
}

/// A flow on the page: the agent's record and the trace that explains it (any verdict).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PageFlow {
    #[serde(flatten)]
    flow: Flow,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace: Option<String>,
}

#[derive(Serialize)]
struct FlowsAnswer {
    /// The server's clock (unix seconds), for the page's `since`.
    now: u64,
    flows: Vec<PageFlow>,
    /// One line per node that could not be asked.
    errors: Vec<String>,
}

#[derive(Serialize)]
struct TraceAnswer {
    command: String,
    /// The trace ran (whatever its verdict).
    ok: bool,
    output: String,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn json(v: &impl Serialize) -> Response {
    match serde_json::to_string(v) {
        Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

fn bad(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, msg + "\n").into_response()
}

fn router(shared: Shared) -> Router {
    let asset = |ty: &'static str, body: &'static str| {
        move || async move { ([(header::CONTENT_TYPE, ty)], body) }
    };
    Router::new()
        .route("/", get(asset("text/html; charset=utf-8", INDEX)))
        .route(
            "/app.js",
            get(asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route("/style.css", get(asset("text/css; charset=utf-8", STYLE)))
        .route("/api/flows", get(api_flows))
        .route("/api/trace", get(api_trace))
        .with_state(shared)
}

async fn api_flows(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let f = match Filter::from_query(q.as_deref().unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => return bad(e.to_string()),
    };
    let asked = tokio::task::spawn_blocking(move || {
        let nodes = flows_cmd::agents(&s.globals)?;
        Ok::<_, anyhow::Error>(flows_cmd::collect(&nodes, s.agent_address, &f))
    })
    .await;
    let (mut flows, errors) = match asked {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => (Vec::new(), vec![crate::globals::in_words(&e)]),
        Err(e) => (Vec::new(), vec![e.to_string()]),
    };
    flows.sort_by(|x, y| (x.start, &x.node).cmp(&(y.start, &y.node)));
    let flows = flows
        .into_iter()
        .map(|flow| PageFlow {
            trace: flows_cmd::trace_args(&flow).map(|a| format!("malla {}", a.join(" "))),
            flow,
        })
        .collect();
    json(&FlowsAnswer {
        now: now(),
        flows,
        errors,
    })
}

/// The `policy trace` arguments a `/api/trace` query asks for, checked: both ends named
/// (and not as flags), a port, TCP, UDP or SCTP.
fn trace_query(q: &str) -> Result<Vec<String>, String> {
    let (mut from, mut to, mut port, mut proto) = (None, None, None, "TCP".to_string());
    for p in q.split('&').filter(|p| !p.is_empty()) {
        let (n, v) = p.split_once('=').unwrap_or((p, ""));
        let (n, v) = (
            malla_flows::percent_decode(n),
            malla_flows::percent_decode(v),
        );
        let end = |v: String| {
            if v.is_empty() || v.starts_with('-') {
                Err(format!(
                    "query parameter {n}: {v:?} is not a pod, node or address"
                ))
            } else {
                Ok(Some(v))
            }
        };
        match n.as_str() {
            "from" => from = end(v)?,
            "to" => to = end(v)?,
            "port" => {
                port = Some(
                    v.parse::<u16>()
                        .map_err(|e| format!("query parameter port: {v:?}: {e}"))?,
                )
            }
            "protocol" => {
                proto = v.to_ascii_uppercase();
                if !["TCP", "UDP", "SCTP"].contains(&proto.as_str()) {
                    return Err(format!(
                        "query parameter protocol: {v:?} is not TCP, UDP or SCTP"
                    ));
                }
            }
            _ => return Err(format!("query parameter {n}: unknown parameter")),
        }
    }
    let need = |x: Option<String>, n: &str| x.ok_or(format!("query parameter {n} is missing"));
    let (from, to) = (need(from, "from")?, need(to, "to")?);
    let port = port.ok_or("query parameter port is missing")?;
    Ok(vec![
        "policy".into(),
        "trace".into(),
        from,
        to,
        "--port".into(),
        port.to_string(),
        "--protocol".into(),
        proto,
    ])
}

async fn api_trace(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let args = match trace_query(q.as_deref().unwrap_or_default()) {
        Ok(a) => a,
        Err(e) => return bad(e),
    };
    let command = format!("malla {}", args.join(" "));
    let ran = tokio::task::spawn_blocking(move || -> anyhow::Result<std::process::Output> {
        let exe = std::env::current_exe().context("this program's path")?;
        let mut c = std::process::Command::new(exe);
        c.arg("--lab").arg(&s.globals.lab);
        if let Some(d) = &s.globals.datastore {
            c.arg("--datastore").arg(d);
        }
        c.args(&args).output().context("running malla policy trace")
    })
    .await;
    let answer = match ran {
        Ok(Ok(out)) => TraceAnswer {
            command,
            ok: out.status.success(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        },
        Ok(Err(e)) => TraceAnswer {
            command,
            ok: false,
            output: crate::globals::in_words(&e),
        },
        Err(e) => TraceAnswer {
            command,
            ok: false,
            output: e.to_string(),
        },
    };
    json(&answer)
}

pub fn run(g: &Globals, a: UiArgs) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(a.listen)
        .with_context(|| format!("binding the page's address {}", a.listen))?;
    listener
        .set_nonblocking(true)
        .context("making the listener non-blocking")?;
    let bound = listener.local_addr().context("the listener's address")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the page server's tokio runtime")?;
    // The first line says where (the test reads it: `--listen 127.0.0.1:0` picks a port).
    println!("serving the flow page on http://{bound}/ (interrupt to stop)");
    use std::io::Write;
    std::io::stdout().flush().context("writing to stdout")?;
    let shared = Shared {
        globals: g.clone(),
        agent_address: a.agent_address,
    };
    rt.block_on(async move {
        let l = tokio::net::TcpListener::from_std(listener).context("the page's listener")?;
        axum::serve(l, router(shared))
            .await
            .context("serving the page")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_queries_are_checked_naming_the_parameter() {
        assert_eq!(
            trace_query("from=default%2Fclient&to=default/db&port=8080&protocol=tcp").unwrap(),
            [
                "policy",
                "trace",
                "default/client",
                "default/db",
                "--port",
                "8080",
                "--protocol",
                "TCP"
            ]
        );
        let e = |q| trace_query(q).unwrap_err();
        assert!(e("from=a/b&to=c/d&port=http").contains("port"));
        assert!(e("from=--all&to=c/d&port=80").contains("from"));
        assert!(e("from=a/b&to=c/d&port=80&protocol=icmp").contains("protocol"));
        assert!(e("from=a/b&port=80").contains("to is missing"));
        assert!(e("from=a/b&to=c/d&port=80&x=1").contains("x: unknown"));
    }

    #[test]
    fn the_page_names_its_assets_and_the_api() {
        assert!(INDEX.contains("app.js") && INDEX.contains("style.css"));
        assert!(APP_JS.contains("/api/flows") && APP_JS.contains("/api/trace"));
        // Offline: nothing is fetched from elsewhere (SVG's namespace is a name, not a fetch).
        for a in [INDEX, APP_JS, STYLE] {
            let a = a.replace("http://www.w3.org/2000/svg", "");
            assert!(!a.contains("http://") && !a.contains("https://") && !a.contains("//cdn"));
        }
    }
}
