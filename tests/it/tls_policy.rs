//! TLS policy of the listeners. ALPN (catalogue TL-6, the ALPACA mitigation): a foreign
//! protocol is refused with `no_application_protocol`, `smtp` is accepted and carried to the
//! MTA in PP2_TYPE_ALPN, no ALPN at all proceeds. Cipher suites: the server's order
//! (AES-128-GCM first) applies over the client's.

// Test helpers outside #[test] fns may unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use crate::common::*;

async fn setup() -> (FakeMta, RunningProxy) {
    setup_with(&implicit_listener("smtps", "mx.example.test", "")).await
}

async fn setup_with(listeners: &str) -> (FakeMta, RunningProxy) {
    let pki = TestPki::new();
    let mta = FakeMta::start().await;
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let proxy = spawn_proxy(&yaml(mta.addr, "", &cert_entry(&mx), listeners));
    (mta, proxy)
}

fn client_offering(protocols: &[&[u8]]) -> rustls::ClientConfig {
    let mut c = inspecting_client(None);
    c.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_alpn_on_a_mail_port_is_refused_and_never_reaches_the_mta() {
    let (mta, proxy) = setup().await;
    for offered in [&b"http/1.1"[..], b"h2"] {
        let tcp = connect_from("127.0.0.1", proxy.addr("smtps")).await;
        let err = tls_handshake(tcp, client_offering(&[offered]), Some("mx.example.test"))
            .await
            .expect_err("a foreign ALPN must not complete the handshake");
        assert!(
            err.to_string().contains("NoApplicationProtocol"),
            "expected a no_application_protocol alert, got: {err}"
        );
    }
    // Both attempts are logged as failed handshakes, and the MTA saw no connection.
    proxy
        .wait_for_nth_log(2, std::time::Duration::from_secs(5), |l| {
            l["outcome"].as_str() == Some("handshake_failed")
        })
        .await;
    assert!(mta.conns().is_empty(), "{:?}", mta.conns());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_alpn_is_accepted_and_carried_in_the_proxy_header() {
    let (mta, proxy) = setup().await;
    let tcp = connect_from("127.0.0.1", proxy.addr("smtps")).await;
    let tls = tls_handshake(
        tcp,
        client_offering(&[b"h2", b"smtp"]),
        Some("mx.example.test"),
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"smtp"[..]));
    let mut smtp = Smtp::new(tls);
    deliver(&mut smtp, "alpn").await;
    let conn = mta.wait_line(0, |l| l == "QUIT").await;
    let header = parse_v2(&conn.header);
    let alpn: Vec<_> = tlvs(&header)
        .into_iter()
        .filter(|(k, _)| *k == 0x01)
        .collect();
    assert_eq!(alpn, vec![(0x01, b"smtp".to_vec())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_alpn_proceeds_without_an_alpn_tlv() {
    let (mta, proxy) = setup().await;
    let tcp = connect_from("127.0.0.1", proxy.addr("smtps")).await;
    let tls = tls_handshake(tcp, inspecting_client(None), Some("mx.example.test"))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let mut smtp = Smtp::new(tls);
    deliver(&mut smtp, "no alpn").await;
    let conn = mta.wait_line(0, |l| l == "QUIT").await;
    let header = parse_v2(&conn.header);
    assert!(tlvs(&header).iter().all(|(k, _)| *k != 0x01));
}

/// The suite the `smtps` listener picks for a client with `config`.
async fn negotiated(proxy: &RunningProxy, config: rustls::ClientConfig) -> rustls::CipherSuite {
    let tcp = connect_from("127.0.0.1", proxy.addr("smtps")).await;
    let tls = tls_handshake(tcp, config, Some("mx.example.test"))
        .await
        .unwrap();
    tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
}

/// A client that offers `first` before every other suite, over `versions`.
fn preferring(
    first: rustls::CipherSuite,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut provider = (*provider()).clone();
    provider.cipher_suites.sort_by_key(|s| s.suite() != first);
    assert_eq!(provider.cipher_suites[0].suite(), first);
    let verifier = std::sync::Arc::new(AcceptAnyServerCert(
        std::sync::Arc::new(provider.clone()),
        false,
    ));
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_picks_aes_128_gcm_even_when_the_client_prefers_aes_256() {
    let (_mta, proxy) = setup().await;
    // rustls' own default order already puts AES-256 first; make the preference explicit.
    let config = preferring(
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        rustls::DEFAULT_VERSIONS,
    );
    assert_eq!(
        negotiated(&proxy, config).await,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_follows_the_same_rule_aes_128_gcm_over_the_clients_aes_256() {
    let (_mta, proxy) = setup().await;
    let config = preferring(
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        &[&rustls::version::TLS12],
    );
    assert_eq!(
        negotiated(&proxy, config).await,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_without_close_notify_is_logged_as_truncated() {
    // Catalogue TL-11: a truncation attack looks like a clean close unless it is told apart.
    use tokio::io::AsyncWriteExt;
    let (mta, proxy) = setup().await;
    for clean in [true, false] {
        let tcp = connect_from("127.0.0.1", proxy.addr("smtps")).await;
        let client = tcp.local_addr().unwrap();
        let tls = tls_handshake(tcp, inspecting_client(None), Some("mx.example.test"))
            .await
            .unwrap();
        let mut smtp = Smtp::new(tls);
        assert!(smtp.reply().await.unwrap().starts_with("220"));
        assert!(smtp.cmd("EHLO client.test").await.starts_with("250"));
        if clean {
            smtp.stream.shutdown().await.unwrap(); // close_notify, then FIN
        } else {
            smtp.stream.get_mut().0.shutdown().await.unwrap(); // FIN only
        }
        let line = proxy.session_line(client).await;
        let expected = if clean { "clean" } else { "truncated" };
        assert_eq!(line["client_close"], expected, "{line}");
    }
    drop(mta);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_1_1_sender_fails_the_handshake_and_can_still_deliver_in_plaintext_on_port_25() {
    // Catalogue TL-1: rustls has no TLS 1.0/1.1; such senders fall back to plaintext on 25
    // (RFC 3207 senders do when STARTTLS fails), so the failure must be clean and the
    // listener must keep taking plaintext mail.
    let (mta, proxy) = setup_with(
        "  smtp:\n    listen: \"127.0.0.1:0\"\n    mode: starttls\n    hostname: mx.example.test\n    upstream: mta\n",
    )
    .await;
    let addr = proxy.addr("smtp").to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr, "-starttls", "smtp"])
            .args(["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl s_client")
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "a TLS 1.1 handshake succeeded:\n{text}"
    );
    // rustls answers a ClientHello without TLS 1.2/1.3 with a fatal alert (handshake_failure).
    assert!(text.contains("SSL alert number"), "{text}");
    assert!(text.contains("Cipher is (NONE)"), "{text}");
    proxy
        .wait_for_log(|l| l["outcome"] == "handshake_failed" && l["listener"] == "smtp")
        .await;
    assert!(mta.conns().is_empty(), "no upstream for a failed handshake");

    // The same sender retrying without TLS delivers.
    let tcp = connect_from("127.0.0.1", proxy.addr("smtp")).await;
    let mut smtp = Smtp::new(tcp);
    deliver(&mut smtp, "plaintext after a failed TLS 1.1 attempt").await;
    mta.wait_line(0, |l| l == "QUIT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_sessions_never_get_0rtt_so_smtp_commands_are_not_replayable() {
    // Catalogue TL-8: early data is not replay-safe for SMTP; the server must never offer it.
    let (_mta, proxy) = setup().await;
    let mut config = inspecting_client(None);
    config.enable_early_data = true;
    let config = std::sync::Arc::new(config);
    let name = rustls::pki_types::ServerName::try_from("mx.example.test").unwrap();

    // A first session: its tickets arrive with the server's first application data.
    let tcp = connect_from("127.0.0.1", proxy.addr("smtps")).await;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    let mut smtp = Smtp::new(tls);
    assert!(smtp.reply().await.unwrap().starts_with("220"));
    assert!(smtp.cmd("QUIT").await.starts_with("221"));

    // A client holding a ticket would be allowed 0-RTT only if the ticket said so.
    let mut probe = rustls::ClientConnection::new(config.clone(), name.clone()).unwrap();
    assert!(
        probe.early_data().is_none(),
        "the server's ticket allows early data"
    );

    // And the ticket does resume: the check above is about a real resumption.
    let tcp = connect_from("127.0.0.1", proxy.addr("smtps")).await;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let conn = tls.get_ref().1;
    assert_eq!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    assert!(!conn.is_early_data_accepted());
    let mut smtp = Smtp::new(tls);
    assert!(smtp.reply().await.unwrap().starts_with("220"));
    assert!(smtp.cmd("EHLO client.test").await.starts_with("250"));
}
