//! `Facts` of one session and its `SessionReport`: exactly one log line at its end.
//! Field names are stable (documented in the README) and identical in text and JSON.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::Peer;
pub(crate) use crate::admission::LimitKind;
use crate::admission::Permits;
use crate::config::ProxyVersion;
use crate::metrics::{OutcomeKind, TransportKind};
use crate::proxy_header::outbound::{self, ClientCertHeader, TlsHeaderFacts};
pub(crate) use crate::relay::ClientClose;
use crate::smtp::stream::GuardAction;
use crate::snapshot::ListenerRuntime;
use crate::tls::TlsFacts;
use crate::tls::client_auth::ClientVerify;

/// How a session ended. `kind()` is the `outcome` field; details go to `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Relayed to the upstream until both sides closed.
    Relayed,
    /// The client left before the upstream was involved (e.g. QUIT in the dialogue).
    ClientClosed,
    HandshakeFailed(String),
    /// A timeout; the phase names which one.
    Timeout(Phase),
    UpstreamFailed(String),
    /// A socket error during the relay.
    Reset,
    /// A limit refused the session.
    Limit(LimitKind),
    /// Refused before anything else: `allow`/`deny` or the deny file.
    Denied(crate::admission::abuse::DenyReason),
    /// SIGTERM ended the session.
    Shutdown,
    /// The client broke the protocol badly enough to be disconnected.
    ProtocolError(String),
    /// Not a mail session: an ACME server validating a tls-alpn-01 challenge.
    AcmeChallenge(String),
    /// Not a mail session: a request to an `https` listener (the MTA-STS policy host);
    /// the reason is `<domain> <status>`.
    MtaSts(String),
}

/// Which wait timed out (the `reason` of `outcome=timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// `handshake_timeout`: the TLS handshake, or an inbound PROXY header.
    Handshake,
    /// `command_timeout`: a command line in the pre-TLS dialogue, or the first after TLS.
    Command,
    /// `idle_timeout`: the relay, no byte moving either way.
    Idle,
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Command => "command",
            Self::Idle => "idle",
        }
    }
}

impl Outcome {
    /// The `outcome` field and label.
    pub(crate) fn kind(&self) -> OutcomeKind {
        match self {
            Self::Relayed => OutcomeKind::Relayed,
            Self::ClientClosed => OutcomeKind::ClientClosed,
            Self::HandshakeFailed(_) => OutcomeKind::HandshakeFailed,
            Self::Timeout(_) => OutcomeKind::Timeout,
            Self::UpstreamFailed(_) => OutcomeKind::UpstreamFailed,
            Self::Reset => OutcomeKind::Reset,
            Self::Limit(_) => OutcomeKind::Limit,
            Self::Denied(_) => OutcomeKind::Denied,
            Self::Shutdown => OutcomeKind::Shutdown,
            Self::ProtocolError(_) => OutcomeKind::ProtocolError,
            Self::AcmeChallenge(_) => OutcomeKind::AcmeChallenge,
            Self::MtaSts(_) => OutcomeKind::MtaSts,
        }
    }

    pub(crate) fn reason(&self) -> &str {
        match self {
            Self::HandshakeFailed(r)
            | Self::UpstreamFailed(r)
            | Self::ProtocolError(r)
            | Self::AcmeChallenge(r)
            | Self::MtaSts(r) => r,
            Self::Timeout(phase) => phase.as_str(),
            Self::Limit(kind) => kind.as_str(),
            Self::Denied(why) => why.as_str(),
            _ => "",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = self.reason();
        if reason.is_empty() {
            f.write_str(self.kind().as_str())
        } else {
            write!(f, "{}({reason})", self.kind().as_str())
        }
    }
}

/// Which way the session's bytes went: implicit TLS, upgraded by STARTTLS, or plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Implicit,
    Starttls,
    Plaintext,
    /// An `https` listener's TLS (the MTA-STS policy host).
    Https,
    /// Ended before any of the above was settled.
    None,
}

impl Transport {
    /// The metric label of a session that reached the upstream this way.
    pub(crate) fn metric(self) -> Option<TransportKind> {
        match self {
            Self::Implicit => Some(TransportKind::Implicit),
            Self::Starttls => Some(TransportKind::Starttls),
            Self::Plaintext => Some(TransportKind::Plaintext),
            Self::Https => Some(TransportKind::Https),
            Self::None => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Implicit => "implicit",
            Self::Starttls => "starttls",
            Self::Plaintext => "plaintext",
            Self::Https => "https",
            Self::None => "none",
        }
    }
}

