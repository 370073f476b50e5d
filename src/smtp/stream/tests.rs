use super::*;

fn client(s: &mut SmtpStream, input: &[u8]) -> (String, String, usize) {
    let (mut up, mut cl) = (Vec::new(), Vec::new());
    let n = s.client_bytes(input, &mut up, &mut cl);
    (
        String::from_utf8(up).unwrap(),
        String::from_utf8(cl).unwrap(),
        n,
    )
}

fn upstream(s: &mut SmtpStream, input: &[u8]) -> String {
    let mut cl = Vec::new();
    s.upstream_bytes(input, &mut cl).unwrap();
    String::from_utf8(cl).unwrap()
}

#[test]
fn starttls_inside_tls_is_answered_in_order_and_never_forwarded() {
    let mut s = SmtpStream::default();
    let (up, cl, _) = client(&mut s, b"NOOP\r\nSTARTTLS\r\nNOOP\r\n");
    assert_eq!(up, "NOOP\r\nNOOP\r\n");
    assert_eq!(cl, "", "our 554 waits for the first NOOP's reply");
    let out = upstream(&mut s, b"250 ok 1\r\n");
    assert_eq!(out, "250 ok 1\r\n554 5.5.1 Error: TLS already active\r\n");
    assert_eq!(upstream(&mut s, b"250 ok 2\r\n"), "250 ok 2\r\n");
}

#[test]
fn every_ehlo_reply_is_filtered() {
    let mut s = SmtpStream::default();
    for _ in 0..2 {
        client(&mut s, b"EHLO a\r\n");
        let out = upstream(&mut s, b"250-mx\r\n250-STARTTLS\r\n250 PIPELINING\r\n");
        assert_eq!(out, "250-mx\r\n250 PIPELINING\r\n");
    }
}

#[test]
fn data_content_passes_byte_for_byte_and_ends_only_at_crlf_dot_crlf() {
    let mut s = SmtpStream::default();
    let (up, _, n) = client(&mut s, b"DATA\r\nSTARTTLS\r\n");
    assert_eq!(up, "DATA\r\n");
    assert_eq!(n, 6, "content waits for the DATA reply");
    assert_eq!(upstream(&mut s, b"354 go\r\n"), "354 go\r\n");
    let body = "STARTTLS\r\nEHLO x\r\n..\r\n.x\r\nbare\n.\nnot the end\r\n.\rstill\r\n.\r\n";
    let (up, cl, n) = client(&mut s, format!("{body}STARTTLS\r\n").as_bytes());
    assert_eq!(up, body);
    assert_eq!(n, body.len() + 10);
    assert_eq!(cl, "");
    assert_eq!(
        upstream(&mut s, b"250 queued\r\n"),
        "250 queued\r\n554 5.5.1 Error: TLS already active\r\n"
    );
}

#[test]
fn end_of_data_split_across_reads() {
    let mut s = SmtpStream::default();
    client(&mut s, b"DATA\r\n");
    upstream(&mut s, b"354 go\r\n");
    for part in [&b"body\r"[..], b"\n", b".", b"\r", b"\nQUIT\r\n"] {
        client(&mut s, part);
    }
    assert_eq!(
        s.expects
            .iter()
            .filter(|e| **e == Expect::Upstream(ReplyKind::Other))
            .count(),
        2,
        "end of data and QUIT"
    );
}

#[test]
fn refused_data_goes_back_to_commands() {
    let mut s = SmtpStream::default();
    client(&mut s, b"DATA\r\n");
    upstream(&mut s, b"554 no valid recipients\r\n");
    let (up, cl, _) = client(&mut s, b"STARTTLS\r\n");
    assert_eq!(up, "");
    assert!(cl.starts_with("554 5.5.1"));
}

#[test]
fn bdat_content_is_not_interpreted() {
    let mut s = SmtpStream::default();
    let (up, cl, _) = client(&mut s, b"BDAT 10 LAST\r\nSTARTTLS\r\nNOOP\r\n");
    assert_eq!(up, "BDAT 10 LAST\r\nSTARTTLS\r\nNOOP\r\n");
    assert_eq!(cl, "");
}

#[test]
fn an_endless_command_line_is_forwarded_not_buffered() {
    let mut s = SmtpStream::default();
    for _ in 0..100 {
        let (up, _, _) = client(&mut s, &[b'x'; 1000]);
        assert!(!up.is_empty() || s.line.len() <= MAX_TRACKED_LINE);
    }
    assert!(s.line.len() <= MAX_TRACKED_LINE);
}

#[test]
fn end_of_data_is_found_at_every_split_point() {
    // Traps for the CR-skipping fast path: CR CR LF, bare LF dot, a dot after CR only.
    let body: &[u8] = b"a\r\r\n.x\r\n\n.\n\r.\r\n\r\r\n..\r\nz\r\n.\r\n";
    let end = body.len();
    for split in 0..=end {
        let mut s = SmtpStream::default();
        client(&mut s, b"DATA\r\n");
        upstream(&mut s, b"354 go\r\n");
        let (up1, _, n1) = client(&mut s, &body[..split]);
        let (up2, _, n2) = client(&mut s, &[&body[split..], b"QUIT\r\n"].concat());
        assert_eq!(
            format!("{up1}{up2}").as_bytes(),
            [body, b"QUIT\r\n"].concat()
        );
        assert_eq!(n1 + n2, end + 6, "split at {split}");
        assert_eq!(s.expects.len(), 2, "end of data and QUIT at split {split}");
    }
}

#[test]
fn our_replies_owed_before_a_malformed_reply_still_go_out() {
    let mut s = SmtpStream::default();
    client(&mut s, b"NOOP\r\nSTARTTLS\r\nNOOP\r\n");
    let mut out = Vec::new();
    let r = s.upstream_bytes(b"250 ok\r\nHTTP/1.1 200 OK\r\n", &mut out);
    assert!(matches!(r, Err(ReplyError::Malformed(_))));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "250 ok\r\n554 5.5.1 Error: TLS already active\r\n"
    );
}

/// The byte-at-a-time automaton the SIMD scan replaced: the reference.
fn scan_bytes(input: &[u8], mut matched: usize) -> (usize, usize) {
    for (i, &b) in input.iter().enumerate() {
        matched = if b == END_OF_DATA[matched] {
            matched + 1
        } else {
            usize::from(b == b'\r')
        };
        if matched == END_OF_DATA.len() {
            return (i + 1, matched);
        }
    }
    (input.len(), matched)
}

#[test]
fn data_scan_matches_the_byte_automaton() {
    // Content from a small alphabet dense in terminator bytes, split at every point and
    // started from every partial match: both scans must agree on every piece.
    let alphabet = b"\r\n.x";
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..3000 {
        let len = (next() % 40) as usize;
        let input: Vec<u8> = (0..len).map(|_| alphabet[(next() % 4) as usize]).collect();
        for start in 0..END_OF_DATA.len() {
            assert_eq!(
                scan_data(&input, start),
                scan_bytes(&input, start),
                "{:?} from {start}",
                String::from_utf8_lossy(&input)
            );
        }
    }
    // Mail-shaped content: a terminator after many 80-byte lines, found in one search.
    let mut mail = b"x".repeat(78);
    mail.extend_from_slice(b"\r\n");
    let mut body = mail.repeat(100);
    body.extend_from_slice(b".\r\nQUIT\r\n");
    assert_eq!(scan_data(&body, 2), (8003, 5));
    assert_eq!(scan_data(&body, 2), scan_bytes(&body, 2));
}
