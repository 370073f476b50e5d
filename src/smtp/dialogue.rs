//! The pre-TLS dialogue of a STARTTLS listener as a state machine (sans-IO): line events
//! in, a reply and a `Step` out. The session acts on the step; this module never touches a
//! socket. Decisions (documented in the README): bare LF ends a line; HELO then STARTTLS
//! is accepted; RSET and HELP are answered before TLS even on `require_starttls`
//! listeners; AUTH before TLS is refused on every listener; HTTP verbs close at once.

use super::command::{self, Reading, Verb};
use super::line::LineEvent;

/// Rejected commands before `421 4.7.0` and close (SPEC: 10).
pub(crate) const MAX_ERRORS: u32 = 10;

/// The client's pre-TLS greeting, replayed to the upstream on plaintext pass-through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Greet {
    Ehlo(String),
    Helo(String),
}

impl Greet {
    pub(crate) fn verb(&self) -> &'static str {
        match self {
            Self::Ehlo(_) => "EHLO",
            Self::Helo(_) => "HELO",
        }
    }

    /// The line to replay, re-emitted with CRLF.
    pub(crate) fn line(&self) -> Vec<u8> {
        match self {
            Self::Ehlo(d) => format!("EHLO {d}\r\n").into_bytes(),
            Self::Helo(d) => format!("HELO {d}\r\n").into_bytes(),
        }
    }
}

/// What the session does after sending `reply` (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send the reply, read the next line.
    Reply(Vec<u8>),
    /// Send `220 2.0.0 Ready to start TLS`, drop pipelined bytes, then the handshake.
    StartTls(Vec<u8>),
    /// Plaintext from here on: connect the upstream, replay the greeting, forward `line`
    /// (re-emitted with CRLF) and everything after it.
    PassThrough(Vec<u8>),
    /// The client said QUIT: send the reply and close.
    Quit(Vec<u8>),
    /// Send the reply and close; the client broke the protocol (`reason` is for the log).
    Close { reply: Vec<u8>, reason: CloseReason },
}

/// Why the pre-TLS dialogue closed the connection (the log's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client said QUIT (not an error).
    Quit,
    TooManyErrors,
    /// An HTTP verb: cross-protocol traffic (ALPACA).
    CrossProtocol,
    /// A TLS ClientHello where a STARTTLS dialogue was expected (catalogue SM-13).
    TlsOnStarttlsPort,
}

impl CloseReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Quit => "quit",
            Self::TooManyErrors => "too many errors",
            Self::CrossProtocol => "cross-protocol command (HTTP)",
            Self::TlsOnStarttlsPort => "TLS ClientHello on a STARTTLS port",
        }
    }
}

/// The dialogue of one session.
#[derive(Debug)]
pub(crate) struct Dialogue {
    hostname: String,
    require_starttls: bool,
    capabilities: Vec<String>,
    errors: u32,
    greet: Option<Greet>,
}

impl Dialogue {
    /// `capabilities`: EHLO keywords offered before TLS besides STARTTLS (never AUTH).
    pub(crate) fn new(hostname: &str, require_starttls: bool, capabilities: Vec<String>) -> Self {
        Self {
            hostname: hostname.to_owned(),
            require_starttls,
            capabilities: capabilities
                .into_iter()
                .filter(|c| !is_withheld(c))
                .collect(),
            errors: 0,
            greet: None,
        }
    }

    pub(crate) fn greeting(&self) -> Vec<u8> {
        format!("220 {} ESMTP\r\n", self.hostname).into_bytes()
    }

