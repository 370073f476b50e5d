//! STARTTLS listeners over real sockets (fake MTA for the recorded bytes; Postfix in
//! tests/it/postfix.rs): dialogue, upgrade, injection defence, EHLO filtering, hostile input.

// Test helpers outside #[test] fns may unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn starttls_listener(name: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    listen: \"127.0.0.1:0\"\n    mode: starttls\n    hostname: mx.example.test\n    upstream: mta\n{extra}"
    )
}

async fn setup_with(upstream: std::net::SocketAddr, extra: &str) -> RunningProxy {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    spawn_proxy(&yaml(
        upstream,
        "",
        &cert_entry(&mx),
        &(starttls_listener("smtp", extra)
            + &starttls_listener(
                "submission",
                &format!("    require_starttls: true\n{extra}"),
            )),
    ))
}

async fn plain(proxy: &RunningProxy, listener: &str) -> (Smtp<TcpStream>, std::net::SocketAddr) {
    let tcp = connect_from("127.0.0.2", proxy.addr(listener)).await;
    let addr = tcp.local_addr().unwrap();
    let mut smtp = Smtp::new(tcp);
    let greeting = smtp.reply().await.unwrap();
    assert_eq!(greeting, "220 mx.example.test ESMTP\r\n");
    (smtp, addr)
}

