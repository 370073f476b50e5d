//! rustls client configuration for re-encryption towards an MTA behind an internal CA:
//! trusts only the configured CA bundle; there is deliberately no "verify off" switch.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::ServerName;

use super::client_auth::load_roots;
use crate::config::UpstreamTls;

/// The client config plus the name the upstream certificate must carry.
#[derive(Debug, Clone)]
pub struct UpstreamTlsClient {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// Builds the client side; the error is the reason, keyed by the caller.
pub(crate) fn build(
    tls: &UpstreamTls,
    provider: &Arc<CryptoProvider>,
) -> Result<UpstreamTlsClient, (String, String)> {
    let roots = load_roots(&tls.ca).map_err(|r| ("tls.ca".to_owned(), r))?;
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls".to_owned(), e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = ServerName::try_from(tls.server_name.clone()).map_err(|e| {
        (
            "tls.server_name".to_owned(),
            format!("{:?}: {e}", tls.server_name),
        )
    })?;
    Ok(UpstreamTlsClient {
        config: Arc::new(config),
        server_name,
    })
}
