//! STARTTLS listeners (25, 587): the proxy speaks the pre-TLS dialogue itself
//! (`smtp::pretls`), then either upgrades (pipelined bytes dropped here, never later:
//! CVE-2011-0411) or hands the plaintext session to the upstream (greeting consumed,
//! EHLO/HELO replayed, the pending command and everything after it forwarded).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::ClientStream;
use super::report::{Outcome, Phase, Transport};
use super::{Ended, Finished, Session, write_reply};
use crate::smtp::dialogue::{self, CloseReason, Dialogue, Greet};
use crate::smtp::pretls::{self, Handoff, Next, PreTls};
use crate::smtp::reply;
use crate::smtp::stream::Path;
use crate::upstream::{Upstream, UpstreamError};

pub(super) async fn run<S>(
    session: Session<S>,
    shutdown: &CancellationToken,
) -> Result<Finished, Finished>
where
    S: ClientStream,
{
    match Box::pin(session.dialogue(shutdown)).await? {
        (session, Onward::Upgrade) => upgraded(session).await,
        (session, Onward::PassThrough { greet, forward }) => {
            plaintext(session, greet, forward).await
        }
    }
}

/// Where the dialogue sends the session when it does not end it.
enum Onward {
    /// `220 Ready to start TLS` is written: the handshake is next.
    Upgrade,
    PassThrough {
        greet: Option<Greet>,
        forward: Vec<u8>,
    },
}

impl<S: ClientStream> Session<S> {
    /// The pre-TLS dialogue until its hand-off; every reply of the dialogue, the STARTTLS
    /// `220` included, is written here.
    async fn dialogue(mut self, shutdown: &CancellationToken) -> Result<(Self, Onward), Finished> {
        // The listener's Arc, not a copy of its strings: the session's own facts stay
        // borrowable while the dialogue runs.
        let listener = self.facts.listener.clone();
        let cfg = &listener.config;
        let (hostname, command_timeout) = (cfg.hostname.as_str(), cfg.limits.command_timeout);
        // Honest pre-TLS EHLO: what the upstream really offers (as its last probe saw it)
        // among what a plaintext hand-off can carry; the conservative set until then.
        let capabilities = match listener.upstream.capabilities.load_full() {
            Some(known) => (*known).clone(),
            None => dialogue::default_capabilities(),
        };
        let mut pre = PreTls::new(Dialogue::new(hostname, cfg.require_starttls, capabilities));
        if write_reply(&mut self.io, &pre.greeting()).await.is_err() {
            return Err(self.end(Ended::silent(Outcome::ClientClosed)));
        }
        let mut chunk = [0u8; pretls::READ];
        // command_timeout is a deadline for the whole command line, from the moment we
        // wait for it: a client dripping one byte at a time does not move it (SM-19).
        let mut deadline = None;
        loop {
            match pre.step() {
                Next::Read => {
                    let until = *deadline.get_or_insert_with(|| Instant::now() + command_timeout);
                    let read = tokio::select! {
                        () = shutdown.cancelled() => {
                            // Still in cleartext, nothing relayed: the sender retries elsewhere or later.
                            return Err(self.end(Ended::replying(
                                Outcome::Shutdown,
                                reply::shutting_down(hostname),
                            )));
                        }
                        read = timeout_at(until, self.io.read(&mut chunk)) => read,
                    };
                    match read {
                        Err(_) => {
                            return Err(self.end(Ended::replying(
                                Outcome::Timeout(Phase::Command),
                                reply::command_timeout(hostname),
                            )));
                        }
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            return Err(self.end(Ended::silent(Outcome::ClientClosed)));
                        }
                        Ok(Ok(n)) => {
                            self.facts.bytes_from_client += n as u64;
                            pre.receive(&chunk[..n]);
                        }
                    }
                }
                Next::Reply(r) => {
                    deadline = None;
                    if write_reply(&mut self.io, &r).await.is_err() {
                        return Err(self.end(Ended::silent(Outcome::ClientClosed)));
                    }
                }
                Next::Done(Handoff::Close { reply, reason }) => {
                    let outcome = match reason {
                        CloseReason::Quit => Outcome::ClientClosed,
                        other => Outcome::ProtocolError(other.as_str().to_owned()),
                    };
                    return Err(self.end(match reply {
                        Some(r) => Ended::replying(outcome, r),
                        None => Ended::silent(outcome),
                    }));
                }
                Next::Done(Handoff::StartTls { reply, discarded }) => {
                    if write_reply(&mut self.io, &reply).await.is_err() {
                        return Err(self.end(Ended::silent(Outcome::ClientClosed)));
                    }
                    // Dropped here, before the handshake: never executed, never forwarded.
                    if !discarded.is_empty() {
                        self.facts.pipelined_discarded = discarded.len() as u64;
                        // No per-session span (it cost every idle session memory): the
                        // session's own fields are on the event.
                        tracing::warn!(
                            session_id = %self.facts.session_id,
                            listener = %self.facts.listener.config.name,
                            client = %self.facts.peer.client,
                            bytes = discarded.len(),
                            verbs = %verbs(&discarded),
                            "discarded bytes pipelined after STARTTLS"
                        );
                    }
                    return Ok((self, Onward::Upgrade));
                }
                Next::Done(Handoff::PassThrough { greet, forward }) => {
                    return Ok((self, Onward::PassThrough { greet, forward }));
                }
            }
        }
    }
}

