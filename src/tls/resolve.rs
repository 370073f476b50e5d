//! Certificate choice as a pure function of the store, the ClientHello facts and the
//! listener's policy. Called once before the handshake (for the decision, logs and the
//! `unrecognized_name` alert) and again by rustls through `ListenerResolver`.

use std::borrow::Cow;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, SignatureScheme};

use super::cert::{KeyKind, ServedCert};
use super::store::CertStore;
use crate::config::UnknownSni;

/// What the client said that matters for the choice.
pub struct HelloFacts<'a> {
    pub sni: Option<&'a str>,
    pub schemes: &'a [SignatureScheme],
    pub suites: &'a [CipherSuite],
}

impl<'a> HelloFacts<'a> {
    pub fn from_hello(hello: &'a ClientHello<'a>) -> Self {
        HelloFacts {
            sni: hello.server_name(),
            schemes: hello.signature_schemes(),
            suites: hello.cipher_suites(),
        }
    }
}

/// The decision: serve this certificate (and whether the SNI fallback was used), or refuse.
#[derive(Debug, Clone)]
pub enum CertChoice {
    Serve {
        cert: Arc<ServedCert>,
        fallback: bool,
    },
    /// `unknown_sni: reject` and the SNI names nothing we serve.
    Reject,
}

/// Exact name, one-label wildcard, else the listener's policy. No SNI (or an IP literal)
/// always gets the default certificate: many sending MTAs send no SNI.
pub(crate) fn resolve(
    store: &CertStore,
    default: &[Arc<ServedCert>],
    policy: UnknownSni,
    hello: &HelloFacts<'_>,
) -> CertChoice {
    let sni = hello
        .sni
        .filter(|s| s.parse::<std::net::IpAddr>().is_err())
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
    let (candidates, fallback) = match sni.as_deref().and_then(|s| store.candidates(s)) {
        Some(found) => (found, false),
        None if sni.is_none() => (Cow::Borrowed(default), false),
        None => match policy {
            UnknownSni::Default => (Cow::Borrowed(default), true),
            UnknownSni::Reject => return CertChoice::Reject,
        },
    };
    match pick(&candidates, hello) {
        Some(cert) => CertChoice::Serve { cert, fallback },
        None => CertChoice::Reject,
    }
}

/// First candidate whose key can sign with one of the client's schemes; ECDSA in TLS 1.2
/// also needs an ECDHE_ECDSA suite. Falls back to the first candidate, so the handshake
/// fails in rustls with a precise alert rather than here.
fn pick(candidates: &[Arc<ServedCert>], hello: &HelloFacts<'_>) -> Option<Arc<ServedCert>> {
    let tls13 = hello
        .suites
        .iter()
        .any(|s| (0x1301..=0x1305).contains(&u16::from(*s)));
    let ecdhe_ecdsa = hello
        .suites
        .iter()
        .any(|s| matches!(u16::from(*s), 0xC02B | 0xC02C | 0xCCA9));
    candidates
        .iter()
        .find(|c| {
            c.certified.key.choose_scheme(hello.schemes).is_some()
                && (!matches!(c.key_kind, KeyKind::Ecdsa { .. }) || tls13 || ecdhe_ecdsa)
        })
        .or_else(|| candidates.first())
        .cloned()
}

/// The rustls hook for one listener; repeats the pure decision made before the handshake.
#[derive(Debug)]
pub struct ListenerResolver {
    pub store: Arc<CertStore>,
    /// The listener's `hostname`: its certificates are the default (looked up at each
    /// handshake, since an ACME certificate can arrive while the store lives).
    pub default_name: String,
    pub policy: UnknownSni,
}

impl ListenerResolver {
    pub fn default_certs(&self) -> Cow<'_, [Arc<ServedCert>]> {
        self.store
            .candidates(&self.default_name)
            .unwrap_or_default()
    }

    pub fn choose(&self, hello: &HelloFacts<'_>) -> CertChoice {
        resolve(&self.store, &self.default_certs(), self.policy, hello)
    }
}

impl ResolvesServerCert for ListenerResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.choose(&HelloFacts::from_hello(&client_hello)) {
            CertChoice::Serve { cert, .. } => Some(cert.certified.clone()),
            CertChoice::Reject => None,
        }
    }
}
