//! ACME certificates (tls-alpn-01), with our own keys. One `AcmeSlot` per `acme` entry holds
//! what is served for its domains: the issued certificate once there is one, else a
//! self-signed placeholder (never a failed handshake), plus the challenge config that
//! answers validation handshakes. Slots and their ACME clients live in the `AcmeManager`
//! and survive reloads: an unchanged entry keeps its client, its schedule and its account.
//!
//! The order itself (`order.rs`) is driven over instant-acme, not rustls-acme: rustls-acme
//! makes a fresh key for every order, and DANE senders (RFC 7672) defer mail when a renewal
//! changes the key behind a TLSA record. The store (`store.rs`) is a directory several
//! replicas may share: one of them, holding its lock, orders; every replica answers the
//! tls-alpn-01 validation from the challenge files in the store and loads the issued
//! certificate from it while running. One process is the same code with N = 1. A cached
//! certificate is read synchronously when the slot is created, so it is served before any
//! network call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinHandle;

use crate::config::AcmeSpec;

mod order;
mod store;
use crate::metrics::{AcmeEvent, metrics};
use crate::tls::accept::ACME_TLS_ALPN;
use crate::tls::cert::{self, ServedCert};
use crate::tls::store::{ManagedCert, ManagedCerts};
use store::AcmeStore;

/// The tls-alpn-01 answers, from the store's challenge files: whichever replica placed the
/// order, every replica answers (the ACME server's validators land on any of them). Each
/// answer is built here from the digest (a throwaway key, RFC 8737's acmeIdentifier) and
/// kept while the digest stays the same.
#[derive(Debug)]
struct Answers {
    dir: std::path::PathBuf,
    made: Mutex<HashMap<String, Answer>>,
}

/// A built answer and the digest it carries.
type Answer = (Vec<u8>, Arc<CertifiedKey>);

impl ResolvesServerCert for Answers {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Only names of this entry reach here (the store selects the slot by name).
        let name = hello.server_name()?.to_ascii_lowercase();
        let text = std::fs::read_to_string(AcmeStore::challenge_file(&self.dir, &name)).ok()?;
        let digest = from_hex(text.trim())?;
        let mut made = self.made.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((d, answer)) = made.get(&name)
            && *d == digest
        {
            return Some(answer.clone());
        }
        match challenge_cert(&name, &digest) {
            Ok(answer) => {
                let answer = Arc::new(answer);
                made.insert(name, (digest, answer.clone()));
                Some(answer)
            }
            Err(e) => {
                tracing::warn!(name = %name, error = %e, "acme: cannot build the tls-alpn-01 answer");
                None
            }
        }
    }
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The tls-alpn-01 answer for `name` (RFC 8737): self-signed, with the acmeIdentifier
/// extension carrying the SHA-256 of the key authorization.
fn challenge_cert(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    use rcgen::{CertificateParams, CustomExtension};
    use rustls_pki_types::PrivatePkcs8KeyDer;
    let mut params =
        CertificateParams::new(vec![name.to_owned()]).map_err(|e| format!("challenge: {e}"))?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| format!("challenge key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("challenge: {e}"))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `CertifiedKey::from_der`: its key/certificate check parses the certificate with
    // webpki, which refuses the critical acmeIdentifier extension RFC 8737 requires.
    let signer = crate::tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("challenge: {e}"))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

/// What one `acme` entry serves right now.
#[derive(Debug)]
pub struct AcmeSlot {
    pub spec: AcmeSpec,
    placeholder: Arc<ServedCert>,
    issued: ArcSwapOption<ServedCert>,
    challenge: Arc<ServerConfig>,
    /// With `rotate_key`: the TLSA value of the key the next renewal will use.
    next_tlsa: ArcSwapOption<String>,
    /// A problem found while the slot was made (during `snapshot::build`, possibly before
    /// logging is set up): logged when its client starts.
    startup_warning: Mutex<Option<String>>,
}

impl ManagedCert for AcmeSlot {
    fn spec(&self) -> &AcmeSpec {
        &self.spec
    }

    fn issued(&self) -> Option<Arc<ServedCert>> {
        self.issued.load_full()
    }

    fn current(&self) -> Arc<ServedCert> {
        self.issued().unwrap_or_else(|| self.placeholder.clone())
    }

    fn challenge(&self) -> Arc<ServerConfig> {
        self.challenge.clone()
    }

    fn next_tlsa(&self) -> Option<Arc<String>> {
        self.next_tlsa.load_full()
    }
}

impl AcmeSlot {
    fn label(&self) -> String {
        self.spec.domains.join(",")
    }

    /// Parses the cached PEM (private key first, then the chain) and serves it.
    fn publish(&self, pem: &[u8], provider: &CryptoProvider) -> Result<Arc<ServedCert>, String> {
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("key: {e}"))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("chain: {e}"))?;
        if chain.is_empty() {
            return Err("no certificate in the PEM".into());
        }
        let certified =
            CertifiedKey::from_der(chain, key, provider).map_err(|e| format!("key/chain: {e}"))?;
        let served = Arc::new(cert::describe(
            certified,
            format!("acme:{}", self.spec.directory),
        )?);
        let previous = self
            .issued
            .load_full()
            .filter(|p| p.spki_sha256 != served.spki_sha256);
        for name in previous.iter().flat_map(|_| &served.names) {
            let old = previous.as_ref().map(|p| p.tlsa()).unwrap_or_default();
            cert::key_changed(name, &old, &served.tlsa(), "renewal");
        }
        self.issued.store(Some(served.clone()));
        metrics().acme_certificate(
            &served.label,
            &self.label(),
            served.not_after,
            next_renewal(&served),
        );
        Ok(served)
    }
}

