//! File types -> validated `Config`: cross-references, policies and limits. Certificates
//! and CA files are loaded when the snapshot is built (`snapshot::build`), with the same
//! error shape.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::ConfigError;
use super::certificates::certificate;
use super::file::{
    ClientCertMode, FileConfig, LimitsFile, ListenerFile, LogFormat, Mode, ProxyVersion,
    SmugglingGuard, UnknownSni, UpstreamFile,
};

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

/// `"N/duration"` (`"30/1m"`, `"5/10s"`).
fn rate(text: &str) -> Result<Rate, String> {
    let bad = || format!("{text:?}: expected \"N/duration\", e.g. \"30/1m\"");
    let (n, d) = text.split_once('/').ok_or_else(bad)?;
    let count: u32 = n.trim().parse().map_err(|_| bad())?;
    let per = humantime::parse_duration(d.trim()).map_err(|_| bad())?;
    if count == 0 || per.is_zero() {
        return Err(format!(
            "{text:?}: both N and the duration must be greater than zero"
        ));
    }
    Ok(Rate { count, per })
}

pub(super) fn validate(path: &Path, file: FileConfig) -> Result<Config, ConfigError> {
    let err = |key: String, reason: String| ConfigError::new(path, key, reason);

    let mut upstreams = BTreeMap::new();
    for (name, up) in file.upstreams {
        let upstream = upstream(&name, up).map_err(|(k, r)| err(k, r))?;
        upstreams.insert(name, Arc::new(upstream));
    }

    let mut certificates = Vec::new();
    for (index, entry) in file.certificates.into_iter().enumerate() {
        certificates.push(certificate(index, entry).map_err(|(k, r)| err(k, r))?);
    }

    let mut listeners = BTreeMap::new();
    let mut addresses = HashSet::new();
    for (name, l) in file.listeners {
        let listener = listener(&name, l, &upstreams).map_err(|(k, r)| err(k, r))?;
        // Port 0 ("any free port", used by tests) never collides.
        if listener.listen.port() != 0 && !addresses.insert(listener.listen) {
            return Err(err(
                format!("listeners.{name}.listen"),
                format!("{} is already used by another listener", listener.listen),
            ));
        }
        listeners.insert(name, listener);
    }
    if listeners.is_empty() {
        return Err(err("listeners".into(), "no listener configured".into()));
    }
    if certificates.is_empty() {
        return Err(err(
            "certificates".into(),
            "no certificate configured (add `- self_signed: [localhost]` for a test setup)".into(),
        ));
    }
    if file.max_connections == Some(0) {
        return Err(err("max_connections".into(), "must be at least 1".into()));
    }
    tracing_level_is_valid(&file.log.level).map_err(|reason| err("log.level".into(), reason))?;

    Ok(Config {
        path: path.to_path_buf(),
        log: LogConfig {
            format: file.log.format,
            level: file.log.level,
        },
        metrics_listen: file.metrics.map(|m| m.listen),
        shutdown_grace: file.shutdown_grace,
        max_connections: file.max_connections,
        upstreams,
        certificates,
        listeners,
        deny_file: file.deny_file,
    })
}

pub(super) type KeyedError = (String, String);

fn upstream(name: &str, up: UpstreamFile) -> Result<UpstreamConfig, KeyedError> {
    let key = |k: &str| format!("upstreams.{name}.{k}");
    match up.address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => {
            return Err((key("address"), format!("{:?} is not host:port", up.address)));
        }
    }
    if up.proxy_protocol == ProxyVersion::None && !up.allow_hidden_client_address {
        return Err((
            key("proxy_protocol"),
            "\"none\" hides every client's address from the MTA, which then sees all mail as \
             coming from the proxy (the classic open-relay mistake); use v2 with \
             smtpd_upstream_proxy_protocol = haproxy, or set allow_hidden_client_address: true \
             if the MTA really does not rely on client addresses"
                .into(),
        ));
    }
    if up.connect_timeout.is_zero() {
        return Err((key("connect_timeout"), "must be greater than zero".into()));
    }
    if up.health_interval < Duration::from_millis(100) {
        return Err((key("health_interval"), "must be at least 100ms".into()));
    }
    let tls = match up.tls {
        Some(t) => {
            if t.server_name.is_empty() {
                return Err((key("tls.server_name"), "must not be empty".into()));
            }
            Some(UpstreamTls {
                ca: t.ca,
                server_name: t.server_name,
            })
        }
        None => None,
    };
    Ok(UpstreamConfig {
        name: name.to_owned(),
        address: up.address,
        proxy_protocol: up.proxy_protocol,
        connect_timeout: up.connect_timeout,
        tls,
        health_interval: up.health_interval,
    })
}

