//! The follower's reading against a small reference model of Postfix's (issue 23, §D2):
//! for any client byte stream, cut into reads at random, the proxy's command/content split
//! must be the MTA's. The model is written from Postfix's documented behaviour, not from its
//! code: a command line ends at LF with one CR before it stripped; only its first 2,048
//! bytes count (`line_length_limit`; the rest of the line is skipped); a NUL ends the
//! C string; words are split on every `isspace` byte (SP, HTAB, LF, VT, FF, CR). DATA
//! without arguments gets 354, and its content ends at a line that is `.` once one CR is
//! stripped (3.7's default, `smtpd_forbid_bare_newline = no`: a bare LF `.` line ends it
//! too — the model accepts exactly what a vulnerable Postfix accepts). `BDAT n [LAST]` with
//! n digits only reads n bytes. Every other command gets 250.
//!
//! Invariants, with the guard in `normalize` (and `reject` until it trips):
//! - the model never reads STARTTLS, XCLIENT or XFORWARD as a command, nor AUTH after a
//!   plaintext hand-off;
//! - every reply the model sends answers what the proxy expects next, of the same kind
//!   (EHLO, DATA, or other): no reply is unsolicited, none is missing at the end, and
//!   content is content for both;
//! - the proxy's buffers stay bounded.

use std::collections::VecDeque;

use super::{Input, segments};
use crate::smtp::guard::GuardMode;
use crate::smtp::stream::{Expect, MAX_OWED, Path, ReplyKind, SmtpStream};

/// Postfix's `line_length_limit` default.
const LINE_LIMIT: usize = 2048;

/// What the model is reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Command,
    Data,
    Bdat(u64),
}

/// The reference reader of what the proxy forwards.
struct Model {
    mode: Mode,
    /// Bytes of the current line not yet ended by LF.
    line: Vec<u8>,
    /// The current line ran over `LINE_LIMIT`: the rest of it is skipped.
    skipping: bool,
    plaintext: bool,
    /// Replies sent, with the kind of command each answers.
    replies: VecDeque<(ReplyKind, &'static [u8])>,
}

const EHLO_REPLY: &[u8] =
    b"250-mx.example.test\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n250 CHUNKING\r\n";

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

impl Model {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match self.mode {
                Mode::Bdat(left) => {
                    self.mode = if left == 1 {
                        self.replies
                            .push_back((ReplyKind::Other, b"250 2.0.0 Ok\r\n"));
                        Mode::Command
                    } else {
                        Mode::Bdat(left - 1)
                    };
                }
                Mode::Data | Mode::Command if b != b'\n' => {
                    if self.line.len() < LINE_LIMIT {
                        self.line.push(b);
                    } else if self.mode == Mode::Command {
                        self.skipping = true;
                    } else {
                        // A content line goes on in a new record: never a `.` line.
                        self.line.truncate(1);
                        self.line.push(b);
                    }
                }
                Mode::Data | Mode::Command => {
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    self.skipping = false;
                    if self.mode == Mode::Data {
                        if line == b"." {
                            self.replies
                                .push_back((ReplyKind::Other, b"250 2.0.0 Ok: queued\r\n"));
                            self.mode = Mode::Command;
                        }
                    } else {
                        self.command(&line);
                    }
                }
            }
        }
    }

    fn command(&mut self, line: &[u8]) {
        let line = line.split(|&b| b == 0).next().unwrap_or_default();
        let mut words = line.split(|&b| is_space(b)).filter(|w| !w.is_empty());
        let verb = words.next().unwrap_or_default().to_ascii_uppercase();
        let args: Vec<&[u8]> = words.collect();
        match verb.as_slice() {
            b"STARTTLS" | b"XCLIENT" | b"XFORWARD" => {
                panic!(
                    "the MTA read {:?} as a command",
                    String::from_utf8_lossy(line)
                )
            }
            b"AUTH" if self.plaintext => {
                panic!(
                    "the MTA read AUTH in plaintext: {:?}",
                    String::from_utf8_lossy(line)
                )
            }
            b"EHLO" | b"HELO" => self.replies.push_back((ReplyKind::Ehlo, EHLO_REPLY)),
            b"DATA" if args.is_empty() => {
                self.replies
                    .push_back((ReplyKind::Data, b"354 End data with <CR><LF>.<CR><LF>\r\n"));
                self.mode = Mode::Data;
            }
            b"DATA" => self
                .replies
                .push_back((ReplyKind::Data, b"501 5.5.4 Syntax: DATA\r\n")),
            b"BDAT" => {
                let size = args
                    .first()
                    .filter(|s| !s.is_empty() && s.iter().all(u8::is_ascii_digit))
                    .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u64>().ok())
                    .filter(|&n| n <= i64::MAX as u64);
                let last_ok = match args.get(1) {
                    None => true,
                    Some(w) => w.eq_ignore_ascii_case(b"LAST"),
                };
                match size {
                    Some(n) if args.len() <= 2 && last_ok => {
                        if n == 0 {
                            self.replies
                                .push_back((ReplyKind::Other, b"250 2.0.0 Ok\r\n"));
                        } else {
                            self.mode = Mode::Bdat(n);
                        }
                    }
                    _ => panic!(
                        "the proxy relayed a BDAT the MTA cannot count: {:?}",
                        String::from_utf8_lossy(line)
                    ),
                }
            }
            _ => self
                .replies
                .push_back((ReplyKind::Other, b"250 2.0.0 Ok\r\n")),
        }
    }
}

