use super::*;
use crate::smtp::guard::GuardMode;

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

fn off() -> SmtpStream {
    SmtpStream::new(Path::Tls, GuardMode::Off)
}

#[test]
fn data_content_passes_byte_for_byte_and_ends_only_at_crlf_dot_crlf() {
    let mut s = off();
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
    assert_eq!(s.expects.len(), 2, "BDAT and NOOP");
}

#[test]
fn bdat_chunks_are_counted_across_reads_and_zero_is_no_chunk() {
    let mut s = SmtpStream::default();
    let (up, _, _) = client(&mut s, b"BDAT 12\r\nSTART");
    assert_eq!(up, "BDAT 12\r\nSTART");
    let (up, _, _) = client(&mut s, b"TLS\r\nab");
    assert_eq!(up, "TLS\r\nab", "7 content bytes left, 7 passed");
    assert_eq!(s.expects.len(), 1);
    // The chunk is over: the next line is a command again.
    let (up, cl, _) = client(&mut s, b"STARTTLS\r\n");
    assert_eq!(up, "");
    assert_eq!(s.expects.len(), 2, "our 554 queued after the BDAT reply");
    assert_eq!(cl, "");
    let mut s = SmtpStream::default();
    let (up, _, _) = client(&mut s, b"BDAT 0 LAST\r\nSTARTTLS\r\n");
    assert_eq!(
        up, "BDAT 0 LAST\r\n",
        "an empty chunk: STARTTLS is a command"
    );
}

#[test]
fn tabs_separate_verbs_as_they_do_for_postfix() {
    // HF-4: a tab after BDAT or its size still makes a chunk, for both sides.
    for line in [
        &b"BDAT\t10 LAST\r\n"[..],
        b"BDAT 10\tLAST\r\n",
        b"bdat\t10\r\n",
    ] {
        let mut s = SmtpStream::default();
        let input = [line, b"STARTTLS\r\n"].concat();
        let (up, cl, _) = client(&mut s, &input);
        assert_eq!(up.as_bytes(), &input[..], "{line:?}");
        assert_eq!(cl, "");
    }
    // EHLO with a tab is an EHLO: its reply loses STARTTLS.
    let mut s = SmtpStream::default();
    client(&mut s, b"EHLO\tclient.test\r\n");
    assert_eq!(
        upstream(&mut s, b"250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n"),
        "250-mx\r\n250 8BITMIME\r\n"
    );
}

#[test]
fn control_bytes_in_a_command_are_refused_never_relayed() {
    // HF-3: Postfix reads `STARTTLS\x0b` as STARTTLS and `DATA\0x` as DATA.
    for line in [
        &b"STARTTLS\x0b\r\n"[..],
        b"STARTTLS\x00x\r\n",
        b"DATA\x0b\r\n",
        b"DATA\x00\r\n",
        b"NOOP\rx\r\n",
        b"DATA\x7f\n",
    ] {
        let mut s = SmtpStream::default();
        let (up, cl, n) = client(&mut s, line);
        assert_eq!(up, "", "{line:?}");
        assert_eq!(cl, "500 5.5.2 Error: bad character in command\r\n");
        assert_eq!(n, line.len());
        assert!(s.wants_client_input(), "still reading commands");
    }
}

#[test]
fn bdat_sizes_postfix_refuses_are_refused_here_and_not_counted() {
    // HF-7.
    for line in [
        &b"BDAT +10 LAST\r\n"[..],
        b"BDAT 18446744073709551615 LAST\r\n",
        b"BDAT\r\n",
        b"BDAT 10 LAST x\r\n",
    ] {
        let mut s = SmtpStream::default();
        let (up, cl, _) = client(&mut s, &[line, b"NOOP\r\n"].concat());
        assert_eq!(up, "NOOP\r\n", "{line:?}: refused, NOOP is a command");
        assert_eq!(cl, "501 5.5.4 Syntax: BDAT count [LAST]\r\n");
    }
}

