//! The interop set (issue 16): real senders, mail clients, a second TLS stack and a TLS scanner
//! against the proxy binary, all delivering into ONE shared test Postfix (started once for
//! this test binary, `smtpd_upstream_proxy_protocol=haproxy`, Maildir delivery).
//!
//! Every delivering case sends one message with a unique token and checks that
//!   - it arrived intact (the token, a dot-stuffed line and the lines around it, byte for byte),
//!   - Postfix logged the real client address (`<queue id>: client=unknown[<address>]` for
//!     the queue id in the message's Received header; each case connects from its own
//!     loopback address, so the address proves the PROXY header, not the proxy's own socket),
//!   - the proxy's `session` line (JSON) has the expected listener, transport, TLS version,
//!     cipher family and certificate (`mx.example.test/ecdsa` or `/rsa`).
//!
//! Cases: Postfix 3.7 as a sending MTA (smtp(8): `secure` with the test CA through STARTTLS,
//! wrapper mode through the implicit listener, an untrusted CA that must defer, `none` to the
//! port-25 listener (plaintext) and to the submission listener (530)); Exim 4.96 (GnuTLS) with
//! `hosts_require_tls` and with `protocol = smtps`; msmtp (587 STARTTLS, 465); curl
//! (`--ssl-reqd smtp://`, `smtps://`); gnutls-cli with default priorities, RSA-only signature
//! algorithms (must get the RSA twin) and TLS 1.2 only; msmtp and curl on `[::1]` listeners;
//! sslyze (PyPI, pinned) `--mozilla_config=intermediate` against each listener kind as a gate,
//! and `modern` for information (port 25 needs TLS 1.2, so modern fails by design).
//!
//! The cases run concurrently (about 15 s on 2 cores; sslyze's STARTTLS scans are the longest,
//! with a 5 s wait in its renegotiation probe). One line per case is written to
//! `target/ci-summary/interop.txt` (which `.ci/run` prints); any failing case fails the test.
//! Prerequisites: `.ci/interop` (Debian packages, Exim unpacked into target/interop, the sslyze
//! venv) plus what `.ci/run` installs for the Postfix tests. Root, like every Postfix test.

// Test helpers outside #[test] fns may unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::common::interop::*;
use crate::common::postfix::{Postfix, PostfixOptions};
use crate::common::{RunningProxy, wait_until};

const WAIT: Duration = Duration::from_secs(30);
const MX: &str = "mx.example.test";

enum Verdict {
    /// The case passed; the detail goes on its line.
    Ok(String),
    /// Reported, never fails (sslyze "modern").
    Info(String),
}

type Outcome = Result<Verdict, String>;

struct Bed {
    pf: Postfix,
    proxy: RunningProxy,
    pki: Pki,
}

impl Bed {
    fn port(&self, listener: &str) -> u16 {
        self.proxy.addr(listener).port()
    }
}

fn proxy_yaml(pf: &Postfix, pki: &Pki) -> String {
    let listener = |name: &str, at: &str, mode: &str, extra: &str| {
        format!(
            "  {name}: {{ listen: \"{at}:0\", mode: {mode}, hostname: {MX}, upstream: mta{extra} }}\n"
        )
    };
    let req = ", require_starttls: true";
    format!(
        "log: {{ format: json }}\n\
         upstreams:\n  mta: {{ address: \"{}\", connect_timeout: 5s }}\n\
         certificates:\n  - {{ cert: {}, key: {} }}\n  - {{ cert: {}, key: {} }}\n\
         listeners:\n{}{}{}{}{}{}",
        pf.proxy_addr(),
        pki.ecdsa.0.display(),
        pki.ecdsa.1.display(),
        pki.rsa.0.display(),
        pki.rsa.1.display(),
        listener("smtp", "127.0.0.1", "starttls", ""),
        listener("submission", "127.0.0.1", "starttls", req),
        listener("submissions", "127.0.0.1", "implicit", ""),
        listener("smtp6", "[::1]", "starttls", ""),
        listener("submission6", "[::1]", "starttls", req),
        listener("submissions6", "[::1]", "implicit", ""),
    )
}

// ---------------------------------------------------------------- the message and its checks

fn token(case: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{case}-{}-{nanos:09}", std::process::id())
}

/// The body every case sends (CRLF lines): the token, a line starting with a dot (which
/// each client must dot-stuff and Postfix un-stuff), and plain lines around it.
fn body(token: &str) -> String {
    format!(
        "interop token {token}\r\n\
         a second line, 72 characters long, so that nothing is folded or wrapped.\r\n\
         .a line that starts with a dot\r\n\
         ..and one with two\r\n\
         the last line\r\n"
    )
}

