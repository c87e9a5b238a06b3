//! The agent's HTTP server (default `127.0.0.1:9099`, `malla agent --http-listen`): the home of
//! the agent's endpoints, on its own thread with its own single-threaded tokio runtime, so it
//! answers whatever the main loop is doing (blocked on a datastore watch, retrying a datastore
//! that is away, applying a large change).
//!
//! - `GET /healthz`: 200 while the main loop goes round ([`crate::health::Heartbeat`]), 503
//!   once it has not for [`crate::health::STALLED_AFTER`].
//! - `GET /readyz`: 503 until the first full sync is applied to the kernel, then 200
//!   ([`crate::health::Readiness`]).
//! - `GET /metrics`: Prometheus metrics ([`crate::metrics`]): OpenMetrics text when the
//!   request's `Accept` names it (as Prometheus' scrapes do), the classic text format otherwise.
//! - `GET /flows?from=&to=&namespace=&verdict=&policy=&port=&since=`: the flow history
//!   ([`crate::flows`]) as JSON lines, one [`malla_flows::Flow`] per line, oldest window first;
//!   `GET /flows/follow?…`: flows as they are observed, one line each, until the client goes
//!   (a line `{"lagged":N}` says N were skipped for a slow reader; a [`malla_flows::Lost`]
//!   line, each second something was, how many samples were lost and why);
//!   `GET /flows/lost?since=`: samples lost in each window, by reason. JSON lines rather than
//!   gRPC: `curl` reads it, a query and a stream have one format, and nothing needs a protobuf
//!   toolchain. 503 when flow logs are off, 400 naming the parameter for a bad filter.
//!
//! - `GET /dns?pod=NAMESPACE/NAME`: what the DNS proxy learned ([`crate::dns::Learned`]), one
//!   [`malla_calc::policy::dns::LearnedRecord`] a line (bounded: [`crate::dns::MAX_LEARNED`]);
//!   503 while the proxy is off, 400 naming a bad parameter.
//!
//! A new endpoint is one more route in [`router`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use malla_flows::Filter;
use tokio::sync::broadcast::error::RecvError;

use crate::flows::FlowService;
use crate::health::Health;
use crate::metrics::Metrics;

/// What the handlers read.
#[derive(Clone)]
struct Shared {
    health: Health,
    metrics: Arc<Metrics>,
    flows: Option<Arc<FlowService>>,
}

/// The agent's routes.
fn router(health: Health, metrics: Arc<Metrics>, flows: Option<Arc<FlowService>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/flows", get(flows_query))
        .route("/flows/follow", get(flows_follow))
        .route("/flows/lost", get(flows_lost))
        .route("/dns", get(dns_learned))
        .with_state(Shared {
            health,
            metrics,
            flows,
        })
}

/// The filter of a request's query, or the 400 naming what is wrong.
fn filter_of(query: Option<String>) -> Result<Filter, (StatusCode, String)> {
    Filter::from_query(query.as_deref().unwrap_or_default())
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))
}

const FLOWS_OFF: &str = "flow logs are off on this agent (malla agent --no-flow-logs, or the collector could not start: see its log)\n";
const JSON_LINES: &str = "application/x-ndjson";

fn json_line(v: &impl serde::Serialize) -> String {
    let mut s = serde_json::to_string(v).unwrap_or_default();
    s.push('\n');
    s
}

/// The flow service and the request's filter, or the answer saying why not (503, 400).
fn flows_and_filter(
    s: &Shared,
    q: Option<String>,
) -> Result<(Arc<FlowService>, Filter), (StatusCode, String)> {
    let Some(fs) = &s.flows else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, FLOWS_OFF.to_string()));
    };
    Ok((fs.clone(), filter_of(q)?))
}

async fn flows_query(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let (fs, f) = match flows_and_filter(&s, q) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let body: String = fs.query(&f).iter().map(json_line).collect();
    ([(header::CONTENT_TYPE, JSON_LINES)], body).into_response()
}

