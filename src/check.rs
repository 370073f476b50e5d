//! `smtp-tls-proxy check`: what the validated configuration will serve, for a human.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{ClientCertMode, Config, Mode, ProxyVersion};
use crate::snapshot::Snapshot;

/// The report printed by `check`: listeners, then certificates with their names and expiry.
pub fn describe(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let c = &snapshot.config;
    let _ = writeln!(out, "{}: ok", c.path.display());
    for (name, l) in &snapshot.listeners {
        let lc = &l.config;
        let up = &lc.upstream;
        let proxy = match up.proxy_protocol {
            ProxyVersion::None => "no PROXY header: the MTA sees the proxy's address".to_owned(),
            ProxyVersion::V1 => "PROXY v1".to_owned(),
            ProxyVersion::V2 => "PROXY v2".to_owned(),
        };
        let mode = match lc.mode {
            Mode::Https => "HTTPS (MTA-STS policies, ACME tls-alpn-01)".to_owned(),
            Mode::Implicit => "implicit TLS".to_owned(),
            Mode::Starttls if lc.require_starttls => "STARTTLS required".to_owned(),
            Mode::Starttls => "STARTTLS optional".to_owned(),
        };
        let default = l
            .tls
            .resolver
            .default_certs()
            .iter()
            .map(|c| c.label.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "listener {name}: {} {mode}, hostname {}, default certificate {default}, unknown_sni {:?}, client_cert {:?}, session_tickets {}, smuggling_guard {:?}",
            lc.listen,
            lc.hostname,
            lc.unknown_sni,
            lc.client_cert,
            if lc.session_tickets { "on" } else { "off" },
            lc.smuggling_guard,
        );
        if !lc.allow.is_empty() || !lc.deny.is_empty() || lc.limits.per_ip_rate.is_some() {
            let nets = |v: &[ipnet::IpNet]| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    v.iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            let _ = writeln!(
                out,
                "  edge: allow {}; deny {}; per_ip_rate {}",
                if lc.allow.is_empty() {
                    "everyone".to_owned()
                } else {
                    nets(&lc.allow)
                },
                nets(&lc.deny),
                lc.limits
                    .per_ip_rate
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "none".to_owned())
            );
        }
        let tls = if up.tls.is_some() { ", TLS" } else { "" };
        if lc.mode == Mode::Https {
            continue;
        }
        let _ = writeln!(
            out,
            "  upstream {}: {} ({proxy}{tls}, connect_timeout {})",
            up.name,
            up.address,
            humantime::format_duration(up.connect_timeout)
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    // The store keeps certificates in `certificates` order, so the position is the index.
    for (index, cert) in snapshot.store.all().iter().enumerate() {
        let expires = UNIX_EPOCH + Duration::from_secs(cert.not_after.max(0) as u64);
        let days = (cert.not_after - now) / 86_400;
        let _ = writeln!(
            out,
            "certificate {index}: {}: names {}; key {}; expires {} ({}); TLSA {}",
            cert.origin,
            cert.names.join(", "),
            cert.key_alg,
            humantime::format_rfc3339_seconds(expires),
            if days < 0 {
                "EXPIRED".to_owned()
            } else {
                format!("in {days} days")
            },
            cert.tlsa(),
        );
    }
    if let Some(p) = &c.deny_file {
        let state = match std::fs::read_to_string(p) {
            Ok(text) => {
                let (list, bad) = crate::admission::abuse::parse_deny_file(&text);
                format!("{} ranges, {} bad lines skipped", list.len(), bad.len())
            }
            Err(e) => format!("not readable now ({e}): denies nobody until it is"),
        };
        let _ = writeln!(
            out,
            "deny_file {}: {state}; checked every second",
            p.display()
        );
    }
    let policies = &snapshot.mta_sts;
    for policy in policies.iter() {
        let mx = policy.mx.join(", ");
        let _ = writeln!(
            out,
            "mta-sts {}: served at https://mta-sts.{}/.well-known/mta-sts.txt (mx {mx}; max_age {}); publish:",
            policy.domain, policy.domain, policy.max_age
        );
        let _ = writeln!(out, "  {}", policy.txt_record());
        match policies.tlsrpt_record(&policy.domain) {
            Some(rpt) => {
                let _ = writeln!(out, "  {rpt}");
            }
            None => {
                let _ = writeln!(
                    out,
                    "  (no TLS-RPT record: set mta_sts.report_to to receive reports)"
                );
            }
        }
    }
    for w in warnings(c) {
        let _ = writeln!(out, "warning: {w}");
    }
    for slot in snapshot.store.acme_slots() {
        let spec = slot.spec();
        let state = match slot.issued() {
            Some(c) => {
                let expires = UNIX_EPOCH + Duration::from_secs(c.not_after.max(0) as u64);
                format!(
                    "cached certificate expires {}; TLSA {}",
                    humantime::format_rfc3339_seconds(expires),
                    c.tlsa()
                )
            }
            None => "no cached certificate yet: ordered at start, a self-signed one is served until then".to_owned(),
        };
        let keys = match (spec.rotate_key, slot.next_tlsa()) {
            (false, _) => "key kept across renewals".to_owned(),
            (true, Some(next)) => format!(
                "rotate_key: the next renewal uses a new key, publish TLSA {next} before it"
            ),
            (true, None) => "rotate_key: the next key is made (and logged) at start".to_owned(),
        };
        let _ = writeln!(
            out,
            "acme {}: directory {}, cache {}; {state}; {keys}",
            spec.domains.join(", "),
            spec.directory,
            spec.cache.display()
        );
    }
    out
}

/// Valid but risky settings, printed by `check` and logged at start and on reload:
/// `listeners.NAME.key: why` (catalogue SM-17, PO-7, PO-8).
pub fn warnings(c: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (name, l) in &c.listeners {
        if l.mode == Mode::Starttls && l.require_starttls && l.listen.port() == 25 {
            out.push(format!(
                "listeners.{name}.require_starttls: port 25 is where other MTAs deliver; RFC 3207 \
                 section 4 says a publicly-referenced SMTP server must not require STARTTLS, and \
                 senders without TLS will be refused"
            ));
        }
        let up = &l.upstream;
        if l.mode == Mode::Https {
            continue;
        }
        if up.proxy_protocol == ProxyVersion::V1 && l.client_cert != ClientCertMode::None {
            out.push(format!(
                "listeners.{name}.client_cert: upstream {} uses proxy_protocol: v1, which cannot \
                 carry TLS facts or the client certificate to the MTA; use v2",
                up.name
            ));
        }
        if up.proxy_protocol == ProxyVersion::None {
            out.push(format!(
                "upstreams.{}.proxy_protocol: none: every client of listener {name} reaches the \
                 MTA from the proxy's address; if the MTA trusts that address (Postfix \
                 permit_mynetworks) it is an open relay",
                up.name
            ));
        }
    }
    out
}
