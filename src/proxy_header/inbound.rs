//! Inbound PROXY v1/v2 from a trusted load balancer (`accept_proxy_protocol`). Parsing is
//! `ppp`'s; this module only frames it: how much to read, when to give up, and which
//! addresses the session takes. Bytes after the header are returned for the next layer
//! (the TLS ClientHello or the first SMTP command may arrive in the same segment).

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt};

/// v2 allows 16 + 65535 bytes; load balancers send a few dozen. Anything bigger is refused
/// rather than buffered.
pub(crate) const MAX_INBOUND_HEADER: usize = 4096;
/// A v1 line with its CRLF is at most 107 bytes (the PROXY specification §2.1).
const V1_MAX_LINE: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
use super::V2_SIGNATURE;
/// v2's fixed part: signature, version/command, family, and the 2-byte length after it.
const V2_FIXED: usize = 16;

/// The addresses a header carries; `None` for v2 LOCAL, v1 UNKNOWN and non-IP families
/// (the connection's own addresses apply, as the PROXY specification says).
pub(crate) type Carried = Option<(SocketAddr, SocketAddr)>;

/// What a buffer holds so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    Incomplete,
    /// A whole header of `len` bytes.
    Done {
        carried: Carried,
        len: usize,
    },
    Invalid(String),
}

/// Parses the start of `buf`. Pure: the fuzz target and the tests drive it directly.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    let n = buf.len().min(V2_SIGNATURE.len());
    let maybe_v2 = buf[..n] == V2_SIGNATURE[..n];
    let m = buf.len().min(V1_PREFIX.len());
    let maybe_v1 = buf[..m] == V1_PREFIX[..m];
    if !maybe_v1 && !maybe_v2 {
        return Parsed::Invalid("no PROXY header from a load balancer that must send one".into());
    }
    // v1 is decided on its whole line only: ppp reads a line cut by a read boundary (after
    // "40000 ", say) as a malformed one, which would refuse a header split across reads.
    let v1_line = maybe_v1 && !maybe_v2;
    let buf = if v1_line {
        match buf.windows(2).position(|w| w == b"\r\n") {
            // ppp ends a line at its first CR, whatever follows it, and takes a LF before
            // it as the terminator: a line must hold neither.
            Some(end) if buf[..end].iter().any(|&b| b == b'\r' || b == b'\n') => {
                return Parsed::Invalid("PROXY v1: CR or LF inside the header line".into());
            }
            Some(end) => &buf[..end + 2],
            None if buf.len() >= V1_MAX_LINE => {
                return Parsed::Invalid(format!(
                    "PROXY v1: no CRLF in the first {V1_MAX_LINE} bytes"
                ));
            }
            None => return Parsed::Incomplete,
        }
    } else {
        buf
    };
    // v2 states its length up front: one over the cap is refused on sight, not waited for
    // until the cap's worth of bytes (or the timeout) arrives (catalogue PI-6).
    if maybe_v2 && buf.len() >= V2_FIXED {
        let declared = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if declared > MAX_INBOUND_HEADER {
            return Parsed::Invalid(format!(
                "PROXY header longer than {MAX_INBOUND_HEADER} bytes (v2 declares {declared})"
            ));
        }
    }
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        // ppp calls a v1 line with missing fields "incomplete" even when its CRLF is there.
        return if v1_line {
            Parsed::Invalid("PROXY v1: malformed header line".into())
        } else if buf.len() >= MAX_INBOUND_HEADER {
            Parsed::Invalid(format!(
                "PROXY header longer than {MAX_INBOUND_HEADER} bytes"
            ))
        } else {
            Parsed::Incomplete
        };
    }
    match result {
        HeaderResult::V1(Ok(h)) => Parsed::Done {
            carried: match h.addresses {
                v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                v1::Addresses::Unknown => None,
            },
            len: h.header.len(),
        },
        HeaderResult::V2(Ok(h)) => {
            if h.len() > MAX_INBOUND_HEADER {
                return Parsed::Invalid(format!(
                    "PROXY header longer than {MAX_INBOUND_HEADER} bytes"
                ));
            }
            if let Err(reason) = check_v2(&h) {
                return Parsed::Invalid(format!("PROXY v2: {reason}"));
            }
            let carried = match (h.command, h.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                _ => None,
            };
            Parsed::Done {
                carried,
                len: h.len(),
            }
        }
        HeaderResult::V1(Err(e)) => Parsed::Invalid(format!("PROXY v1: {e}")),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(format!("PROXY v2: {e}")),
    }
}

