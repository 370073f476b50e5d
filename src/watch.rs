//! Reload on file changes. The parent directories of the config file and of every
//! certificate, key and CA file are watched (not the files: certbot, editors and
//! Kubernetes secret mounts replace files by rename or by swapping a `..data` symlink, which
//! a watch on the old inode never sees). Events are filtered by kind and to our files (or
//! the `..`-prefixed entries of a Kubernetes atomic writer), debounced, and the supervisor
//! then runs the same reload as SIGHUP — unless [`FileStamps`] shows that nothing it read
//! has changed, so an event storm that slips through the filter can never become a loop.
//!
//! Which inotify events count (notify 8 on Linux asks for OPEN, CLOSE_WRITE, CLOSE_NOWRITE,
//! MODIFY, ATTRIB, CREATE, DELETE and MOVED_*; `tests::what_the_kernel_reports` records
//! what each operation below produces on the running kernel):
//! - in: `Modify(Data)` and `Access(Close(Write))` — content written in place (a write
//!   ends with CLOSE_WRITE); `Create` — a file or a `..data_tmp` symlink appearing;
//!   `Remove`; `Modify(Name)` — renames (certbot, an editor's write-and-rename, the
//!   Kubernetes `..data` swap); `Modify(Metadata)` except access time — IN_ATTRIB, e.g. a
//!   `chmod` that makes a key unreadable; `Any`/`Other` — a backend that cannot classify or
//!   a rescan after a queue overflow, where an event may have been lost.
//! - out: `Access(Open)`, `Access(Read)`, `Access(Close(Read))` — `cat`, `check`, a backup
//!   job and the reload's own reads. Counting these made every reload trigger the next.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, MetadataKind, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{CertificateSource, Config};

/// Quiet time before a burst of events becomes one reload (a certificate and its key are
/// usually replaced within milliseconds of each other).
const DEBOUNCE: Duration = Duration::from_millis(400);
/// A burst that never goes quiet still reloads after this long.
const MAX_DELAY: Duration = Duration::from_secs(2);

pub(crate) struct FileWatcher {
    watcher: RecommendedWatcher,
    dirs: HashSet<PathBuf>,
    files: Arc<Mutex<HashSet<PathBuf>>>,
    debounce: tokio::task::JoinHandle<()>,
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.debounce.abort();
    }
}

impl FileWatcher {
    /// Starts the watcher; each relevant burst sends one `()`. Needs a tokio runtime.
    pub(crate) fn start(tx: UnboundedSender<()>) -> notify::Result<Self> {
        let files: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
        let ours = files.clone();
        // A flag, not a queue: an event storm cannot grow memory.
        let pending = Arc::new(Notify::new());
        let raised = pending.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
            let Ok(event) = res else {
                // An error from the backend may hide a change: check (cheap if unchanged).
                raised.notify_one();
                return;
            };
            if !can_change_what_we_serve(&event.kind) {
                return;
            }
            let files = ours.lock().unwrap_or_else(PoisonError::into_inner);
            if event.paths.iter().any(|p| relevant(&files, p)) {
                raised.notify_one();
            }
        })?;
        let debounce = tokio::spawn(async move {
            loop {
                pending.notified().await;
                let until = tokio::time::Instant::now() + MAX_DELAY;
                while tokio::time::timeout(DEBOUNCE, pending.notified())
                    .await
                    .is_ok()
                    && tokio::time::Instant::now() < until
                {}
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            watcher,
            dirs: HashSet::new(),
            files,
            debounce,
        })
    }

    /// Watches exactly the directories of `files` from now on.
    pub(crate) fn watch(&mut self, files: HashSet<PathBuf>) {
        let dirs: HashSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        for gone in self.dirs.difference(&dirs) {
            let _ = self.watcher.unwatch(gone);
        }
        for new in dirs.difference(&self.dirs) {
            if let Err(e) = self.watcher.watch(new, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %new.display(), error = %e, "cannot watch for changes; SIGHUP still reloads");
            }
        }
        self.dirs = dirs;
        *self.files.lock().unwrap_or_else(PoisonError::into_inner) = files;
    }
}

/// The event kinds that can change what the proxy serves (module comment for each).
fn can_change_what_we_serve(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        EventKind::Modify(_) | EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Any | EventKind::Other => true,
    }
}

fn relevant(files: &HashSet<PathBuf>, path: &Path) -> bool {
    files.contains(path)
        || path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".."))
}

