//! Client-certificate modes against a Gmail-like client that presents an unknown
//! certificate whenever it is asked.

// Test helpers outside #[test] fns may unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use crate::common::*;

fn proxy_with(mode: &str, pki: &TestPki, mta: &FakeMta) -> RunningProxy {
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let ca = if mode == "none" {
        String::new()
    } else {
        format!("    client_ca: {}\n", pki.client_ca_pem().display())
    };
    spawn_proxy(&yaml(
        mta.addr,
        "",
        &cert_entry(&mx),
        &implicit_listener(
            "smtps",
            "mx.example.test",
            &format!("    client_cert: {mode}\n{ca}"),
        ),
    ))
}

fn ssl_tlv(conn: &MtaConn) -> Vec<u8> {
    let header = parse_v2(&conn.header);
    tlvs(&header)
        .into_iter()
        .find(|(k, _)| *k == 0x20)
        .expect("SSL TLV")
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_none_sends_no_certificate_request_and_gmail_delivers() {
    let pki = TestPki::new();
    let mta = FakeMta::start().await;
    let proxy = proxy_with("none", &pki, &mta);
    let gmail = pki.unknown_client_cert("gmail", "smtp.gmail.com");
    let (config, asked) = recording_client(&gmail);
    let (tls, _) = tls_client(
        "127.0.0.1",
        proxy.addr("smtps"),
        config,
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    deliver(&mut smtp, "hi").await;
    assert!(
        !asked.load(Ordering::SeqCst),
        "no CertificateRequest was sent"
    );
    let conn = mta.wait_line(0, |l| l == "QUIT").await;
    assert_eq!(ssl_tlv(&conn)[0], 0x01, "SSL without CERT_CONN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_request_accepts_an_unknown_certificate_and_forwards_its_fingerprint() {
    let pki = TestPki::new();
    let mta = FakeMta::start().await;
    let proxy = proxy_with("request", &pki, &mta);
    let gmail = pki.unknown_client_cert("gmail", "smtp.gmail.com");
    let (config, asked) = recording_client(&gmail);
    let (tls, client) = tls_client(
        "127.0.0.1",
        proxy.addr("smtps"),
        config,
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    deliver(&mut smtp, "hi").await;
    assert!(
        asked.load(Ordering::SeqCst),
        "control: the probe sees a CertificateRequest"
    );

    let fingerprint =
        hex(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, gmail.chain[0].as_ref()).as_ref(),
        );
    let conn = mta.wait_line(0, |l| l == "QUIT").await;
    let ssl = ssl_tlv(&conn);
    assert_eq!(ssl[0], 0x07, "SSL + CERT_CONN + CERT_SESS");
    assert_ne!(
        u32::from_be_bytes(ssl[1..5].try_into().unwrap()),
        0,
        "not verified"
    );
    let subs = ssl_sub_tlvs(&ssl);
    let fp = subs
        .iter()
        .find(|(k, _)| *k == 0xE0)
        .expect("fingerprint sub-TLV");
    assert_eq!(hex(&fp.1), fingerprint);
    assert!(subs.contains(&(0x22, b"smtp.gmail.com".to_vec())));

    let line = proxy.session_line(client).await;
    assert_eq!(line["client_cert_sha256"], fingerprint.as_str());
    assert_eq!(line["client_cert_cn"], "smtp.gmail.com");
    assert!(
        line["client_cert_verify"]
            .as_str()
            .unwrap()
            .contains("UnknownIssuer"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_require_refuses_an_unknown_certificate_and_accepts_one_from_client_ca() {
    let pki = TestPki::new();
    let mta = FakeMta::start().await;
    let proxy = proxy_with("require", &pki, &mta);

    let gmail = pki.unknown_client_cert("gmail", "smtp.gmail.com");
    let (config, asked) = recording_client(&gmail);
    let tcp = connect_from("127.0.0.1", proxy.addr("smtps")).await;
    let client = tcp.local_addr().unwrap();
    // TLS 1.3: the client learns of the refusal on its first read.
    let outcome = match tls_handshake(tcp, config, Some("mx.example.test")).await {
        Err(e) => Err(e.to_string()),
        Ok(tls) => Smtp::new(tls).reply().await.map_err(|e| e.to_string()),
    };
    let err = outcome.expect_err("an unknown client certificate must fail the handshake");
    assert!(asked.load(Ordering::SeqCst));
    assert!(
        err.contains("alert") || err.contains("Certificate"),
        "{err}"
    );
    let line = proxy.session_line(client).await;
    assert_eq!(line["outcome"], "handshake_failed");

    let good = pki.client_cert("relay", "relay.partner.test");
    let (config, _) = recording_client(&good);
    let (tls, _) = tls_client(
        "127.0.0.1",
        proxy.addr("smtps"),
        config,
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    deliver(&mut smtp, "hi").await;
    let conn = mta.wait_line(0, |l| l == "QUIT").await;
    let ssl = ssl_tlv(&conn);
    assert_eq!(
        u32::from_be_bytes(ssl[1..5].try_into().unwrap()),
        0,
        "verified"
    );
    assert!(ssl_sub_tlvs(&ssl).contains(&(0x22, b"relay.partner.test".to_vec())));
}