/// What `ppp` leaves unchecked (catalogue PI-4): a UDP header on a TCP listener, TLVs that
/// overrun the declared length or are cut short, AUTHORITY over 255 and UNIQUE_ID over 128
/// bytes (the spec's bounds), and a CRC32C TLV that does not match the header.
fn check_v2(h: &v2::Header<'_>) -> Result<(), String> {
    if h.command == v2::Command::Proxy && h.protocol == v2::Protocol::Datagram {
        return Err("a UDP (DGRAM) header on a TCP listener".into());
    }
    let bytes = h.as_bytes();
    let mut off = bytes.len() - h.tlv_bytes().len();
    while off < bytes.len() {
        if bytes.len() - off < 3 {
            return Err(format!("a TLV cut short ({} bytes)", bytes.len() - off));
        }
        let kind = bytes[off];
        let len = usize::from(u16::from_be_bytes([bytes[off + 1], bytes[off + 2]]));
        let (start, end) = (off + 3, off + 3 + len);
        if end > bytes.len() {
            return Err(format!(
                "TLV 0x{kind:02x} of {len} bytes overruns the header"
            ));
        }
        match kind {
            0x02 if len > 255 => return Err(format!("AUTHORITY of {len} bytes (at most 255)")),
            0x05 if len > 128 => return Err(format!("UNIQUE_ID of {len} bytes (at most 128)")),
            0x03 => {
                let value: [u8; 4] = bytes[start..end]
                    .try_into()
                    .map_err(|_| format!("CRC32C TLV of {len} bytes (must be 4)"))?;
                let mut zeroed = bytes.to_vec();
                zeroed[start..end].fill(0);
                if crate::proxy_header::outbound::crc32c(&zeroed) != u32::from_be_bytes(value) {
                    return Err("CRC32C does not match the header".into());
                }
            }
            _ => {}
        }
        off = end;
    }
    Ok(())
}

/// Why no header could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InboundError {
    #[error("timeout waiting for the PROXY header")]
    Timeout,
    #[error("closed before a complete PROXY header")]
    Closed,
    #[error("{0}")]
    Invalid(String),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one header within `limit`. Returns the carried addresses and the bytes that
