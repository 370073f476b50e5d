//! Supervisor: binds the listeners, runs their accept loops, reloads on SIGHUP, and on
//! SIGTERM/SIGINT stops accepting and lets sessions finish within `shutdown_grace`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::snapshot::{self, Snapshot};

/// Listen backlog: bursts of MTAs connecting at once are normal on port 25.
const BACKLOG: i32 = 1024;

/// A bound, listening socket for one configured listener.
pub struct Bound {
    pub name: String,
    pub addr: SocketAddr,
    listener: TcpListener,
}

/// Signal streams, registered before binding: SIGHUP's default action would kill us.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub fn register() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Binds every listener of the snapshot; the error names the listener.
pub fn bind_all(snapshot: &Snapshot) -> Result<Vec<Bound>, String> {
    let mut out = Vec::new();
    for (name, l) in &snapshot.listeners {
        let listener = bind(l.config.listen).map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::PermissionDenied => {
                    " (ports below 1024 need root or CAP_NET_BIND_SERVICE, e.g. \
                     AmbientCapabilities=CAP_NET_BIND_SERVICE in the systemd unit)"
                }
                io::ErrorKind::AddrInUse => {
                    " (another process listens there: `ss -ltnp` shows which; stop it or change the port)"
                }
                io::ErrorKind::AddrNotAvailable => {
                    " (no local interface has this address)"
                }
                _ => "",
            };
            format!(
                "{}: listeners.{name}.listen: cannot listen on {}: {e}{hint}",
                snapshot.config.path.display(),
                l.config.listen
            )
        })?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        out.push(Bound {
            name: name.clone(),
            addr,
            listener,
        });
    }
    Ok(out)
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Runs until SIGTERM/SIGINT, then drains. Returns when the process may exit 0.
pub async fn run(snapshot: Snapshot, bound: Vec<Bound>, mut signals: Signals) {
    let grace = snapshot.config.shutdown_grace;
    let current = Arc::new(ArcSwap::from_pointee(snapshot));
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut accept_loops = Vec::new();
    for b in bound {
        tracing::info!(listener = %b.name, address = %b.addr, "listening");
        accept_loops.push(tokio::spawn(crate::listener::serve(
            b.name,
            b.listener,
            current.clone(),
            tracker.clone(),
            stop.child_token(),
        )));
    }
    tracing::info!("ready");
    loop {
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.hup.recv() => reload(&current),
        }
    }
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        sessions = tracker.len(),
        "shutting down: no new connections"
    );
    stop.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            sessions = tracker.len(),
            "shutdown grace elapsed; cutting remaining sessions"
        );
    }
    tracing::info!("stopped");
}

/// Load + validate + build, then swap; on any error the old snapshot keeps serving.
fn reload(current: &ArcSwap<Snapshot>) {
    let path = current.load().config.path.clone();
    match crate::config::load(&path).and_then(snapshot::build) {
        Ok(next) => {
            current.store(Arc::new(next));
            tracing::info!(config = %path.display(), "reloaded");
        }
        Err(e) => tracing::error!(error = %e, "reload failed; keeping the previous configuration"),
    }
}
