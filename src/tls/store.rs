//! `CertStore`: every certificate the proxy can serve, indexed by DNS name (exact and
//! one-label wildcard), several keys per name (ECDSA preferred, RSA for old senders).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::acme::{AcmeManager, AcmeSlot};
use crate::config::{CertificateSource, ConfigError};

/// The key type of a served certificate, with its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Ecdsa { bits: usize },
    Rsa { bits: usize },
    Ed25519,
    Other,
}

impl KeyKind {
    /// Preference when several keys serve one name: cheapest handshake first.
    fn rank(self) -> u8 {
        match self {
            KeyKind::Ecdsa { .. } => 0,
            KeyKind::Ed25519 => 1,
            KeyKind::Rsa { .. } => 2,
            KeyKind::Other => 3,
        }
    }

    /// PROXY v2 `PP2_SUBTYPE_SSL_KEY_ALG` value, HAProxy style (`EC256`, `RSA2048`).
    fn key_alg(self) -> String {
        match self {
            KeyKind::Ecdsa { bits } => format!("EC{bits}"),
            KeyKind::Rsa { bits } => format!("RSA{bits}"),
            KeyKind::Ed25519 => "ED25519".to_owned(),
            KeyKind::Other => "UNKNOWN".to_owned(),
        }
    }
}

/// One certificate chain with its key and what was read from its leaf.
#[derive(Debug)]
pub struct ServedCert {
    pub certified: Arc<CertifiedKey>,
    /// DNS SANs, lowercased; `*.example.org` for wildcards.
    pub names: Vec<String>,
    pub key_kind: KeyKind,
    /// `key_kind.key_alg()`, computed once: it goes into every PROXY v2 header.
    pub key_alg: String,
    /// Signature algorithm of the leaf (`ECDSA-SHA256`), for the PROXY SSL TLV.
    pub sig_alg: String,
    /// notAfter as Unix seconds.
    pub not_after: i64,
    /// Where it came from: a file path or `self-signed`.
    pub origin: String,
    /// Short stable label for logs: first name + key type.
    pub label: String,
}

/// Name -> candidate certificates, best first.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<String, Vec<Arc<ServedCert>>>,
    /// Keyed by the parent domain: `*.example.org` is stored under `example.org`.
    wildcard: HashMap<String, Vec<Arc<ServedCert>>>,
    all: Vec<Arc<ServedCert>>,
    /// ACME-managed names: what they serve changes while the store lives.
    acme: HashMap<String, Arc<AcmeSlot>>,
    acme_slots: Vec<Arc<AcmeSlot>>,
}

impl CertStore {
    /// Loads every configured certificate; errors name `certificates.N.cert|key|self_signed`.
    pub fn load(
        config_path: &Path,
        sources: &[CertificateSource],
        provider: &Arc<CryptoProvider>,
        acme: &AcmeManager,
    ) -> Result<CertStore, ConfigError> {
        let mut store = CertStore::default();
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
    pub fn acme_slots(&self) -> &[Arc<AcmeSlot>] {
        &self.acme_slots
    }

    /// The tls-alpn-01 answering config for an ACME-managed name.
    pub fn acme_challenge(&self, name: &str) -> Option<Arc<rustls::ServerConfig>> {
        self.acme
            .get(&name.trim_end_matches('.').to_ascii_lowercase())
            .and_then(|s| s.challenge())
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

/// A generated self-signed certificate and its PKCS#8 key.
type Generated = (CertificateDer<'static>, Vec<u8>);

fn self_signed(
    index: usize,
    names: &[String],
    provider: &CryptoProvider,
) -> Result<ServedCert, KeyedError> {
    let key = format!("certificates.{index}.self_signed");
    self_signed_for(names, provider).map_err(|r| (key, r))
}

/// A self-signed certificate for `names`, generated once per name list and process.
pub fn self_signed_for(names: &[String], provider: &CryptoProvider) -> Result<ServedCert, String> {
    // Generated once per name list and process: a reload (or a spurious file event) must
    // not change the certificate clients see.
    static GENERATED: OnceLock<Mutex<HashMap<Vec<String>, Generated>>> = OnceLock::new();
    let mut cache = GENERATED
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let (cert_der, key_der) = match cache.get(names) {
        Some(entry) => entry.clone(),
        None => {
            // ECDSA P-256, the cheapest handshake; valid for rcgen's default period.
            let generated = rcgen::generate_simple_self_signed(names.to_vec())
                .map_err(|e| format!("cannot generate: {e}"))?;
            let entry = (
                generated.cert.der().clone(),
                generated.signing_key.serialize_der(),
            );
            cache.insert(names.to_vec(), entry.clone());
            entry
        }
    };
    drop(cache);
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
    let certified = CertifiedKey::from_der(vec![cert_der], der, provider)
        .map_err(|e| format!("cannot load generated key: {e}"))?;
    describe(certified, "self-signed".to_owned())
}

/// Reads names, key type, signature algorithm and expiry from the leaf.
pub fn describe(certified: CertifiedKey, origin: String) -> Result<ServedCert, String> {
    let leaf = certified
        .cert
        .first()
        .ok_or_else(|| "empty certificate chain".to_owned())?;
    let (_, x509) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("cannot parse the leaf certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        // Legacy certificates without SANs: fall back to the subject CN.
        for cn in x509.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        return Err("the certificate names no DNS name (no SAN, no CN)".to_owned());
    }
    let key_kind = match x509.public_key().parsed() {
        Ok(PublicKey::EC(p)) => KeyKind::Ecdsa { bits: p.key_size() },
        Ok(PublicKey::RSA(r)) => KeyKind::Rsa { bits: r.key_size() },
        _ if x509.public_key().algorithm.algorithm.to_id_string() == "1.3.101.112" => {
            KeyKind::Ed25519
        }
        _ => KeyKind::Other,
    };
    let sig_alg = sig_alg_name(&x509.signature_algorithm.algorithm.to_id_string());
    let not_after = x509.validity().not_after.timestamp();
    let kind = match key_kind {
        KeyKind::Ecdsa { .. } => "ecdsa",
        KeyKind::Rsa { .. } => "rsa",
        KeyKind::Ed25519 => "ed25519",
        KeyKind::Other => "other",
    };
    let label = format!("{}/{kind}", names[0]);
    Ok(ServedCert {
        certified: Arc::new(certified),
        names,
        key_kind,
        key_alg: key_kind.key_alg(),
        sig_alg,
        not_after,
        origin,
        label,
    })
}

fn sig_alg_name(oid: &str) -> String {
    match oid {
        "1.2.840.10045.4.3.2" => "ECDSA-SHA256",
        "1.2.840.10045.4.3.3" => "ECDSA-SHA384",
        "1.2.840.10045.4.3.4" => "ECDSA-SHA512",
        "1.2.840.113549.1.1.11" => "RSA-SHA256",
        "1.2.840.113549.1.1.12" => "RSA-SHA384",
        "1.2.840.113549.1.1.13" => "RSA-SHA512",
        "1.2.840.113549.1.1.10" => "RSA-PSS",
        "1.3.101.112" => "ED25519",
        other => other,
    }
    .to_owned()
}
