//! Reload: load, validate and build the new snapshot, bind what is new, swap, unbind what is
//! gone; plus what a new snapshot publishes (zero series, key-change warnings).

use std::sync::Arc;

use super::{Supervisor, adopt, bind_one, start_loop};
use crate::config::{AcmeSpec, CertificateSource};
use crate::metrics::{ReloadResult, metrics};
use crate::snapshot::{self, Snapshot};
use crate::watch;

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// An explicit request (`systemctl reload`): always reloads.
    Sighup,
    /// The watcher saw a change; skipped when no file the snapshot read has changed.
    FileChange,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Self::Sighup => "SIGHUP",
            Self::FileChange => "file change",
        }
    }
}

/// Load + validate + build + bind what is new, then swap and unbind what is gone. On any
/// error the old snapshot and every old listener keep serving.
pub(super) async fn reload(sup: &mut Supervisor, cause: Cause) {
    let Supervisor {
        shared,
        acme,
        health,
        stop_all,
        running,
        watcher,
        ..
    } = sup;
    let current = shared.current.load_full();
    let path = current.config.path.clone();
    if cause == Cause::FileChange && current.files.unchanged() {
        // Defence in depth behind the event filter: nothing the snapshot read has changed.
        tracing::debug!(config = %path.display(), "files unchanged; reload skipped");
        return;
    }
    let cause = cause.as_str();
    let (config, files) = match snapshot::read_config(&path) {
        Ok(c) => c,
        Err(e) => return reload_failed(cause, &e.to_string()),
    };
    if let Some(w) = watcher.as_mut() {
        // Also the new config's files: a certificate path that does not exist yet is
        // picked up as soon as it appears.
        let mut watched = watch::files_of(&config);
        watched.extend(watch::files_of(&current.config));
        w.watch(watched);
    }
    let next = match snapshot::build((config, files), acme, Some(&current)) {
        Ok(n) => n,
        Err(e) => {
            // Forget ACME entries the failed config created; keep the running ones.
            acme.sync(&acme_specs(&current), &crate::tls::provider());
            return reload_failed(cause, &e.to_string());
        }
    };
    drop(current);
    let mut fresh = Vec::new();
    for (name, l) in &next.listeners {
        if running.get(name).map(|r| r.listen) == Some(l.config.listen) {
            continue;
        }
        match bind_one(&next, name, l.config.listen) {
            Ok(b) => fresh.push((b, l.config.listen)),
            Err(e) => return reload_failed(cause, &e),
        }
    }
    let names: Vec<String> = next.listeners.keys().cloned().collect();
    adopt(&next, health, acme);
    let previous = shared.current.swap(Arc::new(next));
    // Warned only now: a reload that failed to bind changed no key that anyone is served.
    warn_key_changes(&previous.store, &shared.current.load().store);
    drop(previous);
    let gone: Vec<String> = running
        .iter()
        .filter(|(name, _)| !names.contains(name) || fresh.iter().any(|(b, _)| &b.name == *name))
        .map(|(name, _)| name.clone())
        .collect();
    for name in gone {
        if let Some(r) = running.remove(&name) {
            r.stop.cancel();
            let _ = r.task.await;
            tracing::info!(listener = %name, address = %r.addr, "stopped listening; its sessions carry on");
        }
    }
    for (b, listen) in fresh {
        running.insert(b.name.clone(), start_loop(shared, stop_all, b, listen));
    }
    metrics().reload(ReloadResult::Ok);
    tracing::info!(config = %path.display(), cause, "reloaded");
    for w in crate::check::warnings(&shared.current.load().config) {
        tracing::warn!(warning = %w, "configuration warning");
    }
}

/// DANE (RFC 7672): a name whose served key changes breaks every sender that pinned the old
/// key in a TLSA record, so the change is warned about with both values and counted.
fn warn_key_changes(old: &crate::tls::CertStore, new: &crate::tls::CertStore) {
    let before = old.tlsa_by_name();
    for (name, now) in new.tlsa_by_name() {
        let Some(was) = before.get(&name) else {
            continue;
        };
        if *was != now {
            crate::tls::cert::key_changed(&name, &was.join(", "), &now.join(", "), "reload");
        }
    }
}

/// The `acme` entries of a snapshot's config.
pub(super) fn acme_specs(s: &Snapshot) -> Vec<AcmeSpec> {
    s.config
        .certificates
        .iter()
        .filter_map(|c| match c {
            CertificateSource::Acme { spec, .. } => Some(spec.clone()),
            _ => None,
        })
        .collect()
}

fn reload_failed(cause: &str, error: &str) {
    metrics().reload(ReloadResult::Failed);
    tracing::error!(
        cause,
        error,
        "reload failed; keeping the previous configuration"
    );
}
