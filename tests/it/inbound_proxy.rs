//! Inbound PROXY from load balancers: only from `accept_proxy_protocol` CIDRs, v1 and v2,
//! bytes after the header kept, the carried address used for Postfix, logs and limits.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::postfix::{Postfix, PostfixOptions};
use crate::common::*;
use tokio::io::AsyncWriteExt;

/// The load balancer's address in these tests, and the one CIDR trusted.
const BALANCER: &str = "127.0.0.7";
const ELSEWHERE: &str = "127.0.0.8";

fn v2_header(src: &str, dst: &str) -> Vec<u8> {
    let src: SocketAddr = src.parse().unwrap();
    let dst: SocketAddr = dst.parse().unwrap();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

fn listeners(extra: &str) -> String {
    let trust = format!("    accept_proxy_protocol: [\"{BALANCER}/32\"]\n{extra}");
    format!(
        "{}  smtp:\n    listen: \"127.0.0.1:0\"\n    mode: starttls\n    hostname: mail.example.test\n    upstream: mta\n{trust}",
        implicit_listener("smtps", "mail.example.test", &trust)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_logs_the_address_a_trusted_balancer_carried() {
    let pf = Postfix::start(PostfixOptions::default());
    let certs = "  - self_signed: [mail.example.test]\n";
    let proxy = spawn_proxy(&yaml(pf.proxy_addr(), "", certs, &listeners("")));

    let mut tcp = connect_from(BALANCER, proxy.addr("smtps")).await;
    tcp.write_all(&v2_header("192.0.2.44:40000", "198.51.100.1:465"))
        .await
        .unwrap();
    let tls = tls_handshake(tcp, inspecting_client(None), Some("mail.example.test"))
        .await
        .unwrap();
    let mut smtp = Smtp::new(tls);
    deliver(&mut smtp, "through a load balancer").await;
    pf.wait_for_log("client=unknown[192.0.2.44]", Duration::from_secs(20));
    assert!(
        !pf.log().contains(&format!("client=unknown[{BALANCER}]")),
        "Postfix must see the carried address, not the balancer's"
    );
    let line = proxy
        .wait_for_log(|v| v["message"] == "session" && v["client"] == "192.0.2.44:40000")
        .await;
    assert_eq!(line["outcome"], "relayed");
    assert!(line["via"].as_str().unwrap().starts_with(BALANCER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_header_and_the_command_after_it_in_one_segment_are_both_used() {
    let mta = FakeMta::start().await;
    let certs = "  - self_signed: [mail.example.test]\n";
    let proxy = spawn_proxy(&yaml(mta.addr, "", certs, &listeners("")));
    let mut tcp = connect_from(BALANCER, proxy.addr("smtp")).await;
    // The balancer's header and the client's first bytes arrive together.
    tcp.write_all(b"PROXY TCP4 203.0.113.9 198.51.100.1 40001 25\r\nEHLO early.test\r\n")
        .await
        .unwrap();
    let mut smtp = Smtp::new(tcp);
    assert!(
        smtp.reply()
            .await
            .unwrap()
            .starts_with("220 mail.example.test")
    );
    let ehlo = smtp.reply().await.unwrap();
    assert!(ehlo.starts_with("250-mail.example.test"), "{ehlo}");
    // Plaintext hand-off: the upstream's PROXY header carries the balancer's client.
    let r = smtp
        .send_mail("a@client.test", "b@example.test", "plaintext via v1")
        .await;
    assert!(r.starts_with("250"), "{r}");
    let conn = mta.wait_line(0, |l| l == "plaintext via v1").await;
    let v2 = parse_v2(&conn.header);
    match v2.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            assert_eq!(a.source_address.to_string(), "203.0.113.9");
            assert_eq!(a.source_port, 40001);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_line_from_an_untrusted_address_is_a_bad_command_or_a_failed_handshake() {
    let mta = FakeMta::start().await;
    let certs = "  - self_signed: [mail.example.test]\n";
    let proxy = spawn_proxy(&yaml(mta.addr, "", certs, &listeners("")));

    // STARTTLS listener: the greeting comes first, the PROXY line is just a bad command.
    let mut smtp = Smtp::new(connect_from(ELSEWHERE, proxy.addr("smtp")).await);
    assert!(smtp.reply().await.unwrap().starts_with("220"));
    let r = smtp.cmd("PROXY TCP4 192.0.2.1 198.51.100.1 40000 25").await;
    assert!(r.starts_with("5"), "{r}");
    assert!(smtp.cmd("QUIT").await.starts_with("221"));

    // Implicit listener: a PROXY header where a ClientHello belongs fails the handshake.
    let mut tcp = connect_from(ELSEWHERE, proxy.addr("smtps")).await;
    let me = tcp.local_addr().unwrap();
    tcp.write_all(&v2_header("192.0.2.1:40000", "198.51.100.1:465"))
        .await
        .unwrap();
    let line = proxy.session_line(me).await;
    assert_eq!(line["outcome"], "handshake_failed");
    assert!(mta.conns().is_empty(), "nothing reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_balancer_that_sends_no_header_is_closed() {
    let mta = FakeMta::start().await;
    let certs = "  - self_signed: [mail.example.test]\n";
    let proxy = spawn_proxy(&yaml(mta.addr, "", certs, &listeners("")));
    let mut smtp = Smtp::new(connect_from(BALANCER, proxy.addr("smtp")).await);
    let me = smtp.stream.local_addr().unwrap();
    smtp.send(b"EHLO no-header.test\r\n").await;
    assert!(smtp.reply().await.is_err(), "closed without a reply");
    let line = proxy.session_line(me).await;
    assert_eq!(line["outcome"], "protocol_error");
    assert!(
        line["reason"].as_str().unwrap().contains("no PROXY header"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limit_counts_the_carried_address_not_the_balancer() {
    let mta = FakeMta::start().await;
    let certs = "  - self_signed: [mail.example.test]\n";
    let proxy = spawn_proxy(&yaml(
        mta.addr,
        "",
        certs,
        &listeners("    limits: { per_ip: 1 }\n"),
    ));
    let addr = proxy.addr("smtp");
    let open = |client: &'static str| async move {
        let mut tcp = connect_from(BALANCER, addr).await;
        let line = format!("PROXY TCP4 {client} 198.51.100.1 40000 25\r\n");
        tcp.write_all(line.as_bytes()).await.unwrap();
        let mut smtp = Smtp::new(tcp);
        let greeting = smtp.reply().await.unwrap();
        (smtp, greeting)
    };
    let (_a, g) = open("192.0.2.1").await;
    assert!(g.starts_with("220"), "{g}");
    let (_b, g) = open("192.0.2.2").await;
    assert!(
        g.starts_with("220"),
        "a second client behind the same balancer: {g}"
    );
    let (_c, g) = open("192.0.2.1").await;
    assert!(g.starts_with("421 4.7.0"), "{g}");
}
