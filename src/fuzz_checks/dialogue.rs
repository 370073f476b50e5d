//! FZ-1, FZ-2: the pre-TLS side of a STARTTLS listener, driven through `smtp::PreTls`, the
//! very object the session loop drives (read when it says `Read`, write what it says).

use super::{Input, our_replies, segments};
use crate::smtp::dialogue::{CloseReason, Dialogue, MAX_ERRORS, default_capabilities};
use crate::smtp::line::MAX_COMMAND_LINE;
use crate::smtp::pretls::{self, Handoff, Next, PreTls};

const HOSTNAME: &str = "mx.example.test";
/// Unprocessed input the reader may hold: a partial line (< 512) plus one read.
const BUFFER_CAP: usize = MAX_COMMAND_LINE - 1 + pretls::READ;

/// How a dialogue ended; `at` is the stream offset just past the deciding line's LF.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The input ran out with the dialogue still going.
    Open,
    Quit,
    Close(CloseReason),
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
    let mut pre = PreTls::new(Dialogue::new(
        HOSTNAME,
        require_starttls,
        default_capabilities(),
    ));
    assert_eq!(our_replies(&pre.greeting()), vec![220]);
    let mut reads = segments(stream, seed, pretls::READ).into_iter();
    let mut fed = 0usize;
    let mut replies = Vec::new();
    let mut errors_before = 0;
    loop {
        let end = match pre.step() {
            Next::Read => {
                assert!(
                    pre.buffered() < MAX_COMMAND_LINE,
                    "reader holds {} bytes with no line to give",
                    pre.buffered()
                );
                let Some(read) = reads.next() else {
                    assert!(pre.errors() < MAX_ERRORS);
                    return Run {
                        replies,
                        end: End::Open,
                    };
                };
                pre.receive(read);
                fed += read.len();
                assert!(
                    pre.buffered() <= BUFFER_CAP,
                    "reader holds {} bytes",
                    pre.buffered()
                );
                continue;
            }
            Next::Reply(reply) => {
                let codes = our_replies(&reply);
                assert_eq!(codes.len(), 1, "one reply per command");
                assert_eq!(
                    codes[0] >= 500,
                    pre.errors() == errors_before + 1,
                    "a 5xx counts as an error, anything else does not"
                );
                errors_before = pre.errors();
                replies.push(reply);
                continue;
            }
            Next::Done(Handoff::Close {
                reply: None,
                reason,
            }) => {
                assert_eq!(reason, CloseReason::TlsOnStarttlsPort);
                assert_eq!(
                    stream.first(),
                    Some(&0x16),
                    "only a ClientHello closes silently"
                );
                End::Close(reason)
            }
            Next::Done(Handoff::Close {
                reply: Some(reply),
                reason,
            }) => {
                let codes = our_replies(&reply);
                match reason {
                    CloseReason::Quit => {
                        assert_eq!(codes, vec![221]);
                        End::Quit
                    }
                    CloseReason::TooManyErrors => {
                        assert_eq!(pre.errors(), MAX_ERRORS);
                        assert_eq!(codes.len(), 2);
                        assert_eq!(codes[1], 421);
                        End::Close(reason)
                    }
                    other => {
                        assert_eq!(codes, vec![221], "{other:?}");
                        End::Close(reason)
                    }
                }
            }
            Next::Done(Handoff::StartTls { reply, discarded }) => {
                assert_eq!(our_replies(&reply), vec![220]);
                let at = handed_over(stream, fed, &discarded);
                let line = last_line(&stream[..at]);
                let text = std::str::from_utf8(line).expect("an accepted STARTTLS line is UTF-8");
                // The session's one reading (`smtp::command`, Postfix's): words split on SP
                // and HTAB, blanks around them ignored; STARTTLS takes no argument.
                let words: Vec<&str> = text.split([' ', '\t']).filter(|w| !w.is_empty()).collect();
                assert!(
                    words.len() == 1 && words[0].eq_ignore_ascii_case("STARTTLS"),
                    "STARTTLS accepted on the line {text:?}"
                );
                End::StartTls { at }
            }
            Next::Done(Handoff::PassThrough { greet, forward }) => {
                assert!(
                    !require_starttls,
                    "pass-through on a require_starttls listener"
                );
                let crlf = forward
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .expect("the deciding line is re-emitted with CRLF");
                let line = forward[..crlf].to_vec();
                assert!(
                    !line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f),
                    "a control byte would be replayed upstream"
                );
                let at = handed_over(stream, fed, &forward[crlf + 2..]);
                assert_eq!(last_line(&stream[..at]), line.as_slice());
                if let Some(greet) = greet {
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

/// Checks that the bytes handed over are exactly the stream after the deciding line's LF,
/// as far as it was read; returns that offset.
fn handed_over(stream: &[u8], fed: usize, rest: &[u8]) -> usize {
    let at = fed - rest.len();
    assert_eq!(
        &stream[at..fed],
        rest,
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