/// Renewal is due at notAfter - lifetime/3 (Let's Encrypt's advice for 90-day certificates).
fn next_renewal(cert: &ServedCert) -> Option<i64> {
    let leaf = cert.certified.cert.first()?;
    let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let v = x.validity();
    Some(v.not_after.timestamp() - (v.not_after.timestamp() - v.not_before.timestamp()) / 3)
}

struct Entry {
    slot: Arc<AcmeSlot>,
    task: Option<JoinHandle<()>>,
}

/// Every ACME entry of the process, keyed by its spec.
#[derive(Default)]
pub struct AcmeManager {
    entries: Mutex<HashMap<AcmeSpec, Entry>>,
}

impl std::fmt::Debug for AcmeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AcmeManager")
    }
}

impl ManagedCerts for AcmeManager {
    /// The slot for `spec`, created on first use: the placeholder is generated and a cached
    /// certificate, if the store has one, is served at once. Starts nothing.
    fn slot(
        &self,
        spec: &AcmeSpec,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ManagedCert>, String> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = entries.get(spec) {
            let existing: Arc<dyn ManagedCert> = e.slot.clone();
            return Ok(existing);
        }
        let placeholder = Arc::new(cert::self_signed_for(&spec.domains, provider)?);
        let answers = Arc::new(Answers {
            dir: spec.cache.clone(),
            made: Mutex::default(),
        });
        let mut challenge = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(answers);
        challenge.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        let slot = Arc::new(AcmeSlot {
            spec: spec.clone(),
            placeholder,
            issued: ArcSwapOption::empty(),
            challenge: Arc::new(challenge),
            next_tlsa: ArcSwapOption::empty(),
            startup_warning: Mutex::default(),
        });
        metrics().acme_series(&slot.label());
        let cache = AcmeStore::new(spec);
        if let Ok(Some(pem)) = cache.read(&cache.cert_file()) {
            // Logged when its client starts (`start`): logging may not be set up yet.
            if let Err(e) = slot.publish(&pem, provider) {
                *slot
                    .startup_warning
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(e);
            }
        }
        if spec.rotate_key
            && let Ok(Some(next)) = cache.read_key(&cache.next_key_file())
        {
            let tlsa = cert::tlsa_of_key(&next);
            slot.next_tlsa.store(Some(Arc::new(tlsa)));
        }
        entries.insert(
            spec.clone(),
            Entry {
                slot: slot.clone(),
                task: None,
            },
        );
        let slot: Arc<dyn ManagedCert> = slot;
        Ok(slot)
    }
}

impl AcmeManager {
    /// Starts the ACME client of every slot in `keep` that has none, and stops (and
    /// forgets) the entries not in `keep`. Needs the tokio runtime.
    pub fn sync(&self, keep: &[AcmeSpec], provider: &Arc<CryptoProvider>) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|spec, e| {
            let kept = keep.contains(spec);
            if !kept && let Some(t) = e.task.take() {
                t.abort();
            }
            kept
        });
        for e in entries.values_mut() {
            if e.task.is_none() {
                e.task = Some(start(e.slot.clone(), provider.clone()));
            }
        }
    }
}

impl Drop for AcmeManager {
    fn drop(&mut self) {
        let entries = self
            .entries
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for e in entries.values_mut() {
            if let Some(t) = e.task.take() {
                t.abort();
            }
        }
    }
}

/// Starts the entry's ACME client. A cached certificate is announced here, synchronously:
/// the start-up log says what is served before `ready`.
fn start(slot: Arc<AcmeSlot>, provider: Arc<CryptoProvider>) -> JoinHandle<()> {
    let warning = slot
        .startup_warning
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(e) = warning {
        tracing::warn!(domains = %slot.label(), error = %e, "acme store holds an unusable certificate; ordering a new one");
    }
    if let Some(c) = slot.issued() {
        tracing::info!(
            domains = %slot.label(),
            certificate = %c.label,
            not_after = c.not_after,
            next_renewal = next_renewal(&c).unwrap_or_default(),
            tlsa = %c.tlsa(),
            "acme certificate loaded from cache"
        );
        event(&slot, AcmeEvent::DeployedCached);
    }
    tokio::spawn(order::run(slot, provider))
}

fn event(slot: &AcmeSlot, event: AcmeEvent) {
    metrics().acme_event(&slot.label(), event);
}
