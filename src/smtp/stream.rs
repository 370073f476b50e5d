//! Following the SMTP stream after the upgrade (sans-IO), just enough to answer STARTTLS
//! ourselves (`554 5.5.1`, never relayed) and to strip STARTTLS from every EHLO reply.
//! Commands vs content: DATA content runs to the strict `CRLF.CRLF` (bare LF never ends
//! it: SMTP smuggling) and is passed byte for byte; BDAT content is counted. Each command
//! the upstream answers queues an `Expect`; replies are matched in order (RFC 2920).

use std::collections::VecDeque;

use super::ehlo::strip_starttls;
use super::reply::{ReplyError, parse_reply};

/// A command line longer than this is forwarded as it streams, without interpretation.
pub(crate) const MAX_TRACKED_LINE: usize = 1024;

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
    /// A reply of ours (to STARTTLS), sent once every earlier reply has been sent.
    Local(Vec<u8>),
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
    /// Matched this many bytes of `END_OF_DATA`.
    Data(usize),
    /// This many BDAT content bytes still to pass.
    Bdat(u64),
}

/// Both directions' parse state of one session.
#[derive(Debug)]
pub(crate) struct SmtpStream {
    state: State,
    line: Vec<u8>,
    long_line: bool,
    replies: Vec<u8>,
    pub expects: VecDeque<Expect>,
    starttls_reply: &'static [u8],
}

/// Our reply to STARTTLS inside TLS, upgraded or implicit (Postfix's text; RFC 8314 §3.3).
pub(crate) const STARTTLS_IN_TLS: &[u8] = b"554 5.5.1 Error: TLS already active\r\n";
/// After a plaintext hand-off: the session can no longer be upgraded.
pub(crate) const STARTTLS_AFTER_HANDOFF: &[u8] =
    b"502 5.5.1 Error: STARTTLS is only available before the first mail command\r\n";

impl Default for SmtpStream {
    fn default() -> Self {
        Self::new(STARTTLS_IN_TLS)
    }
}

impl SmtpStream {
    /// `starttls_reply`: what a STARTTLS command gets (it is never relayed).
    pub(crate) fn new(starttls_reply: &'static [u8]) -> Self {
        SmtpStream {
            starttls_reply,
            state: State::Command,
            line: Vec::new(),
            long_line: false,
            replies: Vec::new(),
            expects: VecDeque::new(),
        }
    }

    /// Gives back buffer capacity kept from earlier traffic (an idle session's memory).
    pub(crate) fn release(&mut self) {
        self.line.shrink_to_fit();
        self.replies.shrink_to_fit();
        self.expects.shrink_to_fit();
    }

    /// Whether client input may be processed now (false while a DATA reply is awaited).
    pub(crate) fn wants_client_input(&self) -> bool {
        self.state != State::AwaitDataReply
    }

    /// Processes client bytes: what to forward goes to `to_upstream`, replies of ours to
    /// `to_client`. Returns how many bytes were consumed (fewer when a DATA reply must come
    /// first; the caller keeps the rest).
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
                State::Data(matched) => {
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
                State::Command => {
                    let rest = &input[i..];
                    match memchr::memchr(b'\n', rest) {
                        Some(lf) => {
                            let part = &rest[..=lf];
                            i += lf + 1;
                            if self.long_line {
                                to_upstream.extend_from_slice(part);
                                self.long_line = false;
                                self.expects.push_back(Expect::Upstream(ReplyKind::Other));
                                continue;
                            }
                            self.line.extend_from_slice(part);
                            let line = std::mem::take(&mut self.line);
                            if self.command_line(&line) {
                                to_upstream.extend_from_slice(&line);
                            }
                        }
                        None => {
                            i = input.len();
                            if self.long_line {
                                to_upstream.extend_from_slice(rest);
                            } else if self.line.len() + rest.len() > MAX_TRACKED_LINE {
                                to_upstream.extend_from_slice(&self.line);
                                to_upstream.extend_from_slice(rest);
                                self.line.clear();
                                self.long_line = true;
                            } else {
                                self.line.extend_from_slice(rest);
                            }
                        }
                    }
                }
            }
        }
        self.flush_locals(to_client);
        i
    }

    /// Classifies one complete command line; returns whether to forward it.
    fn command_line(&mut self, line: &[u8]) -> bool {
        let text = line.trim_ascii();
        let (verb, arg) = match text.iter().position(|&b| b == b' ') {
            Some(sp) => (&text[..sp], text[sp + 1..].trim_ascii()),
            None => (text, &b""[..]),
        };
        let verb = verb.to_ascii_uppercase();
        match verb.as_slice() {
            b"STARTTLS" => {
                self.expects
                    .push_back(Expect::Local(self.starttls_reply.to_vec()));
                return false;
            }
            b"EHLO" | b"HELO" => self.expects.push_back(Expect::Upstream(ReplyKind::Ehlo)),
            b"DATA" => {
                self.expects.push_back(Expect::Upstream(ReplyKind::Data));
                self.state = State::AwaitDataReply;
            }
            b"BDAT" => {
                self.expects.push_back(Expect::Upstream(ReplyKind::Other));
                let size = arg
                    .split(|&b| b == b' ')
                    .next()
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<u64>().ok());
                if let Some(size) = size.filter(|&s| s > 0) {
                    self.state = State::Bdat(size);
                }
            }
            _ => self.expects.push_back(Expect::Upstream(ReplyKind::Other)),
        }
        true
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
                ReplyKind::Ehlo => to_client.extend_from_slice(&strip_starttls(&reply)),
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
        while let Some(Expect::Local(_)) = self.expects.front() {
            if let Some(Expect::Local(ours)) = self.expects.pop_front() {
                to_client.extend_from_slice(&ours);
            }
        }
    }
}

#[cfg(test)]
mod tests;
