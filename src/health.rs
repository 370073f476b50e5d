//! Upstream health probe: every `health_interval` each upstream gets a connection that sends
//! the PROXY v2 LOCAL command (v1: `PROXY UNKNOWN`; none: nothing), expects a 2xx greeting
//! and says QUIT, all under `connect_timeout`. The result feeds `/readyz` and
//! `smtp_proxy_upstream_up`; state changes are logged. Sessions never wait for a probe:
//! they always try their upstream, so a stale "down" never refuses mail by itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

use crate::config::ProxyVersion;
use crate::metrics::metrics;
use crate::proxy_header::outbound;
use crate::smtp::reply;
use crate::snapshot::{Snapshot, UpstreamRuntime};
use crate::upstream;

#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Last probe result per upstream name; absent until the first probe ends.
    states: Mutex<HashMap<String, bool>>,
    probes: Mutex<Vec<JoinHandle<()>>>,
}

impl Health {
    /// (Re)starts one probe per upstream of `snapshot`; called at start and after each
    /// successful reload. Known states are kept, removed upstreams forgotten.
    pub(crate) fn sync(self: &Arc<Self>, snapshot: &Snapshot) {
        let mut probes = self.probes.lock().unwrap_or_else(PoisonError::into_inner);
        for p in probes.drain(..) {
            p.abort();
        }
        {
            let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
            states.retain(|name, _| {
                let keep = snapshot.upstreams.contains_key(name);
                if !keep {
                    metrics().forget_upstream(name);
                }
                keep
            });
        }
        for up in snapshot.upstreams.values() {
            probes.push(tokio::spawn(probe_loop(self.clone(), up.clone())));
        }
    }

    /// Whether at least one upstream of `snapshot` passed its last probe.
    pub(crate) fn any_up(&self, snapshot: &Snapshot) -> bool {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        snapshot
            .upstreams
            .keys()
            .any(|name| states.get(name) == Some(&true))
    }

    fn set(&self, name: &str, result: &Result<(), String>) {
        let up = result.is_ok();
        let before = self
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), up);
        metrics().upstream_health(name, up);
        if before != Some(up) {
            match result {
                Ok(()) => tracing::info!(upstream = name, "upstream healthy"),
                Err(e) => tracing::warn!(upstream = name, error = %e, "upstream unhealthy"),
            }
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        let probes = self
            .probes
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for p in probes.drain(..) {
            p.abort();
        }
    }
}

async fn probe_loop(health: Arc<Health>, up: Arc<UpstreamRuntime>) {
    let mut tick = tokio::time::interval(up.config.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe(&up).await;
        health.set(&up.config.name, &result);
    }
}

/// The name the probe gives in its EHLO.
const PROBE_EHLO: &[u8] = b"EHLO localhost\r\n";

/// One probe: greeted by a 2xx, then EHLO (the keywords a plaintext hand-off can carry are
/// kept on the upstream, for the honest pre-TLS EHLO), then a polite QUIT.
pub(crate) async fn probe(up: &UpstreamRuntime) -> Result<(), String> {
    let header = match up.config.proxy_protocol {
        ProxyVersion::V2 => outbound::encode_v2_local(),
        ProxyVersion::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyVersion::None => Vec::new(),
    };
    let mut conn = upstream::connect_uncounted(up, &header)
        .await
        .map_err(|e| e.to_string())?;
    if conn.greeting_code / 100 != 2 {
        return Err(format!(
            "greeting {}",
            String::from_utf8_lossy(&conn.greeting).trim_end()
        ));
    }
    let ehlo = async {
        conn.stream.write_all(PROBE_EHLO).await.ok()?;
        let mut buf = Vec::new();
        let span = reply::read_reply(&mut conn.stream, &mut buf).await.ok()?;
        crate::smtp::ehlo::carried_keywords(&buf[..span.len])
    };
    // An MTA that greets but does not answer EHLO is still up; its keywords stay unknown.
    if let Ok(Some(keywords)) = tokio::time::timeout(up.config.connect_timeout, ehlo).await {
        up.capabilities.store(Some(Arc::new(keywords)));
    }
    let quit = async {
        conn.stream.write_all(b"QUIT\r\n").await?;
        let mut buf = Vec::new();
        let _ = reply::read_reply(&mut conn.stream, &mut buf).await;
        conn.stream.shutdown().await
    };
    // The greeting is what counts; a slow 221 does not make an upstream unhealthy.
    let _ = tokio::time::timeout(up.config.connect_timeout, quit).await;
    Ok(())
}
