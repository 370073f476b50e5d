//! File types -> validated `Config`: cross-references, policies and limits. Certificates
//! and CA files are loaded when the snapshot is built (`snapshot::build`), with the same
//! error shape.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::ConfigError;
use super::certificates::certificate;
use super::file::{
    ClientCertMode, FileConfig, LimitsFile, ListenerFile, Mode, ProxyVersion, UpstreamFile,
};
use super::types::*;

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
