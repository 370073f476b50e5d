//! PROXY protocol towards the upstream, v1 line or v2 binary with TLVs. Hand-written: the
//! `ppp` builder writes only raw TLV bytes, so the SSL sub-structure, the 536-byte budget
//! and CRC32C are ours anyway (≈150 lines; round-trip tested through `ppp`'s parser).
//!
//! Budget: Postfix reads the header with one 536-byte peek and refuses anything longer,
//! so the client-controlled values (SNI -> AUTHORITY, certificate CN) are capped or dropped
//! to keep the whole header within `MAX_HEADER_LEN`. The header is returned whole, for one write.

use std::net::{IpAddr, SocketAddr};

/// Postfix `HAPROXY_HEADER_MAX_LEN`.
pub(crate) const MAX_HEADER_LEN: usize = 536;
/// X.520 ub-common-name: longer CNs are cut to this many bytes.
pub(crate) const MAX_CN_LEN: usize = 64;
/// A DNS name is at most 253 bytes, and HAProxy refuses a longer AUTHORITY than 255: a longer
/// SNI is no host name and is left out rather than cut.
pub(crate) const MAX_AUTHORITY_LEN: usize = 255;

use super::V2_SIGNATURE as SIGNATURE;
const PP2_TYPE_ALPN: u8 = 0x01;
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_CRC32C: u8 = 0x03;
const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
const PP2_SUBTYPE_SSL_SIG_ALG: u8 = 0x24;
const PP2_SUBTYPE_SSL_KEY_ALG: u8 = 0x25;
/// Custom sub-TLV (custom range 0xE0-0xEF): SHA-256 of the client certificate, 32 raw bytes.
pub(crate) const PP2_SUBTYPE_SSL_CLIENT_SHA256: u8 = 0xE0;
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;
const TLV_HEADER_LEN: usize = 3;

/// The TLS facts that travel in the v2 header.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsHeaderFacts<'a> {
    pub sni: Option<&'a str>,
    pub alpn: Option<&'a [u8]>,
    pub version: &'a str,
    pub cipher: &'a str,
    pub sig_alg: &'a str,
    pub key_alg: &'a str,
    pub client_cert: Option<ClientCertHeader<'a>>,
}

/// A presented client certificate; `verified` is true only when it chains to `client_ca`.
#[derive(Debug, Clone)]
pub(crate) struct ClientCertHeader<'a> {
    pub cn: Option<&'a str>,
    pub sha256: &'a [u8; 32],
    pub verified: bool,
}

/// `PROXY TCP4|TCP6 src dst sport dport\r\n`; mixed families are written as TCP6.
pub(crate) fn encode_v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (c, l) = same_family(client, local);
    let proto = if c.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        c.ip(),
        l.ip(),
        c.port(),
        l.port()
    )
    .into_bytes()
}

/// v2 `LOCAL` with no address (health probes: the MTA uses the real peer address).
pub(crate) fn encode_v2_local() -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