/// `GET /dns?pod=`: the DNS proxy's learned records as JSON lines.
async fn dns_learned(RawQuery(q): RawQuery) -> Response {
    let Some(learned) = crate::dns::learned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the DNS proxy is off on this agent (see its log)\n",
        )
            .into_response();
    };
    let mut pod = None;
    for part in q
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match part.split_once('=') {
            Some(("pod", v))
                if v.len() <= 320 && v.split_once("%2F").or(v.split_once('/')).is_some() =>
            {
                pod = Some(v.replace("%2F", "/").replace("%2f", "/"))
            }
            _ => {
                let shown: String = part.chars().take(80).collect();
                return (
                    StatusCode::BAD_REQUEST,
                    format!("query parameter {shown:?}: expected pod=NAMESPACE/NAME\n"),
                )
                    .into_response();
            }
        }
    }
    let body: String = learned
        .records(pod.as_deref(), std::time::Instant::now())
        .iter()
        .map(json_line)
        .collect();
    ([(header::CONTENT_TYPE, JSON_LINES)], body).into_response()
}

/// `GET /flows/lost?since=`: what was lost in each window (JSON lines of
/// `malla_flows::Lost`); a lost sample has no connection, so only `since` applies.
async fn flows_lost(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let (fs, f) = match flows_and_filter(&s, q) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let body: String = fs.lost(f.since).iter().map(json_line).collect();
    ([(header::CONTENT_TYPE, JSON_LINES)], body).into_response()
}

async fn flows_follow(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let (fs, f) = match flows_and_filter(&s, q) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let rx = fs.subscribe();
    // Every second, what was lost since (samples the filter cannot be applied to): a
    // `malla_flows::Lost` line.
    let seen = fs.lost_so_far();
    let tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let state = (rx, f, fs, seen, tick);
    let stream = futures::stream::unfold(state, |mut st| async move {
        let (rx, f, fs, seen, tick) = &mut st;
        loop {
            let got = tokio::select! {
                r = rx.recv() => r,
                _ = tick.tick() => match fs.lost_news(seen) {
                    Some(l) => return Some((Ok(json_line(&l)), st)),
                    None => continue,
                },
            };
            match got {
                Ok(flow) if f.matches(&flow) => {
                    return Some((Ok::<_, std::convert::Infallible>(json_line(&*flow)), st))
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => {
                    let line = json_line(&serde_json::json!({ "lagged": n }));
                    return Some((Ok(line), st));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, JSON_LINES)],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    let since = s.health.heartbeat.since_last();
    if s.health.heartbeat.alive() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the main loop has not run for {} s\n", since.as_secs()),
        )
    }
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    if s.health.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first sync with the datastore is not applied yet\n",
        )
    }
}

async fn metrics_text(State(s): State<Shared>, headers: HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                crate::metrics::OPENMETRICS_CONTENT_TYPE,
            )],
            s.metrics.encode(),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                crate::metrics::PROMETHEUS_CONTENT_TYPE,
            )],
            s.metrics.encode_prometheus(),
        )
    }
}

/// Binds `addr` now (so a taken or unavailable address fails the agent's start, naming it) and
/// serves on a thread of its own until the process ends. Returns the bound address.
pub fn spawn(
    addr: SocketAddr,
    health: Health,
    metrics: Arc<Metrics>,
) -> anyhow::Result<SocketAddr> {
    spawn_with(addr, health, metrics, None)
}

