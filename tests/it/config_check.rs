//! `smtp-tls-proxy check` as a binary: exit codes and `file: key.path: reason` messages.

// Test helpers outside #[test] fns may unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use crate::common::*;

use crate::common::run_check as check;

#[test]
fn the_shipped_proxy_yaml_is_valid() {
    let (code, out, err) = check(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("proxy.yaml")
            .as_path(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("listener submissions: 127.0.0.1:4650 implicit TLS"),
        "{out}"
    );
    assert!(
        out.contains("certificate 0: self-signed: names localhost"),
        "{out}"
    );
}

#[test]
fn valid_fixtures_pass_and_print_names_and_expiry() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/valid");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let (code, out, err) = check(&path, &[]);
        assert_eq!(code, 0, "{}: {err}", path.display());
        assert!(out.contains("expires"), "{out}");
    }
}

#[test]
fn each_invalid_fixture_exits_2_with_its_message() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/invalid");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let expected = std::fs::read_to_string(path.with_extension("expected"))
            .unwrap()
            .trim_end_matches('\n')
            .replace("{file}", &path.display().to_string());
        let (code, _, err) = check(&path, &[]);
        assert_eq!(code, 2, "{}: {err}", path.display());
        assert!(
            err.starts_with(&expected),
            "{}:\n want prefix {expected}\n got {err}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 8, "fixtures found: {seen}");
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_named() {
    let pki = TestPki::new();
    let a = pki.server_cert("a", &["localhost"], false);
    let b = pki.server_cert("b", &["localhost"], false);
    let config = pki.path("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  mta: {{ address: \"127.0.0.1:10025\" }}\ncertificates:\n  - cert: {}\n    key: {}\nlisteners:\n  smtps: {{ listen: \"127.0.0.1:4650\", mode: implicit, hostname: localhost, upstream: mta }}\n",
            a.cert_path.display(),
            b.key_path.display()
        ),
    )
    .unwrap();
    let (code, _, err) = check(&config, &[]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with(&format!(
            "{}: certificates.0.key: the key in",
            config.display()
        )),
        "{err}"
    );
    assert!(err.contains("does not match the certificate"), "{err}");
}

#[test]
fn a_missing_config_file_is_named() {
    let (code, _, err) = check(Path::new("/nonexistent/proxy.yaml"), &[]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("/nonexistent/proxy.yaml: cannot read"),
        "{err}"
    );
}

#[test]
fn environment_overrides_nested_keys_and_bad_values_name_the_variable() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml");
    let (code, out, err) = check(
        &shipped,
        &[("SMTP_TLS_PROXY_UPSTREAMS__MTA__ADDRESS", "10.0.0.5:10025")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("upstream mta: 10.0.0.5:10025"), "{out}");

    let (code, _, err) = check(
        &shipped,
        &[("SMTP_TLS_PROXY_UPSTREAMS__MTA__CONNECT_TIMEOUT", "soon")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("upstreams.mta.connect_timeout"), "{err}");
    assert!(
        err.contains("SMTP_TLS_PROXY_UPSTREAMS__MTA__CONNECT_TIMEOUT"),
        "{err}"
    );
}

#[test]
fn risky_settings_are_valid_but_warned_about_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        r#"
upstreams:
  v1: { address: "127.0.0.1:10025", proxy_protocol: v1 }
  hidden: { address: "127.0.0.1:10026", proxy_protocol: none, allow_hidden_client_address: true }
certificates:
  - self_signed: [mx.example.test]
listeners:
  mx:
    listen: "0.0.0.0:25"
    mode: starttls
    require_starttls: true
    hostname: mx.example.test
    upstream: v1
    client_cert: request
  internal:
    listen: "127.0.0.1:0"
    mode: implicit
    hostname: mx.example.test
    upstream: hidden
"#,
    )
    .unwrap();
    let (code, out, err) = check(&config, &[]);
    assert_eq!(code, 0, "{err}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 3, "{out}");
    assert!(
        out.contains("warning: listeners.mx.require_starttls: port 25"),
        "{out}"
    );
    assert!(
        out.contains("warning: listeners.mx.client_cert: upstream v1 uses proxy_protocol: v1"),
        "{out}"
    );
    assert!(
        out.contains("warning: upstreams.hidden.proxy_protocol: none"),
        "{out}"
    );

    // The shipped config earns none.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml");
    let (_, out, _) = check(&shipped, &[]);
    assert!(!out.contains("warning:"), "{out}");
}

