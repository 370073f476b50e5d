//! The fault sweep's hostile TLS section (split from `fault_sweep.rs` at its banner).

#![allow(clippy::unwrap_used)]

use super::*;

/// Catalogue SM-14, ST-5, ST-11, FT-4, FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_hellos_and_plaintext_smtp_fail_the_handshake_at_once_without_an_upstream()
 {
    // Handshake timeouts of 5 s here: "at once" must be visibly shorter.
    let patient = "{ per_ip: 1000, handshake_timeout: 5s }";
    let listeners = format!(
        "  tls5: {{ listen: \"127.0.0.1:0\", mode: implicit, hostname: {HOST}, upstream: mta, limits: {patient} }}\n  \
         starttls5: {{ listen: \"127.0.0.1:0\", mode: starttls, hostname: {HOST}, upstream: mta, limits: {patient} }}\n"
    );
    let bed = Bed::start_with(Upstream::Fault(Fault::None), "", &listeners, None).await;
    let failed_before = handshake_failures(&bed.scrape().await);
    let hello = client_hello();
    let mut record_garbage = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    record_garbage.extend_from_slice(&[0xAB; 0x40]);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("plaintext EHLO", b"EHLO client.test\r\n".to_vec(), false),
        ("plaintext STARTTLS", b"STARTTLS\r\n".to_vec(), false),
        (
            "garbage",
            b"\x00\x01\x02\x03\xff\xfe garbage \x7f".to_vec(),
            false,
        ),
        ("handshake record of garbage", record_garbage, false),
        (
            "truncated ClientHello",
            hello[..hello.len() / 2].to_vec(),
            true,
        ),
    ];
    let mut clients = Vec::new();
    for (what, bytes, then_fin) in &cases {
        for starttls in [false, true] {
            let tcp = connect_from(
                "127.0.0.1",
                bed.addr(if starttls { "starttls5" } else { "tls5" }),
            )
            .await;
            clients.push(tcp.local_addr().unwrap());
            let mut s = Smtp::new(tcp);
            if starttls {
                s.reply().await.unwrap();
                assert!(s.cmd("STARTTLS").await.starts_with("220"));
            }
            let start = Instant::now();
            s.send(bytes).await;
            if *then_fin {
                s.stream.shutdown().await.unwrap();
            }
            let got = raw_until_closed(&mut s.stream, 2 * SECOND).await;
            let took = start.elapsed();
            assert!(took < 2 * SECOND, "{what}: closed after {took:?}");
            // Only a TLS alert record may come back: no greeting, no SMTP reply.
            assert!(
                got.is_empty() || got[0] == 0x15,
                "{what} (starttls: {starttls}): {:?}",
                String::from_utf8_lossy(&got)
            );
        }
    }
    for client in &clients {
        let line = bed.proxy.session_line(*client).await;
        assert_eq!(line["outcome"], "handshake_failed", "{line}");
    }
    let scrape = bed.scrape().await;
    assert_eq!(
        handshake_failures(&scrape) - failed_before,
        clients.len() as f64
    );
    assert!(
        scrape.value(
            "smtp_proxy_tls_handshakes_total",
            &[("listener", "tls5"), ("reason", "invalid_message")]
        ) >= 2.0,
        "plaintext on the implicit port is counted as not TLS"
    );
    assert!(bed.mta().conns().is_empty());
    bed.control().await;
    bed.settle().await;
}

/// Catalogue TL-9, FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_renegotiation_attempt_is_refused_and_the_proxy_keeps_serving() {
    let bed = Bed::start(Upstream::Fault(Fault::None)).await;
    let addr = bed.addr("smtps").to_string();
    // rustls cannot renegotiate, so OpenSSL's s_client (`R` on stdin) plays the client.
    let (mut child, out) = s_client(&addr, "-tls1_2");
    let wait_out = |needle: &'static str| wait_printed(out.clone(), needle);
    wait_out("220 fault.mta ESMTP").await;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"R\n").unwrap();
    stdin.flush().unwrap();
    wait_out("RENEGOTIATING").await;
    // rustls answers the renegotiation ClientHello with a no_renegotiation warning.
    bed.proxy
        .wait_for_log(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("NoRenegotiation"))
        })
        .await;
    // ... and the warning reaches the client (the relay flushes after every client read).
    wait_out("no_renegotiation").await;
    let after: Vec<String> = out
        .lock()
        .unwrap()
        .iter()
        .skip_while(|l| !l.contains("RENEGOTIATING"))
        .cloned()
        .collect();
    assert!(
        !after.iter().any(|l| l.contains("ServerHello")),
        "a second handshake happened: {after:?}"
    );
    // No crash: the proxy keeps serving while that session is open, and ends it cleanly.
    bed.control().await;
    child.kill().unwrap();
    child.wait().unwrap();
    let line = bed
        .proxy
        .wait_for_log(|v| {
            v["message"] == "session" && v["listener"] == "smtps" && v["tls_version"] == "TLSv1.2"
        })
        .await;
    assert_eq!(line["transport"], "implicit", "{line}");
    bed.settle().await;
}

