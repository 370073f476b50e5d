//! The session's state and the phases both paths share: the inbound PROXY header, the
//! per-IP admission, the TLS handshake, the upstream connection, the relay. The STARTTLS
//! dialogue is in `starttls`.

use std::sync::Arc;
use std::time::Duration;

use crate::tls::ServerTls;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ClientStream;
use super::report::{Facts, Outcome, Phase, SessionReport, Transport};
use super::{trusted_balancer, write_reply};
use crate::admission::Refusal;
use crate::config::SmugglingGuard;
use crate::io::Prefixed;
use crate::proxy_header::inbound;
use crate::relay::{self, RelayEnd};
use crate::smtp::guard::GuardMode;
use crate::smtp::reply;
use crate::smtp::stream::{Path, SmtpStream};
use crate::snapshot::ListenerRuntime;
use crate::tls::HandshakeFailure;
use crate::upstream::{self, Upstream, UpstreamError};

/// A client stream whatever its type, for the one place that writes an owed reply.
trait ClientWrite: AsyncWrite + Unpin + Send {}
impl<T: AsyncWrite + Unpin + Send> ClientWrite for T {}

/// One client connection in some phase, over the stream `S` of that phase. The facts (and,
/// after the handshake, the TLS stream) live on the heap: a phase future that takes the
/// session by value then costs its caller a pointer, not a second copy (idle memory).
pub(crate) struct Session<S> {
    pub(super) io: S,
    pub(super) facts: Box<Facts>,
}

/// The reply a session still owes its client when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owed {
    /// These exact bytes (ours, or the MTA's own 5xx greeting).
    Reply(Vec<u8>),
    /// `421 4.3.0 <hostname> Service not available`: the sender retries.
    Unavailable,
}

/// How a session ended: the outcome for its report and the reply still owed, if any.
#[derive(Debug)]
pub(crate) struct Ended {
    pub outcome: Outcome,
    pub owed: Option<Owed>,
}

impl Ended {
    pub(crate) fn silent(outcome: Outcome) -> Self {
        Self {
            outcome,
            owed: None,
        }
    }

    pub(crate) fn replying(outcome: Outcome, reply: Vec<u8>) -> Self {
        Self {
            outcome,
            owed: Some(Owed::Reply(reply)),
        }
    }
}

/// The one tail for "the upstream failed": a 4xx (or the MTA's own 5xx refusal) is owed.
impl From<UpstreamError> for Ended {
    fn from(e: UpstreamError) -> Self {
        let owed = match &e {
            UpstreamError::Refused(greeting) => Owed::Reply(greeting.clone()),
            _ => Owed::Unavailable,
        };
        Self {
            outcome: Outcome::UpstreamFailed(e.to_string()),
            owed: Some(owed),
        }
    }
}

/// A session that has ended: its facts, how, and its stream while a reply is owed. Boxed:
/// it travels as the `Err` of every phase, which stays a pointer wide.
pub(crate) struct Finished(Box<Ending>);

struct Ending {
    facts: Box<Facts>,
    ended: Ended,
    io: Option<Box<dyn ClientWrite>>,
}

impl Finished {
    fn new(facts: Box<Facts>, ended: Ended, io: Option<Box<dyn ClientWrite>>) -> Self {
        Self(Box::new(Ending { facts, ended, io }))
    }

    /// A session whose stream another server took over and closed (the `https` listener's
    /// HTTP server): nothing is owed.
    pub(super) fn served(facts: Box<Facts>, outcome: Outcome) -> Self {
        Self::new(facts, Ended::silent(outcome), None)
    }

    /// Writes the owed reply (bounded), closes the client stream, and gives the report.
    pub(crate) async fn close(self) -> SessionReport {
        let Ending { facts, ended, io } = *self.0;
        if let (Some(mut io), Some(owed)) = (io, &ended.owed) {
            let bytes = match owed {
                Owed::Reply(r) => r.clone(),
                Owed::Unavailable => reply::upstream_unavailable(&facts.listener.config.hostname),
            };
            if write_reply(&mut io, &bytes).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            }
        }
        SessionReport {
            facts: *facts,
            outcome: ended.outcome,
        }
    }
}

