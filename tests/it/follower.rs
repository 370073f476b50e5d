//! The follower after the hand-off reads the session exactly as a real Postfix does
//! (catalogue §D2, HF-1 … HF-7; issue 23), on all three paths: STARTTLS, implicit TLS and the
//! plaintext hand-off on a port-25 listener. Postfix is Debian 12's 3.7.11 with its
//! vulnerable default (`smtpd_forbid_bare_newline = no`) and STARTTLS and SASL offered on
//! the port behind the proxy, so a relayed STARTTLS or AUTH would be answered. Every
//! assertion is made on Postfix's own evidence too: its per-session `disconnect` counters
//! (`data=`, `auth=`, `starttls=`), its log and its Maildir.
//!
//! Each session connects from its own 127.0.0.x address, so the `disconnect from
//! unknown[127.0.0.x]` line is that session's. With `PROXY_UNDER_TEST` pointing at a build
//! before the guard (906bf9d), the `normalize` tests fail: the listeners of the default mode
//! carry no `smuggling_guard` key, so the old binary starts and smuggles.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use crate::common::postfix::{Postfix, PostfixOptions, wait_until};
use crate::common::*;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const PF_WAIT: Duration = Duration::from_secs(20);
const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pw";

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Client = Smtp<Box<dyn Io>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Starttls,
    Implicit,
    /// Port 25 without STARTTLS: the hand-off happens at MAIL.
    Plaintext,
}

const PATHS: [Via; 3] = [Via::Starttls, Via::Implicit, Via::Plaintext];

/// A distinct client address per session (127.0.0.2 … 127.0.0.254, across the binary).
fn next_ip() -> String {
    static NEXT: AtomicU8 = AtomicU8::new(2);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(n < 255, "out of client addresses");
    format!("127.0.0.{n}")
}

struct Rig {
    pki: TestPki,
    pf: Postfix,
    proxy: RunningProxy,
}

/// Postfix with STARTTLS and SASL on its proxy port; the proxy with a `starttls` and an
/// `implicit` listener in `guard` mode (`None`: the key left out, the default).
fn rig(guard: Option<&str>, main_cf_extra: &str) -> Rig {
    let pki = TestPki::new();
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let pf = Postfix::start(PostfixOptions {
        sasl: Some((USER.into(), PASSWORD.into())),
        main_cf_extra: format!(
            "smtpd_tls_security_level = may\nsmtpd_tls_chain_files = {}, {}\n{main_cf_extra}",
            mx.key_path.display(),
            mx.cert_path.display()
        ),
        ..PostfixOptions::default()
    });
    let extra = match guard {
        Some(mode) => json!({ "smuggling_guard": mode }),
        None => json!({}),
    };
    let proxy = TestConfig::new(pf.proxy_addr())
        .upstream(json!({ "health_interval": "1h" }))
        .certificate(&mx)
        .starttls("smtp", "mx.example.test", extra.clone())
        .implicit("smtps", "mx.example.test", extra)
        .top(json!({ "metrics": { "listen": "127.0.0.1:0" } }))
        .spawn();
    Rig { pki, pf, proxy }
}

impl Rig {
    /// A session on `via`, greeted and past EHLO (for `Plaintext`: the proxy's own EHLO).
    async fn open(&self, via: Via) -> (Client, String, SocketAddr) {
        let ip = next_ip();
        let listener = if via == Via::Implicit {
            "smtps"
        } else {
            "smtp"
        };
        let tcp = connect_from(&ip, self.proxy.addr(listener)).await;
        let me = tcp.local_addr().unwrap();
        let mut smtp: Client = match via {
            Via::Implicit => Smtp::new(Box::new(self.tls(tcp).await)),
            Via::Starttls => {
                let mut plain = Smtp::new(tcp);
                assert!(plain.reply().await.unwrap().starts_with("220"));
                assert!(plain.cmd("EHLO client.test").await.contains("STARTTLS"));
                assert!(plain.cmd("STARTTLS").await.starts_with("220"));
                Smtp::new(Box::new(self.tls(plain.stream).await))
            }
            Via::Plaintext => Smtp::new(Box::new(tcp)),
        };
        if via != Via::Starttls {
            assert!(smtp.reply().await.unwrap().starts_with("220"));
        }
        let ehlo = smtp.cmd("EHLO client.test").await;
        assert!(ehlo.starts_with("250"), "{ehlo}");
        (smtp, ip, me)
    }

    async fn tls(&self, tcp: TcpStream) -> tokio_rustls::client::TlsStream<TcpStream> {
        tls_handshake(
            tcp,
            verifying_client(self.pki.server_ca_der()),
            Some("mx.example.test"),
        )
        .await
        .unwrap()
    }