/// What Kubernetes injects into every pod of a namespace with a Service named
/// `smtp-tls-proxy` (its ports 25, 465, 587 named smtp, submissions, submission).
const KUBERNETES_SERVICE_ENV: &[(&str, &str)] = &[
    ("SMTP_TLS_PROXY_SERVICE_HOST", "10.96.0.17"),
    ("SMTP_TLS_PROXY_SERVICE_PORT", "25"),
    ("SMTP_TLS_PROXY_SERVICE_PORT_SMTP", "25"),
    ("SMTP_TLS_PROXY_SERVICE_PORT_SUBMISSIONS", "465"),
    ("SMTP_TLS_PROXY_PORT", "tcp://10.96.0.17:25"),
    ("SMTP_TLS_PROXY_PORT_25_TCP", "tcp://10.96.0.17:25"),
    ("SMTP_TLS_PROXY_PORT_25_TCP_PROTO", "tcp"),
    ("SMTP_TLS_PROXY_PORT_25_TCP_PORT", "25"),
    ("SMTP_TLS_PROXY_PORT_25_TCP_ADDR", "10.96.0.17"),
    ("SMTP_TLS_PROXY_PORT_587_TCP_ADDR", "10.96.0.17"),
];

#[test]
fn kubernetes_service_variables_are_ignored_but_a_misspelt_override_still_fails() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.yaml");
    let (code, _, err) = check(&shipped, KUBERNETES_SERVICE_ENV);
    assert_eq!(code, 0, "{err}");
    let mut env = KUBERNETES_SERVICE_ENV.to_vec();
    env.push(("SMTP_TLS_PROXY_UPSTREAM__MTA__ADDRESS", "10.0.0.5:10025"));
    let (code, _, err) = check(&shipped, &env);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("upstream"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_starts_with_kubernetes_service_variables_and_names_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        "log: { format: json }\nupstreams:\n  mta: { address: \"127.0.0.1:9\" }\ncertificates:\n  - self_signed: [localhost]\nlisteners:\n  smtp: { listen: \"127.0.0.1:0\", mode: starttls, hostname: localhost, upstream: mta }\n",
    )
    .unwrap();
    let proxy = spawn_proxy_at(dir, &config, KUBERNETES_SERVICE_ENV);
    let line = proxy
        .wait_for_log(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ignoring the variables Kubernetes"))
        })
        .await;
    assert!(
        line["variables"]
            .as_str()
            .unwrap()
            .contains("SMTP_TLS_PROXY_PORT_25_TCP_ADDR"),
        "{line}"
    );
}

/// DANE (RFC 7672): `check` prints the `3 1 1` TLSA value of every certificate it would
/// serve; the expected digest is computed independently with openssl.
#[test]
fn check_prints_the_tlsa_3_1_1_value_of_each_certificate() {
    let pki = TestPki::new();
    let ecdsa = pki.server_cert("ecdsa", &["mx.example.test"], false);
    let rsa = pki.server_cert("rsa", &["mx.example.test"], true);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  mta: {{ address: \"127.0.0.1:10025\" }}\ncertificates:\n{}{}listeners:\n  smtp: {{ listen: \"127.0.0.1:0\", mode: starttls, hostname: mx.example.test, upstream: mta }}\n",
            cert_entry(&ecdsa),
            cert_entry(&rsa)
        ),
    )
    .unwrap();
    let (code, out, err) = check(&config, &[]);
    assert_eq!(code, 0, "{err}");
    for (index, issued) in [(0, &ecdsa), (1, &rsa)] {
        let script = format!(
            "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum",
            issued.cert_path.display()
        );
        let digest = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let hex = String::from_utf8(digest.stdout).unwrap();
        let hex = hex.split_whitespace().next().unwrap();
        assert_eq!(hex.len(), 64);
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("certificate {index}:")))
            .unwrap();
        assert!(
            line.ends_with(&format!("TLSA 3 1 1 {hex}")),
            "{line}\nwant {hex}"
        );
    }
}

/// `check` prints the abuse-control settings it will apply.
#[test]
fn check_prints_the_edge_settings_and_the_deny_file() {
    let dir = tempfile::tempdir().unwrap();
    let deny = dir.path().join("denied");
    std::fs::write(&deny, "192.0.2.0/24\nbogus\n").unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "deny_file: {}\nupstreams:\n  mta: {{ address: \"127.0.0.1:10025\" }}\ncertificates:\n  - self_signed: [mx.example.test]\nlisteners:\n  smtp: {{ listen: \"127.0.0.1:0\", mode: starttls, hostname: mx.example.test, upstream: mta, allow: [\"10.0.0.0/8\"], deny: [\"10.9.0.0/16\"], limits: {{ per_ip_rate: \"30/1m\" }} }}\n",
            deny.display()
        ),
    )
    .unwrap();
    let (code, out, err) = check(&config, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("  edge: allow 10.0.0.0/8; deny 10.9.0.0/16; per_ip_rate 30/1m"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "deny_file {}: 1 ranges, 1 bad lines skipped",
            deny.display()
        )),
        "{out}"
    );
}
