//! The ACME client of one entry, driven by hand over instant-acme so that the key is ours:
//! the CSR is built with rcgen from the cached key (kept across renewals by default, or the
//! announced next key with `rotate_key`), tls-alpn-01 is answered by the slot's challenge
//! certificates, and renewal happens at two thirds of the lifetime. A failure is retried
//! with a backoff from 2 s doubling to one hour; the certificate served meanwhile stays.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, Identifier,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::cache::SecureDirCache;
use super::{AcmeSlot, event, next_renewal};
use crate::config::AcmeSpec;
use crate::tls::cert;

/// What an operator checks when validation fails (README "Certificates from ACME").
const VALIDATION_HINT: &str = "the ACME server connects to port 443 of each domain, which must \
reach an implicit listener of this proxy (DNS and firewall included)";

/// How long one order may wait for validation, then for issuance.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .timeout(Duration::from_secs(120));

pub(super) async fn run(slot: Arc<AcmeSlot>, provider: Arc<CryptoProvider>) {
    let cache = SecureDirCache::new(&slot.spec);
    if slot.spec.rotate_key {
        announce_next_key(&slot, &cache, false);
    }
    let mut account: Option<Account> = None;
    let mut failures = 0u32;
    loop {
        match slot.issued() {
            Some(c) => {
                wait_until(next_renewal(&c).unwrap_or_default()).await;
                tracing::info!(domains = %slot.label(), certificate = %c.label, "acme: renewing the certificate");
            }
            None => {
                tracing::info!(domains = %slot.label(), directory = %slot.spec.directory, "acme: ordering a certificate");
            }
        }
        event(&slot, "ordered");
        match order(&slot, &cache, &mut account, &provider).await {
            Ok(()) => failures = 0,
            Err(e) => {
                slot.answers.clear();
                // A stale account URL or nonce state is not worth diagnosing: start over.
                account = None;
                failures += 1;
                let wait = Duration::from_secs((1u64 << failures.min(12)).min(3600));
                tracing::warn!(domains = %slot.label(), error = %e, retry_in_s = wait.as_secs(), "acme: order failed; retrying with backoff");
                event(&slot, "failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Sleeps until the Unix time `at` by the wall clock, in steps of at most an hour (a
/// suspended machine or a clock step must not push a renewal out by the whole wait).
async fn wait_until(at: i64) {
    for _ in 0..100_000 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if now >= at {
            return;
        }
        tokio::time::sleep(Duration::from_secs((at - now).min(3600) as u64)).await;
    }
}

/// One order, from the account to the served and cached certificate.
async fn order(
    slot: &AcmeSlot,
    cache: &SecureDirCache,
    account: &mut Option<Account>,
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
            let name = challenge.identifier().to_string();
            let answer = challenge_cert(&name, challenge.key_authorization().digest().as_ref())?;
            slot.answers.set(&name, Arc::new(answer));
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
    slot.answers.clear();
    if status != OrderStatus::Ready {
        return Err(format!(
            "order is {status:?} after validation; {VALIDATION_HINT}"
        ));
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
    event(slot, "issued");
    let pem = format!("{}\n{chain}", key.serialize_pem());
    // Serve first: a full disk must not keep a fresh certificate off the wire.
    let served = slot.publish(pem.as_bytes(), provider)?;
    let stored = cache
        .write(&cache.cert_file(), pem.as_bytes())
        .and_then(|()| {
            // The key just used is the current one from now on.
            cache.write(&cache.key_file(), key.serialize_pem().as_bytes())
        });
    if let Err(e) = stored {
        tracing::error!(domains = %slot.label(), cache = %slot.spec.cache.display(), error = %e, "acme: cannot store the certificate; a restart will order a new one");
    }
    tracing::info!(
        domains = %slot.label(),
        certificate = %served.label,
        not_after = served.not_after,
        next_renewal = next_renewal(&served).unwrap_or_default(),
        tlsa = %served.tlsa(),
        "acme certificate deployed"
    );
    event(slot, "deployed");
    if rotated {
        announce_next_key(slot, cache, true);
    }
    Ok(())
}

/// The key to order with: with `rotate_key`, a renewal uses the announced next key;
/// otherwise the current key is kept (made and stored on the first order).
fn order_key(slot: &AcmeSlot, cache: &SecureDirCache) -> Result<(KeyPair, bool), String> {
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
    cache
        .write(&cache.key_file(), k.serialize_pem().as_bytes())
        .map_err(|e| format!("{}: {e}", cache.key_file().display()))?;
    Ok((k, false))
}

fn new_key() -> Result<KeyPair, String> {
    // ECDSA P-256: the cheapest handshake; every sending MTA of the interop set takes it.
    KeyPair::generate().map_err(|e| format!("key generation: {e}"))
}

/// With `rotate_key`: makes the next key when there is none (or when `replace`, after it
/// was used), stores it, and logs its TLSA value so it can be published ahead of its use.
fn announce_next_key(slot: &AcmeSlot, cache: &SecureDirCache, replace: bool) {
    let path = cache.next_key_file();
    let existing = if replace {
        None
    } else {
        cache.read_key(&path).unwrap_or_else(|e| {
            tracing::warn!(domains = %slot.label(), error = %e, "acme: the next key is unusable; making a new one");
            None
        })
    };
    let key = match existing {
        Some(k) => k,
        None => {
            let made = new_key().and_then(|k| {
                cache
                    .write(&path, k.serialize_pem().as_bytes())
                    .map(|()| k)
                    .map_err(|e| format!("{}: {e}", path.display()))
            });
            match made {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(domains = %slot.label(), error = %e, "acme: cannot store the next key");
                    return;
                }
            }
        }
    };
    let tlsa = cert::tlsa_of_key(&key);
    tracing::info!(domains = %slot.label(), next_tlsa = %tlsa, "acme: next key for the renewal after this certificate; publish its TLSA record (beside the current one) before then");
    slot.next_tlsa.store(Some(Arc::new(tlsa)));
}

/// The account from the cache, or a new one (stored at once).
async fn open_account(
    spec: &AcmeSpec,
    cache: &SecureDirCache,
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
                tracing::warn!(account = %path.display(), error = %e, "acme: the cached account is unusable; creating a new one")
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
    cache
        .write(&path, &json)
        .map_err(|e| format!("{}: {e}", path.display()))?;
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

/// The tls-alpn-01 answer for `name` (RFC 8737): self-signed, with the acmeIdentifier
/// extension carrying the SHA-256 of the key authorization.
fn challenge_cert(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let mut params =
        CertificateParams::new(vec![name.to_owned()]).map_err(|e| format!("challenge: {e}"))?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let key = new_key()?;
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
