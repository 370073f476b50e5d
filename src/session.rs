//! One client connection from accept to its summary line, as typed phases over any stream.
//!
//! A [`Session<S>`] owns its stream and its [`Facts`]. Each phase consumes the session and
//! returns the next one (over the next stream type: `TcpStream` → `Prefixed` → TLS), or a
//! [`Finished`]: how it ended and the reply still owed to the client. [`run`] chains the
//! phases, writes an owed reply in one place, frees the connection slots, and only then
//! builds and emits the report from the facts and the outcome.
//!
//! ```text
//! run: inbound PROXY header -> per-IP slot -> implicit | starttls
//!   implicit: into_tls -> connect (greeting forwarded) -> relay
//!   starttls: dialogue (smtp::pretls) -> Upgrade:     into_tls -> first command -> connect -> relay
//!                                     -> PassThrough: connect -> replay EHLO/HELO -> relay
//! ```
//! Each phase's future is boxed where `run` awaits it (the measured idle-memory decision:
//! an idle relayed session's task keeps only the relay's state, not the handshake's).

mod https;
mod implicit;
mod phases;
pub(crate) mod report;
mod starttls;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::admission::Permits;
use crate::config::Mode;
use crate::smtp::reply;

/// What a session runs over: TCP, TLS over it, a stream with an inbound PROXY header's
/// leftovers in front, or an in-memory duplex in tests.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientStream for T {}
use crate::snapshot::ListenerRuntime;
pub(crate) use phases::{Ended, Finished, Owed, Session};
pub(crate) use report::{Facts, LimitKind, Outcome, SessionReport};

/// Bound on writing one reply of ours to a client that does not read.
const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the client came from and which local address it reached.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub client: SocketAddr,
    pub local: SocketAddr,
}

/// What the accept loop hands to a session task.
pub(crate) struct Accepted {
    pub tcp: TcpStream,
    /// The socket's addresses (before any inbound PROXY header).
    pub peer: Peer,
    pub listener: Arc<ListenerRuntime>,
    pub session_id: String,
    /// The connection slots taken at accept; the per-IP slot joins them at admission.
    pub permits: Permits,
    /// Cancelled by SIGTERM: sessions still in the pre-TLS dialogue get `421 4.3.0`.
    pub shutdown: CancellationToken,
}

/// Runs a session to its end and emits its summary line.
pub(crate) async fn run(a: Accepted) {
    let _ = a.tcp.set_nodelay(true);
    let active = Active::start(a.listener.counters.active());
    let report = serve(
        a.tcp,
        a.listener,
        a.peer,
        a.session_id,
        a.permits,
        &a.shutdown,
    )
    .await;
    drop(active);
    report.emit();
}

/// A session over any stream, from its first byte to its report (not emitted): the phases
/// chained, the owed reply written, the stream closed and every permit given back (slots
/// are free before the line is out: whoever reads the log may rely on it).
pub(crate) async fn serve<S>(
    io: S,
    listener: Arc<ListenerRuntime>,
    peer: Peer,
    session_id: String,
    permits: Permits,
    shutdown: &CancellationToken,
) -> SessionReport
where
    S: ClientStream,
{
    let session = open(io, Facts::new(session_id, listener, peer), permits);
    let finished = match phases(session, shutdown).await {
        Ok(f) | Err(f) => f,
    };
    // Boxed: the closing write's state is not part of every session's task.
    let mut report = Box::pin(finished.close()).await;
    report.facts.permits = None;
    report
}

/// The session before its first phase. Not async: a `Facts` built in `serve` itself would
/// be laid out in its future beside the boxed copy (every idle session's task carries it).
fn open<S: ClientStream>(io: S, mut facts: Facts, permits: Permits) -> Session<S> {
    facts.permits = Some(permits);
    Session::new(io, facts)
}

/// The phases in order; `Err` is a session that ended early.
async fn phases<S>(session: Session<S>, shutdown: &CancellationToken) -> Result<Finished, Finished>
where
    S: ClientStream,
{
    let session = Box::pin(session.read_proxy_header()).await?;
    let session = session.admit()?;
    Ok(match session.listener().config.mode {
        Mode::Implicit => Box::pin(implicit::run(session)).await?,
        Mode::Starttls => Box::pin(starttls::run(session, shutdown)).await?,
        Mode::Https => Box::pin(https::run(session)).await?,
    })
}

/// Whether `ip` may (and must) send an inbound PROXY header.
fn trusted_balancer(cidrs: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    cidrs.iter().any(|net| net.contains(&ip))
}

/// Refuses a connection over a limit at accept, before a session exists: `421 4.7.0` on
/// STARTTLS listeners (written without waiting: a fresh socket's send buffer has room), a
/// bare close on implicit ones; then the summary line.
pub(crate) fn refuse_at_accept(
    tcp: TcpStream,
    listener: Arc<ListenerRuntime>,
    peer: Peer,
    session_id: String,
    which: LimitKind,
) {
    if listener.config.mode == Mode::Starttls {
        let _ = tcp.try_write(&reply::too_many_connections(&listener.config.hostname));
    }
    drop(tcp);
    SessionReport {
        facts: Facts::new(session_id, listener, peer),
        outcome: Outcome::Limit(which),
    }
    .emit();
}

/// Writes one reply of ours, bounded in time; a client that does not read is not our problem.
pub(crate) async fn write_reply<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    reply: &[u8],
) -> std::io::Result<()> {
    match tokio::time::timeout(REPLY_WRITE_TIMEOUT, async {
        w.write_all(reply).await?;
        w.flush().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client does not read",
        )),
    }
}

/// Counts a session as active from its start to its end.
struct Active(prometheus_client::metrics::gauge::Gauge);

impl Active {
    fn start(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A short random session id: 16 hex digits, also sent as PROXY v2 UNIQUE_ID.
pub(crate) fn new_session_id() -> String {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // The system RNG failing is not a reason to refuse mail; a clock-based id is unique enough.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        bytes = nanos.to_be_bytes();
    }
    crate::hex::hex(&bytes)
}
