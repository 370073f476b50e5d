//! Accept loop of one listener: it only accepts. Each connection takes the global and the
//! listener's connection slot (or is refused at once), the current snapshot's listener (one
//! load, kept for the session's life) and a session id (no span: it cost every idle
//! session memory; the few in-session events carry the id), and runs in the task
//! tracker. Accept errors (EMFILE...) are logged and backed off, never a busy loop.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::admission::limits::Counter;
use crate::session::{self, Accepted, Peer};
use crate::snapshot::Snapshot;

/// Pause after a failed accept, so descriptor exhaustion never becomes a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What all accept loops share; lives as long as the process.
#[derive(Debug)]
pub(crate) struct Shared {
    pub current: Arc<ArcSwap<Snapshot>>,
    pub tracker: TaskTracker,
    /// Cancelled by SIGTERM (sessions in the pre-TLS dialogue answer 421 4.3.0).
    pub shutdown: CancellationToken,
    /// Sessions across all listeners.
    pub global: Arc<Counter>,
    /// The `deny_file`'s current list (swapped in by `abuse::watch_deny_file`).
    pub deny_file: crate::admission::abuse::SharedDenyList,
}

/// Accepts until `stop` (SIGTERM, or a reload that removed or moved this listener); the
/// socket is closed when this returns, sessions already accepted carry on.
pub(crate) async fn serve(
    name: String,
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let admission = Admission::new(shared.global.clone(), shared.deny_file.clone());
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, client) = match accepted {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed; backing off");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let snapshot = shared.current.load();
        let Some(runtime) = snapshot.listeners.get(&name).cloned() else {
            // Removed by a reload that has not stopped us yet.
            continue;
        };
        let global_max = snapshot.max_connections;
        drop(snapshot);
        runtime.counters.connection();
        let local = tcp.local_addr().unwrap_or(runtime.config.listen);
        let session_id = session::new_session_id();
        let peer = Peer { client, local };
        let permits = match admission.at_accept(global_max, runtime.config.limits.max_connections) {
            Ok(permits) => permits,
            Err(which) => {
                session::refuse_at_accept(tcp, runtime, peer, session_id, which);
                continue;
            }
        };
        let accepted = Accepted {
            tcp,
            peer,
            listener: runtime,
            session_id,
            permits,
            shutdown: shared.shutdown.clone(),
        };
        shared.tracker.spawn(session::run(accepted));
    }
}
