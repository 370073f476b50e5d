//! ACME end to end against a private Pebble: issuance over tls-alpn-01 answered by the
//! proxy's implicit listener, the issued certificate served on implicit and STARTTLS
//! listeners, a restart served from the 0600 cache without Pebble, and the self-signed
//! placeholder while no certificate could be obtained.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::pebble::Pebble;
use common::*;

const DOMAIN: &str = "mail.example.test";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
    proxy
        .wait_for_nth_log(1, Duration::from_secs(60), |v| {
            v["message"] == "acme certificate deployed"
        })
        .await;
    let challenge = proxy
        .find_log(|v| v["message"] == "session" && v["outcome"] == "acme_challenge")
        .expect("Pebble validated through the proxy's implicit listener");
    assert_eq!(challenge["listener"], "smtps");
    let root = pebble.issuance_root().await;
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
