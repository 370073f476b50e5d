//! Loading proxy.yaml: figment merges the YAML file and `SMTP_TLS_PROXY_*` environment
//! overrides, serde checks types and unknown keys, `validate` checks cross-references.
//! Every error reads `file: key.path: reason`.

mod certificates;
pub mod file;
mod types;
mod validate;

use std::fmt;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format};

pub use file::{
    ClientCertMode, LogFormat, Mode, ProxyVersion, SmugglingGuard, StsMode, UnknownSni,
};
pub use types::{
    AcmeSpec, CertificateSource, Config, Limits, ListenerConfig, LogConfig, MtaStsConfig,
    MtaStsDomain, Rate, UpstreamConfig, UpstreamTls,
};

/// Prefix of environment overrides; `__` separates levels.
pub const ENV_PREFIX: &str = "SMTP_TLS_PROXY_";

/// A configuration problem, located as precisely as the source allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file, or the environment variable that carried the bad value.
    pub source: String,
    /// Dotted key path as the user typed it (`listeners.smtp.upstream`); empty for whole-file errors.
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            source: file.display().to_string(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (source, key, reason) = (
            one_line(&self.source),
            one_line(&self.key),
            one_line(&self.reason),
        );
        if key.is_empty() {
            write!(f, "{source}: {reason}")
        } else {
            write!(f, "{source}: {key}: {reason}")
        }
    }
}

/// Control characters escaped: a key the user typed (a YAML key may hold line breaks) or a
/// reason quoting it must not break the one-line error or the log line that carries it.
fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

impl std::error::Error for ConfigError {}

/// Reads, merges and validates the configuration. Certificates are loaded later, when the
/// `Snapshot` is built, so that `check`, start and reload share one path.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    // figment treats a missing file as empty; an operator who mistyped the path must hear it.
    if let Err(e) = std::fs::metadata(path) {
        return Err(ConfigError::new(path, "", format!("cannot read: {e}")));
    }
    let figment = Figment::new()
        .merge(serde_saphyr::figment::Yaml::file_exact(path))
        .merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|k| !is_kubernetes_service_var(&k.as_str().to_ascii_lowercase()))
                .split("__"),
        );
    let parsed: file::FileConfig = figment.extract().map_err(|e| from_figment(path, e))?;
    validate::validate(path, parsed)
}

/// The variables Kubernetes injects into every pod of a namespace for a Service named
/// `smtp-tls-proxy` (docker-link style service discovery), present in the environment now.
/// They are not config overrides and are ignored; the caller logs them once.
pub fn kubernetes_service_vars() -> Vec<String> {
    let mut names: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            k.strip_prefix(ENV_PREFIX)
                .is_some_and(|rest| is_kubernetes_service_var(&rest.to_ascii_lowercase()))
        })
        .collect();
    names.sort();
    names
}

/// `rest` is the lowercased name after the prefix: `service_host`, `service_port`,
/// `service_port_<port name>`, `port`, `port_<n>_<tcp|udp|sctp>` and that with `_proto`,
/// `_port` or `_addr`. No config key starts with `service` or `port`.
fn is_kubernetes_service_var(rest: &str) -> bool {
    if rest == "service_host" || rest == "service_port" || rest == "port" {
        return true;
    }
    if let Some(name) = rest.strip_prefix("service_port_") {
        // A port name is a DNS label, `-` turned into `_`: never a `__` level separator.
        return !name.is_empty()
            && !name.starts_with('_')
            && !name.ends_with('_')
            && !name.contains("__")
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    }
    let Some(port) = rest.strip_prefix("port_") else {
        return false;
    };
    let mut parts = port.splitn(3, '_');
    let number = parts.next().unwrap_or_default();
    let proto = parts.next().unwrap_or_default();
    let field = parts.next();
    !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && matches!(proto, "tcp" | "udp" | "sctp")
        && matches!(field, None | Some("proto" | "port" | "addr"))
}

/// `load` over YAML text, without environment overrides (the `config` fuzz target and its
/// corpus test): parsed and validated by the same code, errors name `path` as the file.
#[cfg(any(test, feature = "fuzzing"))]
pub fn load_str(path: &Path, yaml: &str) -> Result<Config, ConfigError> {
    let figment = Figment::new().merge(YamlText { path, yaml });
    let parsed: file::FileConfig = figment.extract().map_err(|e| from_figment(path, e))?;
    validate::validate(path, parsed)
}

/// YAML text that figment reports as the file `path`, as `Yaml::file_exact` would.
#[cfg(any(test, feature = "fuzzing"))]
struct YamlText<'a> {
    path: &'a Path,
    yaml: &'a str,
}

#[cfg(any(test, feature = "fuzzing"))]
impl figment::Provider for YamlText<'_> {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::from("YAML file", self.path)
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        figment::Provider::data(&serde_saphyr::figment::Yaml::string(self.yaml))
    }

    fn profile(&self) -> Option<figment::Profile> {
        figment::Provider::profile(&serde_saphyr::figment::Yaml::string(self.yaml))
    }
}

fn from_figment(path: &Path, err: figment::Error) -> ConfigError {
    let err = err
        .into_iter()
        .next()
        .unwrap_or_else(|| figment::Error::from("invalid configuration".to_owned()));
    let key = err.path.join(".");
    let source = match err.metadata.as_ref() {
        Some(md) => match &md.source {
            Some(figment::Source::File(p)) => p.display().to_string(),
            // Env values: name the variable the operator has to fix.
            _ if md.name.contains("environment") && !err.path.is_empty() => format!(
                "environment variable {ENV_PREFIX}{}",
                err.path.join("__").to_uppercase()
            ),
            _ => md.name.to_string(),
        },
        None => path.display().to_string(),
    };
    ConfigError {
        source,
        key,
        reason: err.kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_service_variables_are_recognised_and_nothing_else() {
        for k in [
            "service_host",
            "service_port",
            "service_port_smtp",
            "service_port_smtp_submission",
            "port",
            "port_25_tcp",
            "port_25_tcp_proto",
            "port_587_tcp_port",
            "port_465_tcp_addr",
            "port_53_udp",
        ] {
            assert!(is_kubernetes_service_var(k), "{k}");
        }
        for k in [
            "upstreams__mta__address",
            "listeners__smtp__listen",
            "port_25",
            "port_x_tcp",
            "port_25_tcp_host",
            "service",
            "service_port__x",
            "log__level",
        ] {
            assert!(!is_kubernetes_service_var(k), "{k}");
        }
    }

    #[test]
    fn an_error_prints_on_one_line() {
        let e = ConfigError {
            source: "proxy.yaml".into(),
            key: "upstreams.a\nb".into(),
            reason: "unknown field: found `a\nb`".into(),
        };
        assert_eq!(
            e.to_string(),
            "proxy.yaml: upstreams.a\\nb: unknown field: found `a\\nb`"
        );
    }

    #[test]
    fn text_errors_name_the_given_file() {
        let yaml = "upstreams:\n  mta: { address: \"127.0.0.1:10025\" }\ncertificates:\n  - self_signed: [localhost]\nlisteners:\n  smtp: { listen: \"127.0.0.1:0\", mode: starttls, hostname: localhost, upstream: mtx }\n";
        let e = load_str(Path::new("/etc/proxy.yaml"), yaml).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/proxy.yaml: listeners.smtp.upstream: no upstream named \"mtx\""
        );
        let e = load_str(Path::new("/etc/proxy.yaml"), "listeners: [").unwrap_err();
        assert_eq!(e.source, "/etc/proxy.yaml");
    }
}
