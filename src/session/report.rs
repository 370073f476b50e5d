//! `SessionReport`: the facts of one session, emitted as exactly one log line at its end.
//! Field names are stable (documented in the README) and identical in text and JSON.

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use crate::tls::TlsFacts;

/// How a session ended. `kind()` is the `outcome` field; details go to `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed to the upstream until both sides closed.
    Relayed,
    /// The client left before the upstream was involved (e.g. QUIT in the dialogue).
    ClientClosed,
    HandshakeFailed(String),
    /// A timeout; the phase names which one.
    Timeout(&'static str),
    UpstreamFailed(String),
    /// A socket error during the relay.
    Reset,
    /// A limit refused the session.
    Limit(&'static str),
    /// SIGTERM ended the session.
    Shutdown,
    /// The client broke the protocol badly enough to be disconnected.
    ProtocolError(String),
    /// Not a mail session: an ACME server validating a tls-alpn-01 challenge.
    AcmeChallenge(String),
}

impl Outcome {
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::ClientClosed => "client_closed",
            Outcome::HandshakeFailed(_) => "handshake_failed",
            Outcome::Timeout(_) => "timeout",
            Outcome::UpstreamFailed(_) => "upstream_failed",
            Outcome::Reset => "reset",
            Outcome::Limit(_) => "limit",
            Outcome::Shutdown => "shutdown",
            Outcome::ProtocolError(_) => "protocol_error",
            Outcome::AcmeChallenge(_) => "acme_challenge",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Outcome::HandshakeFailed(r)
            | Outcome::UpstreamFailed(r)
            | Outcome::ProtocolError(r)
            | Outcome::AcmeChallenge(r) => r.clone(),
            Outcome::Timeout(phase) | Outcome::Limit(phase) => (*phase).to_owned(),
            _ => String::new(),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = self.reason();
        if reason.is_empty() {
            f.write_str(self.kind())
        } else {
            write!(f, "{}({reason})", self.kind())
        }
    }
}

/// Which way the session's bytes went: implicit TLS, upgraded by STARTTLS, or plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Implicit,
    Starttls,
    Plaintext,
    /// Ended before any of the above was settled.
    None,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Implicit => "implicit",
            Transport::Starttls => "starttls",
            Transport::Plaintext => "plaintext",
            Transport::None => "none",
        }
    }
}

/// Everything the summary line says.
#[derive(Debug)]
pub struct SessionReport {
    pub session_id: String,
    pub listener: String,
    pub client: SocketAddr,
    /// The load balancer that sent an inbound PROXY header, if one did.
    pub via: Option<SocketAddr>,
    pub transport: Transport,
    pub tls: Option<TlsFacts>,
    pub pipelined_discarded: u64,
    pub upstream: String,
    pub upstream_addr: Option<SocketAddr>,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
    /// From the relay: whether the client ended with close_notify (TLS) or FIN (plaintext).
    pub client_clean_close: Option<bool>,
    pub started: Instant,
    pub outcome: Outcome,
}

impl SessionReport {
    pub fn new(session_id: String, listener: &str, client: SocketAddr, upstream: &str) -> Self {
        SessionReport {
            session_id,
            listener: listener.to_owned(),
            client,
            via: None,
            transport: Transport::None,
            tls: None,
            pipelined_discarded: 0,
            upstream: upstream.to_owned(),
            upstream_addr: None,
            bytes_from_client: 0,
            bytes_from_upstream: 0,
            client_clean_close: None,
            started: Instant::now(),
            outcome: Outcome::ClientClosed,
        }
    }

    /// The one summary line of the session, and the metrics it feeds.
    pub fn emit(&self) {
        crate::metrics::metrics().record_session(self);
        let tls = self.tls.as_ref();
        let cc = tls.and_then(|t| t.client_cert.as_ref());
        tracing::info!(
            target: "session",
            session_id = %self.session_id,
            listener = %self.listener,
            client = %self.client,
            via = %self.via.map(|a| a.to_string()).unwrap_or_default(),
            transport = self.transport.as_str(),
            sni = tls.and_then(|t| t.sni.as_deref()).unwrap_or(""),
            tls_version = tls.map(|t| t.version).unwrap_or(""),
            cipher = tls.map(|t| t.cipher.as_str()).unwrap_or(""),
            cert = tls.map(|t| t.cert.label.as_str()).unwrap_or(""),
            fallback = tls.is_some_and(|t| t.fallback),
            client_cert_sha256 = cc.map(|c| c.fingerprint_hex()).unwrap_or_default(),
            client_cert_cn = cc.and_then(|c| c.cn.as_deref()).unwrap_or(""),
            client_cert_verify = cc.map(|c| c.verify.as_str()).unwrap_or(""),
            pipelined_discarded = self.pipelined_discarded,
            upstream = %self.upstream,
            upstream_addr = %self.upstream_addr.map(|a| a.to_string()).unwrap_or_default(),
            bytes_from_client = self.bytes_from_client,
            bytes_from_upstream = self.bytes_from_upstream,
            client_close = match self.client_clean_close {
                Some(true) => "clean",
                Some(false) => "truncated",
                None => "",
            },
            duration_ms = self.started.elapsed().as_millis() as u64,
            outcome = self.outcome.kind(),
            reason = %self.outcome.reason(),
            "session"
        );
    }
}
