//! The fault sweep's client faults section (split from `fault_sweep.rs` at its banner).

#![allow(clippy::unwrap_used)]

use super::*;

/// Catalogue FT-4, ST-11, FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_aborting_mid_handshake_opens_no_upstream_connection_and_releases_its_descriptor() {
    let bed = Bed::start(Upstream::Fault(Fault::None)).await;
    let failed_before = handshake_failures(&bed.scrape().await);
    let hello = client_hello();
    let half = &hello[..hello.len() / 2];
    const ROUNDS: usize = 25;
    let mut clients = Vec::new();
    for round in 0..ROUNDS {
        for rst in [false, true] {
            // Implicit: half a ClientHello right after connect.
            let mut tcp = connect_from("127.0.0.1", bed.addr("smtps")).await;
            clients.push(tcp.local_addr().unwrap());
            tcp.write_all(half).await.unwrap();
            if rst {
                abort(tcp);
            } else {
                tcp.shutdown().await.unwrap();
                raw_until_closed(&mut tcp, SECOND).await;
            }
            // STARTTLS: half a ClientHello after `220 Ready to start TLS`.
            let tcp = connect_from("127.0.0.1", bed.addr("smtp")).await;
            clients.push(tcp.local_addr().unwrap());
            let mut s = Smtp::new(tcp);
            s.reply().await.unwrap();
            assert!(s.cmd("STARTTLS").await.starts_with("220"));
            s.send(half).await;
            if rst {
                abort(s.stream);
            } else {
                s.stream.shutdown().await.unwrap();
                raw_until_closed(&mut s.stream, SECOND).await;
            }
        }
        if round == ROUNDS / 2 {
            bed.control().await;
        }
    }
    for client in &clients {
        let line = bed.proxy.session_line(*client).await;
        assert_eq!(line["outcome"], "handshake_failed", "{line}");
        assert_eq!(line["upstream_addr"], "", "{line}");
    }
    assert!(
        bed.mta().conns().is_empty(),
        "no upstream connection for a handshake that never completed"
    );
    let failed = handshake_failures(&bed.scrape().await) - failed_before;
    assert_eq!(failed, clients.len() as f64);
    bed.settle().await;
}

/// Catalogue FT-5, TL-11, FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_aborting_mid_dialogue_or_mid_data_closes_the_upstream_within_1s() {
    let bed = Bed::start(Upstream::Fault(Fault::None)).await;

    // Pre-TLS, a command half typed: nothing was ever asked of the upstream.
    let tcp = connect_from("127.0.0.1", bed.addr("smtp")).await;
    let me = tcp.local_addr().unwrap();
    let mut s = Smtp::new(tcp);
    s.reply().await.unwrap();
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    s.send(b"MAIL FROM:<a@").await;
    abort(s.stream);
    bed.proxy.session_line(me).await;
    assert!(bed.mta().conns().is_empty());

    // In the relay: after EHLO (RST), mid-DATA (FIN without close_notify), mid-DATA (RST).
    for (i, in_data, rst) in [(0, false, true), (1, true, false), (2, true, true)] {
        let (mut s, me) = implicit_session(bed.addr("smtps")).await;
        if in_data {
            into_data(&mut s).await;
            s.send(b"Subject: cut\r\n\r\nhalf a mess").await;
        } else {
            assert!(s.reply().await.unwrap().starts_with("220"));
            assert!(s.cmd("EHLO client.test").await.starts_with("250"));
        }
        bed.mta()
            .wait_conn(i, SECOND, |c| {
                c.lines.len() == if in_data { 4 } else { 1 } && (!in_data || c.content_bytes > 0)
            })
            .await;
        let (tcp, _) = s.stream.into_inner();
        let gone = Instant::now();
        if rst {
            abort(tcp);
        } else {
            drop(tcp);
        }
        let closed = bed.mta().wait_closed(i, 2 * SECOND).await;
        let took = closed.duration_since(gone);
        assert!(
            took <= SECOND,
            "upstream closed {took:?} after the client left"
        );
        assert_eq!(bed.mta().conns()[i].messages, 0, "no message completed");
        bed.proxy.session_line(me).await;
    }
    bed.control().await;
    bed.settle().await;
}

/// Catalogue FT-6 (client half-closes first), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_after_quit_still_gets_every_reply_with_payloads_over_64k_both_ways() {
    let bed = Bed::start(Upstream::Fault(Fault::PaddedReplies(256))).await;
    let (mut s, me) = implicit_session(bed.addr("smtps")).await;
    into_data(&mut s).await;

    // 200 KiB of content, the end of data, 1,000 NOOPs (256 KB of replies) and QUIT, then
    // shutdown(SHUT_WR) (close_notify + FIN) while the replies are still coming.
    let line = format!("{}\r\n", "z".repeat(98));
    let body = line.repeat(200 * 1024 / line.len());
    let mut upload = body.clone().into_bytes();
    upload.extend_from_slice(b".\r\n");
    upload.extend_from_slice("NOOP\r\n".repeat(1000).as_bytes());
    upload.extend_from_slice(b"QUIT\r\n");
    let (mut rd, mut wr) = tokio::io::split(s.stream);
    let write = async move {
        wr.write_all(&upload).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    };
    let read = async {
        let mut got = Vec::new();
        timeout(IO_TIMEOUT, rd.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(got).unwrap()
    };
    let (_wr, got) = tokio::join!(write, read);
    assert!(got.len() > 64 * 1024, "{} bytes of replies", got.len());
    let lines: Vec<&str> = got.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 1002);
    assert_eq!(lines[0], "250 2.0.0 queued");
    assert!(
        lines[1..1001]
            .iter()
            .all(|l| l.starts_with("250 2.0.0 ok ") && l.len() == 254)
    );
    assert_eq!(lines[1001], "221 2.0.0 bye");

    let conn = bed
        .mta()
        .wait_conn(0, SECOND, |c| c.closed_at.is_some())
        .await;
    assert_eq!(conn.messages, 1);
    assert_eq!(conn.content_bytes, body.len() + 3, "content byte count");
    assert_eq!(conn.lines.iter().filter(|l| *l == "NOOP").count(), 1000);
    assert_eq!(conn.lines.last().unwrap(), "QUIT");
    let session = bed.proxy.session_line(me).await;
    assert_eq!(session["outcome"], "relayed", "{session}");
    assert!(session["bytes_from_client"].as_u64().unwrap() > 200 * 1024);
    bed.control().await;
    bed.settle().await;
}

