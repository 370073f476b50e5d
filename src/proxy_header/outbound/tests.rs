use super::*;
use ppp::v2::{Addresses, Command, Header};

fn tlvs(header: &Header<'_>) -> Vec<(u8, Vec<u8>)> {
    header
        .tlvs()
        .map(|t| {
            let t = t.expect("well-formed TLV");
            (t.kind, t.value.to_vec())
        })
        .collect()
}

fn sub_tlvs(ssl: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = &ssl[5..];
    while rest.len() >= 3 {
        let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        out.push((rest[0], rest[3..3 + len].to_vec()));
        rest = &rest[3 + len..];
    }
    assert!(rest.is_empty(), "sub-TLVs fill the SSL value exactly");
    out
}

fn facts<'a>(sni: &'a str, cn: Option<&'a str>, fp: &'a [u8; 32]) -> TlsHeaderFacts<'a> {
    TlsHeaderFacts {
        sni: Some(sni),
        alpn: None,
        version: "TLSv1.3",
        cipher: "TLS_AES_256_GCM_SHA384",
        sig_alg: "ECDSA-SHA256",
        key_alg: "EC256",
        client_cert: Some(ClientCertHeader {
            cn,
            sha256: fp,
            verified: true,
        }),
    }
}

#[test]
fn crc32c_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn v1_line_parses_with_ppp() {
    let line = encode_v1(
        "127.0.0.2:40000".parse().unwrap(),
        "127.0.0.1:465".parse().unwrap(),
    );
    assert_eq!(line, b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 465\r\n");
    let parsed = ppp::v1::Header::try_from(std::str::from_utf8(&line).unwrap()).unwrap();
    assert_eq!(
        parsed.addresses,
        ppp::v1::Addresses::new_tcp4([127, 0, 0, 2], [127, 0, 0, 1], 40000, 465)
    );
}

#[test]
fn v1_mixed_families_become_tcp6() {
    let line = encode_v1(
        "[2001:db8::1]:1".parse().unwrap(),
        "127.0.0.1:25".parse().unwrap(),
    );
    assert_eq!(line, b"PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 1 25\r\n");
}

#[test]
fn v2_carries_addresses_and_tls_tlvs_in_order() {
    let fp = [7u8; 32];
    let bytes = encode_v2(
        "127.0.0.2:40000".parse().unwrap(),
        "127.0.0.1:465".parse().unwrap(),
        "0123456789abcdef",
        Some(&facts("mail.example.test", Some("gmail client"), &fp)),
    );
    let header = Header::try_from(bytes.as_slice()).unwrap();
    assert_eq!(header.len(), bytes.len(), "nothing trails the header");
    assert_eq!(header.command, Command::Proxy);
    match header.addresses {
        Addresses::IPv4(a) => {
            assert_eq!(a.source_address.octets(), [127, 0, 0, 2]);
            assert_eq!(a.source_port, 40000);
            assert_eq!(a.destination_port, 465);
        }
        other => panic!("expected IPv4, got {other:?}"),
    }
    let t = tlvs(&header);
    let kinds: Vec<u8> = t.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, vec![0x02, 0x05, 0x20, 0x03]);
    assert_eq!(t[0].1, b"mail.example.test");
    assert_eq!(t[1].1, b"0123456789abcdef");
    let ssl = &t[2].1;
    assert_eq!(ssl[0], 0x07, "SSL + CERT_CONN + CERT_SESS");
    assert_eq!(
        &ssl[1..5],
        &[0, 0, 0, 0],
        "verify 0: presented and verified"
    );
    let subs = sub_tlvs(ssl);
    assert!(subs.contains(&(0x21, b"TLSv1.3".to_vec())));
    assert!(subs.contains(&(0x22, b"gmail client".to_vec())));
    assert!(subs.contains(&(0x23, b"TLS_AES_256_GCM_SHA384".to_vec())));
    assert!(subs.contains(&(0x24, b"ECDSA-SHA256".to_vec())));
    assert!(subs.contains(&(0x25, b"EC256".to_vec())));
    assert!(subs.contains(&(0xE0, fp.to_vec())));
    // CRC32C over the header with the CRC field zeroed.
    let mut zeroed = bytes.clone();
    let at = zeroed.len() - 4;
    let crc = u32::from_be_bytes(zeroed[at..].try_into().unwrap());
    zeroed[at..].copy_from_slice(&[0; 4]);
    assert_eq!(crc, crc32c(&zeroed));
}

#[test]
fn v2_without_client_cert_says_not_verified() {
    let bytes = encode_v2(
        "127.0.0.2:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        "id",
        Some(&TlsHeaderFacts {
            version: "TLSv1.2",
            cipher: "x",
            sig_alg: "y",
            key_alg: "z",
            ..Default::default()
        }),
    );
    let header = Header::try_from(bytes.as_slice()).unwrap();
    let ssl = tlvs(&header)
        .into_iter()
        .find(|(k, _)| *k == 0x20)
        .unwrap()
        .1;
    assert_eq!(ssl[0], 0x01);
    assert_ne!(u32::from_be_bytes(ssl[1..5].try_into().unwrap()), 0);
}

#[test]
fn v2_plaintext_session_has_no_ssl_tlv() {
    let bytes = encode_v2(
        "127.0.0.2:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        "id",
        None,
    );
    let header = Header::try_from(bytes.as_slice()).unwrap();
    let kinds: Vec<u8> = tlvs(&header).iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, vec![0x05, 0x03]);
}

#[test]
fn v2_maximal_header_stays_within_postfix_limit() {
    let sni = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(sni.len(), 253);
    let cn = "é".repeat(200);
    let fp = [1u8; 32];
    let bytes = encode_v2(
        "[2001:db8::1]:65535".parse().unwrap(),
        "[2001:db8::2]:465".parse().unwrap(),
        &"s".repeat(200),
        Some(&facts(&sni, Some(&cn), &fp)),
    );
    assert!(bytes.len() <= MAX_HEADER_LEN, "{} bytes", bytes.len());
    let header = Header::try_from(bytes.as_slice()).unwrap();
    let t = tlvs(&header);
    let ssl = &t.iter().find(|(k, _)| *k == 0x20).unwrap().1;
    let cn_sent = sub_tlvs(ssl)
        .into_iter()
        .find(|(k, _)| *k == 0x22)
        .unwrap()
        .1;
    assert!(cn_sent.len() <= MAX_CN_LEN);
    assert!(
        std::str::from_utf8(&cn_sent).is_ok(),
        "cut on a character boundary"
    );
}

#[test]
fn v2_mapped_ipv4_client_is_written_as_ipv4() {
    let bytes = encode_v2(
        "[::ffff:127.0.0.2]:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        "id",
        None,
    );
    assert_eq!(bytes[13], 0x11);
}

#[test]
fn v2_local_parses() {
    let bytes = encode_v2_local();
    let header = Header::try_from(bytes.as_slice()).unwrap();
    assert_eq!(header.command, Command::Local);
}

#[test]
fn v2_sni_longer_than_a_host_name_is_left_out() {
    let fp = [1u8; 32];
    let sni = "a".repeat(MAX_AUTHORITY_LEN + 1);
    let bytes = encode_v2(
        "127.0.0.2:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        "id",
        Some(&facts(&sni, None, &fp)),
    );
    let header = Header::try_from(bytes.as_slice()).unwrap();
    assert!(
        tlvs(&header).iter().all(|(k, _)| *k != 0x02),
        "no AUTHORITY"
    );
}