impl<S: ClientStream> Session<S> {
    pub(crate) fn new(io: S, facts: Facts) -> Self {
        Self {
            io,
            facts: Box::new(facts),
        }
    }

    pub(crate) fn listener(&self) -> &Arc<ListenerRuntime> {
        &self.facts.listener
    }

    /// Ends here; the stream is kept for the owed reply, if there is one.
    pub(crate) fn end(self, ended: Ended) -> Finished {
        let io: Option<Box<dyn ClientWrite>> = match ended.owed {
            Some(_) => Some(Box::new(self.io)),
            None => None,
        };
        Finished::new(self.facts, ended, io)
    }

    /// From a trusted load balancer, the inbound PROXY header (its client is the session's
    /// from now on); from anyone else, nothing is read. What followed the header in the
    /// same read is replayed first.
    pub(crate) async fn read_proxy_header(mut self) -> Result<Session<Prefixed<S>>, Finished> {
        let cfg = &self.facts.listener.config;
        let mut rest = Vec::new();
        if trusted_balancer(&cfg.accept_proxy_protocol, self.facts.peer.client.ip()) {
            match inbound::read(&mut self.io, cfg.limits.handshake_timeout).await {
                Ok((carried, after)) => {
                    if let Some((client, local)) = carried {
                        self.facts.via = Some(self.facts.peer.client);
                        self.facts.peer = super::Peer { client, local };
                        tracing::Span::current().record("client", tracing::field::display(client));
                    }
                    rest = after;
                }
                Err(e) => {
                    return Err(self.end(Ended::silent(Outcome::ProtocolError(e.to_string()))));
                }
            }
        }
        Ok(Session {
            io: Prefixed::new(self.io, rest),
            facts: self.facts,
        })
    }

    /// Admission, on the real client address and before any TLS work or upstream contact
    /// (`admission::Permits::admit`). A refused client on a STARTTLS listener gets
    /// `554 5.7.1` (denied) or `421 4.7.0` (a limit) as its greeting; on an implicit
    /// listener the connection is just closed.
    pub(crate) fn admit(mut self) -> Result<Self, Finished> {
        let ip = self.facts.peer.client.ip();
        let facts = &mut *self.facts;
        let l = &facts.listener.config;
        let refusal = match facts.permits.as_mut() {
            Some(permits) => permits.admit(l, ip).err(),
            None => None,
        };
        let (outcome, greeting) = match refusal {
            None => return Ok(self),
            Some(Refusal::Denied(reason)) => {
                (Outcome::Denied(reason), reply::access_denied(&l.hostname))
            }
            Some(Refusal::Limit(kind)) => (
                Outcome::Limit(kind),
                reply::too_many_connections(&l.hostname),
            ),
        };
        let ended = match l.mode {
            crate::config::Mode::Starttls => Ended::replying(outcome, greeting),
            crate::config::Mode::Implicit | crate::config::Mode::Https => Ended::silent(outcome),
        };
        Err(self.end(ended))
    }

    /// The server handshake under `handshake_timeout`; the TLS facts join the session's.
    pub(crate) async fn into_tls(
        self,
        transport: Transport,
    ) -> Result<Session<Box<ServerTls<S>>>, Finished> {
        let Self { io, mut facts } = self;
        let l = facts.listener.clone();
        let result = crate::tls::accept(io, &l.tls, l.config.limits.handshake_timeout).await;
        let (stream, tls) = match result {
            Ok(ok) => ok,
            Err(f) => {
                crate::metrics::metrics().handshake_failed(&l.config.name, f.reason());
                let outcome = match f {
                    HandshakeFailure::Timeout => Outcome::Timeout(Phase::Handshake),
                    f @ HandshakeFailure::AcmeChallenge(_) => Outcome::AcmeChallenge(f.to_string()),
                    f => Outcome::HandshakeFailed(f.to_string()),
                };
                return Err(Finished::new(facts, Ended::silent(outcome), None));
            }
        };
        l.counters.handshake_ok(
            tls.fallback,
            tls.client_cert.as_ref().map(|c| c.verify.class()),
        );
        crate::metrics::metrics().tls_session(&l.config.name, tls.version, &tls.cipher);
        facts.transport = transport;
        facts.tls = Some(tls);
        Ok(Session {
            io: Box::new(stream),
            facts,
        })
    }

