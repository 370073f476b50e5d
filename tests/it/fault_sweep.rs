//! The fault sweep (issue 8, catalogue §H and the fault cases of §B, §C, §F, §G): the real
//! binary over loopback sockets against a scripted MTA (`crate::common::fault_mta`) that refuses,
//! never greets, greets 554, closes or resets mid-session, stops reading or half-closes;
//! clients that abort, drip bytes, send garbage or renegotiate; a proxy started with a
//! small RLIMIT_NOFILE. Every test ends with the proxy back at its descriptor baseline and
//! `connections_active` at 0 (no task or descriptor left behind), most after a control
//! client has completed a full STARTTLS delivery through the same process (FT-14).
//! Timeouts in these configs are 1 s so the whole file runs in seconds.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::fault_mta::{Fault, FaultMta};
use crate::common::postfix::{Postfix, PostfixOptions};
use crate::common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

const HOST: &str = "mx.example.test";
const SECOND: Duration = Duration::from_secs(1);
/// The limits of the listeners under test: every timeout fires after one second.
const LIMITS: &str =
    "{ per_ip: 1000, handshake_timeout: 1s, command_timeout: 1s, idle_timeout: 1s }";

/// What the `mta` upstream is.
enum Upstream {
    Fault(Fault),
    /// A port nobody listens on: connection refused.
    Refusing,
    /// A real MTA (Postfix) listening there.
    At(SocketAddr),
}

/// A proxy whose `smtps` (implicit) and `smtp` (STARTTLS, port-25 style) listeners use the
/// faulty `mta` upstream, and whose `control` listener (STARTTLS) uses a healthy fake MTA.
struct Bed {
    proxy: RunningProxy,
    mta: Option<FaultMta>,
    good: FakeMta,
    metrics: SocketAddr,
    /// Open descriptors after the start-up probes and one control session.
    baseline: usize,
}

impl Bed {
    async fn start(up: Upstream) -> Self {
        Self::start_with(up, "", "", None).await
    }

    /// `top`: extra top-level keys; `listeners`: extra listener entries; `nofile`: start
    /// the proxy with this RLIMIT_NOFILE (soft and hard).
    async fn start_with(up: Upstream, top: &str, listeners: &str, nofile: Option<u64>) -> Self {
        let good = FakeMta::start().await;
        let (mta, mta_addr) = match up {
            Upstream::Fault(f) => {
                let m = FaultMta::start(f).await;
                let a = m.addr;
                (Some(m), a)
            }
            Upstream::Refusing => (None, refusing_addr()),
            Upstream::At(addr) => (None, addr),
        };
        let yaml = format!(
            r#"log: {{ format: json }}
metrics: {{ listen: "127.0.0.1:0" }}
{top}
upstreams:
  mta: {{ address: "{mta_addr}", connect_timeout: 1s, health_interval: 1h }}
  good: {{ address: "{good}", connect_timeout: 1s, health_interval: 1h }}
certificates:
  - self_signed: [{HOST}]
listeners:
  smtps: {{ listen: "127.0.0.1:0", mode: implicit, hostname: {HOST}, upstream: mta, limits: {LIMITS} }}
  smtp: {{ listen: "127.0.0.1:0", mode: starttls, hostname: {HOST}, upstream: mta, limits: {LIMITS} }}
  control: {{ listen: "127.0.0.1:0", mode: starttls, hostname: {HOST}, upstream: good, limits: {{ per_ip: 1000 }} }}
{listeners}"#,
            good = good.addr
        );
        let proxy = match nofile {
            Some(n) => spawn_proxy_with_nofile(&yaml, n),
            None => spawn_proxy(&yaml),
        };
        // The first health probe of each upstream has come and gone (its socket too).
        for name in ["mta", "good"] {
            proxy
                .wait_for_log(|v| {
                    v["upstream"] == name
                        && (v["message"] == "upstream healthy"
                            || v["message"] == "upstream unhealthy")
                })
                .await;
        }
        let metrics = proxy.metrics_addr();
        let mut bed = Self {
            proxy,
            mta,
            good,
            metrics,
            baseline: 0,
        };
        bed.control().await;
        bed.baseline = bed.proxy.fd_count();
        bed
    }