    pub(crate) fn greet(&self) -> Option<&Greet> {
        self.greet.as_ref()
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn errors(&self) -> u32 {
        self.errors
    }

    pub(crate) fn on_event(&mut self, event: LineEvent) -> Step {
        match event {
            LineEvent::TooLong => self.reject("500 5.5.2 Error: line too long"),
            LineEvent::Line(line) => self.on_line(&line),
        }
    }

    fn on_line(&mut self, line: &[u8]) -> Step {
        // The session's one reading of a command line (`command`), shared with the follower.
        let Reading::Command { verb, arg } = command::read(line) else {
            return self.reject(command::BAD_CHAR);
        };
        let Ok(arg) = std::str::from_utf8(arg) else {
            return self.reject(command::BAD_CHAR);
        };
        match verb {
            Verb::Ehlo if arg.is_empty() => self.reject("501 5.5.4 Syntax: EHLO hostname"),
            Verb::Ehlo => {
                self.greet = Some(Greet::Ehlo(arg.to_owned()));
                Step::Reply(self.ehlo_reply())
            }
            Verb::Helo if arg.is_empty() => self.reject("501 5.5.4 Syntax: HELO hostname"),
            Verb::Helo => {
                self.greet = Some(Greet::Helo(arg.to_owned()));
                Step::Reply(format!("250 {}\r\n", self.hostname).into_bytes())
            }
            Verb::Noop | Verb::Rset => Step::Reply(b"250 2.0.0 OK\r\n".to_vec()),
            Verb::Help => Step::Reply(b"214 2.0.0 See RFC 5321\r\n".to_vec()),
            Verb::Quit => Step::Quit(b"221 2.0.0 Bye\r\n".to_vec()),
            Verb::Starttls if !arg.is_empty() => self.reject("501 5.5.4 Syntax: STARTTLS"),
            Verb::Starttls => Step::StartTls(b"220 2.0.0 Ready to start TLS\r\n".to_vec()),
            // Credentials never travel in plaintext, whatever the listener says.
            Verb::Auth => self.reject("530 5.7.0 Must issue a STARTTLS command first"),
            Verb::Mail
            | Verb::Rcpt
            | Verb::Data
            | Verb::Bdat
            | Verb::Vrfy
            | Verb::Expn
            | Verb::Etrn
                if self.require_starttls =>
            {
                self.reject("530 5.7.0 Must issue a STARTTLS command first")
            }
            Verb::Mail
            | Verb::Rcpt
            | Verb::Data
            | Verb::Bdat
            | Verb::Vrfy
            | Verb::Expn
            | Verb::Etrn => Step::PassThrough(line.to_vec()),
            // Cross-protocol attempts (ALPACA, HTTP to port 25): no dialogue with them.
            Verb::Http => Step::Close {
                reply: b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n".to_vec(),
                reason: CloseReason::CrossProtocol,
            },
            Verb::Xclient | Verb::Xforward | Verb::Other => {
                self.reject("502 5.5.2 Error: command not recognized")
            }
        }
    }

    fn reject(&mut self, reply: &str) -> Step {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            return Step::Close {
                reply: format!(
                    "{reply}\r\n421 4.7.0 {} Error: too many errors\r\n",
                    self.hostname
                )
                .into_bytes(),
                reason: CloseReason::TooManyErrors,
            };
        }
        Step::Reply(format!("{reply}\r\n").into_bytes())
    }

    fn ehlo_reply(&self) -> Vec<u8> {
        let mut out = format!("250-{}\r\n", self.hostname);
        for c in &self.capabilities {
            out.push_str(&format!("250-{c}\r\n"));
        }
        out.push_str("250 STARTTLS\r\n");
        out.into_bytes()
    }
}

/// Keywords never advertised before TLS: AUTH (credentials in plaintext), STARTTLS (added
/// by us), and proxy-only extensions the client must not use.
fn is_withheld(keyword: &str) -> bool {
    let upper = keyword.to_ascii_uppercase();
    let name = upper.split([' ', '=']).next().unwrap_or_default();
    matches!(name, "AUTH" | "STARTTLS" | "XCLIENT" | "XFORWARD")
}

