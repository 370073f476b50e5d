//! Pure SMTP: bytes and lines in, decisions out. No sockets here except the small
//! `reply::read_reply` helper, which only reads.

pub mod dialogue;
pub mod ehlo;
pub mod line;
pub mod pretls;
pub mod reply;
pub mod stream;
