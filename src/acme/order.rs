//! The ACME client of one entry, driven by hand over instant-acme so that the key is ours:
//! the CSR is built with rcgen from the stored key (kept across renewals by default, or the
//! announced next key with `rotate_key`), tls-alpn-01 is answered from the store's challenge
//! files, and renewal happens at two thirds of the lifetime.
//!
//! Every replica runs this loop over the shared store (`store.rs`): it loads what the store
//! holds (a certificate another replica obtained, the next key it announced) every
//! `STORE_POLL`; when a renewal is due it tries the entry's lock, and only the holder
//! registers the account, orders and writes the result; the others keep polling and load
//! it. A failed order sets a retry time in the store, from 2 s doubling to one hour, that
//! every replica honours; the certificate served meanwhile stays.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, Identifier,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::crypto::CryptoProvider;

use super::store::{AcmeStore, LOCK_REFRESH, Lock};
use super::{AcmeSlot, event, next_renewal};
use crate::config::AcmeSpec;
use crate::metrics::AcmeEvent;
use crate::tls::cert;
use crate::tls::store::ManagedCert;

/// What an operator checks when validation fails (README "Certificates from ACME").
const VALIDATION_HINT: &str = "the ACME server connects to port 443 of each domain, which must \
reach an implicit listener of this proxy (DNS and firewall included)";

/// How long one order may wait for validation, then for issuance.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .timeout(Duration::from_secs(120));

/// How often every replica reads the store for a certificate or next key another one wrote.
pub(super) const STORE_POLL: Duration = Duration::from_secs(2);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What this replica last loaded from the store.
#[derive(Default)]
struct Loaded {
    cert: Option<Vec<u8>>,
    next_key: Option<Vec<u8>>,
}

pub(super) async fn run(slot: Arc<AcmeSlot>, provider: Arc<CryptoProvider>) {
    let store = AcmeStore::new(&slot.spec);
    let mut loaded = Loaded {
        // What the slot was created with is already served (and announced by `start`).
        cert: slot
            .issued()
            .and_then(|_| store.read(&store.cert_file()).ok().flatten()),
        next_key: None,
    };
    let mut account: Option<Account> = None;
    let mut failures = 0u32;
    let mut store_failing = false;
    loop {
        load_from_store(&slot, &store, &mut loaded, &provider);
        let need_next_key = slot.spec.rotate_key && loaded.next_key.is_none();
        let due = slot
            .issued()
            .map_or(0, |c| next_renewal(&c).unwrap_or_default());
        let at = due.max(store.retry_at());
        if !need_next_key && now() < at {
            // Not due: sleep, but look at the store again soon (another replica may renew).
            let wait = Duration::from_secs((at - now()).clamp(0, 3600) as u64);
            tokio::time::sleep(wait.min(STORE_POLL)).await;
            continue;
        }
        let lock = match store.try_lock() {
            Ok(Some(lock)) => {
                store_failing = false;
                lock
            }
            Ok(None) => {
                // Another replica holds it: it orders, we load the result.
                tokio::time::sleep(STORE_POLL).await;
                continue;
            }
            Err(e) => {
                if !store_failing {
                    tracing::error!(domains = %slot.label(), error = %e, "acme: cannot write the store; the served certificate stays, retrying");
                }
                store_failing = true;
                event(&slot, AcmeEvent::StoreError);
                failures += 1;
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
        };
        // Under the lock, what the previous holder left counts: read the store again.
        load_from_store(&slot, &store, &mut loaded, &provider);
        let result = held(&slot, &store, &lock, &mut account, &mut loaded, &provider).await;
        match result {
            Ok(()) => {
                failures = 0;
                if let Err(e) = store.set_retry_at(0) {
                    store_error(&slot, &e);
                }
            }
            Err(e) => {
                // A stale account URL or nonce state is not worth diagnosing: start over.
                account = None;
                failures += 1;
                let wait = backoff(failures);
                tracing::warn!(domains = %slot.label(), error = %e, retry_in_s = wait.as_secs(), "acme: order failed; retrying with backoff");
                event(&slot, AcmeEvent::Failed);
                if let Err(e) = store.set_retry_at(now() + wait.as_secs() as i64) {
                    store_error(&slot, &e);
                }
            }
        }
        lock.release();
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_secs((1u64 << failures.min(12)).min(3600))
}

fn store_error(slot: &AcmeSlot, e: &str) {
    tracing::error!(domains = %slot.label(), error = %e, "acme: cannot write the store");
    event(slot, AcmeEvent::StoreError);
}

/// Serves what the store holds when it changed since the last look: a certificate (and its
/// key) another replica obtained, the next key it announced.
fn load_from_store(
    slot: &AcmeSlot,
    store: &AcmeStore,
    loaded: &mut Loaded,
    provider: &Arc<CryptoProvider>,
) {
    if let Ok(Some(pem)) = store.read(&store.cert_file())
        && loaded.cert.as_ref() != Some(&pem)
    {
        match slot.publish(&pem, provider) {
            Ok(served) => {
                tracing::info!(
                    domains = %slot.label(),
                    certificate = %served.label,
                    not_after = served.not_after,
                    next_renewal = next_renewal(&served).unwrap_or_default(),
                    tlsa = %served.tlsa(),
                    "acme certificate loaded from the store"
                );
                event(slot, AcmeEvent::Loaded);
            }
            Err(e) => {
                tracing::warn!(domains = %slot.label(), error = %e, "acme: the store holds an unusable certificate");
            }
        }
        loaded.cert = Some(pem);
    }
    if slot.spec.rotate_key {
        let next = store.read(&store.next_key_file()).ok().flatten();
        if next != loaded.next_key {
            if let Some(Ok(Some(key))) = next
                .as_ref()
                .map(|_| store.read_key(&store.next_key_file()))
            {
                let tlsa = cert::tlsa_of_key(&key);
                if slot.next_tlsa().as_deref() != Some(&tlsa) {
                    tracing::info!(domains = %slot.label(), next_tlsa = %tlsa, "acme: next key for the renewal after this certificate; publish its TLSA record (beside the current one) before then");
                }
                slot.next_tlsa.store(Some(Arc::new(tlsa)));
            }
            loaded.next_key = next;
        }
    }
}

/// The lock holder's work: the next key if one must be announced, and the order if the
/// certificate is due. The lock is marked alive meanwhile.
async fn held(
    slot: &AcmeSlot,
    store: &AcmeStore,
    lock: &Lock,
    account: &mut Option<Account>,
    loaded: &mut Loaded,
    provider: &Arc<CryptoProvider>,
) -> Result<(), String> {
    let work = async {
        if slot.spec.rotate_key && loaded.next_key.is_none() && slot.issued().is_some() {
            announce_next_key(slot, store, false, loaded)?;
        }
        let due = slot
            .issued()
            .map_or(0, |c| next_renewal(&c).unwrap_or_default());
        if now() < due.max(store.retry_at()) {
            return Ok(());
        }
        match slot.issued() {
            Some(c) => {
                tracing::info!(domains = %slot.label(), certificate = %c.label, "acme: renewing the certificate");
            }
            None => {
                tracing::info!(domains = %slot.label(), directory = %slot.spec.directory, "acme: ordering a certificate");
            }
        }
        event(slot, AcmeEvent::Ordered);
        let result = order(slot, store, lock, account, loaded, provider).await;
        for name in &slot.spec.domains {
            let _ = store.remove(&AcmeStore::challenge_file(store.dir(), name));
        }
        result
    };
    tokio::pin!(work);
    let mut refresh = tokio::time::interval(LOCK_REFRESH);
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = refresh.tick() => {
                if !lock.refresh() {
                    return Err("the store lock was taken over (this replica was too slow to mark it alive)".into());
                }
            }
        }
    }
}

