//! `CertStore`: every certificate the proxy can serve, indexed by DNS name (exact and
//! one-label wildcard), several keys per name (ECDSA preferred, RSA for old senders).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::cert::{ServedCert, describe, self_signed_for};
use crate::config::{AcmeSpec, CertificateSource, ConfigError};

/// What one `acme` entry serves, while the store lives (implemented by `acme::AcmeSlot`).
/// The store holds these, not the ACME manager: `tls` does not depend on `acme`.
pub trait ManagedCert: Send + Sync + std::fmt::Debug {
    fn spec(&self) -> &AcmeSpec;
    /// The issued certificate, if any.
    fn issued(&self) -> Option<Arc<ServedCert>>;
    /// The issued certificate, else a self-signed placeholder for the domains.
    fn current(&self) -> Arc<ServedCert>;
    /// The config that answers tls-alpn-01 validation handshakes for the domains.
    fn challenge(&self) -> Arc<rustls::ServerConfig>;
    /// With `rotate_key`: the TLSA value (`3 1 1 <hex>`) of the next key, once made.
    fn next_tlsa(&self) -> Option<Arc<String>>;
}

/// Finds or makes the `ManagedCert` of an `acme` entry (the ACME manager).
pub trait ManagedCerts {
    fn slot(
        &self,
        spec: &AcmeSpec,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ManagedCert>, String>;
}

/// Name -> candidate certificates, best first.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<String, Vec<Arc<ServedCert>>>,
    /// Keyed by the parent domain: `*.example.org` is stored under `example.org`.
    wildcard: HashMap<String, Vec<Arc<ServedCert>>>,
    all: Vec<Arc<ServedCert>>,
    /// ACME-managed names: what they serve changes while the store lives.
    acme: HashMap<String, Arc<dyn ManagedCert>>,
    acme_slots: Vec<Arc<dyn ManagedCert>>,
}

impl CertStore {
    /// Loads every configured certificate; errors name `certificates.N.cert|key|self_signed`.
    pub fn load(
        config_path: &Path,
        sources: &[CertificateSource],
        provider: &Arc<CryptoProvider>,
        acme: &dyn ManagedCerts,
    ) -> Result<Self, ConfigError> {
        let mut store = Self::default();
        for source in sources {
            let cert = match source {
                CertificateSource::Files { index, cert, key } => {
                    load_files(*index, cert, key, provider)
                }
                CertificateSource::SelfSigned { index, names } => {
                    self_signed(*index, names, provider)
                }
                CertificateSource::Acme { index, spec } => {
                    if let Some(ca) = &spec.directory_ca {
                        crate::tls::client_auth::load_roots(ca).map_err(|r| {
                            ConfigError::new(
                                config_path,
                                format!("certificates.{index}.acme.directory_ca"),
                                r,
                            )
                        })?;
                    }
                    let slot = acme.slot(spec, provider).map_err(|r| {
                        ConfigError::new(config_path, format!("certificates.{index}.acme"), r)
                    })?;
                    for d in &spec.domains {
                        store.acme.insert(d.clone(), slot.clone());
                    }
                    store.acme_slots.push(slot);
                    continue;
                }
            }
            .map_err(|(key, reason)| ConfigError::new(config_path, key, reason))?;
            store.insert(Arc::new(cert));
        }
        for list in store.exact.values_mut().chain(store.wildcard.values_mut()) {
            // Best key type first; among equals the one that lives longest.
            list.sort_by_key(|c| (c.key_kind.rank(), std::cmp::Reverse(c.not_after)));
        }
        Ok(store)
    }

    fn insert(&mut self, cert: Arc<ServedCert>) {
        for name in &cert.names {
            match name.strip_prefix("*.") {
                Some(parent) => self.wildcard.entry(parent.to_owned()),
                None => self.exact.entry(name.clone()),
            }
            .or_default()
            .push(cert.clone());
        }
        self.all.push(cert);
    }

