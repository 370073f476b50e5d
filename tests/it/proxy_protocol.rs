//! PROXY headers towards the upstream, parsed with `ppp` as the MTA would.

// Test helpers outside #[test] fns may unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use crate::common::*;

async fn one_session(
    upstream_extra: &str,
) -> (FakeMta, RunningProxy, std::net::SocketAddr, MtaConn) {
    let pki = TestPki::new();
    let mta = if upstream_extra.contains("none") {
        FakeMta::start_without_header().await
    } else {
        FakeMta::start().await
    };
    let mx = pki.server_cert("mx", &["mx.example.test"], false);
    let proxy = spawn_proxy(&yaml(
        mta.addr,
        upstream_extra,
        &cert_entry(&mx),
        &implicit_listener("smtps", "mx.example.test", ""),
    ));
    let (tls, client) = tls_client(
        "127.0.0.2",
        proxy.addr("smtps"),
        inspecting_client(None),
        Some("mx.example.test"),
    )
    .await;
    let mut smtp = Smtp::new(tls);
    deliver(&mut smtp, "x").await;
    let conn = mta.wait_line(0, |l| l == "QUIT").await;
    (mta, proxy, client, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_header_names_the_real_client_and_the_listener() {
    let (_mta, proxy, client, conn) = one_session("    proxy_protocol: v1\n").await;
    let line = std::str::from_utf8(&conn.header).unwrap();
    let parsed = ppp::v1::Header::try_from(line).unwrap();
    let listener = proxy.addr("smtps");
    assert_eq!(
        parsed.addresses,
        ppp::v1::Addresses::new_tcp4(
            [127, 0, 0, 2],
            [127, 0, 0, 1],
            client.port(),
            listener.port()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_header_carries_sni_tls_facts_and_the_logged_session_id() {
    let (_mta, proxy, client, conn) = one_session("").await;
    let header = parse_v2(&conn.header);
    assert_eq!(header.len(), conn.header.len());
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            assert_eq!(a.source_address.octets(), [127, 0, 0, 2]);
            assert_eq!(a.source_port, client.port());
        }
        other => panic!("{other:?}"),
    }
    let t = tlvs(&header);
    let kinds: Vec<u8> = t.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        kinds,
        vec![0x02, 0x05, 0x20, 0x03],
        "AUTHORITY, UNIQUE_ID, SSL, CRC32C"
    );
    assert_eq!(t[0].1, b"mx.example.test");
    let line = proxy.session_line(client).await;
    assert_eq!(
        std::str::from_utf8(&t[1].1).unwrap(),
        line["session_id"].as_str().unwrap()
    );
    let subs = ssl_sub_tlvs(&t[2].1);
    assert!(subs.contains(&(0x21, b"TLSv1.3".to_vec())));
    assert!(subs.contains(&(0x25, b"EC256".to_vec())));
    assert!(subs.contains(&(0x24, b"ECDSA-SHA256".to_vec())));
    let cipher = &subs.iter().find(|(k, _)| *k == 0x23).unwrap().1;
    assert_eq!(
        std::str::from_utf8(cipher).unwrap(),
        line["cipher"].as_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_none_with_explicit_allowance_sends_no_header() {
    let (_mta, _proxy, _client, conn) =
        one_session("    proxy_protocol: none\n    allow_hidden_client_address: true\n").await;
    assert!(conn.header.is_empty());
    assert_eq!(conn.lines[0], "EHLO client.test");
}
