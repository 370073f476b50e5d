//! Connecting the upstream MTA: TCP connect, PROXY header (one write, always cleartext),
//! optional TLS towards an internal CA, and the 220 greeting — all within the upstream's
//! `connect_timeout`. Every failure maps to `421 4.3.0` for the client, or to the MTA's own
//! 5xx greeting (`From<UpstreamError> for session::phases::Ended`).

use std::fmt;

use crate::metrics::UpstreamFailure;
use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use crate::smtp::reply::{self, ReplyError};
use crate::snapshot::UpstreamRuntime;

/// The stream towards the MTA: plain TCP or TLS over it.
/// The TLS side is boxed: it is large (a rustls connection), the plain side is not.
pub(crate) type UpstreamStream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// A connected upstream that has greeted.
pub(crate) struct Upstream {
    pub stream: UpstreamStream,
    /// The greeting reply as received, plus anything that followed it in the same read.
    pub greeting: Vec<u8>,
    pub greeting_code: u16,
    /// Where the greeting reply ends in `greeting`.
    pub greeting_len: usize,
    pub addr: SocketAddr,
}

/// Why the upstream could not be used. Our faults (and the MTA's) are a 4xx for the client;
/// only `Refused` (a 5xx greeting: the MTA's own policy, e.g. a blocklisted client) is
/// passed on as the MTA's permanent reply (catalogue HO-3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    Resolve(String),
    Connect(String),
    Timeout(&'static str),
    Tls(String),
    Greeting(String),
    /// The MTA greeted with 5xx; its reply, complete with CRLFs.
    Refused(Vec<u8>),
}

impl UpstreamError {
    /// Every `class()`, so the failure series can exist at 0 from the start.
    /// The metric's `reason` label.
    pub(crate) fn class(&self) -> UpstreamFailure {
        match self {
            Self::Resolve(_) => UpstreamFailure::Resolve,
            Self::Connect(_) => UpstreamFailure::Connect,
            Self::Timeout(_) => UpstreamFailure::Timeout,
            Self::Tls(_) => UpstreamFailure::Tls,
            Self::Greeting(_) => UpstreamFailure::Greeting,
            Self::Refused(_) => UpstreamFailure::Refused,
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Resolve(e) => write!(f, "resolve: {e}"),
            Self::Connect(e) => write!(f, "connect: {e}"),
            Self::Timeout(phase) => write!(f, "timeout during {phase}"),
            Self::Tls(e) => write!(f, "tls: {e}"),
            Self::Greeting(e) => write!(f, "greeting: {e}"),
            Self::Refused(g) => {
                write!(f, "refused: {}", String::from_utf8_lossy(g).trim_end())
            }
        }
    }
}

/// Connects, writes `header` (may be empty) in one write, does TLS if configured and reads
/// the greeting. Consumes nothing from the client. Counted in the upstream metrics.
pub(crate) async fn connect(
    up: &UpstreamRuntime,
    header: &[u8],
) -> Result<Upstream, UpstreamError> {
    let started = std::time::Instant::now();
    let result = connect_uncounted(up, header).await;
    let m = crate::metrics::metrics();
    match &result {
        Ok(_) => m.upstream_connected(&up.config.name, started.elapsed().as_secs_f64()),
        Err(e) => m.upstream_failure(&up.config.name, e.class()),
    }
    result
}

/// `connect` without metrics: the health probe's own attempts are not client traffic.
pub(crate) async fn connect_uncounted(
    up: &UpstreamRuntime,
    header: &[u8],
) -> Result<Upstream, UpstreamError> {
    let deadline = Instant::now() + up.config.connect_timeout;
    let addrs: Vec<SocketAddr> = timeout_at(deadline, tokio::net::lookup_host(&up.config.address))
        .await
        .map_err(|_| UpstreamError::Timeout("resolve"))?
        .map_err(|e| UpstreamError::Resolve(e.to_string()))?
        .collect();
    let mut last = UpstreamError::Resolve(format!("{} has no address", up.config.address));
    let mut tcp = None;
    for addr in addrs {
        match timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some((s, addr));
                break;
            }
            Ok(Err(e)) => last = UpstreamError::Connect(format!("{addr}: {e}")),
            Err(_) => return Err(UpstreamError::Timeout("connect")),
        }
    }
    let (mut tcp, addr) = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    if !header.is_empty() {
        timeout_at(deadline, tcp.write_all(header))
            .await
            .map_err(|_| UpstreamError::Timeout("proxy header"))?
            .map_err(|e| {
                UpstreamError::Connect(format!("{addr}: writing the PROXY header: {e}"))
            })?;
    }
    let mut stream: UpstreamStream = match &up.tls {
        None => Either::Left(tcp),
        Some(tls) => {
            let connector = TlsConnector::from(tls.config.clone());
            let s = timeout_at(deadline, connector.connect(tls.server_name.clone(), tcp))
                .await
                .map_err(|_| UpstreamError::Timeout("tls handshake"))?
                .map_err(|e| UpstreamError::Tls(tls_reason(&e)))?;
            Either::Right(Box::new(s))
        }
    };
    let mut greeting = Vec::with_capacity(256);
    let span = timeout_at(deadline, reply::read_reply(&mut stream, &mut greeting))
        .await
        .map_err(|_| UpstreamError::Timeout("greeting"))?
        .map_err(|e| match e {
            ReplyError::Closed => UpstreamError::Greeting("closed before greeting".into()),
            other => UpstreamError::Greeting(other.to_string()),
        })?;
    Ok(Upstream {
        stream,
        greeting,
        greeting_code: span.code,
        greeting_len: span.len,
        addr,
    })
}

/// The exact reason an upstream TLS handshake failed, in an operator's words.
fn tls_reason(e: &std::io::Error) -> String {
    use rustls::CertificateError as C;
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(c)) => {
            let what = match c {
                C::UnknownIssuer => "unknown issuer (not signed by a CA in tls.ca)".to_owned(),
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    "name mismatch (not valid for tls.server_name)".to_owned()
                }
                C::Expired | C::ExpiredContext { .. } => "expired".to_owned(),
                C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet".to_owned(),
                C::Revoked => "revoked".to_owned(),
                other => format!("{other:?}"),
            };
            format!("upstream certificate rejected: {what}; {c}")
        }
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}
