//! Server-side handshake: read the ClientHello, decide the certificate (or refuse with
//! `unrecognized_name` before any handshake message), complete the handshake under the
//! listener's `handshake_timeout`, and collect the facts for logs and the PROXY header.

use std::fmt;

use crate::metrics::HandshakeReason;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::{Accepted, Acceptor};
use rustls::{CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::cert::ServedCert;
use super::client_auth::{self, ClientCertFacts};
use super::handshake::{Handshake, Step};
use super::resolve::{CertChoice, HelloFacts, ListenerResolver};
use crate::io::Prefixed;
use crate::record::OwnTls;

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
) -> Result<(ServerTls<IO>, TlsFacts), HandshakeFailure>
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

/// The largest ClientHello read before a decision (rustls' handshake message bound).
const MAX_HELLO: usize = 0x1_0000 + 4096;

/// An established client session: TLS 1.3 on our record layer, TLS 1.2 (and nothing
/// else) on tokio-rustls, which replays the ClientHello we peeked.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "the large variant is the common one; the session boxes the whole enum"
)]
pub(crate) enum ServerTls<IO> {
    Own(OwnTls<IO>),
    /// Boxed: an idle TLS 1.3 session should not carry a rustls connection's size.
    Rustls(Box<TlsStream<Prefixed<IO>>>),
}

async fn handshake<IO>(
    mut io: IO,
    tls: &ListenerTls,
) -> Result<(ServerTls<IO>, TlsFacts), HandshakeFailure>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (hello_bytes, accepted) = read_hello(&mut io).await?;
    let hello = accepted.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    if is_challenge_hello(&hello) {
        // An ACME validation handshake (tls-alpn-01) for a name we order: the challenge
        // config answers it; there is no SMTP session behind it.
        let challenge = sni
            .as_deref()
            .and_then(|name| tls.resolver.store.acme_challenge(name));
        if let Some(config) = challenge {
            drop(accepted);
            let result = rustls_handshake(io, hello_bytes, config).await;
            return Err(HandshakeFailure::AcmeChallenge(
                result.err().map(|e| e.to_string()),
            ));
        }
    }
    let choice = tls.resolver.choose(&HelloFacts::from_hello(&hello));
    drop(accepted);
    let (cert, fallback) = match choice {
        CertChoice::Serve { cert, fallback } => (cert, fallback),
        CertChoice::Reject => {
            // Decided before the handshake: returning no certificate from the resolver
            // would make rustls send `access_denied`, which tells the sender nothing.
            let _ = io.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            let _ = io.shutdown().await;
            return Err(HandshakeFailure::UnrecognizedName(sni.unwrap_or_default()));
        }
    };
    let facts = |common: &CommonState| TlsFacts {
        sni: sni.clone(),
        version: match common.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        },
        cipher: common
            .negotiated_cipher_suite()
            .map(|s| cipher_name(s.suite()))
            .unwrap_or_default(),
        alpn: common.alpn_protocol().map(<[u8]>::to_vec),
        cert: cert.clone(),
        fallback,
        client_cert: client_auth::facts(common.peer_certificates(), tls.judge.as_ref()),
    };
    let hs =
        Handshake::new(tls.config.clone(), hello_bytes.clone()).map_err(|e| tls_failure(&e))?;
    match handshake13(&mut io, hs).await? {
        Some(hs) => {
            let facts = facts(hs.common());
            let established = hs.finish().map_err(|e| tls_failure(&e))?;
            let stream = OwnTls::new(io, established.layer, established.early);
            Ok((ServerTls::Own(stream), facts))
        }
        None => {
            let stream = rustls_handshake(io, hello_bytes, tls.config.clone()).await?;
            let (_, conn) = stream.get_ref();
            let facts = facts(conn);
            Ok((ServerTls::Rustls(Box::new(stream)), facts))
        }
    }
}