/// [`spawn`], serving `/flows` from `flows` (None: 503, flow logs are off).
pub fn spawn_with(
    addr: SocketAddr,
    health: Health,
    metrics: Arc<Metrics>,
    flows: Option<Arc<FlowService>>,
) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the agent's HTTP address {addr}"))?;
    listener
        .set_nonblocking(true)
        .context("making the HTTP listener non-blocking")?;
    let bound = listener
        .local_addr()
        .context("the HTTP listener's address")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the HTTP server's tokio runtime")?;
    std::thread::Builder::new()
        .name("malla-http".into())
        .spawn(move || {
            rt.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => axum::serve(l, router(health, metrics, flows)).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, %bound, "the agent's HTTP server stopped");
                }
            })
        })
        .context("starting the HTTP server's thread")?;
    tracing::info!(%bound, "serving /healthz, /readyz, /metrics and /flows");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// One plain HTTP/1.0 GET: (status, body).
    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        get_accepting(addr, path, "*/*")
    }

    fn get_accepting(addr: SocketAddr, path: &str, accept: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
        )
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, body.to_string())
    }

    #[test]
    fn endpoints_follow_the_shared_state() {
        let health = Health::default();
        let metrics = Arc::new(Metrics::new());
        let addr = spawn(
            "127.0.0.1:0".parse().unwrap(),
            health.clone(),
            metrics.clone(),
        )
        .expect("spawn");
        assert_eq!(get(addr, "/healthz").0, 200);
        let (code, body) = get(addr, "/readyz");
        assert_eq!(code, 503, "{body}");
        health.readiness.set_ready();
        assert_eq!(get(addr, "/readyz").0, 200);
        metrics.apply_failed();
        let (code, body) = get(addr, "/metrics");
        assert_eq!(code, 200);
        assert!(body.contains("malla_apply_errors_total 1"), "{body}");
        assert!(
            body.contains("# TYPE malla_apply_errors_total counter"),
            "{body}"
        );
        let (code, body) = get_accepting(
            addr,
            "/metrics",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        );
        assert_eq!(code, 200);
        assert!(body.contains("# TYPE malla_apply_errors counter"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(get(addr, "/nothing").0, 404);
    }

    #[test]
    fn flows_are_queried_and_followed_as_json_lines() {
        use malla_calc::policy::flowlog::{Dir, LogPoint};
        use malla_flows::{KernelEvent, LogSample, Tuple};
        let metrics = Arc::new(Metrics::new());
        let fs = FlowService::detached("n1", metrics.flows.clone());
        let addr = spawn_with(
            "127.0.0.1:0".parse().unwrap(),
            Health::default(),
            metrics.clone(),
            Some(fs.clone()),
        )
        .expect("spawn");
        let deny = |sport| {
            KernelEvent::Log(LogSample {
                point: LogPoint::Deny { dir: Dir::In },
                orig: Tuple {
                    proto: 6,
                    src: "198.18.0.2".parse().unwrap(),
                    dst: "198.18.0.3".parse().unwrap(),
                    sport,
                    dport: 5432,
                },
                reply: None,
            })
        };
        fs.ingest(vec![
            deny(1),
            KernelEvent::Lost(malla_flows::LostReason::RateLimit, 3),
        ]);
        let (code, body) = get(addr, "/flows?verdict=denied&port=5432");
        assert_eq!(code, 200, "{body}");
        let flows: Vec<malla_flows::Flow> = body
            .lines()
            .map(|l| serde_json::from_str(l).expect(l))
            .collect();
        assert_eq!(flows.len(), 1, "{body}");
        assert_eq!(flows[0].key.verdict, malla_flows::Verdict::Denied);
        assert_eq!(get(addr, "/flows?verdict=allowed").1, "");
        let (code, body) = get(addr, "/flows?port=http");
        assert_eq!(code, 400);
        assert!(body.contains("port"), "{body}");
        let (_, m) = get(addr, "/metrics");
        assert!(
            m.contains("malla_flow_samples_lost_total{reason=\"rate-limit\"} 3"),
            "{m}"
        );
        let (code, body) = get(addr, "/flows/lost");
        assert_eq!(code, 200, "{body}");
        let lost: malla_flows::Lost = serde_json::from_str(body.trim()).expect(&body);
        assert_eq!((lost.samples, lost.node.as_str()), (3, "n1"));
        assert!(
            m.contains("malla_flow_drops_total{reason=\"policy\"} 1"),
            "{m}"
        );

        // Following: a flow observed after the request is streamed.
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET /flows/follow?to=198.18.0.3 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        fs.ingest(vec![deny(2)]);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\"verdict\":\"denied\"") {
            let n = s.read(&mut buf).expect("a followed flow within 5 s");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn a_taken_address_is_an_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = spawn(addr, Health::default(), Arc::new(Metrics::new())).unwrap_err();
        assert!(format!("{e:#}").contains(&addr.to_string()), "{e:#}");
    }
}