/// A whole message (headers + body), CRLF or LF line ends.
fn message(case: &str, to: &str, token: &str, crlf: bool) -> String {
    let m = format!(
        "From: <sender@sender.example.test>\r\nTo: <{to}>\r\nSubject: interop {case}\r\n\r\n{}",
        body(token)
    );
    if crlf { m } else { m.replace("\r\n", "\n") }
}

/// Polls (bounded) for `f` to yield.
fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The message arrived intact and Postfix logged the real client address for it.
fn check_delivered(pf: &Postfix, token: &str, client: IpAddr) -> Result<(), String> {
    let needle = format!("interop token {token}\n");
    let msg = poll(&format!("a delivered message with {token}"), WAIT, || {
        pf.messages().into_iter().find(|m| m.contains(&needle))
    })?;
    // Maildir files have LF line ends.
    let want = body(token).replace("\r\n", "\n");
    if !msg.contains(&want) {
        return Err(format!("the body did not arrive intact:\n{msg}"));
    }
    let received = match client {
        IpAddr::V4(a) => format!("(unknown [{a}])"),
        IpAddr::V6(a) => format!("(unknown [IPv6:{a}])"),
    };
    if !msg.contains(&received) {
        return Err(format!("Received header without {received}:\n{msg}"));
    }
    let id = queue_id(&msg).ok_or_else(|| format!("no queue id in the Received header:\n{msg}"))?;
    let line = format!("{id}: client=unknown[{client}]");
    poll(&format!("Postfix log line {line:?}"), WAIT, || {
        pf.log().contains(&line).then_some(())
    })
    .map_err(|e| format!("{e}; log:\n{}", pf.log()))
}

/// The queue id from "by mx.example.test (Postfix) with ESMTP id XXXX".
fn queue_id(msg: &str) -> Option<String> {
    let at = msg.find("(Postfix) with ")?;
    let rest = &msg[at..];
    let id = rest.split(" id ").nth(1)?;
    Some(
        id.split(|c: char| c.is_whitespace() || c == ';')
            .next()?
            .to_owned(),
    )
}

/// What the proxy's session line must say.
struct Expect<'a> {
    listener: &'a str,
    client: IpAddr,
    /// `implicit`, `starttls`, `plaintext` or `none`.
    transport: &'a str,
    /// `TLSv1.3`, `TLSv1.2`, or "" (no TLS).
    tls: &'a str,
    /// `ecdsa` or `rsa` (the certificate `mx.example.test/<kind>`), or "" (no TLS).
    key: &'a str,
    /// Whether the session must have been relayed to Postfix.
    relayed: bool,
}

fn session_line(proxy: &RunningProxy, listener: &str, client: IpAddr) -> Result<Value, String> {
    let prefix = match client {
        IpAddr::V4(a) => format!("{a}:"),
        IpAddr::V6(a) => format!("[{a}]:"),
    };
    poll(
        &format!("a session line for {prefix}* on {listener}"),
        WAIT,
        || {
            proxy.find_log(|v| {
                v["message"] == "session"
                    && v["listener"] == listener
                    && v["client"].as_str().is_some_and(|c| c.starts_with(&prefix))
            })
        },
    )
    .map_err(|e| format!("{e}; proxy log:\n{}", proxy.log_text()))
}

/// Checks the session line; returns "TLSv1.3, TLS_AES_128_GCM_SHA256, cert mx.example.test/ecdsa".
fn check_session(proxy: &RunningProxy, e: &Expect<'_>) -> Result<String, String> {
    let line = session_line(proxy, e.listener, e.client)?;
    let field = |k: &str| line[k].as_str().unwrap_or_default().to_owned();
    let mut problems = Vec::new();
    if e.relayed && field("outcome") != "relayed" {
        problems.push(format!("outcome {:?}", field("outcome")));
    }
    if field("transport") != e.transport {
        problems.push(format!(
            "transport {:?}, want {:?}",
            field("transport"),
            e.transport
        ));
    }
    if field("tls_version") != e.tls {
        problems.push(format!(
            "tls_version {:?}, want {:?}",
            field("tls_version"),
            e.tls
        ));
    }
    let want_cert = if e.key.is_empty() {
        String::new()
    } else {
        format!("{MX}/{}", e.key)
    };
    if field("cert") != want_cert {
        problems.push(format!("cert {:?}, want {want_cert:?}", field("cert")));
    }
    let cipher = field("cipher");
    let family_ok = match e.tls {
        "TLSv1.3" => [
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
        ]
        .contains(&cipher.as_str()),
        // Either server order passes (AES-128 or AES-256 first): only ECDHE + AEAD GCM.
        "TLSv1.2" => {
            cipher.starts_with(&format!(
                "TLS_ECDHE_{}_WITH_AES_",
                if e.key == "rsa" { "RSA" } else { "ECDSA" }
            )) && cipher.contains("_GCM_")
        }
        _ => cipher.is_empty(),
    };
    if !family_ok {
        problems.push(format!("cipher {cipher:?}"));
    }
    if e.tls.is_empty() && !field("sni").is_empty() {
        problems.push(format!("sni {:?} without TLS", field("sni")));
    }
    if !e.tls.is_empty() && field("sni") != MX {
        problems.push(format!("sni {:?}, want {MX}", field("sni")));
    }
    if !problems.is_empty() {
        return Err(format!("session line: {}: {line}", problems.join(", ")));
    }
    Ok(if e.tls.is_empty() {
        format!("{}, no TLS", e.transport)
    } else {
        format!("{}, {cipher}, cert {want_cert}", e.tls)
    })
}

