//! The smuggling guard on DATA content (sans-IO; catalogue HF-2, HF-6). An MTA that ends
//! DATA at a bare-LF `.` line (Debian 12's Postfix by default) would read what follows as a
//! second transaction with a forged envelope, while the proxy, which ends DATA only at the
//! strict `CRLF.CRLF`, reads it as content. The guard makes the two agree:
//!
//! - `normalize` (default): the content the MTA gets has only CRLF line endings (a bare LF
//!   or bare CR becomes CRLF) and a line holding a single `.` that the client did not both
//!   begin after a real CRLF and end with a real CRLF is dot-stuffed (`..`). So the only `.`
//!   line the MTA sees is the client's own `CRLF.CRLF`, which is also where the proxy ends
//!   DATA. The line endings are classified on the client's bytes, never after a
//!   substitution: normalizing first would turn `\r\n.\n` into a terminator.
//!   Every change is an insertion (a CR, an LF or a dot), counted in `inserted`.
//! - `reject`: at the first bare CR or LF the session is marked; the caller closes the
//!   upstream mid-DATA (the MTA discards the partial message), the rest of the content up to
//!   the strict end of data is discarded and the client gets `550 5.5.2`.
//! - `off`: the content passes byte for byte (`scan_data` in `stream`).
//!
//! A CR or a line-initial `.` at the end of one read cannot be judged before the next byte:
//! it is held (two flags, no buffer) and written with the next read's output.

/// What the guard does with DATA content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum GuardMode {
    Off,
    #[default]
    Normalize,
    Reject,
}

/// Where the current line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    /// Nothing of the line yet.
    Start,
    /// The line so far is a single `.`, held back (not yet written).
    Dot,
    /// Anything else.
    Mid,
}

/// The guard's state over the session's DATA contents. A content ends only at the client's
/// own `CRLF.CRLF`, which leaves the state as new (`Start`, after a real CRLF, no CR held),
/// so the next DATA starts from where the last one ended; `reject` ends the session.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    mode: GuardMode,
    /// The current line began after a real CRLF (or at the start of the content).
    after_crlf: bool,
    col: Col,
    /// A CR was the last byte seen and is held until the next byte tells what it is.
    cr: bool,
    /// The first bare CR or LF the client sent in this session's DATA (`reject`: nothing
    /// more is written).
    tripped: Option<Bare>,
    /// Bytes inserted into the content for the MTA, over the session.
    pub(crate) inserted: u64,
}

/// Which bare line ending tripped `reject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bare {
    Cr,
    Lf,
}

/// What one call made of the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// Input bytes consumed (the terminator included when found).
    pub used: usize,
    /// The client's `CRLF.CRLF` was found.
    pub end: bool,
}

const CR: u8 = b'\r';
const LF: u8 = b'\n';

impl Guard {
    pub(crate) fn new(mode: GuardMode) -> Self {
        Self {
            mode,
            after_crlf: true,
            col: Col::Start,
            cr: false,
            tripped: None,
            inserted: 0,
        }
    }

    pub(crate) fn mode(&self) -> GuardMode {
        self.mode
    }

    /// The bare line ending that tripped `reject`, if one did.
    pub(crate) fn tripped(&self) -> Option<Bare> {
        self.tripped
    }

    /// Scans content (mode `normalize` or `reject`); what the MTA gets is appended to `out`
    /// (nothing once `reject` has tripped).
    pub(crate) fn content(&mut self, input: &[u8], out: &mut Vec<u8>) -> Scanned {
        debug_assert!(self.mode != GuardMode::Off);
        let mut i = 0;
        // Input bytes from `run` to `i` are written verbatim when the run is flushed.
        let mut run = 0;
        if !self.cr && self.col != Col::Dot && fast_path() {
            // Most reads are whole lines of ordinary mail: one vectorised pass proves it
            // and the byte-level walk below is skipped (it stopped at every line end).
            i = self.clean_prefix(input);
        }
        while i < input.len() {
            if self.cr {
                self.cr = false;
                let ending = if input[i] == LF {
                    i += 1;
                    Ending::Crlf
                } else {
                    Ending::BareCr
                };
                if self.line_end(ending, out) {
                    return Scanned { used: i, end: true };
                }
                run = i;
                continue;
            }
            match self.col {
                Col::Start if input[i] == b'.' => {
                    self.emit(&input[run..i], out);
                    self.col = Col::Dot;
                    i += 1;
                    run = i;
                    continue;
                }
                Col::Dot if input[i] != CR && input[i] != LF => {
                    self.emit(b".", out);
                    self.col = Col::Mid;
                }
                _ => {}
            }
            let Some(k) = memchr::memchr2(CR, LF, &input[i..]) else {
                // The line goes on into the next read: whatever comes, it is not a `.` line.
                self.col = Col::Mid;
                i = input.len();
                break;
            };
            // (Bytes before the line end make no `.` line either; only `Dot` is looked at.)
            let at = i + k;
            if input[at] == CR && input.get(at + 1) == Some(&LF) && self.col != Col::Dot {
                // The common case, a real CRLF after an ordinary line: the run goes on.
                i = at + 2;
                self.col = Col::Start;
                self.after_crlf = true;
                continue;
            }
            self.emit(&input[run..at], out);
            i = at + 1;
            run = i;
            if input[at] == CR {
                self.cr = true;
            } else if self.line_end(Ending::BareLf, out) {
                return Scanned { used: i, end: true };
            }
        }
        self.emit(&input[run..i], out);
        Scanned {
            used: input.len(),
            end: false,
        }
    }

