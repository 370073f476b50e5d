//! A served certificate and what is read from its leaf once, when it is loaded: names, key
//! type, signature algorithm, expiry, and the SHA-256 of its SubjectPublicKeyInfo (the
//! DANE `3 1 1` TLSA value). Shared by the store and ACME, which import it and not each
//! other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::public_key::PublicKey;

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
    pub(crate) fn rank(self) -> u8 {
        match self {
            Self::Ecdsa { .. } => 0,
            Self::Ed25519 => 1,
            Self::Rsa { .. } => 2,
            Self::Other => 3,
        }
    }

    /// PROXY v2 `PP2_SUBTYPE_SSL_KEY_ALG` value, HAProxy style (`EC256`, `RSA2048`).
    fn key_alg(self) -> String {
        match self {
            Self::Ecdsa { bits } => format!("EC{bits}"),
            Self::Rsa { bits } => format!("RSA{bits}"),
            Self::Ed25519 => "ED25519".to_owned(),
            Self::Other => "UNKNOWN".to_owned(),
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
    /// SHA-256 of the leaf's SubjectPublicKeyInfo: TLSA `3 1 1` (RFC 7671).
    pub spki_sha256: [u8; 32],
}

/// Logs and counts a change of the key served for `name` (`how`: `reload` or `renewal`).
pub(crate) fn key_changed(name: &str, old_tlsa: &str, new_tlsa: &str, how: &'static str) {
    tracing::warn!(
        name,
        old_tlsa,
        new_tlsa,
        cause = how,
        "the key served for this name changed: update its TLSA record (DANE senders defer mail until it matches)"
    );
    crate::metrics::metrics().certificate_key_change(name);
}

impl ServedCert {
    /// The TLSA record data for this key, `3 1 1 <hex>` (DANE-EE, SPKI, SHA-256).
    pub fn tlsa(&self) -> String {
        tlsa_of_digest(&self.spki_sha256)
    }
}

/// `3 1 1 <hex>` for a key not yet in a certificate (its SubjectPublicKeyInfo).
pub(crate) fn tlsa_of_key(key: &impl rcgen::PublicKeyData) -> String {
    let spki = key.subject_public_key_info();
    tlsa_of_digest(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki).as_ref())
}

fn tlsa_of_digest(digest: &[u8]) -> String {
    format!("3 1 1 {}", crate::hex::hex(digest))
}

/// Reads names, key type, signature algorithm and expiry from the leaf.
pub(crate) fn describe(certified: CertifiedKey, origin: String) -> Result<ServedCert, String> {
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
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, x509.public_key().raw);
    let mut spki_sha256 = [0u8; 32];
    spki_sha256.copy_from_slice(digest.as_ref());
    Ok(ServedCert {
        certified: Arc::new(certified),
        names,
        key_kind,
        key_alg: key_kind.key_alg(),
        sig_alg,
        not_after,
        origin,
        label,
        spki_sha256,
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

/// A generated self-signed certificate and its PKCS#8 key.
type Generated = (CertificateDer<'static>, Vec<u8>);

/// A self-signed certificate for `names`, generated once per name list and process.
pub(crate) fn self_signed_for(
    names: &[String],
    provider: &CryptoProvider,
) -> Result<ServedCert, String> {
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
