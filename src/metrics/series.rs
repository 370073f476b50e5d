//! Series made ahead of events: per-listener handles (bumped without label lookups) and the
//! zero series whose label values the config and the callers' fixed sets make known.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::*;

impl Metrics {
    /// Creates at 0 every series of a listener whose label values are known now: sessions
    /// by outcome, transports, bytes by direction, discarded bytes, handshake failures by
    /// reason and, when client certificates are asked for, their verify results.
    pub(crate) fn listener_series(&self, listener: &str, known: &KnownLabels<'_>) {
        let l = || listener.to_owned();
        for o in known.outcomes {
            let _ = self.sessions.get_or_create(&OutcomeLabels {
                listener: l(),
                outcome: (*o).to_owned(),
            });
        }
        for t in known.transports {
            let _ = self.transports.get_or_create(&TransportLabels {
                listener: l(),
                transport: (*t).to_owned(),
            });
        }
        for d in ["from_client", "from_upstream"] {
            let _ = self.bytes.get_or_create(&DirectionLabels {
                listener: l(),
                direction: d.to_owned(),
            });
        }
        let _ = self
            .pipelined_discarded
            .get_or_create(&ListenerLabel { listener: l() });
        for a in known.guard_actions {
            let _ = self.smuggling_guard.get_or_create(&GuardLabels {
                listener: l(),
                action: (*a).to_owned(),
            });
        }
        for r in known.handshake_failures {
            let _ = self.handshakes.get_or_create(&HandshakeLabels {
                listener: l(),
                result: "failed".to_owned(),
                reason: (*r).to_owned(),
            });
        }
        if let Some(mode) = known.client_cert_mode {
            for v in known.client_cert_verify {
                let _ = self.client_certs.get_or_create(&ClientCertLabels {
                    listener: l(),
                    mode: mode.to_owned(),
                    verify: (*v).to_owned(),
                });
            }
        }
    }

    /// Creates at 0 an upstream's failure series (each reason) and its health gauge.
    pub(crate) fn upstream_series(&self, upstream: &str, failure_reasons: &[&'static str]) {
        for r in failure_reasons {
            let _ = self
                .upstream_failures
                .get_or_create(&UpstreamFailureLabels {
                    upstream: upstream.to_owned(),
                    reason: (*r).to_owned(),
                });
        }
        let _ = self.upstream_up.get_or_create(&UpstreamLabel {
            upstream: upstream.to_owned(),
        });
        let _ = self.upstream_connect.get_or_create(&UpstreamLabel {
            upstream: upstream.to_owned(),
        });
    }

    /// The handles of one listener's counters (created, so they exist at 0).
    pub(crate) fn listener_counters(
        &self,
        listener: &str,
        client_cert_mode: &'static str,
    ) -> ListenerCounters {
        let label = ListenerLabel {
            listener: listener.to_owned(),
        };
        let handshake_ok = self
            .handshakes
            .get_or_create(&HandshakeLabels {
                listener: listener.to_owned(),
                result: "ok".to_owned(),
                reason: String::new(),
            })
            .clone();
        ListenerCounters {
            listener: listener.to_owned(),
            client_cert_mode,
            connections: self.connections.get_or_create(&label).clone(),
            active: self.active.get_or_create(&label).clone(),
            sni_fallbacks: self.sni_fallbacks.get_or_create(&label).clone(),
            handshake_ok,
        }
    }
}

/// The label values a listener's series can take, from the callers' enums.
pub(crate) struct KnownLabels<'a> {
    pub(crate) outcomes: &'a [&'static str],
    pub(crate) transports: &'a [&'static str],
    pub(crate) handshake_failures: &'a [&'static str],
    /// `None` for `client_cert: none` (no client certificate is ever asked for).
    pub(crate) client_cert_mode: Option<&'static str>,
    pub(crate) client_cert_verify: &'a [&'static str],
    /// The smuggling guard's actions (empty when the listener's guard is `off`).
    pub(crate) guard_actions: &'a [&'static str],
}

/// One listener's counter handles, bumped without label lookups.
#[derive(Debug, Clone)]
pub struct ListenerCounters {
    listener: String,
    client_cert_mode: &'static str,
    connections: Counter,
    active: Gauge,
    sni_fallbacks: Counter,
    handshake_ok: Counter,
}

impl ListenerCounters {
    /// A connection accepted (refused ones included).
    pub fn connection(&self) {
        self.connections.inc();
    }

    /// The active-sessions gauge, for `session_active`-style guards.
    pub fn active(&self) -> &Gauge {
        &self.active
    }

    /// A completed server handshake: whether the default certificate stood in for an
    /// unknown SNI, and the verify class of a presented client certificate.
    pub fn handshake_ok(&self, sni_fallback: bool, client_cert_verify: Option<&'static str>) {
        self.handshake_ok.inc();
        if sni_fallback {
            self.sni_fallbacks.inc();
        }
        if let Some(verify) = client_cert_verify {
            metrics()
                .client_certs
                .get_or_create(&ClientCertLabels {
                    listener: self.listener.clone(),
                    mode: self.client_cert_mode.to_owned(),
                    verify: verify.to_owned(),
                })
                .inc();
        }
    }
}
