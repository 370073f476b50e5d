//! The `Supervisor` owns what runs beside the sessions: the current snapshot, health, ACME,
//! the status server, the running listeners and the file watcher. `run` drives it with
//! values, not signals (mini-redis's `server::run(listener, shutdown)` is the model): a
//! shutdown future and a channel of reload requests, which `Triggers::from_signals` makes
//! from SIGTERM/SIGINT and SIGHUP. Start-up and reload adopt a snapshot the same way
//! (`adopt`); a reload diffs the listener set (new or moved listeners are bound before the
//! swap, removed ones unbound after it, untouched ones keep their socket); `drain` stops
//! accepting, answers 421 to sessions still in the pre-TLS dialogue and lets the others
//! finish within `shutdown_grace`.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
use reload::{Cause, acme_specs, reload};

/// Listen backlog: bursts of MTAs connecting at once are normal on port 25.
const BACKLOG: i32 = 1024;

/// A bound, listening socket for one configured listener.
pub struct Bound {
    pub name: String,
    pub addr: SocketAddr,
    listener: TcpListener,
}

/// What drives `run` from outside: a future that completes when the proxy must stop, and
/// reload requests.
pub struct Triggers {
    pub shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    pub reload: mpsc::UnboundedReceiver<()>,
}

impl Triggers {
    /// SIGTERM or SIGINT stop, SIGHUP reloads. Registered before binding: SIGHUP's
    /// default action would kill us.
    pub fn from_signals() -> io::Result<Self> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup: Signal = signal(SignalKind::hangup())?;
        let (tx, reload) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if tx.send(()).is_err() {
                    break;
                }
            }
        });
        let shutdown = Box::pin(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        Ok(Self { shutdown, reload })
    }
}

/// What `run` starts from: the first snapshot with its listeners (and metrics) bound.
pub struct Start {
    acme: Arc<AcmeManager>,
    snapshot: Snapshot,
    bound: Vec<Bound>,
    metrics: Option<(TcpListener, SocketAddr)>,
}

impl Start {
    /// Binds every listener and the metrics address; the error names the key.
    pub fn bind(acme: Arc<AcmeManager>, snapshot: Snapshot) -> Result<Self, String> {
        let bound = bind_all(&snapshot)?;
        let metrics = bind_metrics(&snapshot)?;
        Ok(Self {
            acme,
            snapshot,
            bound,
            metrics,
        })
    }
}

