//! Bounded CRLF line reader for the pre-TLS dialogue (sans-IO). A command line may be at
//! most `MAX_COMMAND_LINE` octets including CRLF (RFC 5321 §4.5.3.1.4); a longer one is
//! discarded as it streams — never buffered whole — and reported once its line ends.
//! A bare LF also ends a line (Postfix's `normalize`): lines are never forwarded raw, the
//! session re-emits what it replays with CRLF.

/// RFC 5321 §4.5.3.1.4: 512 octets including the CRLF.
pub(crate) const MAX_COMMAND_LINE: usize = 512;

/// What the reader produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineEvent {
    /// A line without its terminator (CRLF or bare LF).
    Line(Vec<u8>),
    /// A line longer than `MAX_COMMAND_LINE` ended; its bytes were dropped.
    TooLong,
}

/// Unprocessed input, bounded by `MAX_COMMAND_LINE` plus one read.
#[derive(Debug, Default)]
pub(crate) struct LineReader {
    pending: Vec<u8>,
    discarding: bool,
}

impl LineReader {
    /// Appends bytes read from the client. Call only when `next_event` returned `None`.
    pub(crate) fn feed(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
    }

    /// The next complete line or over-long-line report; `None` means "read more".
    pub(crate) fn next_event(&mut self) -> Option<LineEvent> {
        loop {
            match self.pending.iter().position(|&b| b == b'\n') {
                Some(lf) => {
                    if self.discarding {
                        self.pending.drain(..=lf);
                        self.discarding = false;
                        return Some(LineEvent::TooLong);
                    }
                    if lf + 1 > MAX_COMMAND_LINE {
                        self.pending.drain(..=lf);
                        return Some(LineEvent::TooLong);
                    }
                    let mut line: Vec<u8> = self.pending.drain(..=lf).collect();
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    return Some(LineEvent::Line(line));
                }
                None if self.discarding => {
                    self.pending.clear();
                    return None;
                }
                None if self.pending.len() >= MAX_COMMAND_LINE => {
                    self.discarding = true;
                    self.pending.clear();
                    continue;
                }
                None => return None,
            }
        }
    }

    /// Takes every byte not yet returned as a line (pipelined input, partial lines included).
    pub(crate) fn take_remaining(&mut self) -> Vec<u8> {
        self.discarding = false;
        std::mem::take(&mut self.pending)
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn buffered(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> Option<LineEvent> {
        Some(LineEvent::Line(s.as_bytes().to_vec()))
    }

    #[test]
    fn crlf_and_bare_lf_end_lines() {
        let mut r = LineReader::default();
        r.feed(b"EHLO a\r\nNOOP\nQU");
        assert_eq!(r.next_event(), line("EHLO a"));
        assert_eq!(r.next_event(), line("NOOP"));
        assert_eq!(r.next_event(), None);
        r.feed(b"IT\r\n");
        assert_eq!(r.next_event(), line("QUIT"));
    }

    #[test]
    fn over_long_line_is_discarded_while_streaming_and_reported_at_its_end() {
        let mut r = LineReader::default();
        for _ in 0..100 {
            r.feed(&[b'x'; 1000]);
            assert_eq!(r.next_event(), None);
            assert!(r.buffered() <= MAX_COMMAND_LINE, "bounded");
        }
        r.feed(b"yyy\r\nNOOP\r\n");
        assert_eq!(r.next_event(), Some(LineEvent::TooLong));
        assert_eq!(r.next_event(), line("NOOP"));
    }

    #[test]
    fn exactly_512_octets_with_crlf_is_accepted_513_is_not() {
        let mut r = LineReader::default();
        let ok = format!("{}\r\n", "a".repeat(510));
        r.feed(ok.as_bytes());
        assert!(matches!(r.next_event(), Some(LineEvent::Line(l)) if l.len() == 510));
        let long = format!("{}\r\n", "a".repeat(511));
        r.feed(long.as_bytes());
        assert_eq!(r.next_event(), Some(LineEvent::TooLong));
    }

    #[test]
    fn remaining_bytes_include_partial_lines() {
        let mut r = LineReader::default();
        r.feed(b"STARTTLS\r\nMAIL FROM:<x@evil>\r\nRCPT TO");
        assert_eq!(r.next_event(), line("STARTTLS"));
        assert_eq!(
            r.take_remaining(),
            b"MAIL FROM:<x@evil>\r\nRCPT TO".to_vec()
        );
        assert_eq!(r.buffered(), 0);
    }
}
