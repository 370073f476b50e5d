//! Supervisor: binds the listeners and runs their accept loops; reloads on SIGHUP and on
//! changed files (the listener set is diffed: new or moved listeners are bound before the
//! swap, removed ones unbound after it, untouched ones keep their socket); on SIGTERM/SIGINT
//! stops accepting, answers 421 to sessions still in the pre-TLS dialogue and lets the
//! others finish within `shutdown_grace`.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme::AcmeManager;
use crate::health::Health;
use crate::http::Status;
use crate::listener::Shared;
use crate::metrics::metrics;
use crate::snapshot::Snapshot;
use crate::watch::{self, FileWatcher};

mod reload;
use reload::{Cause, ReloadResult, acme_specs, publish_series, reload};

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
    snapshot
        .listeners
        .iter()
        .map(|(name, l)| bind_one(snapshot, name, l.config.listen))
        .collect()
}

fn bind_one(snapshot: &Snapshot, name: &str, listen: SocketAddr) -> Result<Bound, String> {
    {
        let listener = bind(listen).map_err(|e| {
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
                "{}: listeners.{name}.listen: cannot listen on {listen}: {e}{hint}",
                snapshot.config.path.display(),
            )
        })?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        Ok(Bound {
            name: name.to_owned(),
            addr,
            listener,
        })
    }
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

/// One bound listener with its accept loop.
struct Running {
    /// The configured address (port 0 stays 0), compared on reload.
    listen: SocketAddr,
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn start(
    shared: &Arc<Shared>,
    parent: &CancellationToken,
    b: Bound,
    listen: SocketAddr,
) -> Running {
    tracing::info!(listener = %b.name, address = %b.addr, "listening");
    let stop = parent.child_token();
    let task = tokio::spawn(crate::listener::serve(
        b.name,
        b.listener,
        shared.clone(),
        stop.clone(),
    ));
    Running {
        listen,
        addr: b.addr,
        stop,
        task,
    }
}

/// Binds `metrics.listen` if configured; the error names the key.
pub fn bind_metrics(snapshot: &Snapshot) -> Result<Option<(TcpListener, SocketAddr)>, String> {
    let Some(addr) = snapshot.config.metrics_listen else {
        return Ok(None);
    };
    let listener = bind(addr).map_err(|e| {
        format!(
            "{}: metrics.listen: cannot listen on {addr}: {e}",
            snapshot.config.path.display()
        )
    })?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    Ok(Some((listener, bound)))
}

/// Runs until SIGTERM/SIGINT, then drains. Returns when the process may exit 0.
pub async fn run(
    acme: Arc<AcmeManager>,
    snapshot: Snapshot,
    bound: Vec<Bound>,
    metrics_listener: Option<(TcpListener, SocketAddr)>,
    mut signals: Signals,
    default_max_connections: usize,
) {
    let grace = snapshot.config.shutdown_grace;
    let health = Arc::new(Health::default());
    health.sync(&snapshot);
    metrics().reload_results(&ReloadResult::ALL.map(ReloadResult::as_str));
    publish_series(&snapshot);
    snapshot.store.publish_expiry();
    acme.sync(&acme_specs(&snapshot), &crate::tls::provider());
    let shared = Arc::new(Shared {
        current: Arc::new(ArcSwap::from_pointee(snapshot)),
        tracker: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        global: Arc::default(),
        default_max_connections,
        deny_file: Arc::default(),
    });
    let deny_watch = {
        let current = shared.current.clone();
        tokio::spawn(crate::abuse::watch_deny_file(
            shared.deny_file.clone(),
            move || current.load().config.deny_file.clone(),
        ))
    };
    let stop_all = CancellationToken::new();
    let mut running = BTreeMap::new();
    for b in bound {
        let listen = shared.current.load().listeners[&b.name].config.listen;
        running.insert(b.name.clone(), start(&shared, &stop_all, b, listen));
    }
    let (tx, mut changes) = mpsc::unbounded_channel();
    let mut watcher = match FileWatcher::start(tx) {
        Ok(mut w) => {
            w.watch(watch::files_of(&shared.current.load().config));
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP");
            None
        }
    };
    let status = Arc::new(Status {
        current: shared.current.clone(),
        health: health.clone(),
        serving: AtomicBool::new(true),
    });
    let http_stop = CancellationToken::new();
    if let Some((listener, addr)) = metrics_listener {
        tracing::info!(address = %addr, "metrics listening");
        tokio::spawn(crate::http::serve(
            listener,
            status.clone(),
            http_stop.clone(),
        ));
    }
    tracing::info!("ready");
    loop {
        let cause = tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.hup.recv() => Cause::Sighup,
            Some(()) = changes.recv() => {
                while changes.try_recv().is_ok() {}
                Cause::FileChange
            }
        };
        reload(
            &shared,
            &health,
            &acme,
            &stop_all,
            &mut running,
            watcher.as_mut(),
            cause,
        )
        .await;
    }
    status.serving.store(false, Ordering::Release);
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        sessions = shared.tracker.len(),
        "shutting down: no new connections"
    );
    drop(watcher);
    deny_watch.abort();
    stop_all.cancel();
    for (_, r) in running {
        let _ = r.task.await;
    }
    // Sessions still in the pre-TLS dialogue answer 421 4.3.0 and close.
    shared.shutdown.cancel();
    shared.tracker.close();
    if tokio::time::timeout(grace, shared.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = shared.tracker.len(),
            "shutdown grace elapsed; cutting remaining sessions"
        );
    }
    http_stop.cancel();
    drop(health);
    tracing::info!("stopped");
}
