//! The relay after the hand-off: both directions in one task, following the SMTP stream
//! (`smtp::stream`) so STARTTLS is answered locally and stripped from EHLO replies.
//! Half-close: client EOF shuts the upstream's write side and the upstream's last replies
//! still reach the client; upstream EOF shuts the client's write side and gives the client
//! `UPSTREAM_CLOSED_LINGER` to close too. An idle timeout ends it when no byte moves, and a
//! write that makes no progress for the same time ends it too (a peer that stops reading
//! cannot pin the session: ST FT-8). While a DATA reply is awaited no client byte is read
//! (backpressure, bounded memory).
//!
//! Memory: reads go through one per-thread scratch buffer, borrowed only inside a single
//! `poll_read` call, so a session waiting for bytes holds no read buffer at all; the
//! session's own vectors are released after `RELEASE_AFTER` without traffic. An idle
//! relayed session costs its task, its two sockets' state and rustls' minimum.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::smtp::stream::SmtpStream;

/// The per-thread read scratch: several TLS records' plaintext, so one read drains what the
/// socket holds and one write forwards it (one constant per thread, not per session).
pub(crate) const RELAY_BUFFER: usize = 64 * 1024;

/// Without traffic for this long, a session gives its buffers back.
pub(crate) const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// After the upstream has closed (e.g. after its 221), how long the client may take to
/// close its side before the session ends anyway.
pub(crate) const UPSTREAM_CLOSED_LINGER: Duration = Duration::from_secs(2);

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; RELAY_BUFFER].into_boxed_slice());
}

/// Reads once from `r` into the end of `out`, through the thread's scratch buffer.
fn read_into<'a, R: AsyncRead + AsyncWrite + Unpin>(
    r: &'a mut R,
    out: &'a mut Vec<u8>,
) -> ReadWith<'a, R, impl FnMut(&[u8]) + 'a> {
    ReadWith {
        r,
        take: |bytes: &[u8]| out.extend_from_slice(bytes),
    }
}

/// Reads once from `r` through the thread's scratch buffer and hands what arrived to
/// `take` while the scratch is still borrowed: the relay runs the SMTP follower on it
/// there, so client bytes are not first copied into a session buffer.
fn read_with<R: AsyncRead + AsyncWrite + Unpin, F: FnMut(&[u8])>(
    r: &mut R,
    take: F,
) -> ReadWith<'_, R, F> {
    ReadWith { r, take }
}

struct ReadWith<'a, R, F> {
    r: &'a mut R,
    take: F,
}

impl<R: AsyncRead + AsyncWrite + Unpin, F: FnMut(&[u8]) + Unpin> Future for ReadWith<'_, R, F> {
    type Output = io::Result<usize>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(scratch);
            let read = Pin::new(&mut *this.r).poll_read(cx, &mut buf);
            if read.is_pending() {
                // TLS records rustls queued while reading without yielding data (the
                // no_renegotiation warning to a TLS 1.2 renegotiation, catalogue TL-9; a
                // KeyUpdate answer) only leave on a write or flush: send them now. A no-op
                // on plain TCP; an error here shows up on the next read.
                let _ = Pin::new(&mut *this.r).poll_flush(cx);
                return Poll::Pending;
            }
            ready!(read)?;
            (this.take)(buf.filled());
            Poll::Ready(Ok(buf.filled().len()))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RelayReport {
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
    pub end: RelayEnd,
    /// How the client closed its side, if it did.
    pub client_close: Option<ClientClose>,
}

/// How the client ended its side of the relay (the `client_close` log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientClose {
    /// A clean end of stream: TLS close_notify, or FIN in plaintext.
    Clean,
    /// TLS cut without close_notify (a truncation, catalogue TL-11).
    Truncated,
}

impl ClientClose {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Truncated => "truncated",
        }
    }
}

/// How the relay ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum RelayEnd {
    /// Both sides closed (a client leaving without TLS close_notify counts as closed).
    #[default]
    Closed,
    IdleTimeout,
    /// A socket error (reset, broken pipe) ended it.
    Reset,
    /// The upstream sent something that is not an SMTP reply (or an endless one).
    UpstreamProtocol(String),
    /// The proxy refused the client's DATA content (the smuggling guard's `reject`) and
    /// closed the session with a 421.
    Refused(&'static str),
}