/// The facts of one session, gathered as its phases run; with the `Outcome` they are the
/// summary line.
#[derive(Debug)]
pub(crate) struct Facts {
    pub session_id: String,
    pub listener: Arc<ListenerRuntime>,
    /// The real client (after an inbound PROXY header) and the address it reached.
    pub peer: Peer,
    /// The load balancer that sent an inbound PROXY header, if one did.
    pub via: Option<SocketAddr>,
    pub transport: Transport,
    pub tls: Option<TlsFacts>,
    pub pipelined_discarded: u64,
    pub upstream_addr: Option<SocketAddr>,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
    pub client_close: Option<ClientClose>,
    /// What the smuggling guard did to DATA content, if anything.
    pub guard: Option<GuardAction>,
    /// What admitted the session (its connection slots, then its per-IP slot); released
    /// before the summary line is out.
    pub permits: Option<Permits>,
    pub started: Instant,
}

impl Facts {
    pub(crate) fn new(session_id: String, listener: Arc<ListenerRuntime>, peer: Peer) -> Self {
        Self {
            session_id,
            listener,
            peer,
            via: None,
            transport: Transport::None,
            tls: None,
            pipelined_discarded: 0,
            upstream_addr: None,
            bytes_from_client: 0,
            bytes_from_upstream: 0,
            client_close: None,
            guard: None,
            permits: None,
            started: Instant::now(),
        }
    }

    /// The PROXY header for this session, as the upstream is configured to expect it.
    pub(crate) fn proxy_header(&self) -> Vec<u8> {
        let (client, local) = (self.peer.client, self.peer.local);
        match self.listener.upstream.config.proxy_protocol {
            ProxyVersion::None => Vec::new(),
            ProxyVersion::V1 => outbound::encode_v1(client, local),
            ProxyVersion::V2 => {
                let tls = self.tls.as_ref().map(|t| TlsHeaderFacts {
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
                outbound::encode_v2(client, local, &self.session_id, tls.as_ref())
            }
        }
    }
}

/// The summary line: built once, from the facts and how the session ended.
#[derive(Debug)]
pub(crate) struct SessionReport {
    pub facts: Facts,
    pub outcome: Outcome,
}

impl SessionReport {
    /// The one summary line of the session, and the metrics it feeds.
    pub(crate) fn emit(&self) {
        let f = &self.facts;
        let cfg = &f.listener.config;
        let m = crate::metrics::metrics();
        m.session_ended(
            &cfg.name,
            self.outcome.kind(),
            f.transport.metric().filter(|_| f.upstream_addr.is_some()),
            f.pipelined_discarded,
            f.bytes_from_client,
            f.bytes_from_upstream,
        );
        if let Some(action) = f.guard {
            m.smuggling_guard(&cfg.name, action.action());
        }
        let tls = f.tls.as_ref();
        let cc = tls.and_then(|t| t.client_cert.as_ref());
        tracing::info!(
            target: "session",
            session_id = %f.session_id,
            listener = %cfg.name,
            client = %f.peer.client,
            via = %f.via.map(|a| a.to_string()).unwrap_or_default(),
            transport = f.transport.as_str(),
            sni = tls.and_then(|t| t.sni.as_deref()).unwrap_or(""),
            tls_version = tls.map(|t| t.version).unwrap_or(""),
            cipher = tls.map(|t| t.cipher.as_str()).unwrap_or(""),
            cert = tls.map(|t| t.cert.label.as_str()).unwrap_or(""),
            fallback = tls.is_some_and(|t| t.fallback),
            client_cert_sha256 = cc.map(|c| c.fingerprint_hex()).unwrap_or_default(),
            client_cert_cn = cc.and_then(|c| c.cn.as_deref()).unwrap_or(""),
            client_cert_verify = cc.map(|c| c.verify.as_str()).unwrap_or(""),
            pipelined_discarded = f.pipelined_discarded,
            upstream = %f.listener.upstream.config.name,
            upstream_addr = %f.upstream_addr.map(|a| a.to_string()).unwrap_or_default(),
            bytes_from_client = f.bytes_from_client,
            bytes_from_upstream = f.bytes_from_upstream,
            client_close = f.client_close.map(ClientClose::as_str).unwrap_or(""),
            bare_lf = %f.guard.map(|g| g.to_string()).unwrap_or_default(),
            duration_ms = f.started.elapsed().as_millis() as u64,
            outcome = self.outcome.kind().as_str(),
            reason = %self.outcome.reason(),
            "session"
        );
    }
}