/// Binds every listener of the snapshot; the error names the listener.
fn bind_all(snapshot: &Snapshot) -> Result<Vec<Bound>, String> {
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

fn start_loop(
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
fn bind_metrics(snapshot: &Snapshot) -> Result<Option<(TcpListener, SocketAddr)>, String> {
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

/// Runs until `triggers.shutdown`, reloading on each request and on changed files, then
/// drains. Returns when the process may exit 0.
pub async fn run(start: Start, mut triggers: Triggers) {
    let (mut supervisor, mut changes) = Supervisor::start(start);
    tracing::info!("ready");
    loop {
        let cause = tokio::select! {
            () = &mut triggers.shutdown => break,
            Some(()) = triggers.reload.recv() => Cause::Sighup,
            Some(()) = changes.recv() => {
                while changes.try_recv().is_ok() {}
                Cause::FileChange
            }
        };
        supervisor.reload(cause).await;
    }
    supervisor.drain().await;
}

/// Everything the proxy runs beside its sessions, owned in one place.
pub(crate) struct Supervisor {
    shared: Arc<Shared>,
    health: Arc<Health>,
    acme: Arc<AcmeManager>,
    status: Arc<Status>,
    /// Parent of every accept loop's stop token.
    stop_all: CancellationToken,
    running: BTreeMap<String, Running>,
    watcher: Option<FileWatcher>,
    deny_watch: JoinHandle<()>,
    http_stop: CancellationToken,
}

impl Supervisor {
    /// Adopts the first snapshot, starts the accept loops, the watcher, the deny-file
    /// watch and the status server. Returns the watcher's change events.
    fn start(start: Start) -> (Self, mpsc::UnboundedReceiver<()>) {
        let Start {
            acme,
            snapshot,
            bound,
            metrics: metrics_listener,
        } = start;
        metrics().reload_results();
        let health = Arc::new(Health::default());
        adopt(&snapshot, &health, &acme);
        let shared = Arc::new(Shared {
            current: Arc::new(ArcSwap::from_pointee(snapshot)),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            global: Arc::default(),
            deny_file: Arc::default(),
        });
        let deny_watch = {
            let current = shared.current.clone();
            tokio::spawn(crate::admission::abuse::watch_deny_file(
                shared.deny_file.clone(),
                move || current.load().config.deny_file.clone(),
            ))
        };
        let stop_all = CancellationToken::new();
        let mut running = BTreeMap::new();
        for b in bound {
            let listen = shared.current.load().listeners[&b.name].config.listen;
            running.insert(b.name.clone(), start_loop(&shared, &stop_all, b, listen));
        }
        let (tx, changes) = mpsc::unbounded_channel();
        let watcher = match FileWatcher::start(tx) {
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
        let supervisor = Self {
            shared,
            health,
            acme,
            status,
            stop_all,
            running,
            watcher,
            deny_watch,
            http_stop,
        };
        (supervisor, changes)
    }

    async fn reload(&mut self, cause: Cause) {
        reload(self, cause).await;
    }

    /// Stops accepting, answers 421 to sessions still in the pre-TLS dialogue, waits for the
    /// others within `shutdown_grace`.
    async fn drain(self) {
        let grace: Duration = self.shared.current.load().config.shutdown_grace;
        self.status.serving.store(false, Ordering::Release);
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            sessions = self.shared.tracker.len(),
            "shutting down: no new connections"
        );
        drop(self.watcher);
        self.deny_watch.abort();
        self.stop_all.cancel();
        for (_, r) in self.running {
            let _ = r.task.await;
        }
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        if tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = self.shared.tracker.len(),
                "shutdown grace elapsed; cutting remaining sessions"
            );
        }
        self.http_stop.cancel();
        tracing::info!("stopped");
    }
}

/// What a snapshot publishes when it becomes current, at start and at every reload alike:
/// its certificate expiry, the upstreams health follows, the ACME entries that run. (Its
/// zero series were made with its metric handles, in `snapshot::build`.)
fn adopt(snapshot: &Snapshot, health: &Arc<Health>, acme: &AcmeManager) {
    snapshot.store.publish_expiry();
    health.sync(snapshot);
    acme.sync(&acme_specs(snapshot), &crate::tls::provider());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run` is driven by values, as tests want it: a reload request reloads (the listener
    /// set follows the file) and the shutdown future drains and returns; no signal sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_reloads_on_request_and_drains_on_shutdown_without_signals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        let yaml = |extra: &str| {
            format!(
                "upstreams:\n  mta: {{ address: \"127.0.0.1:9\", health_interval: 1h }}\n\
                 certificates:\n  - self_signed: [mx.test]\n\
                 listeners:\n  first: {{ listen: \"127.0.0.1:0\", mode: implicit, hostname: mx.test, upstream: mta }}\n{extra}"
            )
        };
        std::fs::write(&path, yaml("")).unwrap();
        let acme = Arc::new(AcmeManager::default());
        let snapshot = crate::snapshot::read_config(&path)
            .and_then(|c| crate::snapshot::build(c, &acme, None))
            .unwrap();
        let start = Start::bind(acme, snapshot).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (reload_tx, reload_rx) = mpsc::unbounded_channel();
        let triggers = Triggers {
            shutdown: Box::pin(async move {
                let _ = stopped.await;
            }),
            reload: reload_rx,
        };
        let task = tokio::spawn(run(start, triggers));
        let second = "listener=\"second_by_request\"";
        assert!(!metrics().encode().contains(second));
        std::fs::write(
            &path,
            yaml("  second_by_request: { listen: \"127.0.0.1:0\", mode: implicit, hostname: mx.test, upstream: mta }\n"),
        )
        .unwrap();
        reload_tx.send(()).unwrap();
        // The new listener's series exist once the reload built its snapshot.
        let mut seen = false;
        for _ in 0..500 {
            if metrics().encode().contains(second) {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(seen, "the requested reload built the new listener");
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("drained and returned")
            .unwrap();
    }
}
