//! Lifecycle over real sockets: reload (file watch and SIGHUP), failed reloads, listener
//! add/remove, SIGTERM drain, connection limits, descriptor hygiene after aborted sessions.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// DER of the leaf the server presented.
fn served_leaf(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

async fn leaf_at(addr: SocketAddr, pki: &TestPki) -> Vec<u8> {
    let (tls, _) = tls_client(
        "127.0.0.1",
        addr,
        verifying_client(pki.server_ca_der()),
        Some("mail.example.test"),
    )
    .await;
    served_leaf(&tls)
}

fn sighup_reload(v: &serde_json::Value) -> bool {
    v["message"] == "reloaded" && v["cause"] == "SIGHUP"
}

/// A STARTTLS listener on port 0.
fn starttls_listener(name: &str, hostname: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    listen: \"127.0.0.1:0\"\n    mode: starttls\n    hostname: {hostname}\n    upstream: mta\n{extra}"
    )
}

async fn greeted(addr: SocketAddr, from: &str) -> (Smtp<TcpStream>, String) {
    let mut smtp = Smtp::new(connect_from(from, addr).await);
    let greeting = smtp.reply().await.unwrap();
    (smtp, greeting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_by_rename_is_served_within_2s_and_old_sessions_finish() {
    let pki = TestPki::new();
    let old = pki.server_cert("live", &["mail.example.test"], false);
    let mta = FakeMta::start().await;
    let proxy = spawn_proxy(&yaml(
        mta.addr,
        "",
        &cert_entry(&old),
        &implicit_listener("smtps", "mail.example.test", ""),
    ));
    let addr = proxy.addr("smtps");
    assert_eq!(leaf_at(addr, &pki).await, old.chain[0].as_ref());

    // A session opened before the change, in the middle of its SMTP dialogue.
    let (tls, _) = tls_client(
        "127.0.0.2",
        addr,
        verifying_client(pki.server_ca_der()),
        Some("mail.example.test"),
    )
    .await;
    let mut before = Smtp::new(tls);
    assert!(before.reply().await.unwrap().starts_with("220"));
    assert!(before.cmd("EHLO old.client").await.starts_with("250"));

    // certbot style: new files written elsewhere, then renamed over the live ones.
    let new = pki.server_cert("next", &["mail.example.test"], false);
    let renamed = Instant::now();
    std::fs::rename(&new.key_path, &old.key_path).unwrap();
    std::fs::rename(&new.cert_path, &old.cert_path).unwrap();
    let reloaded = proxy.wait_reloaded(1).await;
    let took = renamed.elapsed();
    assert_eq!(reloaded["cause"], "file change");
    assert!(took < Duration::from_secs(2), "reload took {took:?}");
    assert_eq!(leaf_at(addr, &pki).await, new.chain[0].as_ref());

    // The old session completes against its old snapshot.
    let r = before
        .send_mail("a@client.test", "b@example.test", "before the reload")
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(before.cmd("QUIT").await.starts_with("221"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_config_change_while_an_open_session_keeps_the_old_one() {
    let mta = FakeMta::start().await;
    let certs = "  - self_signed: [old.example.test, new.example.test]\n";
    let proxy = spawn_proxy(&yaml(
        mta.addr,
        "",
        certs,
        &starttls_listener("smtp", "old.example.test", ""),
    ));
    let addr = proxy.addr("smtp");
    let (mut open, greeting) = greeted(addr, "127.0.0.2").await;
    assert!(greeting.starts_with("220 old.example.test"), "{greeting}");

    let config = proxy.dir.path().join("proxy.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("hostname: old.", "hostname: new.")).unwrap();
    proxy.signal("HUP");
    proxy.wait_for_log(sighup_reload).await;

    let (_, greeting) = greeted(addr, "127.0.0.3").await;
    assert!(greeting.starts_with("220 new.example.test"), "{greeting}");
    let ehlo = open.cmd("EHLO client.test").await;
    assert!(ehlo.starts_with("250-old.example.test"), "{ehlo}");
    assert!(open.cmd("QUIT").await.starts_with("221"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_keeps_the_old_config_serving() {
    let pki = TestPki::new();
    let cert = pki.server_cert("mx", &["mail.example.test"], false);
    let mta = FakeMta::start().await;
    let proxy = spawn_proxy(&yaml(
        mta.addr,
        "",
        &cert_entry(&cert),
        &implicit_listener("smtps", "mail.example.test", ""),
    ));
    let addr = proxy.addr("smtps");
    let config = proxy.dir.path().join("proxy.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    let failed =
        |v: &serde_json::Value| v["message"] == "reload failed; keeping the previous configuration";

    // 1. A config that names an upstream that does not exist.
    std::fs::write(&config, good.replace("upstream: mta", "upstream: mtx")).unwrap();
    proxy.signal("HUP");
    let expected = format!("{}: listeners.smtps.upstream:", config.display());
    let e = proxy
        .wait_for_log(|v| failed(v) && v["error"].as_str().unwrap().starts_with(&expected))
        .await;
    assert_eq!(e["level"], "ERROR");
    assert_eq!(leaf_at(addr, &pki).await, cert.chain[0].as_ref());

    // 2. Good config again, then a certificate whose key does not match (watched files).
    std::fs::write(&config, &good).unwrap();
    proxy.signal("HUP");
    proxy.wait_for_log(sighup_reload).await;
    let other = pki.server_cert("other", &["mail.example.test"], false);
    std::fs::rename(&other.cert_path, &cert.cert_path).unwrap();
    let e = proxy
        .wait_for_log(|v| {
            failed(v)
                && v["error"]
                    .as_str()
                    .unwrap()
                    .contains("does not match the certificate")
        })
        .await;
    let error = e["error"].as_str().unwrap();
    assert!(error.contains("certificates.0.key: the key in"), "{error}");
    assert_eq!(e["cause"], "file change");
    // Still the old certificate, and mail still flows.
    assert_eq!(leaf_at(addr, &pki).await, cert.chain[0].as_ref());
    let (tls, _) = tls_client(
        "127.0.0.1",
        addr,
        verifying_client(pki.server_ca_der()),
        Some("mail.example.test"),
    )
    .await;
    deliver(&mut Smtp::new(tls), "after a failed reload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_binds_added_listeners_and_unbinds_removed_ones_without_touching_others() {
    let mta = FakeMta::start().await;
    let certs = "  - self_signed: [mail.example.test]\n";
    let a = starttls_listener("a", "mail.example.test", "");
    let b = starttls_listener("b", "mail.example.test", "");
    let c = starttls_listener("c", "mail.example.test", "");
    let proxy = spawn_proxy(&yaml(mta.addr, "", certs, &format!("{a}{b}")));
    let (addr_a, addr_b) = (proxy.addr("a"), proxy.addr("b"));
    let (mut on_a, _) = greeted(addr_a, "127.0.0.2").await;
    assert!(on_a.cmd("EHLO client.test").await.starts_with("250"));

    let config = proxy.dir.path().join("proxy.yaml");
    std::fs::write(&config, yaml(mta.addr, "", certs, &format!("{a}{c}"))).unwrap();
    proxy.signal("HUP");
    proxy.wait_for_log(sighup_reload).await;

    let addr_c = proxy.listening_addr("c").await;
    let (_, greeting) = greeted(addr_c, "127.0.0.3").await;
    assert!(greeting.starts_with("220"), "{greeting}");
    let refused = TcpStream::connect(addr_b).await;
    assert_eq!(
        refused.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionRefused),
        "listener b must be unbound"
    );
    // Listener a kept its socket and its session.
    assert_eq!(proxy.listening_addr("a").await, addr_a);
    let (_, greeting) = greeted(addr_a, "127.0.0.4").await;
    assert!(greeting.starts_with("220"));
    assert!(on_a.cmd("NOOP").await.starts_with("250"));
    assert!(on_a.cmd("QUIT").await.starts_with("221"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_sessions_in_flight_refuses_new_ones_and_exits_0() {
    let mta = FakeMta::start().await;
    let certs = "  - self_signed: [mail.example.test]\n";
    let listeners = format!(
        "{}{}",
        implicit_listener("smtps", "mail.example.test", ""),
        starttls_listener("smtp", "mail.example.test", "")
    );
    let grace = Duration::from_secs(8);
    let mut proxy = spawn_proxy(&format!(
        "shutdown_grace: 8s\n{}",
        yaml(mta.addr, "", certs, &listeners)
    ));
    let (smtps, smtp) = (proxy.addr("smtps"), proxy.addr("smtp"));

    // In the relay: implicit TLS, greeting and EHLO done.
    let (tls, _) = tls_client("127.0.0.2", smtps, inspecting_client(None), None).await;
    let mut relayed = Smtp::new(tls);
    assert!(relayed.reply().await.unwrap().starts_with("220"));
    assert!(relayed.cmd("EHLO client.test").await.starts_with("250"));
    // Still in the pre-TLS dialogue of a STARTTLS listener.
    let (mut dialogue, _) = greeted(smtp, "127.0.0.3").await;
    assert!(dialogue.cmd("EHLO client.test").await.starts_with("250"));

    let term = Instant::now();
    proxy.signal("TERM");
    proxy
        .wait_for_log(|v| v["message"] == "shutting down: no new connections")
        .await;
    let reply = dialogue.reply().await.unwrap();
    assert!(reply.starts_with("421 4.3.0"), "{reply}");
    for addr in [smtps, smtp] {
        let r = TcpStream::connect(addr).await;
        assert_eq!(
            r.err().map(|e| e.kind()),
            Some(std::io::ErrorKind::ConnectionRefused),
            "{addr} must refuse after SIGTERM"
        );
    }
    let r = relayed
        .send_mail("a@client.test", "b@example.test", "sent during the drain")
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(relayed.cmd("QUIT").await.starts_with("221"));
    relayed.stream.shutdown().await.unwrap();
    drop(relayed);
    let code = tokio::task::spawn_blocking(move || {
        let code = proxy.wait_exit(grace + Duration::from_secs(1));
        (code, proxy)
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "exit status");
    assert!(term.elapsed() < grace, "took {:?}", term.elapsed());
    let proxy = code.1;
    let line = proxy
        .find_log(|v| v["message"] == "session" && v["outcome"] == "shutdown")
        .expect("the pre-TLS session is logged as shutdown");
    assert_eq!(line["listener"], "smtp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limit_refuses_with_421_and_frees_the_slot_when_a_session_ends() {
    let mta = FakeMta::start().await;
    let certs = "  - self_signed: [mail.example.test]\n";
    let proxy = spawn_proxy(&yaml(
        mta.addr,
        "",
        certs,
        &starttls_listener("smtp", "mail.example.test", "    limits: { per_ip: 2 }\n"),
    ));
    let addr = proxy.addr("smtp");
    let (first, g1) = greeted(addr, "127.0.0.5").await;
    let (mut second, g2) = greeted(addr, "127.0.0.5").await;
    assert!(g1.starts_with("220") && g2.starts_with("220"));
    let (_, over) = greeted(addr, "127.0.0.5").await;
    assert!(over.starts_with("421 4.7.0"), "{over}");
    let (_, other_ip) = greeted(addr, "127.0.0.6").await;
    assert!(
        other_ip.starts_with("220"),
        "another address has its own count"
    );

    // An aborted session gives its slot back...
    let first_addr = first.stream.local_addr().unwrap();
    abort(first.stream);
    proxy.session_line(first_addr).await;
    let (_, again) = greeted(addr, "127.0.0.5").await;
    assert!(again.starts_with("220"), "{again}");
    // ...and so does one that ends normally.
    let second_addr = second.stream.local_addr().unwrap();
    assert!(second.cmd("QUIT").await.starts_with("221"));
    proxy.session_line(second_addr).await;
    let (_, again) = greeted(addr, "127.0.0.5").await;
    assert!(again.starts_with("220"), "{again}");
    let limited = proxy
        .find_log(|v| v["message"] == "session" && v["outcome"] == "limit")
        .unwrap();
    assert_eq!(limited["reason"], "per_ip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_limit_closes_implicit_connections_and_frees_the_slot_on_abort() {
    let mta = FakeMta::start().await;
    let certs = "  - self_signed: [mail.example.test]\n";
    let proxy = spawn_proxy(&format!(
        "max_connections: 2\n{}",
        yaml(
            mta.addr,
            "",
            certs,
            &implicit_listener("smtps", "mail.example.test", ""),
        )
    ));
    let addr = proxy.addr("smtps");
    let (one, one_addr) = tls_client("127.0.0.2", addr, inspecting_client(None), None).await;
    let (_two, _) = tls_client("127.0.0.3", addr, inspecting_client(None), None).await;
    let tcp = connect_from("127.0.0.4", addr).await;
    let over = tcp.local_addr().unwrap();
    let refused = tls_handshake(tcp, inspecting_client(None), None).await;
    assert!(refused.is_err(), "the third connection is closed at once");
    let line = proxy.session_line(over).await;
    assert_eq!(line["outcome"], "limit");
    assert_eq!(line["reason"], "max_connections");

    let (tcp, _) = one.into_inner();
    abort(tcp);
    proxy.session_line(one_addr).await;
    let (mut three, _) = tls_client("127.0.0.4", addr, inspecting_client(None), None).await;
    let mut smtp = Smtp::new(&mut three);
    assert!(smtp.reply().await.unwrap().starts_with("220"));
}

/// A tiny deterministic generator: the abort points vary but every run is the same.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One session aborted (TCP RST) at phase `point`.
async fn aborted_session(point: u64, implicit: SocketAddr, starttls: SocketAddr) {
    match point {
        // Right after connect.
        0 => abort(connect_from("127.0.0.9", implicit).await),
        // Mid-handshake: half a ClientHello.
        1 => {
            let mut tcp = connect_from("127.0.0.9", implicit).await;
            tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
                .await
                .unwrap();
            abort(tcp);
        }
        // Mid-dialogue on a STARTTLS listener.
        2 => {
            let (mut smtp, _) = greeted(starttls, "127.0.0.9").await;
            smtp.cmd("EHLO client.test").await;
            smtp.send(b"MAIL FROM:<a@").await;
            abort(smtp.stream);
        }
        // Mid-handshake after STARTTLS.
        3 => {
            let (mut smtp, _) = greeted(starttls, "127.0.0.9").await;
            smtp.cmd("EHLO client.test").await;
            assert!(smtp.cmd("STARTTLS").await.starts_with("220"));
            smtp.send(&[0x16, 0x03, 0x01]).await;
            abort(smtp.stream);
        }
        // Mid-relay: inside DATA through the upstream.
        _ => {
            let (tls, _) = tls_client("127.0.0.9", implicit, inspecting_client(None), None).await;
            let mut smtp = Smtp::new(tls);
            smtp.reply().await.unwrap();
            smtp.cmd("EHLO client.test").await;
            smtp.cmd("MAIL FROM:<a@client.test>").await;
            smtp.cmd("RCPT TO:<b@example.test>").await;
            smtp.cmd("DATA").await;
            smtp.send(b"Subject: cut\r\n\r\nhalf a mess").await;
            let (tcp, _) = smtp.stream.into_inner();
            abort(tcp);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_aborted_sessions_leave_the_descriptor_count_at_its_baseline() {
    let mta = FakeMta::start().await;
    let certs = "  - self_signed: [mail.example.test]\n";
    let listeners = format!(
        "{}{}",
        implicit_listener(
            "smtps",
            "mail.example.test",
            "    limits: { per_ip: 1000 }\n"
        ),
        starttls_listener(
            "smtp",
            "mail.example.test",
            "    limits: { per_ip: 1000 }\n"
        )
    );
    let proxy = spawn_proxy(&yaml(mta.addr, "", certs, &listeners));
    let (implicit, starttls) = (proxy.addr("smtps"), proxy.addr("smtp"));
    let sessions = |p: &RunningProxy| p.count_logs(|v| v["message"] == "session");

    // Warm-up: one session of each kind, so lazily created runtime descriptors exist.
    for point in 0..5 {
        aborted_session(point, implicit, starttls).await;
    }
    proxy
        .wait_for_nth_log(5, IO_TIMEOUT, |v| v["message"] == "session")
        .await;
    let baseline = proxy.fd_count();

    const TOTAL: usize = 1000;
    const CONCURRENT: usize = 16;
    let mut rng = XorShift(0x5EED_CAFE_F00D_0001);
    let points: Vec<u64> = (0..TOTAL).map(|_| rng.next() % 5).collect();
    for batch in points.chunks(CONCURRENT) {
        let tasks: Vec<_> = batch
            .iter()
            .map(|&p| tokio::spawn(aborted_session(p, implicit, starttls)))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let before = 5;
    proxy
        .wait_for_nth_log(before + TOTAL, Duration::from_secs(60), |v| {
            v["message"] == "session"
        })
        .await;
    assert_eq!(sessions(&proxy), before + TOTAL);
    assert_eq!(
        proxy.fd_count(),
        baseline,
        "descriptors leaked after {TOTAL} aborted sessions"
    );
}
