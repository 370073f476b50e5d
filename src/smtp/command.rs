//! One reading of an SMTP command line for the whole session, shared by the pre-TLS
//! dialogue and the follower after the hand-off, so that the proxy and the MTA behind it
//! agree on where commands are (catalogue HF-3, HF-4, HF-7). It is Postfix's reading:
//! - a line ends at LF; one CR before it is part of the terminator;
//! - a line holding NUL or another control byte (0x00-0x1f but HTAB, and DEL) is refused by
//!   the proxy and never relayed: Postfix cuts a line at NUL (`DATA\0x` is `DATA` to it) and
//!   splits words on every C `isspace` byte (`STARTTLS\x0b` is STARTTLS to it), so only a
//!   refusal leaves nothing to disagree about;
//! - the verb and the arguments are separated by SP or HTAB, leading and trailing ones ignored;
//! - BDAT sizes are digits only, at most `i64::MAX` (Postfix's `off_t`); anything else is a
//!   syntax error the proxy answers itself, so no chunk is counted that the MTA would not.

/// The verbs whose meaning the proxy needs; everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Starttls,
    Auth,
    Xclient,
    Xforward,
    Quit,
    Rset,
    Noop,
    Help,
    Vrfy,
    Expn,
    Etrn,
    /// An HTTP request line or header: cross-protocol traffic (ALPACA).
    Http,
    Other,
}

impl Verb {
    fn of(word: &[u8]) -> Self {
        const VERBS: [(&[u8], Verb); 22] = [
            (b"EHLO", Verb::Ehlo),
            (b"HELO", Verb::Helo),
            (b"MAIL", Verb::Mail),
            (b"RCPT", Verb::Rcpt),
            (b"DATA", Verb::Data),
            (b"BDAT", Verb::Bdat),
            (b"STARTTLS", Verb::Starttls),
            (b"AUTH", Verb::Auth),
            (b"XCLIENT", Verb::Xclient),
            (b"XFORWARD", Verb::Xforward),
            (b"QUIT", Verb::Quit),
            (b"RSET", Verb::Rset),
            (b"NOOP", Verb::Noop),
            (b"HELP", Verb::Help),
            (b"VRFY", Verb::Vrfy),
            (b"EXPN", Verb::Expn),
            (b"ETRN", Verb::Etrn),
            (b"GET", Verb::Http),
            (b"POST", Verb::Http),
            (b"CONNECT", Verb::Http),
            (b"PUT", Verb::Http),
            (b"HEAD", Verb::Http),
        ];
        if word.eq_ignore_ascii_case(b"HOST:") {
            return Self::Http;
        }
        VERBS
            .iter()
            .find(|(name, _)| word.eq_ignore_ascii_case(name))
            .map_or(Self::Other, |&(_, verb)| verb)
    }
}

/// How the proxy reads one command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reading<'a> {
    /// NUL or another control byte: refused by the proxy, never relayed.
    BadChar,
    Command {
        verb: Verb,
        arg: &'a [u8],
    },
}

/// Reply to a command line with a control byte in it.
pub(crate) const BAD_CHAR: &str = "500 5.5.2 Error: bad character in command";

fn is_blank(b: &u8) -> bool {
    matches!(b, b' ' | b'\t')
}

/// A byte that makes a command line unreadable (everything below SP but HTAB, and DEL).
pub(crate) fn is_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// Strips the line terminator: LF, and one CR before it.
pub(crate) fn strip_terminator(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Reads a command line given without its terminator (see [`strip_terminator`]).
pub(crate) fn read(line: &[u8]) -> Reading<'_> {
    if line.iter().any(|&b| is_control(b)) {
        return Reading::BadChar;
    }
    Reading::Command {
        verb: verb_of(line),
        arg: arg_of(line),
    }
}

/// The verb of a complete line: its first word.
fn verb_of(line: &[u8]) -> Verb {
    let start = line.iter().position(|b| !is_blank(b)).unwrap_or(line.len());
    let rest = &line[start..];
    let end = rest.iter().position(is_blank).unwrap_or(rest.len());
    Verb::of(&rest[..end])
}

/// The verb of the first bytes of a line whose end is not seen yet (an over-long line):
/// only when a blank follows it, so that the rest of the line cannot extend it; `None`
/// when the head is all blanks or its first word runs on.
pub(crate) fn head_verb(head: &[u8]) -> Option<Verb> {
    let start = head.iter().position(|b| !is_blank(b))?;
    let rest = &head[start..];
    let end = rest.iter().position(is_blank)?;
    Some(Verb::of(&rest[..end]))
}

