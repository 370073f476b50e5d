//! An `https` listener's session (port 443, the MTA-STS policy host): the TLS handshake
//! (ACME tls-alpn-01 validations are answered there, as on implicit listeners), then one
//! HTTP/1.1 request answered from the snapshot's policies (`mta_sts`). hyper reads the
//! request with its limits set: the head within `command_timeout` and 8 KiB (hyper's
//! smallest buffer), at most 32 headers, no keep-alive, no body read; the whole session
//! within `idle_timeout`. A hostile client costs one bounded buffer and one timer.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::report::{Phase, Transport};
use super::{ClientStream, Finished, Outcome, Session};
use crate::mta_sts::{Answer, Policies};

/// hyper's smallest read buffer: the request head must fit.
const MAX_REQUEST_HEAD: usize = 8192;
const MAX_HEADERS: usize = 32;
/// How long HTTP caches may keep a policy: clients re-fetch when the DNS id changes.
const CACHE_CONTROL: &str = "max-age=300";

pub(super) async fn run<S>(session: Session<S>) -> Result<Finished, Finished>
where
    S: ClientStream,
{
    let session = Box::pin(session.into_tls(Transport::Https)).await?;
    let Session { io, facts } = session;
    let l = facts.listener.clone();
    let policies = l.mta_sts.clone();
    let sni = facts.tls.as_ref().and_then(|t| t.sni.clone());
    // What the request got, for the session line (one request: no keep-alive).
    let last: Arc<OnceLock<Answer>> = Arc::default();
    let seen = last.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let answer = answer(&policies, &req, sni.as_deref());
        crate::metrics::metrics().mta_sts_request(answer.domain().unwrap_or(""), answer.result());
        let _ = seen.set(answer.clone());
        let head = req.method() == hyper::Method::HEAD;
        async move { Ok::<_, Infallible>(response(&answer, head)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(l.config.limits.command_timeout)
        .max_buf_size(MAX_REQUEST_HEAD)
        .max_headers(MAX_HEADERS)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service);
    let served = tokio::time::timeout(l.config.limits.idle_timeout, conn).await;
    let outcome = match (served, last.get()) {
        (Err(_), None) => Outcome::Timeout(Phase::Idle),
        (_, Some(answer)) => Outcome::MtaSts(match answer.domain() {
            Some(domain) => format!("{domain} {}", answer.status()),
            None => answer.status().to_string(),
        }),
        (Ok(Err(e)), None) => Outcome::ProtocolError(format!("http: {e}")),
        (Ok(Ok(())), None) => Outcome::ClientClosed,
    };
    Ok(Finished::served(facts, outcome))
}

/// The host asked for: the Host header (HTTP/1.1 requires it), else the request target's
/// authority, else the SNI.
fn answer(policies: &Policies, req: &Request<Incoming>, sni: Option<&str>) -> Answer {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .or(sni);
    policies.answer(req.method().as_str(), host, req.uri().path())
}

fn response(answer: &Answer, head: bool) -> Response<Full<Bytes>> {
    let (status, body, policy) = match answer {
        Answer::Policy(p) => (StatusCode::OK, p.body.clone(), Some(p)),
        Answer::NotFound(_) => (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"not found\n"),
            None,
        ),
        Answer::MethodNotAllowed(_) => (
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"GET or HEAD only\n"),
            None,
        ),
        Answer::Misdirected => (
            StatusCode::MISDIRECTED_REQUEST,
            Bytes::from_static(b"no MTA-STS policy for this host\n"),
            None,
        ),
    };
    let len = body.len();
    let mut r = Response::new(Full::new(if head { Bytes::new() } else { body }));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if head {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Some(p) = policy {
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(CACHE_CONTROL),
        );
        h.insert(header::ETAG, p.etag.clone());
    }
    if matches!(answer, Answer::MethodNotAllowed(_)) {
        h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    r
}