/// The full check of a delivering case.
fn check_case(bed: &Bed, token: &str, e: &Expect<'_>) -> Result<String, String> {
    check_delivered(&bed.pf, token, e.client)?;
    let detail = check_session(&bed.proxy, e)?;
    Ok(format!("{detail}, client {}", e.client))
}

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

// ---------------------------------------------------------------- Postfix as a sending MTA

/// The sending instance's routes: one smtp(8) service per case, each from its own address.
fn postfix_routes(bed: &Bed) -> Vec<Route> {
    let hop = |l: &str| bed.proxy.addr(l);
    let ca = bed.pki.ca.display().to_string();
    let untrusted = bed.pki.untrusted_ca.display().to_string();
    let secure = |ca: &str| {
        vec![
            "smtp_tls_security_level=secure".to_owned(),
            format!("smtp_tls_CAfile={ca}"),
            format!("smtp_tls_secure_cert_match={MX}"),
        ]
    };
    let none = vec!["smtp_tls_security_level=none".to_owned()];
    vec![
        Route {
            service: "pf-secure".into(),
            recipient: "pf-secure@example.test".into(),
            nexthop: hop("smtp"),
            bind: v4(41),
            options: secure(&ca),
        },
        Route {
            service: "pf-wrapper".into(),
            recipient: "pf-wrapper@example.test".into(),
            nexthop: hop("submissions"),
            bind: v4(42),
            options: vec![
                "smtp_tls_wrappermode=yes".into(),
                "smtp_tls_security_level=encrypt".into(),
            ],
        },
        Route {
            service: "pf-untrusted".into(),
            recipient: "pf-untrusted@example.test".into(),
            nexthop: hop("smtp"),
            bind: v4(43),
            options: secure(&untrusted),
        },
        Route {
            service: "pf-plain".into(),
            recipient: "pf-plain@example.test".into(),
            nexthop: hop("smtp"),
            bind: v4(44),
            options: none.clone(),
        },
        Route {
            service: "pf-none-587".into(),
            recipient: "pf-none-587@example.test".into(),
            nexthop: hop("submission"),
            bind: v4(45),
            options: none,
        },
    ]
}

/// Injects by SMTP into the sending instance and waits for its verdict line for `rcpt`.
fn postfix_send(
    sender: &SenderPostfix,
    case: &str,
    rcpt: &str,
    token: &str,
) -> Result<String, String> {
    smtp_submit(
        sender.smtp_addr(),
        "sender@sender.example.test",
        rcpt,
        &message(case, rcpt, token, true),
    )
    .map_err(|e| format!("injection into the sending Postfix: {e}"))?;
    let needle = format!("to=<{rcpt}>");
    poll(
        &format!("the sending Postfix's verdict for {rcpt}"),
        WAIT,
        || {
            sender
                .log()
                .lines()
                .find(|l| l.contains(&needle) && l.contains("status="))
                .map(str::to_owned)
        },
    )
    .map_err(|e| format!("{e}; sender log:\n{}", sender.log()))
}

fn postfix_delivers(
    bed: &Bed,
    sender: &SenderPostfix,
    case: &str,
    rcpt: &str,
    e: &Expect<'_>,
    sender_log_needle: &str,
) -> Outcome {
    let token = token(case);
    let verdict = postfix_send(sender, case, rcpt, &token)?;
    if !verdict.contains("status=sent") {
        return Err(format!("the sending Postfix did not deliver: {verdict}"));
    }
    if !sender.log().contains(sender_log_needle) {
        return Err(format!(
            "sender log lacks {sender_log_needle:?}:\n{}",
            sender.log()
        ));
    }
    check_case(bed, &token, e).map(Verdict::Ok)
}

