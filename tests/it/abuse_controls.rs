//! Abuse controls at the edge (issue 15, SPEC "Abuse controls at the edge"): `allow`/`deny`
//! per listener, the `deny_file` applied without a reload, and `limits.per_ip_rate`, decided
//! on the real client address before any TLS work or upstream contact. A real Postfix
//! behind the proxy shows that refused clients never reach it.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::postfix::{Postfix, PostfixOptions};
use crate::common::*;
use serde_json::json;

const PF_WAIT: Duration = Duration::from_secs(20);

fn config(pf: &Postfix, cert: &Issued, deny_file: &std::path::Path) -> TestConfig {
    TestConfig::new(pf.proxy_addr())
        .top(json!({ "metrics": { "listen": "127.0.0.1:0" }, "deny_file": deny_file }))
        .certificate(cert)
        .starttls(
            "smtp",
            "mx.example.test",
            json!({ "deny": ["127.0.0.9/32"], "limits": { "per_ip_rate": "2/1m" } }),
        )
        .implicit(
            "submissions",
            "mx.example.test",
            json!({ "allow": ["127.0.0.0/28"] }),
        )
}

/// Connects from `ip` and returns the first reply (or "" when closed without one).
async fn greeting(addr: SocketAddr, ip: &str) -> (String, SocketAddr) {
    let tcp = connect_from(ip, addr).await;
    let local = tcp.local_addr().unwrap();
    let mut smtp = Smtp::new(tcp);
    (smtp.reply().await.unwrap_or_default(), local)
}

/// A plaintext delivery on the port-25 listener from `ip` (reaches Postfix).
async fn deliver_plain(addr: SocketAddr, ip: &str, body: &str) {
    let mut smtp = Smtp::new(connect_from(ip, addr).await);
    assert!(
        smtp.reply()
            .await
            .unwrap()
            .starts_with("220 mx.example.test")
    );
    assert!(smtp.cmd("EHLO client.test").await.starts_with("250"));
    let r = smtp
        .send_mail("a@client.test", "user@example.test", body)
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(smtp.cmd("QUIT").await.starts_with("221"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clients_get_their_replies_and_never_reach_postfix() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let deny_file = dir.path().join("denied");
    std::fs::write(&deny_file, "# fail2ban writes here\n").unwrap();
    let proxy = config(&pf, &mx, &deny_file).spawn();
    let (smtp, smtps) = (proxy.addr("smtp"), proxy.addr("submissions"));

    // Listener deny on a STARTTLS listener: 554 as the greeting, then close.
    let (g, client) = greeting(smtp, "127.0.0.9").await;
    assert!(
        g.starts_with("554 5.7.1 mx.example.test Access denied"),
        "{g}"
    );
    let line = proxy.session_line(client).await;
    assert_eq!(
        (line["outcome"].as_str(), line["reason"].as_str()),
        (Some("denied"), Some("listener_deny"))
    );

    // Not in an implicit listener's allow list: closed before the handshake.
    let tcp = connect_from("127.0.0.20", smtps).await;
    let client = tcp.local_addr().unwrap();
    assert!(
        tls_handshake(
            tcp,
            verifying_client(pki.server_ca_der()),
            Some("mx.example.test")
        )
        .await
        .is_err(),
        "no handshake for a client outside allow"
    );
    let line = proxy.session_line(client).await;
    assert_eq!(line["reason"], "not_allowed", "{line}");
    assert_eq!(line["tls_version"], "", "no TLS work was done");
    // Control: an allowed address completes the handshake and delivers.
    let tcp = connect_from("127.0.0.5", smtps).await;
    let tls = tls_handshake(
        tcp,
        verifying_client(pki.server_ca_der()),
        Some("mx.example.test"),
    )
    .await
    .unwrap();
    let mut s = Smtp::new(tls);
    deliver(&mut s, "Subject: allowed\r\n\r\nfrom an allowed address").await;

    // per_ip_rate 2/1m: two deliveries from one address, then 421 as the greeting.
    for n in 0..2 {
        deliver_plain(
            smtp,
            "127.0.0.11",
            &format!("Subject: rate {n}\r\n\r\nrate {n}"),
        )
        .await;
    }
    let (g, client) = greeting(smtp, "127.0.0.11").await;
    assert!(g.starts_with("421 4.7.0"), "{g}");
    let line = proxy.session_line(client).await;
    assert_eq!(line["reason"], "per_ip_rate", "{line}");
    // Another address is not affected.
    deliver_plain(smtp, "127.0.0.13", "Subject: other\r\n\r\nanother address").await;

    // The deny file applies to new connections within about a second, without a reload.
    let (g, _) = greeting(smtp, "127.0.0.12").await;
    assert!(g.starts_with("220"), "not denied yet: {g}");
    std::fs::write(
        &deny_file,
        "# fail2ban writes here\nnot-an-address\n127.0.0.12\n",
    )
    .unwrap();
    let client = eventually(Duration::from_secs(5), "the deny file applies", || async {
        match greeting(smtp, "127.0.0.12").await {
            (g, client) if g.starts_with("554 5.7.1") => Ok(client),
            (g, _) => Err(g),
        }
    })
    .await;
    let line = proxy.session_line(client).await;
    assert_eq!(line["reason"], "deny_file", "{line}");
    let bad = proxy.wait_for_log(|v| v["entry"] == "not-an-address").await;
    assert_eq!(bad["line"], 2, "{bad}");
    let reloads = Scrape::get(proxy.metrics_addr()).await;
    assert_eq!(
        reloads.value("smtp_proxy_reloads_total", &[]),
        0.0,
        "no reload"
    );
    assert_eq!(
        reloads.value("smtp_proxy_sessions_total", &[("outcome", "denied")]),
        3.0
    );

    // Postfix saw the allowed clients and none of the refused ones.
    pf.wait_for_message("another address", PF_WAIT);
    pf.wait_for_message("from an allowed address", PF_WAIT);
    let log = pf.log();
    for refused in ["127.0.0.9", "127.0.0.20", "127.0.0.12"] {
        assert!(
            !log.contains(&format!("[{refused}]")),
            "{refused} reached Postfix:\n{log}"
        );
    }
    let rate_client = log.matches("client=unknown[127.0.0.11]").count();
    assert_eq!(
        rate_client, 2,
        "exactly the two allowed sessions reached Postfix"
    );
}