/// followed the header in what was read.
pub(crate) async fn read<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: Duration,
) -> Result<(Carried, Vec<u8>), InboundError> {
    let work = async {
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 512];
        loop {
            let n = r.read(&mut chunk).await?;
            if n == 0 {
                return Err(InboundError::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse(&buf) {
                Parsed::Incomplete => continue,
                Parsed::Invalid(reason) => return Err(InboundError::Invalid(reason)),
                Parsed::Done { carried, len } => return Ok((carried, buf.split_off(len))),
            }
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(InboundError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_header::outbound;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_with_trailing_bytes() {
        let mut input = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n".to_vec();
        let header_len = input.len();
        input.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(
            parse(&input),
            Parsed::Done {
                carried: Some((addr("192.0.2.7:40000"), addr("198.51.100.1:25"))),
                len: header_len
            }
        );
        assert_eq!(parse(&input[..10]), Parsed::Incomplete);
    }

    #[test]
    fn v2_from_our_own_encoder_round_trips() {
        let h = outbound::encode_v2(
            addr("[2001:db8::7]:40000"),
            addr("[2001:db8::1]:465"),
            "id",
            None,
        );
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        let mut input = h.clone();
        input.push(0x16);
        assert_eq!(
            parse(&input),
            Parsed::Done {
                carried: Some((addr("[2001:db8::7]:40000"), addr("[2001:db8::1]:465"))),
                len: h.len()
            }
        );
    }

    #[test]
    fn v2_local_carries_nothing() {
        let h = outbound::encode_v2_local();
        assert_eq!(
            parse(&h),
            Parsed::Done {
                carried: None,
                len: h.len()
            }
        );
    }

    #[test]
    fn anything_else_is_refused_at_once() {
        assert!(matches!(parse(b"EHLO x\r\n"), Parsed::Invalid(_)));
        assert!(matches!(parse(&[0x16, 0x03, 0x01]), Parsed::Invalid(_)));
        assert!(matches!(
            parse(b"PROXY TCP4 garbage\r\n"),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn v1_is_decided_on_its_whole_crlf_line() {
        let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n";
        for cut in 0..line.len() {
            assert_eq!(parse(&line[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(V1_MAX_LINE, b'1');
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
        // ppp alone would take "PROXY UNKNOWN \n\rX" as a header, eating the X.
        for bad in [&b"PROXY UNKNOWN \n\rX\r\n"[..], b"PROXY UNKNOWN\rX\r\n"] {
            assert!(matches!(parse(bad), Parsed::Invalid(_)), "{bad:?}");
        }
    }

    #[test]
    fn v2_declaring_more_than_the_cap_is_refused_before_its_bytes_arrive() {
        let fixed = |declared: u16| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x21, 0x11]);
            h.extend_from_slice(&declared.to_be_bytes());
            h
        };
        assert!(matches!(parse(&fixed(u16::MAX)), Parsed::Invalid(_)));
        let over = (MAX_INBOUND_HEADER - V2_FIXED + 1) as u16;
        assert!(matches!(parse(&fixed(over)), Parsed::Invalid(_)));
        // Exactly at the cap: waited for.
        let at = (MAX_INBOUND_HEADER - V2_FIXED) as u16;
        assert_eq!(parse(&fixed(at)), Parsed::Incomplete);
    }

    #[test]
    fn endless_v1_is_refused_not_buffered() {
        let mut input = b"PROXY TCP4 ".to_vec();
        input.resize(MAX_INBOUND_HEADER, b'1');
        assert!(matches!(parse(&input), Parsed::Invalid(_)));
    }

    /// A v2 PROXY/TCP4 header with `tlvs` appended and the length fixed up.
    fn v2_with(tlvs: &[u8], protocol: u8) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x10 | protocol, 0, 0]);
        h.extend_from_slice(&[192, 0, 2, 7, 198, 51, 100, 1, 0x9c, 0x40, 0, 25]);
        h.extend_from_slice(tlvs);
        let len = (h.len() - V2_FIXED) as u16;
        h[14..16].copy_from_slice(&len.to_be_bytes());
        h
    }

    fn invalid(input: &[u8]) -> String {
        match parse(input) {
            Parsed::Invalid(r) => r,
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn v2_tlvs_and_protocol_are_checked() {
        assert!(matches!(
            parse(&v2_with(&[0x04, 0, 1, 9], 1)),
            Parsed::Done { .. }
        ));
        // A TLV running past the declared length, and one cut inside its own header.
        assert!(invalid(&v2_with(&[0x04, 0, 9, 1, 2], 1)).contains("overruns"));
        assert!(invalid(&v2_with(&[0x04, 0], 1)).contains("cut short"));
        // The spec's bounds.
        let mut authority = vec![0x02, 1, 0];
        authority.extend_from_slice(&[b'a'; 256]);
        assert!(invalid(&v2_with(&authority, 1)).contains("AUTHORITY of 256"));
        let mut unique = vec![0x05, 0, 129];
        unique.extend_from_slice(&[7; 129]);
        assert!(invalid(&v2_with(&unique, 1)).contains("UNIQUE_ID of 129"));
        // UDP on a TCP listener.
        assert!(invalid(&v2_with(&[], 2)).contains("UDP"));
    }

    #[test]
    fn v2_crc32c_must_match() {
        let good =
            outbound::encode_v2(addr("192.0.2.7:40000"), addr("198.51.100.1:25"), "id", None);
        assert!(matches!(parse(&good), Parsed::Done { .. }));
        let mut bad = good;
        let last = bad.len() - 1; // the CRC32C TLV comes last in our encoder
        bad[last] ^= 0xff;
        assert!(invalid(&bad).contains("CRC32C"));
        let short = v2_with(&[0x03, 0, 2, 0, 0], 1);
        assert!(invalid(&short).contains("must be 4"));
    }
}