fn postfix_untrusted_defers(bed: &Bed, sender: &SenderPostfix) -> Outcome {
    let (case, rcpt) = ("postfix-untrusted-ca-defers", "pf-untrusted@example.test");
    let token = token(case);
    let verdict = postfix_send(sender, case, rcpt, &token)?;
    if !verdict.contains("status=deferred (Server certificate not verified)") {
        return Err(format!(
            "want a deferral for the untrusted certificate: {verdict}"
        ));
    }
    let port = bed.port("smtp");
    let failed = format!(
        "certificate verification failed for 127.0.0.1[127.0.0.1]:{port}: untrusted issuer"
    );
    if !sender.log().contains(&failed) {
        return Err(format!("sender log lacks {failed:?}:\n{}", sender.log()));
    }
    // Still queued: the queue id of the verdict line is in the deferred queue.
    let id = verdict
        .split(": to=<")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .unwrap_or_default()
        .to_owned();
    // The delivery agent logs the deferral before the queue manager moves the file: polled.
    if id.is_empty() || !wait_until(Duration::from_secs(10), || sender.deferred().contains(&id)) {
        return Err(format!(
            "message {id:?} not in the deferred queue ({:?})",
            sender.deferred()
        ));
    }
    // The handshake itself completed (the client rejects the chain afterwards) and nothing
    // was delivered: no mail transaction from that address reached Postfix.
    let line = session_line(&bed.proxy, "smtp", IpAddr::V4(v4(43)))?;
    if line["transport"] != "starttls" || line["tls_version"] != "TLSv1.3" {
        return Err(format!("session line: {line}"));
    }
    if bed.pf.log().contains("client=unknown[127.0.0.43]")
        || bed.pf.messages().iter().any(|m| m.contains(&token))
    {
        return Err(format!(
            "the untrusted-CA message reached Postfix:\n{}",
            bed.pf.log()
        ));
    }
    Ok(Verdict::Ok(format!(
        "deferred \"Server certificate not verified\", {id} still queued; proxy outcome {}",
        line["outcome"].as_str().unwrap_or_default()
    )))
}

fn postfix_none_gets_530(bed: &Bed, sender: &SenderPostfix) -> Outcome {
    let (case, rcpt) = ("postfix-none-587-refused", "pf-none-587@example.test");
    let token = token(case);
    let verdict = postfix_send(sender, case, rcpt, &token)?;
    let want =
        "said: 530 5.7.0 Must issue a STARTTLS command first (in reply to MAIL FROM command)";
    if !verdict.contains(want) {
        return Err(format!("want the 530 in the sender's log: {verdict}"));
    }
    let line = session_line(&bed.proxy, "submission", IpAddr::V4(v4(45)))?;
    if line["transport"] != "none" || line["upstream_addr"] != "" {
        return Err(format!("session line: {line}"));
    }
    if bed.pf.log().contains("unknown[127.0.0.45]") {
        return Err(format!("Postfix saw the refused client:\n{}", bed.pf.log()));
    }
    Ok(Verdict::Ok(format!(
        "530 5.7.0 to MAIL FROM, {}; no upstream connection",
        if verdict.contains("status=bounced") {
            "bounced by the sender"
        } else {
            "refused"
        }
    )))
}

// ---------------------------------------------------------------- Exim

fn exim_case(
    bed: &Bed,
    exim: &Result<Exim, String>,
    local: &str,
    case: &str,
    e: &Expect<'_>,
) -> Outcome {
    let exim = exim.as_ref().map_err(Clone::clone)?;
    let rcpt = format!("{local}@example.test");
    let token = token(case);
    let out = exim.send(&rcpt, &message(case, &rcpt, &token, false));
    if !out.status.success() {
        return Err(format!("exim: {}\n{}", transcript(&out), exim.mainlog()));
    }
    let port = bed.port(e.listener);
    let log = exim.mainlog();
    let delivered = log
        .lines()
        .find(|l| l.contains(&format!("=> {rcpt} ")))
        .ok_or_else(|| format!("no delivery line for {rcpt} in Exim's mainlog:\n{log}"))?;
    let want = [
        format!("H={MX} [127.0.0.1]:{port}"),
        "X=TLS1.3:".to_owned(),
        "CV=yes".to_owned(),
        format!("DN=\"CN={MX}\""),
        "C=\"250 2.0.0 Ok".to_owned(),
    ];
    if let Some(missing) = want.iter().find(|w| !delivered.contains(w.as_str())) {
        return Err(format!(
            "Exim's delivery line lacks {missing:?}: {delivered}"
        ));
    }
    check_case(bed, &token, e).map(Verdict::Ok)
}

// ---------------------------------------------------------------- msmtp, curl

