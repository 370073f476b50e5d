//! FZ-5: STARTTLS stripped from the upstream's EHLO replies (`smtp::ehlo`), through the
//! post-upgrade stream follower (`SmtpStream::upstream_bytes`) in arbitrary segments.

use super::{Input, reply_line, segments, split_reply_line};
use crate::relay::RELAY_BUFFER;
use crate::smtp::ehlo::strip_starttls;
use crate::smtp::reply::{MAX_REPLY_LEN, ReplyError, parse_reply};
use crate::smtp::stream::{STARTTLS_IN_TLS, SmtpStream};

/// `SmtpStream::upstream_bytes` re-parses the pending reply from its start on every call, so
/// one-byte reads cost the square of the reply's length: used on short streams only.
const ONE_BYTE_READS_UP_TO: usize = 512;

/// The input's split seed, except one-byte reads of a long stream.
fn split_seed(seed: u8, len: usize) -> u8 {
    if seed == 1 && len > ONE_BYTE_READS_UP_TO {
        2
    } else {
        seed
    }
}

/// What the client is owed for one command, in order.
enum Owed {
    /// The upstream's reply to EHLO or HELO, filtered.
    Ehlo(Vec<u8>),
    /// The upstream's reply to another command, unchanged.
    Verbatim(Vec<u8>),
    /// Our answer to STARTTLS inside TLS.
    Local,
}

/// Input: a mode byte (bit 0: raw bytes, else generated replies), a split seed, then the
/// mode's material. Generated mode pipelines EHLO/HELO/NOOP/STARTTLS, answers them with
/// well-formed replies (STARTTLS in any case and position, long replies, bare `250`) and
/// checks every reply the client gets; raw mode feeds arbitrary client and upstream bytes.
pub fn check_ehlo_filter(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.byte();
    let seed = input.byte();
    if mode & 1 == 0 {
        generated(&mut input, seed);
    } else {
        raw(&mut input, seed);
    }
}

fn generated(input: &mut Input<'_>, seed: u8) {
    let mut client = Vec::new();
    let mut upstream = Vec::new();
    let mut owed = Vec::new();
    for _ in 0..1 + input.byte() % 4 {
        let command = input.byte();
        let (line, kind): (&[u8], _) = match command % 8 {
            0..=4 => (b"EHLO client.example\r\n", 0),
            5 => (b"HELO client.example\r\n", 0),
            6 => (b"NOOP\r\n", 1),
            _ => (b"STARTTLS\r\n", 2),
        };
        client.extend_from_slice(line);
        if kind == 2 {
            owed.push(Owed::Local);
            continue;
        }
        let reply = generate_reply(input);
        upstream.extend_from_slice(&reply);
        owed.push(if kind == 0 {
            Owed::Ehlo(reply)
        } else {
            Owed::Verbatim(reply)
        });
    }
    let too_long = owed.iter().any(|o| match o {
        Owed::Ehlo(r) | Owed::Verbatim(r) => r.len() > MAX_REPLY_LEN,
        Owed::Local => false,
    });

    let reference = follow(&client, &upstream, 0);
    let mut seeds = vec![split_seed(seed, upstream.len())];
    if upstream.len() <= ONE_BYTE_READS_UP_TO {
        seeds.push(1);
    }
    for s in seeds {
        assert_eq!(follow(&client, &upstream, s), reference, "split seed {s}");
    }
    let (result, out) = reference;
    if too_long {
        assert_eq!(result, Err(ReplyError::TooLong), "a reply over the bound");
        return;
    }
    assert_eq!(result, Ok(()));
    let mut rest = out.as_slice();
    for o in owed {
        let span = parse_reply(rest)
            .expect("our output parses")
            .expect("a reply for every command");
        let (got, tail) = rest.split_at(span.len);
        rest = tail;
        match o {
            Owed::Ehlo(sent) => check_filtered(&sent, got),
            Owed::Verbatim(sent) => assert_eq!(got, sent.as_slice()),
            Owed::Local => assert_eq!(got, STARTTLS_IN_TLS),
        }
    }
    assert!(rest.is_empty(), "output the client was not owed");
}

/// A reply of CRLF lines: a code, 1-8 lines (or hundreds: MAX_REPLY_LEN), texts that are
/// STARTTLS in several spellings, other keywords, printable junk or nothing.
fn generate_reply(input: &mut Input<'_>) -> Vec<u8> {
    let shape = input.byte();
    let code: &[u8] = match shape % 8 {
        0..=3 => b"250",
        4 => b"421",
        5 => b"554",
        6 => b"502",
        _ => b"220",
    };
    let mut lines = 1 + usize::from(shape >> 3) % 8;
    let pad = input.byte();
    if pad & 0xc0 == 0xc0 {
        // Up to ~1000 lines: past MAX_REPLY_LEN with the longer texts.
        lines += usize::from(pad & 0x3f) * 16;
    }
    let mut out = Vec::new();
    for i in 0..lines {
        let text = line_text(input);
        let last = i + 1 == lines;
        out.extend_from_slice(code);
        if !(last && text.is_empty() && pad & 1 == 1) {
            out.push(if last { b' ' } else { b'-' });
        }
        out.extend_from_slice(&text);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn line_text(input: &mut Input<'_>) -> Vec<u8> {
    let kind = input.byte();
    match kind % 8 {
        0 | 7 => {
            // STARTTLS with the case of each letter from the next byte's bits.
            let case = input.byte();
            b"STARTTLS"
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    if case >> i & 1 == 1 {
                        b.to_ascii_lowercase()
                    } else {
                        *b
                    }
                })
                .collect()
        }
        1 => b" STARTTLS\t".to_vec(),
        2 => b"STARTTLS REQUIRED".to_vec(),
        3 => {
            let words: [&[u8]; 8] = [
                b"PIPELINING",
                b"SIZE 10240000",
                b"8BITMIME",
                b"AUTH PLAIN LOGIN",
                b"STARTTLSX",
                b"X-STARTTLS",
                b"mx.example.test ESMTP",
                b"CHUNKING",
            ];
            words[usize::from(input.byte() % 8)].to_vec()
        }
        4 => {
            let n = usize::from(input.byte() % 48);
            input.take(n).iter().map(|&b| 0x20 + b % 0x5f).collect()
        }
        _ => Vec::new(),
    }
}

