//! Implicit TLS (port 465): handshake first, then the upstream with a PROXY header carrying
//! the TLS facts, its greeting forwarded unchanged, then the relay.

use super::ClientStream;
use super::report::{Outcome, Transport};
use super::{Ended, Finished, Session, write_reply};
use crate::smtp::stream::Path;

pub(super) async fn run<S>(session: Session<S>) -> Result<Finished, Finished>
where
    S: ClientStream,
{
    let session = Box::pin(session.into_tls(Transport::Implicit)).await?;
    let (mut session, mut up) = Box::pin(session.connect()).await?;
    // The greeting goes to the client unchanged (the MTA's own policy, e.g. a 554, included).
    if write_reply(&mut session.io, &up.greeting).await.is_err() {
        return Err(session.end(Ended::silent(Outcome::Reset)));
    }
    session.facts.bytes_from_upstream = up.greeting.len() as u64;
    // Given back: `up` lives as long as the relay, and an idle session should not hold it.
    up.greeting = Vec::new();
    let ended = session.relay(&mut up, Path::Tls, Vec::new()).await;
    Ok(session.end(ended))
}
