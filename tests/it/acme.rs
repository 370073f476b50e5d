//! ACME end to end against a private Pebble: issuance over tls-alpn-01 answered by the
//! proxy's implicit listener, the issued certificate served on implicit and STARTTLS
//! listeners, a restart served from the 0600 cache without Pebble, the self-signed
//! placeholder while no certificate could be obtained, and DANE-safe keys: a renewal keeps
//! the key by default, and with `rotate_key` uses the next key announced one renewal ahead
//! (by `check` and a log line). Renewals happen on the proxy's real schedule (two thirds of
//! the lifetime), made short by Pebble's `certificateValidityPeriod`.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::common::pebble::Pebble;
use crate::common::*;

const DOMAIN: &str = "mail.example.test";

fn config(mta: std::net::SocketAddr, tls_port: u16, acme: &str) -> String {
    format!(
        r#"log: {{ format: json }}
upstreams:
  mta: {{ address: "{mta}", connect_timeout: 2s }}
certificates:
  - acme:
{acme}
listeners:
  smtps: {{ listen: "127.0.0.1:{tls_port}", mode: implicit, hostname: {DOMAIN}, upstream: mta }}
  smtp: {{ listen: "127.0.0.1:0", mode: starttls, hostname: {DOMAIN}, upstream: mta }}
"#
    )
}

/// Upgrades a STARTTLS session on `addr` with `client` and returns the served leaf.
async fn starttls_leaf(addr: std::net::SocketAddr, client: rustls::ClientConfig) -> Vec<u8> {
    let mut smtp = Smtp::new(connect_from("127.0.0.1", addr).await);
    assert!(smtp.reply().await.unwrap().starts_with("220"));
    assert!(smtp.cmd("EHLO client.test").await.starts_with("250"));
    assert!(smtp.cmd("STARTTLS").await.starts_with("220"));
    let tls = tls_handshake(smtp.stream, client, Some(DOMAIN))
        .await
        .expect("the STARTTLS listener serves the issued certificate");
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

async fn implicit_leaf(addr: std::net::SocketAddr, client: rustls::ClientConfig) -> Vec<u8> {
    let (tls, _) = tls_client("127.0.0.1", addr, client, Some(DOMAIN)).await;
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_a_certificate_that_every_listener_serves_and_a_restart_reuses() {
    let mta = FakeMta::start().await;
    let tls_port = free_port();
    let pebble = Pebble::start(tls_port);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("acme-cache");
    // Kept beyond Pebble's life: the restarted proxy still names it.
    let api_ca = work.path().join("api-ca.pem");
    std::fs::copy(&pebble.api_ca, &api_ca).unwrap();
    let acme = format!(
        "      domains: [{DOMAIN}]\n      contact: [\"mailto:postmaster@example.test\"]\n      directory: \"{}\"\n      directory_ca: {}\n      cache: {}\n",
        pebble.directory_url(),
        api_ca.display(),
        cache.display()
    );
    let yaml = config(mta.addr, tls_port, &acme);
    let proxy = spawn_proxy(&yaml);
    let root = pebble.first_issuance(&proxy, "smtps").await;
    let issued = implicit_leaf(proxy.addr("smtps"), verifying_client(root.clone())).await;
    let over_starttls = starttls_leaf(proxy.addr("smtp"), verifying_client(root.clone())).await;
    assert_eq!(issued, over_starttls, "one certificate for both listeners");

    // The cache holds private keys: 0700 directory, 0600 files, nothing else.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cache), 0o700);
    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 2, "account and certificate: {files:?}");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
        assert!(!f.to_string_lossy().ends_with(".tmp"), "no temporary left");
    }

    // Restart without Pebble: the cached certificate is served before any network call.
    let mut proxy = proxy;
    proxy.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = proxy.wait_exit(Duration::from_secs(10));
        (s, proxy)
    })
    .await
    .unwrap();
    assert_eq!(status.0, Some(0));
    drop(status.1);
    drop(pebble);
    let restarted = spawn_proxy(&yaml);
    assert!(
        restarted
            .find_log(|v| v["message"] == "acme certificate loaded from cache")
            .is_some(),
        "loaded before ready"
    );
    assert_eq!(
        implicit_leaf(restarted.addr("smtps"), verifying_client(root.clone())).await,
        issued
    );
    assert!(
        restarted
            .find_log(|v| v["message"] == "acme: ordering a certificate")
            .is_none(),
        "nothing ordered on a restart with a cached certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_issuance_the_acme_names_get_a_self_signed_certificate_not_a_failed_handshake() {
    let mta = FakeMta::start().await;
    let work = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: every order fails.
    let acme = format!(
        "      domains: [{DOMAIN}]\n      directory: \"https://127.0.0.1:1/dir\"\n      cache: {}\n",
        work.path().join("cache").display()
    );
    let proxy = spawn_proxy(&config(mta.addr, 0, &acme));
    proxy
        .wait_for_log(|v| v["message"] == "acme: order failed; retrying with backoff")
        .await;
    for sni in [Some(DOMAIN), None] {
        let (tls, _) = tls_client(
            "127.0.0.1",
            proxy.addr("smtps"),
            inspecting_client(None),
            sni,
        )
        .await;
        assert_eq!(served_names(&tls), vec![DOMAIN.to_owned()]);
        let mut smtp = Smtp::new(tls);
        assert!(smtp.reply().await.unwrap().starts_with("220"));
    }
}

/// Pebble certificates valid this long: the proxy renews after two thirds of it.
const SHORT_VALIDITY_S: u64 = 9;