#[test]
fn after_a_plaintext_hand_off_auth_xclient_xforward_are_refused() {
    // HF-1.
    let mut s = SmtpStream::new(Path::Plaintext, GuardMode::Normalize);
    let (up, cl, _) = client(
        &mut s,
        b"AUTH PLAIN AGFAYg==\r\nauth\tlogin\r\nXCLIENT ADDR=1.2.3.4\r\nXFORWARD NAME=x\r\nSTARTTLS\r\n",
    );
    assert_eq!(up, "");
    let refused: Vec<_> = s.refusals().map(|(k, n)| (k.as_str(), n)).collect();
    assert_eq!(
        refused,
        [("starttls", 1), ("auth", 2), ("xclient_xforward", 2)],
        "counted by kind for the metric"
    );
    assert_eq!(
        cl,
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n\
         538 5.7.11 Encryption required for requested authentication mechanism\r\n\
         550 5.7.0 Error: insufficient authorization\r\n\
         550 5.7.0 Error: insufficient authorization\r\n\
         502 5.5.1 Error: STARTTLS is only available before the first mail command\r\n"
    );
    client(&mut s, b"EHLO a\r\n");
    assert_eq!(
        upstream(
            &mut s,
            b"250-mx\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n250-XCLIENT NAME\r\n\
              250-XFORWARD NAME\r\n250-STARTTLS\r\n250-AUTHX\r\n250 SIZE 10\r\n"
        ),
        "250-mx\r\n250-AUTHX\r\n250 SIZE 10\r\n"
    );
}

#[test]
fn inside_tls_auth_passes_and_only_proxy_extensions_are_stripped() {
    let mut s = SmtpStream::default();
    let (up, cl, _) = client(&mut s, b"AUTH PLAIN AGFAYg==\r\nXCLIENT ADDR=1.2.3.4\r\n");
    assert_eq!(up, "AUTH PLAIN AGFAYg==\r\n");
    assert_eq!(cl, "");
    assert_eq!(
        upstream(&mut s, b"235 2.7.0 ok\r\n"),
        "235 2.7.0 ok\r\n550 5.7.0 Error: insufficient authorization\r\n"
    );
    client(&mut s, b"EHLO a\r\n");
    assert_eq!(
        upstream(
            &mut s,
            b"250-mx\r\n250-AUTH PLAIN\r\n250-XFORWARD NAME\r\n250 STARTTLS\r\n"
        ),
        "250-mx\r\n250 AUTH PLAIN\r\n"
    );
}

#[test]
fn an_endless_command_line_is_forwarded_not_buffered() {
    let mut s = SmtpStream::default();
    let mut forwarded = 0;
    client(&mut s, b"NOOP ");
    for _ in 0..100 {
        let (up, _, n) = client(&mut s, &[b'x'; 1000]);
        assert_eq!(n, 1000);
        forwarded += up.len();
        assert!(s.line.len() <= MAX_TRACKED_LINE);
    }
    assert_eq!(forwarded, 100_005, "every byte forwarded as it streamed");
    assert!(s.expects.is_empty(), "no reply owed before its end");
    let (up, _, _) = client(&mut s, b"\r\nNOOP\r\n");
    assert_eq!(up, "\r\nNOOP\r\n");
    assert_eq!(s.expects.len(), 2);
}

#[test]
fn a_long_line_without_a_whole_verb_is_refused() {
    // Postfix skips leading blanks: 1,100 of them then DATA is DATA to it.
    for head in [&[b' '; 1100][..], &[b'x'; 1100]] {
        let mut s = SmtpStream::default();
        let (up, _, _) = client(&mut s, head);
        assert_eq!(up, "");
        let (up, cl, _) = client(&mut s, b"DATA\r\nNOOP\r\n");
        assert_eq!(up, "NOOP\r\n");
        assert!(s.wants_client_input());
        assert_eq!(cl, "500 5.5.2 Error: line too long\r\n");
        assert_eq!(upstream(&mut s, b"250 ok\r\n"), "250 ok\r\n");
    }
}

