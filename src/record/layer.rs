//! `RecordLayer`: the TLS 1.3 record protocol of one established session (RFC 8446 §5),
//! with no buffer of its own except the tail of a partial record while one is pending.
//!
//! - **Open** (`open`): the caller reads into its buffer after the restored tail; every
//!   complete record is authenticated and decrypted in place (nonce = IV xor sequence
//!   number, AAD = the record header), its padding stripped, and application data packed
//!   to the front of the buffer. Nothing of a record is released before its tag is checked.
//! - **Seal** (`seal`): plaintext becomes records of at most 2^14 bytes appended to the
//!   caller's output buffer; a KeyUpdate we owe goes first.
//! - **KeyUpdate** (§4.6.3): a client's KeyUpdate switches the receive key at the record
//!   boundary it must end on; `update_requested` makes us answer with our own KeyUpdate
//!   before the next record we send, then switch the send key. Before the send sequence
//!   reaches the suite's confidentiality limit we update our key ourselves.
//! - **Alerts**: close_notify ends the read side cleanly; user_canceled is ignored (it
//!   precedes a close_notify); any other alert ends the session. Whatever we refuse ends
//!   with the fatal alert §6.2 names for it (`Fatal::Send`).

use std::fmt;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

pub(crate) const HEADER: usize = 5;
pub(crate) const TAG: usize = 16;
/// RFC 8446 §5.1: a record's plaintext is at most 2^14 bytes.
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;
/// RFC 8446 §5.2: `TLSCiphertext.length` is at most 2^14 + 256.
pub(crate) const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// The largest record on the wire, header included.
pub(crate) const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;

const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPLICATION_DATA: u8 = 23;
const HS_KEY_UPDATE: u8 = 24;
/// A KeyUpdate message: type, 24-bit length 1, `request_update`.
const KEY_UPDATE_LEN: usize = 5;

/// Alert descriptions (RFC 8446 §6).
pub(crate) mod alert {
    pub(crate) const CLOSE_NOTIFY: u8 = 0;
    pub(crate) const UNEXPECTED_MESSAGE: u8 = 10;
    pub(crate) const BAD_RECORD_MAC: u8 = 20;
    pub(crate) const RECORD_OVERFLOW: u8 = 22;
    pub(crate) const ILLEGAL_PARAMETER: u8 = 47;
    pub(crate) const DECODE_ERROR: u8 = 50;
    pub(crate) const INTERNAL_ERROR: u8 = 80;
    pub(crate) const USER_CANCELED: u8 = 90;
}

/// Why a session's record layer stopped; the session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fatal {
    /// We refuse what the peer sent and owe it this fatal alert.
    Send { alert: u8, why: &'static str },
    /// The peer sent this fatal alert.
    Received(u8),
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Send { alert, why } => write!(f, "{why} (sent alert {alert})"),
            Self::Received(alert) => write!(f, "received fatal alert {alert}"),
        }
    }
}

impl std::error::Error for Fatal {}

const fn refuse(alert: u8, why: &'static str) -> Fatal {
    Fatal::Send { alert, why }
}

/// One direction's traffic key material, as rustls derives it.
pub(crate) struct Keys {
    algorithm: &'static aead::Algorithm,
    key: ConnectionTrafficSecrets,
}

