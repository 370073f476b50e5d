//! The fault sweep's upstream faults section (split from `fault_sweep.rs` at its banner).

#![allow(clippy::unwrap_used)]

use super::*;

/// Catalogue FT-1, FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusing_gives_421_after_the_post_tls_ehlo_and_right_after_the_implicit_handshake()
 {
    let bed = Bed::start(Upstream::Refusing).await;

    // STARTTLS: the post-TLS EHLO is answered 421 4.3.0, then the connection closes.
    let (mut s, upgraded) = starttls_session(bed.addr("smtp")).await;
    s.send(b"EHLO client.test\r\n").await;
    let all = until_closed(&mut s, SECOND).await;
    assert!(all.starts_with("421 4.3.0 "), "{all}");
    assert_eq!(all.lines().count(), 1, "{all}");

    // Implicit: the 421 is the first and only thing after the handshake.
    let (mut s, implicit) = implicit_session(bed.addr("smtps")).await;
    let all = until_closed(&mut s, SECOND).await;
    assert!(all.starts_with("421 4.3.0 "), "{all}");
    assert_eq!(all.lines().count(), 1, "{all}");

    // Port 25 plaintext: the mail command that hands the session over gets it.
    let tcp = connect_from("127.0.0.1", bed.addr("smtp")).await;
    let plaintext = tcp.local_addr().unwrap();
    let mut s = Smtp::new(tcp);
    s.reply().await.unwrap();
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    s.send(b"MAIL FROM:<a@client.test>\r\n").await;
    let all = until_closed(&mut s, SECOND).await;
    assert!(all.starts_with("421 4.3.0 "), "{all}");
    assert_no_5xx(&all);

    for client in [upgraded, implicit, plaintext] {
        let line = bed.proxy.session_line(client).await;
        assert_eq!(line["outcome"], "upstream_failed", "{line}");
        assert!(
            line["reason"].as_str().unwrap().starts_with("connect:"),
            "{line}"
        );
    }
    let failures = bed.scrape().await.value(
        "smtp_proxy_upstream_connect_failures_total",
        &[("upstream", "mta"), ("reason", "connect")],
    );
    assert_eq!(failures, 3.0);
    bed.control().await;
    bed.settle().await;
}

/// Catalogue FT-2, FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_greets_gives_421_within_connect_timeout_and_is_let_go() {
    let bed = Bed::start(Upstream::Fault(Fault::NeverGreet)).await;
    let implicit = async {
        let (mut s, me) = implicit_session(bed.addr("smtps")).await;
        let start = Instant::now();
        let all = until_closed(&mut s, 3 * SECOND).await;
        (all, start.elapsed(), me)
    };
    let upgraded = async {
        let (mut s, me) = starttls_session(bed.addr("smtp")).await;
        s.send(b"EHLO client.test\r\n").await;
        let start = Instant::now();
        let all = until_closed(&mut s, 3 * SECOND).await;
        (all, start.elapsed(), me)
    };
    let (a, b) = tokio::join!(implicit, upgraded);
    for (all, took, me) in [a, b] {
        assert!(all.starts_with("421 4.3.0 "), "{all}");
        assert_eq!(all.lines().count(), 1, "{all}");
        // connect_timeout is 1 s and covers the greeting.
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(1900),
            "421 after {took:?}"
        );
        let line = bed.proxy.session_line(me).await;
        assert_eq!(line["outcome"], "upstream_failed", "{line}");
        assert_eq!(line["reason"], "timeout during greeting", "{line}");
    }
    // The proxy let go of both silent upstream connections.
    for i in 0..2 {
        bed.mta().wait_closed(i, SECOND).await;
    }
    bed.control().await;
    bed.settle().await;
}

/// Catalogue HO-3 (5xx stays 5xx), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_greeting_554_reaches_the_client_as_the_mtas_own_5xx_on_every_path() {
    const REFUSAL: &str = "554 5.7.1 fault.mta No SMTP service here\r\n";
    let bed = Bed::start(Upstream::Fault(Fault::Greeting(REFUSAL))).await;

    // STARTTLS paths consume the greeting: a 5xx one is the MTA's policy (catalogue HO-3),
    // so the client's EHLO gets it as it is and the session closes; never a 250.
    let (mut s, upgraded) = starttls_session(bed.addr("smtp")).await;
    s.send(b"EHLO client.test\r\n").await;
    let all = until_closed(&mut s, SECOND).await;
    assert_eq!(all, REFUSAL);
    let line = bed.proxy.session_line(upgraded).await;
    assert_eq!(line["outcome"], "upstream_failed");
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .starts_with("refused: 554 5.7.1"),
        "{line}"
    );

    // The plaintext hand-off on port 25: the command that triggered it gets the 554.
    let mut s = Smtp::new(connect_from("127.0.0.1", bed.addr("smtp")).await);
    s.reply().await.unwrap();
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    s.send(b"MAIL FROM:<a@client.test>\r\n").await;
    let all = until_closed(&mut s, SECOND).await;
    assert_eq!(all, REFUSAL);

    // Implicit TLS: SPEC "the upstream greeting reaches the client unchanged" — the MTA's
    // own policy, not a fault of ours, so its 554 is passed as it is.
    let (mut s, implicit) = implicit_session(bed.addr("smtps")).await;
    assert_eq!(s.reply().await.unwrap(), REFUSAL);
    assert!(s.cmd("QUIT").await.starts_with("221"));
    until_closed(&mut s, SECOND).await;
    drop(s);
    assert_eq!(bed.proxy.session_line(implicit).await["outcome"], "relayed");
    bed.control().await;
    bed.settle().await;
}

