//! Certificate choice by SNI: exact, one-label wildcard, fallback or `unrecognized_name`,
//! no SNI, and RSA vs ECDSA by the client's signature schemes.

// Test helpers outside #[test] fns may unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use crate::common::*;

struct Setup {
    _mta: FakeMta,
    proxy: RunningProxy,
}

async fn setup() -> Setup {
    let pki = TestPki::new();
    let mta = FakeMta::start().await;
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let wild = pki.server_cert("wild", &["*.wild.test"], false);
    let dual_ec = pki.server_cert("dual-ec", &["dual.test"], false);
    let dual_rsa = pki.server_cert("dual-rsa", &["dual.test"], true);
    let certs = [&mx, &wild, &dual_ec, &dual_rsa]
        .iter()
        .map(|c| cert_entry(c))
        .collect::<String>();
    let listeners = implicit_listener("lenient", "mx.example.test", "    unknown_sni: default\n")
        + &implicit_listener("strict", "mx.example.test", "    unknown_sni: reject\n");
    let proxy = spawn_proxy(&yaml(mta.addr, "", &certs, &listeners));
    Setup { _mta: mta, proxy }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_domain_as_sni_gets_the_hostname_certificate_on_a_default_listener() {
    let s = setup().await;
    let (tls, client) = tls_client(
        "127.0.0.1",
        s.proxy.addr("lenient"),
        inspecting_client(None),
        Some("example.test"),
    )
    .await;
    assert_eq!(served_names(&tls), vec!["mx.example.test"]);
    let mut smtp = Smtp::new(tls);
    deliver(&mut smtp, "x").await;
    let line = s.proxy.session_line(client).await;
    assert_eq!(line["fallback"], true);
    assert_eq!(line["sni"], "example.test");
    assert_eq!(line["cert"], "mx.example.test/ecdsa");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_on_a_reject_listener_gets_unrecognized_name() {
    let s = setup().await;
    let tcp = connect_from("127.0.0.1", s.proxy.addr("strict")).await;
    let client = tcp.local_addr().unwrap();
    let err = tls_handshake(tcp, inspecting_client(None), Some("example.test"))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("UnrecognisedName"), "{err}");
    let line = s.proxy.session_line(client).await;
    assert_eq!(line["outcome"], "handshake_failed");
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .contains("unrecognized_name")
    );

    // Control: a known name on the same listener completes.
    let (tls, _) = tls_client(
        "127.0.0.1",
        s.proxy.addr("strict"),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    assert_eq!(served_names(&tls), vec!["mx.example.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sni_gets_the_default_certificate_even_on_a_reject_listener() {
    let s = setup().await;
    for listener in ["strict", "lenient"] {
        let (tls, client) = tls_client(
            "127.0.0.1",
            s.proxy.addr(listener),
            inspecting_client(None),
            None,
        )
        .await;
        assert_eq!(served_names(&tls), vec!["mx.example.test"]);
        let mut smtp = Smtp::new(tls);
        deliver(&mut smtp, "x").await;
        let line = s.proxy.session_line(client).await;
        assert_eq!(line["fallback"], false, "no SNI is not a fallback");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_matches_exactly_one_label() {
    let s = setup().await;
    let (tls, _) = tls_client(
        "127.0.0.1",
        s.proxy.addr("strict"),
        inspecting_client(None),
        Some("a.wild.test"),
    )
    .await;
    assert_eq!(served_names(&tls), vec!["*.wild.test"]);

    let tcp = connect_from("127.0.0.1", s.proxy.addr("strict")).await;
    let err = tls_handshake(tcp, inspecting_client(None), Some("a.b.wild.test")).await;
    assert!(
        err.is_err(),
        "two labels below the wildcard are not covered"
    );

    let tcp = connect_from("127.0.0.1", s.proxy.addr("strict")).await;
    let err = tls_handshake(tcp, inspecting_client(None), Some("wild.test")).await;
    assert!(err.is_err(), "the wildcard does not cover its parent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_only_client_gets_rsa_and_a_modern_client_gets_ecdsa() {
    let s = setup().await;
    let (tls, _) = tls_client(
        "127.0.0.1",
        s.proxy.addr("lenient"),
        rsa_only_client(),
        Some("dual.test"),
    )
    .await;
    assert!(served_rsa(&tls), "RSA for a client without ECDSA");

    let (tls, _) = tls_client(
        "127.0.0.1",
        s.proxy.addr("lenient"),
        inspecting_client(None),
        Some("dual.test"),
    )
    .await;
    assert!(!served_rsa(&tls), "ECDSA for a modern client");
    assert_eq!(served_names(&tls), vec!["dual.test"]);
}
