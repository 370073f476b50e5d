//! Prometheus metrics (prometheus-client): one process-wide registry, fed from the session
//! summary (`record_session`), the handshake, the upstream connector, reloads, the
//! certificate store and the health probe. Names are stable and documented in the README.
//! Label values are bounded: listener/upstream/certificate names come from the config,
//! outcomes and reasons from fixed sets, never from client input.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::session::{SessionReport, Transport};
use crate::tls::CertStore;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub listener: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub listener: String,
    pub result: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientCertLabels {
    pub listener: String,
    pub mode: String,
    pub verify: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub listener: String,
    pub transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub listener: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamFailureLabels {
    pub upstream: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub certificate: String,
    pub origin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcmeLabels {
    pub domains: String,
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainsLabel {
    pub domains: String,
}

type F<L, M> = Family<L, M>;

pub struct Metrics {
    registry: Registry,
    pub connections: F<ListenerLabel, Counter>,
    pub active: F<ListenerLabel, Gauge>,
    pub sessions: F<OutcomeLabels, Counter>,
    pub handshakes: F<HandshakeLabels, Counter>,
    pub sni_fallbacks: F<ListenerLabel, Counter>,
    pub client_certs: F<ClientCertLabels, Counter>,
    pub transports: F<TransportLabels, Counter>,
    pub pipelined_discarded: F<ListenerLabel, Counter>,
    pub bytes: F<DirectionLabels, Counter>,
    pub upstream_failures: F<UpstreamFailureLabels, Counter>,
    pub upstream_connect: F<UpstreamLabel, Histogram>,
    pub upstream_up: F<UpstreamLabel, Gauge>,
    pub reloads: F<ResultLabel, Counter>,
    pub cert_expiry: F<CertLabels, Gauge>,
    pub acme_events: F<AcmeLabels, Counter>,
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
            bytes: F::default(),
            upstream_failures: F::default(),
            upstream_connect: F::new_with_constructor(connect_histogram),
            upstream_up: F::default(),
            reloads: F::default(),
            cert_expiry: F::default(),
            acme_events: F::default(),
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
            "acme_next_renewal_timestamp_seconds",
            "When ACME renews next (Unix time), per domain list",
            m.acme_next_renewal.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Everything the session's summary line says that is also a metric.
    pub fn record_session(&self, r: &SessionReport) {
        let listener = || r.listener.clone();
        self.sessions
            .get_or_create(&OutcomeLabels {
                listener: listener(),
                outcome: r.outcome.kind().to_owned(),
            })
            .inc();
        if r.upstream_addr.is_some() && r.transport != Transport::None {
            self.transports
                .get_or_create(&TransportLabels {
                    listener: listener(),
                    transport: r.transport.as_str().to_owned(),
                })
                .inc();
        }
        if r.pipelined_discarded > 0 {
            self.pipelined_discarded
                .get_or_create(&ListenerLabel {
                    listener: listener(),
                })
                .inc_by(r.pipelined_discarded);
        }
        for (direction, n) in [
            ("from_client", r.bytes_from_client),
            ("from_upstream", r.bytes_from_upstream),
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

    pub fn handshake(&self, listener: &str, failure: Option<&'static str>) {
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

    pub fn upstream_failure(&self, upstream: &str, reason: &'static str) {
        self.upstream_failures
            .get_or_create(&UpstreamFailureLabels {
                upstream: upstream.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    /// Replaces the expiry gauges with the store's certificates (removed ones disappear).
    pub fn certificates(&self, store: &CertStore) {
        self.cert_expiry.clear();
        for c in store.all() {
            self.cert_expiry
                .get_or_create(&CertLabels {
                    certificate: c.label.clone(),
                    origin: c.origin.clone(),
                })
                .set(c.not_after);
        }
        for slot in store.acme_slots() {
            if let Some(c) = slot.issued() {
                self.cert_expiry
                    .get_or_create(&CertLabels {
                        certificate: c.label.clone(),
                        origin: "acme".into(),
                    })
                    .set(c.not_after);
            }
        }
    }

    pub fn upstream_health(&self, upstream: &str, up: bool) {
        self.upstream_up
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .set(i64::from(up));
    }

    /// A removed upstream leaves no stale health gauge behind.
    pub fn forget_upstream(&self, upstream: &str) {
        self.upstream_up.remove(&UpstreamLabel {
            upstream: upstream.to_owned(),
        });
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