/// Pipelines all client bytes, then feeds the upstream's in segments: the result of the
/// last call and everything sent to the client.
fn follow(client: &[u8], upstream: &[u8], seed: u8) -> (Result<(), ReplyError>, Vec<u8>) {
    let mut stream = SmtpStream::default();
    let mut to_upstream = Vec::new();
    let mut out = Vec::new();
    assert_eq!(
        stream.client_bytes(client, &mut to_upstream, &mut out),
        client.len()
    );
    assert!(
        !to_upstream.windows(8).any(|w| w == b"STARTTLS"),
        "STARTTLS relayed"
    );
    for part in segments(upstream, seed, RELAY_BUFFER) {
        if let Err(e) = stream.upstream_bytes(part, &mut out) {
            return (Err(e), out);
        }
    }
    (Ok(()), out)
}

/// `got` is what the client received for the EHLO reply `sent` (CRLF lines).
fn check_filtered(sent: &[u8], got: &[u8]) {
    let sent_lines: Vec<_> = sent
        .split_inclusive(|&b| b == b'\n')
        .map(reply_line)
        .collect();
    let got_lines: Vec<_> = got
        .split_inclusive(|&b| b == b'\n')
        .map(reply_line)
        .collect();
    let code = sent_lines[0].0;
    if code / 100 != 2 || sent_lines.len() == 1 {
        assert_eq!(got, sent, "non-2xx and single-line replies pass unchanged");
        return;
    }
    assert!(!got_lines.is_empty(), "the reply vanished");
    // Codes and texts of the lines kept, in order: the first line is the server's domain
    // (RFC 5321 §4.1.1.1), never a keyword; the upstream's codes pass as they came.
    let kept: Vec<(u16, &[u8])> = std::iter::once((code, sent_lines[0].2))
        .chain(
            sent_lines[1..]
                .iter()
                .filter(|l| !is_starttls_keyword(l.2))
                .map(|l| (l.0, l.2)),
        )
        .collect();
    let got_kept: Vec<(u16, &[u8])> = got_lines.iter().map(|l| (l.0, l.2)).collect();
    assert_eq!(
        got_kept, kept,
        "codes and lines other than STARTTLS kept, in order"
    );
    let last = got_lines.len() - 1;
    for (i, (_, sep, text)) in got_lines.iter().enumerate() {
        if i == last {
            assert!(
                *sep != Some(b'-'),
                "the last line must not continue: {:?}",
                String::from_utf8_lossy(got)
            );
        } else {
            assert_eq!(*sep, Some(b'-'), "only the last line ends the reply");
        }
        assert!(
            i == 0 || !is_starttls_keyword(text),
            "STARTTLS offered after TLS"
        );
    }
}

/// An EHLO line whose keyword (its first word) is STARTTLS, in any case.
fn is_starttls_keyword(text: &[u8]) -> bool {
    text.split(|b| b.is_ascii_whitespace())
        .find(|w| !w.is_empty())
        .is_some_and(|w| w.eq_ignore_ascii_case(b"STARTTLS"))
}

fn raw(input: &mut Input<'_>, seed: u8) {
    let n = usize::from(input.u16() % 2048);
    let client = input.take(n);
    let upstream = input.rest();

    // strip_starttls alone, on every complete reply the upstream bytes hold.
    let mut rest = upstream;
    while let Ok(Some(span)) = parse_reply(rest) {
        let (reply, tail) = rest.split_at(span.len);
        rest = tail;
        let filtered = strip_starttls(reply);
        let well_formed = reply
            .split_inclusive(|&b| b == b'\n')
            .all(|l| split_reply_line(l).is_ok());
        if well_formed {
            check_filtered(reply, &filtered);
        }
    }

    // The stream follower, relay-style: client bytes as far as they may go, then upstream.
    let run = |seed: u8| {
        let mut stream = SmtpStream::default();
        let (mut to_upstream, mut out) = (Vec::new(), Vec::new());
        let mut held = client;
        let mut result = Ok(());
        for part in segments(upstream, seed, RELAY_BUFFER) {
            if stream.wants_client_input() {
                let n = stream.client_bytes(held, &mut to_upstream, &mut out);
                held = &held[n..];
            }
            result = stream.upstream_bytes(part, &mut out);
            if result.is_err() {
                break;
            }
        }
        (result, out, held.len())
    };
    let reference = run(0);
    let segmented = run(split_seed(seed, upstream.len()));
    // With every client byte taken before the first upstream byte, the replies owed are
    // fixed up front, and how the upstream's bytes are cut must not matter.
    let mut probe = SmtpStream::default();
    let all_taken = probe.client_bytes(client, &mut Vec::new(), &mut Vec::new()) == client.len();
    if all_taken {
        assert_eq!(segmented, reference, "split seed {seed}");
    }
}
