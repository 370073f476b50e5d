//! Prometheus metrics (prometheus-client): one process-wide registry, fed from the session
//! summary (`session_ended`), the handshake, the upstream connector, reloads, the
//! certificate store and the health probe. Names are stable and documented in the README.
//! Label values are bounded: listener/upstream/certificate names come from the config,
//! outcomes and reasons from fixed sets, never from client input.
//!
//! A closed leaf: nothing from the crate is imported, and the families are private. Callers
//! use a verb per metric with names, numbers and the label enums of `labels` (each fixed
//! set of label values is an enum there, with `ALL`); callers map their own types onto
//! them. Per-listener handles ([`ListenerCounters`]), an upstream's and an ACME entry's
//! series are made where their runtime objects are built (`snapshot::build`, the ACME
//! slot), with every series of their fixed label sets at 0. So a new metric touches this
//! module (family, registration, verb, zero series) and its call site only.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

mod labels;
mod series;
pub(crate) use labels::*;
pub(crate) use series::ListenerCounters;

type F<L, M> = Family<L, M>;

pub(crate) struct Metrics {
    registry: Registry,
    connections: F<ListenerLabel, Counter>,
    active: F<ListenerLabel, Gauge>,
    sessions: F<OutcomeLabels, Counter>,
    handshakes: F<HandshakeLabels, Counter>,
    sni_fallbacks: F<ListenerLabel, Counter>,
    client_certs: F<ClientCertLabels, Counter>,
    transports: F<TransportLabels, Counter>,
    pipelined_discarded: F<ListenerLabel, Counter>,
    smuggling_guard: F<GuardLabels, Counter>,
    follower_refusals: F<RefusalLabels, Counter>,
    bytes: F<DirectionLabels, Counter>,
    upstream_failures: F<UpstreamFailureLabels, Counter>,
    upstream_connect: F<UpstreamLabel, Histogram>,
    upstream_up: F<UpstreamLabel, Gauge>,
    reloads: F<ResultLabel, Counter>,
    cert_expiry: F<CertLabels, Gauge>,
    acme_events: F<AcmeLabels, Counter>,
    key_changes: F<NameLabel, Counter>,
    acme_next_renewal: F<DomainsLabel, Gauge<f64, AtomicU64>>,
    mta_sts_requests: F<MtaStsLabels, Counter>,
    tls_sessions: F<TlsSessionLabels, Counter>,
}

