//! Scale-out proof (issue 13, SPEC section 5): two stateless replicas behind HAProxy in TCP
//! mode (`send-proxy-v2` towards them, `accept_proxy_protocol` on them, health checks on
//! `/readyz`), one real Postfix. Several hundred messages from ten client addresses; one
//! replica SIGKILLed mid-load; HAProxy takes it out. Every message that got `250` is in the
//! mailbox exactly once, every failure a client saw is one it would retry (4xx or a cut
//! connection, never 5xx), Postfix logged the clients' addresses and never the balancer's;
//! then the replica comes back and takes traffic again. The counts are written to
//! `target/ci-summary/scale_out.txt`, which `.ci/run` prints.
//!
//! Needs HAProxy (Debian package `haproxy`; `.ci/run` installs it).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::postfix::{Postfix, PostfixOptions};
use crate::common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const MESSAGES: usize = 300;
/// Messages after the restart, to show the replica takes traffic again.
const AFTER_RESTART: usize = 60;
const CONCURRENCY: usize = 12;
const KILL_AFTER: usize = 80;

struct Haproxy {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(front: u16, replicas: &[(&str, u16, u16)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let mut cfg = format!(
            "global\n  stats socket {} mode 600 level admin\n  maxconn 2000\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             \x20 retries 3\n  option redispatch\n\
             frontend mail\n  bind 127.0.0.1:{front}\n  default_backend replicas\n\
             backend replicas\n  balance roundrobin\n  option httpchk\n  http-check send meth GET uri /readyz\n",
            socket.display()
        );
        for (name, port, metrics) in replicas {
            cfg += &format!(
                "  server {name} 127.0.0.1:{port} send-proxy-v2 check port {metrics} inter 200ms fall 2 rise 2\n"
            );
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let out = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output();
        let out = out.expect("haproxy is installed (.ci/run installs it)");
        assert!(out.status.success(), "haproxy -c: {out:?}");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    /// The `status` column of `show stat` for backend server `name` (UP, DOWN, ...).
    fn status(&self, name: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let header: Vec<&str> = out
            .lines()
            .next()?
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = header.iter().position(|h| *h == "status")?;
        out.lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&"replicas") && f.get(1) == Some(&name))
            .and_then(|f| f.get(col).map(|s| s.to_string()))
    }

    /// Waits (bounded) until HAProxy's health check reports `name` as `want`.
    async fn wait_status(&self, name: &str, want: &str) {
        let what = format!("HAProxy reports {name} {want}");
        eventually(Duration::from_secs(20), &what, || async {
            match self.status(name) {
                Some(s) if s.starts_with(want) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replica_config(pf: &Postfix, cert: &Issued, port: u16, metrics: u16) -> String {
    format!(
        "log: {{ format: json }}\nmetrics: {{ listen: \"127.0.0.1:{metrics}\" }}\n\
         upstreams:\n  mta: {{ address: \"{}\", connect_timeout: 3s, health_interval: 1s }}\n\
         certificates:\n  - cert: {}\n    key: {}\n\
         listeners:\n  submissions:\n    listen: \"127.0.0.1:{port}\"\n    mode: implicit\n    hostname: mx.example.test\n    upstream: mta\n    accept_proxy_protocol: [\"127.0.0.1/32\"]\n",
        pf.proxy_addr(),
        cert.cert_path.display(),
        cert.key_path.display()
    )
}

fn spawn_replica(dir: &Path, name: &str, config: &str) -> RunningProxy {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    spawn_proxy_at(tempfile::tempdir().unwrap(), &path, &[])
}

/// What one client saw.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Seen {
    Accepted,
    /// A 4xx reply: the sender keeps the message and retries.
    Temporary(u16),
    /// A 5xx reply: the sender bounces. Never acceptable for our faults.
    Permanent(u16),
    /// Connection refused, reset or closed: the sender retries.
    Cut,
}

async fn reply(
    r: &mut BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
) -> Option<u16> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(IO_TIMEOUT, r.read_line(&mut line))
            .await
            .ok()?
            .ok()?;
        if n == 0 || line.len() < 4 {
            return None;
        }
        if line.as_bytes()[3] == b' ' {
            return line[..3].parse().ok();
        }
    }
}

async fn one_message(
    front: SocketAddr,
    ip: &str,
    id: usize,
    client: Arc<rustls::ClientConfig>,
) -> Seen {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let Ok(Ok(tcp)) = tokio::time::timeout(IO_TIMEOUT, socket.connect(front)).await else {
        return Seen::Cut;
    };
    let name = rustls::pki_types::ServerName::try_from("mx.example.test").unwrap();
    let connector = tokio_rustls::TlsConnector::from(client);
    let Ok(Ok(tls)) = tokio::time::timeout(IO_TIMEOUT, connector.connect(name, tcp)).await else {
        return Seen::Cut;
    };
    let mut r = BufReader::new(tls);
    let body = format!(
        "Subject: scale-out {id}\r\n\r\nmessage <scale-{id:04}> through the balancer\r\n.\r\n"
    );
    let steps: [(&str, u16); 5] = [
        ("", 220),
        ("EHLO client.test\r\n", 250),
        ("MAIL FROM:<load@client.test>\r\n", 250),
        ("RCPT TO:<user@example.test>\r\n", 250),
        ("DATA\r\n", 354),
    ];
    for (cmd, want) in steps {
        if !cmd.is_empty() && r.get_mut().write_all(cmd.as_bytes()).await.is_err() {
            return Seen::Cut;
        }
        match reply(&mut r).await {
            None => return Seen::Cut,
            Some(c) if c == want => {}
            Some(c) if c >= 500 => return Seen::Permanent(c),
            Some(c) => return Seen::Temporary(c),
        }
    }
    if r.get_mut().write_all(body.as_bytes()).await.is_err() {
        return Seen::Cut;
    }
    let seen = match reply(&mut r).await {
        None => Seen::Cut,
        Some(250) => Seen::Accepted,
        Some(c) if c >= 500 => Seen::Permanent(c),
        Some(c) => Seen::Temporary(c),
    };
    let _ = r.get_mut().write_all(b"QUIT\r\n").await;
    seen
}

/// Sends messages `ids` with bounded concurrency; `done` counts finished ones.
async fn load(
    front: SocketAddr,
    ids: std::ops::Range<usize>,
    client: Arc<rustls::ClientConfig>,
    done: Arc<AtomicUsize>,
) -> HashMap<usize, Seen> {
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for id in ids {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let (client, done) = (client.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let ip = format!("127.0.0.{}", 50 + id % 10);
            let seen = one_message(front, &ip, id, client).await;
            done.fetch_add(1, Ordering::SeqCst);
            drop(permit);
            (id, seen)
        }));
    }
    let mut out = HashMap::new();
    for t in tasks {
        let (id, seen) = t.await.unwrap();
        out.insert(id, seen);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_haproxy_lose_nothing_when_one_is_killed() {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions::default());
    let ports = free_ports(5);
    let (front, a_port, a_metrics, b_port, b_metrics) =
        (ports[0], ports[1], ports[2], ports[3], ports[4]);
    let configs = tempfile::tempdir().unwrap();
    let a_config = replica_config(&pf, &mx, a_port, a_metrics);
    let mut a = spawn_replica(configs.path(), "a", &a_config);
    let b = spawn_replica(
        configs.path(),
        "b",
        &replica_config(&pf, &mx, b_port, b_metrics),
    );
    let lb = Haproxy::start(front, &[("a", a_port, a_metrics), ("b", b_port, b_metrics)]);
    lb.wait_status("a", "UP").await;
    lb.wait_status("b", "UP").await;

    let front: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    let client = Arc::new(verifying_client(pki.server_ca_der()));
    let done = Arc::new(AtomicUsize::new(0));
    let running = tokio::spawn(load(front, 0..MESSAGES, client.clone(), done.clone()));
    // SIGKILL replica a while sessions are in flight on it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(Instant::now() < deadline, "load too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a_sessions_before = a.count_logs(|v| v["message"] == "session");
    a.signal("KILL");
    let _ = a.wait_exit(Duration::from_secs(5));
    let mut seen = running.await.unwrap();
    lb.wait_status("a", "DOWN").await;

    // The replica comes back on the same ports and takes traffic again.
    drop(a);
    let a2 = spawn_replica(configs.path(), "a", &a_config);
    lb.wait_status("a", "UP").await;
    let after = load(front, MESSAGES..MESSAGES + AFTER_RESTART, client, done).await;
    let a2_sessions = a2.count_logs(|v| v["message"] == "session");
    seen.extend(after);

    let sent = seen.len();
    let accepted: Vec<usize> = seen
        .iter()
        .filter(|(_, s)| **s == Seen::Accepted)
        .map(|(id, _)| *id)
        .collect();
    let permanent: Vec<(usize, Seen)> = seen
        .iter()
        .filter(|(_, s)| matches!(s, Seen::Permanent(_)))
        .map(|(id, s)| (*id, *s))
        .collect();
    let temporary = seen
        .values()
        .filter(|s| matches!(s, Seen::Temporary(_)))
        .count();
    let cut = seen.values().filter(|s| **s == Seen::Cut).count();

    // Every accepted message delivered: wait (bounded) for the queue to drain.
    let deadline = Instant::now() + Duration::from_secs(60);
    let count = |id: usize| {
        let needle = format!("<scale-{id:04}>");
        pf.messages().iter().filter(|m| m.contains(&needle)).count()
    };
    while pf.messages().len() < accepted.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let messages = pf.messages();
    let found = accepted.iter().filter(|id| count(**id) >= 1).count();
    let duplicates: usize = (0..sent).filter(|id| count(*id) > 1).count();
    let lost = accepted.len() - found;
    let log = pf.log();
    let clients: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once("client=unknown[").map(|(_, r)| r))
        .filter_map(|r| r.split_once(']').map(|(a, _)| a))
        .collect();
    let balancer_seen = clients.iter().filter(|a| **a == "127.0.0.1").count();
    let distinct: std::collections::BTreeSet<&&str> = clients.iter().collect();

    let summary = format!(
        "scale-out: sent={sent} 250={} found={found} duplicates={duplicates} lost={lost} 5xx={} \
         4xx={temporary} cut={cut} mailbox={} client_addresses={} balancer_address_logged={balancer_seen} \
         killed_replica_sessions_before_kill={a_sessions_before} restarted_replica_sessions={a2_sessions} \
         other_replica_sessions={}",
        accepted.len(),
        permanent.len(),
        messages.len(),
        distinct.len(),
        b.count_logs(|v| v["message"] == "session"),
    );
    eprintln!("{summary}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-summary");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("scale_out.txt"), format!("{summary}\n")).unwrap();

    assert!(permanent.is_empty(), "5xx seen: {permanent:?}");
    assert_eq!(lost, 0, "{summary}");
    assert_eq!(duplicates, 0, "{summary}");
    assert!(accepted.len() >= sent * 9 / 10, "{summary}");
    assert!(
        a_sessions_before > 0,
        "replica a had taken traffic: {summary}"
    );
    assert!(
        a2_sessions > 0,
        "the restarted replica takes traffic: {summary}"
    );
    assert_eq!(balancer_seen, 0, "{summary}");
    assert_eq!(distinct.len(), 10, "{summary}");
}
