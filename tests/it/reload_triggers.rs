//! What makes the proxy reload (issue 18): reads never do (`cat`, `check`, a backup, the
//! reload's own reads), one SIGHUP is one reload, each real kind of change is one reload, a
//! burst is one or two; and a reload that changes no TLS setting keeps resumption working.
//! Real files, the real watcher, the real binary; the reload counter read from `/metrics`.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use rustls::pki_types::ServerName;

fn config(cert: &Path, key: &Path, extra_listener: &str) -> String {
    format!(
        "log: {{ format: json }}\nmetrics: {{ listen: \"127.0.0.1:0\" }}\nupstreams:\n  mta: {{ address: \"127.0.0.1:9\", connect_timeout: 1s }}\ncertificates:\n  - cert: {}\n    key: {}\nlisteners:\n  smtps:\n    listen: \"127.0.0.1:0\"\n    mode: implicit\n    hostname: mail.example.test\n    upstream: mta\n{extra_listener}",
        cert.display(),
        key.display()
    )
}

async fn reloads(proxy: &RunningProxy) -> f64 {
    Scrape::get(proxy.metrics_addr())
        .await
        .value("smtp_proxy_reloads_total", &[])
}

/// Counts reloads with a sentinel instead of a quiet period: after the `n`-th reload (plus
/// the earlier sentinels' own), a listener `sentinel<k>` is appended to the config. That
/// change must be the next reload; once its listener is bound, every reload the earlier
/// actions caused has happened, and the count must be exactly `n` + the sentinels.
struct Counter<'a> {
    proxy: &'a RunningProxy,
    config: &'a Path,
    sentinels: std::cell::Cell<usize>,
}

impl<'a> Counter<'a> {
    fn new(proxy: &'a RunningProxy, config: &'a Path) -> Self {
        Counter {
            proxy,
            config,
            sentinels: std::cell::Cell::new(0),
        }
    }

    /// Appends the next sentinel and waits until it is served; returns the reload count then.
    async fn sentinel(&self) -> usize {
        let k = self.sentinels.get();
        let text = std::fs::read_to_string(self.config).unwrap();
        // Written aside and renamed over: the proxy never reads a half-written sentinel.
        let aside = self.config.with_extension("sentinel");
        std::fs::write(
            &aside,
            format!(
                "{text}\n  sentinel{k}:\n    listen: \"127.0.0.1:0\"\n    mode: implicit\n    hostname: mail.example.test\n    upstream: mta\n"
            ),
        )
        .unwrap();
        std::fs::rename(&aside, self.config).unwrap();
        let name = format!("sentinel{k}");
        // The sentinel's listener is bound inside its reload, and `reloaded` is logged after
        // it: the sentinel's reload is the first `reloaded` after its `listening` line, and
        // the count is every `reloaded` up to and including that one.
        let count = eventually(IO_TIMEOUT, "the sentinel's reload", || async {
            let logs = self.proxy.logs();
            let bound = logs
                .iter()
                .position(|v| v["message"] == "listening" && v["listener"] == name.as_str())
                .ok_or_else(|| self.proxy.log_text())?;
            let done = bound
                + logs[bound..]
                    .iter()
                    .position(|v| v["message"] == "reloaded")
                    .ok_or_else(|| self.proxy.log_text())?;
            Ok::<_, String>(
                logs[..=done]
                    .iter()
                    .filter(|v| v["message"] == "reloaded")
                    .count(),
            )
        })
        .await;
        self.sentinels.set(k + 1);
        count
    }

    async fn exactly(&self, n: usize, what: &str) {
        let before = self.sentinels.get();
        if n + before > 0 {
            self.proxy.wait_reloaded(n + before).await;
        }
        let logged = self.sentinel().await;
        let expected = n + before + 1;
        assert_eq!(
            logged,
            expected,
            "{what}: reloads logged (with {} sentinel(s))\n{}",
            before + 1,
            self.proxy.log_text()
        );
        assert_eq!(
            reloads(self.proxy).await,
            expected as f64,
            "{what}: smtp_proxy_reloads_total"
        );
    }
}

struct Setup {
    pki: TestPki,
    cert: PathBuf,
    key: PathBuf,
    config: PathBuf,
    proxy: RunningProxy,
}

