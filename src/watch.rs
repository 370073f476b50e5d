//! Reload on file changes. The parent directories of the config file and of every
//! certificate, key and CA file are watched (not the files: certbot, editors and
//! Kubernetes secret mounts replace files by rename or by swapping a `..data` symlink, which
//! a watch on the old inode never sees). Events are debounced and filtered to our files
//! (or the `..`-prefixed entries of a Kubernetes atomic writer); the supervisor then runs
//! the same reload as SIGHUP.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{CertificateSource, Config};

/// Quiet time before a burst of events becomes one reload (a certificate and its key are
/// usually replaced within milliseconds of each other).
const DEBOUNCE: Duration = Duration::from_millis(400);

pub struct FileWatcher {
    debouncer: Debouncer<RecommendedWatcher>,
    dirs: HashSet<PathBuf>,
    files: Arc<Mutex<HashSet<PathBuf>>>,
}

impl FileWatcher {
    /// Starts the watcher thread; each relevant burst sends one `()`.
    pub fn start(tx: UnboundedSender<()>) -> notify::Result<FileWatcher> {
        let files: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
        let ours = files.clone();
        let debouncer = new_debouncer(DEBOUNCE, move |res: DebounceEventResult| {
            let Ok(events) = res else { return };
            let files = ours.lock().unwrap_or_else(PoisonError::into_inner);
            if events.iter().any(|e| relevant(&files, &e.path)) {
                let _ = tx.send(());
            }
        })?;
        Ok(FileWatcher {
            debouncer,
            dirs: HashSet::new(),
            files,
        })
    }

    /// Watches exactly the directories of `files` from now on.
    pub fn watch(&mut self, files: HashSet<PathBuf>) {
        let dirs: HashSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        for gone in self.dirs.difference(&dirs) {
            let _ = self.debouncer.watcher().unwatch(gone);
        }
        for new in dirs.difference(&self.dirs) {
            if let Err(e) = self
                .debouncer
                .watcher()
                .watch(new, RecursiveMode::NonRecursive)
            {
                tracing::warn!(dir = %new.display(), error = %e, "cannot watch for changes; SIGHUP still reloads");
            }
        }
        self.dirs = dirs;
        *self.files.lock().unwrap_or_else(PoisonError::into_inner) = files;
    }
}

fn relevant(files: &HashSet<PathBuf>, path: &Path) -> bool {
    files.contains(path)
        || path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".."))
}

/// Every file the configuration reads, as absolute paths.
pub fn files_of(config: &Config) -> HashSet<PathBuf> {
    let mut files = vec![config.path.clone()];
    for c in &config.certificates {
        match c {
            CertificateSource::Files { cert, key, .. } => {
                files.push(cert.clone());
                files.push(key.clone());
            }
            CertificateSource::Acme { spec, .. } => files.extend(spec.directory_ca.clone()),
            CertificateSource::SelfSigned { .. } => {}
        }
    }
    for l in config.listeners.values() {
        files.extend(l.client_ca.clone());
    }
    for u in config.upstreams.values() {
        files.extend(u.tls.as_ref().map(|t| t.ca.clone()));
    }
    files
        .into_iter()
        .filter_map(|f| std::path::absolute(&f).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_files_and_kubernetes_swaps_matter() {
        let files: HashSet<PathBuf> = [PathBuf::from("/etc/tls/cert.pem")].into();
        assert!(relevant(&files, Path::new("/etc/tls/cert.pem")));
        assert!(relevant(&files, Path::new("/etc/tls/..data")));
        assert!(!relevant(&files, Path::new("/etc/tls/other.pem")));
        assert!(!relevant(&files, Path::new("/etc/tls/.cert.pem.swp")));
    }
}
