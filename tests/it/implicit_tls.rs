//! Implicit TLS (465) over real sockets with a fake MTA: greeting, half-close, upstream
//! failures and the handshake timeout.

// Test helpers outside #[test] fns may unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn one_listener(upstream: std::net::SocketAddr, pki: &TestPki, extra: &str) -> String {
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    yaml(
        upstream,
        "",
        &cert_entry(&mx),
        &implicit_listener("smtps", "mx.example.test", extra),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_greeting_reaches_the_client_unchanged() {
    let mta =
        FakeMta::start_with_greeting("220-fake.mta first line\r\n220 fake.mta ESMTP banner\r\n")
            .await;
    let pki = TestPki::new();
    let proxy = spawn_proxy(&one_listener(mta.addr, &pki, ""));
    let (tls, _) = tls_client(
        "127.0.0.1",
        proxy.addr("smtps"),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    assert_eq!(
        smtp.reply().await.unwrap(),
        "220-fake.mta first line\r\n220 fake.mta ESMTP banner\r\n"
    );
    deliver_after_greeting(&mut smtp).await;
    let conn = mta.wait_line(0, |l| l == "QUIT").await;
    assert!(conn.lines.contains(&"hello".to_owned()));
}

async fn deliver_after_greeting<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    smtp: &mut Smtp<S>,
) {
    assert!(smtp.cmd("EHLO c").await.starts_with("250"));
    assert!(
        smtp.send_mail("a@c", "b@d", "hello")
            .await
            .starts_with("250")
    );
    assert!(smtp.cmd("QUIT").await.starts_with("221"));
}

/// An upstream that greets, reads until EOF, and only then sends its last reply: it can
/// only reach the client if the proxy honours half-close.
async fn replies_after_eof_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut s = loop {
            let (mut s, _) = listener.accept().await.unwrap();
            // PROXY v2 header: 16 bytes + length.
            let mut head = [0u8; 16];
            s.read_exact(&mut head).await.unwrap();
            let mut rest = vec![0u8; u16::from_be_bytes([head[14], head[15]]) as usize];
            s.read_exact(&mut rest).await.unwrap();
            s.write_all(b"220 eof.test ESMTP\r\n").await.unwrap();
            // The proxy's health probe (command LOCAL) gets its greeting and nothing else.
            if head[12] & 0x0F != 0 {
                break s;
            }
        };
        let mut got = Vec::new();
        tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        let reply = format!("250 got {} bytes before EOF\r\n", got.len());
        s.write_all(reply.as_bytes()).await.unwrap();
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_still_receives_the_upstreams_final_reply() {
    let upstream = replies_after_eof_upstream().await;
    let pki = TestPki::new();
    let proxy = spawn_proxy(&one_listener(upstream, &pki, ""));
    let (tls, _) = tls_client(
        "127.0.0.1",
        proxy.addr("smtps"),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    assert!(smtp.reply().await.unwrap().starts_with("220 eof.test"));
    smtp.send(b"QUIT\r\n").await;
    // close_notify + FIN: our write side is done, the read side stays open.
    smtp.stream.shutdown().await.unwrap();
    let last = smtp.reply().await.unwrap();
    assert_eq!(last, "250 got 6 bytes before EOF\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_greets_gives_421_within_connect_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let pki = TestPki::new();
    let proxy = spawn_proxy(&one_listener(addr, &pki, ""));
    let (tls, client) = tls_client(
        "127.0.0.1",
        proxy.addr("smtps"),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    let started = std::time::Instant::now();
    let reply = smtp.reply().await.unwrap();
    assert!(reply.starts_with("421 4.3.0 mx.example.test"), "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "bounded by connect_timeout (2s)"
    );
    let line = proxy.session_line(client).await;
    assert_eq!(line["outcome"], "upstream_failed");
    assert_eq!(line["reason"], "timeout during greeting");
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusing_gives_421_never_5xx() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let pki = TestPki::new();
    let proxy = spawn_proxy(&one_listener(closed, &pki, ""));
    let (tls, _) = tls_client(
        "127.0.0.1",
        proxy.addr("smtps"),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    let reply = smtp.reply().await.unwrap();
    assert!(reply.starts_with("421 4.3.0"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_handshake_timeout() {
    let mta = FakeMta::start().await;
    let pki = TestPki::new();
    let proxy = spawn_proxy(&one_listener(
        mta.addr,
        &pki,
        "    limits: { handshake_timeout: 1s }\n",
    ));
    let mut tcp = connect_from("127.0.0.1", proxy.addr("smtps")).await;
    let client = tcp.local_addr().unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(IO_TIMEOUT, tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    let line = proxy.session_line(client).await;
    assert_eq!(line["outcome"], "timeout");
    assert_eq!(line["reason"], "handshake");
    assert!(mta.conns().is_empty(), "the upstream was never contacted");
}
