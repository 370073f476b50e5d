//! `SecureDirCache`: rustls-acme's cache written safely (0600 files via a temporary file
//! and a rename, in a 0700 directory), feeding the slot (see the parent module's comment).

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_acme::{AccountCache, CertCache};

use super::AcmeSlot;

/// rustls-acme's cache, written safely (see the module comment).
pub struct SecureDirCache {
    dir: PathBuf,
    slot: Arc<AcmeSlot>,
    provider: Arc<CryptoProvider>,
}

impl SecureDirCache {
    pub(super) fn new(dir: &Path, slot: Arc<AcmeSlot>, provider: Arc<CryptoProvider>) -> Self {
        SecureDirCache {
            dir: dir.to_path_buf(),
            slot,
            provider,
        }
    }

    fn name(kind: &str, parts: &[String], directory: &str) -> String {
        let mut input = parts.join("\n");
        input.push('\0');
        input.push_str(directory);
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, input.as_bytes());
        let hex: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{kind}-{hex}.pem")
    }

    pub(super) fn cert_file(&self, domains: &[String], directory: &str) -> PathBuf {
        self.dir.join(Self::name("cert", domains, directory))
    }

    pub(super) fn account_file(&self, contact: &[String], directory: &str) -> PathBuf {
        self.dir.join(Self::name("account", contact, directory))
    }

    pub(super) fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// 0700 directory, 0600 temporary file, fsync, rename over the old file.
    pub(super) fn write(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
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

#[async_trait::async_trait]
impl CertCache for SecureDirCache {
    type EC = io::Error;

    async fn load_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, io::Error> {
        self.read(&self.cert_file(domains, directory_url))
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory_url: &str,
        cert: &[u8],
    ) -> Result<(), io::Error> {
        // Serve first: a full disk must not keep a fresh certificate off the wire.
        if let Err(e) = self.slot.publish(cert, &self.provider) {
            tracing::error!(domains = %self.slot.label(), error = %e, "acme: the issued certificate is unusable");
        }
        self.write(&self.cert_file(domains, directory_url), cert)
    }
}

#[async_trait::async_trait]
impl AccountCache for SecureDirCache {
    type EA = io::Error;

    async fn load_account(
        &self,
        contact: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, io::Error> {
        self.read(&self.account_file(contact, directory_url))
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory_url: &str,
        account: &[u8],
    ) -> Result<(), io::Error> {
        self.write(&self.account_file(contact, directory_url), account)
    }
}
