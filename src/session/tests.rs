//! Deterministic timeout tests: sessions and the relay over `tokio::io::duplex` with paused
//! time (`start_paused`), so every timeout is exact and each test runs in milliseconds. The
//! black-box fault sweep (tests/it/fault_sweep.rs) stays the end-to-end proof.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::report::Phase;
use super::{Outcome, Peer, SessionReport, serve};
use crate::relay::{self, ClientClose, RelayEnd, UPSTREAM_CLOSED_LINGER};
use crate::smtp::stream::SmtpStream;
use crate::snapshot::{ListenerRuntime, Snapshot};

const HANDSHAKE: Duration = Duration::from_secs(10);
const COMMAND: Duration = Duration::from_secs(60);
const IDLE: Duration = Duration::from_secs(600);

fn snapshot() -> Snapshot {
    let yaml = format!(
        "upstreams:\n  mta: {{ address: \"127.0.0.1:9\" }}\n\
         certificates:\n  - self_signed: [mx.test]\n\
         listeners:\n\
         \x20 smtp: {{ listen: \"127.0.0.1:0\", mode: starttls, hostname: mx.test, upstream: mta, \
         limits: {{ handshake_timeout: {}s, command_timeout: {}s, idle_timeout: {}s }} }}\n\
         \x20 smtps: {{ listen: \"127.0.0.1:0\", mode: implicit, hostname: mx.test, upstream: mta, \
         limits: {{ handshake_timeout: {}s }} }}\n",
        HANDSHAKE.as_secs(),
        COMMAND.as_secs(),
        IDLE.as_secs(),
        HANDSHAKE.as_secs(),
    );
    let config = crate::config::load_str(Path::new("test.yaml"), &yaml).unwrap();
    let acme = crate::acme::AcmeManager::default();
    crate::snapshot::build((config, Default::default()), &acme, None).unwrap()
}

fn listener(name: &str) -> Arc<ListenerRuntime> {
    snapshot().listeners[name].clone()
}

/// Fresh permits, as an accept loop of its own would give them.
fn permits() -> crate::admission::Permits {
    crate::admission::Admission::new(Arc::default(), Arc::default())
        .at_accept(10, 10)
        .unwrap()
}

/// Starts a session on `listener` over an in-memory stream; returns the client's end and
/// the session's report (when it ends).
fn start(listener: Arc<ListenerRuntime>) -> (DuplexStream, tokio::task::JoinHandle<SessionReport>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let addr: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let peer = Peer {
        client: addr,
        local: "192.0.2.1:25".parse().unwrap(),
    };
    let task = tokio::spawn(async move {
        serve(
            server,
            listener,
            peer,
            "t".into(),
            permits(),
            &CancellationToken::new(),
        )
        .await
    });
    (client, task)
}

async fn line(r: &mut BufReader<DuplexStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).await.unwrap();
    l
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_gets_421_4_4_2_at_exactly_command_timeout() {
    let (client, task) = start(listener("smtp"));
    let mut client = BufReader::new(client);
    assert!(line(&mut client).await.starts_with("220 mx.test ESMTP"));
    let waiting = Instant::now();
    let reply = line(&mut client).await;
    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    assert_eq!(waiting.elapsed(), COMMAND);
    let report = task.await.unwrap();
    assert_eq!(report.outcome, Outcome::Timeout(Phase::Command));
}

/// SM-19: the deadline is per command line, from the moment it is awaited; dripping one
/// byte at a time does not move it.
#[tokio::test(start_paused = true)]
async fn a_dripping_command_is_cut_at_command_timeout_from_its_first_wait() {
    let (client, task) = start(listener("smtp"));
    let (r, mut w) = tokio::io::split(client);
    let mut r = BufReader::new(r);
    let mut greeting = String::new();
    r.read_line(&mut greeting).await.unwrap();
    let waiting = Instant::now();
    let drip = tokio::spawn(async move {
        for b in b"EHLO slow.example" {
            tokio::time::sleep(COMMAND / 8).await;
            if w.write_all(&[*b]).await.is_err() {
                break;
            }
        }
    });
    let mut reply = String::new();
    r.read_line(&mut reply).await.unwrap();
    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    assert_eq!(waiting.elapsed(), COMMAND);
    assert_eq!(
        task.await.unwrap().outcome,
        Outcome::Timeout(Phase::Command)
    );
    drip.abort();
}

