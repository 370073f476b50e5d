//! The TLS 1.3 server handshake on rustls' unbuffered connection, sans IO, ending in a
//! `RecordLayer` (`dangerous_into_kernel_connection`). Deliberately small and on its own:
//! rustls 0.24 (caller-owned buffers, the kernel connection kept) replaces this file and
//! nothing else.
//!
//! The caller appends what it reads to `incoming()`, writes out `outgoing()` when `step`
//! says `Send`, and stops at `Done`. `Tls12` means the client and the config agreed on
//! TLS 1.2: nothing was sent yet, and the caller runs the ClientHello through tokio-rustls
//! instead (TLS 1.2 records stay with rustls; README "TLS").

use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError};
use rustls::{CommonState, ProtocolVersion, ServerConfig};

use crate::record::{Keys, RecordLayer};

/// Plaintext the client may send along with its Finished before we take over (SMTP
/// pipelining at most; more is refused).
const MAX_EARLY_PLAINTEXT: usize = 64 * 1024;

/// What the caller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Write `outgoing()` to the client, then clear it.
    Send,
    /// Read from the client into `incoming()`.
    Read,
    /// The handshake is complete: `finish`.
    Done,
    /// TLS 1.2 was negotiated; nothing was sent.
    Tls12,
}

/// An established session handed over from rustls.
#[derive(Debug)]
pub(crate) struct Established {
    pub layer: RecordLayer,
    /// Plaintext of records that arrived with the client's Finished.
    pub early: Vec<u8>,
}

pub(crate) struct Handshake {
    conn: UnbufferedServerConnection,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    early: Vec<u8>,
    version_known: bool,
    peer_closed: bool,
}

impl Handshake {
    /// Starts with the bytes already read (the ClientHello).
    pub(crate) fn new(config: Arc<ServerConfig>, hello: Vec<u8>) -> Result<Self, rustls::Error> {
        Ok(Self {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: hello,
            outgoing: Vec::new(),
            early: Vec::new(),
            version_known: false,
            peer_closed: false,
        })
    }

    pub(crate) fn incoming(&mut self) -> &mut Vec<u8> {
        &mut self.incoming
    }

    pub(crate) fn outgoing(&mut self) -> &mut Vec<u8> {
        &mut self.outgoing
    }

    /// The connection's facts (version, suite, ALPN, client certificate).
    pub(crate) fn common(&self) -> &CommonState {
        &self.conn
    }

    /// Advances until the caller has to act. On an error, the alert rustls owes the client
    /// is in `outgoing()`.
    pub(crate) fn step(&mut self) -> Result<Step, rustls::Error> {
        loop {
            let status = self.conn.process_tls_records(&mut self.incoming);
            let discard = status.discard;
            let mut next = None;
            let mut check = false;
            let mut closed = false;
            match status.state {
                Err(e) => {
                    self.incoming.drain(..discard);
                    self.queue_alert();
                    return Err(e);
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut self.outgoing, |buf| data.encode(buf))?;
                }
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    check = true;
                    next = Some(Step::Send);
                }
                Ok(ConnectionState::BlockedHandshake) => next = Some(Step::Read),
                Ok(ConnectionState::WriteTraffic(_)) => check = true,
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        if self.early.len() + record.payload.len() > MAX_EARLY_PLAINTEXT {
                            return Err(rustls::Error::General(
                                "too much data before the handshake completed".into(),
                            ));
                        }
                        self.early.extend_from_slice(record.payload);
                    }
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => closed = true,
                Ok(_) => {
                    return Err(rustls::Error::General(
                        "unexpected state during the handshake".into(),
                    ));
                }
            }
            self.incoming.drain(..discard);
            if closed {
                // close_notify right after the client's Finished (a sender that rejects
                // our certificate once the handshake is done): an established session
                // whose read side has ended.
                if self.conn.is_handshaking() {
                    return Err(rustls::Error::General(
                        "peer closed the connection during the handshake".into(),
                    ));
                }
                self.peer_closed = true;
                return Ok(Step::Done);
            }
            if check && !self.version_known {
                // The first flight is encoded but not yet sent: the last moment to leave.
                self.version_known = true;
                if self.conn.protocol_version() == Some(ProtocolVersion::TLSv1_2) {
                    return Ok(Step::Tls12);
                }
            }
            if next.is_none() && check {
                // WriteTraffic: the server's flight is out; done once the client's
                // Finished arrived.
                next = Some(if self.conn.is_handshaking() {
                    Step::Read
                } else {
                    Step::Done
                });
            }
            if let Some(step) = next {
                return Ok(step);
            }
        }
    }

    /// After an error: whatever alert rustls queued, encoded into `outgoing`.
    fn queue_alert(&mut self) {
        for _ in 0..4 {
            let status = self.conn.process_tls_records(&mut self.incoming);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    if encode(&mut self.outgoing, |buf| data.encode(buf)).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(data)) => data.done(),
                _ => return,
            }
            if status.discard > 0 {
                return;
            }
        }
    }

    /// Hands the session over: the traffic secrets become our record layer; ciphertext
    /// read past the handshake becomes its first tail.
    pub(crate) fn finish(self) -> Result<Established, rustls::Error> {
        let (secrets, kernel) = self.conn.dangerous_into_kernel_connection()?;
        let limit = kernel
            .negotiated_cipher_suite()
            .tls13()
            .map(|s| s.common.confidentiality_limit)
            .ok_or(rustls::Error::General("not a TLS 1.3 session".into()))?;
        let keys = |s| Keys::new(s).map_err(|e| rustls::Error::General(e.to_string()));
        let rx = (secrets.rx.0, keys(secrets.rx.1)?);
        let tx = (secrets.tx.0, keys(secrets.tx.1)?);
        let mut layer = RecordLayer::new(rx, tx, Box::new(kernel), limit)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if self.peer_closed {
            layer.set_read_closed();
        } else {
            layer
                .set_tail(self.incoming)
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        }
        Ok(Established {
            layer,
            early: self.early,
        })
    }
}

/// Appends one encoded record to `out`, growing it as rustls asks.
fn encode(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    let mut room = 4096;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size }))
                if required_size > room =>
            {
                room = required_size;
            }
            Err(e) => {
                out.truncate(start);
                return Err(rustls::Error::General(e.to_string()));
            }
        }
    }
}
