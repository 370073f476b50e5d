//! Following the SMTP stream after the hand-off (sans-IO), so the proxy reads the session
//! exactly as the MTA does (catalogue §D2, SPEC §4 "Details"). Command lines are read with
//! the session's one reading (`command`): STARTTLS is answered here (never relayed) and
//! stripped from every EHLO reply; after a plaintext hand-off AUTH gets `538 5.7.11` and is
//! stripped too; XCLIENT/XFORWARD are refused after every hand-off; a line with a control
//! byte and a malformed BDAT are refused here. Content: DATA runs to the strict `CRLF.CRLF`
//! and passes through the smuggling guard (`guard`); BDAT content is counted and passes
//! byte for byte (length-framed: nothing to smuggle). Each command the upstream answers
//! queues an `Expect`; replies are matched in order (RFC 2920).

use std::collections::VecDeque;

use super::command::{self, Reading, Verb};
use super::ehlo::strip_keywords;
use super::guard::{Bare, Guard, GuardMode};
use super::reply::{ReplyError, parse_reply};
use crate::metrics::FollowerRefusal;

/// A command line longer than this is classified by its first bytes (its verb) and, when
/// it is relayed at all, forwarded as it streams.
pub(crate) const MAX_TRACKED_LINE: usize = 1024;

/// Replies owed to the client, at most: beyond this no client byte is read until the
/// upstream has answered (a client pipelining refused commands cannot grow the queue).
pub(crate) const MAX_OWED: usize = 256;

const END_OF_DATA: &[u8; 5] = b"\r\n.\r\n";

/// Searches message content for the end of DATA, `matched` bytes of it already seen.
/// Returns how many bytes of `input` belong to the content (the terminator included when
/// found) and how much of the terminator is matched after them (5: found).
///
/// A terminator begun earlier (or the CRLF implied before the first content byte) is
/// finished byte by byte; the rest is one SIMD substring search (memchr's memmem) rather
/// than a stop at every CR, which with mail's ~80-byte lines was a call per line. For this
/// needle, falling back to "0, or 1 if the byte is CR" on a mismatch is exact (no proper
/// suffix of a partial match is a longer prefix), so both halves agree with the plain byte
/// automaton; `tests::data_scan_matches_the_byte_automaton` checks it.
pub(crate) fn scan_data(input: &[u8], mut matched: usize) -> (usize, usize) {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(END_OF_DATA));
    let end = END_OF_DATA.len();
    let mut i = 0;
    while matched > 0 && matched < end && i < input.len() {
        let b = input[i];
        i += 1;
        matched = if b == END_OF_DATA[matched] {
            matched + 1
        } else {
            usize::from(b == b'\r')
        };
    }
    if matched == end || i == input.len() {
        return (i, matched);
    }
    let rest = &input[i..];
    match FINDER.find(rest) {
        Some(at) => (i + at + end, end),
        None => {
            // The longest tail of the input that starts the terminator.
            let tail = (1..end)
                .rev()
                .find(|&k| rest.ends_with(&END_OF_DATA[..k]))
                .unwrap_or(0);
            (input.len(), tail)
        }
    }
}

/// What the client is owed next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expect {
    /// A reply from the upstream to a forwarded command.
    Upstream(ReplyKind),
    /// A reply of ours, sent once every earlier reply has been sent.
    Local(&'static [u8]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyKind {
    Ehlo,
    Data,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Command,
    /// DATA was sent: no client byte is interpreted until its reply (354 or an error).
    AwaitDataReply,
    /// In DATA content; with the guard `off`, this many bytes of `END_OF_DATA` matched.
    Data(usize),
    /// This many BDAT content bytes still to pass.
    Bdat(u64),
    /// The guard refused the content (`reject`): the session ends once the client has
    /// its reply; client bytes are discarded.
    Closed,
}

/// What the proxy does with a command line, decided from its reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Relay it; the upstream's reply is of this kind.
    Forward(ReplyKind),
    /// Relay it; the reply decides whether content follows (354).
    Data,
    /// Relay it; this many content bytes follow.
    Bdat(u64),
    /// Answer it here with this reply; never relayed.
    Refuse(FollowerRefusal),
}

