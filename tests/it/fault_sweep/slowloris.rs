//! The fault sweep's slowloris section (split from `fault_sweep.rs` at its banner).

#![allow(clippy::unwrap_used)]

use super::*;

/// Catalogue SM-19, FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_tls_slowloris_dripping_one_command_line_is_cut_at_command_timeout() {
    let bed = Bed::start(Upstream::Fault(Fault::None)).await;
    let addr = bed.addr("smtp");
    // One byte every 200 ms of a line that never ends: command_timeout (1 s) is a
    // deadline for the whole command line, not for each read (SM-19).
    let dripper = async {
        let mut s = Smtp::new(connect_from("127.0.0.1", addr).await);
        s.reply().await.unwrap();
        let start = Instant::now();
        let line = b"EHLO slow.client.example.test";
        let mut reply = None;
        for &b in line.iter().cycle().take(20) {
            if s.stream.write_all(&[b]).await.is_err() {
                break;
            }
            if let Ok(r) = timeout(Duration::from_millis(200), s.reply()).await {
                reply = Some(r);
                break;
            }
        }
        let took = start.elapsed();
        let rest = until_closed(&mut s, SECOND).await;
        (reply, took, rest)
    };
    // Complete commands, each dripped within the deadline: each has its own deadline.
    let patient = async {
        let mut s = Smtp::new(connect_from("127.0.0.1", addr).await);
        s.reply().await.unwrap();
        let start = Instant::now();
        for _ in 0..3 {
            for &b in b"NOOP\r\n" {
                s.send(&[b]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let r = s.reply().await.unwrap();
            assert!(r.starts_with("250"), "{r}");
        }
        assert!(start.elapsed() > SECOND);
        assert!(s.cmd("QUIT").await.starts_with("221"));
    };
    let ((reply, took, rest), ()) = tokio::join!(dripper, patient);
    let reply = reply.expect("no reply while dripping").unwrap();
    assert!(reply.starts_with("421 4.4.2 "), "{reply}");
    assert!(
        took < Duration::from_millis(1700),
        "cut after {took:?} of dripping"
    );
    assert_eq!(rest, "");
    let line = bed
        .proxy
        .wait_for_log(|v| v["message"] == "session" && v["outcome"] == "timeout")
        .await;
    assert_eq!(line["reason"], "command");
    assert!(bed.mta().conns().is_empty());
    bed.control().await;
    bed.settle().await;
}

/// Catalogue TL-10, ST-12, FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_slowloris_is_cut_at_handshake_timeout_on_both_listener_kinds() {
    let bed = Bed::start(Upstream::Fault(Fault::None)).await;
    let hello = client_hello();
    let failed_before = handshake_failures(&bed.scrape().await);
    // The ClientHello one byte every 100 ms: it would take far longer than the 1 s allowed.
    let drip = |mut tcp: TcpStream| {
        let hello = hello.clone();
        async move {
            let start = Instant::now();
            for &b in &hello {
                if tcp.write_all(&[b]).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 512];
                match timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => {}
                }
            }
            start.elapsed()
        }
    };
    let implicit = async {
        let tcp = connect_from("127.0.0.1", bed.addr("smtps")).await;
        drip(tcp).await
    };
    let upgraded = async {
        let mut s = Smtp::new(connect_from("127.0.0.1", bed.addr("smtp")).await);
        s.reply().await.unwrap();
        assert!(s.cmd("STARTTLS").await.starts_with("220"));
        drip(s.stream).await
    };
    let (a, b) = tokio::join!(implicit, upgraded);
    for took in [a, b] {
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(1700),
            "handshake cut after {took:?}"
        );
    }
    bed.proxy
        .wait_for_nth_log(2, IO_TIMEOUT, |v| {
            v["message"] == "session" && v["outcome"] == "timeout" && v["reason"] == "handshake"
        })
        .await;
    let scrape = bed.scrape().await;
    assert_eq!(handshake_failures(&scrape) - failed_before, 2.0);
    assert!(bed.mta().conns().is_empty());
    bed.control().await;
    bed.settle().await;
}

/// Catalogue FT-8 (idle_timeout in the relay), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_slowloris_that_stalls_mid_command_is_cut_at_idle_timeout_with_its_upstream() {
    let bed = Bed::start(Upstream::Fault(Fault::None)).await;
    let (mut s, me) = implicit_session(bed.addr("smtps")).await;
    assert!(s.reply().await.unwrap().starts_with("220"));
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    // A few bytes 300 ms apart (each moves the idle deadline), then nothing.
    for &b in b"MAIL" {
        s.send(&[b]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let last = Instant::now() - Duration::from_millis(300);
    until_closed(&mut s, 2 * SECOND).await;
    let took = last.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1800),
        "closed {took:?} after the last byte"
    );
    let line = bed.proxy.session_line(me).await;
    assert_eq!(line["outcome"], "timeout", "{line}");
    assert_eq!(line["reason"], "idle", "{line}");
    assert!(line["duration_ms"].as_u64().unwrap() >= 1900, "{line}");
    bed.mta().wait_closed(0, SECOND).await;
    bed.control().await;
    bed.settle().await;
}