/// `openssl s_client -msg` against `addr`: the child and every line it prints (its session
/// on stdout, its messages and `-msg` traces on stderr).
fn s_client(addr: &str, version: &str) -> (std::process::Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", addr, version, "-msg", "-crlf"])
        .args(["-servername", HOST])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    let out: Arc<Mutex<Vec<String>>> = Arc::default();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    for pipe in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
    }
    (child, out)
}

/// Waits until s_client has printed a line containing `needle`.
async fn wait_printed(out: Arc<Mutex<Vec<String>>>, needle: &'static str) {
    wait_printed_times(out, needle, 1).await;
}

/// Waits until s_client has printed `times` lines containing `needle`.
async fn wait_printed_times(out: Arc<Mutex<Vec<String>>>, needle: &'static str, times: usize) {
    eventually(
        IO_TIMEOUT,
        &format!("s_client printed {needle:?} {times} times"),
        || async {
            let lines = out.lock().unwrap();
            let seen = lines.iter().filter(|l| l.contains(needle)).count();
            match seen >= times {
                true => Ok(()),
                false => {
                    let tail: Vec<&String> = lines.iter().rev().take(12).rev().collect();
                    Err(format!("{seen} times; s_client's last lines: {tail:#?}"))
                }
            }
        },
    )
    .await;
}

/// Issue 25: TLS 1.3 records are ours after the handshake, and a KeyUpdate is the one
/// handshake message that still arrives. OpenSSL (`K`: KeyUpdate with update_requested,
/// `k`: without) updates its sending key; we must switch our receiving key at that record,
/// answer a request with our own KeyUpdate before our next record, and go on under the new
/// keys both ways. A wrong key either way ends the session with bad_record_mac.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_key_updates_from_openssl_are_answered_and_the_session_goes_on() {
    let bed = Bed::start(Upstream::Fault(Fault::None)).await;
    let addr = bed.addr("smtps").to_string();
    let (mut child, out) = s_client(&addr, "-tls1_3");
    let printed = |needle: &'static str, times| wait_printed_times(out.clone(), needle, times);
    let received_key_updates = || {
        out.lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("<<<") && l.contains("KeyUpdate"))
            .count()
    };
    printed("220 fault.mta ESMTP", 1).await;
    let mut stdin = child.stdin.take().unwrap();
    let mut say = |line: &[u8]| {
        stdin.write_all(line).unwrap();
        stdin.flush().unwrap();
    };
    say(b"NOOP\n");
    printed("250 2.0.0 ok", 1).await;
    assert_eq!(received_key_updates(), 0);
    // KeyUpdate(update_requested): our answer arrives, then our reply under the new key.
    // s_client takes a line starting with K as its command and drops the rest of that
    // read: the next line goes once the KeyUpdate is out.
    say(b"K\n");
    printed(">>> TLS 1.3, Handshake [length 0005], KeyUpdate", 1).await;
    say(b"NOOP\n");
    printed("250 2.0.0 ok", 2).await;
    assert_eq!(received_key_updates(), 1, "our KeyUpdate answer");
    // KeyUpdate(update_not_requested): no answer, the session goes on.
    say(b"k\n");
    printed(">>> TLS 1.3, Handshake [length 0005], KeyUpdate", 2).await;
    say(b"NOOP\n");
    printed("250 2.0.0 ok", 3).await;
    assert_eq!(
        received_key_updates(),
        1,
        "no answer to update_not_requested"
    );
    say(b"quit\n");
    printed("221 2.0.0 bye", 1).await;
    let _ = child.kill();
    child.wait().unwrap();
    let line = bed
        .proxy
        .wait_for_log(|v| v["message"] == "session" && v["listener"] == "smtps")
        .await;
    assert_eq!(line["tls_version"], "TLSv1.3", "{line}");
    assert_eq!(line["outcome"], "relayed", "{line}");
    bed.settle().await;
}
