//! TLS: the certificate store, SNI resolution, client-certificate policy, the server
//! handshake, and the client configuration used to re-encrypt towards an upstream.

pub mod accept;
pub mod client_auth;
pub mod resolve;
pub mod store;
pub mod upstream;

pub use accept::{HandshakeFailure, ListenerTls, TlsFacts, accept};
pub use store::{CertStore, ServedCert};

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The one crypto provider of the process (aws-lc-rs: X25519MLKEM768, fastest ECDSA), with
/// TLS 1.3 AES-128-GCM-SHA256 first. Listeners apply this order over the client's
/// (`ignore_client_order`): SHA-256 runs on the CPU's SHA extensions where SHA-384 does not,
/// and AES-128 has fewer rounds, so handshakes and bulk relaying cost less (bench/); every
/// TLS 1.3 suite keeps 128-bit or better security. TLS 1.2 suites keep aws-lc-rs' order.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    let tls13 = [
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    let tls12: Vec<_> = p
        .cipher_suites
        .iter()
        .filter(|s| s.version() == &rustls::version::TLS12)
        .copied()
        .collect();
    p.cipher_suites = tls13.into_iter().chain(tls12).collect();
    Arc::new(p)
}
