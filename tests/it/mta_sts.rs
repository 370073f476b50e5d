//! Issue 27: the proxy as the mail domain's MTA-STS policy host (RFC 8461) on its own
//! certificates. A real MTA-STS client (postfix-mta-sts-resolver's `mta-sts-query`) with a
//! private DNS server in a network namespace; Pebble issuing `mta-sts.<domain>` with the
//! mail name; hostile HTTP refused within bounds; the config errors.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::pebble::{self, Pebble};
use crate::common::*;

const MAIL: &str = "mail.example.org";
const STS_HOST: &str = "mta-sts.example.org";

/// Sends `request` over TLS (SNI `sni`) and reads until the server closes.
async fn https_raw(
    addr: SocketAddr,
    client: rustls::ClientConfig,
    sni: &str,
    request: &[u8],
) -> String {
    let (mut tls, _) = tls_client("127.0.0.1", addr, with_alpn(client), Some(sni)).await;
    tls.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(IO_TIMEOUT, tls.read_to_end(&mut raw)).await;
    String::from_utf8_lossy(&raw).into_owned()
}

fn with_alpn(mut c: rustls::ClientConfig) -> rustls::ClientConfig {
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c
}

fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n\r\n").into_bytes()
}

fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Against Pebble: one `acme` entry naming only the mail host gets a certificate that also
/// covers `mta-sts.<domain>` (added because the domain has a policy), Pebble validates it
/// through the `https` listener, and the policy is served with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_certifies_mta_sts_with_the_mail_name_and_the_policy_is_served_with_it() {
    let mta = FakeMta::start().await;
    let https_port = free_port();
    let pebble = Pebble::start(https_port);
    let work = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"log: {{ format: json }}
metrics: {{ listen: "127.0.0.1:0" }}
upstreams:
  mta: {{ address: "{mta}", connect_timeout: 2s }}
certificates:
  - acme:
      domains: [{MAIL}]
      contact: ["mailto:postmaster@example.org"]
      directory: "{dir}"
      directory_ca: {ca}
      cache: {cache}
listeners:
  smtp: {{ listen: "127.0.0.1:0", mode: starttls, hostname: {MAIL}, upstream: mta }}
  https: {{ listen: "127.0.0.1:{https_port}", mode: https, hostname: {MAIL} }}
mta_sts:
  report_to: "mailto:tlsrpt@example.org"
  domains:
    example.org: {{ mode: enforce, mx: [{MAIL}], max_age: 1d }}
"#,
        mta = mta.addr,
        dir = pebble.directory_url(),
        ca = pebble.api_ca.display(),
        cache = work.path().join("acme").display(),
    );
    let proxy = spawn_proxy(&yaml);
    let root = pebble.first_issuance(&proxy, "https").await;
    let response = https_raw(
        proxy.addr("https"),
        verifying_client(root.clone()),
        STS_HOST,
        &get(STS_HOST, "/.well-known/mta-sts.txt"),
    )
    .await;
    assert_eq!(status(&response), 200, "{response}");
    assert_eq!(
        body(&response),
        format!("version: STSv1\r\nmode: enforce\r\nmx: {MAIL}\r\nmax_age: 86400\r\n")
    );
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("content-type: text/plain"), "{response}");
    assert!(lower.contains("cache-control: max-age="), "{response}");
    // The certificate that verified for mta-sts.example.org is the one issued for the mail
    // name (one order, both names).
    let (tls, _) = tls_client(
        "127.0.0.1",
        proxy.addr("https"),
        with_alpn(verifying_client(root)),
        Some(STS_HOST),
    )
    .await;
    let names = served_names(&tls);
    assert!(
        names.contains(&MAIL.to_owned()) && names.contains(&STS_HOST.to_owned()),
        "{names:?}"
    );
    let line = proxy
        .wait_for_log(|v| v["message"] == "session" && v["outcome"] == "mta_sts")
        .await;
    assert_eq!(line["reason"], "example.org 200", "{line}");
    assert_eq!(line["transport"], "https", "{line}");
    let metrics = proxy_metrics_text(&proxy).await;
    assert!(
        metrics.contains(
            r#"smtp_proxy_mta_sts_requests_total{domain="example.org",result="served"} 1"#
        ),
        "{metrics}"
    );
    drop(pebble);
}

async fn proxy_metrics_text(proxy: &RunningProxy) -> String {
    http_get(proxy.metrics_addr(), "/metrics").await.1
}

