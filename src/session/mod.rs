//! One client connection from accept to its summary line: the listener's mode decides the
//! path (`implicit` or `starttls`); both end in `upstream::connect` and `relay`.

pub mod implicit;
pub mod report;
pub mod starttls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{Mode, ProxyVersion};
use crate::io::ClientIo;
use crate::limits::{PerIp, Permits, Slot};
use crate::proxy_header::inbound;
use crate::proxy_header::outbound::{self, ClientCertHeader, TlsHeaderFacts};
use crate::smtp::reply;
use crate::snapshot::ListenerRuntime;
use crate::tls::client_auth::ClientVerify;
pub use report::{Outcome, SessionReport, Transport};

/// Bound on writing one reply of ours to a client that does not read.
const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the client came from and which local address it reached.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub client: SocketAddr,
    pub local: SocketAddr,
}

/// What the accept loop hands to a session task.
pub struct Accepted {
    pub tcp: TcpStream,
    /// The socket's addresses (before any inbound PROXY header).
    pub peer: Peer,
    pub listener: Arc<ListenerRuntime>,
    pub session_id: String,
    /// Global and listener slots, taken at accept; the per-IP slot is taken here.
    pub global: Slot,
    pub listener_slot: Slot,
    pub per_ip: Arc<PerIp>,
    /// Cancelled by SIGTERM: sessions still in the pre-TLS dialogue get `421 4.3.0`.
    pub shutdown: CancellationToken,
}

/// Runs a session to its end and emits its summary line.
pub async fn run(a: Accepted) {
    let Accepted {
        tcp,
        mut peer,
        listener,
        session_id,
        global,
        listener_slot,
        per_ip,
        shutdown,
    } = a;
    let _ = tcp.set_nodelay(true);
    let cfg = &listener.config;
    let active = Active::start(&cfg.name);
    let mut report = SessionReport::new(
        session_id,
        &cfg.name,
        peer.client,
        &listener.upstream.config.name,
    );
    let mut tcp = tcp;
    let mut rest = Vec::new();
    if trusted_balancer(&cfg.accept_proxy_protocol, peer.client.ip()) {
        match Box::pin(inbound::read(&mut tcp, cfg.limits.handshake_timeout)).await {
            Ok((carried, after)) => {
                if let Some((client, local)) = carried {
                    report.via = Some(peer.client);
                    report.client = client;
                    peer = Peer { client, local };
                    tracing::Span::current().record("client", tracing::field::display(client));
                }
                rest = after;
            }
            Err(e) => {
                drop((global, listener_slot, tcp, active));
                report.outcome = Outcome::ProtocolError(e.to_string());
                report.emit();
                return;
            }
        }
    }
    let Some(ip_slot) = per_ip.try_acquire(peer.client.ip(), cfg.limits.per_ip) else {
        refuse(&tcp, &listener, &mut report, "per_ip");
        drop((global, listener_slot, tcp, active));
        report.emit();
        return;
    };
    let permits = Permits {
        global,
        listener: listener_slot,
        ip: Some(ip_slot),
    };
    let client = ClientIo::new(tcp, rest);
    // Each path boxed: the task is sized by its own path, not by the larger of the two.
    match cfg.mode {
        Mode::Implicit => Box::pin(implicit::run(client, peer, &listener, &mut report)).await,
        Mode::Starttls => {
            Box::pin(starttls::run(
                client,
                peer,
                &listener,
                &mut report,
                &shutdown,
            ))
            .await
        }
    }
    // Slots are free (and sockets closed) before the line is out: whoever reads the log
    // may rely on it.
    drop((permits, active));
    report.emit();
}

/// Whether `ip` may (and must) send an inbound PROXY header.
fn trusted_balancer(cidrs: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    cidrs.iter().any(|net| net.contains(&ip))
}

/// Refuses a connection over a limit: `421 4.7.0` on STARTTLS listeners (written without
/// waiting: a fresh socket's send buffer has room), a bare close on implicit ones.
pub fn refuse(
    tcp: &TcpStream,
    l: &ListenerRuntime,
    report: &mut SessionReport,
    which: &'static str,
) {
    if l.config.mode == Mode::Starttls {
        let _ = tcp.try_write(&reply::too_many_connections(&l.config.hostname));
    }
    report.outcome = Outcome::Limit(which);
}