fn listener(
    name: &str,
    l: ListenerFile,
    upstreams: &BTreeMap<String, Arc<UpstreamConfig>>,
) -> Result<ListenerConfig, KeyedError> {
    let key = |k: &str| format!("listeners.{name}.{k}");
    let upstream = upstreams
        .get(&l.upstream)
        .ok_or_else(|| {
            (
                key("upstream"),
                format!("no upstream named {:?}", l.upstream),
            )
        })?
        .clone();
    if !is_dns_name(&l.hostname) {
        return Err((
            key("hostname"),
            format!("{:?} is not a DNS name", l.hostname),
        ));
    }
    if l.client_cert == ClientCertMode::Require && l.client_ca.is_none() {
        return Err((
            key("client_ca"),
            "client_cert: require needs client_ca (the CA that client certificates must chain to)"
                .into(),
        ));
    }
    if l.require_starttls && l.mode == Mode::Implicit {
        return Err((
            key("require_starttls"),
            "only applies to mode: starttls (an implicit-TLS listener is always encrypted)".into(),
        ));
    }
    let limits = limits(&l.limits).map_err(|(k, r)| (key(&format!("limits.{k}")), r))?;
    Ok(ListenerConfig {
        name: name.to_owned(),
        listen: l.listen,
        mode: l.mode,
        hostname: l.hostname.to_ascii_lowercase(),
        upstream,
        unknown_sni: l.unknown_sni,
        client_cert: l.client_cert,
        client_ca: l.client_ca,
        require_starttls: l.require_starttls,
        session_tickets: l.session_tickets.unwrap_or(l.mode == Mode::Implicit),
        accept_proxy_protocol: l.accept_proxy_protocol,
        allow: l.allow,
        deny: l.deny,
        limits,
        smuggling_guard: l.smuggling_guard,
    })
}

fn limits(l: &LimitsFile) -> Result<Limits, KeyedError> {
    if l.max_connections == 0 {
        return Err(("max_connections".into(), "must be at least 1".into()));
    }
    if l.per_ip == 0 {
        return Err(("per_ip".into(), "must be at least 1".into()));
    }
    for (k, d) in [
        ("handshake_timeout", l.handshake_timeout),
        ("command_timeout", l.command_timeout),
        ("idle_timeout", l.idle_timeout),
    ] {
        if d.is_zero() {
            return Err((k.into(), "must be greater than zero".into()));
        }
    }
    Ok(Limits {
        max_connections: l.max_connections,
        per_ip: l.per_ip,
        handshake_timeout: l.handshake_timeout,
        command_timeout: l.command_timeout,
        idle_timeout: l.idle_timeout,
        per_ip_rate: match &l.per_ip_rate {
            Some(r) => Some(rate(r).map_err(|e| ("per_ip_rate".to_owned(), e))?),
            None => None,
        },
    })
}

fn tracing_level_is_valid(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| format!("{level:?} is not a log level or filter: {e}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_are_checked() {
        assert!(is_dns_name("mail.example.org"));
        assert!(is_dns_name("*.example.org"));
        assert!(is_dns_name("localhost"));
        assert!(!is_dns_name("mail..example.org"));
        assert!(!is_dns_name("-bad.example"));
        assert!(!is_dns_name("a b"));
        assert!(!is_dns_name(""));
    }
}
