//! Invariant checks behind the cargo-fuzz targets in `fuzz/` (catalogue §I, FZ-1..FZ-6).
//! Each `check_*` takes the raw fuzz input and panics when an invariant breaks; the fuzz
//! targets are thin wrappers, and `tests/it/fuzz_corpus.rs` replays the committed seeds and
//! regression inputs (`fuzz/seeds/<target>/`) through the same functions under `cargo test`.
//! Not part of the proxy's API.

mod config;
mod dialogue;
mod ehlo;
mod follower;
mod proxy;
mod proxy_outbound;
mod record;

pub use config::check_config;
pub use dialogue::check_dialogue;
pub use ehlo::check_ehlo_filter;
pub use follower::check_follower;
pub use proxy::check_proxy_inbound;
pub use proxy_outbound::check_proxy_outbound;
pub use record::check_record;

/// Structured values read off the fuzz input; past its end every read is zero or empty.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }

    fn rest(&mut self) -> &'a [u8] {
        self.take(self.0.len())
    }
}

/// Cuts `data` into reads of 1..=`max` bytes: seed 0 reads `max` at a time, seed 1 one byte
/// at a time, any other seed draws the sizes (mostly small, sometimes `max`) from xorshift.
fn segments(data: &[u8], seed: u8, max: usize) -> Vec<&[u8]> {
    let mut state = u32::from(seed).wrapping_mul(0x9E37_79B9) | 1;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = match seed {
            0 => max,
            1 => 1,
            _ => {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let limit = match state & 3 {
                    0 => 2,
                    1 => 16,
                    2 => 128,
                    _ => max,
                };
                1 + (state >> 2) as usize % limit
            }
        };
        let (head, tail) = rest.split_at(n.clamp(1, max).min(rest.len()));
        out.push(head);
        rest = tail;
    }
    out
}

/// One reply line split into its code, separator (`None`: the line ends after the code)
/// and text, without the line end; `Err` unless it is `ddd[ -]text\r\n`.
fn split_reply_line(line: &[u8]) -> Result<(u16, Option<u8>, &[u8]), &'static str> {
    let body = line
        .strip_suffix(b"\r\n")
        .ok_or("reply line without CRLF")?;
    if body.contains(&b'\r') || body.contains(&b'\n') {
        return Err("bare CR or LF inside a reply line");
    }
    if body.len() < 3 || !body[..3].iter().all(u8::is_ascii_digit) {
        return Err("reply line without a 3-digit code");
    }
    let code = body[..3]
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    match body.get(3) {
        None => Ok((code, None, &[])),
        Some(&sep @ (b' ' | b'-')) => Ok((code, Some(sep), &body[4..])),
        Some(_) => Err("reply line separator is neither SP nor '-'"),
    }
}

/// `split_reply_line` that panics on a malformed line.
fn reply_line(line: &[u8]) -> (u16, Option<u8>, &[u8]) {
    match split_reply_line(line) {
        Ok(parts) => parts,
        Err(why) => panic!("{why}: {:?}", String::from_utf8_lossy(line)),
    }
}

/// Panics unless `bytes` is one or more complete, well-formed replies of ours: every line
/// `ddd SP|- text CRLF` within 512 octets (RFC 5321 §4.5.3.1.5), continuation lines keep the
/// code, and the last line of each reply uses SP. Returns the replies' codes.
fn our_replies(bytes: &[u8]) -> Vec<u16> {
    assert!(!bytes.is_empty(), "an empty reply");
    let mut codes = Vec::new();
    let mut open: Option<u16> = None;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        assert!(
            line.len() <= 512,
            "reply line over 512 octets: {} bytes",
            line.len()
        );
        let (code, sep, _) = reply_line(line);
        assert!(
            (200..600).contains(&code),
            "reply code {code} outside 2xx-5xx"
        );
        if let Some(prev) = open {
            assert_eq!(prev, code, "a multi-line reply changed its code");
        }
        match sep {
            Some(b'-') => open = Some(code),
            _ => {
                open = None;
                codes.push(code);
            }
        }
    }
    assert!(open.is_none(), "a multi-line reply without its last line");
    codes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_input_in_order_within_the_bound() {
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        for seed in 0..=255u8 {
            let parts = segments(&data, seed, 1024);
            assert_eq!(parts.concat(), data);
            assert!(parts.iter().all(|p| !p.is_empty() && p.len() <= 1024));
        }
        assert_eq!(segments(b"abc", 1, 1024).len(), 3);
        assert_eq!(segments(&data, 0, 1024).len(), 5);
    }

    #[test]
    fn reply_shapes() {
        assert_eq!(
            our_replies(b"250-a\r\n250 b\r\n421 4.7.0 x\r\n"),
            vec![250, 421]
        );
        for bad in [
            &b"250-a\r\n"[..],
            b"250 a\n",
            b"25 a\r\n",
            b"250xa\r\n",
            b"250-a\r\n251 b\r\n",
            b"250 a\rb\r\n",
        ] {
            assert!(
                std::panic::catch_unwind(|| our_replies(bad)).is_err(),
                "{bad:?}"
            );
        }
    }
}