fn msmtp_case(
    bed: &Bed,
    case: &str,
    listener: &str,
    starttls: bool,
    from: IpAddr,
    e: &Expect<'_>,
) -> Outcome {
    let token = token(case);
    let rcpt = "msmtp@example.test";
    let config = tempfile::NamedTempFile::new().unwrap();
    let addr = bed.proxy.addr(listener);
    let mut cmd = Command::new("msmtp");
    cmd.arg("-C")
        .arg(config.path())
        .arg(format!("--host={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .arg("--tls=on")
        .arg(format!(
            "--tls-starttls={}",
            if starttls { "on" } else { "off" }
        ))
        .arg(format!("--tls-trust-file={}", bed.pki.ca.display()))
        .arg(format!("--tls-host-override={MX}"))
        .args([
            "--auth=off",
            "--domain=client.test",
            "--from=sender@client.test",
        ]);
    if from.is_ipv4() {
        cmd.arg(format!("--source-ip={from}"));
    }
    cmd.arg(rcpt);
    let out = run_with_timeout(
        &mut cmd,
        Some(message(case, rcpt, &token, false).as_bytes()),
        WAIT,
    );
    if !out.status.success() {
        return Err(format!("msmtp: {}", transcript(&out)));
    }
    check_case(bed, &token, e).map(Verdict::Ok)
}

fn curl_case(
    bed: &Bed,
    case: &str,
    listener: &str,
    smtps: bool,
    from: IpAddr,
    e: &Expect<'_>,
) -> Outcome {
    let token = token(case);
    let rcpt = "curl@example.test";
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), message(case, rcpt, &token, true)).unwrap();
    let port = bed.port(listener);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30"])
        .arg("--cacert")
        .arg(&bed.pki.ca)
        .arg("--resolve")
        .arg(match from {
            IpAddr::V4(_) => format!("{MX}:{port}:127.0.0.1"),
            IpAddr::V6(_) => format!("{MX}:{port}:[::1]"),
        })
        .arg("--interface")
        .arg(from.to_string())
        .args(["--mail-from", "sender@client.test", "--mail-rcpt", rcpt])
        .arg("-T")
        .arg(file.path());
    if smtps {
        cmd.arg(format!("smtps://{MX}:{port}/client.test"));
    } else {
        cmd.arg("--ssl-reqd")
            .arg(format!("smtp://{MX}:{port}/client.test"));
    }
    let out = run_with_timeout(&mut cmd, None, WAIT);
    if !out.status.success() {
        return Err(format!("curl: {}", transcript(&out)));
    }
    check_case(bed, &token, e).map(Verdict::Ok)
}

// ---------------------------------------------------------------- gnutls-cli

/// gnutls-cli (GnuTLS, not rustls/OpenSSL) against the implicit listener with `priority`,
/// driven line by line: greeting, EHLO, one message, QUIT. gnutls-cli cannot bind its source
/// address, so it connects through a one-shot relay that connects from `from`.
fn gnutls_case(
    bed: &Bed,
    case: &str,
    priority: Option<&str>,
    from: Ipv4Addr,
    e: &Expect<'_>,
) -> Outcome {
    let token = token(case);
    let relay = relay_from(IpAddr::V4(from), bed.proxy.addr("submissions"));
    let mut cmd = Command::new("gnutls-cli");
    cmd.arg("--port")
        .arg(relay.port().to_string())
        .arg(format!("--x509cafile={}", bed.pki.ca.display()))
        .arg(format!("--sni-hostname={MX}"))
        .arg(format!("--verify-hostname={MX}"));
    if let Some(p) = priority {
        cmd.arg(format!("--priority={p}"));
    }
    cmd.arg("127.0.0.1");
    let mut d = Dialogue::spawn(&mut cmd);
    d.reply("220")?;
    let seen = d.seen.clone();
    let description = seen
        .iter()
        .find(|l| l.starts_with("- Description: "))
        .cloned()
        .unwrap_or_default();
    if !seen
        .iter()
        .any(|l| l.contains("- Status: The certificate is trusted."))
    {
        return Err(format!(
            "gnutls-cli did not trust the chain:\n{}",
            seen.join("\n")
        ));
    }
    let key_line = if e.key == "rsa" {
        "RSA key 2048 bits"
    } else {
        "EC/ECDSA key 256 bits"
    };
    if !seen
        .iter()
        .any(|l| l.contains(&format!("subject `CN={MX}'")) && l.contains(key_line))
    {
        return Err(format!(
            "gnutls-cli did not get the {key_line} certificate:\n{}",
            seen.join("\n")
        ));
    }
    d.send("EHLO client.test\r\n")?;
    d.reply("250")?;
    d.send("MAIL FROM:<sender@client.test>\r\n")?;
    d.reply("250")?;
    d.send("RCPT TO:<gnutls@example.test>\r\n")?;
    d.reply("250")?;
    d.send("DATA\r\n")?;
    d.reply("354")?;
    let msg = message(case, "gnutls@example.test", &token, true);
    d.send(&format!("{}.\r\n", dot_stuff(&msg)))?;
    d.reply("250")?;
    d.send("QUIT\r\n")?;
    d.reply("221")?;
    d.finish();
    let detail = check_case(bed, &token, e)?;
    Ok(Verdict::Ok(format!(
        "{detail}; gnutls {}",
        description.trim_start_matches("- Description: ")
    )))
}

// ---------------------------------------------------------------- sslyze

