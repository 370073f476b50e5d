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

/// The one crypto provider of the process (aws-lc-rs: X25519MLKEM768, fastest ECDSA).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
