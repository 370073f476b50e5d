//! The HTTP side (plain hyper, two dozen lines of routing do not justify a framework):
//! `GET /metrics` (OpenMetrics text), `/healthz` (the process answers), `/readyz`
//! (listeners bound, not shutting down, and at least one upstream passed its last probe).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::snapshot::Snapshot;

/// What the HTTP endpoints look at.
#[derive(Debug)]
pub(crate) struct Status {
    pub current: Arc<ArcSwap<Snapshot>>,
    pub health: Arc<Health>,
    /// True while the listeners are bound and accepting (false from SIGTERM on).
    pub serving: AtomicBool,
}

impl Status {
    /// `None` when ready, else why not.
    pub(crate) fn not_ready(&self) -> Option<&'static str> {
        if !self.serving.load(Ordering::Acquire) {
            return Some("not serving (starting or shutting down)");
        }
        if !self.health.any_up(&self.current.load()) {
            return Some("no healthy upstream");
        }
        None
    }
}

/// Bound on reading a request head: a slow client cannot hold a connection forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(listener: TcpListener, status: Arc<Status>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let status = status.clone();
                async move { Ok::<_, Infallible>(route(&status, &req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn route(status: &Status, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, crate::metrics::metrics().encode());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match status.not_ready() {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r
}
