//! Removes `STARTTLS` from an upstream EHLO reply (RFC 3207 §4.2: never offered after the
//! handshake). The last remaining line gets the `250 ` separator.

/// `reply` is one complete reply. Non-2xx and single-line replies come back unchanged.
/// The first line is the server's domain (RFC 5321 §4.1.1.1 `ehlo-ok-rsp`), never an
/// extension, so it is always kept: the client gets a reply whatever the upstream sent.
pub(crate) fn strip_starttls(reply: &[u8]) -> Vec<u8> {
    if !reply.starts_with(b"2") || !reply.contains(&b'-') {
        return reply.to_vec();
    }
    let lines: Vec<&[u8]> = reply
        .split_inclusive(|&b| b == b'\n')
        .enumerate()
        .filter(|&(i, l)| i == 0 || !is_starttls_line(l))
        .map(|(_, l)| l)
        .collect();
    let mut out = Vec::with_capacity(reply.len());
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        out.extend_from_slice(line);
        // Only an existing separator is rewritten: a bare `250\r\n` keeps its CR.
        if matches!(line.get(3), Some(b' ' | b'-')) {
            let at = out.len() - line.len() + 3;
            out[at] = if i == last { b' ' } else { b'-' };
        }
    }
    out
}

/// A line whose EHLO keyword (first word, RFC 5321 `ehlo-line`) is STARTTLS, any case.
fn is_starttls_line(line: &[u8]) -> bool {
    line.get(4..)
        .unwrap_or_default()
        .split(u8::is_ascii_whitespace)
        .find(|word| !word.is_empty())
        .is_some_and(|word| word.eq_ignore_ascii_case(b"STARTTLS"))
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

    #[test]
    fn the_domain_line_stays_and_every_starttls_keyword_goes() {
        assert_eq!(s(b"250-STARTTLS\r\n250 STARTTLS\r\n"), "250 STARTTLS\r\n");
        assert_eq!(
            s(b"250-mx\r\n250-STARTTLS REQUIRED\r\n250- starttls\t\r\n250 SIZE 1\r\n"),
            "250-mx\r\n250 SIZE 1\r\n"
        );
        assert_eq!(
            s(b"250-mx\r\n250-STARTTLSX\r\n250 X\r\n"),
            "250-mx\r\n250-STARTTLSX\r\n250 X\r\n"
        );
    }

    #[test]
    fn a_bare_code_line_keeps_its_crlf() {
        assert_eq!(s(b"250-mx\r\n250-STARTTLS\r\n250\r\n"), "250-mx\r\n250\r\n");
    }
}