    /// How much of `input` (from a line start or mid-line, no CR held) is ordinary content
    /// that passes unchanged: every CR followed by LF, every LF preceded by CR, no line
    /// beginning with `.`. Either all of it (less a trailing CR, which the walk judges) or
    /// nothing; the state moves past what it takes.
    fn clean_prefix(&mut self, input: &[u8]) -> usize {
        let n = if input.last() == Some(&CR) {
            input.len() - 1
        } else {
            input.len()
        };
        let block = &input[..n];
        let (Some(&first), Some(&last)) = (block.first(), block.last()) else {
            return 0;
        };
        if first == LF || (self.col == Col::Start && first == b'.') {
            return 0;
        }
        // Branch-free over adjacent pairs so that it vectorises; no early exit.
        let mut bad = 0u8;
        for (&x, &y) in block.iter().zip(&block[1..]) {
            bad |= u8::from((x == CR) != (y == LF)) | u8::from(x == LF && y == b'.');
        }
        if bad != 0 || last == CR {
            return 0;
        }
        if last == LF {
            self.col = Col::Start;
            self.after_crlf = true;
        } else {
            if memchr::memchr(LF, block).is_some() {
                self.after_crlf = true;
            }
            self.col = Col::Mid;
        }
        n
    }

    fn emit(&self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.tripped.is_none() || self.mode != GuardMode::Reject {
            out.extend_from_slice(bytes);
        }
    }

    /// A line ends (its CR and LF not yet written). Returns whether this was the client's
    /// end of data.
    fn line_end(&mut self, ending: Ending, out: &mut Vec<u8>) -> bool {
        let real = ending == Ending::Crlf;
        if !real {
            self.tripped.get_or_insert(if ending == Ending::BareCr {
                Bare::Cr
            } else {
                Bare::Lf
            });
        }
        let was = std::mem::replace(&mut self.col, Col::Start);
        let after_crlf = std::mem::replace(&mut self.after_crlf, real);
        if was == Col::Dot {
            if real && after_crlf {
                self.emit(b".\r\n", out);
                return true;
            }
            // Any other `.` line is stuffed, so it can never end DATA at the MTA.
            self.emit(b"..", out);
            self.count_inserted(1);
        }
        self.emit(b"\r\n", out);
        if !real {
            self.count_inserted(1);
        }
        false
    }

    fn count_inserted(&mut self, n: u64) {
        if self.mode == GuardMode::Normalize {
            self.inserted += n;
        }
    }
}

#[cfg(not(test))]
fn fast_path() -> bool {
    true
}

#[cfg(test)]
thread_local! {
    static FAST: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

#[cfg(test)]
fn fast_path() -> bool {
    FAST.with(std::cell::Cell::get)
}

/// How a line of content ended, judged on the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Crlf,
    BareCr,
    BareLf,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `reads` through a guard; the output, each read's `Scanned`, the final state.
    fn run(mode: GuardMode, reads: &[&[u8]], fast: bool) -> (Vec<u8>, Vec<(usize, bool)>, String) {
        FAST.with(|f| f.set(fast));
        let mut g = Guard::new(mode);
        let mut out = Vec::new();
        let mut scans = Vec::new();
        for r in reads {
            let s = g.content(r, &mut out);
            scans.push((s.used, s.end));
            if s.end {
                break;
            }
        }
        FAST.with(|f| f.set(true));
        if g.cr && g.col == Col::Mid {
            // Equivalent: with a CR held the line ends next, and only `Dot` is looked at.
            g.col = Col::Start;
        }
        (out, scans, format!("{g:?}"))
    }

    #[test]
    fn the_fast_path_changes_nothing() {
        let mut next = crate::smtp::xorshift(0x2545_f491_4f6c_dd1d);
        let alphabet = [b'a', b'a', b'a', b'a', b'a', CR, LF, b'.'];
        for case in 0..3000 {
            let len = 1 + (next() % 400) as usize;
            // Mostly clean mail lines, with bare endings and dots sprinkled in.
            let mut content = Vec::new();
            while content.len() < len {
                if next().is_multiple_of(4) {
                    content.push(alphabet[(next() % alphabet.len() as u64) as usize]);
                } else {
                    content.extend_from_slice(b"line of mail\r\n");
                }
            }
            let mut reads = Vec::new();
            let mut rest = &content[..];
            while !rest.is_empty() {
                let n = (1 + (next() % 64) as usize).min(rest.len());
                let (a, b) = rest.split_at(n);
                reads.push(a);
                rest = b;
            }
            for mode in [GuardMode::Normalize, GuardMode::Reject] {
                assert_eq!(
                    run(mode, &reads, true),
                    run(mode, &reads, false),
                    "case {case} {mode:?}: {:?}",
                    String::from_utf8_lossy(&content)
                );
            }
        }
    }

    #[test]
    fn clean_mail_takes_the_fast_path_whole() {
        let mut g = Guard::new(GuardMode::Normalize);
        let block = b"Subject: x\r\n\r\nbody line\r\nlast, no end";
        assert_eq!(g.clean_prefix(block), block.len());
        assert_eq!(g.col, Col::Mid);
        for dirty in [
            &b"a\nb"[..],
            b"a\rb",
            b"\r\n.\r\n",
            b".x",
            b"\nx",
            b"a\r\r\n",
        ] {
            let mut g = Guard::new(GuardMode::Normalize);
            assert_eq!(g.clean_prefix(dirty), 0, "{dirty:?}");
        }
        // A trailing CR is left to the walk.
        let mut g = Guard::new(GuardMode::Normalize);
        assert_eq!(g.clean_prefix(b"abc\r"), 3);
    }
}