/// Which way the session reached the follower: the refusals differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// Inside TLS (implicit, or upgraded by STARTTLS).
    Tls,
    /// A plaintext hand-off on a STARTTLS listener (port 25 without `require_starttls`).
    Plaintext,
}

/// Our reply to STARTTLS inside TLS, upgraded or implicit (Postfix's text; RFC 8314 §3.3).
pub(crate) const STARTTLS_IN_TLS: &[u8] = b"554 5.5.1 Error: TLS already active\r\n";
/// After a plaintext hand-off: the session can no longer be upgraded.
pub(crate) const STARTTLS_AFTER_HANDOFF: &[u8] =
    b"502 5.5.1 Error: STARTTLS is only available before the first mail command\r\n";
/// AUTH in plaintext (RFC 4954 §6): credentials never travel in the clear.
pub(crate) const AUTH_IN_PLAINTEXT: &[u8] =
    b"538 5.7.11 Encryption required for requested authentication mechanism\r\n";
/// XCLIENT/XFORWARD from a client: only the proxy speaks for the client (Postfix's text).
pub(crate) const NOT_AUTHORIZED: &[u8] = b"550 5.7.0 Error: insufficient authorization\r\n";
const BAD_CHAR: &[u8] = b"500 5.5.2 Error: bad character in command\r\n";
const LINE_TOO_LONG: &[u8] = b"500 5.5.2 Error: line too long\r\n";
const BDAT_SYNTAX: &[u8] = b"501 5.5.4 Syntax: BDAT count [LAST]\r\n";
/// The guard's `reject` (Postfix's text for `smtpd_forbid_bare_newline`).
const BARE_LF: &[u8] = b"550 5.5.2 Error: bare <LF> received\r\n";
const BARE_CR: &[u8] = b"550 5.5.2 Error: bare <CR> received\r\n";

/// What the smuggling guard did in a session (the `bare_lf` log field and its metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuardAction {
    /// Bare line endings were made CRLF (and `.` lines stuffed): this many bytes inserted.
    Normalized(u64),
    /// The content was refused and the session closed.
    Rejected,
}

impl GuardAction {
    /// The metric's `action` label.
    pub(crate) fn action(self) -> crate::metrics::GuardAction {
        match self {
            Self::Normalized(_) => crate::metrics::GuardAction::Normalized,
            Self::Rejected => crate::metrics::GuardAction::Rejected,
        }
    }
}

impl std::fmt::Display for GuardAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Normalized(n) => write!(f, "normalized:{n}"),
            Self::Rejected => f.write_str("rejected"),
        }
    }
}

/// Both directions' parse state of one session.
#[derive(Debug)]
pub(crate) struct SmtpStream {
    state: State,
    path: Path,
    line: Vec<u8>,
    /// An over-long command line in progress, with what its first bytes decided.
    long: Option<Action>,
    replies: Vec<u8>,
    pub expects: VecDeque<Expect>,
    guard: Guard,
    /// Set when `reject` trips, taken once by the relay, which then closes the upstream.
    abort_upstream: bool,
    /// Commands answered here, by kind (in `FollowerRefusal::ALL` order).
    refused: [u64; FollowerRefusal::ALL.len()],
}

impl Default for SmtpStream {
    fn default() -> Self {
        Self::new(Path::Tls, GuardMode::default())
    }
}

impl SmtpStream {
    pub(crate) fn new(path: Path, guard: GuardMode) -> Self {
        Self {
            state: State::Command,
            path,
            line: Vec::new(),
            long: None,
            replies: Vec::new(),
            expects: VecDeque::new(),
            guard: Guard::new(guard),
            abort_upstream: false,
            refused: [0; FollowerRefusal::ALL.len()],
        }
    }