fn start(extra_listener: &str) -> Setup {
    let pki = TestPki::new();
    let live = pki.server_cert("live", &["mail.example.test"], false);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("proxy.yaml");
    std::fs::write(
        &config_path,
        config(&live.cert_path, &live.key_path, extra_listener),
    )
    .unwrap();
    let proxy = spawn_proxy_at(dir, &config_path, &[]);
    Setup {
        cert: live.cert_path.clone(),
        key: live.key_path,
        config: config_path,
        pki,
        proxy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_files_or_running_check_never_reloads() {
    let s = start("");
    assert_eq!(reloads(&s.proxy).await, 0.0);
    for f in [&s.config, &s.cert, &s.key] {
        let _ = std::fs::read(f).unwrap();
        // `cat`: open, read to the end, close.
        let out = std::process::Command::new("cat").arg(f).output().unwrap();
        assert!(out.status.success());
    }
    let (code, _, err) = run_check(&s.config, &[]);
    assert_eq!(code, 0, "{err}");
    let count = Counter::new(&s.proxy, &s.config);
    count.exactly(0, "after reads and check").await;
    // Control: the watcher is live, so the silence above means something.
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config).unwrap() + "# edit\n",
    )
    .unwrap();
    count.exactly(1, "after a real edit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sighup_is_exactly_one_reload() {
    let s = start("");
    let count = Counter::new(&s.proxy, &s.config);
    s.proxy.signal("HUP");
    count.exactly(1, "one SIGHUP").await;
    s.proxy.signal("HUP");
    count.exactly(2, "a second SIGHUP").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_change_is_exactly_one_reload() {
    let s = start("");
    let count = Counter::new(&s.proxy, &s.config);
    // Write in place (an editor without backup copies, `echo >>`).
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, format!("{text}# in place\n")).unwrap();
    count.exactly(1, "write in place").await;
    // Write-and-rename (certbot, vim, ansible).
    let next = s.pki.server_cert("next", &["mail.example.test"], false);
    std::fs::rename(&next.cert_path, &s.cert).unwrap();
    std::fs::rename(&next.key_path, &s.key).unwrap();
    count.exactly(2, "write-and-rename").await;
    // A permission change on the key (still readable: root).
    std::fs::set_permissions(&s.key, std::fs::Permissions::from_mode(0o640)).unwrap();
    count.exactly(3, "chmod of the key").await;
    let logs = s.proxy.logs();
    assert!(
        logs.iter()
            .all(|v| v["message"] != "reloaded" || v["cause"] == "file change")
    );
}

/// The Kubernetes atomic writer: `tls.crt -> ..data/tls.crt`, `..data -> ..<timestamp>`;
/// an update writes a new timestamped directory and renames `..data_tmp` over `..data`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_swap_is_exactly_one_reload_and_serves_the_new_certificate() {
    let pki = TestPki::new();
    let mount = tempfile::tempdir().unwrap();
    let m = mount.path();
    let write_version = |name: &str, issued: &Issued| {
        std::fs::create_dir(m.join(name)).unwrap();
        std::fs::copy(&issued.cert_path, m.join(name).join("tls.crt")).unwrap();
        std::fs::copy(&issued.key_path, m.join(name).join("tls.key")).unwrap();
    };
    let first = pki.server_cert("first", &["mail.example.test"], false);
    write_version("..2026_12_01_00_00_00.1", &first);
    std::os::unix::fs::symlink("..2026_12_01_00_00_00.1", m.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", m.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", m.join("tls.key")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("proxy.yaml");
    std::fs::write(
        &config_path,
        config(&m.join("tls.crt"), &m.join("tls.key"), ""),
    )
    .unwrap();
    let proxy = spawn_proxy_at(dir, &config_path, &[]);
    let served = || async {
        let (tls, _) = tls_client(
            "127.0.0.1",
            proxy.addr("smtps"),
            verifying_client(pki.server_ca_der()),
            Some("mail.example.test"),
        )
        .await;
        tls.get_ref().1.peer_certificates().unwrap()[0]
            .as_ref()
            .to_vec()
    };
    assert_eq!(served().await, first.chain[0].as_ref());

    let second = pki.server_cert("second", &["mail.example.test"], false);
    write_version("..2026_12_01_01_00_00.2", &second);
    std::os::unix::fs::symlink("..2026_12_01_01_00_00.2", m.join("..data_tmp")).unwrap();
    std::fs::rename(m.join("..data_tmp"), m.join("..data")).unwrap();
    std::fs::remove_dir_all(m.join("..2026_12_01_00_00_00.1")).unwrap();
    Counter::new(&proxy, &config_path)
        .exactly(1, "secret swap")
        .await;
    assert_eq!(served().await, second.chain[0].as_ref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_writes_in_a_burst_are_one_or_two_reloads() {
    let s = start("");
    let text = std::fs::read_to_string(&s.config).unwrap();
    for i in 0..50 {
        std::fs::write(&s.config, format!("{text}# burst {i}\n")).unwrap();
    }
    s.proxy.wait_reloaded(1).await;
    let with_sentinel = Counter::new(&s.proxy, &s.config).sentinel().await;
    let n = with_sentinel - 1;
    assert!((1..=2).contains(&n), "{n} reloads for a burst of 50 writes");
    assert_eq!(reloads(&s.proxy).await, with_sentinel as f64);
}

// ------------------------------------------------------------ TLS resumption across reloads

/// One connection with `client` (which remembers sessions); true when it resumed.
async fn resumed(addr: std::net::SocketAddr, client: &Arc<rustls::ClientConfig>) -> bool {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client.clone());
    let tls = connector
        .connect(ServerName::try_from("mail.example.test").unwrap(), tcp)
        .await
        .unwrap();
    let kind = tls.get_ref().1.handshake_kind();
    // Read what the server sends after the handshake (TLS 1.3 tickets come first), until
    // the proxy gives up on the unreachable upstream and closes.
    let mut tls = tls;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut sink),
    )
    .await;
    kind == Some(rustls::HandshakeKind::Resumed)
}

