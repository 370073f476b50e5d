//! ACME certificates through rustls-acme (tls-alpn-01). One `AcmeSlot` per `acme` entry holds
//! what is served for its domains: the issued certificate once there is one, else a
//! self-signed placeholder (never a failed handshake), plus the challenge config that
//! answers validation handshakes. Slots and their ACME clients live in the `AcmeManager`
//! and survive reloads: an unchanged entry keeps its client, its schedule and its account.
//!
//! The cache (`SecureDirCache`) is ours, not rustls-acme's `DirCache`, which writes the
//! private keys with the process umask and non-atomically: ours writes 0600 files via a
//! temporary file and a rename, in a 0700 directory. It also feeds the slot: a cached
//! certificate is read synchronously when the slot is created (served before any network
//! call), and every newly issued one is published the moment rustls-acme stores it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_acme::{AcmeConfig, EventOk};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinHandle;

use crate::config::AcmeSpec;

mod cache;
use crate::metrics::{AcmeLabels, CertLabels, DomainsLabel, metrics};
use crate::tls::cert::{self, ServedCert};
pub use cache::SecureDirCache;

/// What one `acme` entry serves right now.
#[derive(Debug)]
pub struct AcmeSlot {
    pub spec: AcmeSpec,
    placeholder: Arc<ServedCert>,
    issued: ArcSwapOption<ServedCert>,
    challenge: ArcSwapOption<ServerConfig>,
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

    /// The tls-alpn-01 answering config, once the ACME client runs.
    pub fn challenge(&self) -> Option<Arc<ServerConfig>> {
        self.challenge.load_full()
    }

    fn label(&self) -> String {
        self.spec.domains.join(",")
    }

    /// Parses rustls-acme's PEM (private key first, then the chain) and serves it.
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

/// rustls-acme renews at notAfter - lifetime/3; the same figure, for logs and metrics.
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
        let slot = Arc::new(AcmeSlot {
            spec: spec.clone(),
            placeholder,
            issued: ArcSwapOption::empty(),
            challenge: ArcSwapOption::empty(),
        });
        let cache = SecureDirCache::new(&spec.cache, slot.clone(), provider.clone());
        if let Ok(Some(pem)) = cache.read(&cache.cert_file(&spec.domains, &spec.directory)) {
            match slot.publish(&pem, provider) {
                Ok(c) => {
                    tracing::info!(domains = %slot.label(), certificate = %c.label, "acme certificate loaded from cache")
                }
                Err(e) => {
                    tracing::warn!(domains = %slot.label(), error = %e, "acme cache holds an unusable certificate; ordering a new one")
                }
            }
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

/// The trust for a private ACME server: its `directory_ca` alone.
fn client_config(
    ca: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = crate::tls::client_auth::load_roots(ca)?;
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn start(slot: Arc<AcmeSlot>, provider: Arc<CryptoProvider>) -> JoinHandle<()> {
    let spec = slot.spec.clone();
    let base = match spec
        .directory_ca
        .as_deref()
        .map(|ca| client_config(ca, &provider))
    {
        // No directory_ca: the web PKI (webpki-roots), as for Let's Encrypt.
        None => AcmeConfig::new_with_provider(spec.domains.clone(), provider.clone()),
        Some(Ok(c)) => AcmeConfig::new_with_client_config(spec.domains.clone(), c),
        Some(Err(e)) => {
            // Validated at load, so only a file that vanished since gets here.
            tracing::error!(domains = %slot.label(), error = %e, "acme: cannot read directory_ca; not ordering");
            return tokio::spawn(async {});
        }
    };
    let cache = SecureDirCache::new(&spec.cache, slot.clone(), provider.clone());
    let mut state = base
        .contact(spec.contact.iter())
        .directory(&spec.directory)
        .cache(cache)
        .state();
    slot.challenge.store(Some(
        state.challenge_rustls_config_with_provider(provider.clone()),
    ));
    match slot.issued() {
        Some(c) => tracing::info!(
            domains = %slot.label(),
            certificate = %c.label,
            not_after = c.not_after,
            next_renewal = next_renewal(&c).unwrap_or_default(),
            "acme certificate loaded from cache"
        ),
        None => {
            tracing::info!(domains = %slot.label(), directory = %spec.directory, "acme: ordering a certificate");
            event(&slot, "ordered");
        }
    }
    tokio::spawn(async move {
        while let Some(ev) = state.next().await {
            match ev {
                Ok(EventOk::DeployedNewCert) => {
                    event(&slot, "issued");
                }
                Ok(EventOk::CertCacheStore) => {
                    let c = slot.current();
                    let next = next_renewal(&c).unwrap_or_default();
                    tracing::info!(
                        domains = %slot.label(),
                        certificate = %c.label,
                        not_after = c.not_after,
                        next_renewal = next,
                        "acme certificate deployed"
                    );
                    event(&slot, "deployed");
                }
                Ok(EventOk::DeployedCachedCert) => event(&slot, "deployed_cached"),
                Ok(EventOk::AccountCacheStore) => {}
                Err(e) => {
                    tracing::warn!(domains = %slot.label(), error = %e, "acme: order failed; retrying with backoff");
                    event(&slot, "failed");
                }
            }
        }
    })
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