/// One order, from the account to the served and stored certificate; only under the lock.
async fn order(
    slot: &AcmeSlot,
    cache: &AcmeStore,
    lock: &Lock,
    account: &mut Option<Account>,
    loaded: &mut Loaded,
    provider: &Arc<CryptoProvider>,
) -> Result<(), String> {
    let acct = match account {
        Some(a) => a.clone(),
        None => account
            .insert(open_account(&slot.spec, cache, provider).await?)
            .clone(),
    };
    let (key, rotated) = order_key(slot, cache)?;
    let ids: Vec<Identifier> = slot
        .spec
        .domains
        .iter()
        .cloned()
        .map(Identifier::Dns)
        .collect();
    let mut order = acct
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(|e| format!("new order: {e}"))?;
    {
        let mut authorizations = order.authorizations();
        while let Some(a) = authorizations.next().await {
            let mut a = a.map_err(|e| format!("authorization: {e}"))?;
            match a.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => return Err(format!("authorization is {other:?}")),
            }
            let mut challenge = a
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or("the ACME server offers no tls-alpn-01 challenge")?;
            let name = challenge.identifier().to_string().to_ascii_lowercase();
            // Every replica answers from the store: write the answer before asking.
            let digest = challenge.key_authorization().digest();
            let hex = crate::hex::hex(digest.as_ref());
            cache.write(
                &AcmeStore::challenge_file(cache.dir(), &name),
                hex.as_bytes(),
            )?;
            challenge
                .set_ready()
                .await
                .map_err(|e| format!("challenge for {name}: {e}"))?;
        }
    }
    let status = order
        .poll_ready(&POLL)
        .await
        .map_err(|e| format!("validation: {e}; {VALIDATION_HINT}"))?;
    if status != OrderStatus::Ready {
        return Err(format!(
            "order is {status:?} after validation; {VALIDATION_HINT}"
        ));
    }
    if !lock.held() {
        return Err("the store lock was taken over before finalizing".into());
    }
    let mut params =
        CertificateParams::new(slot.spec.domains.clone()).map_err(|e| format!("CSR: {e}"))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("CSR: {e}"))?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(|e| format!("finalize: {e}"))?;
    let chain = order
        .poll_certificate(&POLL)
        .await
        .map_err(|e| format!("certificate: {e}"))?;
    event(slot, AcmeEvent::Issued);
    let pem = format!("{}\n{chain}", key.serialize_pem());
    // Serve first: a full disk must not keep a fresh certificate off the wire.
    let served = slot.publish(pem.as_bytes(), provider)?;
    loaded.cert = Some(pem.clone().into_bytes());
    // The key first: a replica that loads the certificate then finds its key current.
    let stored = cache
        .write(&cache.key_file(), key.serialize_pem().as_bytes())
        .and_then(|()| cache.write(&cache.cert_file(), pem.as_bytes()));
    if let Err(e) = stored {
        tracing::error!(domains = %slot.label(), error = %e, "acme: cannot store the certificate; the other replicas and a restart will not have it");
        event(slot, AcmeEvent::StoreError);
    }
    tracing::info!(
        domains = %slot.label(),
        certificate = %served.label,
        not_after = served.not_after,
        next_renewal = next_renewal(&served).unwrap_or_default(),
        tlsa = %served.tlsa(),
        "acme certificate deployed"
    );
    event(slot, AcmeEvent::Deployed);
    if rotated {
        announce_next_key(slot, cache, true, loaded)?;
    }
    Ok(())
}

