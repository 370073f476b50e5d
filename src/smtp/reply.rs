//! SMTP replies: recognising a complete (multi-line) reply in bytes from the upstream,
//! and the replies the proxy itself sends.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bound on one reply from the upstream (a greeting or an EHLO list): RFC 5321 §4.5.3.1.5
/// allows 512-octet reply lines; 64 of them is far beyond any real EHLO list.
pub(crate) const MAX_REPLY_LEN: usize = 64 * 512;

/// Where a complete reply ends in a buffer, and its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplySpan {
    pub code: u16,
    /// Bytes from the start of the buffer up to and including the last line's LF.
    pub len: usize,
}

/// Why no reply could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplyError {
    /// A line that does not start with three digits and ` `, `-` or the line end.
    Malformed(String),
    TooLong,
    /// The peer closed before a complete reply.
    Closed,
    Io(String),
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(line) => write!(f, "malformed reply line {line:?}"),
            Self::TooLong => write!(f, "reply longer than {MAX_REPLY_LEN} bytes"),
            Self::Closed => f.write_str("connection closed before a complete reply"),
            Self::Io(e) => f.write_str(e),
        }
    }
}

/// Finds the first complete reply in `buf`: `Ok(None)` means "need more bytes".
pub(crate) fn parse_reply(buf: &[u8]) -> Result<Option<ReplySpan>, ReplyError> {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + nl + 1];
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.len() < 3 || !text[..3].iter().all(u8::is_ascii_digit) {
            return Err(ReplyError::Malformed(
                String::from_utf8_lossy(&text[..text.len().min(80)]).into_owned(),
            ));
        }
        let code = (u16::from(text[0] - b'0') * 100)
            + (u16::from(text[1] - b'0') * 10)
            + u16::from(text[2] - b'0');
        start += nl + 1;
        // The bound holds for complete replies too, or it would depend on how reads cut them.
        if start > MAX_REPLY_LEN {
            return Err(ReplyError::TooLong);
        }
        match text.get(3) {
            Some(b'-') => continue,
            None | Some(b' ') => return Ok(Some(ReplySpan { code, len: start })),
            Some(_) => {
                return Err(ReplyError::Malformed(
                    String::from_utf8_lossy(&text[..text.len().min(80)]).into_owned(),
                ));
            }
        }
    }
    if buf.len() > MAX_REPLY_LEN {
        return Err(ReplyError::TooLong);
    }
    Ok(None)
}

/// Reads until `buf` holds one complete reply; bytes after it stay in `buf`.
/// Cancel-safe only in the sense that `buf` keeps what was read.
pub(crate) async fn read_reply<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<ReplySpan, ReplyError> {
    loop {
        if let Some(span) = parse_reply(buf)? {
            return Ok(span);
        }
        let mut chunk = [0u8; 1024];
        let n = reader
            .read(&mut chunk)
            .await
            .map_err(|e| ReplyError::Io(e.to_string()))?;
        if n == 0 {
            return Err(ReplyError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `421 4.3.0`: our fault or the upstream's, temporary, so the sender retries.
pub(crate) fn upstream_unavailable(hostname: &str) -> Vec<u8> {
    format!("421 4.3.0 {hostname} Service temporarily unavailable, try again later\r\n")
        .into_bytes()
}

/// `421 4.4.2`: the client sent no command within `command_timeout`.
pub(crate) fn command_timeout(hostname: &str) -> Vec<u8> {
    format!("421 4.4.2 {hostname} Error: timeout exceeded\r\n").into_bytes()
}

/// `421 4.7.0`: a connection limit (global, listener or per client address) is reached.
pub(crate) fn too_many_connections(hostname: &str) -> Vec<u8> {
    format!("421 4.7.0 {hostname} Too many connections, try again later\r\n").into_bytes()
}

/// `554 5.7.1` as the greeting: the client is denied (`allow`/`deny`, the deny file).
pub(crate) fn access_denied(hostname: &str) -> Vec<u8> {
    format!("554 5.7.1 {hostname} Access denied\r\n").into_bytes()
}

/// `421 4.7.0`: the proxy refused the session's content (the smuggling guard's `reject`);
/// the upstream connection is gone, so the session ends here.
pub(crate) fn closing(hostname: &str) -> Vec<u8> {
    format!("421 4.7.0 {hostname} Error: closing connection\r\n").into_bytes()
}

/// `421 4.3.0`: SIGTERM reached a session still in the pre-TLS dialogue.
pub(crate) fn shutting_down(hostname: &str) -> Vec<u8> {
    format!("421 4.3.0 {hostname} Service shutting down, try again later\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_line_replies() {
        assert_eq!(
            parse_reply(b"220 mx ESMTP\r\n").unwrap(),
            Some(ReplySpan { code: 220, len: 14 })
        );
        let ehlo = b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\nrest";
        assert_eq!(
            parse_reply(ehlo).unwrap(),
            Some(ReplySpan {
                code: 250,
                len: ehlo.len() - 4
            })
        );
        assert_eq!(parse_reply(b"250-mx\r\n250-PIPE").unwrap(), None);
        assert_eq!(
            parse_reply(b"250\r\n").unwrap(),
            Some(ReplySpan { code: 250, len: 5 })
        );
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            parse_reply(b"HTTP/1.1 200 OK\r\n"),
            Err(ReplyError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(b"2500 x\r\n"),
            Err(ReplyError::Malformed(_))
        ));
    }

    #[test]
    fn endless_reply_is_bounded() {
        let mut buf = Vec::new();
        while buf.len() <= MAX_REPLY_LEN {
            buf.extend_from_slice(b"250-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n");
        }
        assert_eq!(parse_reply(&buf), Err(ReplyError::TooLong));
        buf.extend_from_slice(b"250 end\r\n");
        assert_eq!(
            parse_reply(&buf),
            Err(ReplyError::TooLong),
            "complete, in one read"
        );
    }
}