fn arg_of(line: &[u8]) -> &[u8] {
    let start = line.iter().position(|b| !is_blank(b)).unwrap_or(line.len());
    let rest = &line[start..];
    let end = rest.iter().position(is_blank).unwrap_or(rest.len());
    let arg = &rest[end..];
    let from = arg.iter().position(|b| !is_blank(b)).unwrap_or(arg.len());
    let to = arg
        .iter()
        .rposition(|b| !is_blank(b))
        .map_or(from, |p| p + 1);
    &arg[from..to]
}

/// The arguments split into words on SP and HTAB.
pub(crate) fn words(arg: &[u8]) -> impl Iterator<Item = &[u8]> {
    arg.split(is_blank).filter(|w| !w.is_empty())
}

/// `BDAT <size> [LAST]` (RFC 3030): the chunk size and whether it is the last one, or
/// `None` for anything Postfix would answer with a syntax error (no count is taken then).
pub(crate) fn bdat_size(arg: &[u8]) -> Option<(u64, bool)> {
    let mut w = words(arg);
    let size = w.next()?;
    let last = match w.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return None,
    };
    if w.next().is_some() || size.is_empty() || !size.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size: u64 = std::str::from_utf8(size).ok()?.parse().ok()?;
    (size <= i64::MAX as u64).then_some((size, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(line: &[u8]) -> (Verb, &[u8]) {
        match read(line) {
            Reading::Command { verb, arg } => (verb, arg),
            Reading::BadChar => panic!("{line:?} refused"),
        }
    }

    #[test]
    fn verbs_and_arguments_split_on_space_and_tab() {
        assert_eq!(cmd(b"EHLO\tclient.test"), (Verb::Ehlo, &b"client.test"[..]));
        assert_eq!(cmd(b"ehlo  a b \t"), (Verb::Ehlo, &b"a b"[..]));
        assert_eq!(cmd(b" \tDATA"), (Verb::Data, &b""[..]));
        assert_eq!(cmd(b"DATA \t "), (Verb::Data, &b""[..]));
        assert_eq!(cmd(b"DATAX"), (Verb::Other, &b""[..]));
        assert_eq!(cmd(b"StartTLS"), (Verb::Starttls, &b""[..]));
        assert_eq!(cmd(b"Host: x"), (Verb::Http, &b"x"[..]));
        assert_eq!(cmd(b""), (Verb::Other, &b""[..]));
        assert_eq!(head_verb(b"  MAIL\tFROM:<a@b> SIZE=1"), Some(Verb::Mail));
        assert_eq!(head_verb(b"DATA "), Some(Verb::Data));
        assert_eq!(head_verb(b"DATA"), None, "DATAX may follow");
        assert_eq!(head_verb(b"   "), None);
        assert_eq!(head_verb(b""), None);
    }

    #[test]
    fn every_control_byte_but_tab_is_refused() {
        for b in (0u8..0x20).chain([0x7f]) {
            let line = [b'D', b'A', b'T', b'A', b];
            let expected = if b == b'\t' {
                Reading::Command {
                    verb: Verb::Data,
                    arg: b"",
                }
            } else {
                Reading::BadChar
            };
            assert_eq!(read(&line), expected, "byte {b:#04x}");
        }
        // Bytes above DEL are not controls to Postfix either (SMTPUTF8 addresses).
        assert!(!is_control(0x80) && !is_control(0xff) && !is_control(b' '));
        assert!(is_control(0x1f) && !is_control(0x20));
    }

    #[test]
    fn terminators() {
        assert_eq!(strip_terminator(b"DATA\r\n"), b"DATA");
        assert_eq!(strip_terminator(b"DATA\n"), b"DATA");
        assert_eq!(strip_terminator(b"DATA\r\r\n"), b"DATA\r");
        assert_eq!(strip_terminator(b"DATA"), b"DATA");
    }

    #[test]
    fn bdat_sizes_are_digits_only() {
        assert_eq!(bdat_size(b"10 LAST"), Some((10, true)));
        assert_eq!(bdat_size(b"10\tlast"), Some((10, true)));
        assert_eq!(bdat_size(b"0"), Some((0, false)));
        assert_eq!(bdat_size(b"007"), Some((7, false)));
        assert_eq!(
            bdat_size(b"9223372036854775807"),
            Some((i64::MAX as u64, false))
        );
        for bad in [
            &b""[..],
            b"+10",
            b"-1",
            b"1e3",
            b"10 LAST x",
            b"10 FIRST",
            b"9223372036854775808",
            b"18446744073709551615 LAST",
            b"99999999999999999999999",
            b"LAST",
        ] {
            assert_eq!(bdat_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