/// Relays until both sides are done, an error, or `idle` without a byte either way.
/// `pending` holds client bytes already read but not yet processed.
pub(crate) async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    smtp: &mut SmtpStream,
    pending: Vec<u8>,
    hostname: &str,
) -> RelayReport
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut report = RelayReport::default();
    let mut held = pending;
    let mut from_upstream = Vec::new();
    let mut to_upstream = Vec::new();
    let mut to_client = Vec::new();
    let mut client_open = true;
    let mut upstream_shut = false;
    // False once the guard's `reject` closed the upstream mid-DATA: nothing more is read
    // from it or written to it.
    let mut upstream_open = true;
    // One timer for both the idle deadline and the buffer release; traffic only moves
    // `last`, and the timer is re-armed lazily when it fires early.
    let mut last = Instant::now();
    let mut released = false;
    let timer = tokio::time::sleep(RELEASE_AFTER);
    tokio::pin!(timer);
    let end = loop {
        if !held.is_empty() && smtp.wants_client_input() {
            let n = smtp.client_bytes(&held, &mut to_upstream, &mut to_client);
            held.drain(..n);
        }
        if smtp.take_abort_upstream() {
            // The MTA sees its connection end before the end of data: it discards the
            // partial message. The rest of the content is read and dropped by `smtp`.
            to_upstream.clear();
            upstream_open = false;
            upstream_shut = true;
            let _ = upstream.shutdown().await;
        }
        if !to_upstream.is_empty() && upstream_open {
            if let Err(end) = write(upstream, &to_upstream, idle).await {
                break end;
            }
            to_upstream.clear();
        }
        if !to_client.is_empty() {
            if let Err(end) = write(client, &to_client, idle).await {
                break end;
            }
            to_client.clear();
        }
        if smtp.is_closed() {
            let _ = write(client, &crate::smtp::reply::closing(hostname), idle).await;
            let _ = client.shutdown().await;
            break RelayEnd::Refused("bare line ending in DATA");
        }
        if !client_open && !upstream_open {
            // The client left while its refused content was being discarded.
            break RelayEnd::Closed;
        }
        if !client_open && held.is_empty() && !upstream_shut {
            upstream_shut = true;
            let _ = upstream.shutdown().await;
        }
        let read_client = client_open && held.is_empty() && smtp.wants_client_input();
        tokio::select! {
            r = read_with(client, |bytes: &[u8]| {
                // `held` is empty here: what the follower does not take now waits there.
                let n = smtp.client_bytes(bytes, &mut to_upstream, &mut to_client);
                held.extend_from_slice(&bytes[n..]);
            }), if read_client => match r {
                Ok(0) => {
                    client_open = false;
                    report.client_close = Some(ClientClose::Clean);
                }
                Ok(n) => {
                    report.bytes_from_client += n as u64;
                    (last, released) = (Instant::now(), false);
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    client_open = false;
                    report.client_close = Some(ClientClose::Truncated);
                }
                Err(_) => break RelayEnd::Reset,
            },
            r = read_into(upstream, &mut from_upstream), if upstream_open => match r {
                Ok(0) | Err(_) => {
                    let _ = client.shutdown().await;
                    if client_open {
                        linger(client).await;
                    }
                    break match r {
                        Ok(_) => RelayEnd::Closed,
                        Err(e) => from_io(&e),
                    };
                }
                Ok(n) => {
                    report.bytes_from_upstream += n as u64;
                    (last, released) = (Instant::now(), false);
                    let parsed = smtp.upstream_bytes(&from_upstream, &mut to_client);
                    from_upstream.clear();
                    if let Err(e) = parsed {
                        to_client.extend_from_slice(&crate::smtp::reply::upstream_unavailable(hostname));
                        let _ = write(client, &to_client, idle).await;
                        break RelayEnd::UpstreamProtocol(e.to_string());
                    }
                }
            },
            () = &mut timer => {
                let now = Instant::now();
                if now >= last + idle {
                    break RelayEnd::IdleTimeout;
                }
                if !released && now >= last + RELEASE_AFTER {
                    released = true;
                    for v in [&mut held, &mut from_upstream, &mut to_upstream, &mut to_client] {
                        v.shrink_to_fit();
                    }
                    smtp.release();
                }
                let next = if released { last + idle } else { last + RELEASE_AFTER };
                timer.as_mut().reset(next);
            }
        }
    };
    report.end = end;
    report
}

/// Writes all of `bytes`; no progress for `idle` ends the relay as idle.
async fn write<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    idle: Duration,
) -> Result<(), RelayEnd> {
    match tokio::time::timeout(idle, async {
        w.write_all(bytes).await?;
        w.flush().await
    })
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(from_io(&e)),
        Err(_) => Err(RelayEnd::IdleTimeout),
    }
}

/// Waits (bounded) for the client to close after the upstream did; its bytes go nowhere.
async fn linger<C: AsyncRead + AsyncWrite + Unpin>(client: &mut C) {
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(UPSTREAM_CLOSED_LINGER, async {
        while let Ok(n) = read_into(client, &mut sink).await {
            sink.clear();
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

fn from_io(e: &io::Error) -> RelayEnd {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        RelayEnd::Closed
    } else {
        RelayEnd::Reset
    }
}
