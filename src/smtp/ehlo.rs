//! Removes keywords from an upstream EHLO reply: `STARTTLS` always (RFC 3207 §4.2: never
//! offered after the handshake), and whatever else the follower refuses (`stream`). The
//! last remaining line gets the `250 ` separator.

/// `reply` is one complete reply. Non-2xx and single-line replies come back unchanged.
/// The first line is the server's domain (RFC 5321 §4.1.1.1 `ehlo-ok-rsp`), never an
/// extension, so it is always kept: the client gets a reply whatever the upstream sent.
/// (The follower strips more with [`strip_keywords`]; this form serves the tests.)
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn strip_starttls(reply: &[u8]) -> Vec<u8> {
    strip_keywords(reply, |k| k.eq_ignore_ascii_case(b"STARTTLS"))
}

/// As [`strip_starttls`], removing every line whose keyword `drop` says so.
pub(crate) fn strip_keywords(reply: &[u8], drop: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    if !reply.starts_with(b"2") || !reply.contains(&b'-') {
        return reply.to_vec();
    }
    let lines: Vec<&[u8]> = reply
        .split_inclusive(|&b| b == b'\n')
        .enumerate()
        .filter(|&(i, l)| i == 0 || !keyword(l).is_some_and(&drop))
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

/// A line's EHLO keyword (first word, RFC 5321 `ehlo-line`).
fn keyword(line: &[u8]) -> Option<&[u8]> {
    line.get(4..)
        .unwrap_or_default()
        .split(u8::is_ascii_whitespace)
        .find(|word| !word.is_empty())
}

/// The extensions the proxy can carry through a plaintext hand-off (it follows commands,
/// DATA and BDAT byte for byte): offered before TLS when the upstream offers them.
const CARRIED: [&str; 8] = [
    "SIZE",
    "8BITMIME",
    "SMTPUTF8",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "PIPELINING",
    "CHUNKING",
    "BINARYMIME",
];

/// From the upstream's EHLO reply (one complete 250 reply), the keywords of [`CARRIED`] it
/// offers, normalised (`SIZE 10240000`; a `SIZE` whose argument is not a number goes bare).
/// `None` for anything but a multi-line 2xx reply. Never AUTH or STARTTLS: not carried.
pub(crate) fn carried_keywords(reply: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(reply).ok()?;
    if !text.starts_with('2') {
        return None;
    }
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut words = line.get(4..).unwrap_or_default().split_ascii_whitespace();
        let Some(keyword) = words.next().map(str::to_ascii_uppercase) else {
            continue;
        };
        if !CARRIED.contains(&keyword.as_str())
            || out
                .iter()
                .any(|k: &String| k.split(' ').next() == Some(&keyword))
        {
            continue;
        }
        out.push(match (keyword.as_str(), words.next()) {
            ("SIZE", Some(n))
                if !n.is_empty() && n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit()) =>
            {
                format!("SIZE {n}")
            }
            _ => keyword,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_carried_keywords_are_kept_normalised() {
        let reply =
            b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 12345678\r\n250-VRFY\r\n250-ETRN\r\n\
250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n\
250-SMTPUTF8\r\n250 CHUNKING\r\n";
        assert_eq!(
            carried_keywords(reply).unwrap(),
            [
                "PIPELINING",
                "SIZE 12345678",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "DSN",
                "SMTPUTF8",
                "CHUNKING"
            ]
        );
        assert_eq!(
            carried_keywords(b"250-x\r\n250 size junk\r\n").unwrap(),
            ["SIZE"]
        );
        assert_eq!(carried_keywords(b"502 no\r\n"), None);
    }

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
