//! Implicit TLS (port 465): handshake first, then the upstream with a PROXY header carrying
//! the TLS facts, its greeting forwarded unchanged, then the relay.

use crate::io::ClientIo;
use tokio::io::AsyncWriteExt;

use super::{Outcome, Peer, SessionReport, Transport, proxy_header, write_reply};
use crate::relay;
use crate::smtp::stream::{STARTTLS_IN_TLS, SmtpStream};
use crate::snapshot::ListenerRuntime;
use crate::upstream;

pub async fn run(tcp: ClientIo, peer: Peer, l: &ListenerRuntime, report: &mut SessionReport) {
    let limits = &l.config.limits;
    // Boxed: the handshake's and the connect's state is freed once they are done, so an
    // idle relayed session's task keeps only what the relay needs (bench: idle RSS).
    let Some(mut client) = Box::pin(super::handshake(tcp, l, report, Transport::Implicit)).await
    else {
        return;
    };

    let header = proxy_header(l.upstream.config.proxy_protocol, peer, report);
    let mut up = match Box::pin(upstream::connect(&l.upstream, &header)).await {
        Ok(up) => up,
        Err(e) => {
            let _ = write_reply(&mut client, &e.reply(&l.config.hostname)).await;
            let _ = client.shutdown().await;
            report.outcome = Outcome::UpstreamFailed(e.to_string());
            return;
        }
    };
    report.upstream_addr = Some(up.addr);
    // The greeting goes to the client unchanged (the MTA's own policy, e.g. a 554, included).
    if write_reply(&mut client, &up.greeting).await.is_err() {
        report.outcome = Outcome::Reset;
        return;
    }
    report.bytes_from_upstream = up.greeting.len() as u64;
    let mut smtp = SmtpStream::new(STARTTLS_IN_TLS);
    let r = relay::relay(
        &mut client,
        &mut up.stream,
        limits.idle_timeout,
        &mut smtp,
        Vec::new(),
        &l.config.hostname,
    )
    .await;
    super::finish_relay(report, r);
}