#[test]
fn a_long_line_keeps_its_verb_across_reads() {
    // HF-5: DATA and 1,100 spaces, the CRLF in a later read.
    let mut line = b"DATA".to_vec();
    line.extend_from_slice(&[b' '; 1100]);
    for cut in [5, 1000, 1024, 1025, 1104] {
        let mut s = SmtpStream::default();
        let (up1, _, _) = client(&mut s, &line[..cut]);
        let (up2, _, _) = client(&mut s, &line[cut..]);
        assert!(s.wants_client_input(), "no CRLF yet at cut {cut}");
        let (up3, _, n) = client(&mut s, b"\r\nSTARTTLS\r\n");
        assert_eq!(
            format!("{up1}{up2}{up3}").len(),
            line.len() + 2,
            "cut {cut}"
        );
        assert_eq!(n, 2, "content waits for the DATA reply");
        assert!(!s.wants_client_input());
        assert_eq!(upstream(&mut s, b"354 go\r\n"), "354 go\r\n");
        let (up, cl, _) = client(&mut s, b"STARTTLS\r\n.\r\n");
        assert_eq!(up, "STARTTLS\r\n.\r\n", "content for both sides");
        assert_eq!(cl, "");
    }
    // What is refused short is refused long: never relayed, answered at its end.
    for verb in ["STARTTLS", "XCLIENT", "BDAT 5", "DATA\x0b"] {
        let mut s = SmtpStream::default();
        let mut long = verb.as_bytes().to_vec();
        long.extend_from_slice(&[b' '; 2000]);
        let (up, cl, _) = client(&mut s, &long);
        assert_eq!((up.as_str(), cl.as_str()), ("", ""), "{verb}");
        let (up, cl, _) = client(&mut s, b"\r\n");
        assert_eq!(up, "", "{verb}");
        assert!(cl.starts_with("500 5.5.2"), "{verb}: {cl}");
    }
}

#[test]
fn owed_replies_are_bounded_by_backpressure() {
    let mut s = SmtpStream::default();
    let input = b"NOOP\r\n".repeat(MAX_OWED + 50);
    let (up, _, n) = client(&mut s, &input);
    assert_eq!(n, MAX_OWED * 6, "stops at the bound");
    assert_eq!(up.len(), n);
    assert!(!s.wants_client_input());
    upstream(&mut s, b"250 ok\r\n");
    assert!(
        s.wants_client_input(),
        "one reply in, one more command may come"
    );
}

#[test]
fn release_gives_back_capacity() {
    let mut s = SmtpStream::default();
    client(&mut s, &[b'x'; 500]);
    client(&mut s, b"\r\n");
    s.upstream_bytes(b"250-a", &mut Vec::new()).unwrap();
    s.release();
    assert_eq!(s.line.capacity(), 0);
    assert!(s.replies.capacity() < 16);
}

/// Body, a bare end of data, a forged second transaction, then the client's real end.
fn smuggle(end: &[u8]) -> Vec<u8> {
    [
        &b"Subject: x\r\n\r\nhello"[..],
        end,
        b"MAIL FROM:<forged@example.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n\
          smuggled\r\n.\r\n",
    ]
    .concat()
}

const VARIANTS: [&[u8]; 8] = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\n.\r",
    b"\r\n.\r\n",
];

fn in_data(mode: GuardMode) -> SmtpStream {
    let mut s = SmtpStream::new(Path::Tls, mode);
    client(&mut s, b"DATA\r\n");
    upstream(&mut s, b"354 go\r\n");
    s
}

/// Whether `out` is canonical content: CRLF line ends only, and its only `.` line last.
fn canonical(out: &[u8]) -> bool {
    let crlf_only = out.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => out.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && out[i - 1] == b'\r',
        _ => true,
    });
    let lines: Vec<&[u8]> = out.split(|&b| b == b'\n').collect();
    let dots = lines.iter().filter(|l| **l == b".\r").count();
    crlf_only && dots == 1 && out.ends_with(b"\r\n.\r\n")
}