/// sslyze against one listener with a Mozilla profile. (compliant, the issues it listed).
fn sslyze(bed: &Bed, listener: &str, profile: &str) -> Result<(bool, String), String> {
    let port = bed.port(listener);
    let mut cmd = Command::new(sslyze_binary());
    cmd.arg(format!("--mozilla_config={profile}"))
        .arg(format!("--certinfo_ca_file={}", bed.pki.ca.display()));
    if listener != "submissions" {
        cmd.args(["--starttls", "smtp"]);
    }
    // host{ip}: SNI and the name check use mx.example.test, the connection goes to 127.0.0.1.
    cmd.arg(format!("{MX}:{port}{{127.0.0.1}}"));
    let out = run_with_timeout(&mut cmd, None, Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let target = format!("{MX}:{port}: ");
    let Some(at) = text.find(&target) else {
        return Err(format!(
            "sslyze gave no compliance verdict: {}",
            transcript(&out)
        ));
    };
    let verdict = &text[at..];
    if verdict[target.len()..].starts_with("OK - Compliant") {
        if !out.status.success() {
            return Err(format!("sslyze said compliant but exited {}", out.status));
        }
        return Ok((true, String::new()));
    }
    let issues: Vec<String> = verdict
        .lines()
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("* "))
        .map(|l| l.trim().trim_start_matches("* ").to_owned())
        .collect();
    if issues.is_empty() || out.status.success() {
        return Err(format!("unexpected sslyze output: {}", transcript(&out)));
    }
    Ok((false, issues.join("; ")))
}

fn sslyze_gate(bed: &Bed, listener: &str) -> Outcome {
    match sslyze(bed, listener, "intermediate")? {
        (true, _) => Ok(Verdict::Ok(format!(
            "Mozilla intermediate: compliant ({listener}, port {})",
            bed.port(listener)
        ))),
        (false, issues) => Err(format!("Mozilla intermediate: NOT compliant: {issues}")),
    }
}

fn sslyze_modern(bed: &Bed, listener: &str) -> Outcome {
    Ok(Verdict::Info(match sslyze(bed, listener, "modern")? {
        (true, _) => "Mozilla modern: compliant".to_owned(),
        (false, issues) => {
            // Only the issue names: the full text lists every cipher.
            let names: Vec<&str> = issues
                .split("; ")
                .map(|i| i.split(':').next().unwrap_or(i))
                .collect();
            format!(
                "Mozilla modern: not compliant ({}): TLS 1.2 stays on for port-25 senders",
                names.join(", ")
            )
        }
    }))
}

// ---------------------------------------------------------------- versions

fn first_line(cmd: &mut Command) -> String {
    let out = run_with_timeout(cmd, None, Duration::from_secs(20));
    let text = if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    };
    String::from_utf8_lossy(text)
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("?")
        .trim()
        .to_owned()
}

fn versions(exim: &Result<Exim, String>) -> String {
    let v = |f: &dyn Fn() -> String| {
        catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| "missing".into())
    };
    let postfix = v(&|| first_line(Command::new("postconf").args(["-d", "-h", "mail_version"])));
    let exim = match exim {
        Ok(e) => e.version(),
        Err(_) => "missing".into(),
    };
    let exim_deb = std::fs::read_to_string(tools_dir().join("exim/DEBIAN-VERSION"))
        .map(|s| s.trim().replace('\n', ", "))
        .unwrap_or_default();
    let msmtp = v(&|| first_line(Command::new("msmtp").arg("--version")));
    let curl = v(&|| {
        // "curl 7.88.1 (x86_64-pc-linux-gnu) libcurl/7.88.1 OpenSSL/3.0.x zlib/…": the TLS part.
        let line = first_line(Command::new("curl").arg("--version"));
        let words: Vec<&str> = line.split(' ').collect();
        let tls = words
            .iter()
            .find(|w| w.contains("SSL/") || w.contains("TLS/"));
        format!(
            "curl {} ({})",
            words.get(1).unwrap_or(&"?"),
            tls.unwrap_or(&"?")
        )
    });
    let gnutls = v(&|| first_line(Command::new("gnutls-cli").arg("--version")));
    let openssl = v(&|| first_line(Command::new("openssl").arg("version")));
    let py = tools_dir().join("venv/bin/python");
    let sslyze = v(&|| {
        first_line(Command::new(&py).args([
            "-c",
            "from sslyze.__version__ import __version__ as s; import importlib.metadata as m; \
             print(s, '(nassl', m.version('nassl') + ', cryptography', m.version('cryptography') + ')')",
        ]))
    });
    format!(
        "postfix {postfix}; {exim} ({exim_deb}); {msmtp}; {curl}; {gnutls}; {openssl}; sslyze {sslyze}"
    )
}

// ---------------------------------------------------------------- the set

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// `target/ci-summary/interop.txt`, which `.ci/run` prints after the tests.
fn summary_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-summary/interop.txt")
}

fn write_summary(text: &str) {
    let path = summary_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(path, text);
}

