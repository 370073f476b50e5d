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