#[test]
fn normalize_keeps_every_bare_end_of_data_inside_the_message() {
    for v in VARIANTS {
        let input = smuggle(v);
        let mut s = in_data(GuardMode::Normalize);
        let (up, cl, n) = client(&mut s, &input);
        assert_eq!(cl, "");
        let control = v == b"\r\n.\r\n";
        // The control ends DATA after "hello": the forged MAIL is then a command.
        assert_eq!(
            s.expects.len(),
            if control { 4 } else { 1 },
            "{v:?}: owed replies"
        );
        assert_eq!(up.matches("\r\n.\r\n").count(), 1, "{v:?}: {up:?}");
        if !control {
            assert_eq!(n, input.len());
            assert!(canonical(up.as_bytes()), "{v:?}: {up:?}");
            assert!(up.contains("MAIL FROM:<forged@example.test>"));
            assert!(matches!(s.guard_action(), Some(GuardAction::Normalized(k)) if k > 0));
        } else {
            assert_eq!(s.guard_action(), None);
        }
    }
}

#[test]
fn normalize_output_does_not_depend_on_how_reads_are_cut() {
    for v in VARIANTS {
        let input = smuggle(v);
        let whole = {
            let mut s = in_data(GuardMode::Normalize);
            client(&mut s, &input).0
        };
        for cut in 0..input.len() {
            let mut s = in_data(GuardMode::Normalize);
            let (a, _, n1) = client(&mut s, &input[..cut]);
            let (b, _, n2) = client(&mut s, &input[cut + n1 - cut.min(n1)..]);
            let _ = n2;
            assert_eq!(format!("{a}{b}"), whole, "{v:?} cut at {cut}");
        }
    }
}

#[test]
fn normalize_stuffs_dot_lines_and_counts_what_it_inserts() {
    let mut s = in_data(GuardMode::Normalize);
    let (up, _, _) = client(&mut s, b"a\nb\rc\r\n.\n..\r\n.x\n.\r\n\r\n.\r\n");
    assert_eq!(up, "a\r\nb\r\nc\r\n..\r\n..\r\n.x\r\n..\r\n\r\n.\r\n");
    // a\n +1, b\r +1, .\n +2 (dot and CR), .x\n +1, `.` after a bare LF +1.
    assert_eq!(s.guard_action(), Some(GuardAction::Normalized(6)));
    assert_eq!(s.expects.len(), 1, "the client's own CRLF.CRLF ended it");
    // A real CRLF dot line right after a bare LF line is stuffed too.
    let mut s = in_data(GuardMode::Normalize);
    let (up, _, _) = client(&mut s, b"a\n.\r\nb\r\n.\r\n");
    assert_eq!(up, "a\r\n..\r\nb\r\n.\r\n");
    // Clean mail passes byte for byte and is not counted.
    let mut s = in_data(GuardMode::Normalize);
    let clean = b"Subject: x\r\n\r\n..leading\r\n\r\n.\r\n";
    let (up, _, _) = client(&mut s, clean);
    assert_eq!(up.as_bytes(), clean);
    assert_eq!(s.guard_action(), None);
    // An empty message: the first line is the terminator.
    let mut s = in_data(GuardMode::Normalize);
    assert_eq!(client(&mut s, b".\r\nNOOP\r\n").0, ".\r\nNOOP\r\n");
}

