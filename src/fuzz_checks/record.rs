//! FZ-8: the TLS 1.3 record layer (`record::layer`) against records of any shape. A peer
//! with fixed keys seals what the input describes — application data of any size,
//! arbitrary inner plaintext (no content type, unknown types, padding, oversize),
//! KeyUpdates with and without a request, alerts — then bytes are flipped or garbage
//! appended, and the wire reaches the layer in reads cut anywhere.
//!
//! Invariants:
//! - no panic, and the kept tail is always shorter than one record;
//! - what the layer releases is always a prefix of the application data the peer sealed
//!   (nothing unauthenticated, nothing out of order, nothing of a refused record);
//! - when every record is well-formed, all of it arrives, in order, with no error, up to a
//!   close_notify; and the replies sealed after each read — including the KeyUpdate
//!   answers we owe and the updates our own record limit forces — open at the peer.

use super::{Input, segments};
use crate::record::layer::{MAX_PLAINTEXT, MAX_RECORD, alert, peer};

const CT_APPLICATION_DATA: u8 = 23;
const REPLY: &[u8] = b"250 2.0.0 Ok\r\n";

pub fn check_record(data: &[u8]) {
    let mut input = Input(data);
    // A small limit makes the layer update its own send key every few replies.
    let limit = 1 + u64::from(input.byte() % 8) * 3;
    let (mut client, mut server) = peer::pair(limit);
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    let mut honest = true;
    let mut closed_at = None;
    let seed = input.byte();
    // The reader's own buffer: none (all in place), smaller than a record, or roomy.
    let room = [0, 100, 20_000, 70_000][usize::from(input.byte() % 4)];
    for _ in 0..32 {
        if input.0.is_empty() {
            break;
        }
        match input.byte() % 8 {
            0 | 1 => {
                let n = usize::from(input.u16()) % (MAX_PLAINTEXT + 64);
                let content: Vec<u8> = (0..n).map(|i| (expected.len() + i) as u8).collect();
                client.seal(&content, &mut wire).expect("sealable");
                if closed_at.is_none() {
                    expected.extend_from_slice(&content);
                }
            }
            2 => {
                // Any inner plaintext, except one that would be valid application data.
                let n = usize::from(input.u16()) % (MAX_PLAINTEXT + 300);
                let mut inner = input.take(n).to_vec();
                if let Some(last) = inner.iter_mut().rev().find(|b| **b != 0)
                    && *last == CT_APPLICATION_DATA
                {
                    *last = CT_APPLICATION_DATA + 1;
                }
                client.seal_inner(&inner, &mut wire);
                honest = false;
            }
            3 => {
                if !wire.is_empty() {
                    let at = usize::from(input.u16()) % wire.len();
                    wire[at] ^= input.byte() | 1;
                    honest = false;
                }
            }
            4 => client.seal_key_update(input.byte() & 1 == 1, &mut wire),
            5 => {
                let n = usize::from(input.byte());
                wire.extend_from_slice(input.take(n));
                honest = false;
            }
            6 => {
                client
                    .seal_alert(alert::CLOSE_NOTIFY, &mut wire)
                    .expect("sealable");
                closed_at.get_or_insert(expected.len());
            }
            _ => {
                let description = input.byte();
                client.seal_alert(description, &mut wire).expect("sealable");
                match description {
                    alert::CLOSE_NOTIFY => {
                        closed_at.get_or_insert(expected.len());
                    }
                    alert::USER_CANCELED => {}
                    _ => honest = false,
                }
            }
        }
    }

    let mut released = Vec::new();
    let mut replies = Vec::new();
    let mut sealed = 0usize;
    let mut failed = None;
    let mut closed = false;
    for chunk in segments(&wire, seed, 70_000) {
        let kept = server.tail_len();
        assert!(kept < MAX_RECORD, "tail of {kept} bytes");
        let mut buf = vec![0u8; kept + chunk.len()];
        buf[kept..].copy_from_slice(chunk);
        let mut out = vec![0u8; room];
        match server.open(&mut buf, &mut out) {
            Ok(opened) => {
                released.extend_from_slice(&out[..opened.direct]);
                released.extend_from_slice(&buf[..opened.plain]);
                server.seal(REPLY, &mut replies).expect("sealable");
                sealed += 1;
                if opened.closed {
                    closed = true;
                    break;
                }
            }
            Err(f) => {
                failed = Some(f);
                break;
            }
        }
    }
    assert!(
        expected.starts_with(&released),
        "released {} bytes that were not sealed as application data in this order",
        released.len()
    );
    if honest {
        assert_eq!(failed, None, "well-formed records refused");
        let end = closed_at.unwrap_or(expected.len());
        assert_eq!(released.len(), end, "well-formed data lost");
        assert_eq!(closed, closed_at.is_some());
    }
    // The peer opens every reply, across the key updates we made.
    let mut buf = replies;
    let opened = client
        .open(&mut buf, &mut [])
        .expect("our replies open at the peer");
    assert_eq!(opened.plain, sealed * REPLY.len());
    assert!(buf[..opened.plain].chunks(REPLY.len()).all(|r| r == REPLY));
    assert_eq!(client.tail_len(), 0);
}