    /// Gives back buffer capacity kept from earlier traffic (an idle session's memory).
    pub(crate) fn release(&mut self) {
        self.line.shrink_to_fit();
        self.replies.shrink_to_fit();
        self.expects.shrink_to_fit();
    }

    /// Whether client input may be processed now: not while a DATA reply is awaited, not
    /// while `MAX_OWED` replies are owed, not after the guard closed the session.
    pub(crate) fn wants_client_input(&self) -> bool {
        !matches!(self.state, State::AwaitDataReply | State::Closed)
            && self.expects.len() < MAX_OWED
    }

    /// True once, when the guard's `reject` has tripped: the caller closes the upstream
    /// connection now, mid-DATA, so the MTA discards the partial message.
    pub(crate) fn take_abort_upstream(&mut self) -> bool {
        std::mem::take(&mut self.abort_upstream)
    }

    /// The session is over (the guard refused the content): once `to_client` is written,
    /// the caller closes with a 421.
    pub(crate) fn is_closed(&self) -> bool {
        self.state == State::Closed && self.expects.is_empty()
    }

    /// What the guard did over the session, if anything.
    pub(crate) fn guard_action(&self) -> Option<GuardAction> {
        match self.guard.mode() {
            GuardMode::Reject if self.guard.tripped().is_some() => Some(GuardAction::Rejected),
            // Every bare line ending inserts a byte, so this is "any bare line ending".
            GuardMode::Normalize if self.guard.inserted > 0 => {
                Some(GuardAction::Normalized(self.guard.inserted))
            }
            _ => None,
        }
    }

