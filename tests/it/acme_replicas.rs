//! Built-in ACME with N replicas behind a balancer (issue 24): three proxies share one ACME
//! store directory and sit behind HAProxy in TCP mode with round robin; Pebble validates
//! tls-alpn-01 through the balancer's port, so its validation connections land on any
//! replica. All three start at the same instant with an empty store. Proven: one account and
//! one order per renewal across the three (Pebble's log, the sum of the replicas'
//! `acme_events{event="ordered"}`), no failed validation, the same leaf on every replica
//! within seconds, the key kept across a renewal (or, with `rotate_key`, the announced next
//! key on all three); a lock holder SIGKILLed mid-order is taken over after the stale bound;
//! an unwritable store is an error that names it while the cached certificate is served.
//!
//! Needs Pebble and HAProxy (`.ci/run` installs both); runs as root (`chattr`).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::pebble::Pebble;
use crate::common::*;

const DOMAIN: &str = "mail.example.test";
const REPLICAS: usize = 3;

/// HAProxy in TCP mode, round robin over `backends` (no PROXY header: a validation
/// connection may land on any replica). With `checks`, a TCP health check and redispatch on
/// a refused connection take a dead replica out, as any production balancer does; without,
/// every replica is in the rotation from the start (HAProxy marks a checked server down
/// until its first checks pass, which would hide replicas from the first validations).
struct Balancer {
    child: Child,
    dir: tempfile::TempDir,
}