/// What a snapshot read, as the file system described each file just before the read:
/// device, inode (a rename or a `..data` swap gives a new one; symlinks are followed),
/// size, mtime and ctime (a write, a `chmod`, a `chown`) and mode. `None` for a file that
/// could not be stat'ed (e.g. an ACME directory CA that is not there yet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileStamps(BTreeMap<PathBuf, Option<Stamp>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
}

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            mode: m.mode(),
        })
    }
}

impl FileStamps {
    /// Stamps `files` now (absolute paths, as [`files_of`] gives them).
    pub fn read(files: impl IntoIterator<Item = PathBuf>) -> Self {
        Self(
            files
                .into_iter()
                .map(|f| {
                    let s = Stamp::of(&f);
                    (f, s)
                })
                .collect(),
        )
    }

    /// Adds the files of `other` that are not stamped yet (stamps already taken win:
    /// they were taken before the read).
    pub fn extend(&mut self, other: Self) {
        for (f, s) in other.0 {
            self.0.entry(f).or_insert(s);
        }
    }

    /// True when every stamped file still looks exactly as it did.
    pub fn unchanged(&self) -> bool {
        self.0.iter().all(|(f, s)| Stamp::of(f) == *s)
    }
}

/// Every file the configuration reads, as absolute paths.
pub(crate) fn files_of(config: &Config) -> HashSet<PathBuf> {
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
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_our_files_and_kubernetes_swaps_matter() {
        let files: HashSet<PathBuf> = [PathBuf::from("/etc/tls/cert.pem")].into();
        assert!(relevant(&files, Path::new("/etc/tls/cert.pem")));
        assert!(relevant(&files, Path::new("/etc/tls/..data")));
        assert!(!relevant(&files, Path::new("/etc/tls/other.pem")));
        assert!(!relevant(&files, Path::new("/etc/tls/.cert.pem.swp")));
    }

    /// Records what the running kernel reports through notify for each operation an
    /// operator (or a backup job) performs, and checks the filter on it: reads never
    /// count, each kind of change does.
    #[test]
    fn what_the_kernel_reports() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, "one").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut w = notify::recommended_watcher(move |e: notify::Result<Event>| {
            let _ = tx.send(e.unwrap());
        })
        .unwrap();
        w.watch(dir.path(), RecursiveMode::NonRecursive).unwrap();
        // Each operation is followed by creating a marker file: the marker's event is the
        // signal that every event of the operation has been delivered.
        let mut step = 0;
        let mut events_of = |op: &dyn Fn()| {
            op();
            step += 1;
            let marker = dir.path().join(format!("marker{step}"));
            std::fs::File::create(&marker).unwrap();
            let mut kinds = Vec::new();
            for _ in 0..1000 {
                let e = rx.recv_timeout(Duration::from_secs(5)).unwrap();
                if e.paths.contains(&marker) {
                    return kinds;
                }
                let is_marker = |p: &PathBuf| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("marker"))
                };
                if !e.paths.iter().any(is_marker) {
                    kinds.push(e.kind);
                }
            }
            panic!("no marker event");
        };
        let read = events_of(&|| {
            let _ = std::fs::read(&file).unwrap();
        });
        assert!(!read.is_empty(), "a read reports open/close: {read:?}");
        assert!(
            read.iter().all(|k| !can_change_what_we_serve(k)),
            "a read must not count: {read:?}"
        );
        let write = events_of(&|| std::fs::write(&file, "two").unwrap());
        assert!(write.iter().any(can_change_what_we_serve), "{write:?}");
        let rename = events_of(&|| {
            std::fs::write(dir.path().join("new.pem"), "three").unwrap();
            std::fs::rename(dir.path().join("new.pem"), &file).unwrap();
        });
        assert!(
            rename
                .iter()
                .any(|k| matches!(k, EventKind::Modify(ModifyKind::Name(_)))),
            "{rename:?}"
        );
        let chmod = events_of(&|| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        });
        assert!(chmod.iter().any(can_change_what_we_serve), "{chmod:?}");
        let symlink = events_of(&|| {
            std::os::unix::fs::symlink("cert.pem", dir.path().join("..data_tmp")).unwrap();
            std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        });
        assert!(symlink.iter().any(can_change_what_we_serve), "{symlink:?}");
    }

    #[test]
    fn stamps_see_writes_renames_and_chmod_but_not_reads() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key.pem");
        std::fs::write(&file, "one").unwrap();
        let stamps = FileStamps::read([file.clone()]);
        let _ = std::fs::read(&file).unwrap();
        assert!(stamps.unchanged());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!stamps.unchanged());
        let stamps = FileStamps::read([file.clone()]);
        std::fs::write(dir.path().join("new"), "two").unwrap();
        std::fs::rename(dir.path().join("new"), &file).unwrap();
        assert!(!stamps.unchanged());
    }
}
