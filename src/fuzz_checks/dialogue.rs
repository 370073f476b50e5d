//! FZ-1, FZ-2: the pre-TLS line reader and dialogue, driven the way `session::starttls`
//! drives them (feed a read only when no event is pending, act on each `Step`).

use super::{Input, our_replies, segments};
use crate::smtp::dialogue::{Dialogue, MAX_ERRORS, Step, default_capabilities};
use crate::smtp::line::{LineEvent, LineReader, MAX_COMMAND_LINE};

const HOSTNAME: &str = "mx.example.test";
/// `session::starttls::DIALOGUE_READ`: the most one read hands the line reader.
const DIALOGUE_READ: usize = 1024;
/// Unprocessed input the reader may hold: a partial line (< 512) plus one read.
const BUFFER_CAP: usize = MAX_COMMAND_LINE - 1 + DIALOGUE_READ;

/// How a dialogue ended; `at` is the stream offset just past the deciding line's LF.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The input ran out with the dialogue still going.
    Open,
    Quit,
    Close(&'static str),
    StartTls {
        at: usize,
    },
    PassThrough {
        line: Vec<u8>,
        at: usize,
    },
}

#[derive(Debug, PartialEq, Eq)]
struct Run {
    replies: Vec<Vec<u8>>,
    end: End,
}

/// Input: flags (bit 0: `require_starttls`), two split seeds, then the client's bytes.
/// The stream is run in two arbitrary splits and in full reads: every reply is well-formed,
/// the reader stays bounded, the STARTTLS/pass-through hand-over is exact, and all three
/// runs agree on every reply and decision (segmentation invariance, nginx's split-command bug).
pub fn check_dialogue(data: &[u8]) {
    let mut input = Input(data);
    let require_starttls = input.byte() & 1 == 1;
    let (seed_a, seed_b) = (input.byte(), input.byte());
    let stream = input.rest();
    let reference = run(stream, require_starttls, 0);
    for seed in [seed_a, seed_b, 1] {
        assert_eq!(
            run(stream, require_starttls, seed),
            reference,
            "split seed {seed} changed the dialogue"
        );
    }
}

fn run(stream: &[u8], require_starttls: bool, seed: u8) -> Run {
    let mut dialogue = Dialogue::new(HOSTNAME, require_starttls, default_capabilities());
    assert_eq!(our_replies(&dialogue.greeting()), vec![220]);
    let mut reader = LineReader::default();
    let mut reads = segments(stream, seed, DIALOGUE_READ).into_iter();
    let mut fed = 0usize;
    let mut replies = Vec::new();
    loop {
        let event = loop {
            if let Some(event) = reader.next_event() {
                break event;
            }
            assert!(
                reader.buffered() < MAX_COMMAND_LINE,
                "reader holds {} bytes with no line to give",
                reader.buffered()
            );
            let Some(read) = reads.next() else {
                assert!(dialogue.errors() < MAX_ERRORS);
                return Run {
                    replies,
                    end: End::Open,
                };
            };
            reader.feed(read);
            fed += read.len();
            assert!(
                reader.buffered() <= BUFFER_CAP,
                "reader holds {} bytes",
                reader.buffered()
            );
        };
        if let LineEvent::Line(line) = &event {
            assert!(!line.contains(&b'\n') && line.len() < MAX_COMMAND_LINE);
        }
        let errors_before = dialogue.errors();
        let step = dialogue.on_event(event);
        let end = match step {
            Step::Reply(reply) => {
                let codes = our_replies(&reply);
                assert_eq!(codes.len(), 1, "one reply per command");
                assert_eq!(
                    codes[0] >= 500,
                    dialogue.errors() == errors_before + 1,
                    "a 5xx counts as an error, anything else does not"
                );
                replies.push(reply);
                continue;
            }
            Step::Quit(reply) => {
                assert_eq!(our_replies(&reply), vec![221]);
                End::Quit
            }
            Step::Close { reply, reason } => {
                let codes = our_replies(&reply);
                if reason == "too many errors" {
                    assert_eq!(dialogue.errors(), MAX_ERRORS);
                    assert_eq!(codes.len(), 2);
                    assert_eq!(codes[1], 421);
                } else {
                    assert_eq!(codes, vec![221], "{reason}");
                }
                End::Close(reason)
            }
            Step::StartTls(reply) => {
                assert_eq!(our_replies(&reply), vec![220]);
                let at = handed_over(&mut reader, stream, fed);
                let line = last_line(&stream[..at]);
                let text = std::str::from_utf8(line).expect("an accepted STARTTLS line is UTF-8");
                let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
                assert!(
                    verb.eq_ignore_ascii_case("STARTTLS") && arg.trim().is_empty(),
                    "STARTTLS accepted on the line {text:?}"
                );
                End::StartTls { at }
            }
            Step::PassThrough(line) => {
                assert!(
                    !require_starttls,
                    "pass-through on a require_starttls listener"
                );
                assert!(
                    !line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f),
                    "a control byte would be replayed upstream"
                );
                let at = handed_over(&mut reader, stream, fed);
                assert_eq!(last_line(&stream[..at]), line.as_slice());
                if let Some(greet) = dialogue.greet() {
                    let replay = greet.line();
                    assert!(replay.len() <= MAX_COMMAND_LINE && replay.ends_with(b"\r\n"));
                    assert_eq!(replay.iter().filter(|&&b| b == b'\n').count(), 1);
                }
                End::PassThrough { line, at }
            }
        };
        return Run { replies, end };
    }
}

/// Takes what the reader holds at a hand-over and checks that it is exactly the stream
/// after the deciding line's LF, as far as it was read; returns that offset.
fn handed_over(reader: &mut LineReader, stream: &[u8], fed: usize) -> usize {
    let rest = reader.take_remaining();
    assert_eq!(reader.buffered(), 0);
    assert_eq!(
        reader.next_event(),
        None,
        "bytes yielded after the hand-over"
    );
    let at = fed - rest.len();
    assert_eq!(
        &stream[at..fed],
        rest.as_slice(),
        "handed-over bytes are not the stream's"
    );
    assert!(
        at > 0 && stream[at - 1] == b'\n',
        "hand-over not at a line end"
    );
    at
}

/// The last line of `before` (which ends with LF), without CRLF or LF.
fn last_line(before: &[u8]) -> &[u8] {
    let body = &before[..before.len() - 1];
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let line = &body[start..];
    line.strip_suffix(b"\r").unwrap_or(line)
}