/// v2 `PROXY` over TCP with UNIQUE_ID and, for TLS sessions, ALPN, AUTHORITY and SSL TLVs.
/// Never longer than `MAX_HEADER_LEN`.
pub(crate) fn encode_v2(
    client: SocketAddr,
    local: SocketAddr,
    session_id: &str,
    tls: Option<&TlsHeaderFacts<'_>>,
) -> Vec<u8> {
    let (c, l) = same_family(client, local);
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21);
    match (c.ip(), l.ip()) {
        (IpAddr::V4(ci), IpAddr::V4(li)) => {
            out.extend_from_slice(&[0x11, 0, 0]);
            out.extend_from_slice(&ci.octets());
            out.extend_from_slice(&li.octets());
        }
        (ci, li) => {
            out.extend_from_slice(&[0x21, 0, 0]);
            out.extend_from_slice(&v6(ci).octets());
            out.extend_from_slice(&v6(li).octets());
        }
    }
    out.extend_from_slice(&c.port().to_be_bytes());
    out.extend_from_slice(&l.port().to_be_bytes());

    let unique_id = &session_id.as_bytes()[..session_id.len().min(128)];
    let mut ssl = Vec::new();
    let mut authority: Option<&[u8]> = None;
    let mut alpn: Option<&[u8]> = None;
    if let Some(t) = tls {
        alpn = t.alpn.filter(|a| !a.is_empty() && a.len() <= 255);
        ssl = ssl_value(t);
        authority = t
            .sni
            .map(str::as_bytes)
            .filter(|s| !s.is_empty() && s.len() <= MAX_AUTHORITY_LEN);
    }
    let crc_len = TLV_HEADER_LEN + 4;
    let mut used = out.len()
        + TLV_HEADER_LEN
        + unique_id.len()
        + alpn.map_or(0, |a| TLV_HEADER_LEN + a.len())
        + if ssl.is_empty() {
            0
        } else {
            TLV_HEADER_LEN + ssl.len()
        };
    if used > MAX_HEADER_LEN {
        // Cannot happen with our fixed-size facts; drop optional parts rather than exceed.
        alpn = None;
        used = out.len() + TLV_HEADER_LEN + unique_id.len();
        ssl.clear();
    }
    // The SNI is client-controlled (up to 253 bytes): drop it when it does not fit.
    if let Some(a) = authority {
        if used + TLV_HEADER_LEN + a.len() <= MAX_HEADER_LEN {
            used += TLV_HEADER_LEN + a.len();
        } else {
            authority = None;
        }
    }
    let with_crc = used + crc_len <= MAX_HEADER_LEN;

    if let Some(a) = alpn {
        tlv(&mut out, PP2_TYPE_ALPN, a);
    }
    if let Some(a) = authority {
        tlv(&mut out, PP2_TYPE_AUTHORITY, a);
    }
    tlv(&mut out, PP2_TYPE_UNIQUE_ID, unique_id);
    if !ssl.is_empty() {
        tlv(&mut out, PP2_TYPE_SSL, &ssl);
    }
    if with_crc {
        tlv(&mut out, PP2_TYPE_CRC32C, &[0, 0, 0, 0]);
    }
    let len = (out.len() - 16) as u16;
    out[14..16].copy_from_slice(&len.to_be_bytes());
    if with_crc {
        let crc = crc32c(&out);
        let at = out.len() - 4;
        out[at..].copy_from_slice(&crc.to_be_bytes());
    }
    debug_assert!(out.len() <= MAX_HEADER_LEN);
    out
}

/// `client` flags + `verify` + sub-TLVs. The CN is capped at `MAX_CN_LEN` bytes.
fn ssl_value(t: &TlsHeaderFacts<'_>) -> Vec<u8> {
    let mut v = Vec::with_capacity(160);
    let mut client = PP2_CLIENT_SSL;
    let mut verify: u32 = 1;
    if let Some(cc) = &t.client_cert {
        client |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS;
        if cc.verified {
            verify = 0;
        }
    }
    v.push(client);
    v.extend_from_slice(&verify.to_be_bytes());
    tlv(&mut v, PP2_SUBTYPE_SSL_VERSION, t.version.as_bytes());
    if let Some(cn) = t.client_cert.as_ref().and_then(|cc| cc.cn) {
        tlv(
            &mut v,
            PP2_SUBTYPE_SSL_CN,
            truncate_utf8(cn, MAX_CN_LEN).as_bytes(),
        );
    }
    tlv(&mut v, PP2_SUBTYPE_SSL_CIPHER, t.cipher.as_bytes());
    tlv(&mut v, PP2_SUBTYPE_SSL_SIG_ALG, t.sig_alg.as_bytes());
    tlv(&mut v, PP2_SUBTYPE_SSL_KEY_ALG, t.key_alg.as_bytes());
    if let Some(cc) = &t.client_cert {
        tlv(&mut v, PP2_SUBTYPE_SSL_CLIENT_SHA256, cc.sha256);
    }
    v
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let value = &value[..value.len().min(u16::MAX as usize)];
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Both addresses in one family: IPv4-mapped IPv6 becomes IPv4 when both allow it,
/// otherwise IPv4 is mapped into IPv6.
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let c = SocketAddr::new(client.ip().to_canonical(), client.port());
    let l = SocketAddr::new(local.ip().to_canonical(), local.port());
    if c.is_ipv4() == l.is_ipv4() {
        (c, l)
    } else {
        (
            SocketAddr::new(IpAddr::V6(v6(c.ip())), c.port()),
            SocketAddr::new(IpAddr::V6(v6(l.ip())), l.port()),
        )
    }
}

/// CRC32C (Castagnoli, reflected 0x82F63B78), bitwise: the header is at most 536 bytes.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests;