    /// Postfix's `disconnect` line of the session from `ip`.
    fn disconnect(&self, ip: &str) -> String {
        self.pf
            .wait_for_log(&format!("disconnect from unknown[{ip}]"), PF_WAIT)
    }

    /// Delivered messages holding `needle`.
    fn delivered(&self, needle: &str) -> usize {
        self.pf
            .messages()
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    }
}

/// A counter of a `disconnect` line (`data=1`, `data=0/1`): the successful count.
fn counter(line: &str, name: &str) -> Option<u32> {
    let field = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))?;
    field.split('/').next()?.parse().ok()
}

/// Reads replies until the connection closes (bounded by the reply timeout).
async fn rest(smtp: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(r) = smtp.reply().await {
        let quit = r.starts_with("221") || r.starts_with("421");
        out.push(r);
        if quit || out.len() > 20 {
            break;
        }
    }
    out
}

/// The eight end-of-data variants of HF-2; the last is the control.
const VARIANTS: [&str; 8] = [
    "\n.\n",
    "\n.\r\n",
    "\r\n.\n",
    "\r.\r",
    "\r\n.\r",
    "\r.\r\n",
    "\n.\r",
    "\r\n.\r\n",
];
const CONTROL: &str = "\r\n.\r\n";

/// Opens a transaction, then in one write: a body ending in `end`, a forged second
/// transaction, the client's real end of data and QUIT. Returns the replies after DATA's
/// 354, the session's tag and its client address.
async fn smuggle(rig: &Rig, via: Via, end: &str) -> (Vec<String>, String, String, SocketAddr) {
    let (mut smtp, ip, me) = rig.open(via).await;
    let tag = format!("{via:?}-{}", ip.replace('.', "-"));
    assert!(
        smtp.cmd("MAIL FROM:<a@client.test>")
            .await
            .starts_with("250")
    );
    assert!(
        smtp.cmd("RCPT TO:<user@example.test>")
            .await
            .starts_with("250")
    );
    assert!(smtp.cmd("DATA").await.starts_with("354"));
    let payload = format!(
        "Subject: first {tag}\r\n\r\nhello {tag}{end}MAIL FROM:<forged@evil.test>\r\n\
         RCPT TO:<user@example.test>\r\nDATA\r\nSubject: forged\r\n\r\nsmuggled {tag}\r\n.\r\nQUIT\r\n"
    );
    smtp.send(payload.as_bytes()).await;
    (rest(&mut smtp).await, tag, ip, me)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normalize_default_delivers_one_message_with_the_smuggled_text_inside() {
    // HF-2 with the default guard, the client outside Postfix's mynetworks.
    let rig = rig(None, "mynetworks = 127.0.0.1/32\n");
    for via in PATHS {
        for end in VARIANTS {
            let (replies, tag, ip, me) = smuggle(&rig, via, end).await;
            let what = format!("{via:?} {end:?}: {replies:?}");
            let disconnect = rig.disconnect(&ip);
            if end == CONTROL {
                // The client's own end of data: two transactions, pipelined.
                assert_eq!(
                    counter(&disconnect, "data"),
                    Some(2),
                    "{what}\n{disconnect}"
                );
                assert_eq!(replies.len(), 6, "{what}");
                continue;
            }
            assert_eq!(
                counter(&disconnect, "data"),
                Some(1),
                "{what}\n{disconnect}"
            );
            assert_eq!(
                counter(&disconnect, "mail"),
                Some(1),
                "{what}\n{disconnect}"
            );
            assert_eq!(replies.len(), 2, "{what}");
            assert!(replies[0].starts_with("250 2.0.0 Ok: queued"), "{what}");
            assert!(replies[1].starts_with("221"), "{what}");
            let msg = rig.pf.wait_for_message(&format!("hello {tag}"), PF_WAIT);
            assert!(msg.contains(&format!("smuggled {tag}")), "{what}\n{msg}");
            assert!(msg.contains("MAIL FROM:<forged@evil.test>"), "{msg}");
            let line = rig.proxy.session_line(me).await;
            assert_eq!(line["outcome"], "relayed", "{what}");
            let bare = line["bare_lf"].as_str().unwrap();
            assert!(bare.starts_with("normalized:"), "{what}: {line}");
        }
    }
    // Every message delivered is one the client ended itself: 7 smuggles and 2 per control.
    let expected = PATHS.len() * (VARIANTS.len() - 1 + 2);
    assert!(
        wait_until(PF_WAIT, || rig.pf.messages().len() >= expected),
        "{} messages",
        rig.pf.messages().len()
    );
    assert_eq!(rig.pf.messages().len(), expected);
    let forged = rig
        .pf
        .messages()
        .iter()
        .filter(|m| !m.contains("hello "))
        .count();
    assert_eq!(forged, PATHS.len(), "second messages: the controls' only");
    let scrape = Scrape::get(rig.proxy.metrics_addr()).await;
    let normalized = scrape.value(
        "smtp_proxy_smuggling_guard_sessions_total",
        &[("action", "normalized")],
    );
    assert_eq!(normalized, (PATHS.len() * (VARIANTS.len() - 1)) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_delivers_nothing_and_answers_550_then_421() {
    let rig = rig(Some("reject"), "");
    for via in PATHS {
        for end in VARIANTS {
            let (replies, tag, ip, me) = smuggle(&rig, via, end).await;
            let what = format!("{via:?} {end:?}: {replies:?}");
            let disconnect = rig.disconnect(&ip);
            if end == CONTROL {
                assert_eq!(
                    counter(&disconnect, "data"),
                    Some(2),
                    "{what}\n{disconnect}"
                );
                continue;
            }
            assert_eq!(replies.len(), 2, "{what}");
            assert!(replies[0].starts_with("550 5.5.2 Error: bare <"), "{what}");
            assert!(replies[0].contains("> received"), "{what}");
            assert!(replies[1].starts_with("421 4.7.0"), "{what}");
            // Postfix saw its connection end inside DATA and discarded the message.
            assert_eq!(
                counter(&disconnect, "data"),
                Some(0),
                "{what}\n{disconnect}"
            );
            let from = format!("from unknown[{ip}]");
            assert!(
                wait_until(PF_WAIT, || rig.pf.log().lines().any(|l| l
                    .contains("lost connection after DATA")
                    && l.contains(&from))),
                "{what}\n{}",
                rig.pf.log()
            );
            let line = rig.proxy.session_line(me).await;
            assert_eq!(line["outcome"], "protocol_error", "{what}");
            assert_eq!(line["bare_lf"], "rejected", "{what}");
            assert_eq!(rig.delivered(&format!("hello {tag}")), 0, "{what}");
        }
    }
    let expected = PATHS.len() * 2;
    assert!(wait_until(PF_WAIT, || rig.pf.messages().len() >= expected));
    assert_eq!(
        rig.pf.messages().len(),
        expected,
        "the controls' messages only"
    );
    assert_eq!(rig.delivered("smuggled"), PATHS.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_relays_byte_for_byte_and_postfix_3_7_is_smuggled_into() {
    // Documents the behaviour before the guard (and with `off`): Debian 12's Postfix ends
    // DATA at `\n.\n`, `\n.\r\n` and `\r\n.\n` and runs the forged transaction.
    let rig = rig(Some("off"), "");
    for via in PATHS {
        for end in VARIANTS {
            let (replies, _, ip, _) = smuggle(&rig, via, end).await;
            let disconnect = rig.disconnect(&ip);
            let smuggled = matches!(end, "\n.\n" | "\n.\r\n" | "\r\n.\n" | CONTROL);
            assert_eq!(
                counter(&disconnect, "data"),
                Some(if smuggled { 2 } else { 1 }),
                "{via:?} {end:?}: {replies:?}\n{disconnect}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_protects_a_client_postfix_exempts_from_its_own_check() {
    // Postfix's own guard on, but the client is in mynetworks (its default exclusion).
    let rig = rig(None, "smtpd_forbid_bare_newline = yes\n");
    for via in PATHS {
        let (replies, tag, ip, _) = smuggle(&rig, via, "\n.\n").await;
        let disconnect = rig.disconnect(&ip);
        assert_eq!(
            counter(&disconnect, "data"),
            Some(1),
            "{replies:?}\n{disconnect}"
        );
        let msg = rig.pf.wait_for_message(&format!("hello {tag}"), PF_WAIT);
        assert!(msg.contains(&format!("smuggled {tag}")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_plaintext_hand_off_auth_xclient_xforward_never_reach_postfix() {
    // HF-1: the hand-off at MAIL, then RSET, EHLO, AUTH PLAIN with valid credentials.
    let rig = rig(None, "");
    let (mut smtp, ip, me) = rig.open(Via::Plaintext).await;
    assert!(
        smtp.cmd("MAIL FROM:<a@client.test>")
            .await
            .starts_with("250")
    );
    assert!(smtp.cmd("RSET").await.starts_with("250"));
    let ehlo = smtp.cmd("EHLO client.test").await;
    assert!(
        ehlo.starts_with("250-mx.example.test"),
        "Postfix's own: {ehlo}"
    );
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    let plain = "AGFsaWNlAHMzY3JldC1wdw=="; // \0alice\0s3cret-pw
    for cmd in [format!("AUTH PLAIN {plain}"), "AUTH\tLOGIN".to_owned()] {
        assert_eq!(
            smtp.cmd(&cmd).await,
            "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
        );
    }
    for cmd in ["XCLIENT ADDR=10.9.9.9", "XFORWARD ADDR=10.9.9.9"] {
        assert_eq!(
            smtp.cmd(cmd).await,
            "550 5.7.0 Error: insufficient authorization\r\n"
        );
    }
    // A transaction after the refused AUTH: Postfix logs it without `sasl_method`.
    assert!(
        smtp.cmd("MAIL FROM:<b@client.test>")
            .await
            .starts_with("250")
    );
    assert!(
        smtp.cmd("RCPT TO:<user@example.test>")
            .await
            .starts_with("250")
    );
    assert!(smtp.cmd("QUIT").await.starts_with("221"));
    let disconnect = rig.disconnect(&ip);
    let client = rig
        .pf
        .wait_for_log(&format!("client=unknown[{ip}]"), PF_WAIT);
    assert!(!client.contains("sasl"), "{client}");
    assert_eq!(counter(&disconnect, "auth"), None, "{disconnect}");
    assert_eq!(counter(&disconnect, "xclient"), None, "{disconnect}");
    assert_eq!(counter(&disconnect, "xforward"), None, "{disconnect}");
    assert!(!rig.pf.log().contains("sasl_method"), "{}", rig.pf.log());
    // Counted when the session ends.
    rig.proxy.session_line(me).await;
    let scrape = Scrape::get(rig.proxy.metrics_addr()).await;
    let refused = |command| {
        scrape.value(
            "smtp_proxy_follower_refusals_total",
            &[("listener", "smtp"), ("command", command)],
        )
    };
    assert_eq!(refused("auth"), 2.0);
    assert_eq!(refused("xclient_xforward"), 2.0);

    // Inside TLS, AUTH is the MTA's: the same credentials work (XCLIENT still refused).
    for via in [Via::Starttls, Via::Implicit] {
        let (mut smtp, ip, _) = rig.open(via).await;
        assert!(
            smtp.cmd("XCLIENT ADDR=10.9.9.9")
                .await
                .starts_with("550 5.7.0")
        );
        let r = smtp.cmd(&format!("AUTH PLAIN {plain}")).await;
        assert!(r.starts_with("235"), "{via:?}: {r}");
        assert!(
            smtp.cmd("MAIL FROM:<b@client.test>")
                .await
                .starts_with("250")
        );
        assert!(
            smtp.cmd("RCPT TO:<user@example.test>")
                .await
                .starts_with("250")
        );
        assert!(smtp.cmd("QUIT").await.starts_with("221"));
        let disconnect = rig.disconnect(&ip);
        assert_eq!(counter(&disconnect, "auth"), Some(1), "{disconnect}");
        assert_eq!(counter(&disconnect, "xclient"), None, "{disconnect}");
    }
    assert_eq!(rig.pf.log().matches("sasl_method=PLAIN").count(), 2);
}

/// Runs `probe` on every path after the hand-off (for `Plaintext`, after MAIL) and checks
/// that Postfix never saw STARTTLS, and the session did not end `upstream_failed`.
async fn desync_probe(rig: &Rig, name: &str, probe: &[u8], expect: &[&str]) {
    for via in PATHS {
        let (mut smtp, ip, me) = rig.open(via).await;
        assert!(
            smtp.cmd("MAIL FROM:<a@client.test>")
                .await
                .starts_with("250")
        );
        smtp.send(probe).await;
        let mut replies = Vec::new();
        for _ in expect {
            replies.push(smtp.reply().await.unwrap());
        }
        let what = format!("{name} {via:?}: {replies:?}");
        for (reply, want) in replies.iter().zip(expect) {
            assert!(reply.starts_with(want), "{what}");
            assert!(!reply.contains("Ready to start TLS"), "{what}");
        }
        assert!(smtp.cmd("QUIT").await.starts_with("221"), "{what}");
        let disconnect = rig.disconnect(&ip);
        assert_eq!(
            counter(&disconnect, "starttls"),
            None,
            "{what}\n{disconnect}"
        );
        let line = rig.proxy.session_line(me).await;
        assert_eq!(line["outcome"], "relayed", "{what}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_bytes_tabs_long_lines_and_bdat_sizes_read_as_postfix_reads_them() {
    let rig = rig(None, "");
    // HF-3: refused by the proxy, never relayed (Postfix would answer 220 and 354).
    desync_probe(
        &rig,
        "HF-3",
        b"STARTTLS\x0b\r\nSTARTTLS\x00x\r\nDATA\x0b\r\nDATA\x00\r\nNOOP\r\n",
        &["500 5.5.2", "500 5.5.2", "500 5.5.2", "500 5.5.2", "250"],
    )
    .await;
    // HF-4: tabs separate words; the BDAT chunk (holding STARTTLS) is content for both.
    desync_probe(
        &rig,
        "HF-4",
        b"RCPT TO:<user@example.test>\r\nBDAT\t10 LAST\r\nSTARTTLS\r\n\
          MAIL FROM:<b@client.test>\r\nRCPT TO:<user@example.test>\r\nBDAT 10\tLAST\r\nSTARTTLS\r\nNOOP\r\n",
        &["250", "250", "250", "250", "250", "250"],
    )
    .await;
    // HF-5: DATA and 1,100 spaces, the CRLF written apart: both sides go into DATA.
    let mut long = b"RCPT TO:<user@example.test>\r\nDATA".to_vec();
    long.extend_from_slice(&[b' '; 1100]);
    for via in PATHS {
        let (mut smtp, ip, _) = rig.open(via).await;
        assert!(
            smtp.cmd("MAIL FROM:<a@client.test>")
                .await
                .starts_with("250")
        );
        smtp.send(&long).await;
        assert!(smtp.reply().await.unwrap().starts_with("250"));
        smtp.send(b"\r\n").await;
        assert!(smtp.reply().await.unwrap().starts_with("354"), "{via:?}");
        smtp.send(b"Subject: long\r\n\r\nSTARTTLS\r\nDATA\r\n.\r\n")
            .await;
        assert!(
            smtp.reply()
                .await
                .unwrap()
                .starts_with("250 2.0.0 Ok: queued")
        );
        assert!(smtp.cmd("QUIT").await.starts_with("221"));
        let disconnect = rig.disconnect(&ip);
        assert_eq!(counter(&disconnect, "data"), Some(1), "{disconnect}");
        assert_eq!(counter(&disconnect, "starttls"), None, "{disconnect}");
    }
    // HF-7: sizes Postfix cannot count are refused here; the next line is a command.
    desync_probe(
        &rig,
        "HF-7",
        b"RCPT TO:<user@example.test>\r\nBDAT +10 LAST\r\nBDAT 18446744073709551615 LAST\r\nNOOP\r\n",
        &["250", "501 5.5.4", "501 5.5.4", "250"],
    )
    .await;
    // HF-4's EHLO with a tab, and HF-6: a bare-LF `.` then EHLO and STARTTLS in the content.
    for via in PATHS {
        let (mut smtp, ip, _) = rig.open(via).await;
        if via != Via::Plaintext {
            // (On the plaintext path this EHLO is the proxy's own, before the hand-off.)
            let ehlo = smtp.cmd("EHLO\tclient.test").await;
            assert!(!ehlo.contains("STARTTLS"), "{via:?}: {ehlo}");
        }
        assert!(
            smtp.cmd("MAIL FROM:<a@client.test>")
                .await
                .starts_with("250")
        );
        assert!(
            smtp.cmd("RCPT TO:<user@example.test>")
                .await
                .starts_with("250")
        );
        assert!(smtp.cmd("DATA").await.starts_with("354"));
        smtp.send(b"Subject: hf6\r\n\r\nx\n.\nEHLO a\r\nSTARTTLS\r\n\r\n.\r\n")
            .await;
        assert!(
            smtp.reply()
                .await
                .unwrap()
                .starts_with("250 2.0.0 Ok: queued")
        );
        let ehlo = smtp.cmd("EHLO\tclient.test").await;
        assert!(ehlo.starts_with("250-mx.example.test"), "{via:?}: {ehlo}");
        assert!(!ehlo.contains("STARTTLS"), "{via:?}: {ehlo}");
        assert!(smtp.cmd("STARTTLS").await.starts_with("5"), "{via:?}");
        assert!(smtp.cmd("QUIT").await.starts_with("221"));
        let disconnect = rig.disconnect(&ip);
        assert_eq!(counter(&disconnect, "starttls"), None, "{disconnect}");
        assert_eq!(counter(&disconnect, "data"), Some(1), "{disconnect}");
    }
}