/// Catalogue HO-3 (4xx stays 4xx), FT-1, FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_greeting_421_gives_a_4xx_on_every_path_and_never_a_5xx() {
    const BUSY: &str = "421 4.3.2 fault.mta Service temporarily unavailable\r\n";
    let bed = Bed::start(Upstream::Fault(Fault::Greeting(BUSY))).await;
    // STARTTLS and plaintext: a non-2xx, non-5xx greeting is our 421 4.3.0 (README).
    let (mut s, _) = starttls_session(bed.addr("smtp")).await;
    s.send(b"EHLO client.test\r\n").await;
    let all = until_closed(&mut s, SECOND).await;
    assert!(all.starts_with("421 4.3.0 "), "{all}");
    assert_eq!(all.lines().count(), 1, "{all}");
    let mut s = Smtp::new(connect_from("127.0.0.1", bed.addr("smtp")).await);
    s.reply().await.unwrap();
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    s.send(b"MAIL FROM:<a@client.test>\r\n").await;
    let all = until_closed(&mut s, SECOND).await;
    assert!(all.starts_with("421 4.3.0 "), "{all}");
    assert_no_5xx(&all);
    // Implicit: the MTA's own 421 as it is.
    let (mut s, _) = implicit_session(bed.addr("smtps")).await;
    assert_eq!(s.reply().await.unwrap(), BUSY);
    drop(s);
    bed.control().await;
    bed.settle().await;
}

/// Catalogue FT-3 (`smtp-sink -Q RCPT`), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_after_rcpt_passes_its_421_and_the_client_is_closed_within_1s() {
    const BYE: &str = "421 4.4.2 fault.mta Error: timeout exceeded\r\n";
    let bed = Bed::start(Upstream::Fault(Fault::CloseAt {
        verb: "RCPT",
        reply: BYE,
        rst: false,
    }))
    .await;

    // Implicit TLS.
    let (mut s, _) = implicit_session(bed.addr("smtps")).await;
    assert!(s.reply().await.unwrap().starts_with("220"));
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    assert!(s.cmd("MAIL FROM:<a@client.test>").await.starts_with("250"));
    s.send(b"RCPT TO:<b@example.test>\r\n").await;
    assert_eq!(until_closed(&mut s, SECOND).await, BYE);
    drop(s);

    // Port 25 plaintext hand-off: the same through the other relay entry.
    let mut s = Smtp::new(connect_from("127.0.0.1", bed.addr("smtp")).await);
    s.reply().await.unwrap();
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    assert!(s.cmd("MAIL FROM:<a@client.test>").await.starts_with("250"));
    s.send(b"RCPT TO:<b@example.test>\r\n").await;
    assert_eq!(until_closed(&mut s, SECOND).await, BYE);
    drop(s);
    for i in 0..2 {
        assert_eq!(bed.mta().conns()[i].messages, 0);
    }
    bed.control().await;
    bed.settle().await;
}

/// DATA through the implicit listener while the MTA applies `fault` inside the content;
/// returns what the client read after its last byte, and its session line.
async fn mid_data_fault(fault: Fault) -> (String, serde_json::Value) {
    let bed = Bed::start(Upstream::Fault(fault)).await;
    let (mut s, me) = implicit_session(bed.addr("smtps")).await;
    into_data(&mut s).await;
    // 64 KiB of content and the end of data; the proxy may stop taking it at any point.
    let line = format!("{}\r\n", "x".repeat(78));
    let body = line.repeat(64 * 1024 / line.len());
    let _ = timeout(SECOND, s.stream.write_all(body.as_bytes())).await;
    let _ = timeout(SECOND, s.stream.write_all(b".\r\n")).await;
    let _ = timeout(SECOND, s.stream.flush()).await;
    let rest = until_closed(&mut s, SECOND).await;
    drop(s);
    assert!(
        !rest.lines().any(|l| l.starts_with("250")),
        "a 250 for an undelivered message: {rest}"
    );
    let line = bed.proxy.session_line(me).await;
    bed.control().await;
    bed.settle().await;
    (rest, line)
}

