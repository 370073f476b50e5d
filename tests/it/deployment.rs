//! The deployment examples in `containers/` say what the test suite proves: their proxy
//! configs load, their Postfix is configured from the same `proxy-port.cf` the tests'
//! Postfix instances use (applied here by the real entrypoint and `postconf`), and the
//! Kubernetes sidecar trusts PROXY from its balancer. Schema checks of the same files run
//! in `.ci/run` (tools from PyPI/Debian); this file needs only Postfix.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn yaml_docs(p: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo(p)).unwrap();
    serde_saphyr::from_multiple(&text).unwrap()
}

/// Loads a proxy config through the proxy's own loader (keys, references, limits).
fn loads(text: &str) -> smtp_tls_proxy::config::Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, text).unwrap();
    smtp_tls_proxy::config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_compose_example_loads_and_builds_postfix_from_proxy_port_cf() {
    let compose = &yaml_docs("containers/compose.yaml")[0];
    let services = &compose["services"];
    assert_eq!(services["postfix"]["build"]["context"], "postfix");
    assert_eq!(services["postfix"]["environment"]["PROXY_PORT"], "10025");
    // Only the proxy reaches Postfix's PROXY port: it is exposed, never published.
    assert!(services["postfix"].get("ports").is_none());
    let cap_add = services["proxy"]["cap_add"].as_array().unwrap();
    assert_eq!(cap_add, &[Value::from("NET_BIND_SERVICE")]);
    let containerfile = std::fs::read_to_string(repo("containers/postfix/Containerfile")).unwrap();
    assert!(containerfile.contains("COPY proxy-port.cf /etc/postfix/proxy-port.cf"));

    let config = loads(&std::fs::read_to_string(repo("containers/compose-proxy.yaml")).unwrap());
    let mta = &config.upstreams["mta"];
    assert_eq!(mta.address, "postfix:10025");
}

#[test]
fn the_kubernetes_sidecar_trusts_its_balancer_and_reaches_postfix_on_loopback() {
    let docs = yaml_docs("containers/kubernetes/smtp-tls-proxy.yaml");
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap();
    let config = loads(kind("ConfigMap")["data"]["proxy.yaml"].as_str().unwrap());
    for (name, l) in &config.listeners {
        assert!(
            !l.accept_proxy_protocol.is_empty(),
            "listener {name} must accept PROXY from the load balancer"
        );
    }
    let containers = kind("Deployment")["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .clone();
    let postfix = containers.iter().find(|c| c["name"] == "postfix").unwrap();
    let port = postfix["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "PROXY_PORT")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(config.upstreams["mta"].address, port);
    assert!(
        port.starts_with("127.0.0.1:"),
        "Postfix's PROXY port stays inside the pod"
    );
    let proxy = containers
        .iter()
        .find(|c| c["name"] == "smtp-tls-proxy")
        .unwrap();
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/healthz");
    let service = kind("Service");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert!(
        service["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.contains("proxy-protocol"))
    );
}

#[test]
fn the_postfix_image_entrypoint_applies_proxy_port_cf_like_the_tests_do() {
    let postconf = "/usr/sbin/postconf";
    assert!(Path::new(postconf).exists(), "apt-get install postfix");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("/etc/postfix/master.cf", dir.path().join("master.cf")).unwrap();
    std::fs::write(dir.path().join("main.cf"), "").unwrap();
    let out = Command::new("sh")
        .arg(repo("containers/postfix/entrypoint.sh"))
        .arg("--configure-only")
        .env("MAIL_CONFIG", dir.path())
        .env("PROXY_PORT", "127.0.0.1:10025")
        .env("PROXY_PORT_CF", repo("containers/postfix/proxy-port.cf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(postconf)
        .args([
            "-c",
            dir.path().to_str().unwrap(),
            "-M",
            "127.0.0.1:10025/inet",
        ])
        .output()
        .unwrap();
    let service = String::from_utf8(out.stdout).unwrap();
    // Exactly the options the test suite's Postfix gets on its PROXY port.
    let options = crate::common::postfix::proxy_port_options();
    assert!(!options.is_empty());
    assert!(
        service
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .ends_with(&format!("smtpd {options}")),
        "entrypoint made: {service}\ntests use: {options}"
    );
}

#[test]
fn the_kubernetes_certificate_feeds_the_secret_every_replica_mounts() {
    let cert = yaml_docs("containers/kubernetes/certificate.yaml");
    assert_eq!(cert[0]["kind"], "Certificate");
    let secret = cert[0]["spec"]["secretName"].as_str().unwrap();
    assert_eq!(
        cert[0]["spec"]["privateKey"]["rotationPolicy"], "Never",
        "DANE: key kept"
    );
    let docs = yaml_docs("containers/kubernetes/smtp-tls-proxy.yaml");
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(
        volumes.iter().any(|v| v["secret"]["secretName"] == secret),
        "the Deployment mounts the Secret cert-manager writes"
    );
    // The built-in ACME variant: a shared RWX store, and a port-443 listener for tls-alpn-01.
    let acme = yaml_docs("containers/kubernetes/acme-shared-store.yaml");
    let pvc = acme
        .iter()
        .find(|d| d["kind"] == "PersistentVolumeClaim")
        .unwrap();
    assert_eq!(pvc["spec"]["accessModes"][0], "ReadWriteMany");
    let cm = acme.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let config = loads(cm["data"]["proxy.yaml"].as_str().unwrap());
    assert!(
        config.listeners.values().any(|l| l.listen.port() == 443),
        "the CA validates on port 443"
    );
}