fn client(
    pki: &TestPki,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.server_ca_der()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_survives_a_sighup_that_changes_nothing_for_tls_1_2_and_1_3() {
    let s = start("");
    let addr = s.proxy.addr("smtps");
    let v12 = client(&s.pki, &rustls::version::TLS12);
    let v13 = client(&s.pki, &rustls::version::TLS13);
    for c in [&v12, &v13] {
        assert!(
            !resumed(addr, c).await,
            "first connection is a full handshake"
        );
        assert!(resumed(addr, c).await, "second connection resumes");
    }
    s.proxy.signal("HUP");
    s.proxy.wait_reloaded(1).await;
    assert!(
        resumed(addr, &v12).await,
        "TLS 1.2 session id kept across the reload"
    );
    assert!(
        resumed(addr, &v13).await,
        "TLS 1.3 ticket kept across the reload"
    );

    // Control: a reload that changes what resumption skips (client_cert) starts afresh.
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, format!("{text}    client_cert: request\n")).unwrap();
    s.proxy.wait_reloaded(2).await;
    assert!(
        !resumed(addr, &v12).await,
        "client_cert changed: no TLS 1.2 resumption"
    );
    assert!(
        !resumed(addr, &v13).await,
        "client_cert changed: no TLS 1.3 resumption"
    );
}

/// DANE: a reload that changes the key served for a name warns with the old and new TLSA
/// values and counts it; a renewal that keeps the key (new certificate, same key) does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_on_reload_is_warned_with_both_tlsa_values_and_a_kept_key_is_not() {
    let s = start("");
    let changes = || async {
        Scrape::get(s.proxy.metrics_addr()).await.value(
            "smtp_proxy_certificate_key_changes_total",
            &[("name", "mail.example.test")],
        )
    };
    let old = std::fs::read(&s.cert).unwrap();
    // Same key, new certificate: a DANE-safe renewal.
    let renewed = s
        .pki
        .renewed_server_cert("renewed", &["mail.example.test"], &s.key);
    std::fs::rename(&renewed.cert_path, &s.cert).unwrap();
    s.proxy.wait_reloaded(1).await;
    assert_ne!(
        std::fs::read(&s.cert).unwrap(),
        old,
        "the certificate did change"
    );
    assert_eq!(changes().await, 0.0);
    assert!(s.proxy.find_log(|v| v["old_tlsa"].is_string()).is_none());
    // A new key.
    let next = s.pki.server_cert("next", &["mail.example.test"], false);
    std::fs::rename(&next.key_path, &s.key).unwrap();
    std::fs::rename(&next.cert_path, &s.cert).unwrap();
    let warned = s
        .proxy
        .wait_for_log(|v| v["name"] == "mail.example.test" && v["new_tlsa"].is_string())
        .await;
    assert_eq!(warned["old_tlsa"], tlsa_of(renewed.chain[0].as_ref()));
    assert_eq!(warned["new_tlsa"], tlsa_of(next.chain[0].as_ref()));
    assert_eq!(changes().await, 1.0);
}
