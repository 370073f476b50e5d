//! FZ-4: the outbound PROXY encoder (`proxy_header::outbound`), its output decoded by `ppp`
//! and by our own decoder (`proxy_header::inbound`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::Input;
use super::proxy::{V1_MAX, V2_SIGNATURE};
use crate::proxy_header::inbound::{self, Parsed};
use crate::proxy_header::outbound::{
    self, ClientCertHeader, MAX_CN_LEN, MAX_HEADER_LEN, PP2_SUBTYPE_SSL_CLIENT_SHA256,
    TlsHeaderFacts,
};

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