/// The server handshake under `handshake_timeout`; on failure the outcome is set and
/// `None` returned, on success the TLS facts and transport are in the report.
pub async fn handshake(
    tcp: ClientIo,
    l: &ListenerRuntime,
    report: &mut SessionReport,
    transport: Transport,
) -> Option<tokio_rustls::server::TlsStream<ClientIo>> {
    let result = crate::tls::accept(tcp, &l.tls, l.config.limits.handshake_timeout).await;
    record_handshake(l, &result);
    match result {
        Ok((stream, facts)) => {
            report.transport = transport;
            report.tls = Some(facts);
            Some(stream)
        }
        Err(crate::tls::HandshakeFailure::Timeout) => {
            report.outcome = Outcome::Timeout("handshake");
            None
        }
        Err(f @ crate::tls::HandshakeFailure::AcmeChallenge(_)) => {
            report.outcome = Outcome::AcmeChallenge(f.to_string());
            None
        }
        Err(f) => {
            report.outcome = Outcome::HandshakeFailed(f.to_string());
            None
        }
    }
}

fn record_handshake<S>(
    l: &ListenerRuntime,
    result: &Result<(S, crate::tls::TlsFacts), crate::tls::HandshakeFailure>,
) {
    let m = crate::metrics::metrics();
    let listener = &l.config.name;
    match result {
        Err(f) => m.handshake(listener, Some(f.class())),
        Ok((_, facts)) => {
            m.handshake(listener, None);
            if facts.fallback {
                m.sni_fallbacks
                    .get_or_create(&crate::metrics::ListenerLabel {
                        listener: listener.clone(),
                    })
                    .inc();
            }
            if let Some(c) = &facts.client_cert {
                let verify = match c.verify {
                    ClientVerify::Ok => "ok",
                    ClientVerify::NoCa => "no_ca",
                    ClientVerify::Failed(_) => "failed",
                };
                m.client_certs
                    .get_or_create(&crate::metrics::ClientCertLabels {
                        listener: listener.clone(),
                        mode: format!("{:?}", l.config.client_cert).to_lowercase(),
                        verify: verify.to_owned(),
                    })
                    .inc();
            }
        }
    }
}

/// Counts a session as active from its start to its end.
struct Active(crate::metrics::ListenerLabel);

impl Active {
    fn start(listener: &str) -> Active {
        let label = crate::metrics::ListenerLabel {
            listener: listener.to_owned(),
        };
        crate::metrics::metrics().active.get_or_create(&label).inc();
        Active(label)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        crate::metrics::metrics()
            .active
            .get_or_create(&self.0)
            .dec();
    }
}

/// Adds the relay's counts and end to the report.
pub fn finish_relay(report: &mut SessionReport, r: crate::relay::RelayReport) {
    report.bytes_from_client += r.bytes_from_client;
    report.bytes_from_upstream += r.bytes_from_upstream;
    report.client_clean_close = r.client_clean_close;
    report.outcome = match r.end {
        crate::relay::RelayEnd::Closed => Outcome::Relayed,
        crate::relay::RelayEnd::IdleTimeout => Outcome::Timeout("idle"),
        crate::relay::RelayEnd::Reset => Outcome::Reset,
        crate::relay::RelayEnd::UpstreamProtocol(e) => Outcome::UpstreamFailed(e),
    };
}

/// The PROXY header for this session, as the upstream is configured to expect it.
pub fn proxy_header(version: ProxyVersion, peer: Peer, report: &SessionReport) -> Vec<u8> {
    match version {
        ProxyVersion::None => Vec::new(),
        ProxyVersion::V1 => outbound::encode_v1(peer.client, peer.local),
        ProxyVersion::V2 => {
            let tls = report.tls.as_ref().map(|t| TlsHeaderFacts {
                sni: t.sni.as_deref(),
                alpn: t.alpn.as_deref(),
                version: t.version,
                cipher: &t.cipher,
                sig_alg: &t.cert.sig_alg,
                key_alg: &t.cert.key_alg,
                client_cert: t.client_cert.as_ref().map(|c| ClientCertHeader {
                    cn: c.cn.as_deref(),
                    sha256: &c.sha256,
                    verified: c.verify == ClientVerify::Ok,
                }),
            });
            outbound::encode_v2(peer.client, peer.local, &report.session_id, tls.as_ref())
        }
    }
}

/// Writes one reply of ours, bounded in time; a client that does not read is not our problem.
pub async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: &[u8]) -> std::io::Result<()> {
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

/// A short random session id: 16 hex digits, also sent as PROXY v2 UNIQUE_ID.
pub fn new_session_id() -> String {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // The system RNG failing is not a reason to refuse mail; a clock-based id is unique enough.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        bytes = nanos.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