/// A reply resets the deadline: each command gets the whole `command_timeout`.
#[tokio::test(start_paused = true)]
async fn each_command_gets_its_own_command_timeout() {
    let (client, task) = start(listener("smtp"));
    let mut client = BufReader::new(client);
    line(&mut client).await;
    tokio::time::sleep(COMMAND - Duration::from_secs(1)).await;
    client.get_mut().write_all(b"NOOP\r\n").await.unwrap();
    assert!(line(&mut client).await.starts_with("250"));
    let after_noop = Instant::now();
    assert!(line(&mut client).await.starts_with("421 4.4.2"));
    assert_eq!(after_noop.elapsed(), COMMAND);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_implicit_client_that_never_says_hello_is_cut_at_handshake_timeout() {
    let (mut client, task) = start(listener("smtps"));
    let started = Instant::now();
    let mut buf = [0u8; 16];
    // Nothing is ever written to a client that sent no ClientHello: EOF at the timeout.
    assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    assert_eq!(started.elapsed(), HANDSHAKE);
    assert_eq!(
        task.await.unwrap().outcome,
        Outcome::Timeout(Phase::Handshake)
    );
}

#[tokio::test(start_paused = true)]
async fn a_stalled_handshake_after_starttls_is_cut_at_handshake_timeout() {
    let (client, task) = start(listener("smtp"));
    let mut client = BufReader::new(client);
    line(&mut client).await;
    client.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
    assert!(line(&mut client).await.starts_with("220 2.0.0"));
    let started = Instant::now();
    let report = task.await.unwrap();
    assert_eq!(started.elapsed(), HANDSHAKE);
    assert_eq!(report.outcome, Outcome::Timeout(Phase::Handshake));
}

/// Runs the relay between two in-memory pairs; returns the far ends and the relay task.
fn relay_pair() -> (
    DuplexStream,
    DuplexStream,
    tokio::task::JoinHandle<relay::RelayReport>,
) {
    let (client, mut client_side) = tokio::io::duplex(64 * 1024);
    let (upstream, mut upstream_side) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(async move {
        let mut smtp = SmtpStream::default();
        relay::relay(
            &mut client_side,
            &mut upstream_side,
            IDLE,
            &mut smtp,
            Vec::new(),
            "mx.test",
        )
        .await
    });
    (client, upstream, task)
}

#[tokio::test(start_paused = true)]
async fn the_relay_ends_at_idle_timeout_when_no_byte_moves() {
    let (_client, _upstream, task) = relay_pair();
    let started = Instant::now();
    let report = task.await.unwrap();
    assert_eq!(report.end, RelayEnd::IdleTimeout);
    assert_eq!(started.elapsed(), IDLE);
}

#[tokio::test(start_paused = true)]
async fn traffic_moves_the_idle_deadline() {
    let (mut client, mut upstream, task) = relay_pair();
    tokio::time::sleep(IDLE - Duration::from_secs(1)).await;
    client.write_all(b"NOOP\r\n").await.unwrap();
    let mut buf = [0u8; 6];
    upstream.read_exact(&mut buf).await.unwrap();
    let moved = Instant::now();
    let report = task.await.unwrap();
    assert_eq!(report.end, RelayEnd::IdleTimeout);
    assert_eq!(moved.elapsed(), IDLE);
}

/// Half-close: the client's FIN reaches the upstream as a shutdown, the upstream's last
/// reply still reaches the client, and the upstream's close ends the relay cleanly.
#[tokio::test(start_paused = true)]
async fn a_client_half_close_still_gets_the_upstreams_last_reply() {
    let (mut client, mut upstream, task) = relay_pair();
    client.write_all(b"QUIT\r\n").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    upstream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"QUIT\r\n", "the upstream saw the command, then EOF");
    upstream.write_all(b"221 2.0.0 Bye\r\n").await.unwrap();
    upstream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"221 2.0.0 Bye\r\n");
    let report = task.await.unwrap();
    assert_eq!(report.end, RelayEnd::Closed);
    assert_eq!(report.client_close, Some(ClientClose::Clean));
}

/// Linger: after the upstream closes, a client that keeps its side open gets
/// `UPSTREAM_CLOSED_LINGER` to close, then the session ends anyway.
#[tokio::test(start_paused = true)]
async fn after_the_upstream_closes_a_lingering_client_gets_the_linger_time() {
    let (mut client, upstream, task) = relay_pair();
    drop(upstream);
    let mut buf = [0u8; 8];
    let closed = Instant::now();
    assert_eq!(
        client.read(&mut buf).await.unwrap(),
        0,
        "our side shut down"
    );
    let report = task.await.unwrap();
    assert_eq!(report.end, RelayEnd::Closed);
    assert_eq!(closed.elapsed(), UPSTREAM_CLOSED_LINGER);
}

/// What an idle session's task carries (issue 17's accounting, with valgrind massif by call
/// site): the task's own future (`serve`, inline in tokio's task cell, 128-byte aligned) and
/// the boxed implicit phase, which lives for the whole relay (session, upstream, SMTP
/// follower, relay state). Today 312 and 1,208 bytes over `duplex`; the bounds leave about
/// 10%. A change that grows either costs every idle session, so it shows up here first and
/// should be measured (bench/) before a bound moves.
#[test]
fn the_futures_an_idle_session_keeps_stay_small() {
    let (_client, server) = tokio::io::duplex(1024);
    let peer = Peer {
        client: "192.0.2.7:40000".parse().unwrap(),
        local: "192.0.2.1:465".parse().unwrap(),
    };
    let shutdown = CancellationToken::new();
    let listener = listener("smtps");
    let task = serve(
        server,
        listener.clone(),
        peer,
        "t".into(),
        permits(),
        &shutdown,
    );
    let task_size = size_of_val(&task);
    let (_client, server) = tokio::io::duplex(1024);
    let facts = super::report::Facts::new("t".into(), listener, peer);
    let implicit = super::implicit::run(super::Session::new(server, facts));
    let implicit_size = size_of_val(&implicit);
    eprintln!("serve future {task_size} B, implicit phase {implicit_size} B");
    assert!(task_size <= 352, "serve future {task_size} B");
    assert!(implicit_size <= 1344, "implicit phase {implicit_size} B");
}