/// Reads until rustls has a whole ClientHello; returns the bytes read and the parse.
async fn read_hello<IO>(io: &mut IO) -> Result<(Vec<u8>, Accepted), HandshakeFailure>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut acceptor = Acceptor::default();
    let mut bytes = Vec::new();
    loop {
        let have = bytes.len();
        if have >= MAX_HELLO {
            return Err(HandshakeFailure::Tls {
                class: HandshakeReason::InvalidMessage,
                reason: "ClientHello too large".to_owned(),
            });
        }
        bytes.resize(have + 4096, 0);
        let n = io.read(&mut bytes[have..]).await.map_err(|e| failure(&e))?;
        bytes.truncate(have + n);
        if n == 0 {
            return Err(failure(&std::io::ErrorKind::UnexpectedEof.into()));
        }
        let mut chunk = &bytes[have..];
        while !chunk.is_empty() {
            acceptor.read_tls(&mut chunk).map_err(|e| failure(&e))?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok((bytes, accepted)),
            Ok(None) => {}
            Err((e, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write(&mut out);
                let _ = io.write_all(&out).await;
                return Err(tls_failure(&e));
            }
        }
    }
}

/// Runs the unbuffered TLS 1.3 handshake; `None` when TLS 1.2 was negotiated instead
/// (nothing was sent).
async fn handshake13<IO>(
    io: &mut IO,
    mut hs: Handshake,
) -> Result<Option<Handshake>, HandshakeFailure>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match hs.step() {
            Ok(Step::Send) => {
                io.write_all(hs.outgoing()).await.map_err(|e| failure(&e))?;
                io.flush().await.map_err(|e| failure(&e))?;
                hs.outgoing().clear();
            }
            Ok(Step::Read) => {
                let incoming = hs.incoming();
                let have = incoming.len();
                if have >= MAX_HELLO {
                    return Err(HandshakeFailure::Tls {
                        class: HandshakeReason::InvalidMessage,
                        reason: "handshake message too large".to_owned(),
                    });
                }
                incoming.resize(have + 4096, 0);
                let read = io.read(&mut incoming[have..]).await;
                let n = *read.as_ref().unwrap_or(&0);
                incoming.truncate(have + n);
                match read {
                    Err(e) => return Err(failure(&e)),
                    Ok(0) => return Err(failure(&std::io::ErrorKind::UnexpectedEof.into())),
                    Ok(_) => {}
                }
            }
            Ok(Step::Done) => return Ok(Some(hs)),
            Ok(Step::Tls12) => return Ok(None),
            Err(e) => {
                let alert = std::mem::take(hs.outgoing());
                let _ = io.write_all(&alert).await;
                return Err(tls_failure(&e));
            }
        }
    }
}

/// The handshake on tokio-rustls (TLS 1.2 and ACME validations), with the ClientHello
/// already read replayed first.
async fn rustls_handshake<IO>(
    io: IO,
    hello: Vec<u8>,
    config: Arc<ServerConfig>,
) -> Result<TlsStream<Prefixed<IO>>, HandshakeFailure>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let start = LazyConfigAcceptor::new(Acceptor::default(), Prefixed::new(io, hello))
        .await
        .map_err(|e| failure(&e))?;
    start.into_stream(config).await.map_err(|e| failure(&e))
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
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if let Some(tls) = tls {
        return tls_failure(tls);
    }
    let class = match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => HandshakeReason::Eof,
        _ => HandshakeReason::IoError,
    };
    HandshakeFailure::Tls {
        class,
        reason: e.to_string(),
    }
}

fn tls_failure(e: &rustls::Error) -> HandshakeFailure {
    use rustls::Error as E;
    let class = match e {
        E::InvalidMessage(_) | E::InappropriateHandshakeMessage { .. } => {
            HandshakeReason::InvalidMessage
        }
        E::InappropriateMessage { .. } => HandshakeReason::InvalidMessage,
        E::PeerIncompatible(_) => HandshakeReason::Incompatible,
        E::AlertReceived(_) => HandshakeReason::AlertReceived,
        E::NoCertificatesPresented | E::InvalidCertificate(_) => HandshakeReason::ClientCertificate,
        _ => HandshakeReason::TlsError,
    };
    HandshakeFailure::Tls {
        class,
        reason: e.to_string(),
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ServerTls::Own($s) => $e,
            ServerTls::Rustls($s) => $e,
        }
    };
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerTls<IO> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        both!(self, s => std::pin::Pin::new(s).poll_read(cx, buf))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerTls<IO> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        both!(self, s => std::pin::Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        both!(self, s => std::pin::Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        both!(self, s => std::pin::Pin::new(s).poll_shutdown(cx))
    }
}