#[test]
fn reject_aborts_the_upstream_and_answers_at_the_strict_end() {
    for v in VARIANTS {
        let input = smuggle(v);
        let mut s = in_data(GuardMode::Reject);
        let (up, cl, n) = client(&mut s, &input);
        if v == b"\r\n.\r\n" {
            assert!(n < input.len(), "the second DATA waits for its reply");
            assert!(!s.take_abort_upstream());
            assert!(!s.is_closed());
            assert_eq!(cl, "");
            continue;
        }
        assert_eq!(n, input.len());
        assert!(s.take_abort_upstream(), "{v:?}");
        assert!(!s.take_abort_upstream(), "taken once");
        assert!(
            !up.contains("forged"),
            "{v:?}: nothing after the bare ending: {up:?}"
        );
        // The first bare ending decides the text.
        let bare = match v {
            b"\r.\r" | b"\r\n.\r" | b"\r.\r\n" => "CR",
            _ => "LF",
        };
        assert_eq!(
            cl,
            format!("550 5.5.2 Error: bare <{bare}> received\r\n"),
            "{v:?}"
        );
        assert!(s.is_closed());
        assert!(!s.wants_client_input());
        assert_eq!(s.guard_action(), Some(GuardAction::Rejected));
    }
    // Split: the reply comes only at the client's strict end.
    let mut s = in_data(GuardMode::Reject);
    let (_, cl, _) = client(&mut s, b"a\n.\nMAIL FROM:<x>\r\n");
    assert_eq!(cl, "");
    assert!(s.take_abort_upstream());
    assert!(!s.is_closed());
    let (up, cl, _) = client(&mut s, b"x\r\n.\r\n");
    assert_eq!(up, "");
    assert!(cl.starts_with("550 5.5.2"));
}

