//! Honest pre-TLS EHLO (issue 15 item 1, SPEC "STARTTLS listener"): the health probe learns
//! the upstream's EHLO keywords, and the pre-TLS EHLO offers those a plaintext hand-off can
//! carry — the real SIZE, SMTPUTF8, DSN, CHUNKING… — plus STARTTLS, never AUTH; the
//! conservative fixed set until a probe has succeeded. Everything offered survives the
//! hand-off into a real Postfix: SMTPUTF8 and BODY=8BITMIME and SIZE= on MAIL, and BDAT.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::postfix::{Postfix, PostfixOptions};
use crate::common::*;
use serde_json::json;

const PF_WAIT: Duration = Duration::from_secs(20);

fn config(upstream: SocketAddr) -> TestConfig {
    TestConfig::new(upstream)
        .upstream(json!({ "connect_timeout": "2s", "health_interval": "1s" }))
        .self_signed(&["mx.example.test"])
        .starttls("smtp", "mx.example.test", json!({}))
}

async fn pre_tls_ehlo(proxy: &RunningProxy) -> (Smtp<tokio::net::TcpStream>, Vec<String>) {
    let mut smtp = Smtp::new(connect_from("127.0.0.3", proxy.addr("smtp")).await);
    assert!(
        smtp.reply()
            .await
            .unwrap()
            .starts_with("220 mx.example.test")
    );
    let ehlo = smtp.cmd("EHLO sender.example").await;
    let keywords = ehlo.lines().skip(1).map(|l| l[4..].to_owned()).collect();
    (smtp, keywords)
}

fn postfix(extra: &str) -> Postfix {
    Postfix::start(PostfixOptions {
        main_cf_extra: extra.to_owned(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pre_tls_ehlo_carries_the_upstreams_real_size_smtputf8_dsn_and_chunking() {
    let pf = postfix("message_size_limit = 12345678\nsmtputf8_enable = yes\n");
    let proxy = config(pf.proxy_addr()).spawn();
    proxy
        .wait_for_log(|v| v["message"] == "upstream healthy")
        .await;
    let (mut smtp, keywords) = pre_tls_ehlo(&proxy).await;
    for want in [
        "SIZE 12345678",
        "SMTPUTF8",
        "DSN",
        "CHUNKING",
        "8BITMIME",
        "PIPELINING",
        "STARTTLS",
    ] {
        assert!(
            keywords.iter().any(|k| k == want),
            "{want} missing: {keywords:?}"
        );
    }
    for never in ["AUTH", "VRFY", "ETRN", "XCLIENT"] {
        assert!(
            !keywords.iter().any(|k| k.starts_with(never)),
            "{never} offered: {keywords:?}"
        );
    }
    assert_eq!(keywords.last().map(String::as_str), Some("STARTTLS"));

    // An internationalised message in plaintext, with every MAIL parameter offered.
    let r = smtp
        .cmd("MAIL FROM:<jörg@bücher.example> SMTPUTF8 BODY=8BITMIME SIZE=200")
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(
        smtp.cmd("RCPT TO:<user@example.test>")
            .await
            .starts_with("250")
    );
    assert!(smtp.cmd("DATA").await.starts_with("354"));
    smtp.send("Subject: Grüße\r\n\r\nutf8 body: ünïcödé\r\n.\r\n".as_bytes())
        .await;
    let r = smtp.reply().await.unwrap();
    assert!(r.starts_with("250"), "{r}");
    // CHUNKING: BDAT through the follower, same session.
    assert!(
        smtp.cmd("MAIL FROM:<a@client.test>")
            .await
            .starts_with("250")
    );
    assert!(
        smtp.cmd("RCPT TO:<user@example.test>")
            .await
            .starts_with("250")
    );
    let chunk = "Subject: bdat\r\n\r\nsent with BDAT\r\n";
    smtp.send(format!("BDAT {} LAST\r\n{chunk}", chunk.len()).as_bytes())
        .await;
    let r = smtp.reply().await.unwrap();
    assert!(r.starts_with("250"), "{r}");
    assert!(smtp.cmd("QUIT").await.starts_with("221"));
    let msg = pf.wait_for_message("ünïcödé", PF_WAIT);
    assert!(msg.contains("jörg@bücher.example"), "{msg}");
    pf.wait_for_message("sent with BDAT", PF_WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postfix_without_smtputf8_and_a_smaller_size_is_described_as_it_is() {
    let pf = postfix("message_size_limit = 5000000\nsmtputf8_enable = no\n");
    let proxy = config(pf.proxy_addr()).spawn();
    proxy
        .wait_for_log(|v| v["message"] == "upstream healthy")
        .await;
    let (_, keywords) = pre_tls_ehlo(&proxy).await;
    assert!(keywords.iter().any(|k| k == "SIZE 5000000"), "{keywords:?}");
    assert!(!keywords.iter().any(|k| k == "SMTPUTF8"), "{keywords:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_a_probe_succeeds_the_conservative_set_is_offered() {
    let proxy = config("127.0.0.1:9".parse().unwrap()).spawn();
    let (_, keywords) = pre_tls_ehlo(&proxy).await;
    assert_eq!(
        keywords,
        ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS"],
        "no SIZE, SMTPUTF8 or DSN claimed for an upstream never seen"
    );
}
