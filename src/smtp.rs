//! Pure SMTP: bytes and lines in, decisions out. No sockets here except the small
//! `reply::read_reply` helper, which only reads.

pub(crate) mod command;
pub(crate) mod dialogue;
pub(crate) mod ehlo;
pub(crate) mod guard;
pub(crate) mod line;
pub(crate) mod pretls;
pub(crate) mod reply;
pub(crate) mod stream;

/// A small deterministic generator for the unit tests' random inputs (xorshift64), so a
/// failing case is the same on every run.
#[cfg(test)]
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