impl Keys {
    pub(crate) fn new(secrets: ConnectionTrafficSecrets) -> Result<Self, Fatal> {
        let algorithm = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { .. } => &aead::AES_128_GCM,
            ConnectionTrafficSecrets::Aes256Gcm { .. } => &aead::AES_256_GCM,
            ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => &aead::CHACHA20_POLY1305,
            _ => return Err(refuse(alert::INTERNAL_ERROR, "unsupported cipher suite")),
        };
        Ok(Self {
            algorithm,
            key: secrets,
        })
    }

    fn into_direction(self, seq: u64) -> Result<Direction, Fatal> {
        let (_, iv) = self.parts()?;
        let iv: [u8; aead::NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| refuse(alert::INTERNAL_ERROR, "traffic IV has the wrong length"))?;
        let mut direction = Direction {
            key: None,
            keys: self,
            iv,
            seq,
        };
        direction.key()?;
        Ok(direction)
    }

    fn parts(
        &self,
    ) -> Result<
        (
            &rustls::crypto::cipher::AeadKey,
            &rustls::crypto::cipher::Iv,
        ),
        Fatal,
    > {
        match &self.key {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
            _ => Err(refuse(alert::INTERNAL_ERROR, "unsupported cipher suite")),
        }
    }

    /// The AEAD context (aws-lc's expanded key and GHASH tables, about 600 bytes).
    fn context(&self) -> Result<LessSafeKey, Fatal> {
        let (key, _) = self.parts()?;
        let unbound = UnboundKey::new(self.algorithm, key.as_ref())
            .map_err(|_| refuse(alert::INTERNAL_ERROR, "traffic key rejected"))?;
        Ok(LessSafeKey::new(unbound))
    }
}

/// Derives the next traffic keys on a KeyUpdate: rustls' `KernelConnection` in the proxy,
/// a stand-in in the fuzz target (which has no handshake).
pub(crate) trait Rekey: Send + Sync {
    fn next_rx(&mut self) -> Result<Keys, Fatal>;
    fn next_tx(&mut self) -> Result<Keys, Fatal>;
}

impl Rekey for rustls::kernel::KernelConnection<rustls::server::ServerConnectionData> {
    fn next_rx(&mut self) -> Result<Keys, Fatal> {
        let (_, secrets) = self
            .update_rx_secret()
            .map_err(|_| refuse(alert::INTERNAL_ERROR, "key update failed"))?;
        Keys::new(secrets)
    }

    fn next_tx(&mut self) -> Result<Keys, Fatal> {
        let (_, secrets) = self
            .update_tx_secret()
            .map_err(|_| refuse(alert::INTERNAL_ERROR, "key update failed"))?;
        Keys::new(secrets)
    }
}

struct Direction {
    /// Built from `keys` when needed; dropped while the session is idle (`evict_keys`).
    key: Option<LessSafeKey>,
    keys: Keys,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn key(&mut self) -> Result<&LessSafeKey, Fatal> {
        let key = match self.key.take() {
            Some(key) => key,
            None => self.keys.context()?,
        };
        Ok(self.key.insert(key))
    }

    /// RFC 8446 §5.3: the sequence number, left-padded to the IV's length, xor the IV.
    fn nonce(&self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        Nonce::assume_unique_for_key(nonce)
    }

    fn advance(&mut self) -> Result<(), Fatal> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or(refuse(alert::INTERNAL_ERROR, "sequence number exhausted"))?;
        Ok(())
    }
}

/// What one `open` released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Application data written to the front of `out`.
    pub direct: usize,
    /// Application data now at the front of the buffer (after what went to `out`).
    pub plain: usize,
    /// The peer's close_notify arrived: nothing more will be read.
    pub closed: bool,
}

/// The record protocol state of one session.
pub(crate) struct RecordLayer {
    rx: Direction,
    tx: Direction,
    rekey: Box<dyn Rekey>,
    /// The incomplete record at the end of the last read; empty (unallocated) otherwise.
    tail: Vec<u8>,
    /// A KeyUpdate split across records, until its last byte arrives (at most 4 bytes).
    handshake: Vec<u8>,
    owe_key_update: bool,
    read_closed: bool,
    /// Records we send under one key before updating it ourselves.
    tx_limit: u64,
}

impl fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordLayer")
            .field("rx_seq", &self.rx.seq)
            .field("tx_seq", &self.tx.seq)
            .field("tail", &self.tail.len())
            .field("read_closed", &self.read_closed)
            // Whether each AEAD context is built (never the keys themselves).
            .field("contexts", &(self.rx.key.is_some(), self.tx.key.is_some()))
            .finish_non_exhaustive()
    }
}