/// The conservative set offered while the upstream's own set is unknown: extensions every
/// MTA this proxy fronts (Postfix, Exim, mox, Stalwart) supports.
pub(crate) fn default_capabilities() -> Vec<String> {
    ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(d: &mut Dialogue, line: &str) -> Step {
        d.on_event(LineEvent::Line(line.as_bytes().to_vec()))
    }

    fn text(step: &Step) -> String {
        match step {
            Step::Reply(r) | Step::StartTls(r) | Step::Quit(r) | Step::Close { reply: r, .. } => {
                String::from_utf8_lossy(r).into_owned()
            }
            Step::PassThrough(l) => format!("pass {}", String::from_utf8_lossy(l)),
        }
    }

    fn port25() -> Dialogue {
        let mut caps = default_capabilities();
        caps.push("AUTH PLAIN LOGIN".into());
        caps.push("STARTTLS".into());
        Dialogue::new("mx.example.test", false, caps)
    }

    #[test]
    fn ehlo_offers_starttls_and_never_auth() {
        let mut d = port25();
        assert_eq!(d.greeting(), b"220 mx.example.test ESMTP\r\n");
        let r = text(&run(&mut d, "EHLO client.test"));
        assert!(r.starts_with("250-mx.example.test\r\n"));
        assert!(r.ends_with("250 STARTTLS\r\n"));
        assert_eq!(r.matches("STARTTLS").count(), 1);
        assert!(!r.contains("AUTH"));
        assert_eq!(d.greet(), Some(&Greet::Ehlo("client.test".into())));
    }

    #[test]
    fn starttls_rules() {
        let mut d = port25();
        assert!(text(&run(&mut d, "STARTTLS now")).starts_with("501 5.5.4"));
        assert!(matches!(run(&mut d, "starttls"), Step::StartTls(_)));
        assert!(matches!(run(&mut d, "StartTLS"), Step::StartTls(_)));
    }

    #[test]
    fn port_25_passes_mail_through_and_587_refuses_it() {
        let mut d = port25();
        assert_eq!(
            text(&run(&mut d, "MAIL FROM:<a@b>")),
            "pass MAIL FROM:<a@b>"
        );
        let mut d = Dialogue::new("mx", true, default_capabilities());
        for cmd in [
            "MAIL FROM:<a@b>",
            "RCPT TO:<a@b>",
            "DATA",
            "BDAT 1 LAST",
            "AUTH PLAIN x",
        ] {
            assert!(
                text(&run(&mut d, cmd))
                    .starts_with("530 5.7.0 Must issue a STARTTLS command first")
            );
        }
        assert!(text(&run(&mut d, "AUTH PLAIN x")).starts_with("530"));
        let mut d = port25();
        assert!(
            text(&run(&mut d, "AUTH PLAIN x")).starts_with("530"),
            "AUTH never before TLS"
        );
    }

    #[test]
    fn simple_commands_are_answered_locally() {
        let mut d = port25();
        assert!(text(&run(&mut d, "NOOP")).starts_with("250"));
        assert!(text(&run(&mut d, "RSET")).starts_with("250"));
        assert!(text(&run(&mut d, "HELP")).starts_with("214"));
        assert!(text(&run(&mut d, "HELO x")).starts_with("250 mx.example.test"));
        assert!(text(&run(&mut d, "EHLO")).starts_with("501"));
        assert!(matches!(run(&mut d, "QUIT"), Step::Quit(r) if r.starts_with(b"221")));
    }

    #[test]
    fn nul_bytes_and_long_lines_are_errors() {
        let mut d = port25();
        assert!(text(&d.on_event(LineEvent::Line(b"EH\0LO a".to_vec()))).starts_with("500 5.5.2"));
        assert!(text(&d.on_event(LineEvent::TooLong)).starts_with("500 5.5.2"));
        assert!(text(&run(&mut d, "EHLO a\rb")).starts_with("500 5.5.2"));
        assert_eq!(d.errors(), 3);
    }

    #[test]
    fn tenth_error_closes_with_421() {
        let mut d = port25();
        for _ in 0..MAX_ERRORS - 1 {
            assert!(text(&run(&mut d, "FOO")).starts_with("502"));
        }
        match run(&mut d, "FOO") {
            Step::Close { reply, reason } => {
                assert_eq!(reason, CloseReason::TooManyErrors);
                let r = String::from_utf8(reply).unwrap();
                assert!(r.starts_with("502"));
                assert!(r.contains("\r\n421 4.7.0 "));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn http_is_refused_at_once() {
        let mut d = port25();
        assert!(matches!(run(&mut d, "GET / HTTP/1.1"), Step::Close { .. }));
    }
}
