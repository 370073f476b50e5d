//! The record layer against rustls itself (the differential test: a rustls client and our
//! layer exchange a corpus at every split point, both directions, with and without key
//! updates), one negative test per rejection, and the `OwnTls` façade over a real pipe.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::{ClientConfig, ClientConnection, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::layer::{Fatal, MAX_PLAINTEXT, Opened, RecordLayer, alert, peer};
use super::stream::OwnTls;
use crate::tls::handshake::{Established, Handshake, Step};

fn configs(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["mail.example.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().clone();
    let provider = crate::tls::provider();
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    server.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// Moves what the client wants to send into `to`.
fn client_out(client: &mut ClientConnection, to: &mut Vec<u8>) {
    while client.wants_write() {
        client.write_tls(to).unwrap();
    }
}

/// Gives the client `bytes` in reads cut as `cut` says, and returns the plaintext.
fn client_in(client: &mut ClientConnection, bytes: &[u8], cut: usize) -> Vec<u8> {
    let mut plain = Vec::new();
    for chunk in bytes.chunks(cut.max(1)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            client.read_tls(&mut rest).unwrap();
            client.process_new_packets().unwrap();
            let _ = client.reader().read_to_end(&mut plain);
        }
    }
    plain
}

/// A whole TLS 1.3 handshake in memory: a rustls client and our sans-IO driver.
fn established() -> (ClientConnection, RecordLayer) {
    let (client, est) = handshake_with(|_| {}, client_out);
    (client, est.layer)
}

/// A TLS 1.3 handshake in memory with hooks: `after_flight` runs once the client has taken
/// a flight of ours, `client_sends` writes what the client sends when our driver reads.
fn handshake_with(
    mut after_flight: impl FnMut(&mut ClientConnection),
    mut client_sends: impl FnMut(&mut ClientConnection, &mut Vec<u8>),
) -> (ClientConnection, Established) {
    let (server, client) = configs(&[&rustls::version::TLS13]);
    let mut client =
        ClientConnection::new(client, "mail.example.test".try_into().unwrap()).unwrap();
    let mut hs = Handshake::new(server, Vec::new()).unwrap();
    for _ in 0..20 {
        match hs.step().unwrap() {
            Step::Send => {
                let out = std::mem::take(hs.outgoing());
                client_in(&mut client, &out, out.len());
                after_flight(&mut client);
            }
            Step::Read => client_sends(&mut client, hs.incoming()),
            Step::Done => return (client, hs.finish().unwrap()),
            Step::Tls12 => panic!("TLS 1.2 negotiated"),
        }
    }
    panic!("handshake did not finish");
}

/// Feeds `bytes` to the layer as the façade does (tail room first), cut at `cut`, with
/// `room` bytes of reader's buffer to decrypt into.
fn server_in_room(
    layer: &mut RecordLayer,
    bytes: &[u8],
    cut: usize,
    room: usize,
) -> Result<(Vec<u8>, bool), Fatal> {
    let mut plain = Vec::new();
    let mut closed = false;
    for chunk in bytes.chunks(cut.max(1)) {
        let kept = layer.tail_len();
        let mut buf = vec![0u8; kept + chunk.len()];
        buf[kept..].copy_from_slice(chunk);
        let mut out = vec![0u8; room];
        let Opened {
            direct,
            plain: n,
            closed: c,
        } = layer.open(&mut buf, &mut out)?;
        plain.extend_from_slice(&out[..direct]);
        plain.extend_from_slice(&buf[..n]);
        closed |= c;
    }
    Ok((plain, closed))
}

fn server_in(layer: &mut RecordLayer, bytes: &[u8], cut: usize) -> Result<(Vec<u8>, bool), Fatal> {
    server_in_room(layer, bytes, cut, 0)
}

/// Reader's buffers: none (all in place), under one record, one record, many.
const ROOMS: [usize; 4] = [0, 20, 16_400, 1 << 20];

/// Messages of the sizes a mail session produces, and the record-size edges.
fn corpus() -> Vec<Vec<u8>> {
    [
        1,
        6,
        78,
        1000,
        MAX_PLAINTEXT - 1,
        MAX_PLAINTEXT,
        MAX_PLAINTEXT + 1,
        40_000,
    ]
    .iter()
    .enumerate()
    .map(|(i, &n)| (0..n).map(|j| (i * 7 + j) as u8).collect())
    .collect()
}

const CUTS: [usize; 10] = [1, 2, 3, 5, 7, 13, 64, 16_389, 16_390, 100_000];

#[test]
fn client_to_server_every_cut_with_and_without_key_update() {
    for (key_update, room) in [
        (false, ROOMS[0]),
        (true, ROOMS[0]),
        (true, ROOMS[1]),
        (false, ROOMS[2]),
        (true, ROOMS[2]),
        (false, ROOMS[3]),
        (true, ROOMS[3]),
    ] {
        for cut in CUTS {
            let (mut client, mut layer) = established();
            let mut wire = Vec::new();
            let mut sent = Vec::new();
            for (i, m) in corpus().iter().enumerate() {
                if key_update && i % 3 == 1 {
                    client.refresh_traffic_keys().unwrap();
                }
                client.writer().write_all(m).unwrap();
                sent.extend_from_slice(m);
                client_out(&mut client, &mut wire);
            }
            let (got, closed) = server_in_room(&mut layer, &wire, cut, room).unwrap();
            assert_eq!(
                got.len(),
                sent.len(),
                "cut {cut} key_update {key_update} room {room}"
            );
            assert!(got == sent, "cut {cut}: content differs");
            assert!(!closed);
            assert_eq!(layer.tail_len(), 0);
            // A requested KeyUpdate is answered; the client reads us under the new key.
            assert_eq!(layer.owes_record(), key_update);
            let mut out = Vec::new();
            layer.seal(b"250 ok\r\n", &mut out).unwrap();
            // The answer (a KeyUpdate record of our own) goes before the data.
            assert_eq!(records(&out).len(), 1 + usize::from(key_update));
            assert!(!layer.owes_record());
            assert_eq!(client_in(&mut client, &out, cut), b"250 ok\r\n");
        }
    }
}

#[test]
fn client_to_server_split_once_at_every_point() {
    let (mut client, _) = established();
    let mut wire = Vec::new();
    client.writer().write_all(b"EHLO a\r\n").unwrap();
    client.refresh_traffic_keys().unwrap();
    client.writer().write_all(b"MAIL FROM:<>\r\n").unwrap();
    client_out(&mut client, &mut wire);
    drop(client);
    for at in 0..=wire.len() {
        // Same keys each time: a fresh handshake per split point.
        let (mut client, mut layer) = established();
        let mut wire = Vec::new();
        client.writer().write_all(b"EHLO a\r\n").unwrap();
        client.refresh_traffic_keys().unwrap();
        client.writer().write_all(b"MAIL FROM:<>\r\n").unwrap();
        client_out(&mut client, &mut wire);
        let at = at.min(wire.len());
        let (mut got, _) = server_in(&mut layer, &wire[..at], usize::MAX).unwrap();
        let (rest, _) = server_in(&mut layer, &wire[at..], usize::MAX).unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(got, b"EHLO a\r\nMAIL FROM:<>\r\n", "split at {at}");
    }
}

/// The lengths of the whole records in `wire`, from their headers.
fn records(wire: &[u8]) -> Vec<usize> {
    let mut lengths = Vec::new();
    let mut rest = wire;
    while rest.len() >= 5 {
        let len = 5 + usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        lengths.push(len);
        rest = &rest[len.min(rest.len())..];
    }
    assert!(rest.is_empty(), "a partial record at the end");
    lengths
}

#[test]
fn server_to_client_every_cut_and_our_own_key_updates() {
    let data_records: usize = corpus()
        .iter()
        .map(|m| m.len().div_ceil(MAX_PLAINTEXT))
        .sum();
    for cut in CUTS {
        let (mut client, mut layer) = established();
        // Update our send key every two records, as the confidentiality limit would.
        layer.set_tx_limit(2);
        let mut out = Vec::new();
        let mut sent = Vec::new();
        for m in corpus() {
            layer.seal(&m, &mut out).unwrap();
            sent.extend_from_slice(&m);
        }
        // A KeyUpdate after every second data record: no more, no fewer.
        assert_eq!(
            records(&out).len(),
            data_records + (data_records - 1) / 2,
            "cut {cut}"
        );
        let got = client_in(&mut client, &out, cut);
        assert!(
            got == sent,
            "cut {cut}: {} of {} bytes",
            got.len(),
            sent.len()
        );
    }
}

#[test]
fn close_notify_ends_the_read_side_and_bytes_after_it_are_ignored() {
    let (mut client, mut layer) = established();
    let mut wire = Vec::new();
    client.writer().write_all(b"QUIT\r\n").unwrap();
    client.send_close_notify();
    client_out(&mut client, &mut wire);
    wire.extend_from_slice(b"junk after close_notify");
    let (got, closed) = server_in(&mut layer, &wire, usize::MAX).unwrap();
    assert_eq!(got, b"QUIT\r\n");
    assert!(closed);
    assert_eq!(layer.tail_len(), 0);
}

/// Refused with `room` bytes of reader's buffer; returns both buffers' bytes.
fn refused_room(wire: &[u8], layer: &mut RecordLayer, room: usize) -> (Vec<u8>, Fatal) {
    let kept = layer.tail_len();
    let mut buf = vec![0u8; kept + wire.len()];
    buf[kept..].copy_from_slice(wire);
    let mut out = vec![0u8; room];
    let err = layer.open(&mut buf, &mut out).expect_err("refused");
    buf.extend_from_slice(&out);
    (buf, err)
}

fn refused(wire: &[u8], layer: &mut RecordLayer) -> (Vec<u8>, Fatal) {
    refused_room(wire, layer, 0)
}

fn alert_of(f: Fatal) -> u8 {
    match f {
        Fatal::Send { alert, .. } => alert,
        Fatal::Received(a) => panic!("received {a}"),
    }
}

#[test]
fn a_tampered_record_is_refused_with_bad_record_mac_and_releases_nothing() {
    let (mut client, mut layer) = established();
    let mut wire = Vec::new();
    client.writer().write_all(b"AUTH PLAIN secret\r\n").unwrap();
    client_out(&mut client, &mut wire);
    let last = wire.len() - 1;
    wire[last] ^= 1;
    let (buf, err) = refused(&wire, &mut layer);
    assert_eq!(alert_of(err), alert::BAD_RECORD_MAC);
    assert!(
        !buf.windows(6).any(|w| w == b"secret"),
        "plaintext left in the buffer"
    );
}

#[test]
fn each_malformed_record_gets_its_alert() {
    type Make = Box<dyn Fn(&mut RecordLayer, &mut Vec<u8>)>;
    let cases: Vec<(&str, Make, u8)> = vec![
        (
            "plaintext handshake record",
            Box::new(|_, w| w.extend_from_slice(&[22, 3, 3, 0, 1, 0])),
            alert::UNEXPECTED_MESSAGE,
        ),
        (
            "bad record version",
            Box::new(|_, w| w.extend_from_slice(&[23, 2, 0, 0, 17])),
            alert::DECODE_ERROR,
        ),
        (
            "length over 2^14 + 256",
            Box::new(|_, w| w.extend_from_slice(&[23, 3, 3, 0x41, 0x01])),
            alert::RECORD_OVERFLOW,
        ),
        (
            "no content type",
            Box::new(|c, w| c.seal_inner(&[0, 0, 0], w)),
            alert::UNEXPECTED_MESSAGE,
        ),
        (
            "empty inner plaintext",
            Box::new(|c, w| c.seal_inner(&[], w)),
            alert::UNEXPECTED_MESSAGE,
        ),
        (
            "unknown content type",
            Box::new(|c, w| c.seal_inner(b"x\x63", w)),
            alert::UNEXPECTED_MESSAGE,
        ),
        (
            "plaintext over 2^14",
            Box::new(|c, w| {
                let mut inner = vec![b'a'; MAX_PLAINTEXT + 1];
                inner.push(23);
                c.seal_inner(&inner, w);
            }),
            alert::RECORD_OVERFLOW,
        ),
        (
            "empty handshake record",
            Box::new(|c, w| c.seal_inner(&[22], w)),
            alert::UNEXPECTED_MESSAGE,
        ),
        (
            "handshake message other than KeyUpdate",
            Box::new(|c, w| c.seal_inner(&[4, 0, 0, 1, 0, 22], w)),
            alert::UNEXPECTED_MESSAGE,
        ),
        (
            "KeyUpdate not at the end of its record",
            Box::new(|c, w| c.seal_inner(&[24, 0, 0, 1, 0, 24, 22], w)),
            alert::UNEXPECTED_MESSAGE,
        ),
        (
            "KeyUpdate of the wrong length",
            Box::new(|c, w| c.seal_inner(&[24, 0, 0, 2, 22], w)),
            alert::DECODE_ERROR,
        ),
        (
            "KeyUpdate request_update 2",
            Box::new(|c, w| c.seal_inner(&[24, 0, 0, 1, 2, 22], w)),
            alert::ILLEGAL_PARAMETER,
        ),
        (
            "application data inside a split KeyUpdate",
            Box::new(|c, w| {
                c.seal_inner(&[24, 0, 22], w);
                c.seal_inner(b"data\x17", w);
            }),
            alert::UNEXPECTED_MESSAGE,
        ),
        (
            "alert inside a split KeyUpdate",
            Box::new(|c, w| {
                c.seal_inner(&[24, 0, 22], w);
                c.seal_inner(&[1, 0, 21], w);
            }),
            alert::UNEXPECTED_MESSAGE,
        ),
        (
            "alert of the wrong length",
            Box::new(|c, w| c.seal_inner(&[2, 40, 0, 21], w)),
            alert::DECODE_ERROR,
        ),
    ];
    for (name, make, want) in cases {
        for room in ROOMS {
            let (mut client, mut server) = peer::pair(u64::MAX);
            let mut wire = Vec::new();
            make(&mut client, &mut wire);
            let (_, err) = refused_room(&wire, &mut server, room);
            assert_eq!(alert_of(err), want, "{name} room {room}: {err}");
        }
    }
}

#[test]
fn a_split_key_update_and_padding_and_empty_records_are_accepted() {
    let (mut client, mut server) = peer::pair(u64::MAX);
    let mut wire = Vec::new();
    client.seal_inner(b"EHLO\x17\0\0\0\0", &mut wire);
    client.seal_inner(&[23], &mut wire);
    client.seal_inner(&[24, 0, 22], &mut wire);
    client.seal_inner(&[0, 1, 1, 22, 0, 0], &mut wire);
    // The next record is under the client's next key, as after its KeyUpdate.
    let mut next = Vec::new();
    client.seal_key_update(false, &mut next);
    client.seal(b" a\r\n", &mut wire).unwrap();
    let (got, _) = server_in(&mut server, &wire, usize::MAX).unwrap();
    assert_eq!(got, b"EHLO a\r\n");
    assert!(server.owes_record());
}

#[test]
fn fatal_alert_from_the_peer_ends_the_session_user_canceled_does_not() {
    let (mut client, mut server) = peer::pair(u64::MAX);
    let mut wire = Vec::new();
    client.seal_alert(alert::USER_CANCELED, &mut wire).unwrap();
    client.seal(b"x", &mut wire).unwrap();
    assert_eq!(server_in(&mut server, &wire, usize::MAX).unwrap().0, b"x");
    let mut wire = Vec::new();
    client.seal_alert(40, &mut wire).unwrap();
    let (_, err) = refused(&wire, &mut server);
    assert_eq!(err, Fatal::Received(40));
}

#[test]
fn tls12_is_left_to_rustls_before_anything_is_sent() {
    let (server, _) = configs(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let (_, client) = configs(&[&rustls::version::TLS12]);
    let mut client =
        ClientConnection::new(client, "mail.example.test".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    client_out(&mut client, &mut hello);
    let mut hs = Handshake::new(server, hello).unwrap();
    assert_eq!(hs.step().unwrap(), Step::Tls12);
}

/// The façade over a real pipe: the client side is rustls, moved by hand.
async fn facade(
    capacity: usize,
) -> (
    ClientConnection,
    OwnTls<tokio::io::DuplexStream>,
    tokio::io::DuplexStream,
) {
    let (client, layer) = established();
    let (ours, theirs) = tokio::io::duplex(capacity);
    (client, OwnTls::new(ours, layer, Vec::new()), theirs)
}

#[tokio::test]
async fn facade_tampered_record_is_an_error_and_the_client_gets_bad_record_mac() {
    let (mut client, mut tls, mut pipe) = facade(1 << 20).await;
    let mut wire = Vec::new();
    client.writer().write_all(b"RCPT TO:<a@b>\r\n").unwrap();
    client_out(&mut client, &mut wire);
    wire[10] ^= 0x80;
    pipe.write_all(&wire).await.unwrap();
    let mut buf = [0u8; 64];
    let err = tls.read(&mut buf).await.expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(
        tls.read(&mut buf).await.unwrap_err().kind(),
        std::io::ErrorKind::InvalidData
    );
    let mut back = vec![0u8; 256];
    let n = pipe.read(&mut back).await.unwrap();
    let mut rest = &back[..n];
    client.read_tls(&mut rest).unwrap();
    let e = client.process_new_packets().expect_err("alert");
    assert_eq!(
        e,
        rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
    );
}

#[tokio::test]
async fn facade_end_without_close_notify_is_a_truncation() {
    let (mut client, mut tls, mut pipe) = facade(1 << 20).await;
    let mut wire = Vec::new();
    client.writer().write_all(b"DATA\r\n").unwrap();
    client_out(&mut client, &mut wire);
    pipe.write_all(&wire[..wire.len() - 3]).await.unwrap();
    drop(pipe);
    let mut buf = [0u8; 64];
    let err = tls.read(&mut buf).await.expect_err("truncated");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn facade_close_notify_both_ways() {
    let (mut client, mut tls, mut pipe) = facade(1 << 20).await;
    let mut wire = Vec::new();
    client.writer().write_all(b"QUIT\r\n").unwrap();
    client.send_close_notify();
    client_out(&mut client, &mut wire);
    pipe.write_all(&wire).await.unwrap();
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"QUIT\r\n");
    tls.write_all(b"221 bye\r\n").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut back = Vec::new();
    pipe.read_to_end(&mut back).await.unwrap();
    let mut rest = &back[..];
    while !rest.is_empty() {
        client.read_tls(&mut rest).unwrap();
        client.process_new_packets().unwrap();
    }
    let mut plain = Vec::new();
    // Ok(0), not an error: rustls saw our close_notify.
    assert_eq!(client.reader().read_to_end(&mut plain).unwrap(), 9);
    assert_eq!(plain, b"221 bye\r\n");
}

#[tokio::test]
async fn facade_small_reads_and_a_slow_reader_lose_nothing() {
    // A 97-byte pipe: every write of ours is partial and waits in `out`.
    let (mut client, tls, pipe) = facade(97).await;
    let (mut pipe_rd, mut pipe_wr) = tokio::io::split(pipe);
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let big = big.clone();
        tokio::spawn(async move {
            let mut tls = tls;
            tls.write_all(&big).await.unwrap();
            tls.flush().await.unwrap();
            tls
        })
    };
    let mut plain = Vec::new();
    let mut buf = [0u8; 4096];
    while plain.len() < big.len() {
        let n = pipe_rd.read(&mut buf).await.unwrap();
        assert!(n > 0, "the pipe closed early");
        plain.extend(client_in(&mut client, &buf[..n], n));
    }
    assert!(plain == big, "content differs");
    let mut tls = writer.await.unwrap();
    // Reads with a one-byte buffer get every byte (the plaintext kept in `plain`).
    let mut wire = Vec::new();
    client
        .writer()
        .write_all(b"EHLO small.example\r\n")
        .unwrap();
    client_out(&mut client, &mut wire);
    pipe_wr.write_all(&wire).await.unwrap();
    let mut got = Vec::new();
    let mut one = [0u8; 1];
    while got.len() < 20 {
        assert_eq!(tls.read(&mut one).await.unwrap(), 1);
        got.push(one[0]);
    }
    assert_eq!(got, b"EHLO small.example\r\n");
}

#[test]
fn evicted_keys_are_rebuilt_for_the_next_record_both_ways() {
    let (mut client, mut layer) = established();
    for round in 0..3 {
        layer.evict_keys();
        let mut wire = Vec::new();
        client.writer().write_all(b"NOOP\r\n").unwrap();
        client_out(&mut client, &mut wire);
        assert_eq!(
            server_in(&mut layer, &wire, usize::MAX).unwrap().0,
            b"NOOP\r\n",
            "round {round}"
        );
        layer.evict_keys();
        let mut out = Vec::new();
        layer.seal(b"250 ok\r\n", &mut out).unwrap();
        assert_eq!(client_in(&mut client, &out, out.len()), b"250 ok\r\n");
    }
}

#[tokio::test]
async fn close_notify_with_the_clients_finished_is_a_session_closed_at_once() {
    // A sender that rejects our certificate after the handshake (Postfix with an untrusted
    // CA) sends its Finished and close_notify in one segment.
    let (_, established) = handshake_with(
        |client| {
            if !client.is_handshaking() {
                client.send_close_notify();
            }
        },
        client_out,
    );
    let (ours, _theirs) = tokio::io::duplex(1024);
    let mut tls = OwnTls::new(ours, established.layer, established.early);
    let mut buf = [0u8; 16];
    assert_eq!(
        tls.read(&mut buf).await.unwrap(),
        0,
        "a clean end of stream"
    );
}

#[test]
fn a_record_of_exactly_the_largest_size_is_accepted() {
    // 2^14 bytes of content, its type and 239 bytes of padding: TLSCiphertext.length is
    // exactly 2^14 + 256, the largest RFC 8446 allows.
    let (mut client, mut server) = peer::pair(u64::MAX);
    let mut inner = vec![b'a'; MAX_PLAINTEXT];
    inner.push(23);
    inner.extend(std::iter::repeat_n(0, 239));
    let mut wire = Vec::new();
    client.seal_inner(&inner, &mut wire);
    assert_eq!(wire.len(), super::layer::MAX_RECORD);
    let (got, _) = server_in(&mut server, &wire, usize::MAX).unwrap();
    assert_eq!(got.len(), MAX_PLAINTEXT);
}

#[test]
fn a_partial_record_read_with_the_clients_finished_is_kept() {
    // The client's Finished and the first part of its first record in one read: the rest
    // of that record arrives after the hand-over and must complete it.
    let mut rest = Vec::new();
    let (_, established) = handshake_with(
        |_| {},
        |client, incoming| {
            let mut wire = Vec::new();
            if !client.is_handshaking() && rest.is_empty() {
                client
                    .writer()
                    .write_all(b"EHLO partial.example\r\n")
                    .unwrap();
                client_out(client, &mut wire);
                // Keep the last 7 bytes of the application record for later.
                rest = wire.split_off(wire.len() - 7);
            } else {
                client_out(client, &mut wire);
            }
            incoming.extend_from_slice(&wire);
        },
    );
    assert!(!rest.is_empty(), "the test split a record");
    let mut layer = established.layer;
    assert!(layer.tail_len() > 0, "the partial record was kept");
    let (got, _) = server_in(&mut layer, &rest, usize::MAX).unwrap();
    let mut all = established.early;
    all.extend_from_slice(&got);
    assert_eq!(all, b"EHLO partial.example\r\n");
}

#[test]
fn records_go_straight_into_a_reader_buffer_that_holds_them_else_in_place() {
    let (mut client, mut server) = peer::pair(u64::MAX);
    let mut wire = Vec::new();
    for m in [
        &b"EHLO a\r\n"[..],
        b"MAIL FROM:<a@b>\r\n",
        b"RCPT TO:<c@d>\r\n",
    ] {
        client.seal(m, &mut wire).unwrap();
    }
    let mut buf = wire.clone();
    let mut out = vec![0u8; 1 << 16];
    let opened = server.open(&mut buf, &mut out).unwrap();
    assert_eq!(
        (opened.direct, opened.plain),
        (40, 0),
        "all three straight into the reader's buffer"
    );
    assert_eq!(
        &out[..40],
        b"EHLO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
    );
    // A reader's buffer with room for the first record only: it goes there, the rest in
    // place after it, in order.
    let (mut client, mut server) = peer::pair(u64::MAX);
    let mut wire = Vec::new();
    for m in [&b"EHLO a\r\n"[..], b"MAIL FROM:<a@b>\r\n"] {
        client.seal(m, &mut wire).unwrap();
    }
    let mut out = vec![0u8; 10];
    let opened = server.open(&mut wire, &mut out).unwrap();
    assert_eq!((opened.direct, opened.plain), (8, 17));
    assert_eq!(&out[..8], b"EHLO a\r\n");
    assert_eq!(&wire[..17], b"MAIL FROM:<a@b>\r\n");
}

#[test]
fn a_key_update_without_a_request_switches_keys_and_owes_nothing() {
    let (mut client, mut server) = peer::pair(u64::MAX);
    let mut wire = Vec::new();
    client.seal_key_update(false, &mut wire);
    client.seal(b"after\r\n", &mut wire).unwrap();
    let (got, _) = server_in(&mut server, &wire, usize::MAX).unwrap();
    assert_eq!(got, b"after\r\n");
    assert!(!server.owes_record());
}

#[test]
fn a_misplaced_key_update_and_another_handshake_message_are_told_apart() {
    for (inner, why) in [
        (&[24u8, 0, 0, 1, 0, 24, 22][..], "KeyUpdate not aligned"),
        (&[4, 0, 0, 2, 0, 0, 22][..], "other than KeyUpdate"),
    ] {
        let (mut client, mut server) = peer::pair(u64::MAX);
        let mut wire = Vec::new();
        client.seal_inner(inner, &mut wire);
        let (_, err) = refused(&wire, &mut server);
        assert_eq!(alert_of(err), alert::UNEXPECTED_MESSAGE);
        assert!(err.to_string().contains(why), "{err}");
    }
}

#[test]
fn alerts_carry_their_level_close_notify_warning_and_the_rest_fatal() {
    let (mut client, mut server) = peer::pair(u64::MAX);
    for (description, level) in [
        (alert::CLOSE_NOTIFY, 1),
        (alert::BAD_RECORD_MAC, 2),
        (alert::UNEXPECTED_MESSAGE, 2),
    ] {
        let mut out = Vec::new();
        server.seal_alert(description, &mut out).unwrap();
        assert_eq!(client.open_inner(&out), [level, description, 21]);
    }
}

#[test]
fn seal_reserves_once_what_it_writes() {
    // One allocation per write, however many records: the reservation is exact.
    for len in [
        1,
        100,
        MAX_PLAINTEXT - 1,
        MAX_PLAINTEXT,
        MAX_PLAINTEXT + 1,
        70_000,
    ] {
        let (mut client, mut server) = peer::pair(u64::MAX);
        let mut out = Vec::new();
        server.seal(&vec![b'm'; len], &mut out).unwrap();
        assert_eq!(out.capacity(), out.len(), "{len} bytes");
        let lengths = records(&out);
        assert_eq!(lengths.len(), len.div_ceil(MAX_PLAINTEXT));
        let mut at = 0;
        for l in lengths {
            let inner = client.open_inner(&out[at..at + l]);
            assert_eq!(inner.last(), Some(&23));
            at += l;
        }
    }
}

#[test]
fn debug_shows_counters_and_evicted_contexts_never_keys() {
    let (_, mut server) = peer::pair(u64::MAX);
    let mut out = Vec::new();
    server.seal(b"220 mx\r\n", &mut out).unwrap();
    assert_eq!(
        format!("{server:?}"),
        "RecordLayer { rx_seq: 0, tx_seq: 1, tail: 0, read_closed: false, contexts: (true, true), .. }"
    );
    server.evict_keys();
    assert!(format!("{server:?}").contains("contexts: (false, false)"));
    // Rebuilt for the next record.
    server.seal(b"250 ok\r\n", &mut out).unwrap();
    assert!(
        format!("{server:?}")
            .contains("tx_seq: 2, tail: 0, read_closed: false, contexts: (false, true)")
    );
}

/// The client seals `plain` as one record and writes it into the pipe.
async fn client_sends(
    client: &mut ClientConnection,
    pipe: &mut tokio::io::DuplexStream,
    plain: &[u8],
) {
    let mut wire = Vec::new();
    client.writer().write_all(plain).unwrap();
    client_out(client, &mut wire);
    pipe.write_all(&wire).await.unwrap();
}

/// Polls `tls` once into a buffer of `len` bytes (a waker nobody wakes): what it read, or
/// `None` when it is pending.
fn poll_once(tls: &mut OwnTls<tokio::io::DuplexStream>, len: usize) -> Option<Vec<u8>> {
    use tokio::io::AsyncRead;
    let mut buf = vec![0u8; len];
    let mut read = tokio::io::ReadBuf::new(&mut buf);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(tls).poll_read(&mut cx, &mut read) {
        std::task::Poll::Ready(r) => {
            r.unwrap();
            Some(read.filled().to_vec())
        }
        std::task::Poll::Pending => None,
    }
}

#[tokio::test]
async fn a_read_returns_from_the_poll_that_opened_its_record_fitting_or_not() {
    let (mut client, mut tls, mut pipe) = facade(1 << 16).await;
    // The record does not fit the 8-byte buffer: the first 8 bytes must come back from
    // this very poll (the rest kept), not after the peer's next record, which never comes.
    client_sends(&mut client, &mut pipe, b"MAIL FROM:<a@example.org>\r\n").await;
    assert_eq!(poll_once(&mut tls, 8).as_deref(), Some(&b"MAIL FRO"[..]));
    // The rest is kept and given out in pieces of any size, from where the last ended.
    assert_eq!(poll_once(&mut tls, 4).as_deref(), Some(&b"M:<a"[..]));
    assert_eq!(
        poll_once(&mut tls, 64).as_deref(),
        Some(&b"@example.org>\r\n"[..])
    );
    // An empty buffer is answered at once, with nothing to read and nothing taken.
    assert_eq!(poll_once(&mut tls, 0).as_deref(), Some(&b""[..]));
    // A record that fits goes straight into the buffer, and this very poll returns it.
    client_sends(&mut client, &mut pipe, b"RCPT TO:<b@example.org>\r\n").await;
    assert_eq!(
        poll_once(&mut tls, 64).as_deref(),
        Some(&b"RCPT TO:<b@example.org>\r\n"[..])
    );
    // Nothing to read now, just after traffic: pending, and the AEAD contexts stay
    // (they go only after EVICT_AFTER without traffic).
    assert_eq!(poll_once(&mut tls, 8), None);
    assert!(
        format!("{tls:?}").contains("contexts: (true, true)"),
        "{tls:?}"
    );
}