/// Catalogue FT-3 (`smtp-sink -q DATA`), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_mid_data_closes_the_client_within_1s_without_a_250() {
    let (rest, line) = mid_data_fault(Fault::CloseInData {
        after: 4096,
        rst: false,
    })
    .await;
    assert_eq!(rest, "");
    assert_eq!(line["transport"], "implicit");
}

/// Catalogue FT-3 (RST mid-DATA), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_data_closes_the_client_within_1s_without_a_250() {
    let (rest, line) = mid_data_fault(Fault::CloseInData {
        after: 4096,
        rst: true,
    })
    .await;
    assert_eq!(rest, "");
    assert_eq!(line["outcome"], "reset", "{line}");
}

/// Catalogue FT-3 (`smtp-sink -A`), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failing_the_message_after_data_passes_its_451_and_closes_within_1s() {
    const FAILED: &str = "451 4.3.0 fault.mta Error: queue file write error\r\n";
    let (rest, _) = mid_data_fault(Fault::CloseAt {
        verb: ".",
        reply: FAILED,
        rst: false,
    })
    .await;
    assert_eq!(rest, FAILED);
}

/// Catalogue FT-8 (upstream stops reading), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_stops_reading_mid_data_ends_the_session_at_idle_timeout_with_flat_memory() {
    let bed = Bed::start(Upstream::Fault(Fault::StopReadingInData)).await;
    let pid = bed.proxy.pid();
    let rss_before = rss_kib(pid);
    let (mut s, me) = implicit_session(bed.addr("smtps")).await;
    into_data(&mut s).await;

    // Push content until the proxy stops taking it: its upstream no longer reads.
    const CAP: usize = 64 << 20;
    let line = format!("{}\r\n", "y".repeat(1022));
    let chunk = line.repeat(64);
    let mut pushed = 0;
    while pushed < CAP {
        match timeout(
            Duration::from_millis(300),
            s.stream.write_all(chunk.as_bytes()),
        )
        .await
        {
            Ok(Ok(())) => pushed += chunk.len(),
            _ => break,
        }
    }
    let stalled = Instant::now();
    assert!(
        pushed < CAP,
        "the proxy took {pushed} bytes its upstream never read"
    );
    let rss_stalled = rss_kib(pid);
    let line = bed.proxy.session_line(me).await;
    let took = stalled.elapsed();
    assert_eq!(line["outcome"], "timeout", "{line}");
    assert_eq!(line["reason"], "idle", "{line}");
    assert!(
        took < Duration::from_millis(1800),
        "ended {took:?} after the stall"
    );
    let grown = rss_stalled.saturating_sub(rss_before);
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} KiB while {pushed} bytes were pushed"
    );
    until_closed(&mut s, SECOND).await;
    // The upstream connection was closed too (seen once the MTA reads again).
    bed.mta().resume();
    bed.mta().wait_closed(0, 2 * SECOND).await;
    bed.control().await;
    bed.settle().await;
}

/// Catalogue FT-8 (client stops reading), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_while_the_upstream_writes_ends_at_idle_timeout_with_flat_memory()
{
    let bed = Bed::start(Upstream::Fault(Fault::PaddedReplies(1024))).await;
    let pid = bed.proxy.pid();
    let rss_before = rss_kib(pid);
    let (mut s, me) = implicit_session(bed.addr("smtps")).await;
    assert!(s.reply().await.unwrap().starts_with("220"));
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    // Pipelined NOOPs, never reading: each is answered by 1 KiB from the upstream.
    let noops = "NOOP\r\n".repeat(1000);
    let mut sent = 0;
    while sent < 200 {
        match timeout(
            Duration::from_millis(300),
            s.stream.write_all(noops.as_bytes()),
        )
        .await
        {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    let stalled = Instant::now();
    let rss_stalled = rss_kib(pid);
    let line = bed.proxy.session_line(me).await;
    assert_eq!(line["outcome"], "timeout", "{line}");
    assert_eq!(line["reason"], "idle", "{line}");
    assert!(stalled.elapsed() < Duration::from_millis(1800));
    let grown = rss_stalled.saturating_sub(rss_before);
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
    // Back-pressure reached the upstream: it was asked far fewer NOOPs than were sent
    // (those left sit in socket buffers), rather than all of them, replies buffered.
    let conn = bed
        .mta()
        .wait_conn(0, SECOND, |c| c.closed_at.is_some())
        .await;
    let asked = conn.lines.iter().filter(|l| *l == "NOOP").count();
    assert!(
        asked < sent * 1000 / 2,
        "{asked} of {sent}000 NOOPs reached the upstream"
    );
    bed.control().await;
    bed.settle().await;
}