fn connect_histogram() -> Histogram {
    // 1 ms .. ~8 s
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("smtp_proxy");
        let m = Self {
            connections: F::default(),
            active: F::default(),
            sessions: F::default(),
            handshakes: F::default(),
            sni_fallbacks: F::default(),
            client_certs: F::default(),
            transports: F::default(),
            pipelined_discarded: F::default(),
            smuggling_guard: F::default(),
            follower_refusals: F::default(),
            bytes: F::default(),
            upstream_failures: F::default(),
            upstream_connect: F::new_with_constructor(connect_histogram),
            upstream_up: F::default(),
            reloads: F::default(),
            cert_expiry: F::default(),
            acme_events: F::default(),
            key_changes: F::default(),
            acme_next_renewal: F::default(),
            mta_sts_requests: F::default(),
            tls_sessions: F::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections",
            "Connections accepted, refused ones included",
            m.connections.clone(),
        );
        r.register(
            "connections_active",
            "Sessions in progress",
            m.active.clone(),
        );
        r.register(
            "sessions",
            "Sessions ended, by outcome (as in the session log line)",
            m.sessions.clone(),
        );
        r.register(
            "tls_handshakes",
            "Server TLS handshakes by result and failure reason",
            m.handshakes.clone(),
        );
        r.register(
            "sni_fallbacks",
            "Handshakes served the listener's default certificate for an unknown SNI",
            m.sni_fallbacks.clone(),
        );
        r.register(
            "client_certificates",
            "Client certificates presented, by client_cert mode and verify result",
            m.client_certs.clone(),
        );
        r.register(
            "sessions_by_transport",
            "Sessions that reached the upstream: implicit TLS, STARTTLS upgrade, plaintext",
            m.transports.clone(),
        );
        r.register(
            "pipelined_bytes_discarded",
            "Bytes pipelined after STARTTLS and discarded",
            m.pipelined_discarded.clone(),
        );
        r.register(
            "smuggling_guard_sessions",
            "Sessions whose DATA held bare CR/LF line endings, by the guard's action",
            m.smuggling_guard.clone(),
        );
        r.register(
            "follower_refusals",
            "Commands the proxy answered itself after the hand-off, never relayed",
            m.follower_refusals.clone(),
        );
        r.register("relayed_bytes", "Bytes by direction", m.bytes.clone());
        r.register(
            "upstream_connect_failures",
            "Failed upstream connections (connect, TLS, greeting)",
            m.upstream_failures.clone(),
        );
        r.register(
            "upstream_connect_seconds",
            "Time to a greeted upstream connection",
            m.upstream_connect.clone(),
        );
        r.register(
            "upstream_up",
            "1 if the last health probe of the upstream succeeded",
            m.upstream_up.clone(),
        );
        r.register(
            "reloads",
            "Configuration reloads by result",
            m.reloads.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of each served certificate (Unix time)",
            m.cert_expiry.clone(),
        );
        r.register("acme_events", "ACME events", m.acme_events.clone());
        r.register(
            "tls_sessions",
            "Completed server handshakes by TLS version and cipher suite",
            m.tls_sessions.clone(),
        );
        r.register(
            "mta_sts_requests",
            "Requests to https listeners (MTA-STS policy fetches), by policy domain and result",
            m.mta_sts_requests.clone(),
        );
        r.register(
            "certificate_key_changes",
            "Changes of the key served for a name (reload or ACME renewal): TLSA records to update",
            m.key_changes.clone(),
        );
        r.register(
            "acme_next_renewal_timestamp_seconds",
            "When ACME renews next (Unix time), per domain list",
            m.acme_next_renewal.clone(),
        );
        Self { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A session whose DATA content the smuggling guard changed or refused.
    pub(crate) fn smuggling_guard(&self, listener: &str, action: GuardAction) {
        self.smuggling_guard
            .get_or_create(&GuardLabels {
                listener: listener.to_owned(),
                action: action.as_str().to_owned(),
            })
            .inc();
    }

    /// `n` commands of one kind the follower answered itself in a session.
    pub(crate) fn follower_refusals(&self, listener: &str, kind: FollowerRefusal, n: u64) {
        self.follower_refusals
            .get_or_create(&RefusalLabels {
                listener: listener.to_owned(),
                command: kind.as_str().to_owned(),
            })
            .inc_by(n);
    }

    /// A greeted upstream connection and how long it took.
    pub(crate) fn upstream_connected(&self, upstream: &str, seconds: f64) {
        self.upstream_connect
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .observe(seconds);
    }

    /// One request to an `https` listener; `domain` "" when the host was none of ours.
    pub(crate) fn mta_sts_request(&self, domain: &str, result: MtaStsResult) {
        self.mta_sts_requests
            .get_or_create(&MtaStsLabels {
                domain: domain.to_owned(),
                result: result.as_str().to_owned(),
            })
            .inc();
    }

    /// An event of the ACME entry for `domains`.
    pub(crate) fn acme_event(&self, domains: &str, event: AcmeEvent) {
        self.acme_events
            .get_or_create(&AcmeLabels {
                domains: domains.to_owned(),
                event: event.as_str().to_owned(),
            })
            .inc();
    }

    /// A certificate ACME serves now: its expiry, and when it renews.
    pub(crate) fn acme_certificate(
        &self,
        certificate: &str,
        domains: &str,
        not_after: i64,
        next_renewal: Option<i64>,
    ) {
        self.cert_expiry
            .get_or_create(&CertLabels {
                certificate: certificate.to_owned(),
                origin: "acme".to_owned(),
            })
            .set(not_after);
        if let Some(next) = next_renewal {
            self.acme_next_renewal
                .get_or_create(&DomainsLabel {
                    domains: domains.to_owned(),
                })
                .set(next as f64);
        }
    }

    /// Everything the session's summary line says that is also a metric. `transport` is
    /// given for sessions that reached the upstream.
    pub(crate) fn session_ended(
        &self,
        listener: &str,
        outcome: OutcomeKind,
        transport: Option<TransportKind>,
        pipelined_discarded: u64,
        bytes_from_client: u64,
        bytes_from_upstream: u64,
    ) {
        let listener = || listener.to_owned();
        self.sessions
            .get_or_create(&OutcomeLabels {
                listener: listener(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
        if let Some(transport) = transport {
            self.transports
                .get_or_create(&TransportLabels {
                    listener: listener(),
                    transport: transport.as_str().to_owned(),
                })
                .inc();
        }
        if pipelined_discarded > 0 {
            self.pipelined_discarded
                .get_or_create(&ListenerLabel {
                    listener: listener(),
                })
                .inc_by(pipelined_discarded);
        }
        for (direction, n) in [
            (Direction::FromClient, bytes_from_client),
            (Direction::FromUpstream, bytes_from_upstream),
        ] {
            if n > 0 {
                self.bytes
                    .get_or_create(&DirectionLabels {
                        listener: listener(),
                        direction: direction.as_str().to_owned(),
                    })
                    .inc_by(n);
            }
        }
    }

    /// A completed server handshake: its version and suite (bounded: the provider's list).
    pub(crate) fn tls_session(&self, listener: &str, version: &str, cipher: &str) {
        self.tls_sessions
            .get_or_create(&TlsSessionLabels {
                listener: listener.to_owned(),
                version: version.to_owned(),
                cipher: cipher.to_owned(),
            })
            .inc();
    }

    /// A failed server handshake (`None`: an ACME validation handshake was answered,
    /// `result="acme_challenge"`).
    pub(crate) fn handshake_failed(&self, listener: &str, reason: Option<HandshakeReason>) {
        let (result, reason) = match reason {
            Some(r) => ("failed", r.as_str()),
            None => ("acme_challenge", "acme_challenge"),
        };
        self.handshakes
            .get_or_create(&HandshakeLabels {
                listener: listener.to_owned(),
                result: result.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn upstream_failure(&self, upstream: &str, reason: UpstreamFailure) {
        self.upstream_failures
            .get_or_create(&UpstreamFailureLabels {
                upstream: upstream.to_owned(),
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    pub(crate) fn reload(&self, result: ReloadResult) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.as_str().to_owned(),
            })
            .inc();
    }

    pub(crate) fn certificate_key_change(&self, name: &str) {
        self.key_changes
            .get_or_create(&NameLabel {
                name: name.to_owned(),
            })
            .inc();
    }

    /// Both reload results exist at 0 from the start, so `increase()` alerts work at once.
    pub(crate) fn reload_results(&self) {
        for r in ReloadResult::ALL {
            let _ = self.reloads.get_or_create(&ResultLabel {
                result: r.as_str().to_owned(),
            });
        }
    }

    /// Replaces the expiry gauges with these (certificate, origin, notAfter) rows; removed
    /// certificates disappear.
    pub(crate) fn set_certificate_expiry<'a>(
        &self,
        rows: impl IntoIterator<Item = (&'a str, &'a str, i64)>,
    ) {
        self.cert_expiry.clear();
        for (certificate, origin, not_after) in rows {
            self.cert_expiry
                .get_or_create(&CertLabels {
                    certificate: certificate.to_owned(),
                    origin: origin.to_owned(),
                })
                .set(not_after);
        }
    }

    pub(crate) fn upstream_health(&self, upstream: &str, up: bool) {
        self.upstream_up
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .set(i64::from(up));
    }

    /// A removed upstream leaves no stale health gauge behind.
    pub(crate) fn forget_upstream(&self, upstream: &str) {
        self.upstream_up.remove(&UpstreamLabel {
            upstream: upstream.to_owned(),
        });
    }
}

/// The process-wide metrics.
pub(crate) fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of every label enum has its series at 0 once the handles of a listener,
    /// an upstream and an ACME entry are made (and the reload results at start): a value
    /// added to an enum cannot be forgotten in the zero series.
    #[test]
    fn every_label_value_has_its_series() {
        let m = Metrics::new();
        let _ = m.listener_counters("l", Some("request"), true);
        m.upstream_series("u");
        m.acme_series("d");
        m.reload_results();
        let text = m.encode();
        let has = |name: &str, label: &str, value: &str| {
            text.lines().any(|l| {
                l.starts_with(&format!("smtp_proxy_{name}"))
                    && l.contains(&format!("{label}=\"{value}\""))
            })
        };
        let sets: [(&str, &str, Vec<&str>); 10] = [
            (
                "follower_refusals",
                "command",
                FollowerRefusal::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                "sessions",
                "outcome",
                OutcomeKind::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                "sessions_by_transport",
                "transport",
                TransportKind::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                "tls_handshakes",
                "reason",
                HandshakeReason::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                "client_certificates",
                "verify",
                ClientCertVerify::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                "upstream_connect_failures",
                "reason",
                UpstreamFailure::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                "reloads",
                "result",
                ReloadResult::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                "smuggling_guard_sessions",
                "action",
                GuardAction::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                "acme_events",
                "event",
                AcmeEvent::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                "relayed_bytes",
                "direction",
                Direction::ALL.iter().map(|v| v.as_str()).collect(),
            ),
        ];
        for (name, label, values) in sets {
            assert!(!values.is_empty());
            for v in values {
                assert!(
                    has(name, label, v),
                    "no {name}{{{label}=\"{v}\"}} series:\n{text}"
                );
            }
        }
    }
}