#[test]
fn interop_set() {
    let started = Instant::now();
    // A summary left by an earlier run must never stand for this one.
    let _ = std::fs::remove_file(summary_path());
    let (bed, sender) = catch_unwind(|| {
        let pki = Pki::new(&[MX]);
        let pf = Postfix::start(PostfixOptions::default());
        let proxy = crate::common::spawn_proxy(&proxy_yaml(&pf, &pki));
        let bed = Bed { pf, proxy, pki };
        let sender = SenderPostfix::start(&postfix_routes(&bed));
        (bed, sender)
    })
    .unwrap_or_else(|p| {
        let text = panic_text(p);
        let first = text.lines().next().unwrap_or_default();
        write_summary(&format!("interop: setup FAILED: {first}\n"));
        panic!("interop setup failed: {text}");
    });
    let exim = catch_unwind(AssertUnwindSafe(|| {
        Exim::new(
            &[
                EximRoute {
                    local_part: "exim_starttls".into(),
                    port: bed.port("smtp"),
                    smtps: false,
                    bind: v4(31),
                },
                EximRoute {
                    local_part: "exim_smtps".into(),
                    port: bed.port("submissions"),
                    smtps: true,
                    bind: v4(32),
                },
            ],
            &bed.pki.ca,
        )
    }))
    .map_err(panic_text);
    let setup = started.elapsed();

    let tls13 = |listener, client, transport, key| Expect {
        listener,
        client,
        transport,
        tls: "TLSv1.3",
        key,
        relayed: true,
    };
    let ip = |last| IpAddr::V4(v4(last));
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let (b, s, x) = (&bed, &sender, &exim);
    type Case<'a> = (&'static str, Box<dyn FnOnce() -> Outcome + Send + 'a>);
    let cases: Vec<Case<'_>> = vec![
        (
            "postfix-secure-starttls",
            Box::new(move || {
                let e = tls13("smtp", ip(41), "starttls", "ecdsa");
                let port = b.port("smtp");
                postfix_delivers(
                    b,
                    s,
                    "postfix-secure-starttls",
                    "pf-secure@example.test",
                    &e,
                    &format!(
                        "Verified TLS connection established to 127.0.0.1[127.0.0.1]:{port}: TLSv1.3"
                    ),
                )
            }),
        ),
        (
            "postfix-wrappermode-implicit",
            Box::new(move || {
                let e = tls13("submissions", ip(42), "implicit", "ecdsa");
                let port = b.port("submissions");
                postfix_delivers(
                    b,
                    s,
                    "postfix-wrappermode-implicit",
                    "pf-wrapper@example.test",
                    &e,
                    &format!("TLS connection established to 127.0.0.1[127.0.0.1]:{port}: TLSv1.3"),
                )
            }),
        ),
        (
            "postfix-untrusted-ca-defers",
            Box::new(move || postfix_untrusted_defers(b, s)),
        ),
        (
            "postfix-none-25-plaintext",
            Box::new(move || {
                let e = Expect {
                    listener: "smtp",
                    client: ip(44),
                    transport: "plaintext",
                    tls: "",
                    key: "",
                    relayed: true,
                };
                postfix_delivers(
                    b,
                    s,
                    "postfix-none-25-plaintext",
                    "pf-plain@example.test",
                    &e,
                    "status=sent",
                )
            }),
        ),
        (
            "postfix-none-587-refused",
            Box::new(move || postfix_none_gets_530(b, s)),
        ),
        (
            "exim-hosts_require_tls-starttls",
            Box::new(move || {
                exim_case(
                    b,
                    x,
                    "exim_starttls",
                    "exim-starttls",
                    &tls13("smtp", ip(31), "starttls", "ecdsa"),
                )
            }),
        ),
        (
            "exim-smtps-implicit",
            Box::new(move || {
                exim_case(
                    b,
                    x,
                    "exim_smtps",
                    "exim-smtps",
                    &tls13("submissions", ip(32), "implicit", "ecdsa"),
                )
            }),
        ),
        (
            "msmtp-587-starttls",
            Box::new(move || {
                msmtp_case(
                    b,
                    "msmtp-587",
                    "submission",
                    true,
                    ip(51),
                    &tls13("submission", ip(51), "starttls", "ecdsa"),
                )
            }),
        ),
        (
            "msmtp-465-implicit",
            Box::new(move || {
                msmtp_case(
                    b,
                    "msmtp-465",
                    "submissions",
                    false,
                    ip(52),
                    &tls13("submissions", ip(52), "implicit", "ecdsa"),
                )
            }),
        ),
        (
            "curl-ssl-reqd-587",
            Box::new(move || {
                curl_case(
                    b,
                    "curl-587",
                    "submission",
                    false,
                    ip(61),
                    &tls13("submission", ip(61), "starttls", "ecdsa"),
                )
            }),
        ),
        (
            "curl-smtps-465",
            Box::new(move || {
                curl_case(
                    b,
                    "curl-465",
                    "submissions",
                    true,
                    ip(62),
                    &tls13("submissions", ip(62), "implicit", "ecdsa"),
                )
            }),
        ),
        (
            "gnutls-cli-default",
            Box::new(move || {
                gnutls_case(
                    b,
                    "gnutls-default",
                    None,
                    v4(71),
                    &tls13("submissions", ip(71), "implicit", "ecdsa"),
                )
            }),
        ),
        (
            "gnutls-cli-rsa-only",
            Box::new(move || {
                let p = "NORMAL:-SIGN-ALL:+SIGN-RSA-SHA256:+SIGN-RSA-PSS-RSAE-SHA256:+SIGN-RSA-SHA384:\
                     +SIGN-RSA-PSS-RSAE-SHA384:+SIGN-RSA-SHA512:+SIGN-RSA-PSS-RSAE-SHA512";
                gnutls_case(
                    b,
                    "gnutls-rsa-only",
                    Some(p),
                    v4(72),
                    &tls13("submissions", ip(72), "implicit", "rsa"),
                )
            }),
        ),
        (
            "gnutls-cli-tls12-only",
            Box::new(move || {
                let e = Expect {
                    tls: "TLSv1.2",
                    ..tls13("submissions", ip(73), "implicit", "ecdsa")
                };
                gnutls_case(
                    b,
                    "gnutls-tls12",
                    Some("NORMAL:-VERS-ALL:+VERS-TLS1.2"),
                    v4(73),
                    &e,
                )
            }),
        ),
        (
            "msmtp-ipv6-587-starttls",
            Box::new(move || {
                msmtp_case(
                    b,
                    "msmtp6-587",
                    "submission6",
                    true,
                    v6,
                    &tls13("submission6", v6, "starttls", "ecdsa"),
                )
            }),
        ),
        (
            "msmtp-ipv6-465-implicit",
            Box::new(move || {
                msmtp_case(
                    b,
                    "msmtp6-465",
                    "submissions6",
                    false,
                    v6,
                    &tls13("submissions6", v6, "implicit", "ecdsa"),
                )
            }),
        ),
        (
            "curl-ipv6-25-ssl-reqd",
            Box::new(move || {
                curl_case(
                    b,
                    "curl6-25",
                    "smtp6",
                    false,
                    v6,
                    &tls13("smtp6", v6, "starttls", "ecdsa"),
                )
            }),
        ),
        (
            "sslyze-intermediate-smtp",
            Box::new(move || sslyze_gate(b, "smtp")),
        ),
        (
            "sslyze-intermediate-submission",
            Box::new(move || sslyze_gate(b, "submission")),
        ),
        (
            "sslyze-intermediate-submissions",
            Box::new(move || sslyze_gate(b, "submissions")),
        ),
        (
            "sslyze-modern-smtp",
            Box::new(move || sslyze_modern(b, "smtp")),
        ),
        (
            "sslyze-modern-submission",
            Box::new(move || sslyze_modern(b, "submission")),
        ),
        (
            "sslyze-modern-submissions",
            Box::new(move || sslyze_modern(b, "submissions")),
        ),
    ];

    let results: Vec<(&str, Outcome, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .into_iter()
            .map(|(name, case)| {
                scope.spawn(move || {
                    let t = Instant::now();
                    let r =
                        catch_unwind(AssertUnwindSafe(case)).unwrap_or_else(|p| Err(panic_text(p)));
                    (name, r, t.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut lines = vec![format!("interop: versions: {}", versions(&exim))];
    let (mut ok, mut info, mut failed) = (0, 0, Vec::new());
    for (name, r, took) in &results {
        let t = took.as_secs_f32();
        lines.push(match r {
            Ok(Verdict::Ok(d)) => {
                ok += 1;
                format!("interop: {name} ok ({d}) [{t:.1} s]")
            }
            Ok(Verdict::Info(d)) => {
                info += 1;
                format!("interop: {name} info ({d}) [{t:.1} s]")
            }
            Err(e) => {
                failed.push(*name);
                let first = e.lines().next().unwrap_or_default();
                format!("interop: {name} FAILED: {first} [{t:.1} s]")
            }
        });
    }
    lines.push(format!(
        "interop: {ok} cases ok, {} failed, {info} for information; {:.1} s in all ({:.1} s setup)",
        failed.len(),
        started.elapsed().as_secs_f32(),
        setup.as_secs_f32()
    ));
    let summary = lines.join("\n") + "\n";
    print!("{summary}");
    write_summary(&summary);
    for (name, r, _) in &results {
        if let Err(e) = r {
            eprintln!("--- {name} ---\n{e}\n");
        }
    }
    assert!(
        failed.is_empty(),
        "interop cases failed: {failed:?}\n{summary}"
    );
}
