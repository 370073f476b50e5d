//! The ACME cache directory, written safely: a 0700 directory, 0600 files written to a
//! temporary file, fsynced and renamed over the old one. Per entry it holds:
//! - `account-<h>.json`: the ACME account (instant-acme's credentials, with its key);
//! - `key-<h>.pem`: the private key certificates are ordered for (kept across renewals);
//! - `next-key-<h>.pem`: with `rotate_key`, the key the next renewal will use;
//! - `cert-<h>.pem`: the private key, then the issued chain (the format of the previous
//!   releases, so their caches keep being served and their key kept).
//!
//! `<h>` is a hash of the domains (the contact for the account) and the directory URL, so a
//! new directory means a new account and a new certificate.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::KeyPair;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;

use crate::config::AcmeSpec;

pub(crate) struct SecureDirCache {
    dir: PathBuf,
    entry: String,
    account: String,
}

impl SecureDirCache {
    pub(crate) fn new(spec: &AcmeSpec) -> Self {
        SecureDirCache {
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

    /// 0700 directory, 0600 temporary file, fsync, rename over the old file.
    pub(crate) fn write(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        use std::io::Write as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    }
}

fn hash(parts: &[String], directory: &str) -> String {
    let mut input = parts.join("\n");
    input.push('\0');
    input.push_str(directory);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, input.as_bytes());
    digest.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
        let cache = SecureDirCache::new(&spec(dir.path()));
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
}
