//! Serde mirror of proxy.yaml: field names are the YAML keys, unknown keys are errors, no logic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// The whole file, before cross-reference validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub log: LogFile,
    #[serde(default)]
    pub metrics: Option<MetricsFile>,
    /// How long SIGTERM waits for sessions in flight.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Sessions across all listeners; default: what RLIMIT_NOFILE allows.
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamFile>,
    #[serde(default)]
    pub certificates: Vec<CertificateFile>,
    #[serde(default)]
    pub listeners: BTreeMap<String, ListenerFile>,
    /// One IP or CIDR a line, `#` comments; refused on every listener; re-read when it
    /// changes, without a reload (fail2ban, CrowdSec).
    #[serde(default)]
    pub deny_file: Option<PathBuf>,
    /// MTA-STS policies served on `mode: https` listeners (RFC 8461).
    #[serde(default)]
    pub mta_sts: Option<MtaStsFile>,
}

/// `mta_sts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtaStsFile {
    /// TLS-RPT reports (RFC 8460): `mailto:` or `https:` URI; `check` prints the record.
    #[serde(default)]
    pub report_to: Option<String>,
    /// Policy domain -> its policy.
    pub domains: BTreeMap<String, MtaStsDomainFile>,
}

/// `mta_sts.domains.<domain>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtaStsDomainFile {
    pub mode: StsMode,
    /// MX patterns; default: the hostnames of the listeners on port 25.
    #[serde(default)]
    pub mx: Option<Vec<String>>,
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

fn default_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

/// `mta_sts.domains.*.mode` (RFC 8461 §5).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StsMode {
    Enforce,
    Testing,
    None,
}

impl StsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Testing => "testing",
            Self::None => "none",
        }
    }
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".to_owned()
}

/// `log.format`.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    pub listen: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// `host:port`; a host name is resolved at each connect.
    pub address: String,
    #[serde(default)]
    pub proxy_protocol: ProxyVersion,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub tls: Option<UpstreamTlsFile>,
    /// Must be true for `proxy_protocol: none` (the open-relay guard).
    #[serde(default)]
    pub allow_hidden_client_address: bool,
    /// How often the health probe connects (PROXY v2 LOCAL, greeting, QUIT).
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub health_interval: Duration,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_health_interval() -> Duration {
    Duration::from_secs(10)
}

/// `upstreams.*.proxy_protocol`.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    None,
    V1,
    #[default]
    V2,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    pub ca: PathBuf,
    pub server_name: String,
}

/// One entry of `certificates`: exactly one of `cert`+`key`, `self_signed` or `acme`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFile {
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub self_signed: Option<Vec<String>>,
    #[serde(default)]
    pub acme: Option<AcmeFile>,
}

/// `certificates[].acme`: one certificate for all `domains`, via tls-alpn-01.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeFile {
    pub domains: Vec<String>,
    #[serde(default)]
    pub contact: Vec<String>,
    /// `letsencrypt` | `letsencrypt-staging` | an https URL.
    #[serde(default = "default_directory")]
    pub directory: String,
    /// Extra root for a private ACME server (then the only one trusted for it).
    #[serde(default)]
    pub directory_ca: Option<PathBuf>,
    /// Account, keys and certificate; written 0600.
    pub cache: PathBuf,
    /// Rotate the key at each renewal (the next key is made and announced one renewal
    /// ahead); by default the key is kept, so the TLSA record stays valid.
    #[serde(default)]
    pub rotate_key: bool,
}

fn default_directory() -> String {
    "letsencrypt".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub listen: SocketAddr,
    pub mode: Mode,
    pub hostname: String,
    /// Required on mail listeners; an `https` listener has none.
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    #[serde(default)]
    pub client_cert: ClientCertMode,
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub require_starttls: bool,
    /// TLS 1.3 session tickets; default off on STARTTLS listeners, on for implicit ones.
    #[serde(default)]
    pub session_tickets: Option<bool>,
    #[serde(default)]
    pub accept_proxy_protocol: Vec<IpNet>,
    /// Only these client networks (empty: everyone).
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// Client networks refused on this listener.
    #[serde(default)]
    pub deny: Vec<IpNet>,
    #[serde(default)]
    pub limits: LimitsFile,
    /// What bare CR/LF line endings in DATA content get (SMTP smuggling).
    #[serde(default)]
    pub smuggling_guard: SmugglingGuard,
}

/// `listeners.*.smuggling_guard`. YAML 1.1 reads an unquoted `off` as the boolean false,
/// so `false` means `off` too (and `true` is refused: say which mode).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum SmugglingGuard {
    /// Byte for byte, as before 2026-12.
    Off,
    /// Bare line endings become CRLF, unterminated `.` lines are stuffed.
    #[default]
    Normalize,
    /// `550 5.5.2` and the MTA's partial message discarded.
    Reject,
}

impl<'de> Deserialize<'de> for SmugglingGuard {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(false) => Ok(Self::Off),
            Raw::Text(t) if t == "off" => Ok(Self::Off),
            Raw::Text(t) if t == "normalize" => Ok(Self::Normalize),
            Raw::Text(t) if t == "reject" => Ok(Self::Reject),
            other => Err(serde::de::Error::custom(format!(
                "{}: expected normalize, reject or off",
                match other {
                    Raw::Bool(b) => b.to_string(),
                    Raw::Text(t) => format!("{t:?}"),
                }
            ))),
        }
    }
}

/// `listeners.*.mode`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Starttls,
    Implicit,
    /// Port 443: MTA-STS policies over HTTPS and ACME tls-alpn-01; no mail, no upstream.
    Https,
}

/// `listeners.*.unknown_sni`.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnknownSni {
    #[default]
    Default,
    Reject,
}

/// `listeners.*.client_cert`.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertMode {
    #[default]
    None,
    Request,
    Require,
}

impl ClientCertMode {
    /// As written in proxy.yaml (log fields, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Request => "request",
            Self::Require => "require",
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    pub max_connections: usize,
    pub per_ip: usize,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// `"N/duration"`: new connections per client address (`"30/1m"`); none by default.
    pub per_ip_rate: Option<String>,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            per_ip: 50,
            handshake_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(600),
            per_ip_rate: None,
        }
    }
}
