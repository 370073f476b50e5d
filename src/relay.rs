//! Byte relay between the client and the upstream: both directions in one task with
//! half-close (EOF on one side shuts down the write half of the other, the opposite
//! direction keeps flowing), an idle timeout when no
//! byte moves either way, and byte counts that survive a timeout.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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

/// A read half that counts the bytes read from it and notes activity.
struct Tracked<'a, S> {
    inner: S,
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
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        res
    }
}

/// After the upstream has closed (e.g. after its 221), how long the client may take to
/// close its side before the session ends anyway.
pub const UPSTREAM_CLOSED_LINGER: Duration = Duration::from_secs(2);

/// Relays until both directions are done, an error, or `idle` without a byte either way.
/// Client EOF: the upstream's write half is shut down and its remaining replies still reach
/// the client. Upstream EOF: the client's write half is shut down and the client gets
/// `UPSTREAM_CLOSED_LINGER` to close too.
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
        let (cr, mut cw) = tokio::io::split(client);
        let (ur, mut uw) = tokio::io::split(upstream);
        let mut cr = Tracked {
            inner: cr,
            bytes_read: &from_client,
            activity: &activity,
        };
        let mut ur = Tracked {
            inner: ur,
            bytes_read: &from_upstream,
            activity: &activity,
        };
        let c2u = async {
            let r = copy(&mut cr, &mut uw).await;
            let _ = uw.shutdown().await;
            r
        };
        let u2c = async {
            let r = copy(&mut ur, &mut cw).await;
            let _ = cw.shutdown().await;
            r
        };
        let watchdog = async {
            loop {
                let deadline = activity.last() + idle;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            }
        };
        tokio::pin!(c2u, u2c, watchdog);
        tokio::select! {
            () = &mut watchdog => RelayEnd::IdleTimeout,
            r = &mut c2u => match r {
                // Half-close: the upstream's last replies still reach the client.
                Ok(()) => tokio::select! {
                    () = &mut watchdog => RelayEnd::IdleTimeout,
                    r = &mut u2c => end_of(r),
                },
                Err(e) => end_of(Err(e)),
            },
            r = &mut u2c => match r {
                Ok(()) => match tokio::time::timeout(UPSTREAM_CLOSED_LINGER, &mut c2u).await {
                    Ok(r) => end_of(r),
                    Err(_) => RelayEnd::Closed,
                },
                Err(e) => end_of(Err(e)),
            },
        }
    };
    RelayReport {
        bytes_from_client: from_client.load(Ordering::Relaxed),
        bytes_from_upstream: from_upstream.load(Ordering::Relaxed),
        end,
    }
}

fn end_of(r: io::Result<()>) -> RelayEnd {
    match r {
        Ok(()) => RelayEnd::Closed,
        // A client leaving without TLS close_notify is the common way SMTP sessions end.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => RelayEnd::Closed,
        Err(_) => RelayEnd::Reset,
    }
}

/// Copies until EOF with one `RELAY_BUFFER`, flushing after each write.
async fn copy<R, W>(r: &mut R, w: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
    }
}
