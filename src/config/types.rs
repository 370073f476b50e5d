//! The validated configuration types: what `validate` and `certificates` produce and the
//! rest of the crate reads. In a file of their own so that the two producers share them
//! without importing each other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::file::{
    ClientCertMode, LogFormat, Mode, ProxyVersion, SmugglingGuard, StsMode, UnknownSni,
};

/// A config error before the file is known: (dotted key path, reason).
pub(super) type KeyedError = (String, String);

/// The validated configuration: everything cross-checked, nothing left "to be set later".
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub log: LogConfig,
    pub metrics_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    /// Global session limit; `None`: derived from RLIMIT_NOFILE at start.
    pub max_connections: Option<usize>,
    pub upstreams: BTreeMap<String, Arc<UpstreamConfig>>,
    pub certificates: Vec<CertificateSource>,
    pub listeners: BTreeMap<String, ListenerConfig>,
    /// Refused on every listener; re-read on change (`abuse::DenyFile`).
    pub deny_file: Option<PathBuf>,
    pub mta_sts: Option<MtaStsConfig>,
}

/// The validated `mta_sts` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtaStsConfig {
    pub report_to: Option<String>,
    pub domains: Vec<MtaStsDomain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtaStsDomain {
    /// Lowercased.
    pub domain: String,
    pub mode: StsMode,
    pub mx: Vec<String>,
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub address: String,
    pub proxy_protocol: ProxyVersion,
    pub connect_timeout: Duration,
    pub tls: Option<UpstreamTls>,
    pub health_interval: Duration,
}

impl UpstreamConfig {
    /// What an `https` listener has in place of an upstream: never connected, never probed
    /// (it is in no `upstreams` map), named "" in the session line.
    pub fn unused() -> Self {
        Self {
            name: String::new(),
            address: String::new(),
            proxy_protocol: ProxyVersion::V2,
            connect_timeout: Duration::from_secs(1),
            tls: None,
            health_interval: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub ca: PathBuf,
    pub server_name: String,
}

/// Where a certificate comes from; `index` is its position in `certificates` (for errors).
#[derive(Debug, Clone)]
pub enum CertificateSource {
    Files {
        index: usize,
        cert: PathBuf,
        key: PathBuf,
    },
    SelfSigned {
        index: usize,
        names: Vec<String>,
    },
    Acme {
        index: usize,
        spec: AcmeSpec,
    },
}

/// A validated `acme` entry. Equal specs share one running ACME client across reloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AcmeSpec {
    /// Lowercased, as ordered (the first is the certificate's label).
    pub domains: Vec<String>,
    pub contact: Vec<String>,
    /// The directory URL (aliases resolved).
    pub directory: String,
    pub directory_ca: Option<PathBuf>,
    pub cache: PathBuf,
    /// A new key per renewal, announced one renewal ahead (default: the key is kept).
    pub rotate_key: bool,
}

pub(super) const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub(super) const LETS_ENCRYPT_STAGING: &str =
    "https://acme-staging-v02.api.letsencrypt.org/directory";

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub mode: Mode,
    pub hostname: String,
    pub upstream: Arc<UpstreamConfig>,
    pub unknown_sni: UnknownSni,
    pub client_cert: ClientCertMode,
    pub client_ca: Option<PathBuf>,
    pub require_starttls: bool,
    pub session_tickets: bool,
    pub accept_proxy_protocol: Vec<IpNet>,
    /// Only these client networks; empty: everyone.
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub limits: Limits,
    pub smuggling_guard: SmugglingGuard,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub per_ip: usize,
    pub handshake_timeout: Duration,
    pub command_timeout: Duration,
    pub idle_timeout: Duration,
    pub per_ip_rate: Option<Rate>,
}

/// `limits.per_ip_rate`: at most `count` new connections per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

/// A host name as certificates name it: LDH labels, optionally a leading `*.` wildcard.
pub(super) fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}