    fn addr(&self, listener: &str) -> SocketAddr {
        self.proxy.addr(listener)
    }

    fn mta(&self) -> &FaultMta {
        self.mta.as_ref().unwrap()
    }

    /// FT-14: a full STARTTLS delivery through the `control` listener to the healthy MTA.
    async fn control(&self) {
        let (mut s, me) = starttls_session(self.addr("control")).await;
        assert!(s.cmd("EHLO control.test").await.starts_with("250"));
        let r = s
            .send_mail("a@control.test", "b@example.test", "control message")
            .await;
        assert!(r.starts_with("250"), "control delivery: {r}");
        assert!(s.cmd("QUIT").await.starts_with("221"));
        drop(s);
        let line = self.proxy.session_line(me).await;
        assert_eq!(line["outcome"], "relayed", "{line}");
        assert!(
            self.good
                .conns()
                .iter()
                .any(|c| c.lines.iter().any(|l| l == "control message")),
            "the control message reached the healthy MTA"
        );
    }

    /// No task or descriptor left: the descriptor count back at its baseline and no
    /// session counted as active (bounded wait: sessions may still be closing).
    async fn settle(&self) {
        eventually(Duration::from_secs(5), "settled", || async {
            let fds = self.proxy.fd_count();
            let active = Scrape::get(self.metrics)
                .await
                .value("smtp_proxy_connections_active", &[]);
            if fds == self.baseline && active == 0.0 {
                return Ok(());
            }
            Err(format!(
                "{fds} descriptors (baseline {}), {active} sessions active",
                self.baseline
            ))
        })
        .await;
    }

    async fn scrape(&self) -> Scrape {
        Scrape::get(self.metrics).await
    }
}

/// An address that refuses connections: a port bound and released.
fn refusing_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Greeting, EHLO, STARTTLS and the handshake on a STARTTLS listener.
async fn starttls_session(addr: SocketAddr) -> (Smtp<Tls>, SocketAddr) {
    let tcp = connect_from("127.0.0.1", addr).await;
    let me = tcp.local_addr().unwrap();
    let mut s = Smtp::new(tcp);
    let greeting = s.reply().await.unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    let r = s.cmd("STARTTLS").await;
    assert!(r.starts_with("220 "), "{r}");
    let tls = tls_handshake(s.stream, inspecting_client(None), Some(HOST))
        .await
        .unwrap();
    (Smtp::new(tls), me)
}

/// The handshake on an implicit listener.
async fn implicit_session(addr: SocketAddr) -> (Smtp<Tls>, SocketAddr) {
    let (tls, me) = tls_client("127.0.0.1", addr, inspecting_client(None), Some(HOST)).await;
    (Smtp::new(tls), me)
}

/// Greeting, EHLO, MAIL, RCPT and DATA (354) through the relay.
async fn into_data<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut Smtp<S>) {
    let greeting = s.reply().await.unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    assert!(s.cmd("MAIL FROM:<a@client.test>").await.starts_with("250"));
    assert!(s.cmd("RCPT TO:<b@example.test>").await.starts_with("250"));
    let r = s.cmd("DATA").await;
    assert!(r.starts_with("354"), "{r}");
}

