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

// The sections, one file each under fault_sweep/.
mod client_faults;
mod descriptors;
mod hostile_tls;
mod inbound_proxy;
mod slowloris;
mod upstream_faults;
