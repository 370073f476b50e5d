//! `OwnTls`: a socket plus a `RecordLayer`, as `AsyncRead` + `AsyncWrite`, so the session
//! phases and the relay run unchanged over it.
//!
//! Reads go through one per-thread buffer (`RX_BUFFER` plus room for a partial record):
//! one `recv` takes everything the socket holds, up to `RX_BUFFER`, every complete record
//! is opened in place, and the plaintext is copied once into the caller's buffer. A
//! session keeps only a partial record's tail, and plaintext the caller had no room for
//! (only when it reads with a small buffer, e.g. before the hand-off). Writes seal into a
//! per-thread buffer and go out in one `send`; what the socket did not take waits in the
//! session (`out`), bounded by one write's worth, and is flushed before anything else.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::layer::{Fatal, MAX_RECORD, Opened, RecordLayer, alert};

/// How much one read may take from the socket (several records).
pub(crate) const RX_BUFFER: usize = 64 * 1024;
/// A session without traffic for this long drops its AEAD contexts at its next idle poll.
/// The relay polls once `relay::RELEASE_AFTER` after its last traffic, and our own last
/// write may come a little after that moment: half of it leaves the margin.
const EVICT_AFTER: Duration =
    Duration::from_millis(crate::relay::RELEASE_AFTER.as_millis() as u64 / 2);

/// The most plaintext one `poll_write` seals (the rest is the caller's to write again).
const TX_CHUNK: usize = 64 * 1024;

thread_local! {
    static RX: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_RECORD + RX_BUFFER].into_boxed_slice());
    static TX: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The read side's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// close_notify received: reads return end of stream.
    Closed,
    /// The stream ended without close_notify, or a record was refused: reads fail.
    Failed(io::ErrorKind),
}

#[derive(Debug)]
pub(crate) struct OwnTls<S> {
    io: S,
    layer: RecordLayer,
    /// Plaintext opened but not yet taken by the caller (freed when taken).
    plain: Vec<u8>,
    plain_at: usize,
    /// Sealed bytes the socket has not taken yet (freed when written).
    out: Vec<u8>,
    out_at: usize,
    read: ReadState,
    close_sent: bool,
    /// When bytes last moved either way.
    active: Instant,
}

impl<S> OwnTls<S> {
    /// `early` is plaintext the handshake already opened (records that came with the
    /// client's Finished).
    pub(crate) fn new(io: S, layer: RecordLayer, early: Vec<u8>) -> Self {
        let read = if layer.read_closed() {
            ReadState::Closed
        } else {
            ReadState::Open
        };
        Self {
            io,
            layer,
            plain: early,
            plain_at: 0,
            out: Vec::new(),
            out_at: 0,
            read,
            close_sent: false,
            active: Instant::now(),
        }
    }
}

fn fatal_error(f: Fatal) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, f)
}

impl<S: AsyncWrite + Unpin> OwnTls<S> {
    /// Writes what waits in `out`; `Ready(Ok)` once it is all gone.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.out = Vec::new();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Queues a fatal alert for `f` (best effort: the session ends anyway).
    fn refuse(&mut self, cx: &mut Context<'_>, f: Fatal) -> io::Error {
        if let Fatal::Send { alert, .. } = f {
            let _ = self.layer.seal_alert(alert, &mut self.out);
            let _ = self.poll_out(cx);
        }
        self.read = ReadState::Failed(io::ErrorKind::InvalidData);
        fatal_error(f)
    }

    /// Takes bytes from the socket and opens them; `Ready(Ok(()))` once plaintext waits in
    /// `plain` or the read side ended.
    fn poll_fill(&mut self, cx: &mut Context<'_>, dst: &mut ReadBuf<'_>) -> Poll<io::Result<()>>
    where
        S: AsyncRead,
    {
        loop {
            let kept = self.layer.tail_len();
            let step =
                RX.with_borrow_mut(|rx| -> Poll<io::Result<Option<Result<Opened, Fatal>>>> {
                    let mut fresh = ReadBuf::new(&mut rx[kept..kept + RX_BUFFER]);
                    ready!(Pin::new(&mut self.io).poll_read(cx, &mut fresh))?;
                    let n = fresh.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(None));
                    }
                    // Decrypted straight into the caller's buffer where records fit;
                    // what does not fit waits in `plain`.
                    let room = dst.initialize_unfilled();
                    let opened = self.layer.open(&mut rx[..kept + n], room);
                    Poll::Ready(Ok(Some(opened.inspect(|o| {
                        dst.advance(o.direct);
                        let plain = &rx[..o.plain];
                        let now = plain.len().min(dst.remaining());
                        dst.put_slice(&plain[..now]);
                        self.plain.extend_from_slice(&plain[now..]);
                    }))))
                });
            match ready!(step) {
                Err(e) => {
                    self.read = ReadState::Failed(e.kind());
                    return Poll::Ready(Err(e));
                }
                Ok(None) => {
                    // TL-11: an end of stream without close_notify is a truncation.
                    self.read = ReadState::Failed(io::ErrorKind::UnexpectedEof);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed connection without sending TLS close_notify",
                    )));
                }
                Ok(Some(Err(f))) => return Poll::Ready(Err(self.refuse(cx, f))),
                Ok(Some(Ok(opened))) => {
                    if self.layer.owes_record() {
                        // A KeyUpdate answer leaves now, not with the next reply.
                        if let Err(f) = self.layer.seal_owed(&mut self.out) {
                            return Poll::Ready(Err(self.refuse(cx, f)));
                        }
                        if let Poll::Ready(Err(e)) = self.poll_out(cx) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    if opened.closed {
                        self.read = ReadState::Closed;
                    }
                    if opened.direct > 0 || opened.plain > 0 || opened.closed {
                        return Poll::Ready(Ok(()));
                    }
                    // Only a partial record, a KeyUpdate or an empty record: read on.
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for OwnTls<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.plain_at < this.plain.len() {
            let n = (this.plain.len() - this.plain_at).min(buf.remaining());
            buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
            this.plain_at += n;
            if this.plain_at == this.plain.len() {
                this.plain = Vec::new();
                this.plain_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        match this.read {
            ReadState::Closed => Poll::Ready(Ok(())),
            ReadState::Failed(kind) => Poll::Ready(Err(kind.into())),
            ReadState::Open if buf.remaining() == 0 => Poll::Ready(Ok(())),
            ReadState::Open => {
                let read = this.poll_fill(cx, buf);
                if read.is_ready() {
                    this.active = Instant::now();
                } else if this.active.elapsed() >= EVICT_AFTER {
                    this.layer.evict_keys();
                }
                read
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OwnTls<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_out(cx))?;
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let take = buf.len().min(TX_CHUNK);
        this.active = Instant::now();
        let sent = TX.with_borrow_mut(|tx| {
            tx.clear();
            this.layer.seal(&buf[..take], tx).map_err(fatal_error)?;
            // One send for every record; the socket keeps what it takes, `out` the rest.
            let n = match Pin::new(&mut this.io).poll_write(cx, tx) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => 0,
            };
            // `tx` never grows past one chunk's records (seal reserves exactly that).
            this.out.extend_from_slice(&tx[n..]);
            Ok(())
        });
        sent?;
        Poll::Ready(Ok(take))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.close_sent {
            this.close_sent = true;
            let _ = this.poll_out(cx);
            this.layer
                .seal_alert(alert::CLOSE_NOTIFY, &mut this.out)
                .map_err(fatal_error)?;
        }
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