/// The kind of the next reply the proxy expects from the upstream, if any.
fn expected(stream: &SmtpStream) -> Option<ReplyKind> {
    stream.expects.iter().find_map(|e| match e {
        Expect::Upstream(kind) => Some(*kind),
        Expect::Local(_) => None,
    })
}

/// Input: a flags byte (bit 0: plaintext hand-off; bit 1: `reject`), a segmentation seed,
/// then the client's bytes after the hand-off.
pub fn check_follower(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.byte();
    let seed = input.byte();
    let client = input.rest();
    let plaintext = flags & 1 == 1;
    let path = if plaintext {
        Path::Plaintext
    } else {
        Path::Tls
    };
    let guard = if flags & 2 == 2 {
        GuardMode::Reject
    } else {
        GuardMode::Normalize
    };
    run(client, seed, path, guard);
}

fn run(client: &[u8], seed: u8, path: Path, guard: GuardMode) {
    let plaintext = path == Path::Plaintext;
    let mut stream = SmtpStream::new(path, guard);
    let mut model = Model {
        mode: Mode::Command,
        line: Vec::new(),
        skipping: false,
        plaintext,
        replies: VecDeque::new(),
    };
    let mut held: Vec<u8> = Vec::new();
    let (mut to_upstream, mut to_client) = (Vec::new(), Vec::new());
    let mut reads = segments(client, seed, 4096).into_iter();
    // Bounded: every round consumes a read, or delivers a reply.
    for _ in 0..(client.len() * 4 + 64) {
        if stream.wants_client_input() && !held.is_empty() {
            let n = stream.client_bytes(&held, &mut to_upstream, &mut to_client);
            held.drain(..n);
        }
        if stream.take_abort_upstream() {
            // `reject` tripped: the upstream connection is closed; nothing more reaches it.
            return;
        }
        model.feed(&to_upstream);
        to_upstream.clear();
        to_client.clear();
        assert!(
            stream.expects.len() <= MAX_OWED + 1,
            "{} replies owed",
            stream.expects.len()
        );
        if let Some((kind, reply)) = model.replies.pop_front() {
            assert_eq!(
                expected(&stream),
                Some(kind),
                "the MTA answered a command the proxy did not see as one"
            );
            stream
                .upstream_bytes(reply, &mut to_client)
                .expect("the model's replies are well formed");
            continue;
        }
        if held.is_empty() {
            match reads.next() {
                Some(read) => held.extend_from_slice(read),
                None => break,
            }
        } else if !stream.wants_client_input() {
            // The proxy waits for a reply the model does not owe: only a closed session may.
            assert!(
                stream.is_closed(),
                "the proxy waits for a reply the MTA never sends"
            );
            return;
        }
    }
    assert!(model.replies.is_empty());
    if held.is_empty() && reads.next().is_none() {
        // Everything was read: a reply the proxy still expects must be one the MTA still
        // owes (its line or content not ended yet).
        if let Some(kind) = expected(&stream) {
            assert!(
                !model.line.is_empty() || model.skipping || model.mode != Mode::Command,
                "the proxy expects a {kind:?} reply the MTA will never send"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    /// Random streams from an alphabet dense in what matters (line ends, dots, verbs,
    /// blanks, control bytes, digits): a short fuzzing run inside `cargo test`.
    #[test]
    fn random_streams_keep_the_proxy_and_the_model_in_step() {
        const PIECES: [&[u8]; 24] = [
            b"\r",
            b"\n",
            b"\r\n",
            b".",
            b" ",
            b"\t",
            b"\x0b",
            b"\x00",
            b"DATA",
            b"BDAT ",
            b"STARTTLS",
            b"AUTH ",
            b"EHLO x",
            b"MAIL FROM:<a@b>",
            b"RCPT TO:<c@d>",
            b"XCLIENT",
            b"10",
            b"3",
            b" LAST",
            b"+1",
            b"x",
            b"NOOP",
            b"\r\n.\r\n",
            b"..",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..6000 {
            let flags = (next() % 4) as u8;
            let cut = (next() % 256) as u8;
            let mut data = vec![flags, cut];
            for _ in 0..(next() % 60) {
                data.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
                if next() % 8 == 0 {
                    data.extend_from_slice(b"\r\n");
                }
            }
            super::check_follower(&data);
        }
    }

    #[test]
    fn the_model_finds_the_smuggling_when_the_guard_is_off() {
        let smuggle = b"MAIL FROM:<a@b>\r\nDATA\r\nhi\n.\nMAIL FROM:<f@e>\r\n\r\n.\r\nNOOP\r\n";
        let off = std::panic::catch_unwind(|| {
            super::run(smuggle, 0, super::Path::Tls, super::GuardMode::Off);
        });
        assert!(off.is_err(), "the model must catch a desync");
        super::run(smuggle, 0, super::Path::Tls, super::GuardMode::Normalize);
    }
}