    /// An issued ACME certificate first, then exact names, then a wildcard covering exactly
    /// one more label; an ACME name not issued yet gets its self-signed placeholder rather
    /// than nothing. `name` must be lowercase.
    pub fn candidates(&self, name: &str) -> Option<Cow<'_, [Arc<ServedCert>]>> {
        let slot = self.acme.get(name);
        let exact = self.exact.get(name);
        if let Some(issued) = slot.and_then(|s| s.issued()) {
            let mut list = vec![issued];
            list.extend(exact.into_iter().flatten().cloned());
            return Some(Cow::Owned(list));
        }
        if let Some(list) = exact {
            return Some(Cow::Borrowed(list));
        }
        if let Some(slot) = slot {
            return Some(Cow::Owned(vec![slot.current()]));
        }
        let (first, parent) = name.split_once('.')?;
        if first.is_empty() || first == "*" {
            return None;
        }
        self.wildcard
            .get(parent)
            .map(|l| Cow::Borrowed(l.as_slice()))
    }

    /// Certificates from files and `self_signed`, in `certificates` order.
    pub fn all(&self) -> &[Arc<ServedCert>] {
        &self.all
    }

    /// The ACME entries, in `certificates` order.
    pub fn acme_slots(&self) -> &[Arc<dyn ManagedCert>] {
        &self.acme_slots
    }

    /// For each name the file and self-signed certificates serve, the TLSA values of its
    /// keys (sorted); what a reload compares to warn about a key change.
    pub(crate) fn tlsa_by_name(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for c in &self.all {
            for n in &c.names {
                out.entry(n.clone()).or_default().push(c.tlsa());
            }
        }
        for v in out.values_mut() {
            v.sort();
            v.dedup();
        }
        out
    }

    /// Replaces the certificate expiry gauges with this store's certificates.
    pub fn publish_expiry(&self) {
        let issued: Vec<Arc<ServedCert>> =
            self.acme_slots.iter().filter_map(|s| s.issued()).collect();
        let files = self
            .all
            .iter()
            .map(|c| (c.label.as_str(), c.origin.as_str(), c.not_after));
        let acme = issued
            .iter()
            .map(|c| (c.label.as_str(), "acme", c.not_after));
        crate::metrics::metrics().set_certificate_expiry(files.chain(acme));
    }

    /// The tls-alpn-01 answering config for an ACME-managed name.
    pub fn acme_challenge(&self, name: &str) -> Option<Arc<rustls::ServerConfig>> {
        self.acme
            .get(&name.trim_end_matches('.').to_ascii_lowercase())
            .map(|s| s.challenge())
    }
}

type KeyedError = (String, String);

fn load_files(
    index: usize,
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<ServedCert, KeyedError> {
    let cert_key = format!("certificates.{index}.cert");
    let key_key = format!("certificates.{index}.key");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| {
            (
                cert_key.clone(),
                format!("cannot read {}: {e}", cert_path.display()),
            )
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            (
                cert_key.clone(),
                format!("bad PEM in {}: {e}", cert_path.display()),
            )
        })?;
    if chain.is_empty() {
        return Err((
            cert_key,
            format!("no CERTIFICATE block in {}", cert_path.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        (
            key_key.clone(),
            format!("cannot read a private key from {}: {e}", key_path.display()),
        )
    })?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        let reason = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key in {} does not match the certificate in {}",
                key_path.display(),
                cert_path.display()
            ),
            other => format!("unusable key {}: {other}", key_path.display()),
        };
        (key_key.clone(), reason)
    })?;
    describe(certified, cert_path.display().to_string()).map_err(|r| (cert_key, r))
}

fn self_signed(
    index: usize,
    names: &[String],
    provider: &CryptoProvider,
) -> Result<ServedCert, KeyedError> {
    let key = format!("certificates.{index}.self_signed");
    self_signed_for(names, provider).map_err(|r| (key, r))
}
