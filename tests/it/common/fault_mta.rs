//! A scripted MTA for fault injection (the fault sweep, `tests/it/fault_sweep.rs`), in the
//! manner of Postfix's `smtp-sink` fault options: never greet, greet with a refusal, close
//! (FIN or RST) at a command or inside DATA, stop reading inside DATA, pad replies to move
//! many bytes, half-close after QUIT. It records each proxied connection (header, command
//! lines, message content, when the proxy closed it). Health probes (PROXY v2 LOCAL) are
//! greeted and answered but never recorded, whatever the fault.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::IO_TIMEOUT;

/// What the MTA does wrong. Every connection of one `FaultMta` gets the same fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Behaves (the control case).
    None,
    /// Reads the PROXY header, then never writes a byte (`smtp-sink -W command:delay`).
    NeverGreet,
    /// Greets with this reply (e.g. a 554) and answers every command but QUIT with it too.
    Greeting(&'static str),
    /// On the command with this verb (`"."`: the end of DATA) writes `reply` (may be
    /// empty), then closes: FIN, or RST when `rst` (`smtp-sink -q`/`-Q`/`-A`).
    CloseAt {
        verb: &'static str,
        reply: &'static str,
        rst: bool,
    },
    /// Inside DATA, once `after` content bytes have arrived: closes (FIN, or RST).
    CloseInData { after: usize, rst: bool },
    /// After `354` stops reading until `FaultMta::resume`, then drains to EOF.
    StopReadingInData,
    /// Every `250` reply padded to this many bytes; after QUIT's `221` the write side is
    /// shut (half-close) and whatever still arrives is counted in `after_quit`.
    PaddedReplies(usize),
}

/// What one proxied connection carried.
#[derive(Debug, Clone)]
pub struct FaultConn {
    pub opened_at: Instant,
    /// The raw PROXY header bytes.
    pub header: Vec<u8>,
    /// Command lines as received, CRLF stripped (message content is in `content`).
    pub lines: Vec<String>,
    /// Bytes received inside DATA so far (all messages), each CRLF.CRLF included.
    pub content_bytes: usize,
    /// Messages whose CRLF.CRLF arrived (whatever the reply to it was).
    pub messages: usize,
    /// Bytes received after our 221 (PaddedReplies).
    pub after_quit: usize,
    /// When the proxy's side reached EOF or an error (None: still open, or we closed first).
    pub closed_at: Option<Instant>,
}