/// The key to order with: with `rotate_key`, a renewal uses the announced next key;
/// otherwise the current key is kept (made and stored on the first order).
fn order_key(slot: &AcmeSlot, cache: &AcmeStore) -> Result<(KeyPair, bool), String> {
    if slot.spec.rotate_key && slot.issued().is_some() {
        if let Some(k) = cache.read_key(&cache.next_key_file())? {
            return Ok((k, true));
        }
        // Nothing announced (the file was removed): the swap's key-change warning says it.
        return Ok((new_key()?, true));
    }
    if let Some(k) = cache.current_key()? {
        return Ok((k, false));
    }
    let k = new_key()?;
    cache.write(&cache.key_file(), k.serialize_pem().as_bytes())?;
    Ok((k, false))
}

fn new_key() -> Result<KeyPair, String> {
    // ECDSA P-256: the cheapest handshake; every sending MTA of the interop set takes it.
    KeyPair::generate().map_err(|e| format!("key generation: {e}"))
}

/// With `rotate_key`, under the lock: makes the next key when there is none (or when
/// `replace`, after it was used), stores it, and logs its TLSA value so it can be published
/// ahead of its use. The other replicas load it from the store.
fn announce_next_key(
    slot: &AcmeSlot,
    store: &AcmeStore,
    replace: bool,
    loaded: &mut Loaded,
) -> Result<(), String> {
    let path = store.next_key_file();
    let existing = if replace {
        None
    } else {
        store.read_key(&path).unwrap_or_else(|e| {
            tracing::warn!(domains = %slot.label(), error = %e, "acme: the next key is unusable; making a new one");
            None
        })
    };
    let key = match existing {
        Some(k) => k,
        None => {
            let k = new_key()?;
            store.write(&path, k.serialize_pem().as_bytes())?;
            k
        }
    };
    loaded.next_key = store.read(&path).ok().flatten();
    let tlsa = cert::tlsa_of_key(&key);
    tracing::info!(domains = %slot.label(), next_tlsa = %tlsa, "acme: next key for the renewal after this certificate; publish its TLSA record (beside the current one) before then");
    slot.next_tlsa.store(Some(Arc::new(tlsa)));
    Ok(())
}

/// The account from the cache, or a new one (stored at once).
async fn open_account(
    spec: &AcmeSpec,
    cache: &AcmeStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Account, String> {
    let http = http_client(spec, provider)?;
    let path = cache.account_file();
    let cached = cache
        .read(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(json) = cached {
        match serde_json::from_slice::<AccountCredentials>(&json) {
            Ok(credentials) => {
                return Account::builder_with_http(http)
                    .from_credentials(credentials)
                    .await
                    .map_err(|e| format!("account: {e}"));
            }
            Err(e) => {
                tracing::warn!(account = %path.display(), error = %e, "acme: the cached account is unusable; creating a new one");
            }
        }
    }
    let contact: Vec<&str> = spec.contact.iter().map(String::as_str).collect();
    let (account, credentials) = Account::builder_with_http(http)
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            spec.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("new account: {e}"))?;
    let json = serde_json::to_vec(&credentials).map_err(|e| e.to_string())?;
    cache.write(&path, &json)?;
    Ok(account)
}

/// HTTPS to the directory with our provider: only `directory_ca` when given, else the
/// system's trust store.
fn http_client(
    spec: &AcmeSpec,
    provider: &Arc<CryptoProvider>,
) -> Result<Box<dyn instant_acme::HttpClient>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match &spec.directory_ca {
        Some(ca) => builder
            .with_root_certificates(crate::tls::client_auth::load_roots(ca)?)
            .with_no_client_auth(),
        None => {
            use rustls_platform_verifier::BuilderVerifierExt as _;
            builder
                .with_platform_verifier()
                .map_err(|e| format!("system trust store: {e}"))?
                .with_no_client_auth()
        }
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, BodyWrapper<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    Ok(Box::new(client))
}
