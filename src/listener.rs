//! Accept loop of one listener: it only accepts. Each connection gets the current
//! snapshot's listener (one load, kept for the session's life), a session id and a span,
//! and runs in the task tracker. Accept errors (EMFILE...) are logged and backed off.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::session::{self, Peer};
use crate::snapshot::Snapshot;

/// Pause after a failed accept, so descriptor exhaustion never becomes a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub async fn serve(
    name: String,
    listener: TcpListener,
    current: Arc<ArcSwap<Snapshot>>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, client) = match accepted {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(runtime) = current.load().listeners.get(&name).cloned() else {
            // Removed by a reload that has not unbound us yet.
            continue;
        };
        let local = tcp.local_addr().unwrap_or(runtime.config.listen);
        let session_id = session::new_session_id();
        let span = tracing::info_span!(
            "session",
            session_id = %session_id,
            listener = %name,
            client = %client
        );
        tracker
            .spawn(session::run(tcp, Peer { client, local }, runtime, session_id).instrument(span));
    }
}