impl RecordLayer {
    /// `rx` and `tx` with their next sequence numbers; `tx_limit` is the suite's
    /// confidentiality limit (records per key).
    pub(crate) fn new(
        rx: (u64, Keys),
        tx: (u64, Keys),
        rekey: Box<dyn Rekey>,
        tx_limit: u64,
    ) -> Result<Self, Fatal> {
        Ok(Self {
            rx: rx.1.into_direction(rx.0)?,
            tx: tx.1.into_direction(tx.0)?,
            rekey,
            tail: Vec::new(),
            handshake: Vec::new(),
            owe_key_update: false,
            read_closed: false,
            // Well before the limit: a whole write may be sealed after the check.
            tx_limit: tx_limit.saturating_sub(1 << 12).max(1),
        })
    }

    /// Bytes of a partial record kept from the last read; `open` expects the new bytes
    /// after this many bytes of room at the front of its buffer.
    pub(crate) fn tail_len(&self) -> usize {
        self.tail.len()
    }

    /// Drops both AEAD contexts (rebuilt from the kept key on the next record, under a
    /// microsecond): an idle session then holds about 1.2 KiB less.
    pub(crate) fn evict_keys(&mut self) {
        self.rx.key = None;
        self.tx.key = None;
    }

    /// Whether the peer's close_notify arrived.
    pub(crate) fn read_closed(&self) -> bool {
        self.read_closed
    }

    /// The peer's close_notify came with the end of the handshake.
    pub(crate) fn set_read_closed(&mut self) {
        self.read_closed = true;
    }

    /// Ciphertext read past the handshake: the start of the first record.
    pub(crate) fn set_tail(&mut self, tail: Vec<u8>) -> Result<(), Fatal> {
        if tail.len() >= MAX_RECORD {
            return Err(refuse(alert::RECORD_OVERFLOW, "record too large"));
        }
        self.tail = if tail.is_empty() { Vec::new() } else { tail };
        Ok(())
    }