    /// Processes client bytes: what to forward goes to `to_upstream`, replies of ours to
    /// `to_client`. Returns how many bytes were consumed (fewer when a DATA reply must come
    /// first, or too many replies are owed; the caller keeps the rest).
    pub(crate) fn client_bytes(
        &mut self,
        input: &[u8],
        to_upstream: &mut Vec<u8>,
        to_client: &mut Vec<u8>,
    ) -> usize {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::AwaitDataReply => break,
                State::Closed => i = input.len(),
                State::Bdat(left) => {
                    let n = (left.min((input.len() - i) as u64)) as usize;
                    to_upstream.extend_from_slice(&input[i..i + n]);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Command
                    } else {
                        State::Bdat(left)
                    };
                }
                State::Data(matched) if self.guard.mode() == GuardMode::Off => {
                    let start = i;
                    let (used, matched) = scan_data(&input[i..], matched);
                    i += used;
                    to_upstream.extend_from_slice(&input[start..i]);
                    if matched == END_OF_DATA.len() {
                        self.expects.push_back(Expect::Upstream(ReplyKind::Other));
                        self.state = State::Command;
                    } else {
                        self.state = State::Data(matched);
                    }
                }
                State::Data(_) => {
                    let was_tripped = self.guard.tripped().is_some();
                    let scanned = self.guard.content(&input[i..], to_upstream);
                    i += scanned.used;
                    let rejected = self.guard.mode() == GuardMode::Reject;
                    let tripped = self.guard.tripped();
                    if rejected && !was_tripped && tripped.is_some() {
                        self.abort_upstream = true;
                    }
                    if scanned.end {
                        self.state = match tripped.filter(|_| rejected) {
                            Some(bare) => {
                                let reply = if bare == Bare::Cr { BARE_CR } else { BARE_LF };
                                self.expects.push_back(Expect::Local(reply));
                                i = input.len();
                                State::Closed
                            }
                            None => {
                                self.expects.push_back(Expect::Upstream(ReplyKind::Other));
                                State::Command
                            }
                        };
                    }
                }
                State::Command if self.expects.len() >= MAX_OWED => break,
                State::Command => i += self.command_bytes(&input[i..], to_upstream),
            }
        }
        self.flush_locals(to_client);
        i
    }

    /// Command-state bytes: up to and including one line end, or all of `rest`.
    fn command_bytes(&mut self, rest: &[u8], to_upstream: &mut Vec<u8>) -> usize {
        let Some(lf) = memchr::memchr(b'\n', rest) else {
            match self.long {
                Some(action) => {
                    if action_forwards(action) {
                        to_upstream.extend_from_slice(rest);
                    }
                }
                None if self.line.len() + rest.len() > MAX_TRACKED_LINE => {
                    let mut head = std::mem::take(&mut self.line);
                    head.extend_from_slice(rest);
                    let action = self.head_action(&head);
                    if action_forwards(action) {
                        to_upstream.extend_from_slice(&head);
                    }
                    self.long = Some(action);
                }
                None => self.line.extend_from_slice(rest),
            }
            return rest.len();
        };
        let part = &rest[..=lf];
        if let Some(action) = self.long.take() {
            if action_forwards(action) {
                to_upstream.extend_from_slice(part);
            }
            self.act(action);
            return lf + 1;
        }
        let action = if self.line.is_empty() {
            let action = self.line_action(part);
            if action_forwards(action) {
                to_upstream.extend_from_slice(part);
            }
            action
        } else {
            self.line.extend_from_slice(part);
            let action = self.line_action(&self.line);
            if action_forwards(action) {
                to_upstream.extend_from_slice(&self.line);
            }
            self.line.clear();
            action
        };
        self.act(action);
        lf + 1
    }

    /// A complete command line (its terminator included).
    fn line_action(&self, line: &[u8]) -> Action {
        let Reading::Command { verb, arg } = command::read(command::strip_terminator(line)) else {
            return Action::Refuse(FollowerRefusal::BadCharacter);
        };
        match verb {
            Verb::Starttls => Action::Refuse(FollowerRefusal::Starttls),
            Verb::Auth if self.path == Path::Plaintext => Action::Refuse(FollowerRefusal::Auth),
            Verb::Xclient | Verb::Xforward => Action::Refuse(FollowerRefusal::ProxyExtension),
            Verb::Ehlo | Verb::Helo => Action::Forward(ReplyKind::Ehlo),
            Verb::Data => Action::Data,
            Verb::Bdat => match command::bdat_size(arg) {
                Some((size, _)) => Action::Bdat(size),
                None => Action::Refuse(FollowerRefusal::BdatSyntax),
            },
            _ => Action::Forward(ReplyKind::Other),
        }
    }

    /// The first bytes of an over-long line (its end not seen): the verb decides, as it
    /// does for Postfix, which reads the first 2,048 bytes of a line and skips the rest.
    /// What is refused whole is refused long too; a BDAT size may be cut off, so a long
    /// BDAT is refused; a long DATA still waits for its reply; a head without a whole verb
    /// (all blanks, or one endless word) is refused.
    fn head_action(&self, head: &[u8]) -> Action {
        if head.iter().any(|&b| command::is_control(b)) {
            return Action::Refuse(FollowerRefusal::BadCharacter);
        }
        match command::head_verb(head) {
            // All blanks, or a first word longer than the head: what it is is not known.
            None | Some(Verb::Starttls | Verb::Xclient | Verb::Xforward | Verb::Bdat) => {
                Action::Refuse(FollowerRefusal::LineTooLong)
            }
            Some(Verb::Auth) if self.path == Path::Plaintext => {
                Action::Refuse(FollowerRefusal::Auth)
            }
            Some(Verb::Ehlo | Verb::Helo) => Action::Forward(ReplyKind::Ehlo),
            Some(Verb::Data) => Action::Data,
            Some(_) => Action::Forward(ReplyKind::Other),
        }
    }

    /// Our reply to a refused command (STARTTLS's depends on the path).
    fn reply_to(&self, kind: FollowerRefusal) -> &'static [u8] {
        match kind {
            FollowerRefusal::Starttls if self.path == Path::Tls => STARTTLS_IN_TLS,
            FollowerRefusal::Starttls => STARTTLS_AFTER_HANDOFF,
            FollowerRefusal::Auth => AUTH_IN_PLAINTEXT,
            FollowerRefusal::ProxyExtension => NOT_AUTHORIZED,
            FollowerRefusal::BadCharacter => BAD_CHAR,
            FollowerRefusal::BdatSyntax => BDAT_SYNTAX,
            FollowerRefusal::LineTooLong => LINE_TOO_LONG,
        }
    }

    /// A command line has ended: what it owes and where the stream goes.
    fn act(&mut self, action: Action) {
        match action {
            Action::Forward(kind) => self.expects.push_back(Expect::Upstream(kind)),
            Action::Data => {
                self.expects.push_back(Expect::Upstream(ReplyKind::Data));
                self.state = State::AwaitDataReply;
            }
            Action::Bdat(size) => {
                self.expects.push_back(Expect::Upstream(ReplyKind::Other));
                // `BDAT 0`: the state passes back to commands at the next byte.
                self.state = State::Bdat(size);
            }
            Action::Refuse(kind) => {
                if let Some(i) = FollowerRefusal::ALL.iter().position(|k| *k == kind) {
                    self.refused[i] += 1;
                }
                self.expects.push_back(Expect::Local(self.reply_to(kind)));
            }
        }
    }

    /// Processes upstream bytes into `to_client`: whole replies, EHLO replies filtered.
    pub(crate) fn upstream_bytes(
        &mut self,
        input: &[u8],
        to_client: &mut Vec<u8>,
    ) -> Result<(), ReplyError> {
        self.replies.extend_from_slice(input);
        loop {
            let span = match parse_reply(&self.replies) {
                Ok(Some(span)) => span,
                Ok(None) => break,
                Err(e) => {
                    // Our replies owed before the bad one still go out, as they would have
                    // had the good replies arrived in an earlier read.
                    self.flush_locals(to_client);
                    return Err(e);
                }
            };
            let reply: Vec<u8> = self.replies.drain(..span.len).collect();
            // Replies of ours owed before this one go first; then the front is ours to match.
            self.flush_locals(to_client);
            let kind = match self.expects.pop_front() {
                Some(Expect::Upstream(kind)) => kind,
                // Unsolicited (e.g. a 421 on the MTA's own timeout).
                _ => ReplyKind::Other,
            };
            match kind {
                ReplyKind::Ehlo => {
                    let plaintext = self.path == Path::Plaintext;
                    to_client
                        .extend_from_slice(&strip_keywords(&reply, |k| withheld(k, plaintext)));
                }
                ReplyKind::Data => {
                    if self.state == State::AwaitDataReply {
                        self.state = if span.code == 354 {
                            State::Data(2)
                        } else {
                            State::Command
                        };
                    }
                    to_client.extend_from_slice(&reply);
                }
                ReplyKind::Other => to_client.extend_from_slice(&reply),
            }
        }
        self.flush_locals(to_client);
        Ok(())
    }

    fn flush_locals(&mut self, to_client: &mut Vec<u8>) {
        while let Some(&Expect::Local(ours)) = self.expects.front() {
            self.expects.pop_front();
            to_client.extend_from_slice(ours);
        }
    }
}

/// The commands answered here, by kind, over the session (kinds never seen left out).
impl SmtpStream {
    pub(crate) fn refusals(&self) -> impl Iterator<Item = (FollowerRefusal, u64)> + '_ {
        FollowerRefusal::ALL
            .iter()
            .zip(self.refused)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (*k, n))
    }
}

fn action_forwards(action: Action) -> bool {
    !matches!(action, Action::Refuse(_))
}

/// EHLO keywords never relayed to the client: STARTTLS (answered here), XCLIENT and
/// XFORWARD (refused here), and AUTH after a plaintext hand-off (`AUTH=` too, the old form).
fn withheld(keyword: &[u8], plaintext: bool) -> bool {
    let name = keyword.split(|&b| b == b'=').next().unwrap_or(keyword);
    [&b"STARTTLS"[..], b"XCLIENT", b"XFORWARD"]
        .iter()
        .any(|k| name.eq_ignore_ascii_case(k))
        || (plaintext && name.eq_ignore_ascii_case(b"AUTH"))
}

#[cfg(test)]
mod tests;
