//! Removes `STARTTLS` from an upstream EHLO reply (RFC 3207 §4.2: never offered after the
//! handshake). The last remaining line gets the `250 ` separator.

/// `reply` is one complete reply. Non-2xx and single-line replies come back unchanged.
pub fn strip_starttls(reply: &[u8]) -> Vec<u8> {
    if !reply.starts_with(b"2") || !reply.contains(&b'-') {
        return reply.to_vec();
    }
    let lines: Vec<&[u8]> = reply
        .split_inclusive(|&b| b == b'\n')
        .filter(|l| !is_starttls_line(l))
        .collect();
    let mut out = Vec::with_capacity(reply.len());
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        out.extend_from_slice(line);
        if line.len() > 3 {
            let at = out.len() - line.len() + 3;
            out[at] = if i == last { b' ' } else { b'-' };
        }
    }
    out
}

fn is_starttls_line(line: &[u8]) -> bool {
    let text = line.get(4..).unwrap_or_default();
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    text.trim_ascii().eq_ignore_ascii_case(b"STARTTLS")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: &[u8]) -> String {
        String::from_utf8(strip_starttls(b)).unwrap()
    }

    #[test]
    fn middle_line_removed() {
        assert_eq!(
            s(b"250-mx\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"),
            "250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        );
    }

    #[test]
    fn last_line_removed_and_new_last_line_gets_a_space() {
        assert_eq!(
            s(b"250-mx\r\n250-SIZE 10\r\n250 STARTTLS\r\n"),
            "250-mx\r\n250 SIZE 10\r\n"
        );
    }

    #[test]
    fn lower_case_and_errors() {
        assert_eq!(s(b"250-mx\r\n250 starttls\r\n"), "250 mx\r\n");
        assert_eq!(s(b"250 mx\r\n"), "250 mx\r\n");
        assert_eq!(
            s(b"554-no\r\n554 STARTTLS\r\n"),
            "554-no\r\n554 STARTTLS\r\n"
        );
    }
}
