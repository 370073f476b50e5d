//! Pure SMTP: bytes and lines in, decisions out. No sockets here except the small
//! `read_reply` helper, which only reads.

pub mod reply;
