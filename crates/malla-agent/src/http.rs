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
//!
//! A new endpoint is one more route in [`router`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::health::Health;
use crate::metrics::Metrics;

/// What the handlers read.
#[derive(Clone)]
struct Shared {
    health: Health,
    metrics: Arc<Metrics>,
}

/// The agent's routes.
fn router(health: Health, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Shared { health, metrics })
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
                    Ok(l) => axum::serve(l, router(health, metrics)).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, %bound, "the agent's HTTP server stopped");
                }
            })
        })
        .context("starting the HTTP server's thread")?;
    tracing::info!(%bound, "serving /healthz, /readyz and /metrics");
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
    fn a_taken_address_is_an_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = spawn(addr, Health::default(), Arc::new(Metrics::new())).unwrap_err();
        assert!(format!("{e:#}").contains(&addr.to_string()), "{e:#}");
    }
}