/// A test PKI: a CA and a leaf for the policy host (and the mail host).
struct Pki {
    ca_pem: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path, tag: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("mta-sts test CA {tag}"));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![STS_HOST.to_owned(), MAIL.to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let p = |n: &str| dir.join(format!("{tag}-{n}"));
    std::fs::write(p("ca.pem"), ca.pem()).unwrap();
    std::fs::write(p("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(p("key.pem"), key.serialize_pem()).unwrap();
    Pki {
        ca_pem: p("ca.pem"),
        cert: p("cert.pem"),
        key: p("key.pem"),
    }
}

/// A network namespace of the test's own, removed on drop: its loopback carries the
/// private DNS server (port 53), the proxy's https listener (port 443) and the client, and
/// `ip netns exec` gives the client the namespace's resolv.conf and hosts.
struct Netns {
    name: String,
    etc: PathBuf,
    children: Vec<Child>,
}

impl Netns {
    fn new() -> Self {
        let name = format!("stp-mtasts-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add (needs root)");
        let up = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(up.success());
        let etc = PathBuf::from("/etc/netns").join(&name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1 localhost\n127.0.0.1 {STS_HOST} {MAIL}\n"),
        )
        .unwrap();
        Self {
            name,
            etc,
            children: Vec::new(),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn spawn(&mut self, program: &str, args: &[&str]) {
        let child = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Runs `program` in the namespace to its end: (success, stdout + stderr).
    fn run(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
        let mut c = self.command(program);
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Sets the `_mta-sts` TXT record on the namespace's DNS server (challtestsrv).
    fn set_txt(&self, value: &str) {
        let body = format!(r#"{{"host":"_mta-sts.example.org.","value":"{value}"}}"#);
        for path in ["clear-txt", "set-txt"] {
            let (ok, out) = self.run(
                "curl",
                &["-sf", "-d", &body, &format!("http://127.0.0.1:8055/{path}")],
                &[],
            );
            assert!(ok, "challtestsrv {path}: {out}");
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

/// Where `.ci/interop` installs postfix-mta-sts-resolver (pinned, hashes checked).
fn mta_sts_query() -> PathBuf {
    interop::tools_dir().join("mta-sts-venv/bin/mta-sts-query")
}

/// The id `check` prints for example.org.
fn checked_id(config: &Path) -> String {
    let (code, out, err) = run_check(config, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains("_mta-sts.example.org. TXT"))
        .unwrap_or_else(|| panic!("no _mta-sts record in check:\n{out}"));
    line.split("id=")
        .nth(1)
        .and_then(|s| s.strip_suffix('"'))
        .unwrap()
        .to_owned()
}

/// The policy host for the real client: on port 443 of its namespace, two MX patterns.
fn sts_config(pki: &Pki, mode: &str) -> String {
    sts_yaml(
        pki,
        "127.0.0.1:443",
        "",
        &format!(r#"mode: {mode}, mx: [{MAIL}, "*.mx.example.org"]"#),
    )
}

/// A mail listener, an `https` listener on `https_listen` (with `https_extra` settings), and
/// one policy for example.org (`policy`: its settings).
fn sts_yaml(pki: &Pki, https_listen: &str, https_extra: &str, policy: &str) -> String {
    format!(
        r#"log: {{ format: json }}
metrics: {{ listen: "127.0.0.1:0" }}
upstreams:
  mta: {{ address: "127.0.0.1:9", connect_timeout: 1s }}
certificates:
  - {{ cert: {cert}, key: {key} }}
listeners:
  smtp: {{ listen: "127.0.0.1:0", mode: starttls, hostname: {MAIL}, upstream: mta }}
  https: {{ listen: "{https_listen}", mode: https, hostname: {STS_HOST}{https_extra} }}
mta_sts:
  domains:
    example.org: {{ {policy} }}
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
    )
}

/// The real client: DNS TXT lookup of `_mta-sts.example.org` on a private DNS server,
/// HTTPS fetch of the policy from the proxy, parse and validation — and it refuses the
/// policy when the certificate does not chain to what it trusts. After a reload with a
/// changed policy, `check` prints a new id, and the client (given the old id) fetches the
/// new policy once DNS publishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_mta_sts_client_accepts_the_policy_refuses_a_wrong_certificate_and_follows_a_reload()
{
    let query = mta_sts_query();
    assert!(
        query.exists(),
        "run .ci/interop first ({} missing)",
        query.display()
    );
    let work = tempfile::tempdir().unwrap();
    let trusted = pki(work.path(), "trusted");
    let other = pki(work.path(), "other");
    let config = work.path().join("proxy.yaml");
    std::fs::write(&config, sts_config(&trusted, "enforce")).unwrap();
    let id = checked_id(&config);

    let mut ns = Netns::new();
    let args = pebble::challtestsrv_args("127.0.0.1:53", "127.0.0.1:8055");
    ns.spawn(
        pebble::CHALLTESTSRV,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let proxy_cmd = {
        let mut c = ns.command(&binary());
        c.arg("--config").arg(&config);
        c
    };
    let proxy = spawn_proxy_command(tempfile::tempdir().unwrap(), proxy_cmd);
    eventually(IO_TIMEOUT, "challtestsrv answers", || async {
        // Any HTTP status means it listens (000: nothing yet).
        let (_, code) = ns.run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:8055/",
            ],
            &[],
        );
        if code.trim() != "000" {
            Ok(())
        } else {
            Err(code)
        }
    })
    .await;
    ns.set_txt(&format!("v=STSv1; id={id}"));

    let venv_env = |ca: &Path| vec![("SSL_CERT_FILE", ca.to_str().unwrap().to_owned())];
    let run_query = |ca: &Path, known: Option<&str>| {
        let env = venv_env(ca);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut args = vec!["example.org"];
        args.extend(known);
        ns.run(query.to_str().unwrap(), &args, &env)
    };

    let (ok, out) = run_query(&trusted.ca_pem, None);
    assert!(ok, "{out}");
    assert!(
        out.contains("STSFetchResult.VALID"),
        "the client accepts the policy: {out}"
    );
    assert!(out.contains(&id), "with the id from DNS: {out}");
    assert!(out.contains("'mode': 'enforce'"), "{out}");
    assert!(
        out.contains("mail.example.org") && out.contains("*.mx.example.org"),
        "{out}"
    );

    // A client that trusts another CA refuses what the proxy serves.
    let (_, out) = run_query(&other.ca_pem, None);
    assert!(
        out.contains("STSFetchResult.FETCH_ERROR"),
        "a wrong certificate is refused: {out}"
    );

    // A changed policy: reload, new id from check, DNS updated; the client that knew the
    // old id fetches the new policy.
    std::fs::write(&config, sts_config(&trusted, "testing")).unwrap();
    let new_id = checked_id(&config);
    assert_ne!(new_id, id, "the id follows the policy text");
    proxy.signal("HUP");
    proxy.wait_for_log(|v| v["message"] == "reloaded").await;
    ns.set_txt(&format!("v=STSv1; id={new_id}"));
    let (_, unchanged) = run_query(&trusted.ca_pem, Some(&new_id));
    assert!(
        unchanged.contains("STSFetchResult.NOT_CHANGED"),
        "{unchanged}"
    );
    let (ok, out) = run_query(&trusted.ca_pem, Some(&id));
    assert!(ok, "{out}");
    assert!(
        out.contains("STSFetchResult.VALID") && out.contains(&new_id),
        "{out}"
    );
    assert!(
        out.contains("'mode': 'testing'"),
        "the reloaded policy is served: {out}"
    );
    drop(proxy);
    drop(ns);
}

/// The policy host on a free port, one MX, `limits` on the https listener.
fn local_config(pki: &Pki, limits: &str) -> String {
    sts_yaml(
        pki,
        "127.0.0.1:0",
        limits,
        &format!("mode: enforce, mx: [{MAIL}]"),
    )
}

/// Every other path 404, every other method 405, another host 421; an oversized request
/// head and a slow one are cut within their bounds, and the proxy keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_requests_and_hostile_http_get_their_status_within_bounds() {
    let work = tempfile::tempdir().unwrap();
    let pki = pki(work.path(), "t");
    let ca = std::fs::read(&pki.ca_pem).unwrap();
    let root = rustls_pki_types::CertificateDer::from(rustls_pemfile_first(&ca));
    let proxy = spawn_proxy(&local_config(
        &pki,
        // idle_timeout far above the 5 s bound below: only command_timeout can cut the
        // slow request in time.
        ", limits: { command_timeout: 1s, idle_timeout: 30s }",
    ));
    let addr = proxy.addr("https");
    let client = || verifying_client(root.clone());
    let path = "/.well-known/mta-sts.txt";
    assert_eq!(
        status(&https_raw(addr, client(), STS_HOST, &get(STS_HOST, path)).await),
        200
    );
    assert_eq!(
        status(&https_raw(addr, client(), STS_HOST, &get(STS_HOST, "/")).await),
        404
    );
    let post = format!("POST {path} HTTP/1.1\r\nHost: {STS_HOST}\r\nContent-Length: 0\r\n\r\n");
    let r = https_raw(addr, client(), STS_HOST, post.as_bytes()).await;
    assert_eq!(status(&r), 405, "{r}");
    assert!(r.to_ascii_lowercase().contains("allow: get, head"), "{r}");
    let r = https_raw(addr, client(), STS_HOST, &get("www.example.org", path)).await;
    assert_eq!(status(&r), 421, "{r}");

    // 64 KiB of headers: refused (431) or cut, never buffered whole.
    let mut big = format!("GET {path} HTTP/1.1\r\nHost: {STS_HOST}\r\n");
    for i in 0..2000 {
        big.push_str(&format!("X-Pad-{i}: {}\r\n", "a".repeat(24)));
    }
    big.push_str("\r\n");
    let r = https_raw(addr, client(), STS_HOST, big.as_bytes()).await;
    assert!(
        r.is_empty() || status(&r) == 431 || status(&r) == 400,
        "{r}"
    );

    // A request head that never ends is cut at command_timeout (1 s), well before the
    // client would give up.
    let (mut tls, _) = tls_client("127.0.0.1", addr, with_alpn(client()), Some(STS_HOST)).await;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {STS_HOST}\r\n").as_bytes())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the slow request was cut after {:?}",
        started.elapsed()
    );
    // Still serving.
    assert_eq!(
        status(&https_raw(addr, client(), STS_HOST, &get(STS_HOST, path)).await),
        200
    );
    let metrics = proxy_metrics_text(&proxy).await;
    for (result, n) in [("served", 2), ("not_found", 1), ("method_not_allowed", 1)] {
        let want = format!(
            r#"smtp_proxy_mta_sts_requests_total{{domain="example.org",result="{result}"}} {n}"#
        );
        assert!(metrics.contains(&want), "{want}\n{metrics}");
    }
    assert!(
        metrics.contains(r#"smtp_proxy_mta_sts_requests_total{domain="",result="misdirected"} 1"#),
        "{metrics}"
    );
}

fn rustls_pemfile_first(pem: &[u8]) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem)
        .unwrap()
        .to_vec()
}

/// Bad `mta_sts` settings name the file, the key and the reason; `check` prints the
/// records to publish.
#[test]
fn bad_policies_are_config_errors_and_check_prints_the_records() {
    let work = tempfile::tempdir().unwrap();
    let pki = pki(work.path(), "c");
    let base = local_config(&pki, "");
    let cases = [
        (
            "mx: [\"*.*.example.org\"]",
            "mta_sts.domains.example.org.mx[0]",
        ),
        (
            "mx: [mail.example.org], max_age: 400d",
            "mta_sts.domains.example.org.max_age",
        ),
        ("mx: []", "mta_sts.domains.example.org.mx"),
    ];
    for (domain_settings, key) in cases {
        let yaml = base.replace(
            "mode: enforce, mx: [mail.example.org]",
            &format!("mode: enforce, {domain_settings}"),
        );
        let config = work.path().join("bad.yaml");
        std::fs::write(&config, &yaml).unwrap();
        let (code, out, err) = run_check(&config, &[]);
        assert_eq!(code, 2, "{domain_settings}: {out}{err}");
        assert!(
            err.contains(config.to_str().unwrap()) && err.contains(key),
            "{domain_settings}: {err}"
        );
    }
    // A policy domain no certificate covers.
    let yaml = base.replace("example.org: {", "example.net: {");
    let config = work.path().join("nocert.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let (code, _, err) = run_check(&config, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("mta_sts.domains.example.net") && err.contains("mta-sts.example.net"),
        "{err}"
    );
    // The records to publish.
    let yaml = base.replace(
        "mta_sts:\n",
        "mta_sts:\n  report_to: \"mailto:tlsrpt@example.org\"\n",
    );
    let config = work.path().join("good.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let (code, out, err) = run_check(&config, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("_mta-sts.example.org. TXT \"v=STSv1; id="),
        "{out}"
    );
    assert!(
        out.contains("_smtp._tls.example.org. TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@example.org\""),
        "{out}"
    );
}