async fn upgrade(smtp: Smtp<TcpStream>) -> Smtp<tokio_rustls::client::TlsStream<TcpStream>> {
    assert!(smtp.pending().is_empty());
    let tls = tls_handshake(
        smtp.stream,
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await
    .unwrap();
    Smtp::new(tls)
}

/// Reads for `wait`; returns whatever arrived (expected: nothing).
async fn unsolicited<S: tokio::io::AsyncRead + Unpin>(s: &mut S, wait: Duration) -> Vec<u8> {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(wait, s.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].to_vec(),
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ehlo_before_tls_offers_starttls_without_auth_and_after_tls_never_starttls() {
    let mta = FakeMta::start().await;
    let proxy = setup_with(mta.addr, "").await;
    let (mut smtp, client) = plain(&proxy, "smtp").await;
    let ehlo = smtp.cmd("EHLO client.test").await;
    assert!(ehlo.contains("250 STARTTLS\r\n"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert!(
        mta.conns().is_empty(),
        "the upstream is not contacted before it is needed"
    );
    assert!(smtp.cmd("STARTTLS").await.starts_with("220 2.0.0"));
    let mut tls = upgrade(smtp).await;
    for _ in 0..2 {
        let ehlo = tls.cmd("EHLO client.test").await;
        assert!(
            ehlo.starts_with("250-fake.mta"),
            "the upstream's own reply: {ehlo}"
        );
        assert!(!ehlo.to_ascii_uppercase().contains("STARTTLS"), "{ehlo}");
        assert!(ehlo.ends_with("250 8BITMIME\r\n"), "{ehlo}");
    }
    let again = tls.cmd("STARTTLS").await;
    assert!(again.starts_with("554 5.5.1"), "{again}");
    assert!(
        tls.cmd("NOOP").await.starts_with("250"),
        "the session goes on"
    );
    assert!(tls.cmd("QUIT").await.starts_with("221"));
    let conn = mta.wait_line(0, |l| l == "QUIT").await;
    assert_eq!(
        conn.lines,
        vec!["EHLO client.test", "EHLO client.test", "NOOP", "QUIT"]
    );
    let header = parse_v2(&conn.header);
    assert!(
        tlvs(&header).iter().any(|(k, _)| *k == 0x20),
        "TLS facts in the header"
    );
    let line = proxy.session_line(client).await;
    assert_eq!(line["transport"], "starttls");
    assert_eq!(line["outcome"], "relayed");
    assert_eq!(line["pipelined_discarded"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pipelined_after_starttls_never_reach_the_upstream() {
    let mta = FakeMta::start().await;
    let proxy = setup_with(mta.addr, "").await;

    // Control: the probe does see a reply inside TLS when one is owed.
    let (mut smtp, _) = plain(&proxy, "smtp").await;
    smtp.cmd("EHLO x").await;
    assert!(smtp.cmd("STARTTLS").await.starts_with("220"));
    let mut tls = upgrade(smtp).await;
    tls.send(b"NOOP\r\n").await;
    assert!(
        !unsolicited(&mut tls.stream, IO_TIMEOUT).await.is_empty(),
        "control sees a reply"
    );

    // The injection: STARTTLS and MAIL in one write, partial line included.
    let (mut smtp, client) = plain(&proxy, "smtp").await;
    smtp.cmd("EHLO x").await;
    smtp.send(b"STARTTLS\r\nMAIL FROM:<x@evil>\r\nRCPT TO:<y@evil")
        .await;
    let reply = smtp.reply().await.unwrap();
    assert!(reply.starts_with("220 2.0.0"), "{reply}");
    let mut tls = upgrade(smtp).await;
    let extra = unsolicited(&mut tls.stream, Duration::from_millis(700)).await;
    assert!(
        extra.is_empty(),
        "unsolicited reply inside TLS: {:?}",
        String::from_utf8_lossy(&extra)
    );
    assert!(tls.cmd("EHLO y").await.starts_with("250"));
    assert!(tls.cmd("QUIT").await.starts_with("221"));
    let conn = mta.wait_line(1, |l| l == "QUIT").await;
    assert_eq!(conn.lines, vec!["EHLO y", "QUIT"]);
    let line = proxy.session_line(client).await;
    assert_eq!(
        line["pipelined_discarded"], 35,
        "20 + 15 bytes, the partial line included"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_content_passes_byte_for_byte_or_through_the_smuggling_guard() {
    let body =
        "Subject: t\r\n\r\nSTARTTLS\r\nEHLO x\r\n..\r\n.x\r\nbare\n.\nstill body\r\n.\rnot the end";
    // `off`: byte for byte. The default (`normalize`): bare line ends become CRLF and the
    // `.` lines the client did not end with CRLF.CRLF are stuffed; the rest is untouched.
    let normalized = "Subject: t\r\n\r\nSTARTTLS\r\nEHLO x\r\n..\r\n.x\r\nbare\r\n..\r\nstill body\r\n..\r\nnot the end";
    for (guard, expected) in [("    smuggling_guard: off\n", body), ("", normalized)] {
        let mta = FakeMta::start().await;
        let proxy = setup_with(mta.addr, guard).await;
        let (mut smtp, _) = plain(&proxy, "smtp").await;
        smtp.cmd("EHLO x").await;
        smtp.cmd("STARTTLS").await;
        let mut tls = upgrade(smtp).await;
        tls.cmd("EHLO x").await;
        let r = tls.send_mail("a@b", "c@d", body).await;
        assert!(r.starts_with("250"), "{r}");
        tls.cmd("QUIT").await;
        let conn = mta.wait_line(0, |l| l == "QUIT").await;
        let start = conn.lines.iter().position(|l| l == "DATA").unwrap() + 1;
        let end = conn.lines.iter().rposition(|l| l == ".").unwrap();
        assert_eq!(conn.lines[start..end].join("\r\n"), expected, "{guard:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_25_plaintext_hands_over_and_587_refuses_before_tls() {
    let mta = FakeMta::start().await;
    let proxy = setup_with(mta.addr, "").await;

    let (mut smtp, client) = plain(&proxy, "smtp").await;
    assert!(smtp.cmd("EHLO pre.example").await.starts_with("250"));
    // Pipelined MAIL/RCPT/DATA in one write (the client saw PIPELINING).
    smtp.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        .await;
    for want in ["250", "250", "354"] {
        let r = smtp.reply().await.unwrap();
        assert!(r.starts_with(want), "{r}");
    }
    smtp.send(b"plain body\r\n.\r\n").await;
    assert!(smtp.reply().await.unwrap().starts_with("250"));
    assert!(
        smtp.cmd("STARTTLS").await.starts_with("502"),
        "no upgrade after the hand-off"
    );
    assert!(smtp.cmd("QUIT").await.starts_with("221"));
    let conn = mta.wait_line(0, |l| l == "QUIT").await;
    assert_eq!(
        conn.lines[0], "EHLO pre.example",
        "the greeting is replayed"
    );
    assert_eq!(conn.lines[1], "MAIL FROM:<a@b>");
    let header = parse_v2(&conn.header);
    assert!(
        !tlvs(&header).iter().any(|(k, _)| *k == 0x20),
        "no TLS facts"
    );
    let line = proxy.session_line(client).await;
    assert_eq!(line["transport"], "plaintext");

    let (mut smtp, _) = plain(&proxy, "submission").await;
    smtp.cmd("EHLO x").await;
    for cmd in [
        "MAIL FROM:<a@b>",
        "AUTH PLAIN AGFAAGI=",
        "RCPT TO:<c@d>",
        "DATA",
        "BDAT 1 LAST",
    ] {
        let r = smtp.cmd(cmd).await;
        assert!(
            r.starts_with("530 5.7.0 Must issue a STARTTLS command first"),
            "{cmd}: {r}"
        );
    }
    let (mut smtp, _) = plain(&proxy, "smtp").await;
    assert!(
        smtp.cmd("AUTH PLAIN AGFAAGI=").await.starts_with("530"),
        "AUTH never before TLS"
    );
    assert_eq!(mta.conns().len(), 1, "none of these reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_at_the_upgrade_answers_the_next_command_with_4xx() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = setup_with(closed, "").await;
    let (mut smtp, client) = plain(&proxy, "smtp").await;
    smtp.cmd("EHLO x").await;
    assert!(smtp.cmd("STARTTLS").await.starts_with("220"));
    let mut tls = upgrade(smtp).await;
    let r = tls.cmd("EHLO x").await;
    assert!(r.starts_with("421 4.3.0"), "{r}");
    let line = proxy.session_line(client).await;
    assert_eq!(line["outcome"], "upstream_failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_rfc_replies_and_bounded_closes() {
    let mta = FakeMta::start().await;
    let proxy = setup_with(mta.addr, "    limits: { command_timeout: 1s }\n").await;

    // A client that sends nothing is closed with 421 4.4.2 ...
    let (mut silent, _) = plain(&proxy, "smtp").await;
    // ... while another client is served meanwhile.
    let (mut busy, _) = plain(&proxy, "smtp").await;
    assert!(busy.cmd("NOOP").await.starts_with("250"));
    let r = silent.reply().await.unwrap();
    assert!(r.starts_with("421 4.4.2"), "{r}");

    // 100 KB without a newline, then the newline: one 500, then the session goes on.
    let (mut smtp, _) = plain(&proxy, "smtp").await;
    smtp.send(&vec![b'A'; 100_000]).await;
    let r = smtp.cmd("").await;
    assert!(r.starts_with("500 5.5.2"), "{r}");
    assert!(smtp.cmd("NOOP").await.starts_with("250"));
    let r = smtp.cmd("EH\0LO x").await;
    assert!(r.starts_with("500 5.5.2"), "{r}");
    assert!(smtp.cmd("STARTTLS x").await.starts_with("501 5.5.4"));

    // Ten bad commands: 421 4.7.0 and close.
    let (mut smtp, _) = plain(&proxy, "smtp").await;
    for i in 0..10 {
        let r = smtp.cmd(&format!("XYZZY{i} \x7f garbage")).await;
        assert!(r.starts_with("500 5.5.2"), "{r}");
    }
    let last = smtp.reply().await.unwrap();
    assert!(last.starts_with("421 4.7.0"), "{last}");
    assert!(smtp.reply().await.is_err(), "closed");

    // Random binary garbage never crashes it; HTTP is refused at once.
    let (mut smtp, _) = plain(&proxy, "smtp").await;
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    smtp.send(&garbage).await;
    let (mut http, _) = plain(&proxy, "smtp").await;
    assert!(http.cmd("GET / HTTP/1.1").await.starts_with("221 2.7.0"));
    assert!(mta.conns().is_empty(), "no upstream for any of them");
    let (mut ok, _) = plain(&proxy, "smtp").await;
    assert!(ok.cmd("NOOP").await.starts_with("250"), "still serving");
}

/// Connects twice with one client config (sharing its session cache) and reports whether
/// the second handshake resumed.
async fn second_handshake_resumes(proxy: &RunningProxy, listener: &str, starttls: bool) -> bool {
    let config = inspecting_client(None);
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tcp = connect_from("127.0.0.1", proxy.addr(listener)).await;
        let mut smtp = Smtp::new(tcp);
        let tls = if starttls {
            smtp.reply().await.unwrap();
            smtp.cmd("EHLO x").await;
            assert!(smtp.cmd("STARTTLS").await.starts_with("220"));
            tls_handshake(smtp.stream, config.clone(), Some("mx.example.test"))
                .await
                .unwrap()
        } else {
            tls_handshake(smtp.stream, config.clone(), Some("mx.example.test"))
                .await
                .unwrap()
        };
        let mut tls = Smtp::new(tls);
        // Reading a reply processes any NewSessionTicket the server sent.
        if !starttls {
            tls.reply().await.unwrap();
        }
        tls.cmd("EHLO x").await;
        kinds.push(tls.stream.get_ref().1.handshake_kind());
        tls.cmd("QUIT").await;
    }
    kinds[1] == Some(rustls::HandshakeKind::Resumed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_session_tickets_are_off_on_starttls_listeners_and_on_for_implicit_ones() {
    let mta = FakeMta::start().await;
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let listeners = starttls_listener("smtp", "")
        + &starttls_listener("smtp_tickets", "    session_tickets: true\n")
        + &implicit_listener("smtps", "mx.example.test", "");
    let proxy = spawn_proxy(&yaml(mta.addr, "", &cert_entry(&mx), &listeners));
    assert!(
        second_handshake_resumes(&proxy, "smtps", false).await,
        "control: the probe sees resumption where tickets are on"
    );
    assert!(second_handshake_resumes(&proxy, "smtp_tickets", true).await);
    assert!(
        !second_handshake_resumes(&proxy, "smtp", true).await,
        "no ticket on STARTTLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_pipelined_after_starttls_are_discarded_and_never_logged() {
    // Catalogue SM-16 / promise P12: AUTH arguments never reach a log line.
    let mta = FakeMta::start().await;
    let proxy = setup_with(mta.addr, "").await;
    let (mut smtp, client) = plain(&proxy, "submission").await;
    smtp.cmd("EHLO x").await;
    // Before TLS on 587: refused, and its argument is not logged either.
    let reply = smtp.cmd("AUTH PLAIN AGFsaWNlAHByZS10bHMtc2VjcmV0").await;
    assert!(reply.starts_with("530"), "{reply}");
    smtp.send(b"STARTTLS\r\nAUTH PLAIN AGFsaWNlAGh1bnRlcjI=\r\nMAIL FROM:<a@b>\r\n")
        .await;
    assert!(smtp.reply().await.unwrap().starts_with("220"));
    let mut tls = upgrade(smtp).await;
    assert!(tls.cmd("QUIT").await.starts_with("221"));
    let line = proxy.session_line(client).await;
    assert_eq!(line["pipelined_discarded"], 50, "33 + 17 bytes");
    let warning = proxy
        .wait_for_log(|l| l["message"] == "discarded bytes pipelined after STARTTLS")
        .await;
    assert_eq!(warning["verbs"], "AUTH,MAIL", "{warning}");
    let logs = proxy.log_text();
    for secret in ["AGFsaWNlAGh1bnRlcjI", "AGFsaWNlAHByZS10bHMtc2VjcmV0"] {
        assert!(
            !logs.contains(secret),
            "a credential reached the log:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_hello_on_a_starttls_port_is_closed_without_a_reply_or_an_upstream() {
    // Catalogue SM-13: an implicit-TLS client pointed at port 25/587.
    let mta = FakeMta::start().await;
    let proxy = setup_with(mta.addr, "").await;
    let tcp = connect_from("127.0.0.2", proxy.addr("smtp")).await;
    let client = tcp.local_addr().unwrap();
    let mut smtp = Smtp::new(tcp);
    assert!(smtp.reply().await.unwrap().starts_with("220"));
    // The first bytes of a TLS 1.x ClientHello record.
    smtp.send(&[
        0x16, 0x03, 0x01, 0x00, 0xf4, 0x01, 0x00, 0x00, 0xf0, 0x03, 0x03,
    ])
    .await;
    // Closed at once (EOF), without a single reply byte.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(IO_TIMEOUT, smtp.stream.read(&mut buf))
        .await
        .expect("closed, not left waiting")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    let line = proxy.session_line(client).await;
    assert_eq!(line["outcome"], "protocol_error");
    assert_eq!(line["reason"], "TLS ClientHello on a STARTTLS port");
    assert!(mta.conns().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plaintext_replay_waits_for_the_upstream_greeting() {
    // Catalogue HO-4: Postfix >= 3.7.6 answers input sent before its greeting with
    // "554 SMTP protocol synchronization" and disconnects. This upstream greets late and
    // records whether anything arrived before its 220.
    use tokio::io::AsyncWriteExt;
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let recorder = tokio::spawn(async move {
        // The first connection with a PROXY (not LOCAL: the health probe) header.
        let mut s = loop {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut fixed = [0u8; 16];
            s.read_exact(&mut fixed).await.unwrap();
            let mut rest = vec![0u8; usize::from(u16::from_be_bytes([fixed[14], fixed[15]]))];
            s.read_exact(&mut rest).await.unwrap();
            if fixed[12] & 0x0f == 1 {
                break s;
            }
        };
        // The late greeting is the fault under test, so the delay is the point here.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut early = [0u8; 64];
        let early_bytes = match s.try_read(&mut early) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("{e}"),
        };
        s.write_all(b"220 late.mta ESMTP\r\n").await.unwrap();
        let mut first = vec![0u8; 256];
        let n = s.read(&mut first).await.unwrap();
        first.truncate(n);
        (early_bytes, String::from_utf8_lossy(&first).into_owned())
    });
    let proxy = setup_with(upstream_addr, "").await;
    let (mut smtp, _) = plain(&proxy, "smtp").await;
    assert!(smtp.cmd("EHLO client.test").await.starts_with("250"));
    // MAIL hands the session over; EHLO is replayed to the upstream, MAIL follows it.
    smtp.send(b"MAIL FROM:<a@client.test>\r\n").await;
    let (early_bytes, first) = tokio::time::timeout(IO_TIMEOUT, recorder)
        .await
        .expect("the upstream saw the replay")
        .unwrap();
    assert_eq!(
        early_bytes, 0,
        "bytes reached the upstream before its greeting"
    );
    assert!(first.starts_with("EHLO client.test\r\n"), "{first:?}");
}
