//! The versioned wire format of a sealed payload (hand-written, big-endian):
//!
//! ```text
//! version u8 (= 1) | kind u8 (1 baseline, 2 prekey, 3 ratchet) | id_len u8 | client_msg_id
//! baseline: sender_identity[32] | ephemeral[32] | nonce[12]
//! prekey:   sender_identity[32] | base_key[32] | signed_prekey_id u32 | has_one_time u8 |
//!           one_time_prekey_id u32 | ratchet_key[32] | previous_chain_length u32 | n u32
//! ratchet:  ratchet_key[32] | previous_chain_length u32 | n u32
//! then:     AES-256-GCM ciphertext || tag[16]
//! ```
//!
//! Everything before the ciphertext (the "header") is part of the associated data, so no
//! header byte can change without the message failing to open.

use super::primitives::{KEY_BYTES, NONCE_BYTES, TAG_BYTES};
use super::{E2eError, E2eResult};

/// The protocol version this SDK writes and reads.
pub const PROTOCOL_VERSION: u8 = 1;
/// Longest `client_msg_id` an envelope carries.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 128;

/// Which construction sealed a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeKind {
    /// Static + ephemeral X25519 to the recipient's identity key; no session.
    Baseline = 1,
    /// The first messages of a session: X3DH parameters plus a ratchet header.
    PreKey = 2,
    /// A double-ratchet message of an established session.
    Ratchet = 3,
}

/// The double ratchet's per-message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RatchetHeader {
    /// The sender's current ratchet public key.
    pub ratchet_key: [u8; KEY_BYTES],
    /// Messages in the sender's previous sending chain.
    pub previous_chain_length: u32,
    /// This message's number in the current sending chain.
    pub n: u32,
}

/// X3DH parameters carried by the first messages of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreKeyHeader {
    /// The initiator's X25519 identity key.
    pub sender_identity: [u8; KEY_BYTES],
    /// The initiator's ephemeral ("base") key.
    pub base_key: [u8; KEY_BYTES],
    /// Which signed prekey of the recipient was used.
    pub signed_prekey_id: u32,
    /// Which one-time prekey was used, if any.
    pub one_time_prekey_id_opt: Option<u32>,
}

/// The kind-specific header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// See [`EnvelopeKind::Baseline`].
    Baseline {
        /// The sender's X25519 identity key.
        sender_identity: [u8; KEY_BYTES],
        /// A fresh ephemeral X25519 key.
        ephemeral: [u8; KEY_BYTES],
        /// A fresh random AES-GCM nonce.
        nonce: [u8; NONCE_BYTES],
    },
    /// See [`EnvelopeKind::PreKey`].
    PreKey {
        /// X3DH parameters.
        prekey: PreKeyHeader,
        /// Ratchet header.
        ratchet: RatchetHeader,
    },
    /// See [`EnvelopeKind::Ratchet`].
    Ratchet(RatchetHeader),
}

impl Header {
    /// Returns the kind of this header.
    pub fn kind(&self) -> EnvelopeKind {
        match self {
            Header::Baseline { .. } => EnvelopeKind::Baseline,
            Header::PreKey { .. } => EnvelopeKind::PreKey,
            Header::Ratchet(_) => EnvelopeKind::Ratchet,
        }
    }

    /// Returns the sender identity key the header names (baseline and prekey only).
    pub fn sender_identity_opt(&self) -> Option<[u8; KEY_BYTES]> {
        match self {
            Header::Baseline {
                sender_identity, ..
            } => Some(*sender_identity),
            Header::PreKey { prekey, .. } => Some(prekey.sender_identity),
            Header::Ratchet(_) => None,
        }
    }
}

/// A parsed envelope: the header bytes (associated data), the header and the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The sender's id for the message (bound to the ciphertext).
    pub client_msg_id: String,
    /// Kind-specific fields.
    pub header: Header,
    /// AES-256-GCM ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

impl Envelope {
    /// Returns the header bytes: everything before the ciphertext.
    ///
    /// # Errors
    /// [`E2eError::BadEnvelope`] when the `client_msg_id` is too long.
    pub fn header_bytes(client_msg_id: &str, header: &Header) -> E2eResult<Vec<u8>> {
        if client_msg_id.len() > MAX_CLIENT_MSG_ID_BYTES {
            return Err(E2eError::BadEnvelope("client_msg_id too long".into()));
        }
        let mut out = Vec::with_capacity(160);
        out.push(PROTOCOL_VERSION);
        out.push(header.kind() as u8);
        out.push(client_msg_id.len() as u8);
        out.extend_from_slice(client_msg_id.as_bytes());
        match header {
            Header::Baseline {
                sender_identity,
                ephemeral,
                nonce,
            } => {
                out.extend_from_slice(sender_identity);
                out.extend_from_slice(ephemeral);
                out.extend_from_slice(nonce);
            }
            Header::PreKey { prekey, ratchet } => {
                out.extend_from_slice(&prekey.sender_identity);
                out.extend_from_slice(&prekey.base_key);
                out.extend_from_slice(&prekey.signed_prekey_id.to_be_bytes());
                out.push(u8::from(prekey.one_time_prekey_id_opt.is_some()));
                out.extend_from_slice(&prekey.one_time_prekey_id_opt.unwrap_or(0).to_be_bytes());
                write_ratchet(&mut out, ratchet);
            }
            Header::Ratchet(ratchet) => write_ratchet(&mut out, ratchet),
        }
        Ok(out)
    }

