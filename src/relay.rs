//! Byte relay between the client and the upstream: both directions in one task with
//! half-close (tokio's `copy_bidirectional` semantics: EOF on one side shuts down the
//! write half of the other, the opposite direction keeps flowing), an idle timeout when no
//! byte moves either way, and byte counts that survive a timeout.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Per-direction copy buffer. 8 KiB matches rustls' plaintext chunking and keeps the
/// buffers small; they exist only while a session is in the relay phase.
pub const RELAY_BUFFER: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayReport {
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
    pub end: RelayEnd,
}

/// How the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayEnd {
    /// Both sides closed (a client leaving without TLS close_notify counts as closed).
    #[default]
    Closed,
    IdleTimeout,
    /// A socket error (reset, broken pipe) ended it.
    Reset,
}

/// Activity clock: milliseconds since `start` of the last byte read on either side.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that counts the bytes read from it and notes activity.
struct Tracked<'a, S> {
    inner: &'a mut S,
    bytes_read: &'a AtomicU64,
    activity: &'a Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Relays until both directions are done, an error, or `idle` without a byte either way.
pub async fn relay<C, U>(client: &mut C, upstream: &mut U, idle: Duration) -> RelayReport
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let from_client = AtomicU64::new(0);
    let from_upstream = AtomicU64::new(0);
    let end = {
        let mut c = Tracked {
            inner: client,
            bytes_read: &from_client,
            activity: &activity,
        };
        let mut u = Tracked {
            inner: upstream,
            bytes_read: &from_upstream,
            activity: &activity,
        };
        let copy =
            tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, RELAY_BUFFER, RELAY_BUFFER);
        let watchdog = async {
            loop {
                let deadline = activity.last() + idle;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            }
        };
        tokio::select! {
            res = copy => match res {
                Ok(_) => RelayEnd::Closed,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => RelayEnd::Closed,
                Err(_) => RelayEnd::Reset,
            },
            () = watchdog => RelayEnd::IdleTimeout,
        }
    };
    RelayReport {
        bytes_from_client: from_client.load(Ordering::Relaxed),
        bytes_from_upstream: from_upstream.load(Ordering::Relaxed),
        end,
    }
}
