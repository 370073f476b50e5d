//! Series made ahead of events: per-listener handles (bumped without label lookups) and the
//! zero series whose label values the config and the callers' fixed sets make known.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::*;

impl Metrics {
    /// The handles of one listener's counters, and every series of the listener at 0:
    /// sessions by outcome, transports, bytes by direction, discarded bytes, handshake
    /// failures by reason, the smuggling guard's actions (`guard`: unless it is `off`) and,
    /// when client certificates are asked for (`client_cert_mode`), their verdicts.
    pub(crate) fn listener_counters(
        &self,
        listener: &str,
        client_cert_mode: Option<&'static str>,
        guard: bool,
    ) -> ListenerCounters {
        let l = || listener.to_owned();
        for o in OutcomeKind::ALL {
            let _ = self.sessions.get_or_create(&OutcomeLabels {
                listener: l(),
                outcome: o.as_str().to_owned(),
            });
        }
        for t in TransportKind::ALL {
            let _ = self.transports.get_or_create(&TransportLabels {
                listener: l(),
                transport: t.as_str().to_owned(),
            });
        }
        for d in Direction::ALL {
            let _ = self.bytes.get_or_create(&DirectionLabels {
                listener: l(),
                direction: d.as_str().to_owned(),
            });
        }
        let _ = self
            .pipelined_discarded
            .get_or_create(&ListenerLabel { listener: l() });
        if guard {
            for a in GuardAction::ALL {
                let _ = self.smuggling_guard.get_or_create(&GuardLabels {
                    listener: l(),
                    action: a.as_str().to_owned(),
                });
            }
        }
        for c in FollowerRefusal::ALL {
            let _ = self.follower_refusals.get_or_create(&RefusalLabels {
                listener: l(),
                command: c.as_str().to_owned(),
            });
        }
        for r in HandshakeReason::ALL {
            let _ = self.handshakes.get_or_create(&HandshakeLabels {
                listener: l(),
                result: "failed".to_owned(),
                reason: r.as_str().to_owned(),
            });
        }
        if let Some(mode) = client_cert_mode {
            for v in ClientCertVerify::ALL {
                let _ = self.client_certs.get_or_create(&ClientCertLabels {
                    listener: l(),
                    mode: mode.to_owned(),
                    verify: v.as_str().to_owned(),
                });
            }
        }
        let label = ListenerLabel { listener: l() };
        let handshake_ok = self
            .handshakes
            .get_or_create(&HandshakeLabels {
                listener: l(),
                result: "ok".to_owned(),
                reason: String::new(),
            })
            .clone();
        ListenerCounters {
            listener: l(),
            client_cert_mode: client_cert_mode.unwrap_or("none"),
            connections: self.connections.get_or_create(&label).clone(),
            active: self.active.get_or_create(&label).clone(),
            sni_fallbacks: self.sni_fallbacks.get_or_create(&label).clone(),
            handshake_ok,
        }
    }

    /// An upstream's series at 0: failures by reason, the health gauge, the connect time.
    pub(crate) fn upstream_series(&self, upstream: &str) {
        for r in UpstreamFailure::ALL {
            let _ = self
                .upstream_failures
                .get_or_create(&UpstreamFailureLabels {
                    upstream: upstream.to_owned(),
                    reason: r.as_str().to_owned(),
                });
        }
        let _ = self.upstream_up.get_or_create(&UpstreamLabel {
            upstream: upstream.to_owned(),
        });
        let _ = self.upstream_connect.get_or_create(&UpstreamLabel {
            upstream: upstream.to_owned(),
        });
    }

    /// An ACME entry's event series at 0.
    pub(crate) fn acme_series(&self, domains: &str) {
        for e in AcmeEvent::ALL {
            let _ = self.acme_events.get_or_create(&AcmeLabels {
                domains: domains.to_owned(),
                event: e.as_str().to_owned(),
            });
        }
    }

    /// A policy domain's MTA-STS request series at 0 (and the one for other hosts).
    pub(crate) fn mta_sts_series(&self, domain: &str) {
        for r in MtaStsResult::ALL {
            let domain = if *r == MtaStsResult::Misdirected {
                ""
            } else {
                domain
            };
            let _ = self.mta_sts_requests.get_or_create(&MtaStsLabels {
                domain: domain.to_owned(),
                result: r.as_str().to_owned(),
            });
        }
    }
}

/// One listener's counter handles, bumped without label lookups.
#[derive(Debug, Clone)]
pub(crate) struct ListenerCounters {
    listener: String,
    client_cert_mode: &'static str,
    connections: Counter,
    active: Gauge,
    sni_fallbacks: Counter,
    handshake_ok: Counter,
}

impl ListenerCounters {
    /// A connection accepted (refused ones included).
    pub(crate) fn connection(&self) {
        self.connections.inc();
    }

    /// The active-sessions gauge, for `session_active`-style guards.
    pub(crate) fn active(&self) -> &Gauge {
        &self.active
    }

    /// A completed server handshake: whether the default certificate stood in for an
    /// unknown SNI, and the verify class of a presented client certificate.
    pub(crate) fn handshake_ok(
        &self,
        sni_fallback: bool,
        client_cert_verify: Option<ClientCertVerify>,
    ) {
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
                    verify: verify.as_str().to_owned(),
                })
                .inc();
        }
    }
}