    /// Opens every complete record in `buf`, whose first `tail_len()` bytes are room for
    /// the kept tail (copied in here) and whose rest was just read. Application data is
    /// decrypted straight into `out` while the next record fits there (`Opened::direct`),
    /// then in place, packed at the front of `buf` (`Opened::plain`); an incomplete last
    /// record is kept for the next call. On an error, nothing written is application data.
    pub(crate) fn open(&mut self, buf: &mut [u8], out: &mut [u8]) -> Result<Opened, Fatal> {
        let kept = self.tail.len();
        buf[..kept].copy_from_slice(&self.tail);
        let mut read = 0;
        let mut direct = 0;
        let mut plain = 0;
        while !self.read_closed {
            let rest = &buf[read..];
            let Some(header) = rest.get(..HEADER) else {
                break;
            };
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != CT_APPLICATION_DATA {
                return Err(refuse(
                    alert::UNEXPECTED_MESSAGE,
                    "record type other than application_data after the handshake",
                ));
            }
            if header[1] != 0x03 {
                return Err(refuse(alert::DECODE_ERROR, "bad record version"));
            }
            if len > MAX_CIPHERTEXT {
                return Err(refuse(alert::RECORD_OVERFLOW, "record too large"));
            }
            if len < TAG {
                return Err(refuse(alert::BAD_RECORD_MAC, "record shorter than its tag"));
            }
            if rest.len() < HEADER + len {
                break;
            }
            let aad: [u8; HEADER] = [header[0], header[1], header[2], header[3], header[4]];
            let start = read + HEADER;
            let inner = len - TAG;
            // Straight into the caller's buffer when it fits and nothing went in place yet
            // (order); else in place.
            let to_out = plain == 0 && out.len() - direct >= inner;
            let opened: &mut [u8] = if to_out {
                let (ciphertext, tag) = buf[start..start + len].split_at(inner);
                let dst = &mut out[direct..direct + inner];
                let nonce = self.rx.nonce();
                if self
                    .rx
                    .key()?
                    .open_separate_gather(nonce, Aad::from(aad), ciphertext, tag, dst)
                    .is_err()
                {
                    dst.fill(0);
                    return Err(refuse(
                        alert::BAD_RECORD_MAC,
                        "record failed authentication",
                    ));
                }
                dst
            } else {
                let body = &mut buf[start..start + len];
                let nonce = self.rx.nonce();
                self.rx
                    .key()?
                    .open_in_place(nonce, Aad::from(aad), body)
                    .map_err(|_| refuse(alert::BAD_RECORD_MAC, "record failed authentication"))?
            };
            // RFC 8446 §5.4: the content type is the last non-zero byte; zeros after it
            // are padding.
            let Some(end) = opened.iter().rposition(|&b| b != 0) else {
                return Err(refuse(
                    alert::UNEXPECTED_MESSAGE,
                    "record without content type",
                ));
            };
            if end > MAX_PLAINTEXT {
                return Err(refuse(alert::RECORD_OVERFLOW, "record plaintext too large"));
            }
            let content_type = opened[end];
            self.rx.advance()?;
            match content_type {
                CT_APPLICATION_DATA => {
                    if !self.handshake.is_empty() {
                        return Err(refuse(
                            alert::UNEXPECTED_MESSAGE,
                            "application data inside a handshake message",
                        ));
                    }
                    if to_out {
                        // The content type and padding after it are overwritten next.
                        direct += end;
                    } else {
                        buf.copy_within(start..start + end, plain);
                        plain += end;
                    }
                }
                CT_HANDSHAKE => self.handshake_message(&opened[..end])?,
                CT_ALERT => self.alert(&opened[..end])?,
                _ => {
                    return Err(refuse(alert::UNEXPECTED_MESSAGE, "unknown content type"));
                }
            }
            read += HEADER + len;
        }
        let rest = &buf[read..];
        if self.read_closed || rest.is_empty() {
            // Bytes after close_notify are ignored, as rustls does.
            self.tail = Vec::new();
        } else {
            self.tail.clear();
            self.tail.extend_from_slice(rest);
        }
        Ok(Opened {
            direct,
            plain,
            closed: self.read_closed,
        })
    }

    fn handshake_message(&mut self, content: &[u8]) -> Result<(), Fatal> {
        if content.is_empty() {
            return Err(refuse(alert::UNEXPECTED_MESSAGE, "empty handshake record"));
        }
        let have = self.handshake.len();
        if have + content.len() > KEY_UPDATE_LEN {
            // Longer than a KeyUpdate, or a KeyUpdate followed by more in its record.
            return Err(self.refuse_handshake(content));
        }
        self.handshake.extend_from_slice(content);
        let message = &self.handshake;
        if message[0] != HS_KEY_UPDATE {
            return Err(refuse(
                alert::UNEXPECTED_MESSAGE,
                "handshake message other than KeyUpdate after the handshake",
            ));
        }
        if message.len() >= 4 && message[1..4] != [0, 0, 1] {
            return Err(refuse(alert::DECODE_ERROR, "KeyUpdate of the wrong length"));
        }
        if message.len() < KEY_UPDATE_LEN {
            return Ok(());
        }
        let requested = match message[4] {
            0 => false,
            1 => true,
            _ => {
                return Err(refuse(
                    alert::ILLEGAL_PARAMETER,
                    "KeyUpdate request_update not 0 or 1",
                ));
            }
        };
        self.handshake = Vec::new();
        // §5.1: the KeyUpdate ended this record (checked above), so the key changes at a
        // record boundary.
        let keys = self.rekey.next_rx()?;
        self.rx = keys.into_direction(0)?;
        self.owe_key_update |= requested;
        Ok(())
    }

