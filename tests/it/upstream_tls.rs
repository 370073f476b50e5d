//! Re-encryption towards an MTA behind an internal CA: a real Postfix in TLS wrapper mode
//! that also expects PROXY (header in cleartext first, then the TLS handshake). Mail flows
//! when `tls.ca` is the MTA's CA; another CA, a wrong `server_name` or an expired
//! certificate give the client `421 4.3.0` and the log names the reason.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::postfix::{Postfix, PostfixOptions};
use crate::common::*;

const PF_WAIT: Duration = Duration::from_secs(20);

/// One implicit listener per upstream variant, all pointing at `mta`'s wrapper port.
fn config(mta: std::net::SocketAddr, good_ca: &str, other_ca: &str) -> String {
    let up = |ca: &str, name: &str| {
        format!(
            "{{ address: \"{mta}\", connect_timeout: 3s, tls: {{ ca: {ca}, server_name: {name} }} }}"
        )
    };
    let listener = |name: &str, upstream: &str| {
        format!(
            "  {name}: {{ listen: \"127.0.0.1:0\", mode: implicit, hostname: mx.example.test, upstream: {upstream} }}\n"
        )
    };
    format!(
        "log: {{ format: json }}\nupstreams:\n  good: {}\n  other_ca: {}\n  wrong_name: {}\ncertificates:\n  - self_signed: [mx.example.test]\nlisteners:\n{}{}{}",
        up(good_ca, "mta.internal.test"),
        up(other_ca, "mta.internal.test"),
        up(good_ca, "other.internal.test"),
        listener("good", "good"),
        listener("other_ca", "other_ca"),
        listener("wrong_name", "wrong_name"),
    )
}

/// Connects through `listener`, expects 421 4.3.0, returns the session's `reason`.
async fn refused(proxy: &RunningProxy, listener: &str) -> String {
    let (tls, client) = tls_client(
        "127.0.0.3",
        proxy.addr(listener),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    let reply = smtp.reply().await.unwrap();
    assert!(reply.starts_with("421 4.3.0 mx.example.test"), "{reply}");
    let line = proxy.session_line(client).await;
    assert_eq!(line["outcome"], "upstream_failed");
    line["reason"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_behind_an_internal_ca_gets_mail_only_when_its_certificate_verifies() {
    let pki = TestPki::new();
    let mta_cert = pki.server_cert("mta", &["mta.internal.test"], false);
    let pf = Postfix::start(PostfixOptions {
        wrapper_tls: Some((mta_cert.cert_path.clone(), mta_cert.key_path.clone())),
        ..Default::default()
    });
    let good_ca = pki.server_ca_pem();
    let other_ca = pki.client_ca_pem();
    let proxy = spawn_proxy(&config(
        pf.wrapper_addr().unwrap(),
        good_ca.to_str().unwrap(),
        other_ca.to_str().unwrap(),
    ));

    let (tls, _) = tls_client(
        "127.0.0.2",
        proxy.addr("good"),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    deliver(&mut smtp, "re-encrypted to the internal CA").await;
    pf.wait_for_message("re-encrypted to the internal CA", PF_WAIT);
    // The PROXY header went first, in cleartext: Postfix knows the real client.
    pf.wait_for_log("client=unknown[127.0.0.2]", PF_WAIT);
    // And the hop was TLS: Postfix logged the TLS connection on its wrapper port.
    pf.wait_for_log(
        "TLS connection established from unknown[127.0.0.2]",
        PF_WAIT,
    );

    let reason = refused(&proxy, "other_ca").await;
    assert!(reason.contains("unknown issuer"), "{reason}");
    let reason = refused(&proxy, "wrong_name").await;
    assert!(reason.contains("name mismatch"), "{reason}");
    assert!(
        !pf.log().contains("client=unknown[127.0.0.3]"),
        "nothing reached Postfix over an unverified hop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_upstream_certificate_is_refused_with_the_reason() {
    let pki = TestPki::new();
    let expired = pki.expired_server_cert("old", &["mta.internal.test"]);
    let pf = Postfix::start(PostfixOptions {
        wrapper_tls: Some((expired.cert_path.clone(), expired.key_path.clone())),
        ..Default::default()
    });
    let ca = pki.server_ca_pem();
    let proxy = spawn_proxy(&config(
        pf.wrapper_addr().unwrap(),
        ca.to_str().unwrap(),
        ca.to_str().unwrap(),
    ));
    let reason = refused(&proxy, "good").await;
    assert!(reason.contains("expired"), "{reason}");
}