    /// Returns `header_bytes || ciphertext`.
    pub fn encode_with(header_bytes: &[u8], ciphertext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(header_bytes.len() + ciphertext.len());
        out.extend_from_slice(header_bytes);
        out.extend_from_slice(ciphertext);
        out
    }

    /// Parses a payload; returns the envelope and the length of its header bytes.
    ///
    /// # Errors
    /// [`E2eError::UnsupportedVersion`] for another version, [`E2eError::BadEnvelope`] for
    /// anything malformed.
    pub fn decode(bytes: &[u8]) -> E2eResult<(Envelope, usize)> {
        let mut reader = Reader { bytes, at: 0 };
        let version = reader.u8()?;
        if version != PROTOCOL_VERSION {
            return Err(E2eError::UnsupportedVersion(version));
        }
        let kind = reader.u8()?;
        let id_len = reader.u8()? as usize;
        let client_msg_id = std::str::from_utf8(reader.take(id_len)?)
            .map_err(|_| E2eError::BadEnvelope("client_msg_id is not utf-8".into()))?
            .to_string();
        let header = match kind {
            1 => Header::Baseline {
                sender_identity: reader.array()?,
                ephemeral: reader.array()?,
                nonce: reader.array()?,
            },
            2 => {
                let sender_identity = reader.array()?;
                let base_key = reader.array()?;
                let signed_prekey_id = reader.u32()?;
                let has_one_time = reader.u8()?;
                let one_time_id = reader.u32()?;
                let one_time_prekey_id_opt = match has_one_time {
                    0 if one_time_id == 0 => None,
                    1 => Some(one_time_id),
                    _ => return Err(E2eError::BadEnvelope("bad one-time prekey flag".into())),
                };
                Header::PreKey {
                    prekey: PreKeyHeader {
                        sender_identity,
                        base_key,
                        signed_prekey_id,
                        one_time_prekey_id_opt,
                    },
                    ratchet: reader.ratchet()?,
                }
            }
            3 => Header::Ratchet(reader.ratchet()?),
            other => return Err(E2eError::BadEnvelope(format!("unknown kind {other}"))),
        };
        let header_len = reader.at;
        let ciphertext = bytes[header_len..].to_vec();
        if ciphertext.len() < TAG_BYTES {
            return Err(E2eError::BadEnvelope(
                "ciphertext shorter than a tag".into(),
            ));
        }
        Ok((
            Envelope {
                client_msg_id,
                header,
                ciphertext,
            },
            header_len,
        ))
    }
}

fn write_ratchet(out: &mut Vec<u8>, ratchet: &RatchetHeader) {
    out.extend_from_slice(&ratchet.ratchet_key);
    out.extend_from_slice(&ratchet.previous_chain_length.to_be_bytes());
    out.extend_from_slice(&ratchet.n.to_be_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> E2eResult<&'a [u8]> {
        let end = self
            .at
            .checked_add(count)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| E2eError::BadEnvelope("truncated envelope".into()))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> E2eResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> E2eResult<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn array<const N: usize>(&mut self) -> E2eResult<[u8; N]> {
        self.take(N)?
            .try_into()
            .map_err(|_| E2eError::BadEnvelope("truncated envelope".into()))
    }

    fn ratchet(&mut self) -> E2eResult<RatchetHeader> {
        Ok(RatchetHeader {
            ratchet_key: self.array()?,
            previous_chain_length: self.u32()?,
            n: self.u32()?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_kind_round_trips() {
        let ratchet = RatchetHeader {
            ratchet_key: [3; 32],
            previous_chain_length: 7,
            n: 9,
        };
        for header in [
            Header::Baseline {
                sender_identity: [1; 32],
                ephemeral: [2; 32],
                nonce: [4; 12],
            },
            Header::PreKey {
                prekey: PreKeyHeader {
                    sender_identity: [1; 32],
                    base_key: [5; 32],
                    signed_prekey_id: 11,
                    one_time_prekey_id_opt: Some(12),
                },
                ratchet,
            },
            Header::PreKey {
                prekey: PreKeyHeader {
                    sender_identity: [1; 32],
                    base_key: [5; 32],
                    signed_prekey_id: 11,
                    one_time_prekey_id_opt: None,
                },
                ratchet,
            },
            Header::Ratchet(ratchet),
        ] {
            let header_bytes = Envelope::header_bytes("abc", &header).unwrap();
            let bytes = Envelope::encode_with(&header_bytes, &[9; 20]);
            let (envelope, header_len) = Envelope::decode(&bytes).unwrap();
            assert_eq!(header_len, header_bytes.len());
            assert_eq!(envelope.header, header);
            assert_eq!(envelope.client_msg_id, "abc");
            assert_eq!(envelope.ciphertext, vec![9; 20]);
            for cut in 0..header_bytes.len() + TAG_BYTES {
                assert!(Envelope::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn other_versions_and_kinds_are_refused() {
        let header_bytes = Envelope::header_bytes(
            "x",
            &Header::Ratchet(RatchetHeader {
                ratchet_key: [0; 32],
                previous_chain_length: 0,
                n: 0,
            }),
        )
        .unwrap();
        let mut bytes = Envelope::encode_with(&header_bytes, &[0; 16]);
        bytes[0] = 2;
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(E2eError::UnsupportedVersion(2))
        ));
        bytes[0] = 1;
        bytes[1] = 9;
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(E2eError::BadEnvelope(_))
        ));
    }
}
