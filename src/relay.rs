//! The relay after the hand-off: both directions in one task, following the SMTP stream
//! (`smtp::stream`) so STARTTLS is answered locally and stripped from EHLO replies.
//! Half-close: client EOF shuts the upstream's write side and the upstream's last replies
//! still reach the client; upstream EOF shuts the client's write side and gives the client
//! `UPSTREAM_CLOSED_LINGER` to close too. An idle timeout ends it when no byte moves.
//! While a DATA reply is awaited no client byte is read (backpressure, bounded memory).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::smtp::stream::SmtpStream;

/// Per-direction read buffer, allocated only while the session is in the relay.
pub const RELAY_BUFFER: usize = 8 * 1024;

/// After the upstream has closed (e.g. after its 221), how long the client may take to
/// close its side before the session ends anyway.
pub const UPSTREAM_CLOSED_LINGER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RelayReport {
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
    pub end: RelayEnd,
}

/// How the relay ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RelayEnd {
    /// Both sides closed (a client leaving without TLS close_notify counts as closed).
    #[default]
    Closed,
    IdleTimeout,
    /// A socket error (reset, broken pipe) ended it.
    Reset,
    /// The upstream sent something that is not an SMTP reply (or an endless one).
    UpstreamProtocol(String),
}

/// Relays until both sides are done, an error, or `idle` without a byte either way.
/// `pending` holds client bytes already read but not yet processed.
pub async fn relay<C, U>(
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
    let mut cbuf = vec![0u8; RELAY_BUFFER];
    let mut ubuf = vec![0u8; RELAY_BUFFER];
    let mut to_upstream = Vec::new();
    let mut to_client = Vec::new();
    let mut client_open = true;
    let mut upstream_shut = false;
    let mut deadline = Instant::now() + idle;
    let end = loop {
        if !held.is_empty() && smtp.wants_client_input() {
            let n = smtp.client_bytes(&held, &mut to_upstream, &mut to_client);
            held.drain(..n);
        }
        if !to_upstream.is_empty() {
            if let Err(e) = write(upstream, &to_upstream).await {
                break from_io(&e);
            }
            to_upstream.clear();
        }
        if !to_client.is_empty() {
            if let Err(e) = write(client, &to_client).await {
                break from_io(&e);
            }
            to_client.clear();
        }
        if !client_open && held.is_empty() && !upstream_shut {
            upstream_shut = true;
            let _ = upstream.shutdown().await;
        }
        let read_client = client_open && held.is_empty() && smtp.wants_client_input();
        tokio::select! {
            r = client.read(&mut cbuf), if read_client => match r {
                Ok(0) => client_open = false,
                Ok(n) => {
                    report.bytes_from_client += n as u64;
                    held.extend_from_slice(&cbuf[..n]);
                    deadline = Instant::now() + idle;
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => client_open = false,
                Err(_) => break RelayEnd::Reset,
            },
            r = upstream.read(&mut ubuf) => match r {
                Ok(0) | Err(_) => {
                    let _ = client.shutdown().await;
                    if client_open {
                        linger(client, &mut cbuf).await;
                    }
                    break match r {
                        Ok(_) => RelayEnd::Closed,
                        Err(e) => from_io(&e),
                    };
                }
                Ok(n) => {
                    report.bytes_from_upstream += n as u64;
                    deadline = Instant::now() + idle;
                    if let Err(e) = smtp.upstream_bytes(&ubuf[..n], &mut to_client) {
                        to_client.extend_from_slice(&crate::smtp::reply::upstream_unavailable(hostname));
                        let _ = write(client, &to_client).await;
                        break RelayEnd::UpstreamProtocol(e.to_string());
                    }
                }
            },
            () = tokio::time::sleep_until(deadline) => break RelayEnd::IdleTimeout,
        }
    };
    report.end = end;
    report
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Waits (bounded) for the client to close after the upstream did; its bytes go nowhere.
async fn linger<C: AsyncRead + Unpin>(client: &mut C, buf: &mut [u8]) {
    let _ = tokio::time::timeout(UPSTREAM_CLOSED_LINGER, async {
        while let Ok(n) = client.read(buf).await {
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