    /// Reads the client's next bytes (at most `max`) within `command_timeout`; a timeout
    /// owes `421 4.4.2`, a close ends the session as the client's.
    pub(crate) async fn first_command(mut self, max: usize) -> Result<(Self, Vec<u8>), Finished> {
        let timeout = self.facts.listener.config.limits.command_timeout;
        let mut first = vec![0u8; max];
        match tokio::time::timeout(timeout, self.io.read(&mut first)).await {
            Err(_) => {
                let owed = reply::command_timeout(&self.facts.listener.config.hostname);
                Err(self.end(Ended::replying(Outcome::Timeout(Phase::Command), owed)))
            }
            Ok(Ok(0)) | Ok(Err(_)) => Err(self.end(Ended::silent(Outcome::ClientClosed))),
            Ok(Ok(n)) => {
                first.truncate(n);
                self.facts.bytes_from_client += n as u64;
                Ok((self, first))
            }
        }
    }

    /// Connects the upstream with this session's PROXY header (greeting read, not sent).
    pub(crate) async fn connect(self) -> Result<(Self, Upstream), Finished> {
        let header = self.facts.proxy_header();
        match upstream::connect(&self.facts.listener.upstream, &header).await {
            Ok(up) => {
                let mut s = self;
                s.facts.upstream_addr = Some(up.addr);
                Ok((s, up))
            }
            Err(e) => Err(self.end(e.into())),
        }
    }

    /// Relays until the end; `pending` is client input already read. Borrows the session
    /// and the upstream: a future that took them by value would be laid out beside the
    /// moved-from locals of its caller, and an idle session's task would carry both copies
    /// (measured: +4 KiB per idle session).
    pub(crate) async fn relay(&mut self, up: &mut Upstream, path: Path, pending: Vec<u8>) -> Ended {
        let cfg = &self.facts.listener.config;
        let mut smtp = SmtpStream::new(path, guard_mode(cfg.smuggling_guard));
        let (idle, hostname) = (cfg.limits.idle_timeout, cfg.hostname.as_str());
        let r = relay::relay(
            &mut self.io,
            &mut up.stream,
            idle,
            &mut smtp,
            pending,
            hostname,
        )
        .await;
        for (kind, n) in smtp.refusals() {
            crate::metrics::metrics().follower_refusals(&cfg.name, kind, n);
        }
        let f = &mut self.facts;
        f.bytes_from_client += r.bytes_from_client;
        f.bytes_from_upstream += r.bytes_from_upstream;
        f.client_close = r.client_close;
        f.guard = smtp.guard_action();
        // Nothing is owed: the relay wrote whatever the client had to hear.
        Ended::silent(match r.end {
            RelayEnd::Closed => Outcome::Relayed,
            RelayEnd::IdleTimeout => Outcome::Timeout(Phase::Idle),
            RelayEnd::Reset => Outcome::Reset,
            RelayEnd::UpstreamProtocol(e) => Outcome::UpstreamFailed(e),
            RelayEnd::Refused(why) => Outcome::ProtocolError(why.to_owned()),
        })
    }
}

fn guard_mode(configured: SmugglingGuard) -> GuardMode {
    match configured {
        SmugglingGuard::Off => GuardMode::Off,
        SmugglingGuard::Normalize => GuardMode::Normalize,
        SmugglingGuard::Reject => GuardMode::Reject,
    }
}
