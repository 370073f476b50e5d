//! AUTH submission through the proxy into a Postfix with Cyrus SASL (issue 18): behind the
//! proxy Postfix sees every session as plaintext, so the PROXY port must keep
//! `smtpd_tls_auth_only` off (README, "The Postfix side"); the proxy refuses AUTH before TLS
//! itself. Real client (swaks), real Postfix, real sasldb.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::postfix::{Postfix, PostfixOptions};
use crate::common::*;
use serde_json::json;

const PF_WAIT: Duration = Duration::from_secs(20);

fn config(pf: &Postfix, cert: &Issued) -> TestConfig {
    TestConfig::new(pf.proxy_addr())
        .certificate(cert)
        .starttls(
            "submission",
            "mx.example.test",
            json!({ "require_starttls": true }),
        )
        .implicit("submissions", "mx.example.test", json!({}))
}

/// swaks from `from_ip` with AUTH PLAIN; `tls` is `--tls` (STARTTLS) or `--tls-on-connect`.
async fn swaks(addr: SocketAddr, from_ip: &str, tls: &str, body: &str, password: &str) -> String {
    let (ip, tls, body, password) = (
        from_ip.to_owned(),
        tls.to_owned(),
        body.to_owned(),
        password.to_owned(),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("swaks")
            .args(["--server", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .args([
                "--local-interface",
                &ip,
                &tls,
                "--tls-sni",
                "mx.example.test",
            ])
            .args(["--auth", "PLAIN", "--auth-user", "alice@example.test"])
            .args(["--auth-password", &password])
            .args(["--from", "alice@example.test", "--to", "user@example.test"])
            .args(["--ehlo", "client.test", "--body", &body, "--timeout", "20"])
            .output()
            .expect("swaks is installed (.ci/run installs it)")
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_plain_submission_through_587_and_465_reaches_a_sasl_postfix() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions {
        sasl: Some(("alice".into(), "s3cret-pass".into())),
        ..Default::default()
    });
    let proxy = config(&pf, &mx).spawn();
    for (listener, ip, tls) in [
        ("submission", "127.0.0.6", "--tls"),
        ("submissions", "127.0.0.7", "--tls-on-connect"),
    ] {
        let body = format!("authenticated via {listener}");
        let t = swaks(proxy.addr(listener), ip, tls, &body, "s3cret-pass").await;
        assert!(
            t.contains("<~  235 2.7.0 Authentication successful"),
            "{listener}:\n{t}"
        );
        assert!(t.contains("250 2.0.0 Ok: queued"), "{listener}:\n{t}");
        pf.wait_for_message(&body, PF_WAIT);
        let logged = pf.wait_for_log(&format!("client=unknown[{ip}], sasl_method=PLAIN"), PF_WAIT);
        assert!(logged.contains("sasl_username=alice"), "{logged}");
    }
    // Control: a wrong password is refused by Postfix itself, so the check above is real.
    let t = swaks(
        proxy.addr("submissions"),
        "127.0.0.8",
        "--tls-on-connect",
        "x",
        "wrong",
    )
    .await;
    assert!(t.contains("535"), "{t}");
    assert!(!t.contains(" 235 "), "{t}");
}
