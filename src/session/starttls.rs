//! STARTTLS listeners (25, 587): the proxy speaks the pre-TLS dialogue itself
//! (`smtp::Dialogue`), then either upgrades (pipelined bytes dropped here, never later:
//! CVE-2011-0411) or hands the plaintext session to the upstream (greeting consumed,
//! EHLO/HELO replayed, the pending command and everything after it forwarded).

use crate::io::ClientIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::{Outcome, Peer, SessionReport, Transport, proxy_header, write_reply};
use crate::relay;
use crate::smtp::dialogue::{self, Dialogue, Greet, Step};
use crate::smtp::line::LineReader;
use crate::smtp::reply;
use crate::smtp::stream::{STARTTLS_AFTER_HANDOFF, SmtpStream};
use crate::snapshot::ListenerRuntime;
use crate::upstream::{self, UpstreamError};

/// One read of client input in the dialogue; the line reader bounds what is kept.
const DIALOGUE_READ: usize = 1024;
/// First byte of a TLS handshake record: an implicit-TLS client on a STARTTLS port.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

pub async fn run(
    mut tcp: ClientIo,
    peer: Peer,
    l: &ListenerRuntime,
    report: &mut SessionReport,
    shutdown: &CancellationToken,
) {
    let cfg = &l.config;
    let mut dialogue = Dialogue::new(
        &cfg.hostname,
        cfg.require_starttls,
        dialogue::default_capabilities(),
    );
    if write_reply(&mut tcp, &dialogue.greeting()).await.is_err() {
        return;
    }
    let mut reader = LineReader::default();
    let mut chunk = [0u8; DIALOGUE_READ];
    let mut first_read = true;
    loop {
        // command_timeout is a deadline for the whole command line, from the moment we
        // wait for it: a client dripping one byte at a time does not move it (SM-19).
        let deadline = Instant::now() + cfg.limits.command_timeout;
        let event = loop {
            if let Some(e) = reader.next_event() {
                break e;
            }
            let read = tokio::select! {
                () = shutdown.cancelled() => {
                    // Still in cleartext, nothing relayed: the sender retries elsewhere or later.
                    let _ = write_reply(&mut tcp, &reply::shutting_down(&cfg.hostname)).await;
                    let _ = tcp.shutdown().await;
                    report.outcome = Outcome::Shutdown;
                    return;
                }
                read = timeout_at(deadline, tcp.read(&mut chunk)) => read,
            };
            let n = match read {
                Err(_) => {
                    let _ = write_reply(&mut tcp, &reply::command_timeout(&cfg.hostname)).await;
                    report.outcome = Outcome::Timeout("command");
                    return;
                }
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => n,
            };
            if first_read && chunk[0] == TLS_HANDSHAKE_RECORD {
                // No dialogue with a TLS ClientHello: it would only collect errors.
                report.outcome =
                    Outcome::ProtocolError("TLS ClientHello on a STARTTLS port".into());
                return;
            }
            first_read = false;
            report.bytes_from_client += n as u64;
            reader.feed(&chunk[..n]);
        };
        match dialogue.on_event(event) {
            Step::Reply(r) => {
                if write_reply(&mut tcp, &r).await.is_err() {
                    return;
                }
            }
            Step::Quit(r) => {
                let _ = write_reply(&mut tcp, &r).await;
                let _ = tcp.shutdown().await;
                return;
            }
            Step::Close { reply, reason } => {
                let _ = write_reply(&mut tcp, &reply).await;
                let _ = tcp.shutdown().await;
                report.outcome = Outcome::ProtocolError(reason.into());
                return;
            }
            Step::StartTls(r) => {
                if write_reply(&mut tcp, &r).await.is_err() {
                    return;
                }
                // Dropped here, before the handshake: never executed, never forwarded.
                let injected = reader.take_remaining();
                if !injected.is_empty() {
                    report.pipelined_discarded = injected.len() as u64;
                    tracing::warn!(
                        bytes = injected.len(),
                        verbs = %verbs(&injected),
                        "discarded bytes pipelined after STARTTLS"
                    );
                }
                return upgraded(tcp, peer, l, report).await;
            }
            Step::PassThrough(line) => {
                let mut pending = line;
                pending.extend_from_slice(b"\r\n");
                pending.extend_from_slice(&reader.take_remaining());
                return plaintext(tcp, peer, l, report, dialogue.greet().cloned(), pending).await;
            }
        }
    }
}