/// After `220 Ready to start TLS`: handshake, the client's first command, then the upstream
/// (contacted once the client speaks, so that an unavailable upstream is the reply to its
/// next command, normally EHLO).
async fn upgraded<S>(session: Session<S>) -> Result<Finished, Finished>
where
    S: ClientStream,
{
    let session = Box::pin(session.into_tls(Transport::Starttls)).await?;
    let (session, first) = session.first_command(pretls::READ).await?;
    if is_lone_quit(&first) {
        // TLS scanners and policy probes upgrade and leave: answered here, the MTA never
        // spawns an smtpd for a session that carries nothing.
        return Err(session.end(Ended::replying(
            Outcome::ClientClosed,
            b"221 2.0.0 Bye\r\n".to_vec(),
        )));
    }
    let (mut session, mut up) = Box::pin(connect_greeted(session)).await?;
    let ended = session.relay(&mut up, Path::Tls, first).await;
    Ok(session.end(ended))
}

/// `QUIT` alone (any case, optional trailing blanks, CRLF or bare LF), nothing after it.
fn is_lone_quit(first: &[u8]) -> bool {
    let line = first
        .strip_suffix(b"\r\n")
        .or_else(|| first.strip_suffix(b"\n"))
        .unwrap_or(b"");
    let line = line.trim_ascii_end();
    line.eq_ignore_ascii_case(b"QUIT")
}

/// Port 25 without STARTTLS: one coherent plaintext session through the upstream.
async fn plaintext<S>(
    mut session: Session<S>,
    greet: Option<Greet>,
    forward: Vec<u8>,
) -> Result<Finished, Finished>
where
    S: ClientStream,
{
    session.facts.transport = Transport::Plaintext;
    let (mut session, mut up) = Box::pin(connect_greeted(session)).await?;
    if let Some(greet) = greet {
        // Replayed only after the greeting: Postfix refuses pre-greeting input.
        let replay = async {
            up.stream
                .write_all(&greet.line())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            reply::read_reply(&mut up.stream, &mut buf)
                .await
                .map_err(|e| e.to_string())
        };
        let limit = session.facts.listener.upstream.config.connect_timeout;
        let failure = match timeout(limit, replay).await {
            Ok(Ok(span)) if span.code / 100 == 2 => None,
            Ok(Ok(span)) => Some(format!("replayed {} answered {}", greet.verb(), span.code)),
            Ok(Err(e)) => Some(format!("replaying {}: {e}", greet.verb())),
            Err(_) => Some(format!("timeout replaying {}", greet.verb())),
        };
        if let Some(reason) = failure {
            return Err(session.end(Ended {
                outcome: Outcome::UpstreamFailed(reason),
                owed: Some(super::Owed::Unavailable),
            }));
        }
    }
    let ended = session.relay(&mut up, Path::Plaintext, forward).await;
    Ok(session.end(ended))
}

/// Connects and requires a 2xx greeting (consumed, never forwarded on these paths).
async fn connect_greeted<S>(session: Session<S>) -> Result<(Session<S>, Upstream), Finished>
where
    S: ClientStream,
{
    let (session, mut up) = session.connect().await?;
    let name = &session.facts.listener.upstream.config.name;
    let refused = match up.greeting_code / 100 {
        2 => {
            // Consumed: `up` lives as long as the relay, the greeting need not.
            up.greeting = Vec::new();
            return Ok((session, up));
        }
        // Only the reply itself, never bytes that followed it in the same read.
        5 => UpstreamError::Refused(up.greeting[..up.greeting_len].to_vec()),
        _ => UpstreamError::Greeting(String::from_utf8_lossy(&up.greeting).trim_end().to_owned()),
    };
    crate::metrics::metrics().upstream_failure(name, refused.class());
    Err(session.end(refused.into()))
}

/// The command verbs of discarded lines (at most 8, then `...`), never their arguments: the
/// bytes may hold `AUTH PLAIN` credentials (catalogue SM-16, promise P12). A token that is
/// not a plausible verb shows as `?`.
fn verbs(bytes: &[u8]) -> String {
    const SHOWN: usize = 8;
    let mut lines = bytes
        .split(|&b| b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|l| !l.is_empty());
    let mut out: Vec<String> = lines
        .by_ref()
        .take(SHOWN)
        .map(|l| {
            let verb = l.split(|&b| b == b' ').next().unwrap_or_default();
            if (1..=10).contains(&verb.len()) && verb.iter().all(u8::is_ascii_alphabetic) {
                String::from_utf8_lossy(verb).to_ascii_uppercase()
            } else {
                "?".to_owned()
            }
        })
        .collect();
    if lines.next().is_some() {
        out.push("...".to_owned());
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_lone_quit_is_answered_locally() {
        for yes in [&b"QUIT\r\n"[..], b"quit\r\n", b"Quit  \r\n", b"QUIT\n"] {
            assert!(
                super::is_lone_quit(yes),
                "{:?}",
                String::from_utf8_lossy(yes)
            );
        }
        for no in [
            &b"QUIT"[..],
            b"QUIT\r\nEHLO x\r\n",
            b"QUITX\r\n",
            b"EHLO x\r\n",
            b"\r\n",
            b"",
        ] {
            assert!(
                !super::is_lone_quit(no),
                "{:?}",
                String::from_utf8_lossy(no)
            );
        }
    }
}
