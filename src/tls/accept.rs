//! Server-side handshake: read the ClientHello, decide the certificate (or refuse with
//! `unrecognized_name` before any handshake message), complete the handshake under the
//! listener's `handshake_timeout`, and collect the facts for logs and the PROXY header.

use std::fmt;

use crate::metrics::HandshakeReason;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::danger::ClientCertVerifier;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::cert::ServedCert;
use super::client_auth::{self, ClientCertFacts};
use super::resolve::{CertChoice, HelloFacts, ListenerResolver};

/// The TLS alert record `unrecognized_name` (fatal), TLS 1.2 record version.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// Everything a listener needs to run handshakes; built once per snapshot.
#[derive(Debug)]
pub struct ListenerTls {
    pub config: Arc<ServerConfig>,
    pub resolver: Arc<ListenerResolver>,
    /// `client_ca` verifier used after the handshake to judge a presented certificate.
    pub judge: Option<Arc<dyn ClientCertVerifier>>,
}

/// Facts of a completed handshake.
#[derive(Debug, Clone)]
pub(crate) struct TlsFacts {
    pub sni: Option<String>,
    pub version: &'static str,
    pub cipher: String,
    pub alpn: Option<Vec<u8>>,
    pub cert: Arc<ServedCert>,
    pub fallback: bool,
    pub client_cert: Option<ClientCertFacts>,
}

/// Why a handshake did not complete; a normal network ending, not an error of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HandshakeFailure {
    Timeout,
    /// `unknown_sni: reject` and this SNI names nothing we serve.
    UnrecognizedName(String),
    /// rustls or the socket reported this; `class` is the metric's bounded reason.
    Tls {
        class: HandshakeReason,
        reason: String,
    },
    /// An ACME tls-alpn-01 validation handshake was answered (with its error, if any).
    AcmeChallenge(Option<String>),
}

impl HandshakeFailure {
    /// The `reason` label of a failed handshake; `None` for an answered ACME validation.
    pub(crate) fn reason(&self) -> Option<HandshakeReason> {
        match self {
            Self::Timeout => Some(HandshakeReason::Timeout),
            Self::UnrecognizedName(_) => Some(HandshakeReason::UnrecognizedName),
            Self::Tls { class, .. } => Some(*class),
            Self::AcmeChallenge(_) => None,
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("timeout"),
            Self::UnrecognizedName(sni) => write!(f, "unrecognized_name sni={sni}"),
            Self::Tls { reason, .. } => f.write_str(reason),
            Self::AcmeChallenge(None) => f.write_str("acme tls-alpn-01 validation answered"),
            Self::AcmeChallenge(Some(e)) => {
                write!(f, "acme tls-alpn-01 validation: {e}")
            }
        }
    }
}

/// Runs the whole server handshake on `io` within `timeout`.
pub(crate) async fn accept<IO>(
    io: IO,
    tls: &ListenerTls,
    timeout: Duration,
) -> Result<(TlsStream<IO>, TlsFacts), HandshakeFailure>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, handshake(io, tls)).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeFailure::Timeout),
    }
}

/// The ALPN protocol of tls-alpn-01 validation handshakes (RFC 8737).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A validation handshake offers `acme-tls/1` and nothing else (RFC 8737 section 3).
pub(crate) fn is_challenge_hello(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello.alpn().is_some_and(|mut protocols| {
        protocols.next() == Some(ACME_TLS_ALPN) && protocols.next().is_none()
    })
}

async fn handshake<IO>(
    io: IO,
    tls: &ListenerTls,
) -> Result<(TlsStream<IO>, TlsFacts), HandshakeFailure>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
        .await
        .map_err(|e| failure(&e))?;
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    if is_challenge_hello(&hello) {
        // An ACME validation handshake (tls-alpn-01) for a name we order: the challenge
        // config answers it; there is no SMTP session behind it.
        let challenge = sni
            .as_deref()
            .and_then(|name| tls.resolver.store.acme_challenge(name));
        if let Some(config) = challenge {
            let result = start.into_stream(config).await;
            return Err(HandshakeFailure::AcmeChallenge(
                result.err().map(|e| failure(&e).to_string()),
            ));
        }
    }
    let choice = tls.resolver.choose(&HelloFacts::from_hello(&hello));
    let (cert, fallback) = match choice {
        CertChoice::Serve { cert, fallback } => (cert, fallback),
        CertChoice::Reject => {
            // Decided before the handshake: returning no certificate from the resolver
            // would make rustls send `access_denied`, which tells the sender nothing.
            let mut io = start.io;
            let _ = io.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            let _ = io.shutdown().await;
            return Err(HandshakeFailure::UnrecognizedName(sni.unwrap_or_default()));
        }
    };
    let stream = start
        .into_stream(tls.config.clone())
        .await
        .map_err(|e| failure(&e))?;
    let (_, conn) = stream.get_ref();
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| cipher_name(s.suite()))
        .unwrap_or_default();
    let facts = TlsFacts {
        sni,
        version,
        cipher,
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        cert,
        fallback,
        client_cert: client_auth::facts(conn.peer_certificates(), tls.judge.as_ref()),
    };
    Ok((stream, facts))
}

/// IANA name of a suite (`TLS_AES_256_GCM_SHA384`, `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`).
fn cipher_name(suite: rustls::CipherSuite) -> String {
    let name = format!("{suite:?}");
    match name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => name,
    }
}

fn failure(e: &std::io::Error) -> HandshakeFailure {
    use rustls::Error as E;
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let class = match tls {
        Some(E::InvalidMessage(_) | E::InappropriateHandshakeMessage { .. }) => {
            HandshakeReason::InvalidMessage
        }
        Some(E::InappropriateMessage { .. }) => HandshakeReason::InvalidMessage,
        Some(E::PeerIncompatible(_)) => HandshakeReason::Incompatible,
        Some(E::AlertReceived(_)) => HandshakeReason::AlertReceived,
        Some(E::NoCertificatesPresented | E::InvalidCertificate(_)) => {
            HandshakeReason::ClientCertificate
        }
        Some(_) => HandshakeReason::TlsError,
        None => match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => HandshakeReason::Eof,
            _ => HandshakeReason::IoError,
        },
    };
    HandshakeFailure::Tls {
        class,
        reason: tls.map_or_else(|| e.to_string(), ToString::to_string),
    }
}
