//! The session summary line (JSON, parsed) and the Prometheus metrics (scraped over HTTP,
//! parsed) for sessions of each outcome; `/healthz` and `/readyz` against a real Postfix.

#![allow(clippy::unwrap_used)]

use crate::common::postfix::{Postfix, PostfixOptions};
use crate::common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

fn config(mta: std::net::SocketAddr, cert: &Issued) -> String {
    // An upstream that refuses: a port bound and released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    format!(
        r#"log: {{ format: json }}
metrics: {{ listen: "127.0.0.1:0" }}
upstreams:
  mta: {{ address: "{mta}", connect_timeout: 2s }}
  down: {{ address: "{closed}", connect_timeout: 2s }}
certificates:
{cert}
listeners:
  smtps:
    listen: "127.0.0.1:0"
    mode: implicit
    hostname: mx.example.test
    upstream: mta
  smtp:
    listen: "127.0.0.1:0"
    mode: starttls
    hostname: mx.example.test
    upstream: mta
    limits: {{ per_ip: 1, command_timeout: 500ms }}
  broken:
    listen: "127.0.0.1:0"
    mode: implicit
    hostname: mx.example.test
    upstream: down
"#,
        cert = cert_entry(cert)
    )
}

/// The session line of `client`, with the fields every line has.
async fn line(proxy: &RunningProxy, client: std::net::SocketAddr) -> Value {
    let v = proxy.session_line(client).await;
    for field in [
        "session_id",
        "listener",
        "client",
        "via",
        "transport",
        "sni",
        "tls_version",
        "cipher",
        "cert",
        "fallback",
        "client_cert_sha256",
        "client_cert_verify",
        "pipelined_discarded",
        "upstream",
        "upstream_addr",
        "bytes_from_client",
        "bytes_from_upstream",
        "duration_ms",
        "outcome",
        "reason",
    ] {
        assert!(v.get(field).is_some(), "field {field} missing: {v}");
    }
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["target"], "session");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_has_its_summary_line_and_moves_its_metrics() {
    let pki = TestPki::new();
    let cert = pki.server_cert("mx", &["mx.example.test"], false);
    let mta = FakeMta::start().await;
    let proxy = spawn_proxy(&config(mta.addr, &cert));
    let metrics = proxy.metrics_addr();
    let before = Scrape::get(metrics).await;
    let delta = |after: &Scrape, name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };

    // relayed, through implicit TLS, with an SNI we do not serve (fallback).
    let (tls, relayed) = tls_client(
        "127.0.0.2",
        proxy.addr("smtps"),
        inspecting_client(None),
        Some("other.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    deliver(&mut smtp, "observed").await;
    drop(smtp);
    let v = line(&proxy, relayed).await;
    assert_eq!(v["outcome"], "relayed");
    assert_eq!(v["transport"], "implicit");
    assert_eq!(v["sni"], "other.example.test");
    assert_eq!(v["fallback"], true);
    assert_eq!(v["tls_version"], "TLSv1.3");
    assert!(v["cipher"].as_str().unwrap().starts_with("TLS_"));
    assert_eq!(v["cert"], "mx.example.test/ecdsa");
    assert_eq!(v["upstream"], "mta");
    assert_eq!(v["upstream_addr"], mta.addr.to_string());
    let from_client = v["bytes_from_client"].as_u64().unwrap();
    let from_upstream = v["bytes_from_upstream"].as_u64().unwrap();
    assert!(from_client > 50 && from_upstream > 50, "{v}");

    // client_closed: QUIT in the pre-TLS dialogue.
    let mut s = Smtp::new(connect_from("127.0.0.3", proxy.addr("smtp")).await);
    let closed = s.stream.local_addr().unwrap();
    s.reply().await.unwrap();
    assert!(s.cmd("QUIT").await.starts_with("221"));
    assert_eq!(line(&proxy, closed).await["outcome"], "client_closed");

    // STARTTLS upgrade with bytes pipelined after STARTTLS (discarded), then relayed.
    let mut s = Smtp::new(connect_from("127.0.0.4", proxy.addr("smtp")).await);
    let upgraded = s.stream.local_addr().unwrap();
    s.reply().await.unwrap();
    s.cmd("EHLO client.test").await;
    s.send(b"STARTTLS\r\nNOOP\r\n").await;
    assert!(s.reply().await.unwrap().starts_with("220"));
    let tls = tls_handshake(s.stream, inspecting_client(None), Some("mx.example.test"))
        .await
        .unwrap();
    let mut s = Smtp::new(tls);
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    assert!(s.cmd("QUIT").await.starts_with("221"));
    drop(s);
    let v = line(&proxy, upgraded).await;
    assert_eq!(v["transport"], "starttls");
    assert_eq!(v["pipelined_discarded"], 6);
    assert_eq!(v["outcome"], "relayed");

    // timeout: silence in the dialogue (command_timeout 500ms) gets 421 4.4.2.
    let mut s = Smtp::new(connect_from("127.0.0.5", proxy.addr("smtp")).await);
    let timed_out = s.stream.local_addr().unwrap();
    s.reply().await.unwrap();
    assert!(s.reply().await.unwrap().starts_with("421 4.4.2"));
    let v = line(&proxy, timed_out).await;
    assert_eq!(
        (v["outcome"].as_str(), v["reason"].as_str()),
        (Some("timeout"), Some("command"))
    );

    // limit: per_ip 1 on the STARTTLS listener.
    let mut holder = Smtp::new(connect_from("127.0.0.6", proxy.addr("smtp")).await);
    holder.reply().await.unwrap();
    let mut s = Smtp::new(connect_from("127.0.0.6", proxy.addr("smtp")).await);
    let limited = s.stream.local_addr().unwrap();
    assert!(s.reply().await.unwrap().starts_with("421 4.7.0"));
    assert_eq!(line(&proxy, limited).await["outcome"], "limit");

    // handshake_failed: not TLS at all on the implicit listener.
    let mut tcp = connect_from("127.0.0.7", proxy.addr("smtps")).await;
    let garbage = tcp.local_addr().unwrap();
    tcp.write_all(b"EHLO i-am-not-tls\r\n").await.unwrap();
    let v = line(&proxy, garbage).await;
    assert_eq!(v["outcome"], "handshake_failed");
    drop(tcp);

    // upstream_failed: the upstream refuses; the client gets 421 4.3.0.
    let (tls, failed) = tls_client(
        "127.0.0.8",
        proxy.addr("broken"),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    let mut s = Smtp::new(tls);
    assert!(s.reply().await.unwrap().starts_with("421 4.3.0"));
    let v = line(&proxy, failed).await;
    assert_eq!(v["outcome"], "upstream_failed");
    assert!(v["reason"].as_str().unwrap().starts_with("connect:"), "{v}");

    // The metrics moved by exactly these sessions (the holder is still open).
    let after = Scrape::get(metrics).await;
    drop(holder);
    let sessions = "smtp_proxy_sessions_total";
    for (listener, outcome) in [
        ("smtps", "relayed"),
        ("smtp", "client_closed"),
        ("smtp", "timeout"),
        ("smtp", "limit"),
        ("smtps", "handshake_failed"),
        ("broken", "upstream_failed"),
    ] {
        assert_eq!(
            delta(
                &after,
                sessions,
                &[("listener", listener), ("outcome", outcome)]
            ),
            1.0,
            "{listener} {outcome}"
        );
    }
    assert_eq!(
        delta(
            &after,
            sessions,
            &[("listener", "smtp"), ("outcome", "relayed")]
        ),
        1.0
    );
    let hs = "smtp_proxy_tls_handshakes_total";
    assert_eq!(
        delta(&after, hs, &[("listener", "smtps"), ("result", "ok")]),
        1.0
    );
    assert_eq!(
        delta(
            &after,
            hs,
            &[
                ("listener", "smtps"),
                ("result", "failed"),
                ("reason", "invalid_message")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(&after, hs, &[("listener", "smtp"), ("result", "ok")]),
        1.0
    );
    assert_eq!(
        delta(
            &after,
            "smtp_proxy_sni_fallbacks_total",
            &[("listener", "smtps")]
        ),
        1.0
    );
    let by = "smtp_proxy_sessions_by_transport_total";
    assert_eq!(delta(&after, by, &[("transport", "implicit")]), 1.0);
    assert_eq!(delta(&after, by, &[("transport", "starttls")]), 1.0);
    assert_eq!(
        delta(
            &after,
            "smtp_proxy_pipelined_bytes_discarded_total",
            &[("listener", "smtp")]
        ),
        6.0
    );
    assert_eq!(
        delta(
            &after,
            "smtp_proxy_relayed_bytes_total",
            &[("listener", "smtps"), ("direction", "from_client")]
        ),
        from_client as f64
    );
    assert_eq!(
        delta(
            &after,
            "smtp_proxy_upstream_connect_failures_total",
            &[("upstream", "down"), ("reason", "connect")]
        ),
        1.0
    );
    assert!(
        delta(
            &after,
            "smtp_proxy_upstream_connect_seconds_count",
            &[("upstream", "mta")]
        ) >= 2.0
    );
    // 8 connections: relayed, closed, upgraded, timed out, holder, limited, garbage, failed.
    assert_eq!(delta(&after, "smtp_proxy_connections_total", &[]), 8.0);
    let expiry = after.value(
        "smtp_proxy_certificate_expiry_timestamp_seconds",
        &[("certificate", "mx.example.test/ecdsa")],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now, "notAfter {expiry} is in the future");
    assert_eq!(
        after.value("smtp_proxy_upstream_up", &[("upstream", "mta")]),
        1.0
    );
    assert_eq!(
        after.value("smtp_proxy_upstream_up", &[("upstream", "down")]),
        0.0
    );

    // Active sessions return to zero once every session has ended (the holder was dropped).
    eventually(IO_TIMEOUT, "no session active", || async {
        match Scrape::get(metrics)
            .await
            .value("smtp_proxy_connections_active", &[])
        {
            0.0 => Ok(()),
            n => Err(format!("{n} active")),
        }
    })
    .await;

    // Reloads by result.
    proxy.signal("HUP");
    proxy.wait_reloaded(1).await;
    let cfg = proxy.dir.path().join("proxy.yaml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace("upstream: down", "upstream: nowhere")).unwrap();
    proxy.signal("HUP");
    proxy
        .wait_for_log(|v| v["message"] == "reload failed; keeping the previous configuration")
        .await;
    let end = Scrape::get(metrics).await;
    assert!(delta(&end, "smtp_proxy_reloads_total", &[("result", "ok")]) >= 1.0);
    assert!(delta(&end, "smtp_proxy_reloads_total", &[("result", "failed")]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_only_upstreams_health() {
    let pf = Postfix::start(PostfixOptions::default());
    let proxy = spawn_proxy(&format!(
        r#"log: {{ format: json }}
metrics: {{ listen: "127.0.0.1:0" }}
upstreams:
  mta: {{ address: "{}", connect_timeout: 1s, health_interval: 200ms }}
certificates:
  - self_signed: [mx.example.test]
listeners:
{}"#,
        pf.proxy_addr(),
        implicit_listener("smtps", "mx.example.test", "")
    ));
    let http = proxy.metrics_addr();
    let wait_for = |want: u16| async move {
        eventually(IO_TIMEOUT, &format!("/readyz answers {want}"), || async {
            match http_get(http, "/readyz").await {
                (code, body) if code == want => Ok(body),
                (code, body) => Err(format!("{code}: {body}")),
            }
        })
        .await
    };
    assert_eq!(http_get(http, "/healthz").await, (200, "ok\n".to_owned()));
    wait_for(200).await;
    pf.stop_for_outage();
    let body = wait_for(503).await;
    assert_eq!(body, "no healthy upstream\n");
    proxy
        .wait_for_log(|v| v["message"] == "upstream unhealthy" && v["upstream"] == "mta")
        .await;
    assert_eq!(http_get(http, "/healthz").await.0, 200, "alive all along");
    pf.restart_after_outage();
    wait_for(200).await;
    let scrape = Scrape::get(http).await;
    assert_eq!(
        scrape.value("smtp_proxy_upstream_up", &[("upstream", "mta")]),
        1.0
    );
    // Postfix accepted the probe's PROXY v2 LOCAL header (no "haproxy" complaint).
    assert!(!pf.log().contains("haproxy read: "), "{}", pf.log());
}

/// SPEC "Observability": every series whose labels are known from the config or a fixed set
/// exists at 0 from the start, so `rate()` and `absent()` alerts work before the first event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_proxy_exposes_its_known_series_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        "log: { format: json }\nmetrics: { listen: \"127.0.0.1:0\" }\n\
         upstreams:\n  mta: { address: \"127.0.0.1:9\" }\n  spare: { address: \"127.0.0.1:9\" }\n\
         certificates:\n  - self_signed: [mx.example.test]\n\
         listeners:\n\
         \x20 smtp: { listen: \"127.0.0.1:0\", mode: starttls, hostname: mx.example.test, upstream: mta }\n\
         \x20 smtps: { listen: \"127.0.0.1:0\", mode: implicit, hostname: mx.example.test, upstream: spare, client_cert: request }\n",
    )
    .unwrap();
    let proxy = spawn_proxy_at(dir, &config, &[]);
    let scrape = Scrape::get(proxy.metrics_addr()).await;
    let present = |name: &str, labels: &[(&str, &str)]| {
        scrape.0.iter().any(|(n, l, v)| {
            n == name
                && *v == 0.0
                && labels
                    .iter()
                    .all(|(k, want)| l.iter().any(|(lk, lv)| lk == k && lv == want))
        })
    };
    let expected: &[(&str, &[(&str, &str)])] = &[
        ("smtp_proxy_reloads_total", &[("result", "ok")]),
        ("smtp_proxy_reloads_total", &[("result", "failed")]),
        ("smtp_proxy_connections_total", &[("listener", "smtp")]),
        ("smtp_proxy_connections_active", &[("listener", "smtps")]),
        (
            "smtp_proxy_sessions_total",
            &[("listener", "smtp"), ("outcome", "limit")],
        ),
        (
            "smtp_proxy_sessions_total",
            &[("listener", "smtps"), ("outcome", "relayed")],
        ),
        (
            "smtp_proxy_tls_handshakes_total",
            &[("listener", "smtps"), ("result", "ok")],
        ),
        (
            "smtp_proxy_tls_handshakes_total",
            &[
                ("listener", "smtp"),
                ("result", "failed"),
                ("reason", "timeout"),
            ],
        ),
        ("smtp_proxy_sni_fallbacks_total", &[("listener", "smtp")]),
        (
            "smtp_proxy_sessions_by_transport_total",
            &[("listener", "smtp"), ("transport", "plaintext")],
        ),
        (
            "smtp_proxy_relayed_bytes_total",
            &[("listener", "smtps"), ("direction", "from_client")],
        ),
        (
            "smtp_proxy_pipelined_bytes_discarded_total",
            &[("listener", "smtp")],
        ),
        (
            "smtp_proxy_client_certificates_total",
            &[
                ("listener", "smtps"),
                ("mode", "request"),
                ("verify", "failed"),
            ],
        ),
        (
            "smtp_proxy_upstream_connect_failures_total",
            &[("upstream", "spare"), ("reason", "connect")],
        ),
    ];
    for (name, labels) in expected {
        assert!(present(name, labels), "{name} {labels:?} missing at start");
    }
    // Control: a listener without client certificates has no such series, and nothing
    // invents series for names the config does not have.
    assert!(
        !scrape
            .0
            .iter()
            .any(|(n, l, _)| n == "smtp_proxy_client_certificates_total"
                && l.iter().any(|(k, v)| k == "listener" && v == "smtp"))
    );
    assert!(
        !scrape
            .0
            .iter()
            .any(|(_, l, _)| l.iter().any(|(_, v)| v == "mtx"))
    );
}