/// Reads until the peer closes (EOF, TLS EOF without close_notify, or a reset), which
/// must happen within `within`; returns everything read, unread reply bytes first.
async fn until_closed<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut Smtp<S>,
    within: Duration,
) -> String {
    let mut out = s.pending().to_vec();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, s.stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "still open after {within:?}; read {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Raw-socket variant: everything read until the proxy closes, within `within`.
async fn raw_until_closed(tcp: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Err(_) => panic!("still open after {within:?}; read {out:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Never a permanent failure for a fault of ours or the MTA's availability.
fn assert_no_5xx(text: &str) {
    assert!(
        !text.lines().any(|l| l.starts_with('5')),
        "a 5xx reached the client: {text}"
    );
}

/// The first flight of a real TLS client: a complete ClientHello record.
fn client_hello() -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(inspecting_client(None)), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// User + system CPU time of a process (/proc/PID/stat fields 14 and 15, in USER_HZ,
/// which the kernel ABI fixes at 100 per second).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn handshake_failures(s: &Scrape) -> f64 {
    s.value("smtp_proxy_tls_handshakes_total", &[("result", "failed")])
}

// ---------------------------------------------------------------- upstream faults

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

// ---------------------------------------------------------------- client faults

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

// ---------------------------------------------------------------- slowloris

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

// ---------------------------------------------------------------- hostile TLS

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
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &addr, "-tls1_2", "-msg"])
        .args(["-servername", HOST])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    // Its session on stdout, its messages (RENEGOTIATING, -msg traces) on stderr.
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
    let wait_out = |needle: &'static str| {
        let out = out.clone();
        async move {
            eventually(
                IO_TIMEOUT,
                &format!("s_client printed {needle:?}"),
                || async {
                    match out.lock().unwrap().iter().any(|l| l.contains(needle)) {
                        true => Ok(()),
                        false => Err(String::new()),
                    }
                },
            )
            .await;
        }
    };
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

// ---------------------------------------------------------------- inbound PROXY

/// Catalogue PI-6, PI-4 (v1 without CRLF), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_proxy_header_declaring_more_than_the_cap_is_refused_at_once() {
    const BALANCER: &str = "127.0.0.7";
    let listeners = format!(
        "  balanced: {{ listen: \"127.0.0.1:0\", mode: implicit, hostname: {HOST}, upstream: mta, accept_proxy_protocol: [\"{BALANCER}/32\"], limits: {{ per_ip: 1000, handshake_timeout: 5s }} }}\n"
    );
    let bed = Bed::start_with(Upstream::Fault(Fault::None), "", &listeners, None).await;
    let addr = bed.addr("balanced");
    // The probe works: a valid v2 header, then TLS and the MTA's greeting.
    let mut tcp = connect_from(BALANCER, addr).await;
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "192.0.2.10:40000".parse::<SocketAddr>().unwrap(),
            "198.51.100.1:465".parse::<SocketAddr>().unwrap(),
        ),
    )
    .build()
    .unwrap();
    tcp.write_all(&header).await.unwrap();
    let tls = tls_handshake(tcp, inspecting_client(None), Some(HOST))
        .await
        .unwrap();
    let mut s = Smtp::new(tls);
    assert!(s.reply().await.unwrap().starts_with("220 fault.mta"));
    drop(s);

    // v2 PROXY/TCP4 declaring 65535 and 4081 bytes (16 + 4081 > 4096), and a v1 line that
    // passes v1's 107-byte maximum without a CRLF: refused on sight, not waited for.
    let v2 = |len: u16| {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
        h.extend_from_slice(&len.to_be_bytes());
        h
    };
    let mut v1 = b"PROXY TCP4 ".to_vec();
    v1.resize(120, b'1');
    for (what, bytes) in [("v2 65535", v2(65535)), ("v2 4081", v2(4081)), ("v1", v1)] {
        let mut tcp = connect_from(BALANCER, addr).await;
        let start = Instant::now();
        tcp.write_all(&bytes).await.unwrap();
        let got = raw_until_closed(&mut tcp, 3 * SECOND).await;
        let took = start.elapsed();
        assert!(took < SECOND, "{what}: closed after {took:?}");
        assert!(got.is_empty(), "{what}: {got:?}");
    }
    bed.proxy
        .wait_for_nth_log(3, IO_TIMEOUT, |v| {
            v["message"] == "session" && v["outcome"] == "protocol_error"
        })
        .await;
    assert_eq!(
        bed.mta().conns().len(),
        1,
        "only the valid header reached it"
    );
    bed.control().await;
    bed.settle().await;
}

// ---------------------------------------------------------------- descriptors

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