    /// The alert for a handshake fragment that cannot be (only) a KeyUpdate.
    fn refuse_handshake(&self, content: &[u8]) -> Fatal {
        let first = self.handshake.first().or(content.first()).copied();
        if first == Some(HS_KEY_UPDATE) {
            refuse(
                alert::UNEXPECTED_MESSAGE,
                "KeyUpdate not aligned with the end of its record",
            )
        } else {
            refuse(
                alert::UNEXPECTED_MESSAGE,
                "handshake message other than KeyUpdate after the handshake",
            )
        }
    }

    fn alert(&mut self, content: &[u8]) -> Result<(), Fatal> {
        let [_level, description] = content else {
            return Err(refuse(alert::DECODE_ERROR, "alert of the wrong length"));
        };
        if !self.handshake.is_empty() {
            return Err(refuse(
                alert::UNEXPECTED_MESSAGE,
                "alert inside a handshake message",
            ));
        }
        match *description {
            alert::CLOSE_NOTIFY => self.read_closed = true,
            // RFC 8446 §6.1: followed by close_notify; nothing to do until then.
            alert::USER_CANCELED => {}
            other => return Err(Fatal::Received(other)),
        }
        Ok(())
    }

    /// Whether a record we owe (a KeyUpdate answer) waits for the next write.
    pub(crate) fn owes_record(&self) -> bool {
        self.owe_key_update
    }

    /// Appends what we owe the peer (a KeyUpdate answer) to `out`.
    pub(crate) fn seal_owed(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        if self.owe_key_update {
            self.owe_key_update = false;
            self.update_tx(out)?;
        }
        Ok(())
    }

    /// Seals `plain` as application data records appended to `out`.
    pub(crate) fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), Fatal> {
        self.seal_owed(out)?;
        out.reserve(plain.len() + plain.len().div_ceil(MAX_PLAINTEXT) * (HEADER + 1 + TAG));
        for chunk in plain.chunks(MAX_PLAINTEXT) {
            if self.tx.seq >= self.tx_limit {
                self.update_tx(out)?;
            }
            self.seal_record(CT_APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Seals an alert: close_notify as a warning, anything else as fatal.
    pub(crate) fn seal_alert(&mut self, description: u8, out: &mut Vec<u8>) -> Result<(), Fatal> {
        let level = if description == alert::CLOSE_NOTIFY {
            1
        } else {
            2
        };
        self.seal_record(CT_ALERT, &[level, description], out)
    }

    /// Sends KeyUpdate(update_not_requested) under the current key, then switches to the next.
    fn update_tx(&mut self, out: &mut Vec<u8>) -> Result<(), Fatal> {
        self.seal_record(CT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 0], out)?;
        let keys = self.rekey.next_tx()?;
        self.tx = keys.into_direction(0)?;
        Ok(())
    }

    fn seal_record(
        &mut self,
        content_type: u8,
        content: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Fatal> {
        let start = out.len();
        out.extend_from_slice(&[CT_APPLICATION_DATA, 0x03, 0x03, 0, 0]);
        out.extend_from_slice(content);
        out.push(content_type);
        self.seal_from(start, out)
    }

    /// Seals `out[start + HEADER..]` (the inner plaintext) as one record whose header
    /// waits at `out[start..]`.
    fn seal_from(&mut self, start: usize, out: &mut Vec<u8>) -> Result<(), Fatal> {
        let len = out.len() - start - HEADER + TAG;
        let [hi, lo] = u16::try_from(len)
            .map_err(|_| refuse(alert::INTERNAL_ERROR, "record too large to seal"))?
            .to_be_bytes();
        out[start + 3] = hi;
        out[start + 4] = lo;
        let header = [CT_APPLICATION_DATA, 0x03, 0x03, hi, lo];
        let nonce = self.tx.nonce();
        let tag = self
            .tx
            .key()?
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER..])
            .map_err(|_| refuse(alert::INTERNAL_ERROR, "sealing failed"))?;
        out.extend_from_slice(tag.as_ref());
        self.tx.advance()
    }
}

