//! FZ-3, FZ-4: the inbound PROXY decoder (`proxy_header::inbound`) and the outbound encoder
//! (`proxy_header::outbound`), the encoder's output decoded by `ppp` and by our own decoder.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

use super::{Input, segments};
use crate::proxy_header::inbound::{self, InboundError, MAX_INBOUND_HEADER, Parsed};
use crate::proxy_header::outbound::{
    self, ClientCertHeader, MAX_CN_LEN, MAX_HEADER_LEN, PP2_SUBTYPE_SSL_CLIENT_SHA256,
    TlsHeaderFacts,
};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1: "a 107-byte buffer is enough for the longest line" (the PROXY specification §2.1).
const V1_MAX: usize = 107;

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
            if header.starts_with(V2_SIGNATURE) {
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

/// Input: two addresses, a session id and optional TLS facts (SNI, ALPN, version, cipher,
/// algorithms, client certificate with CN), all arbitrary. v2: at most 536 bytes; `ppp`
/// decodes it to the same (family-normalised) addresses; TLV lengths fill the header
/// exactly; each TLV carries exactly its fact or is absent for a stated reason (no TLS, no
/// room); `verify` is 0 only for a verified certificate; CRC32C checks; our own decoder
/// agrees. v1: within 107 bytes and decoded to the same addresses.
pub fn check_proxy_outbound(data: &[u8]) {
    let mut input = Input(data);
    let client = address(&mut input);
    let local = address(&mut input);
    let session_id = text(&mut input, 200);
    let flags = input.byte();
    let sni = text(&mut input, 300);
    let alpn_len = usize::from(input_len(&mut input, 300));
    let alpn = input.take(alpn_len).to_vec();
    let version = text(&mut input, 40);
    let cipher = text(&mut input, 80);
    let sig_alg = text(&mut input, 40);
    let key_alg = text(&mut input, 40);
    let cn = text(&mut input, 200);
    let mut sha256 = [0u8; 32];
    let fp = input.take(32);
    sha256[..fp.len()].copy_from_slice(fp);
    let tls = (flags & 1 == 1).then(|| TlsHeaderFacts {
        sni: (flags & 2 != 0).then_some(sni.as_str()),
        alpn: (flags & 4 != 0).then_some(alpn.as_slice()),
        version: &version,
        cipher: &cipher,
        sig_alg: &sig_alg,
        key_alg: &key_alg,
        client_cert: (flags & 8 != 0).then(|| ClientCertHeader {
            cn: (flags & 16 != 0).then_some(cn.as_str()),
            sha256: &sha256,
            verified: flags & 32 != 0,
        }),
    });
    let (c, l) = one_family(client, local);

    let v1 = outbound::encode_v1(client, local);
    assert!(v1.len() <= V1_MAX);
    let line = std::str::from_utf8(&v1).expect("v1 is ASCII");
    let parsed = ppp::v1::Header::try_from(line).expect("ppp decodes our v1 line");
    let expected_v1 = match (c.ip(), l.ip()) {
        (IpAddr::V4(ci), IpAddr::V4(li)) => {
            ppp::v1::Addresses::new_tcp4(ci, li, c.port(), l.port())
        }
        (IpAddr::V6(ci), IpAddr::V6(li)) => {
            ppp::v1::Addresses::new_tcp6(ci, li, c.port(), l.port())
        }
        _ => unreachable!("one family"),
    };
    assert_eq!(parsed.addresses, expected_v1);
    assert_decodes_to(&v1, c, l);

    let v2 = outbound::encode_v2(client, local, &session_id, tls.as_ref());
    check_v2(&v2, c, l, &session_id, tls.as_ref());
    assert_decodes_to(&v2, c, l);

    let probe = outbound::encode_v2_local();
    assert_eq!(
        inbound::parse(&probe),
        Parsed::Done {
            carried: None,
            len: probe.len()
        }
    );
}

fn check_v2(
    bytes: &[u8],
    c: SocketAddr,
    l: SocketAddr,
    session_id: &str,
    tls: Option<&TlsHeaderFacts<'_>>,
) {
    assert!(bytes.len() <= MAX_HEADER_LEN, "{} bytes", bytes.len());
    assert_eq!(&bytes[..12], V2_SIGNATURE);
    assert_eq!(bytes[12], 0x21, "v2 PROXY");
    let declared = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    assert_eq!(16 + declared, bytes.len());
    let header = ppp::v2::Header::try_from(bytes).expect("ppp decodes our v2 header");
    assert_eq!(header.len(), bytes.len());
    assert_eq!(header.command, ppp::v2::Command::Proxy);
    assert_eq!(header.protocol, ppp::v2::Protocol::Stream);
    match (header.addresses, c.ip(), l.ip()) {
        (ppp::v2::Addresses::IPv4(a), IpAddr::V4(ci), IpAddr::V4(li)) => {
            assert_eq!((a.source_address, a.destination_address), (ci, li));
            assert_eq!((a.source_port, a.destination_port), (c.port(), l.port()));
        }
        (ppp::v2::Addresses::IPv6(a), IpAddr::V6(ci), IpAddr::V6(li)) => {
            assert_eq!((a.source_address, a.destination_address), (ci, li));
            assert_eq!((a.source_port, a.destination_port), (c.port(), l.port()));
        }
        (other, _, _) => panic!("addresses {other:?} for {c} -> {l}"),
    }
    let tlvs: Vec<(u8, Vec<u8>)> = header
        .tlvs()
        .map(|t| {
            let t = t.expect("TLV lengths fill the header exactly");
            (t.kind, t.value.to_vec())
        })
        .collect();
    let kinds: Vec<u8> = tlvs.iter().map(|t| t.0).collect();
    let order = [0x01, 0x02, 0x05, 0x20, 0x03];
    let mut expected_order = order.to_vec();
    expected_order.retain(|k| kinds.contains(k));
    assert_eq!(
        kinds, expected_order,
        "TLVs: ALPN, AUTHORITY, UNIQUE_ID, SSL, CRC32C"
    );
    let get = |kind: u8| tlvs.iter().find(|t| t.0 == kind).map(|t| t.1.as_slice());

    let id = session_id.as_bytes();
    assert_eq!(get(0x05), Some(&id[..id.len().min(128)]), "UNIQUE_ID");
    let crc_len = if get(0x03).is_some() { 7 } else { 0 };
    let without_crc = bytes.len() - crc_len;
    match get(0x03) {
        Some(crc) => {
            let mut zeroed = bytes.to_vec();
            let at = zeroed.len() - 4;
            zeroed[at..].fill(0);
            assert_eq!(crc, outbound::crc32c(&zeroed).to_be_bytes(), "CRC32C");
        }
        None => assert!(
            bytes.len() + 7 > MAX_HEADER_LEN,
            "CRC32C left out with room"
        ),
    }

    let Some(t) = tls else {
        for kind in [0x01, 0x02, 0x20] {
            assert!(
                get(kind).is_none(),
                "plaintext session with TLV {kind:#04x}"
            );
        }
        return;
    };
    let alpn = t.alpn.filter(|a| !a.is_empty());
    match get(0x01) {
        Some(a) => assert_eq!(Some(a), alpn, "ALPN"),
        None => assert!(alpn.is_none_or(|a| a.len() > 255 || get(0x20).is_none())),
    }
    let sni = t.sni.filter(|s| !s.is_empty());
    match get(0x02) {
        Some(a) => {
            assert_eq!(
                Some(a),
                sni.map(str::as_bytes),
                "AUTHORITY is the SNI, uncut"
            );
            assert!(a.len() <= 255, "AUTHORITY of {} bytes", a.len());
        }
        None => assert!(
            sni.is_none_or(|s| s.len() > 255 || without_crc + 3 + s.len() > MAX_HEADER_LEN),
            "SNI left out although it fits"
        ),
    }
    match get(0x20) {
        Some(ssl) => check_ssl(ssl, t),
        None => {
            let realistic = t.version.len() <= 16
                && t.cipher.len() <= 64
                && t.sig_alg.len() <= 32
                && t.key_alg.len() <= 32
                && alpn.is_none_or(|a| a.len() <= 16)
                && session_id.len() <= 32;
            assert!(!realistic, "TLS facts of a real session dropped");
        }
    }
}

/// The PP2_TYPE_SSL value: client flags, verify, then sub-TLVs filling it exactly.
fn check_ssl(ssl: &[u8], t: &TlsHeaderFacts<'_>) {
    assert!(ssl.len() >= 5);
    let cert = t.client_cert.as_ref();
    let flags = if cert.is_some() { 0x07 } else { 0x01 };
    assert_eq!(
        ssl[0], flags,
        "CLIENT_SSL, plus CERT_CONN|CERT_SESS with a certificate"
    );
    let verify = u32::from_be_bytes([ssl[1], ssl[2], ssl[3], ssl[4]]);
    assert_eq!(
        verify == 0,
        cert.is_some_and(|c| c.verified),
        "verify is 0 only for a presented, verified certificate"
    );
    let mut subs = Vec::new();
    let mut rest = &ssl[5..];
    while !rest.is_empty() {
        assert!(rest.len() >= 3, "truncated sub-TLV");
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        assert!(rest.len() >= 3 + len, "sub-TLV overruns the SSL value");
        subs.push((rest[0], &rest[3..3 + len]));
        rest = &rest[3 + len..];
    }
    let get = |kind: u8| {
        let mut found = subs.iter().filter(|s| s.0 == kind);
        let first = found.next().map(|s| s.1);
        assert!(found.next().is_none(), "sub-TLV {kind:#04x} twice");
        first
    };
    assert_eq!(get(0x21), Some(t.version.as_bytes()), "VERSION");
    assert_eq!(get(0x23), Some(t.cipher.as_bytes()), "CIPHER");
    assert_eq!(get(0x24), Some(t.sig_alg.as_bytes()), "SIG_ALG");
    assert_eq!(get(0x25), Some(t.key_alg.as_bytes()), "KEY_ALG");
    let sha = get(PP2_SUBTYPE_SSL_CLIENT_SHA256);
    assert_eq!(
        sha,
        cert.map(|c| c.sha256.as_slice()),
        "client certificate SHA-256"
    );
    match (get(0x22), cert.and_then(|c| c.cn)) {
        (Some(sent), Some(cn)) => {
            let sent = std::str::from_utf8(sent).expect("the CN is cut at a character boundary");
            assert!(cn.starts_with(sent) && sent.len() <= MAX_CN_LEN);
            assert!(sent == cn || sent.len() + 4 > MAX_CN_LEN, "CN cut short");
        }
        (None, None) => {}
        (sent, cn) => panic!("CN sub-TLV {sent:?} for CN {cn:?}"),
    }
}

/// Our own decoder takes back exactly the header and the encoder's addresses.
fn assert_decodes_to(header: &[u8], c: SocketAddr, l: SocketAddr) {
    let mut input = header.to_vec();
    input.extend_from_slice(b"EHLO x\r\n");
    assert_eq!(
        inbound::parse(&input),
        Parsed::Done {
            carried: Some((c, l)),
            len: header.len()
        }
    );
}

/// Both addresses as the header carries them: IPv4 when both are IPv4 (mapped ones
/// included), otherwise both IPv6 (the PROXY address block has one family).
fn one_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (c, l) = (canonical(client), canonical(local));
    if c.is_ipv4() && l.is_ipv4() {
        return (c, l);
    }
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    (v6(c), v6(l))
}

fn address(input: &mut Input<'_>) -> SocketAddr {
    let kind = input.byte();
    let v4 = [input.byte(), input.byte(), input.byte(), input.byte()];
    let ip = match kind % 3 {
        0 => IpAddr::V4(Ipv4Addr::from(v4)),
        1 => IpAddr::V6(Ipv4Addr::from(v4).to_ipv6_mapped()),
        _ => {
            let mut v6 = [0u8; 16];
            v6[..4].copy_from_slice(&v4);
            let more = input.take(12);
            v6[4..4 + more.len()].copy_from_slice(more);
            IpAddr::V6(Ipv6Addr::from(v6))
        }
    };
    SocketAddr::new(ip, input.u16())
}

fn input_len(input: &mut Input<'_>, max: u16) -> u16 {
    input.u16() % (max + 1)
}

/// Arbitrary text of up to `max` input bytes (invalid UTF-8 replaced).
fn text(input: &mut Input<'_>, max: u16) -> String {
    let n = usize::from(input_len(input, max));
    String::from_utf8_lossy(input.take(n)).into_owned()
}
