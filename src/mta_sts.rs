//! MTA-STS policy host (RFC 8461): the policy text of each configured domain, its id, and
//! what a request to an `https` listener gets. Sans IO; `session::https` serves it with
//! hyper (HTTP/1.1 only: a policy fetch is one small GET, and every MTA-STS client speaks
//! HTTP/1.1; HTTP/2 would add a second parser to the attack surface for nothing).
//!
//! - The text is shaped exactly as RFC 8461 §3.2 shows it: `version`, `mode`, one `mx` line
//!   per pattern, `max_age`, each line ending in CRLF.
//! - The id (§3.1, 1-32 alphanumerics) is the first 10 bytes of the text's SHA-256 in hex:
//!   it changes exactly when the text changes, so `check` and the served policy agree
//!   without state, across replicas and restarts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use hyper::header::HeaderValue;

use crate::config::{MtaStsConfig, StsMode};
use crate::metrics::MtaStsResult;

/// The path every MTA-STS client fetches.
pub(crate) const POLICY_PATH: &str = "/.well-known/mta-sts.txt";

/// One domain's policy, built once per snapshot (a reload swaps it whole: never half-written),
/// with the response body and ETag a request gets ready-made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) domain: String,
    pub(crate) mx: Vec<String>,
    pub(crate) id: String,
    pub(crate) max_age: u64,
    /// The policy text (RFC 8461 §3.2), shared by every response (a reference count, not a
    /// copy).
    pub(crate) body: Bytes,
    /// `"<id>"`.
    pub(crate) etag: HeaderValue,
}

impl Policy {
    pub(crate) fn new(domain: &str, mode: StsMode, mx: &[String], max_age: u64) -> Self {
        let mut text = format!("version: STSv1\r\nmode: {}\r\n", mode.as_str());
        for pattern in mx {
            let _ = write!(text, "mx: {pattern}\r\n");
        }
        let _ = write!(text, "max_age: {max_age}\r\n");
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
        let id = crate::hex::hex(&digest.as_ref()[..10]);
        let etag = HeaderValue::from_str(&format!("\"{id}\"")).expect("hex is a header value");
        Self {
            domain: domain.to_owned(),
            mx: mx.to_vec(),
            body: Bytes::from(text),
            id,
            max_age,
            etag,
        }
    }

    /// The `_mta-sts` TXT record to publish (RFC 8461 §3.1).
    pub(crate) fn txt_record(&self) -> String {
        format!("_mta-sts.{}. TXT \"v=STSv1; id={}\"", self.domain, self.id)
    }
}

/// Every domain's policy, keyed by the host that serves it (`mta-sts.<domain>`).
#[derive(Debug, Default)]
pub(crate) struct Policies {
    by_host: BTreeMap<String, Arc<Policy>>,
    /// `mailto:` or `https:` URI for TLS-RPT (RFC 8460), when configured.
    pub(crate) report_to: Option<String>,
}

impl Policies {
    pub(crate) fn from_config(config: Option<&MtaStsConfig>) -> Self {
        let Some(config) = config else {
            return Self::default();
        };
        let by_host = config
            .domains
            .iter()
            .map(|d| {
                let policy = Policy::new(&d.domain, d.mode, &d.mx, d.max_age.as_secs());
                (format!("mta-sts.{}", d.domain), Arc::new(policy))
            })
            .collect();
        Self {
            by_host,
            report_to: config.report_to.clone(),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.by_host.values()
    }

    /// The TLS-RPT record template for `domain` (RFC 8460 §3), when `report_to` is set.
    pub(crate) fn tlsrpt_record(&self, domain: &str) -> Option<String> {
        self.report_to
            .as_ref()
            .map(|rua| format!("_smtp._tls.{domain}. TXT \"v=TLSRPTv1; rua={rua}\""))
    }

    /// What a request gets: `host` is the Host header (or the SNI when there is none),
    /// any case, a port or a trailing dot allowed.
    pub(crate) fn answer(&self, method: &str, host: Option<&str>, path: &str) -> Answer {
        let host = host.map(|h| {
            let h = h.rsplit_once(':').map_or(h, |(name, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    name
                } else {
                    h
                }
            });
            h.trim_end_matches('.').to_ascii_lowercase()
        });
        let Some(policy) = host.as_deref().and_then(|h| self.by_host.get(h)) else {
            return Answer::Misdirected;
        };
        let policy = policy.clone();
        if method != "GET" && method != "HEAD" {
            return Answer::MethodNotAllowed(policy);
        }
        if path != POLICY_PATH {
            return Answer::NotFound(policy);
        }
        Answer::Policy(policy)
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// 200 with the policy.
    Policy(Arc<Policy>),
    /// 404: a host we serve, another path.
    NotFound(Arc<Policy>),
    /// 405: a method other than GET or HEAD.
    MethodNotAllowed(Arc<Policy>),
    /// 421: a host we do not serve.
    Misdirected,
}

impl Answer {
    pub(crate) fn status(&self) -> u16 {
        match self {
            Self::Policy(_) => 200,
            Self::NotFound(_) => 404,
            Self::MethodNotAllowed(_) => 405,
            Self::Misdirected => 421,
        }
    }

