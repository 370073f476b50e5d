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
    ClientCertMode, FileConfig, LimitsFile, ListenerFile, Mode, MtaStsFile, ProxyVersion,
    UpstreamFile,
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
    let mta_sts = match file.mta_sts {
        Some(m) => Some(mta_sts(m, &listeners, &mut certificates).map_err(|(k, r)| err(k, r))?),
        None => None,
    };
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
        mta_sts,
    })
}

/// RFC 8461 §3.2: `max_age` is at most 31557600 seconds (a year).
const MAX_STS_AGE: u64 = 31_557_600;

/// The `mta_sts` section: domains, MX patterns (default: the port-25 listeners'
/// hostnames), `max_age`, and a certificate for `mta-sts.<domain>`: an `acme` entry that
/// orders a name of the domain gets it added; file certificates are checked when loaded.
fn mta_sts(
    m: MtaStsFile,
    listeners: &BTreeMap<String, ListenerConfig>,
    certificates: &mut [CertificateSource],
) -> Result<MtaStsConfig, KeyedError> {
    if m.domains.is_empty() {
        return Err(("mta_sts.domains".into(), "needs at least one domain".into()));
    }
    if !listeners.values().any(|l| l.mode == Mode::Https) {
        return Err((
            "mta_sts".into(),
            "no listener has mode: https to serve the policies: add one on port 443 (no upstream)"
                .into(),
        ));
    }
    if let Some(rua) = &m.report_to
        && !(rua.starts_with("mailto:") || rua.starts_with("https://"))
    {
        return Err((
            "mta_sts.report_to".into(),
            format!("{rua:?}: a TLS-RPT address is a mailto: or https:// URI (RFC 8460)"),
        ));
    }
    let port25: Vec<String> = listeners
        .values()
        .filter(|l| l.listen.port() == 25)
        .map(|l| l.hostname.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut domains = Vec::new();
    for (domain, d) in m.domains {
        let key = |k: &str| format!("mta_sts.domains.{domain}.{k}");
        let name = domain.to_ascii_lowercase();
        if name.starts_with("*.") || !is_dns_name(&name) || !name.contains('.') {
            return Err((
                format!("mta_sts.domains.{domain}"),
                "not a mail domain (a DNS name with a dot, no wildcard)".into(),
            ));
        }
        let mx = match d.mx {
            Some(mx) => mx,
            None if port25.is_empty() => {
                return Err((
                    key("mx"),
                    "no mx given and no listener on port 25 to take them from".into(),
                ));
            }
            None => port25.clone(),
        };
        if mx.is_empty() {
            return Err((key("mx"), "needs at least one MX pattern".into()));
        }
        let mut patterns = Vec::new();
        for (i, pattern) in mx.iter().enumerate() {
            let p = pattern.to_ascii_lowercase();
            // §4.1: a wildcard stands for exactly one leftmost label.
            let rest = p.strip_prefix("*.").unwrap_or(&p);
            if rest.contains('*') || !is_dns_name(rest) || !rest.contains('.') {
                return Err((
                    format!("{}[{i}]", key("mx")),
                    format!(
                        "{pattern:?} is not an MX pattern (a host name, or \"*.\" and a \
                         name: a wildcard covers one leftmost label only)"
                    ),
                ));
            }
            patterns.push(p);
        }
        let age = d.max_age.as_secs();
        if age == 0 || age > MAX_STS_AGE {
            return Err((
                key("max_age"),
                format!("{age} s: RFC 8461 allows 1 to {MAX_STS_AGE} seconds"),
            ));
        }
        let host = format!("mta-sts.{name}");
        for source in certificates.iter_mut() {
            if let CertificateSource::Acme { spec, .. } = source
                && spec
                    .domains
                    .iter()
                    .any(|n| n == &name || n.ends_with(&format!(".{name}")))
                && !spec.domains.contains(&host)
            {
                spec.domains.push(host.clone());
            }
        }
        domains.push(MtaStsDomain {
            domain: name,
            mode: d.mode,
            mx: patterns,
            max_age: d.max_age,
        });
    }
    Ok(MtaStsConfig {
        report_to: m.report_to,
        domains,
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
    let upstream = match (&l.upstream, l.mode) {
        (Some(_), Mode::Https) => {
            return Err((
                key("upstream"),
                "an https listener serves MTA-STS policies and relays no mail: remove it".into(),
            ));
        }
        (None, Mode::Https) => Arc::new(UpstreamConfig::unused()),
        (None, _) => {
            return Err((key("upstream"), "required on a mail listener".into()));
        }
        (Some(up), _) => upstreams
            .get(up)
            .ok_or_else(|| (key("upstream"), format!("no upstream named {up:?}")))?
            .clone(),
    };
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
    if l.require_starttls && l.mode != Mode::Starttls {
        return Err((
            key("require_starttls"),
            "only applies to mode: starttls (implicit and https listeners are always encrypted)"
                .into(),
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
        session_tickets: l.session_tickets.unwrap_or(l.mode != Mode::Starttls),
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
