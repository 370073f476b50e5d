//! The ACME store: one directory that several processes share (a host path for replicas on
//! one machine, an NFS/CephFS/EFS or other ReadWriteMany volume across machines), so that N
//! replicas behind a balancer act as one ACME client (issue 24; certmagic's file storage is
//! the model). A 0700 directory; 0600 files, each written to a temporary file of its own,
//! fsynced and renamed over the old one, so a reader never sees a torn file. Per entry:
//! - `account-<h>.json`: the ACME account (instant-acme's credentials, with its key);
//! - `key-<h>.pem`: the private key certificates are ordered for (kept across renewals);
//! - `next-key-<h>.pem`: with `rotate_key`, the key the next renewal will use;
//! - `cert-<h>.pem`: the private key, then the issued chain (the format of the previous
//!   releases, so their caches keep being served and their key kept);
//! - `lock-<h>`: held by the one replica that registers, orders or renews (below);
//! - `retry-<h>`: after a failed order, the Unix time before which no replica orders again
//!   (the backoff is shared, so N replicas do not multiply failed validations);
//! - `challenge-<name>.txt`: while an order waits for validation, the SHA-256 of the
//!   tls-alpn-01 key authorization for `name` (hex). Every replica builds its answer from it;
//!   nothing secret (the account key never leaves `account-<h>.json`).
//!
//! `<h>` is a hash of the domains (the contact for the account) and the directory URL, so a
//! new directory means a new account and a new certificate.
//!
//! The lock is a file made by exclusive create (`O_EXCL`, atomic on local file systems and
//! NFSv3+; no `flock`, whose semantics over NFS vary). Its holder sets its mtime every
//! `LOCK_REFRESH`; a lock whose mtime is older than `LOCK_STALE` belongs to a dead holder
//! and is taken over (renamed away, which only one contender can do, then created anew).
//! Replicas' clocks are assumed to agree within a few seconds (NTP).

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;

use crate::config::AcmeSpec;

/// How often the lock's holder marks it alive.
pub(crate) const LOCK_REFRESH: Duration = Duration::from_secs(2);
/// A lock not marked alive for this long is taken over.
pub(crate) const LOCK_STALE: Duration = Duration::from_secs(10);

/// One store as seen by one entry.
pub(crate) struct AcmeStore {
    dir: PathBuf,
    entry: String,
    account: String,
}

impl AcmeStore {
    pub(crate) fn new(spec: &AcmeSpec) -> Self {
        Self {
            dir: spec.cache.clone(),
            entry: hash(&spec.domains, &spec.directory),
            account: hash(&spec.contact, &spec.directory),
        }
    }

    pub(crate) fn cert_file(&self) -> PathBuf {
        self.dir.join(format!("cert-{}.pem", self.entry))
    }

    pub(crate) fn key_file(&self) -> PathBuf {
        self.dir.join(format!("key-{}.pem", self.entry))
    }

    pub(crate) fn next_key_file(&self) -> PathBuf {
        self.dir.join(format!("next-key-{}.pem", self.entry))
    }

    pub(crate) fn account_file(&self) -> PathBuf {
        self.dir.join(format!("account-{}.json", self.account))
    }

