//! The fault sweep's descriptors section (split from `fault_sweep.rs` at its banner).

#![allow(clippy::unwrap_used)]

use super::*;

/// Catalogue FT-9, FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_backs_off_keeps_established_sessions_and_recovers() {
    const NOFILE: u64 = 96;
    const FLOOD: usize = 120;
    // The global limit well above what the descriptors allow, so accept itself hits
    // EMFILE (by default max_connections is derived from the limit and refuses first).
    let listeners = format!(
        "  flood: {{ listen: \"127.0.0.1:0\", mode: starttls, hostname: {HOST}, upstream: good, limits: {{ per_ip: 1000 }} }}\n"
    );
    let bed = Bed::start_with(
        Upstream::Fault(Fault::None),
        "max_connections: 100000",
        &listeners,
        Some(NOFILE),
    )
    .await;
    let limit = bed
        .proxy
        .wait_for_log(|v| v["message"] == "open-file limit")
        .await;
    assert_eq!(limit["nofile"], NOFILE, "{limit}");
    let pid = bed.proxy.pid();

    // Established before the flood: TLS, EHLO relayed, upstream connected.
    let (mut established, _) = starttls_session(bed.addr("control")).await;
    assert!(established.cmd("EHLO early.test").await.starts_with("250"));

    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(connect_from("127.0.0.1", bed.addr("flood")).await);
    }
    // Who got a greeting within 500 ms (read concurrently; the sockets come back).
    let mut reads = tokio::task::JoinSet::new();
    for mut tcp in flood.drain(..) {
        reads.spawn(async move {
            let mut buf = [0u8; 64];
            let greeted = matches!(
                timeout(Duration::from_millis(500), tcp.read(&mut buf)).await,
                Ok(Ok(n)) if n > 0
            );
            (tcp, greeted)
        });
    }
    let mut greeted = 0;
    while let Some(r) = reads.join_next().await {
        let (tcp, g) = r.unwrap();
        greeted += usize::from(g);
        flood.push(tcp);
    }
    assert!(
        greeted < FLOOD,
        "every connection was served: no exhaustion"
    );
    bed.proxy
        .wait_for_log(|v| {
            v["message"] == "accept failed; backing off"
                && v["error"].as_str().unwrap().contains("Too many open files")
        })
        .await;

    // Exhausted: accept fails; the back-off keeps it far from a busy loop.
    let cpu_before = cpu_time(pid);
    let window = Instant::now();
    let r = established
        .send_mail("a@client.test", "b@example.test", "during exhaustion")
        .await;
    assert!(r.starts_with("250"), "{r}");
    tokio::time::sleep(SECOND.saturating_sub(window.elapsed())).await;
    let cpu = cpu_time(pid) - cpu_before;
    let wall = window.elapsed();
    assert!(
        cpu < wall / 4,
        "{cpu:?} of CPU in {wall:?} while descriptors were exhausted"
    );
    assert!(established.cmd("NOOP").await.starts_with("250"));

    // Recovery: the flood leaves, every queued connection is served and ends, and a new
    // client completes a whole session.
    drop(flood);
    bed.proxy
        .wait_for_nth_log(FLOOD, IO_TIMEOUT, |v| {
            v["message"] == "session" && v["listener"] == "flood"
        })
        .await;
    assert!(established.cmd("QUIT").await.starts_with("221"));
    drop(established);
    bed.control().await;
    bed.settle().await;
}
