//! Issue 28: the Grafana dashboard (`containers/grafana/smtp-tls-proxy.json`) is checked
//! against what the proxy really exports. A proxy with every kind of series (a session, an
//! https listener with a policy, an ACME entry, a key change by reload) is scraped; every
//! metric a panel names must be in that scrape, and every panel's expression becomes a
//! recording rule in a `promtool test rules` file whose input series are the scraped series,
//! by name and labels: a renamed metric or label makes a panel return nothing and the test
//! fail.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use crate::common::*;

fn cert(dir: &Path, tag: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![
        "localhost".to_owned(),
        "mta-sts.example.org".to_owned(),
    ])
    .unwrap()
    .self_signed(&key)
    .unwrap();
    let (c, k) = (
        dir.join(format!("{tag}.pem")),
        dir.join(format!("{tag}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

/// Sample name -> the label sets seen, from an OpenMetrics scrape.
fn samples(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, _value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap().to_owned();
        out.entry(name).or_default().push(series.to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_of_the_dashboard_reads_series_the_proxy_exports() {
    let work = tempfile::tempdir().unwrap();
    let (c1, k1) = cert(work.path(), "one");
    let live = work.path().join("live.pem");
    let live_key = work.path().join("live.key");
    std::fs::copy(&c1, &live).unwrap();
    std::fs::copy(&k1, &live_key).unwrap();
    let mta = FakeMta::start().await;
    let yaml = format!(
        r#"log: {{ format: json }}
metrics: {{ listen: "127.0.0.1:0" }}
upstreams:
  mta: {{ address: "{mta}", connect_timeout: 2s }}
certificates:
  - {{ cert: {live}, key: {live_key} }}
  - acme:
      domains: [acme.example.org]
      contact: ["mailto:postmaster@example.org"]
      directory: "https://127.0.0.1:9/directory"
      cache: {cache}
listeners:
  smtps: {{ listen: "127.0.0.1:0", mode: implicit, hostname: localhost, upstream: mta }}
  https: {{ listen: "127.0.0.1:0", mode: https, hostname: mta-sts.example.org }}
mta_sts:
  domains:
    example.org: {{ mode: testing, mx: [mail.example.org] }}
"#,
        mta = mta.addr,
        live = live.display(),
        live_key = live_key.display(),
        cache = work.path().join("acme").display(),
    );
    let config = work.path().join("proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    let proxy = spawn_proxy_at(tempfile::tempdir().unwrap(), &config, &[]);
    // A session (handshake, TLS version and cipher, relayed bytes) ...
    let (mut tls, _) = tls_client(
        "127.0.0.1",
        proxy.addr("smtps"),
        inspecting_client(None),
        Some("localhost"),
    )
    .await;
    let mut greeting = [0u8; 64];
    let n = tokio::time::timeout(
        IO_TIMEOUT,
        tokio::io::AsyncReadExt::read(&mut tls, &mut greeting),
    )
    .await
    .expect("the greeting within IO_TIMEOUT")
    .unwrap();
    assert!(greeting[..n].starts_with(b"220"), "{:?}", &greeting[..n]);
    drop(tls);
    // ... and a new key for a served name (reload).
    let (c2, k2) = cert(work.path(), "two");
    std::fs::copy(&c2, &live).unwrap();
    std::fs::copy(&k2, &live_key).unwrap();
    proxy.signal("HUP");
    proxy.wait_for_log(|v| v["message"] == "reloaded").await;
    let scrape = eventually(IO_TIMEOUT, "the session line and its metrics", || async {
        let (_, text) = http_get(proxy.metrics_addr(), "/metrics").await;
        match text.contains("smtp_proxy_tls_sessions_total")
            && text.contains("smtp_proxy_certificate_key_changes_total")
        {
            true => Ok(text),
            false => Err("not yet".to_owned()),
        }
    })
    .await;
    let scraped = samples(&scrape);

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let committed =
        std::fs::read_to_string(root.join("containers/grafana/smtp-tls-proxy.json")).unwrap();
    // The committed JSON is what its source writes (the PromQL lives in the script).
    let regenerated = work.path().join("dashboard.json");
    let ran = Command::new("python3")
        .arg(root.join("containers/grafana/make-dashboard.py"))
        .arg(&regenerated)
        .status()
        .unwrap();
    assert!(ran.success(), "make-dashboard.py failed");
    assert!(
        std::fs::read_to_string(&regenerated).unwrap() == committed,
        "containers/grafana/smtp-tls-proxy.json differs from what make-dashboard.py writes: run it"
    );
    let dashboard: serde_json::Value = serde_json::from_str(&committed).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut tests = String::new();
    let mut missing = BTreeSet::new();
    let mut check_names = |expr: &str, place: String| {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("smtp_proxy_") && !scraped.contains_key(word) {
                missing.insert(format!("{word} ({place})"));
            }
        }
    };
    // The variables' queries too: a renamed metric there empties every panel's filter.
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let query = &variable["query"];
        if let Some(q) = query.as_str().or_else(|| query["query"].as_str()) {
            check_names(
                q,
                format!("variable {}", variable["name"].as_str().unwrap_or("?")),
            );
        }
    }
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            check_names(expr, format!("panel {:?}", panel["title"]));
            let record = format!(
                "dashboard:panel_{}_{}",
                panel["id"],
                target["refId"].as_str().unwrap()
            );
            let concrete = expr
                .replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$instance", ".*");
            rules.push_str(&format!(
                "      - record: {record}\n        expr: '{concrete}'\n"
            ));
            tests.push_str(&format!(
                "      - expr: 'count({record}) > bool 0'\n        eval_time: 20m\n        exp_samples:\n          - labels: '{{}}'\n            value: 1\n"
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "metrics the dashboard reads but the proxy does not export: {missing:#?}"
    );

    // Every scraped series, named and labelled as scraped, counting up once a minute.
    let mut input = String::new();
    for series in scraped.values().flatten() {
        let labelled = if series.contains('{') {
            series.replacen('{', "{instance=\"mx1:9155\",job=\"smtp-tls-proxy\",", 1)
        } else {
            format!("{series}{{instance=\"mx1:9155\",job=\"smtp-tls-proxy\"}}")
        };
        input.push_str(&format!(
            "      - series: '{labelled}'\n        values: '1+1x30'\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.rules.yaml"), &rules).unwrap();
    let test = format!(
        "rule_files: [dashboard.rules.yaml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{input}    promql_expr_test:\n{tests}"
    );
    std::fs::write(dir.path().join("dashboard.test.yaml"), &test).unwrap();
    let check = Command::new("promtool")
        .args(["check", "rules", "dashboard.rules.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("promtool (Debian package prometheus)");
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let run = Command::new("promtool")
        .args(["test", "rules", "dashboard.test.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "a panel returns nothing over the scraped series:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}
