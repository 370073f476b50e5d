//! End-to-end through a real Postfix (private instance, `smtpd_upstream_proxy_protocol =
//! haproxy`, delivery into a Maildir): the proof that mail flows and Postfix sees the real
//! client address.

// Test helpers outside #[test] fns may unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::postfix::{Postfix, PostfixOptions};
use crate::common::*;

const PF_WAIT: Duration = Duration::from_secs(20);

fn implicit_yaml(pf: &Postfix, cert: &Issued, extra_listener: &str) -> String {
    format!(
        r#"
log: {{ format: json }}
upstreams:
  mta: {{ address: "{}", connect_timeout: 3s }}
certificates:
  - cert: {}
    key: {}
listeners:
  submissions:
    listen: "127.0.0.1:0"
    mode: implicit
    hostname: mx.example.test
    upstream: mta
{extra_listener}
"#,
        pf.proxy_addr(),
        cert.cert_path.display(),
        cert.key_path.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_receives_an_implicit_tls_session_with_the_real_client_address() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions::default());
    let proxy = spawn_proxy(&implicit_yaml(&pf, &mx, ""));

    let tcp = connect_from("127.0.0.2", proxy.addr("submissions")).await;
    let client = tcp.local_addr().unwrap();
    let tls = tls_handshake(
        tcp,
        verifying_client(pki.server_ca_der()),
        Some("mx.example.test"),
    )
    .await
    .expect("the chain verifies against the test CA");
    let mut smtp = Smtp::new(tls);
    let greeting = smtp.reply().await.unwrap();
    assert!(greeting.starts_with("220 mx.example.test"), "{greeting}");
    assert!(smtp.cmd("EHLO client.test").await.starts_with("250"));
    let done = smtp
        .send_mail(
            "sender@client.test",
            "user@example.test",
            "Subject: via 465\r\n\r\nhello through the proxy",
        )
        .await;
    assert!(done.starts_with("250"), "{done}");
    assert!(smtp.cmd("QUIT").await.starts_with("221"));

    let msg = pf.wait_for_message("hello through the proxy", PF_WAIT);
    assert!(
        msg.contains("(unknown [127.0.0.2])"),
        "Received header: {msg}"
    );
    pf.wait_for_log("client=unknown[127.0.0.2]", PF_WAIT);
    // (The proxy's health probes connect as 127.0.0.1 with PROXY LOCAL; they never get
    // as far as a mail transaction, so no `client=` line names that address.)
    assert!(
        !pf.log().contains("client=unknown[127.0.0.1]")
            && !pf.log().contains("client=localhost[127.0.0.1]"),
        "Postfix saw the proxy's address:\n{}",
        pf.log()
    );
    let line = proxy.session_line(client).await;
    assert_eq!(line["outcome"], "relayed");
    assert_eq!(line["transport"], "implicit");
    assert_eq!(line["tls_version"], "TLSv1.3");
    assert!(line["bytes_from_client"].as_u64().unwrap() > 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_accepts_the_maximal_header_ipv6_long_sni_long_cn() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let cn = "c".repeat(200);
    let client_cert = pki.client_cert("client", &cn);
    let pf = Postfix::start(PostfixOptions::default());
    let extra = format!(
        r#"  v6:
    listen: "[::1]:0"
    mode: implicit
    hostname: mx.example.test
    upstream: mta
    client_cert: request
    client_ca: {}
"#,
        pki.client_ca_pem().display()
    );
    let proxy = spawn_proxy(&implicit_yaml(&pf, &mx, &extra));
    let sni = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(sni.len(), 253);

    let tcp = tokio::net::TcpStream::connect(proxy.addr("v6"))
        .await
        .unwrap();
    let client = tcp.local_addr().unwrap();
    let tls = tls_handshake(tcp, inspecting_client(Some(&client_cert)), Some(&sni))
        .await
        .unwrap();
    let mut smtp = Smtp::new(tls);
    assert!(smtp.reply().await.unwrap().starts_with("220"));
    assert!(smtp.cmd("EHLO client.test").await.starts_with("250"));
    let done = smtp
        .send_mail(
            "a@client.test",
            "user@example.test",
            "Subject: max\r\n\r\nmaximal header",
        )
        .await;
    assert!(done.starts_with("250"), "{done}");
    smtp.cmd("QUIT").await;
    pf.wait_for_message("maximal header", PF_WAIT);
    pf.wait_for_log("client=unknown[::1]", PF_WAIT);
    let line = proxy.session_line(client).await;
    assert_eq!(line["sni"], sni.as_str());
    assert_eq!(line["fallback"], true);
    assert_eq!(line["client_cert_verify"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_421_and_mail_flows_again_when_it_is_back() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions::default());
    let proxy = spawn_proxy(&implicit_yaml(&pf, &mx, ""));

    pf.stop_for_outage();
    let (tls, client) = tls_client(
        "127.0.0.2",
        proxy.addr("submissions"),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    let reply = smtp.reply().await.unwrap();
    assert!(
        reply.starts_with("421 4.3.0"),
        "a temporary failure: {reply}"
    );
    let line = proxy.session_line(client).await;
    assert_eq!(line["outcome"], "upstream_failed");
    assert!(
        line["reason"].as_str().unwrap().contains("connect"),
        "{line}"
    );

    pf.restart_after_outage();
    let (tls, _) = tls_client(
        "127.0.0.2",
        proxy.addr("submissions"),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    assert!(smtp.reply().await.unwrap().starts_with("220"));
    assert!(smtp.cmd("EHLO client.test").await.starts_with("250"));
    let done = smtp
        .send_mail(
            "a@client.test",
            "user@example.test",
            "Subject: back\r\n\r\nafter the outage",
        )
        .await;
    assert!(done.starts_with("250"), "{done}");
    pf.wait_for_message("after the outage", PF_WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_over_implicit_tls_delivers_through_the_proxy() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions::default());
    let proxy = spawn_proxy(&implicit_yaml(&pf, &mx, ""));
    let addr = proxy.addr("submissions");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("swaks")
            .args([
                "--server",
                &addr.ip().to_string(),
                "--port",
                &addr.port().to_string(),
            ])
            .args(["--tls-on-connect", "--tls-sni", "mx.example.test"])
            .args(["--from", "sender@client.test", "--to", "user@example.test"])
            .args([
                "--ehlo",
                "client.test",
                "--body",
                "sent by swaks through the proxy",
            ])
            .args(["--timeout", "20"])
            .output()
            .expect("swaks is installed (.ci/run installs it)")
    })
    .await
    .unwrap();
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swaks failed:\n{transcript}");
    assert!(transcript.contains("TLS started"), "{transcript}");
    pf.wait_for_message("sent by swaks through the proxy", PF_WAIT);
}

fn starttls_yaml(pf: &Postfix, cert: &Issued) -> String {
    format!(
        r#"
log: {{ format: json }}
upstreams:
  mta: {{ address: "{}", connect_timeout: 3s }}
certificates:
  - cert: {}
    key: {}
listeners:
  smtp: {{ listen: "127.0.0.1:0", mode: starttls, hostname: mx.example.test, upstream: mta }}
  submission: {{ listen: "127.0.0.1:0", mode: starttls, require_starttls: true, hostname: mx.example.test, upstream: mta }}
"#,
        pf.proxy_addr(),
        cert.cert_path.display(),
        cert.key_path.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_on_25_and_587_style_listeners_delivers_with_the_real_client_address() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions::default());
    let proxy = spawn_proxy(&starttls_yaml(&pf, &mx));
    for (listener, ip) in [("smtp", "127.0.0.3"), ("submission", "127.0.0.4")] {
        let tcp = connect_from(ip, proxy.addr(listener)).await;
        let client = tcp.local_addr().unwrap();
        let mut smtp = Smtp::new(tcp);
        assert!(
            smtp.reply()
                .await
                .unwrap()
                .starts_with("220 mx.example.test ESMTP")
        );
        assert!(smtp.cmd("EHLO client.test").await.contains("STARTTLS"));
        assert!(smtp.cmd("STARTTLS").await.starts_with("220"));
        let tls = tls_handshake(
            smtp.stream,
            verifying_client(pki.server_ca_der()),
            Some("mx.example.test"),
        )
        .await
        .unwrap();
        let mut tls = Smtp::new(tls);
        let ehlo = tls.cmd("EHLO client.test").await;
        assert!(ehlo.starts_with("250-"), "Postfix's own EHLO reply: {ehlo}");
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
        let body = format!("Subject: {listener}\r\n\r\nstarttls via {listener}");
        let r = tls
            .send_mail("a@client.test", "user@example.test", &body)
            .await;
        assert!(r.starts_with("250"), "{r}");
        assert!(tls.cmd("QUIT").await.starts_with("221"));
        pf.wait_for_message(&format!("starttls via {listener}"), PF_WAIT);
        pf.wait_for_log(&format!("client=unknown[{ip}]"), PF_WAIT);
        let line = proxy.session_line(client).await;
        assert_eq!(line["transport"], "starttls");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_25_plaintext_delivers_through_postfix() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions::default());
    let proxy = spawn_proxy(&starttls_yaml(&pf, &mx));
    let tcp = connect_from("127.0.0.5", proxy.addr("smtp")).await;
    let mut smtp = Smtp::new(tcp);
    assert!(smtp.reply().await.unwrap().starts_with("220"));
    assert!(smtp.cmd("EHLO old-sender.test").await.starts_with("250"));
    let r = smtp
        .send_mail(
            "a@old-sender.test",
            "user@example.test",
            "Subject: plain\r\n\r\nno tls at all",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(smtp.cmd("QUIT").await.starts_with("221"));
    let msg = pf.wait_for_message("no tls at all", PF_WAIT);
    assert!(
        msg.contains("old-sender.test (unknown [127.0.0.5])"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_with_starttls_completes_a_session_to_postfix() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions::default());
    let proxy = spawn_proxy(&starttls_yaml(&pf, &mx));
    let addr = proxy.addr("submission");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("swaks")
            .args([
                "--server",
                &addr.ip().to_string(),
                "--port",
                &addr.port().to_string(),
            ])
            .args([
                "--tls",
                "--from",
                "sender@client.test",
                "--to",
                "user@example.test",
            ])
            .args([
                "--ehlo",
                "client.test",
                "--body",
                "swaks starttls body",
                "--timeout",
                "20",
            ])
            .output()
            .expect("swaks is installed (.ci/run installs it)")
    })
    .await
    .unwrap();
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swaks failed:\n{transcript}");
    assert!(transcript.contains("STARTTLS"), "{transcript}");
    pf.wait_for_message("swaks starttls body", PF_WAIT);
}

/// TLS scanners and policy probes upgrade and QUIT at once: the proxy answers 221 itself and
/// Postfix never sees the session (no smtpd spawned for nothing). The control, EHLO then
/// QUIT after the upgrade from another address, does reach Postfix, later in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_right_after_starttls_is_answered_without_contacting_postfix() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions::default());
    let proxy = spawn_proxy(&starttls_yaml(&pf, &mx));
    let upgraded = |ip: &'static str| {
        let (proxy, ca) = (&proxy, pki.server_ca_der());
        async move {
            let tcp = connect_from(ip, proxy.addr("smtp")).await;
            let client = tcp.local_addr().unwrap();
            let mut smtp = Smtp::new(tcp);
            assert!(smtp.reply().await.unwrap().starts_with("220"));
            assert!(smtp.cmd("EHLO probe.test").await.starts_with("250"));
            assert!(smtp.cmd("STARTTLS").await.starts_with("220"));
            let tls = tls_handshake(smtp.stream, verifying_client(ca), Some("mx.example.test"))
                .await
                .unwrap();
            (Smtp::new(tls), client)
        }
    };
    let (mut probe, probe_addr) = upgraded("127.0.0.9").await;
    assert_eq!(probe.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    assert!(probe.reply().await.is_err(), "closed after the 221");
    let line = proxy.session_line(probe_addr).await;
    assert_eq!(line["outcome"], "client_closed");
    assert_eq!(line["transport"], "starttls");
    assert_eq!(line["upstream_addr"], "", "no upstream connection");

    let (mut control, _) = upgraded("127.0.0.10").await;
    assert!(control.cmd("EHLO control.test").await.starts_with("250"));
    assert!(control.cmd("QUIT").await.starts_with("221"));
    pf.wait_for_log("[127.0.0.10]", PF_WAIT);
    assert!(
        !pf.log().contains("[127.0.0.9]"),
        "the probe reached Postfix:\n{}",
        pf.log()
    );
}