pub struct FaultMta {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<FaultConn>>>,
    resume: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultMta {
    pub async fn start(fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<FaultConn>>> = Arc::default();
        let resume = Arc::new(Notify::new());
        let (shared, go) = (conns.clone(), resume.clone());
        let task = tokio::spawn(async move {
            // Connection tasks live in the set: dropping the MTA drops their sockets.
            let mut set = JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    Some(_) = set.join_next(), if !set.is_empty() => continue,
                };
                let Ok((stream, _)) = accepted else { return };
                let (shared, go) = (shared.clone(), go.clone());
                set.spawn(async move {
                    let mut index = None;
                    let r = conn(stream, fault, &shared, &go, &mut index).await;
                    // A socket error (e.g. the proxy reset a write we were blocked in) is
                    // the proxy's side ending too.
                    if let (Err(_), Some(i)) = (r, index) {
                        update(&shared, i, |c| {
                            c.closed_at.get_or_insert_with(Instant::now);
                        });
                    }
                });
            }
        });
        Self {
            addr,
            conns,
            resume,
            task,
        }
    }

    pub fn conns(&self) -> Vec<FaultConn> {
        self.conns.lock().unwrap().clone()
    }

    /// Lets connections held by `StopReadingInData` read again (they drain to EOF).
    pub fn resume(&self) {
        self.resume.notify_waiters();
    }

    /// Polls (bounded by `within`) until connection `index` exists and `pred` holds for it.
    pub async fn wait_conn(
        &self,
        index: usize,
        within: Duration,
        pred: impl Fn(&FaultConn) -> bool,
    ) -> FaultConn {
        let deadline = Instant::now() + within;
        loop {
            if let Some(c) = self.conns().get(index).filter(|c| pred(c)) {
                return c.clone();
            }
            assert!(
                Instant::now() < deadline,
                "fault MTA: connection {index} not as expected within {within:?}: {:?}",
                self.conns()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until connection `index` has been closed by the proxy; returns when.
    pub async fn wait_closed(&self, index: usize, within: Duration) -> Instant {
        self.wait_conn(index, within, |c| c.closed_at.is_some())
            .await
            .closed_at
            .unwrap()
    }
}

impl Drop for FaultMta {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn update(shared: &Mutex<Vec<FaultConn>>, i: usize, f: impl FnOnce(&mut FaultConn)) {
    f(&mut shared.lock().unwrap()[i]);
}

/// Closes with a TCP RST (SO_LINGER 0).
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// Reads once, bounded by `IO_TIMEOUT`; `Ok(0)` is EOF, `Err` a socket error or timeout.
async fn read_some(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut chunk))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "fault MTA read"))??;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Reads until EOF (or error) and records when; returns the bytes read.
async fn drain(s: &mut TcpStream, shared: &Mutex<Vec<FaultConn>>, i: usize) -> usize {
    let mut total = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match read_some(s, &mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return total,
            Err(_) => break,
        }
    }
    update(shared, i, |c| c.closed_at = Some(Instant::now()));
    total
}

async fn conn(
    mut s: TcpStream,
    fault: Fault,
    shared: &Mutex<Vec<FaultConn>>,
    resume: &Notify,
    index: &mut Option<usize>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    // The PROXY header (v2 from the proxy's sessions, v2 LOCAL from its health probe).
    let probe = loop {
        match ppp::HeaderResult::parse(&buf) {
            r if ppp::PartialResult::is_incomplete(&r) => {}
            ppp::HeaderResult::V2(Ok(h)) => {
                let n = h.len();
                let probe = h.command == ppp::v2::Command::Local;
                let header = buf.drain(..n).collect::<Vec<u8>>();
                if probe {
                    break None;
                }
                let mut c = shared.lock().unwrap();
                c.push(FaultConn {
                    opened_at: Instant::now(),
                    header,
                    lines: Vec::new(),
                    content_bytes: 0,
                    messages: 0,
                    after_quit: 0,
                    closed_at: None,
                });
                *index = Some(c.len() - 1);
                break *index;
            }
            other => panic!("fault MTA: no PROXY v2 header: {other:?}"),
        }
        if read_some(&mut s, &mut buf).await? == 0 {
            return Ok(());
        }
    };
    let Some(i) = probe else {
        s.write_all(b"220 fault.mta ESMTP\r\n").await?;
        let _ = read_some(&mut s, &mut buf).await;
        s.write_all(b"221 2.0.0 bye\r\n").await?;
        return Ok(());
    };
    match fault {
        Fault::NeverGreet => {
            drain(&mut s, shared, i).await;
            return Ok(());
        }
        Fault::Greeting(g) => s.write_all(g.as_bytes()).await?,
        _ => s.write_all(b"220 fault.mta ESMTP\r\n").await?,
    }
    // Inside DATA: how much of CRLF.CRLF has been matched (the CRLF before a first "."
    // line belongs to the terminator, hence 2 at the start).
    let mut data: Option<usize> = None;
    loop {
        let mut next = Next::Go;
        while next == Next::Go && !buf.is_empty() {
            if let Some(matched) = data.as_mut() {
                let mut used = 0;
                let mut ended = false;
                for &b in &buf {
                    used += 1;
                    *matched = if b == END_OF_DATA[*matched] {
                        *matched + 1
                    } else if b == b'\r' {
                        1
                    } else {
                        0
                    };
                    if *matched == END_OF_DATA.len() {
                        ended = true;
                        break;
                    }
                }
                buf.drain(..used);
                update(shared, i, |c| c.content_bytes += used);
                let total = shared.lock().unwrap()[i].content_bytes;
                if let Fault::CloseInData { after, rst } = fault
                    && total >= after
                {
                    next = if rst { Next::Reset } else { Next::Close };
                } else if ended {
                    data = None;
                    update(shared, i, |c| c.messages += 1);
                    next = answer(&mut s, fault, shared, i, ".").await?;
                }
            } else if let Some(pos) = find(&buf, b"\r\n") {
                let line = String::from_utf8_lossy(&buf[..pos]).into_owned();
                buf.drain(..pos + 2);
                update(shared, i, |c| c.lines.push(line.clone()));
                next = answer(&mut s, fault, shared, i, &line).await?;
                if next == Next::Go
                    && line.eq_ignore_ascii_case("DATA")
                    && !matches!(fault, Fault::Greeting(_))
                {
                    if fault == Fault::StopReadingInData {
                        resume.notified().await;
                        drain(&mut s, shared, i).await;
                        return Ok(());
                    }
                    data = Some(2);
                }
            } else {
                break;
            }
        }
        match next {
            Next::Go => {}
            Next::Done => return Ok(()),
            Next::Close => {
                s.shutdown().await?;
                drain(&mut s, shared, i).await;
                return Ok(());
            }
            Next::Reset => {
                reset(s);
                return Ok(());
            }
        }
        match read_some(&mut s, &mut buf).await {
            Ok(0) | Err(_) => {
                update(shared, i, |c| c.closed_at = Some(Instant::now()));
                return Ok(());
            }
            Ok(_) => {}
        }
    }
}