/// After `220 Ready to start TLS`: handshake, the client's first command, then the upstream.
async fn upgraded(tcp: ClientIo, peer: Peer, l: &ListenerRuntime, report: &mut SessionReport) {
    let cfg = &l.config;
    let Some(mut client) = Box::pin(super::handshake(tcp, l, report, Transport::Starttls)).await
    else {
        return;
    };
    // The upstream is contacted once the client speaks, so that an unavailable upstream is
    // the reply to its next command (normally EHLO).
    let mut first = vec![0u8; DIALOGUE_READ];
    let n = match timeout(cfg.limits.command_timeout, client.read(&mut first)).await {
        Err(_) => {
            let _ = write_reply(&mut client, &reply::command_timeout(&cfg.hostname)).await;
            report.outcome = Outcome::Timeout("command");
            return;
        }
        Ok(Ok(0)) | Ok(Err(_)) => return,
        Ok(Ok(n)) => n,
    };
    first.truncate(n);
    report.bytes_from_client += n as u64;
    let header = proxy_header(l.upstream.config.proxy_protocol, peer, report);
    let mut up = match Box::pin(connect_greeted(l, &header)).await {
        Ok(up) => up,
        Err(e) => {
            let _ = write_reply(&mut client, &e.reply(&cfg.hostname)).await;
            let _ = client.shutdown().await;
            report.outcome = Outcome::UpstreamFailed(e.to_string());
            return;
        }
    };
    report.upstream_addr = Some(up.addr);
    let mut smtp = SmtpStream::default();
    let r = relay::relay(
        &mut client,
        &mut up.stream,
        cfg.limits.idle_timeout,
        &mut smtp,
        first,
        &cfg.hostname,
    )
    .await;
    super::finish_relay(report, r);
}

/// Port 25 without STARTTLS: one coherent plaintext session through the upstream.
async fn plaintext(
    mut tcp: ClientIo,
    peer: Peer,
    l: &ListenerRuntime,
    report: &mut SessionReport,
    greet: Option<Greet>,
    pending: Vec<u8>,
) {
    let cfg = &l.config;
    report.transport = Transport::Plaintext;
    let header = proxy_header(l.upstream.config.proxy_protocol, peer, report);
    let mut up = match Box::pin(connect_greeted(l, &header)).await {
        Ok(up) => up,
        Err(e) => {
            let _ = write_reply(&mut tcp, &e.reply(&cfg.hostname)).await;
            report.outcome = Outcome::UpstreamFailed(e.to_string());
            return;
        }
    };
    report.upstream_addr = Some(up.addr);
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
        let failure = match timeout(l.upstream.config.connect_timeout, replay).await {
            Ok(Ok(span)) if span.code / 100 == 2 => None,
            Ok(Ok(span)) => Some(format!("replayed {} answered {}", greet.verb(), span.code)),
            Ok(Err(e)) => Some(format!("replaying {}: {e}", greet.verb())),
            Err(_) => Some(format!("timeout replaying {}", greet.verb())),
        };
        if let Some(reason) = failure {
            let _ = write_reply(&mut tcp, &reply::upstream_unavailable(&cfg.hostname)).await;
            report.outcome = Outcome::UpstreamFailed(reason);
            return;
        }
    }
    let mut smtp = SmtpStream::new(STARTTLS_AFTER_HANDOFF);
    let r = relay::relay(
        &mut tcp,
        &mut up.stream,
        cfg.limits.idle_timeout,
        &mut smtp,
        pending,
        &cfg.hostname,
    )
    .await;
    super::finish_relay(report, r);
}

/// Connects and requires a 2xx greeting (consumed, never forwarded on these paths).
async fn connect_greeted(
    l: &ListenerRuntime,
    header: &[u8],
) -> Result<upstream::Upstream, UpstreamError> {
    let up = upstream::connect(&l.upstream, header).await?;
    match up.greeting_code / 100 {
        2 => Ok(up),
        5 => {
            crate::metrics::metrics().upstream_failure(&l.upstream.config.name, "refused");
            // Only the reply itself, never bytes that followed it in the same read.
            Err(UpstreamError::Refused(
                up.greeting[..up.greeting_len].to_vec(),
            ))
        }
        _ => {
            crate::metrics::metrics().upstream_failure(&l.upstream.config.name, "greeting");
            Err(UpstreamError::Greeting(
                String::from_utf8_lossy(&up.greeting).trim_end().to_owned(),
            ))
        }
    }
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