struct Renewing {
    pebble: Pebble,
    proxy: RunningProxy,
    config: std::path::PathBuf,
    root: rustls_pki_types::CertificateDer<'static>,
    _mta: FakeMta,
}

async fn renewing(rotate_key: bool) -> Renewing {
    let mta = FakeMta::start().await;
    let tls_port = free_port();
    let pebble = Pebble::start_with_validity(tls_port, Some(SHORT_VALIDITY_S));
    let work = tempfile::tempdir().unwrap();
    let acme = format!(
        "      domains: [{DOMAIN}]\n      directory: \"{}\"\n      directory_ca: {}\n      cache: {}\n{}",
        pebble.directory_url(),
        pebble.api_ca.display(),
        work.path().join("acme-cache").display(),
        // Unset by default: the same config runs on a build without the key (control).
        if rotate_key {
            "      rotate_key: true\n"
        } else {
            ""
        }
    );
    let path = work.path().join("proxy.yaml");
    std::fs::write(&path, config(mta.addr, tls_port, &acme)).unwrap();
    let proxy = spawn_proxy_at(work, &path, &[]);
    let root = pebble.issuance_root().await;
    Renewing {
        pebble,
        proxy,
        config: path,
        root,
        _mta: mta,
    }
}

impl Renewing {
    /// Waits for the `n`th deployed certificate; returns its leaf as served and the log line.
    async fn deployed(&self, n: usize) -> (Vec<u8>, serde_json::Value) {
        let line = self
            .proxy
            .wait_for_nth_log(n, Duration::from_secs(90), |v| {
                v["message"] == "acme certificate deployed"
            })
            .await;
        let leaf = implicit_leaf(
            self.proxy.addr("smtps"),
            verifying_client(self.root.clone()),
        )
        .await;
        (leaf, line)
    }

    fn check(&self) -> String {
        let (code, out, err) = run_check(&self.config, &[]);
        assert_eq!(code, 0, "{err}");
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_keeps_the_key_so_the_tlsa_record_stays_valid() {
    let r = renewing(false).await;
    let (first, _) = r.deployed(1).await;
    let (second, line) = r.deployed(2).await;
    assert_ne!(first, second, "a renewal happened: a new certificate");
    assert_eq!(tlsa_of(&first), tlsa_of(&second), "with the same key");
    assert_eq!(
        line["tlsa"],
        tlsa_of(&second),
        "the log names the served key"
    );
    let check = r.check();
    assert!(check.contains("key kept across renewals"), "{check}");
    assert!(
        check.contains(&format!("TLSA {}", tlsa_of(&second))),
        "{check}"
    );
    assert!(
        r.proxy.find_log(|v| v["new_tlsa"].is_string()).is_none(),
        "no key-change warning"
    );
    assert!(r.proxy.find_log(|v| v["next_tlsa"].is_string()).is_none());
    drop(r.pebble);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_key_renews_with_the_next_key_announced_one_renewal_ahead() {
    let r = renewing(true).await;
    let (first, _) = r.deployed(1).await;
    // Announced by the lock holder's next pass after the first issuance, which may come
    // after the deployment is logged: waited for, and it must precede the second renewal.
    let announced = r.proxy.wait_for_log(|v| v["next_tlsa"].is_string()).await["next_tlsa"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(
        announced,
        tlsa_of(&first),
        "the next key is not the current one"
    );
    let check = r.check();
    assert!(
        check.contains(&format!("publish TLSA {announced} before it")),
        "check prints the next key: {check}"
    );
    let (second, line) = r.deployed(2).await;
    assert_eq!(
        tlsa_of(&second),
        announced,
        "the renewal used the announced key"
    );
    assert_eq!(line["tlsa"], announced);
    let warned = r
        .proxy
        .wait_for_log(|v| v["name"] == DOMAIN && v["new_tlsa"].is_string())
        .await;
    assert_eq!(warned["old_tlsa"], tlsa_of(&first));
    assert_eq!(warned["new_tlsa"], announced);
    assert_eq!(warned["cause"], "renewal");
    // And the one after is announced now, different from both.
    let next = r
        .proxy
        .wait_for_nth_log(2, Duration::from_secs(5), |v| v["next_tlsa"].is_string())
        .await;
    assert_ne!(next["next_tlsa"], announced);
    assert_ne!(next["next_tlsa"], tlsa_of(&first));
    drop(r.pebble);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_cached_certificate_is_warned_about_in_the_log() {
    // The warning is found while the snapshot is built, before logging is set up; it must
    // still reach the log (issue 26).
    let mta = FakeMta::start().await;
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("acme");
    std::fs::create_dir(&cache).unwrap();
    let directory = "https://127.0.0.1:9/dir";
    // The store's file name: cert-<first 12 bytes of SHA-256(domains \0 directory), hex>.
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{DOMAIN}\0{directory}").as_bytes(),
    );
    let h = hex(&digest.as_ref()[..12]);
    std::fs::write(cache.join(format!("cert-{h}.pem")), b"not a certificate").unwrap();
    let acme = format!(
        "      domains: [{DOMAIN}]\n      directory: \"{directory}\"\n      cache: {}\n",
        cache.display()
    );
    let proxy = spawn_proxy(&config(mta.addr, free_port(), &acme));
    let line = proxy
        .wait_for_log(|v| {
            v["message"] == "acme store holds an unusable certificate; ordering a new one"
        })
        .await;
    assert!(
        line["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{line}"
    );
}