impl Balancer {
    fn start(front: u16, backends: &[u16], checks: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = format!(
            "global\n  maxconn 500\n  log stdout format raw local0\ndefaults\n  mode tcp\n  log global\n  option tcplog\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             \x20 retries 3\n  option redispatch\n\
             frontend tls\n  bind 127.0.0.1:{front}\n  default_backend replicas\n\
             backend replicas\n  balance roundrobin\n"
        );
        for (i, port) in backends.iter().enumerate() {
            let check = if checks {
                " check inter 300ms fall 1 rise 1"
            } else {
                ""
            };
            cfg += &format!("  server r{i} 127.0.0.1:{port}{check}\n");
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::fs::File::create(dir.path().join("haproxy.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy is installed (.ci/run installs it)");
        assert!(
            wait_until(Duration::from_secs(10), || postfix::is_listening(front)),
            "HAProxy listens on {front}"
        );
        Self { child, dir }
    }

    /// HAProxy's connection log (one line per connection: which server took it).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    pebble: Pebble,
    store: PathBuf,
    replicas: Vec<Option<RunningProxy>>,
    ports: Vec<u16>,
    balancer: Balancer,
    _work: tempfile::TempDir,
    _mta: FakeMta,
}

fn replica_yaml(
    mta: SocketAddr,
    port: u16,
    pebble: &Pebble,
    api_ca: &Path,
    store: &Path,
    rotate: bool,
) -> String {
    format!(
        r#"log: {{ format: json }}
upstreams:
  mta: {{ address: "{mta}", connect_timeout: 2s, health_interval: 1h }}
certificates:
  - acme:
      domains: [{DOMAIN}]
      contact: ["mailto:postmaster@example.test"]
      directory: "{}"
      directory_ca: {}
      cache: {}
      rotate_key: {rotate}
metrics: {{ listen: "127.0.0.1:0" }}
listeners:
  smtps: {{ listen: "127.0.0.1:{port}", mode: implicit, hostname: {DOMAIN}, upstream: mta }}
"#,
        pebble.directory_url(),
        api_ca.display(),
        store.display()
    )
}

/// Pebble, HAProxy in front of three replica ports, and the replicas all started at once.
async fn cluster(validity_s: Option<u64>, rotate: bool, va_sleep: bool) -> Cluster {
    let mta = FakeMta::start().await;
    let ports = free_ports(REPLICAS + 1);
    let (front, ports) = (ports[0], ports[1..].to_vec());
    let pebble = if va_sleep {
        Pebble::start_with_va_sleep(front)
    } else {
        Pebble::start_with_validity(front, validity_s)
    };
    // Health checks only where a replica dies (the kill test).
    let balancer = Balancer::start(front, &ports, va_sleep);
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("shared-store");
    let api_ca = work.path().join("api-ca.pem");
    std::fs::copy(&pebble.api_ca, &api_ca).unwrap();
    let yamls: Vec<String> = ports
        .iter()
        .map(|p| replica_yaml(mta.addr, *p, &pebble, &api_ca, &store, rotate))
        .collect();
    // The same instant: one thread per replica, each returns once its replica is ready.
    let replicas = std::thread::scope(|s| {
        let handles: Vec<_> = yamls
            .iter()
            .map(|y| s.spawn(move || spawn_proxy(y)))
            .collect();
        handles
            .into_iter()
            .map(|h| Some(h.join().unwrap()))
            .collect()
    });
    Cluster {
        pebble,
        store,
        replicas,
        ports,
        balancer,
        _work: work,
        _mta: mta,
    }
}

impl Cluster {
    /// Every replica's sessions, Pebble's validation lines and HAProxy's connection log: where
    /// the validation connections went, for a failure message.
    fn where_validations_went(&self) -> String {
        let sessions: Vec<String> = self
            .live()
            .flat_map(|(i, r)| {
                r.logs()
                    .into_iter()
                    .filter(|v| v["message"] == "session")
                    .map(move |v| format!("replica {i}: {v}"))
            })
            .collect();
        let pebble = self.pebble.log();
        let validations: Vec<&str> = pebble
            .lines()
            .filter(|l| l.contains("alidat") || l.contains("tls-alpn"))
            .collect();
        format!(
            "sessions:\n{}\nPebble:\n{}\nHAProxy (replica ports {:?}):\n{}",
            sessions.join("\n"),
            validations.join("\n"),
            self.ports,
            self.balancer.log()
        )
    }

    fn live(&self) -> impl Iterator<Item = (usize, &RunningProxy)> {
        self.replicas
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
    }

    /// Waits until every live replica serves a certificate from Pebble's root that is not
    /// `not`; returns the DER of the leaf, the same on all.
    async fn same_leaf(&self, not: Option<&[u8]>, within: Duration) -> Vec<u8> {
        let root = self.pebble.issuance_root().await;
        eventually(
            within,
            "every replica serves the same issued leaf",
            || async {
                let mut leaves = Vec::new();
                for (i, _) in self.live() {
                    let addr: SocketAddr = ([127, 0, 0, 1], self.ports[i]).into();
                    let tcp = tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    let tls = tls_handshake(tcp, verifying_client(root.clone()), Some(DOMAIN))
                        .await
                        .map_err(|e| format!("replica {i}: {e}"))?;
                    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0]
                        .as_ref()
                        .to_vec();
                    if Some(leaf.as_slice()) == not {
                        return Err(format!("replica {i} still serves the previous leaf"));
                    }
                    leaves.push(leaf);
                }
                leaves.dedup();
                match leaves.len() {
                    1 => Ok(leaves.pop().unwrap()),
                    n => Err(format!("{n} different leaves")),
                }
            },
        )
        .await
    }

    /// The sum over live replicas of `smtp_proxy_acme_events_total{event}`.
    async fn events(&self, event: &str) -> f64 {
        let mut sum = 0.0;
        for (_, r) in self.live() {
            let scrape = Scrape::get(r.metrics_addr()).await;
            sum += scrape.value("smtp_proxy_acme_events_total", &[("event", event)]);
        }
        sum
    }

    fn accounts(&self) -> usize {
        std::fs::read_dir(&self.store)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.starts_with("account-") && n.ends_with(".json")
            })
            .count()
    }

    /// Orders Pebble received (its "Added order" lines).
    fn pebble_orders(&self) -> usize {
        self.pebble.log().matches("Added order").count()
    }

    /// Seconds from the first replica serving a new certificate (`deployed` by the holder)
    /// to the last one loading it from the store: how long replicas serve different keys.
    fn spread_s(&self, nth: usize) -> f64 {
        let at = |v: &serde_json::Value| {
            humantime::parse_rfc3339_weak(v["timestamp"].as_str().unwrap().trim_end_matches('Z'))
                .unwrap()
        };
        let mut times = Vec::new();
        for (_, r) in self.live() {
            let line = r
                .logs()
                .into_iter()
                .filter(|v| {
                    v["message"] == "acme certificate deployed"
                        || v["message"] == "acme certificate loaded from the store"
                })
                .nth(nth - 1)
                .expect("each replica serves the new certificate");
            times.push(at(&line));
        }
        let first = times.iter().min().unwrap();
        let last = times.iter().max().unwrap();
        last.duration_since(*first).unwrap().as_secs_f64()
    }

    /// Pebble's count of accounts it created and of invalid authorizations.
    fn pebble_counts(&self) -> (usize, usize) {
        let log = self.pebble.log();
        let created = log
            .lines()
            .filter(|l| l.contains("There are now") && l.contains("accounts in memory"))
            .count();
        let invalid = log
            .lines()
            .filter(|l| l.contains("INVALID") || l.contains("Error validating"))
            .count();
        (created, invalid)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_behind_round_robin_obtain_one_certificate_and_renew_it_once() {
    // 20 s certificates: renewed at about 13 s, through the real schedule.
    let c = cluster(Some(20), false, false).await;
    let first = c.same_leaf(None, Duration::from_secs(60)).await;
    let ordered = c.events("ordered").await;
    assert_eq!(
        ordered,
        1.0,
        "one order across the three replicas\n{}",
        c.pebble.log()
    );
    assert_eq!(c.events("failed").await, 0.0, "{}", c.pebble.log());
    assert_eq!(c.accounts(), 1);
    let (accounts, invalid) = c.pebble_counts();
    assert_eq!(accounts, 1, "one account at Pebble:\n{}", c.pebble.log());
    assert_eq!(invalid, 0, "no failed validation:\n{}", c.pebble.log());
    assert_eq!(
        c.pebble_orders(),
        1,
        "one order at Pebble:\n{}",
        c.pebble.log()
    );
    let spread = c.spread_s(1);
    assert!(
        spread <= 5.0,
        "replicas served different certificates for {spread} s"
    );
    // Pebble's validators came through the balancer: more than one replica answered. A
    // session is logged when it ends, which for a validation connection still open when the
    // order completed may be a little later: waited for, bounded.
    eventually(
        Duration::from_secs(10),
        "validation sessions on two replicas or more",
        || async {
            let answered = c
                .live()
                .filter(|(_, r)| {
                    r.find_log(|v| v["message"] == "session" && v["outcome"] == "acme_challenge")
                        .is_some()
                })
                .count();
            if answered >= 2 {
                Ok(())
            } else {
                Err(format!(
                    "validation reached {answered} replica(s)\n{}",
                    c.where_validations_went()
                ))
            }
        },
    )
    .await;
    let tlsa = tlsa_of(&first);

    let second = c.same_leaf(Some(&first), Duration::from_secs(60)).await;
    assert_eq!(tlsa_of(&second), tlsa, "the renewal kept the key");
    assert_eq!(c.events("ordered").await, 2.0, "one order for the renewal");
    assert_eq!(c.events("failed").await, 0.0);
    assert_eq!(c.pebble_counts(), (1, 0));
    assert_eq!(c.pebble_orders(), 2, "one order for the renewal at Pebble");
    let spread = c.spread_s(2);
    assert!(
        spread <= 5.0,
        "replicas served different certificates for {spread} s"
    );
    eprintln!(
        "issuance spread {:.1} s, renewal spread {spread:.1} s",
        c.spread_s(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rotate_key_every_replica_announces_and_then_serves_the_same_next_key() {
    let c = cluster(Some(20), true, false).await;
    let first = c.same_leaf(None, Duration::from_secs(60)).await;
    // Every replica announces the same next key (read from the store).
    let mut announced = Vec::new();
    for (_, r) in c.live() {
        let line = r
            .wait_for_log(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("acme: next key"))
            })
            .await;
        announced.push(line["next_tlsa"].as_str().unwrap().to_owned());
    }
    announced.dedup();
    assert_eq!(announced.len(), 1, "{announced:?}");
    assert_ne!(tlsa_of(&first), announced[0]);
    let second = c.same_leaf(Some(&first), Duration::from_secs(60)).await;
    assert_eq!(
        tlsa_of(&second),
        announced[0],
        "the announced key is served"
    );
    assert_eq!(c.events("ordered").await, 2.0);
    assert_eq!(c.events("failed").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_killed_mid_order_is_taken_over_after_the_stale_bound() {
    // Pebble's validation sleeps (as real CAs take their time): the holder is mid-order
    // when its challenge file appears, and is SIGKILLed there.
    let mut c = cluster(None, false, true).await;
    let challenge = c.store.join(format!("challenge-{DOMAIN}.txt"));
    let lock = eventually(
        Duration::from_secs(30),
        "a replica writes its challenge",
        || async {
            if !challenge.exists() {
                return Err("no challenge file yet".to_owned());
            }
            let lock = std::fs::read_dir(&c.store)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("lock-")
                })
                .ok_or("no lock")?;
            std::fs::read_to_string(lock).map_err(|e| e.to_string())
        },
    )
    .await;
    // The token is host-pid-nanos-n.
    let pid: u32 = lock.split('-').rev().nth(2).unwrap().parse().unwrap();
    let killed = c
        .replicas
        .iter()
        .position(|r| r.as_ref().is_some_and(|r| r.pid() == pid))
        .expect("the holder is one of ours");
    let started = std::time::Instant::now();
    c.replicas[killed].as_ref().unwrap().signal("KILL");
    c.replicas[killed] = None;
    let leaf = c.same_leaf(None, Duration::from_secs(90)).await;
    let took = started.elapsed();
    let (holder, _) = c
        .live()
        .find(|(_, r)| {
            r.find_log(|v| v["message"] == "acme: took over a stale store lock")
                .is_some()
        })
        .expect("a survivor took the stale lock over");
    assert_ne!(holder, killed);
    eprintln!("took over and issued {took:?} after the kill");
    assert!(!leaf.is_empty());
    // Still one certificate: the killed holder never finalized.
    let issued = c.pebble.log().matches("Issued certificate serial").count();
    assert!(
        issued <= 1,
        "{issued} certificates issued:\n{}",
        c.pebble.log()
    );
    let files: Vec<String> = std::fs::read_dir(&c.store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().all(|f| !f.ends_with(".tmp")),
        "no torn or temporary file: {files:?}"
    );
}

/// Clears the immutable flag again, whatever happens (the temp dir must be removable).
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Self {
        let ok = Command::new("chattr").arg("+i").arg(dir).status().unwrap();
        assert!(ok.success(), "chattr +i {}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_store_is_a_named_error_and_the_cached_certificate_is_served() {
    // One replica obtains a 10 s certificate, then stops; the store is made immutable
    // (unwritable for root too); a new replica loads the cached certificate and, when the
    // renewal falls due, cannot take the lock: it logs the path, counts it, keeps serving.
    let mut c = cluster(Some(10), false, false).await;
    let leaf = c.same_leaf(None, Duration::from_secs(60)).await;
    for r in c.replicas.iter_mut().skip(1) {
        *r = None;
    }
    let yaml = std::fs::read_to_string(
        c.replicas[0]
            .as_ref()
            .unwrap()
            .dir
            .path()
            .join("proxy.yaml"),
    )
    .unwrap();
    c.replicas[0] = None;
    let _guard = Immutable::set(&c.store);
    let proxy = spawn_proxy(&yaml);
    c.replicas[0] = Some(proxy);
    let proxy = c.replicas[0].as_ref().unwrap();
    assert!(
        proxy
            .find_log(|v| v["message"] == "acme certificate loaded from cache")
            .is_some()
    );
    let error = proxy
        .wait_for_log(|v| {
            v["message"] == "acme: cannot write the store; the served certificate stays, retrying"
        })
        .await;
    let text = error["error"].as_str().unwrap();
    assert!(text.contains(&c.store.display().to_string()), "{text}");
    let scrape = Scrape::get(proxy.metrics_addr()).await;
    assert!(scrape.value("smtp_proxy_acme_events_total", &[("event", "store_error")]) >= 1.0);
    let served = c.same_leaf(None, Duration::from_secs(10)).await;
    assert_eq!(served, leaf, "the cached certificate is still served");
    assert!(
        proxy
            .find_log(|v| v["message"] == "acme: ordering a certificate"
                || v["message"] == "acme: renewing the certificate")
            .is_none(),
        "nothing ordered without the lock"
    );
}