/// Catalogue FT-6 (upstream half-closes first, as relay.rs documents it), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_first_delivers_its_last_bytes_and_ends_the_session_within_the_linger() {
    let bed = Bed::start(Upstream::Fault(Fault::PaddedReplies(256))).await;
    let (mut s, me) = implicit_session(bed.addr("smtps")).await;
    assert!(s.reply().await.unwrap().starts_with("220"));
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    // 1,000 NOOPs (256 KB of replies) and QUIT; the MTA half-closes after its 221.
    let mut pipelined = "NOOP\r\n".repeat(1000);
    pipelined.push_str("QUIT\r\n");
    s.send(pipelined.as_bytes()).await;
    let got = until_closed(&mut s, 5 * SECOND).await;
    let eof = Instant::now();
    assert!(got.len() > 64 * 1024);
    let lines: Vec<&str> = got.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 1001);
    assert!(lines[..1000].iter().all(|l| l.starts_with("250 2.0.0 ok ")));
    assert_eq!(lines[1000], "221 2.0.0 bye");

    // relay.rs / README "Relay end": upstream EOF shuts the client's write side and gives
    // the client UPSTREAM_CLOSED_LINGER (2 s) to close; what it sends meanwhile goes
    // nowhere. This client never closes: the session ends anyway, within the linger.
    let _ = s.stream.write_all(b"NOOP\r\n").await;
    let line = bed.proxy.session_line(me).await;
    let took = eof.elapsed();
    assert!(
        took < Duration::from_millis(3000),
        "ended {took:?} after EOF"
    );
    assert_eq!(line["outcome"], "relayed", "{line}");
    let conn = bed
        .mta()
        .wait_conn(0, SECOND, |c| c.closed_at.is_some())
        .await;
    assert_eq!(
        conn.after_quit, 0,
        "bytes after the upstream closed are dropped"
    );
    drop(s);
    bed.control().await;
    bed.settle().await;
}

/// Catalogue FT-5, TL-11 against a real Postfix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_data_makes_postfix_log_lost_connection_and_queue_nothing() {
    let pf = Postfix::start(PostfixOptions::default());
    let bed = Bed::start(Upstream::At(pf.proxy_addr())).await;
    let wait = Duration::from_secs(20);
    // The probe works: a whole message through the same listener is delivered.
    let (mut s, _) = implicit_session(bed.addr("smtps")).await;
    deliver(&mut s, "Subject: whole\r\n\r\ndelivered before the cut").await;
    drop(s);
    pf.wait_for_message("delivered before the cut", wait);

    // Mid-DATA, the client vanishes: FIN without close_notify, then a TCP RST. Nothing the
    // proxy sends may complete the message (no CRLF.CRLF of its own making).
    for (n, rst) in [(1, false), (2, true)] {
        let (mut s, me) = implicit_session(bed.addr("smtps")).await;
        assert!(s.reply().await.unwrap().starts_with("220"));
        assert!(s.cmd("EHLO client.test").await.starts_with("250"));
        assert!(
            s.cmd("MAIL FROM:<cut@client.test>")
                .await
                .starts_with("250")
        );
        assert!(
            s.cmd("RCPT TO:<user@example.test>")
                .await
                .starts_with("250")
        );
        assert!(s.cmd("DATA").await.starts_with("354"));
        s.send(b"Subject: cut\r\n\r\ncut-marker, half a mess\r\n")
            .await;
        let (tcp, _) = s.stream.into_inner();
        if rst {
            abort(tcp);
        } else {
            drop(tcp);
        }
        bed.proxy.session_line(me).await;
        let deadline = Instant::now() + wait;
        while pf.log().matches("lost connection after DATA").count() < n {
            assert!(Instant::now() < deadline, "Postfix log:\n{}", pf.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A later message is delivered, the cut ones never entered the queue.
    let (mut s, _) = implicit_session(bed.addr("smtps")).await;
    deliver(&mut s, "Subject: after\r\n\r\ndelivered after the cut").await;
    drop(s);
    pf.wait_for_message("delivered after the cut", wait);
    assert!(
        !pf.messages().iter().any(|m| m.contains("cut-marker")),
        "a cut message was delivered"
    );
    assert!(
        !pf.log().contains("from=<cut@client.test>"),
        "a cut message was queued:\n{}",
        pf.log()
    );
    bed.control().await;
    bed.settle().await;
}