    /// The domain (for the metric and the session line), if the host was one of ours.
    pub(crate) fn domain(&self) -> Option<&str> {
        match self {
            Self::Policy(p) | Self::NotFound(p) | Self::MethodNotAllowed(p) => Some(&p.domain),
            Self::Misdirected => None,
        }
    }

    pub(crate) fn result(&self) -> MtaStsResult {
        match self {
            Self::Policy(_) => MtaStsResult::Served,
            Self::NotFound(_) => MtaStsResult::NotFound,
            Self::MethodNotAllowed(_) => MtaStsResult::MethodNotAllowed,
            Self::Misdirected => MtaStsResult::Misdirected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies() -> Policies {
        let p = Policy::new(
            "example.org",
            StsMode::Enforce,
            &["mail.example.org".into(), "*.mx.example.org".into()],
            604_800,
        );
        Policies {
            by_host: [("mta-sts.example.org".to_owned(), Arc::new(p))].into(),
            report_to: Some("mailto:tlsrpt@example.org".into()),
        }
    }

    #[test]
    fn the_text_is_rfc_8461_shaped_and_the_id_follows_it() {
        let p = Policy::new(
            "example.org",
            StsMode::Enforce,
            &["mail.example.org".into()],
            86_400,
        );
        assert_eq!(
            p.body,
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.org\r\nmax_age: 86400\r\n"
        );
        assert_eq!(p.id.len(), 20);
        assert!(p.id.bytes().all(|b| b.is_ascii_alphanumeric()));
        let same = Policy::new(
            "example.org",
            StsMode::Enforce,
            &["mail.example.org".into()],
            86_400,
        );
        assert_eq!(p.id, same.id, "the id is a function of the text");
        for changed in [
            Policy::new(
                "example.org",
                StsMode::Testing,
                &["mail.example.org".into()],
                86_400,
            ),
            Policy::new(
                "example.org",
                StsMode::Enforce,
                &["mx.example.org".into()],
                86_400,
            ),
            Policy::new(
                "example.org",
                StsMode::Enforce,
                &["mail.example.org".into()],
                86_401,
            ),
        ] {
            assert_ne!(p.id, changed.id, "{:?}", changed.body);
        }
        assert_eq!(
            p.txt_record(),
            format!("_mta-sts.example.org. TXT \"v=STSv1; id={}\"", p.id)
        );
    }

    #[test]
    fn requests_get_the_policy_404_405_or_421() {
        let ps = policies();
        let ok = ps.answer("GET", Some("mta-sts.example.org"), POLICY_PATH);
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.domain(), Some("example.org"));
        for host in [
            "MTA-STS.Example.ORG",
            "mta-sts.example.org:443",
            "mta-sts.example.org.",
        ] {
            assert_eq!(
                ps.answer("HEAD", Some(host), POLICY_PATH).status(),
                200,
                "{host}"
            );
        }
        assert_eq!(
            ps.answer("GET", Some("mta-sts.example.org"), "/").status(),
            404
        );
        assert_eq!(
            ps.answer(
                "GET",
                Some("mta-sts.example.org"),
                "/.well-known/mta-sts.txt/x"
            )
            .status(),
            404
        );
        assert_eq!(
            ps.answer("POST", Some("mta-sts.example.org"), POLICY_PATH)
                .status(),
            405
        );
        assert_eq!(
            ps.answer("GET", Some("www.example.org"), POLICY_PATH)
                .status(),
            421
        );
        assert_eq!(ps.answer("GET", None, POLICY_PATH).status(), 421);
        assert_eq!(
            ps.answer("GET", Some("mta-sts.example.org:x"), POLICY_PATH)
                .status(),
            421
        );
        assert_eq!(
            ps.tlsrpt_record("example.org").as_deref(),
            Some("_smtp._tls.example.org. TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@example.org\"")
        );
    }
}
