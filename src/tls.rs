//! TLS: the certificate store, SNI resolution, client-certificate policy, the server
//! handshake, and the client configuration used to re-encrypt towards an upstream.

pub(crate) mod accept;
pub(crate) mod cert;
pub(crate) mod client_auth;
pub(crate) mod handshake;
pub(crate) mod resolve;
pub(crate) mod store;
pub(crate) mod upstream;

pub(crate) use accept::{HandshakeFailure, ListenerTls, ServerTls, TlsFacts, accept};
pub(crate) use store::CertStore;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The one crypto provider of the process (aws-lc-rs: X25519MLKEM768, fastest ECDSA), with
/// one rule for both protocol versions: AES-128-GCM with SHA-256 first, then AES-256-GCM
/// with SHA-384, then ChaCha20-Poly1305. Listeners apply this order over the client's
/// (`ignore_client_order`): SHA-256 runs on the CPU's SHA extensions where SHA-384 does not,
/// and AES-128 has fewer rounds, so handshakes and bulk relaying cost less (bench/); every
/// suite keeps 128-bit or better security and forward secrecy. For TLS 1.2, ECDSA and RSA
/// suites each follow that order (the certificate the client can use picks the family).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}