#[test]
fn end_of_data_is_found_at_every_split_point() {
    // Traps for the CR-skipping fast path: CR CR LF, bare LF dot, a dot after CR only.
    let body: &[u8] = b"a\r\r\n.x\r\n\n.\n\r.\r\n\r\r\n..\r\nz\r\n.\r\n";
    let end = body.len();
    for split in 0..=end {
        let mut s = off();
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
    let mut next = crate::smtp::xorshift(0x2545_f491_4f6c_dd1d);
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

/// Random content from the bytes that matter, ending at its one terminator.
fn random_contents(count: usize) -> Vec<Vec<u8>> {
    let alphabet = b"\r\n.x";
    let mut next = crate::smtp::xorshift(0x5eed_1234_abcd_ef01);
    (0..count)
        .map(|_| {
            let len = (next() % 24) as usize;
            let mut v: Vec<u8> = (0..len).map(|_| alphabet[(next() % 4) as usize]).collect();
            v.extend_from_slice(b"\r\n.\r\n");
            v
        })
        // Only contents whose first strict end of data is their last.
        .filter(|v| scan_data(v, 2).0 == v.len())
        .collect()
}

#[test]
fn normalize_output_is_canonical_and_the_same_however_reads_are_cut() {
    for input in random_contents(2000) {
        let whole = {
            let mut s = in_data(GuardMode::Normalize);
            client(&mut s, &input)
        };
        assert!(canonical(whole.0.as_bytes()), "{input:?} -> {:?}", whole.0);
        // The client's own CRLF.CRLF is where both end: the same count of bytes used.
        let (end, _) = scan_data(&input, 2);
        assert_eq!(whole.2, end, "{input:?}");
        for cut in 1..input.len() {
            let mut s = in_data(GuardMode::Normalize);
            let (a, _, n1) = client(&mut s, &input[..cut]);
            let rest = if n1 == cut {
                &input[cut..]
            } else {
                &input[n1..]
            };
            let (b, _, _) = client(&mut s, rest);
            assert_eq!(format!("{a}{b}"), whole.0, "{input:?} cut at {cut}");
        }
    }
}

#[test]
fn the_guard_action_reads_as_the_log_field_and_the_metric_label() {
    assert_eq!(GuardAction::Normalized(3).to_string(), "normalized:3");
    assert_eq!(GuardAction::Rejected.to_string(), "rejected");
    assert_eq!(GuardAction::Normalized(3).action().as_str(), "normalized");
    assert_eq!(GuardAction::Rejected.action().as_str(), "rejected");
}

#[test]
fn the_long_line_bound_is_1024_bytes_before_the_lf() {
    // 1,024 blanks are still a tracked line: the DATA after them is read whole.
    let mut s = SmtpStream::default();
    let (up, _, _) = client(&mut s, &[b' '; MAX_TRACKED_LINE]);
    assert_eq!(up, "", "held, not forwarded");
    let (up, cl, _) = client(&mut s, b"DATA\r\n");
    assert_eq!(up.len(), MAX_TRACKED_LINE + 6);
    assert_eq!(cl, "");
    assert!(!s.wants_client_input(), "waits for the DATA reply");
    // One more and the line is over-long: no whole verb in its head, refused.
    let mut s = SmtpStream::default();
    client(&mut s, &[b' '; MAX_TRACKED_LINE + 1]);
    let (up, cl, _) = client(&mut s, b"DATA\r\n");
    assert_eq!(
        (up.as_str(), cl.as_str()),
        ("", "500 5.5.2 Error: line too long\r\n")
    );
}

#[test]
fn a_long_auth_line_is_refused_in_plaintext_and_relayed_inside_tls() {
    let mut long = b"AUTH PLAIN ".to_vec();
    long.extend_from_slice(&[b'A'; 2000]);
    let mut s = SmtpStream::new(Path::Plaintext, GuardMode::Normalize);
    let (up, _, _) = client(&mut s, &long);
    assert_eq!(up, "");
    let (_, cl, _) = client(&mut s, b"\r\n");
    assert!(cl.starts_with("538 5.7.11"), "{cl}");
    let mut s = SmtpStream::default();
    let (up, _, _) = client(&mut s, &long);
    assert_eq!(up.len(), long.len(), "forwarded as it streams");
    let (up, cl, _) = client(&mut s, b"\r\n");
    assert_eq!((up.as_str(), cl.as_str()), ("\r\n", ""));
}

#[test]
fn reject_reports_nothing_for_clean_content() {
    let mut s = in_data(GuardMode::Reject);
    client(&mut s, b"clean\r\n.\r\n");
    assert_eq!(s.guard_action(), None);
    assert!(!s.take_abort_upstream());
}

#[test]
fn mail_shaped_content_ends_whatever_the_reads() {
    let mut line = b"x".repeat(78);
    line.extend_from_slice(b"\r\n");
    let mut content = line.repeat(819 * 3);
    content.extend_from_slice(b".\r\n");
    for read in [1usize, 2, 3, 7, 79, 80, 81, 4096, 16384, 65520, 65536] {
        let mut s = in_data(GuardMode::Normalize);
        let mut out = String::new();
        for piece in content.chunks(read) {
            let (up, _, n) = client(&mut s, piece);
            assert_eq!(n, piece.len());
            out.push_str(&up);
        }
        assert_eq!(out.as_bytes(), &content[..], "reads of {read}");
        assert_eq!(s.expects.len(), 1, "ended, reads of {read}");
    }
}

#[test]
fn every_refusal_is_counted_under_its_own_kind() {
    let mut s = SmtpStream::new(Path::Plaintext, GuardMode::Normalize);
    client(
        &mut s,
        b"STARTTLS\r\nAUTH PLAIN x\r\nXCLIENT A=1\r\nNOOP\x00\r\nBDAT +1\r\n",
    );
    // Lines over the bound before their LF arrives: refused as too long (two, so that no
    // two kinds have the same count).
    let mut long = b"XFORWARD".to_vec();
    long.extend_from_slice(&[b' '; 2000]);
    for _ in 0..2 {
        client(&mut s, &long);
        client(&mut s, b"\r\n");
    }
    let refused: Vec<_> = s.refusals().map(|(k, n)| (k.as_str(), n)).collect();
    assert_eq!(
        refused,
        [
            ("starttls", 1),
            ("auth", 1),
            ("xclient_xforward", 1),
            ("bad_character", 1),
            ("bdat_syntax", 1),
            ("line_too_long", 2)
        ]
    );
}