/// A peer for tests and the fuzz target: fixed AES-256-GCM keys and a stand-in key
/// schedule, so records of any shape can be sealed for the layer under test.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod peer {
    use super::{Fatal, Keys, RecordLayer, Rekey};
    use rustls::ConnectionTrafficSecrets;
    use rustls::crypto::cipher::{AeadKey, Iv};

    /// Generation `n` of the keys one direction uses (0: client to server).
    fn keys(direction: u8, generation: u8) -> Keys {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([direction.wrapping_mul(31) ^ generation; 32]),
            iv: Iv::new([generation.wrapping_add(direction); 12]),
        };
        Keys::new(secrets).expect("AES-256-GCM")
    }

    struct Ladder {
        rx: (u8, u8),
        tx: (u8, u8),
    }

    impl Rekey for Ladder {
        fn next_rx(&mut self) -> Result<Keys, Fatal> {
            self.rx.1 = self.rx.1.wrapping_add(1);
            Ok(keys(self.rx.0, self.rx.1))
        }

        fn next_tx(&mut self) -> Result<Keys, Fatal> {
            self.tx.1 = self.tx.1.wrapping_add(1);
            Ok(keys(self.tx.0, self.tx.1))
        }
    }

    /// (client, server), each sealing what the other opens; `limit` is the server's
    /// records per key.
    pub(crate) fn pair(limit: u64) -> (RecordLayer, RecordLayer) {
        let layer = |rx: u8, tx: u8, limit| {
            let ladder = Ladder {
                rx: (rx, 0),
                tx: (tx, 0),
            };
            RecordLayer::new((0, keys(rx, 0)), (0, keys(tx, 0)), Box::new(ladder), limit)
                .expect("fixed keys")
        };
        (layer(1, 0, u64::MAX), layer(0, 1, limit))
    }

    impl RecordLayer {
        /// Records sealed under one key before we update it ourselves.
        #[cfg(test)]
        pub(crate) fn set_tx_limit(&mut self, records: u64) {
            self.tx_limit = records;
        }

        /// Seals `inner` (content, content type, padding: anything) as one record.
        pub(crate) fn seal_inner(&mut self, inner: &[u8], out: &mut Vec<u8>) {
            let start = out.len();
            out.extend_from_slice(&[super::CT_APPLICATION_DATA, 0x03, 0x03, 0, 0]);
            out.extend_from_slice(inner);
            self.seal_from(start, out).expect("sealable");
        }

        /// Opens one whole record under the current receive key and returns its inner
        /// plaintext (content, content type, padding), as the peer's own decryption sees it.
        #[cfg(test)]
        pub(crate) fn open_inner(&mut self, record: &[u8]) -> Vec<u8> {
            let (header, body) = record.split_at(super::HEADER);
            let header: [u8; super::HEADER] = header.try_into().expect("a header");
            let mut inner = body.to_vec();
            let nonce = self.rx.nonce();
            let len = self
                .rx
                .key()
                .expect("fixed keys")
                .open_in_place(nonce, super::Aad::from(header), &mut inner)
                .expect("sealed under the current key")
                .len();
            inner.truncate(len);
            self.rx.advance().expect("sequence");
            inner
        }

        /// Sends a KeyUpdate and switches to the next send key, as a client would.
        pub(crate) fn seal_key_update(&mut self, requested: bool, out: &mut Vec<u8>) {
            let message = [super::HS_KEY_UPDATE, 0, 0, 1, u8::from(requested)];
            self.seal_record(super::CT_HANDSHAKE, &message, out)
                .expect("sealable");
            let keys = self.rekey.next_tx().expect("ladder");
            self.tx = keys.into_direction(0).expect("fixed keys");
        }
    }
}
