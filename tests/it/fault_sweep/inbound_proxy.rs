//! The fault sweep's inbound PROXY section (split from `fault_sweep.rs` at its banner).

#![allow(clippy::unwrap_used)]

use super::*;

/// Catalogue PI-6, PI-4 (v1 without CRLF), FT-14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_proxy_header_declaring_more_than_the_cap_is_refused_at_once() {
    const BALANCER: &str = "127.0.0.7";
    let listeners = format!(
        "  balanced: {{ listen: \"127.0.0.1:0\", mode: implicit, hostname: {HOST}, upstream: mta, accept_proxy_protocol: [\"{BALANCER}/32\"], limits: {{ per_ip: 1000, handshake_timeout: 5s }} }}\n"
    );
    let bed = Bed::start_with(Upstream::Fault(Fault::None), "", &listeners, None).await;
    let addr = bed.addr("balanced");
    // The probe works: a valid v2 header, then TLS and the MTA's greeting.
    let mut tcp = connect_from(BALANCER, addr).await;
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "192.0.2.10:40000".parse::<SocketAddr>().unwrap(),
            "198.51.100.1:465".parse::<SocketAddr>().unwrap(),
        ),
    )
    .build()
    .unwrap();
    tcp.write_all(&header).await.unwrap();
    let tls = tls_handshake(tcp, inspecting_client(None), Some(HOST))
        .await
        .unwrap();
    let mut s = Smtp::new(tls);
    assert!(s.reply().await.unwrap().starts_with("220 fault.mta"));
    drop(s);

    // v2 PROXY/TCP4 declaring 65535 and 4081 bytes (16 + 4081 > 4096), and a v1 line that
    // passes v1's 107-byte maximum without a CRLF: refused on sight, not waited for.
    let v2 = |len: u16| {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
        h.extend_from_slice(&len.to_be_bytes());
        h
    };
    let mut v1 = b"PROXY TCP4 ".to_vec();
    v1.resize(120, b'1');
    for (what, bytes) in [("v2 65535", v2(65535)), ("v2 4081", v2(4081)), ("v1", v1)] {
        let mut tcp = connect_from(BALANCER, addr).await;
        let start = Instant::now();
        tcp.write_all(&bytes).await.unwrap();
        let got = raw_until_closed(&mut tcp, 3 * SECOND).await;
        let took = start.elapsed();
        assert!(took < SECOND, "{what}: closed after {took:?}");
        assert!(got.is_empty(), "{what}: {got:?}");
    }
    bed.proxy
        .wait_for_nth_log(3, IO_TIMEOUT, |v| {
            v["message"] == "session" && v["outcome"] == "protocol_error"
        })
        .await;
    assert_eq!(
        bed.mta().conns().len(),
        1,
        "only the valid header reached it"
    );
    bed.control().await;
    bed.settle().await;
}
