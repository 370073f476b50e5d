//! Prometheus metrics (prometheus-client): one process-wide registry, fed from the session
//! summary (`session_ended`), the handshake, the upstream connector, reloads, the
//! certificate store and the health probe. Names are stable and documented in the README.
//! Label values are bounded: listener/upstream/certificate names come from the config,
//! outcomes and reasons from fixed sets, never from client input.
//!
//! A leaf: nothing from the crate is imported. Callers pass names, `&'static str` labels
//! (from their enums' `as_str()`) and numbers. Per-listener handles ([`ListenerCounters`])
//! are made when a snapshot is built, so a session bumps counters without building label
//! strings, and those series exist at 0 from the start.

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
pub(crate) use series::{KnownLabels, ListenerCounters};

type F<L, M> = Family<L, M>;

pub(crate) struct Metrics {
    registry: Registry,
    pub connections: F<ListenerLabel, Counter>,
    pub active: F<ListenerLabel, Gauge>,
    pub sessions: F<OutcomeLabels, Counter>,
    pub handshakes: F<HandshakeLabels, Counter>,
    pub sni_fallbacks: F<ListenerLabel, Counter>,
    pub client_certs: F<ClientCertLabels, Counter>,
    pub transports: F<TransportLabels, Counter>,
    pub pipelined_discarded: F<ListenerLabel, Counter>,
    smuggling_guard: F<GuardLabels, Counter>,
    pub bytes: F<DirectionLabels, Counter>,
    pub upstream_failures: F<UpstreamFailureLabels, Counter>,
    pub upstream_connect: F<UpstreamLabel, Histogram>,
    pub upstream_up: F<UpstreamLabel, Gauge>,
    pub reloads: F<ResultLabel, Counter>,
    pub cert_expiry: F<CertLabels, Gauge>,
    pub acme_events: F<AcmeLabels, Counter>,
    pub key_changes: F<NameLabel, Counter>,
    pub acme_next_renewal: F<DomainsLabel, Gauge<f64, AtomicU64>>,
}

fn connect_histogram() -> Histogram {
    // 1 ms .. ~8 s
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("smtp_proxy");
        let m = Metrics {
            connections: F::default(),
            active: F::default(),
            sessions: F::default(),
            handshakes: F::default(),
            sni_fallbacks: F::default(),
            client_certs: F::default(),
            transports: F::default(),
            pipelined_discarded: F::default(),
            smuggling_guard: F::default(),
            bytes: F::default(),
            upstream_failures: F::default(),
            upstream_connect: F::new_with_constructor(connect_histogram),
            upstream_up: F::default(),
            reloads: F::default(),
            cert_expiry: F::default(),
            acme_events: F::default(),
            key_changes: F::default(),
            acme_next_renewal: F::default(),
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
            "certificate_key_changes",
            "Changes of the key served for a name (reload or ACME renewal): TLSA records to update",
            m.key_changes.clone(),
        );
        r.register(
            "acme_next_renewal_timestamp_seconds",
            "When ACME renews next (Unix time), per domain list",
            m.acme_next_renewal.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A session whose DATA content the smuggling guard changed or refused (`action`:
    /// `normalized` or `rejected`).
    pub(crate) fn smuggling_guard(&self, listener: &str, action: &'static str) {
        self.smuggling_guard
            .get_or_create(&GuardLabels {
                listener: listener.to_owned(),
                action: action.to_owned(),
            })
            .inc();
    }

    /// Everything the session's summary line says that is also a metric. `transport` is
    /// given for sessions that reached the upstream.
    pub(crate) fn session_ended(
        &self,
        listener: &str,
        outcome: &'static str,
        transport: Option<&'static str>,
        pipelined_discarded: u64,
        bytes_from_client: u64,
        bytes_from_upstream: u64,
    ) {
        let listener = || listener.to_owned();
        self.sessions
            .get_or_create(&OutcomeLabels {
                listener: listener(),
                outcome: outcome.to_owned(),
            })
            .inc();
        if let Some(transport) = transport {
            self.transports
                .get_or_create(&TransportLabels {
                    listener: listener(),
                    transport: transport.to_owned(),
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
            ("from_client", bytes_from_client),
            ("from_upstream", bytes_from_upstream),
        ] {
            if n > 0 {
                self.bytes
                    .get_or_create(&DirectionLabels {
                        listener: listener(),
                        direction: direction.to_owned(),
                    })
                    .inc_by(n);
            }
        }
    }

    pub(crate) fn handshake(&self, listener: &str, failure: Option<&'static str>) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                listener: listener.to_owned(),
                result: match failure {
                    None => "ok",
                    Some("acme_challenge") => "acme_challenge",
                    Some(_) => "failed",
                }
                .to_owned(),
                reason: failure.unwrap_or("").to_owned(),
            })
            .inc();
    }

    pub(crate) fn upstream_failure(&self, upstream: &str, reason: &'static str) {
        self.upstream_failures
            .get_or_create(&UpstreamFailureLabels {
                upstream: upstream.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// `result`: `ok` or `failed` (the server's `ReloadResult::as_str`).
    pub(crate) fn reload(&self, result: &'static str) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
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
    pub(crate) fn reload_results(&self, results: &[&'static str]) {
        for r in results {
            let _ = self.reloads.get_or_create(&ResultLabel {
                result: (*r).to_owned(),
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
