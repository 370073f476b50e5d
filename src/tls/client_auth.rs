//! Client-certificate policy per listener: `none` sends no CertificateRequest (the Gmail
//! "Send mail as" fix), `request` asks and accepts any well-formed certificate or none,
//! `require` enforces a chain to `client_ca`. After the handshake the presented chain is
//! judged against `client_ca` for logs and the PROXY SSL TLV, never failing the session.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Loads a PEM CA bundle into a root store. The error is the reason only; callers add the key.
pub(crate) fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("unusable CA certificate in {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("no CA certificate in {}", path.display()));
    }
    Ok(roots)
}

/// A verifier that always checks chains to `roots` (used for `require`, and post-handshake for `request`).
pub(crate) fn chain_verifier(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("cannot build a verifier: {e}"))
}

/// `client_cert: request`: offers client auth, never makes it mandatory, accepts any chain,
/// but still checks the client's handshake signature (proof of possession of the key).
#[derive(Debug)]
pub(crate) struct RequestAnyCert {
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl RequestAnyCert {
    pub(crate) fn new(roots: Option<&RootCertStore>, provider: &CryptoProvider) -> Self {
        Self {
            hints: roots.map(RootCertStore::subjects).unwrap_or_default(),
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for RequestAnyCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The verdict on a presented client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientVerify {
    /// Chains to `client_ca`.
    Ok,
    /// Presented, but no `client_ca` to judge it against.
    NoCa,
    /// Presented and rejected by `client_ca`, with webpki's reason.
    Failed(String),
}

impl ClientVerify {
    /// The metric label: `ok`, `no_ca` or `failed`.
    pub(crate) fn class(&self) -> crate::metrics::ClientCertVerify {
        match self {
            Self::Ok => crate::metrics::ClientCertVerify::Ok,
            Self::NoCa => crate::metrics::ClientCertVerify::NoCa,
            Self::Failed(_) => crate::metrics::ClientCertVerify::Failed,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            Self::Ok => "ok",
            Self::NoCa => "no_ca",
            Self::Failed(reason) => reason,
        }
    }
}

/// What the client's certificate said, if it sent one.
#[derive(Debug, Clone)]
pub(crate) struct ClientCertFacts {
    pub sha256: [u8; 32],
    pub cn: Option<String>,
    pub verify: ClientVerify,
}

impl ClientCertFacts {
    pub(crate) fn fingerprint_hex(&self) -> String {
        crate::hex::hex(&self.sha256)
    }
}

/// Judges the chain rustls accepted. `judge` is the `client_ca` verifier, when configured.
pub(crate) fn facts(
    chain: Option<&[CertificateDer<'static>]>,
    judge: Option<&Arc<dyn ClientCertVerifier>>,
) -> Option<ClientCertFacts> {
    let chain = chain?;
    let leaf = chain.first()?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(digest.as_ref());
    let cn = X509Certificate::from_der(leaf.as_ref())
        .ok()
        .and_then(|(_, x)| {
            x.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok().map(str::to_owned))
        });
    let verify = match judge {
        None => ClientVerify::NoCa,
        Some(v) => match v.verify_client_cert(leaf, &chain[1..], UnixTime::now()) {
            Ok(_) => ClientVerify::Ok,
            Err(e) => ClientVerify::Failed(format!("{e}")),
        },
    };
    Some(ClientCertFacts { sha256, cn, verify })
}
