//! FZ-3: the inbound PROXY decoder (`proxy_header::inbound`); FZ-4, the encoder, is in
//! `proxy_outbound`.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

use super::{Input, segments};
use crate::proxy_header::inbound::{self, InboundError, MAX_INBOUND_HEADER, Parsed};

pub(super) use crate::proxy_header::V2_SIGNATURE;
/// v1: "a 107-byte buffer is enough for the longest line" (the PROXY specification §2.1).
pub(super) const V1_MAX: usize = 107;

/// Input: a split seed, then bytes as a load balancer would send them. `parse` never
/// panics; a header it accepts lies within the input, has its declared length (v2) or ends
/// at its first CRLF (v1), is decided the same without the bytes after it, and every
/// shorter prefix is "incomplete" (a header split over reads is waited for, not refused).
/// `inbound::read` over the input in arbitrary reads agrees with `parse` on the whole
/// input and hands back exactly the bytes after the header.
pub fn check_proxy_inbound(data: &[u8]) {
    let mut input = Input(data);
    let seed = input.byte();
    let bytes = input.rest();
    let whole = inbound::parse(bytes);
    match &whole {
        Parsed::Done { carried, len } => {
            let len = *len;
            assert!(len > 0 && len <= bytes.len() && len <= MAX_INBOUND_HEADER);
            let header = &bytes[..len];
            if header.starts_with(&V2_SIGNATURE) {
                let declared = usize::from(u16::from_be_bytes([header[14], header[15]]));
                assert_eq!(len, 16 + declared, "v2 length is the declared one");
                let parsed = ppp::v2::Header::try_from(header).expect("ppp agrees it is a header");
                assert!(
                    parsed.tlvs().all(|t| t.is_ok()),
                    "accepted TLVs are well-formed"
                );
                assert!(
                    parsed.command != ppp::v2::Command::Proxy
                        || parsed.protocol != ppp::v2::Protocol::Datagram,
                    "PROXY over TCP only"
                );
                let family = header[13] >> 4;
                match carried {
                    Some((client, _)) => {
                        assert_eq!(header[12] & 0x0f, 1, "addresses only from PROXY");
                        assert_eq!(family, if client.is_ipv4() { 1 } else { 2 });
                    }
                    None => assert!(header[12] & 0x0f == 0 || !(1..=2).contains(&family)),
                }
            } else {
                assert!(header.starts_with(b"PROXY "), "v1 or v2, nothing else");
                assert!(len <= V1_MAX, "v1 line of {len} bytes");
                let crlf = header.windows(2).position(|w| w == b"\r\n");
                assert_eq!(crlf, Some(len - 2), "v1 ends at its first CRLF");
            }
            assert_eq!(inbound::parse(header), whole, "decided by the header alone");
            let mut other = header.to_vec();
            other.extend_from_slice(b"\x16\x03\x01\r\nEHLO x\r\n");
            assert_eq!(
                inbound::parse(&other),
                whole,
                "bytes after it do not matter"
            );
            for cut in prefix_cuts(len) {
                assert_eq!(
                    inbound::parse(&bytes[..cut]),
                    Parsed::Incomplete,
                    "prefix of {cut} bytes"
                );
            }
        }
        Parsed::Incomplete => assert!(bytes.len() < MAX_INBOUND_HEADER),
        Parsed::Invalid(reason) => assert!(!reason.is_empty()),
    }

    let mut reads = Reads {
        parts: segments(bytes, seed, 4096).into_iter(),
        current: &[],
    };
    let read = runtime().block_on(inbound::read(&mut reads, Duration::from_secs(5)));
    let unread = reads.unread();
    match (read, &whole) {
        (Ok((carried, after)), Parsed::Done { carried: c, len }) => {
            assert_eq!(&carried, c);
            let mut rest = after;
            rest.extend_from_slice(&unread);
            assert_eq!(
                rest,
                &bytes[*len..],
                "the bytes after the header are carried on"
            );
        }
        (Err(InboundError::Invalid(_)), Parsed::Invalid(_))
        | (Err(InboundError::Closed), Parsed::Incomplete) => {}
        (read, whole) => panic!("read in pieces gave {read:?}, the whole input {whole:?}"),
    }
}

/// Prefix lengths to try: all of them for short headers, a spread for long ones.
fn prefix_cuts(len: usize) -> Vec<usize> {
    if len <= 128 {
        (0..len).collect()
    } else {
        let mut cuts: Vec<usize> = (0..64).chain(len - 64..len).collect();
        cuts.extend((64..len - 64).step_by(61));
        cuts
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime builds")
    })
}

/// A peer that delivers fixed reads, then end of stream; never pending.
struct Reads<'a> {
    parts: std::vec::IntoIter<&'a [u8]>,
    current: &'a [u8],
}

impl Reads<'_> {
    fn unread(self) -> Vec<u8> {
        let mut out = self.current.to_vec();
        for part in self.parts {
            out.extend_from_slice(part);
        }
        out
    }
}

impl AsyncRead for Reads<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.current.is_empty() {
            self.current = self.parts.next().unwrap_or_default();
        }
        let n = self.current.len().min(buf.remaining());
        buf.put_slice(&self.current[..n]);
        self.current = &self.current[n..];
        Poll::Ready(Ok(()))
    }
}
