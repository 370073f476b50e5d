//! The pre-TLS side of a STARTTLS listener, sans-IO: the line reader and the dialogue glued
//! together with the rules of the hand-off. The session loop only reads, `receive`s, and
//! writes what `step` says; the `dialogue` fuzz target drives this same object.
//!
//! Rules kept here, not in the socket loop:
//! - input is fed only when the dialogue has consumed every complete line (pipelining is
//!   answered line by line, the reader stays bounded by one line plus one read);
//! - a first read that starts a TLS record is an implicit-TLS client on the wrong port: no
//!   dialogue, close at once (catalogue SM-13);
//! - at STARTTLS every byte after the line is discarded, never executed or forwarded
//!   (CVE-2011-0411); on pass-through the deciding line is re-emitted with CRLF, followed
//!   by everything the client sent after it.

use super::dialogue::{CloseReason, Dialogue, Greet, Step};
use super::line::LineReader;

/// The most one read hands `receive`; with the line limit it bounds what is buffered.
pub(crate) const READ: usize = 1024;
/// First byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What the session does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Read at most [`READ`] bytes from the client and pass them to `receive`.
    Read,
    /// Write this reply, then ask again.
    Reply(Vec<u8>),
    /// The dialogue is over.
    Done(Handoff),
}

/// How the pre-TLS dialogue hands the session on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Handoff {
    /// Write `reply` (`220 Ready to start TLS`), then the handshake. `discarded` is what
    /// the client pipelined after the STARTTLS line: dropped, only its size is logged.
    StartTls { reply: Vec<u8>, discarded: Vec<u8> },
    /// Plaintext from here on: connect the upstream, replay `greet` (if the client sent
    /// one), then forward `forward` — the deciding command with CRLF and all that followed.
    PassThrough {
        greet: Option<Greet>,
        forward: Vec<u8>,
    },
    /// Write `reply` (if any) and close.
    Close {
        reply: Option<Vec<u8>>,
        reason: CloseReason,
    },
}

#[derive(Debug)]
pub(crate) struct PreTls {
    reader: LineReader,
    dialogue: Dialogue,
    first_read: bool,
    sniffed_tls: bool,
}

impl PreTls {
    pub(crate) fn new(dialogue: Dialogue) -> Self {
        Self {
            reader: LineReader::default(),
            dialogue,
            first_read: true,
            sniffed_tls: false,
        }
    }

    /// Our `220` greeting, written before anything is read.
    pub(crate) fn greeting(&self) -> Vec<u8> {
        self.dialogue.greeting()
    }

    /// Bytes the client sent (one read, at most [`READ`]); only after `step` said `Read`.
    pub(crate) fn receive(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if std::mem::take(&mut self.first_read) && bytes[0] == TLS_HANDSHAKE_RECORD {
            self.sniffed_tls = true;
            return;
        }
        self.reader.feed(bytes);
    }

    pub(crate) fn step(&mut self) -> Next {
        if self.sniffed_tls {
            return Next::Done(Handoff::Close {
                reply: None,
                reason: CloseReason::TlsOnStarttlsPort,
            });
        }
        let Some(event) = self.reader.next_event() else {
            return Next::Read;
        };
        match self.dialogue.on_event(event) {
            Step::Reply(r) => Next::Reply(r),
            Step::Quit(r) => Next::Done(Handoff::Close {
                reply: Some(r),
                reason: CloseReason::Quit,
            }),
            Step::Close { reply, reason } => Next::Done(Handoff::Close {
                reply: Some(reply),
                reason,
            }),
            Step::StartTls(reply) => Next::Done(Handoff::StartTls {
                reply,
                discarded: self.reader.take_remaining(),
            }),
            Step::PassThrough(line) => {
                let mut forward = line;
                forward.extend_from_slice(b"\r\n");
                forward.extend_from_slice(&self.reader.take_remaining());
                Next::Done(Handoff::PassThrough {
                    greet: self.dialogue.greet().cloned(),
                    forward,
                })
            }
        }
    }

    /// Unprocessed input held (for the fuzz invariants).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn buffered(&self) -> usize {
        self.reader.buffered()
    }

    /// Rejected commands so far (for the fuzz invariants).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn errors(&self) -> u32 {
        self.dialogue.errors()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::dialogue::default_capabilities;

    fn pre() -> PreTls {
        PreTls::new(Dialogue::new("mx.test", false, default_capabilities()))
    }

    #[test]
    fn a_clienthello_first_closes_without_a_reply() {
        let mut p = pre();
        assert_eq!(p.step(), Next::Read);
        p.receive(&[0x16, 0x03, 0x01]);
        assert_eq!(
            p.step(),
            Next::Done(Handoff::Close {
                reply: None,
                reason: CloseReason::TlsOnStarttlsPort
            })
        );
    }

    #[test]
    fn pipelined_bytes_after_starttls_are_handed_over_as_discarded() {
        let mut p = pre();
        p.receive(b"EHLO a\r\nSTARTTLS\r\nMAIL FROM:<x>\r\n");
        assert!(matches!(p.step(), Next::Reply(_)));
        match p.step() {
            Next::Done(Handoff::StartTls { discarded, .. }) => {
                assert_eq!(discarded, b"MAIL FROM:<x>\r\n");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pass_through_re_emits_the_line_with_crlf_and_what_followed() {
        let mut p = pre();
        p.receive(b"HELO a\nMAIL FROM:<x>\nRCPT TO:<y>\r\n");
        assert!(matches!(p.step(), Next::Reply(_)));
        assert_eq!(
            p.step(),
            Next::Done(Handoff::PassThrough {
                greet: Some(Greet::Helo("a".into())),
                forward: b"MAIL FROM:<x>\r\nRCPT TO:<y>\r\n".to_vec()
            })
        );
    }
}
