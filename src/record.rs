//! The TLS 1.3 record layer of established client sessions, sans IO: after rustls has run
//! the handshake (`tls::handshake`) and handed over the traffic secrets, records are
//! opened and sealed here with aws-lc-rs AEAD, in place, in a buffer the caller owns (one
//! per thread), and rustls' `KernelConnection` stays in charge of what only it can do:
//! deriving the next traffic secret on a KeyUpdate.
//!
//! Written by hand because this *is* the product's hot path (PERF-NOTES §1.3, step 7):
//! rustls 0.23 reads at most 4 KiB per `read_tls`, copies each record's plaintext into a
//! fresh Vec and keeps a 4 KiB receive buffer in every idle session, and no setting changes
//! that. The rules implemented are RFC 8446 §5 (record protocol) and §4.6.3 (KeyUpdate),
//! nothing more: TLS 1.2 sessions stay on tokio-rustls (README, "TLS").
//!
//! - `layer` — `RecordLayer`: keys, sequence numbers, open in place, seal, alerts, KeyUpdate;
//! - `stream` — `OwnTls`: the `AsyncRead`/`AsyncWrite` façade over a socket.

pub(crate) mod layer;
pub(crate) mod stream;

pub(crate) use layer::{Keys, RecordLayer};
pub(crate) use stream::OwnTls;

#[cfg(test)]
mod tests;