const END_OF_DATA: &[u8; 5] = b"\r\n.\r\n";

/// What the connection does after a command was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Go,
    /// Over (already closed or drained).
    Done,
    /// Close with FIN, then drain to EOF.
    Close,
    /// Close with RST.
    Reset,
}

/// Answers one command line (`"."`: the end of DATA).
async fn answer(
    s: &mut TcpStream,
    fault: Fault,
    shared: &Mutex<Vec<FaultConn>>,
    i: usize,
    line: &str,
) -> std::io::Result<Next> {
    let upper = line.to_ascii_uppercase();
    let verb = upper.split(' ').next().unwrap_or_default();
    if let Fault::CloseAt {
        verb: at,
        reply,
        rst,
    } = fault
        && verb == at
    {
        s.write_all(reply.as_bytes()).await?;
        return Ok(if rst { Next::Reset } else { Next::Close });
    }
    let reply: Vec<u8> = match (fault, verb) {
        (_, "QUIT") => {
            s.write_all(b"221 2.0.0 bye\r\n").await?;
            if let Fault::PaddedReplies(_) = fault {
                // Half-close: our side is done, the proxy's may still send.
                s.shutdown().await?;
                let n = drain(s, shared, i).await;
                update(shared, i, |c| c.after_quit = n);
                return Ok(Next::Done);
            }
            return Ok(Next::Close);
        }
        (Fault::Greeting(g), _) => g.as_bytes().to_vec(),
        (_, "EHLO") => {
            b"250-fault.mta\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n".to_vec()
        }
        (_, "DATA") => b"354 go ahead\r\n".to_vec(),
        (_, ".") => b"250 2.0.0 queued\r\n".to_vec(),
        (Fault::PaddedReplies(len), _) => {
            let mut r = b"250 2.0.0 ok ".to_vec();
            r.resize(len.max(r.len() + 2) - 2, b'x');
            r.extend_from_slice(b"\r\n");
            r
        }
        _ => b"250 2.0.0 ok\r\n".to_vec(),
    };
    s.write_all(&reply).await?;
    Ok(Next::Go)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