    /// The file's bytes; `None` if it does not exist.
    pub(crate) fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A private key (PKCS#8 PEM, alone or first in a certificate file).
    pub(crate) fn read_key(&self, path: &Path) -> Result<Option<KeyPair>, String> {
        let Some(pem) = self
            .read(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
        else {
            return Ok(None);
        };
        let key = PrivatePkcs8KeyDer::from_pem_slice(&pem)
            .map_err(|e| format!("{}: no PKCS#8 private key ({e})", path.display()))?;
        KeyPair::try_from(&key)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The key the current certificate was ordered for: the key file, else the key of a
    /// cached certificate (a cache from a release that kept no key file).
    pub(crate) fn current_key(&self) -> Result<Option<KeyPair>, String> {
        match self.read_key(&self.key_file())? {
            Some(k) => Ok(Some(k)),
            None => self.read_key(&self.cert_file()),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_file(&self) -> PathBuf {
        self.dir.join(format!("lock-{}", self.entry))
    }

    fn retry_file(&self) -> PathBuf {
        self.dir.join(format!("retry-{}", self.entry))
    }

    /// 0700 directory, 0600 temporary file of this process, fsync, rename over the old file.
    /// Errors name the path.
    pub(crate) fn write(&self, path: &Path, contents: &[u8]) -> Result<(), String> {
        self.write_io(path, contents)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn write_io(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        use std::io::Write as _;
        self.ensure_dir()?;
        let tmp = unique_tmp(path);
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(contents)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn ensure_dir(&self) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let mode = std::fs::metadata(&self.dir)?.permissions().mode() & 0o777;
        if mode != 0o700 {
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// Removes a file; a missing one is fine.
    pub(crate) fn remove(&self, path: &Path) -> Result<(), String> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Where the tls-alpn-01 answer for `name` (lowercase, one of the entry's domains) is.
    pub(crate) fn challenge_file(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("challenge-{name}.txt"))
    }

    /// Before this Unix time no replica orders (0: no backoff).
    pub(crate) fn retry_at(&self) -> i64 {
        self.read(&self.retry_file())
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok()?.trim().parse().ok())
            .unwrap_or(0)
    }

    pub(crate) fn set_retry_at(&self, at: i64) -> Result<(), String> {
        if at == 0 {
            return self.remove(&self.retry_file());
        }
        self.write(&self.retry_file(), at.to_string().as_bytes())
    }

    /// Takes the entry's lock if no live replica holds it: `Ok(None)` when one does.
    /// An error (a store that cannot be written) names the path.
    pub(crate) fn try_lock(&self) -> Result<Option<Lock>, String> {
        let path = self.lock_file();
        let named = |e: io::Error| format!("{}: {e}", path.display());
        self.ensure_dir()
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let token = unique_token();
        for _ in 0..3 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write as _;
                    f.write_all(token.as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(named)?;
                    return Ok(Some(Lock { path, token }));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let age = match std::fs::metadata(&path).and_then(|m| m.modified()) {
                        Ok(mtime) => SystemTime::now()
                            .duration_since(mtime)
                            .unwrap_or(Duration::ZERO),
                        // Released in between: try again.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(named(e)),
                    };
                    if age < LOCK_STALE {
                        return Ok(None);
                    }
                    // A dead holder's lock: rename it away (one contender wins), then retry.
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let aside = path.with_file_name(format!(
                        ".{}.stale.{token}",
                        path.file_name().unwrap_or_default().to_string_lossy()
                    ));
                    match std::fs::rename(&path, &aside) {
                        Ok(()) => {
                            let _ = std::fs::remove_file(&aside);
                            tracing::warn!(lock = %path.display(), holder = %holder.trim(), age_s = age.as_secs(), "acme: took over a stale store lock");
                        }
                        // Another contender moved it first.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(named(e)),
                    }
                }
                Err(e) => return Err(named(e)),
            }
        }
        Ok(None)
    }
}

/// The entry's lock, held by this process until `release` (or until it goes stale).
#[derive(Debug)]
pub(crate) struct Lock {
    path: PathBuf,
    token: String,
}

impl Lock {
    /// Whether the lock file is still ours.
    pub(crate) fn held(&self) -> bool {
        std::fs::read_to_string(&self.path).is_ok_and(|t| t == self.token)
    }

    /// Marks the lock alive; false when it is no longer ours (taken over as stale).
    pub(crate) fn refresh(&self) -> bool {
        if !self.held() {
            return false;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .is_ok()
    }

    pub(crate) fn release(self) {
        if self.held() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `<host>-<pid>-<nanos>-<n>`: who holds a lock, unique per attempt (a file-name part).
fn unique_token() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{nanos}-{}",
        host.trim().replace(['/', '\0'], "_"),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temporary file beside `path`, unique to this process and write.
fn unique_tmp(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn hash(parts: &[String], directory: &str) -> String {
    let mut input = parts.join("\n");
    input.push('\0');
    input.push_str(directory);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, input.as_bytes());
    crate::hex::hex(&digest.as_ref()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> AcmeSpec {
        AcmeSpec {
            domains: vec!["mail.example.test".into()],
            contact: vec![],
            directory: "https://acme.example/dir".into(),
            directory_ca: None,
            cache: dir.join("acme"),
            rotate_key: false,
        }
    }

    #[test]
    fn the_key_of_an_old_cached_certificate_is_the_current_key() {
        let dir = tempfile::tempdir().unwrap();
        let cache = AcmeStore::new(&spec(dir.path()));
        assert!(cache.current_key().unwrap().is_none());
        let key = KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["mail.example.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = format!("{}\n{}", key.serialize_pem(), cert.pem());
        cache.write(&cache.cert_file(), pem.as_bytes()).unwrap();
        let read = cache.current_key().unwrap().unwrap();
        assert_eq!(read.serialize_der(), key.serialize_der());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("acme")), 0o700);
        assert_eq!(mode(&cache.cert_file()), 0o600);
        // The key file, once written, wins.
        let other = KeyPair::generate().unwrap();
        cache
            .write(&cache.key_file(), other.serialize_pem().as_bytes())
            .unwrap();
        let read = cache.current_key().unwrap().unwrap();
        assert_eq!(read.serialize_der(), other.serialize_der());
    }

    #[test]
    fn one_lock_at_a_time_a_stale_one_is_taken_over_and_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = AcmeStore::new(&spec(dir.path()));
        let b = AcmeStore::new(&spec(dir.path()));
        let held = a.try_lock().unwrap().expect("free at first");
        assert!(held.held() && held.refresh());
        assert!(b.try_lock().unwrap().is_none(), "held and fresh");
        // The holder dies: its lock is not refreshed and ages past the stale bound.
        let old = SystemTime::now() - LOCK_STALE - Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(a.lock_file())
            .unwrap()
            .set_modified(old)
            .unwrap();
        let taken = b.try_lock().unwrap().expect("stale: taken over");
        assert!(
            !held.held() && !held.refresh(),
            "the old holder learns it lost the lock"
        );
        held.release();
        assert!(
            taken.held(),
            "the old holder's release leaves the new lock alone"
        );
        assert!(a.try_lock().unwrap().is_none());
        taken.release();
        let again = a.try_lock().unwrap().expect("released");
        again.release();
        let mode = std::fs::metadata(dir.path().join("acme"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn the_retry_time_is_shared_and_writes_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = AcmeStore::new(&spec(dir.path()));
        assert_eq!(a.retry_at(), 0);
        a.set_retry_at(1_700_000_000).unwrap();
        assert_eq!(AcmeStore::new(&spec(dir.path())).retry_at(), 1_700_000_000);
        a.set_retry_at(0).unwrap();
        assert_eq!(a.retry_at(), 0);
        let names: Vec<String> = std::fs::read_dir(a.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn an_unwritable_store_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the store directory should be: unwritable for root too.
        let blocked = dir.path().join("acme");
        std::fs::write(&blocked, b"not a directory").unwrap();
        let a = AcmeStore::new(&spec(dir.path()));
        let e = a.write(&a.cert_file(), b"x").unwrap_err();
        assert!(e.contains(&blocked.display().to_string()), "{e}");
        let e = a.try_lock().unwrap_err();
        assert!(e.contains(&blocked.display().to_string()), "{e}");
    }
}
