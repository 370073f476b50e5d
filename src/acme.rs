//! ACME certificates (tls-alpn-01), with our own keys. One `AcmeSlot` per `acme` entry holds
//! what is served for its domains: the issued certificate once there is one, else a
//! self-signed placeholder (never a failed handshake), plus the challenge config that
//! answers validation handshakes. Slots and their ACME clients live in the `AcmeManager`
//! and survive reloads: an unchanged entry keeps its client, its schedule and its account.
//!
//! The order itself (`order.rs`) is driven over instant-acme, not rustls-acme: rustls-acme
//! makes a fresh key for every order, and DANE senders (RFC 7672) defer mail when a renewal
//! changes the key behind a TLSA record. The cache (`cache.rs`) is written 0600 via a
//! temporary file and a rename, in a 0700 directory; a cached certificate is read
//! synchronously when the slot is created, so it is served before any network call.

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

mod cache;
mod order;
use crate::metrics::{AcmeLabels, CertLabels, DomainsLabel, metrics};
use crate::tls::cert::{self, ServedCert};
use cache::SecureDirCache;

/// The ALPN protocol of tls-alpn-01 validation handshakes (RFC 8737).
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A validation handshake offers `acme-tls/1` and nothing else (RFC 8737 section 3).
pub(crate) fn is_challenge_hello(hello: &ClientHello<'_>) -> bool {
    hello.alpn().is_some_and(|mut protocols| {
        protocols.next() == Some(ACME_TLS_ALPN) && protocols.next().is_none()
    })
}

/// The tls-alpn-01 answers of the order in flight, by name.
#[derive(Debug, Default)]
struct Answers(Mutex<HashMap<String, Arc<CertifiedKey>>>);

impl Answers {
    fn set(&self, name: &str, answer: Arc<CertifiedKey>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(name.to_ascii_lowercase(), answer);
    }

    fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl ResolvesServerCert for Answers {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&name).cloned()
    }
}

/// What one `acme` entry serves right now.
#[derive(Debug)]
pub struct AcmeSlot {
    pub spec: AcmeSpec,
    placeholder: Arc<ServedCert>,
    issued: ArcSwapOption<ServedCert>,
    answers: Arc<Answers>,
    challenge: Arc<ServerConfig>,
    /// With `rotate_key`: the TLSA value of the key the next renewal will use.
    next_tlsa: ArcSwapOption<String>,
}

impl AcmeSlot {
    /// The issued certificate, if any.
    pub fn issued(&self) -> Option<Arc<ServedCert>> {
        self.issued.load_full()
    }

    /// The issued certificate, else the self-signed placeholder for the domains.
    pub fn current(&self) -> Arc<ServedCert> {
        self.issued().unwrap_or_else(|| self.placeholder.clone())
    }

    /// The config that answers tls-alpn-01 validation handshakes.
    pub fn challenge(&self) -> Arc<ServerConfig> {
        self.challenge.clone()
    }

    /// With `rotate_key`: the TLSA value (`3 1 1 <hex>`) of the next key, once made.
    pub fn next_tlsa(&self) -> Option<Arc<String>> {
        self.next_tlsa.load_full()
    }

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
        metrics()
            .cert_expiry
            .get_or_create(&CertLabels {
                certificate: served.label.clone(),
                origin: "acme".into(),
            })
            .set(served.not_after);
        if let Some(next) = next_renewal(&served) {
            metrics()
                .acme_next_renewal
                .get_or_create(&DomainsLabel {
                    domains: self.label(),
                })
                .set(next as f64);
        }
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

impl AcmeManager {
    /// The slot for `spec`, created on first use: the placeholder is generated and a cached
    /// certificate, if the cache has one, is served at once. Starts nothing.
    pub fn slot(
        &self,
        spec: &AcmeSpec,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<AcmeSlot>, String> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = entries.get(spec) {
            return Ok(e.slot.clone());
        }
        let placeholder = Arc::new(cert::self_signed_for(&spec.domains, provider)?);
        let answers = Arc::new(Answers::default());
        let mut challenge = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(answers.clone());
        challenge.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        let slot = Arc::new(AcmeSlot {
            spec: spec.clone(),
            placeholder,
            issued: ArcSwapOption::empty(),
            answers,
            challenge: Arc::new(challenge),
            next_tlsa: ArcSwapOption::empty(),
        });
        let cache = SecureDirCache::new(spec);
        if let Ok(Some(pem)) = cache.read(&cache.cert_file()) {
            // Logged when its client starts (`order::run`): logging may not be set up yet.
            if let Err(e) = slot.publish(&pem, provider) {
                tracing::warn!(domains = %slot.label(), error = %e, "acme cache holds an unusable certificate; ordering a new one")
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
        Ok(slot)
    }

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
    if let Some(c) = slot.issued() {
        tracing::info!(
            domains = %slot.label(),
            certificate = %c.label,
            not_after = c.not_after,
            next_renewal = next_renewal(&c).unwrap_or_default(),
            tlsa = %c.tlsa(),
            "acme certificate loaded from cache"
        );
        event(&slot, "deployed_cached");
    }
    tokio::spawn(order::run(slot, provider))
}

fn event(slot: &AcmeSlot, event: &str) {
    metrics()
        .acme_events
        .get_or_create(&AcmeLabels {
            domains: slot.label(),
            event: event.to_owned(),
        })
        .inc();
}
