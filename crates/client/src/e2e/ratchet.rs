//! The double ratchet, as Signal specifies it
//! (<https://signal.org/docs/specifications/doubleratchet/>), with X25519, HKDF-SHA256 and
//! HMAC-SHA256:
//!
//! - `KDF_RK(rk, dh) = HKDF-SHA256(salt = rk, ikm = dh, info = "bluetick/v1/ratchet")`, 64
//!   bytes split into the new root key and a chain key;
//! - `KDF_CK(ck)`: message key `HMAC-SHA256(ck, 0x01)`, next chain key `HMAC-SHA256(ck, 0x02)`;
//! - a message key becomes an AES-256-GCM key and nonce through
//!   `HKDF-SHA256(salt = 0^32, ikm = mk, info = "bluetick/v1/message")` (44 bytes); each
//!   message key seals exactly one message.
//!
//! Keys of skipped messages are kept (at most [`MAX_SKIP`] per step and
//! [`MAX_SKIPPED_KEYS`] in all, oldest dropped first) so out-of-order messages open; a key is
//! erased once used, and every chain, root and message key is wiped from memory when
//! dropped. Callers decrypt on a clone and keep it only when the message opened, so a forged
//! message cannot move the state.

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::envelope::RatchetHeader;
use super::keys::KeyPair;
use super::primitives::{KEY_BYTES, NONCE_BYTES, dh, hkdf_sha256, hmac_sha256};
use super::{E2eError, E2eResult};

/// Most message keys one message may make the receiver skip.
pub const MAX_SKIP: u32 = 1000;
/// Most skipped message keys a session keeps (oldest are dropped first).
pub const MAX_SKIPPED_KEYS: usize = 2000;

/// A 32-byte secret, wiped on drop.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct Secret([u8; KEY_BYTES]);

/// The key of one skipped message.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SkippedKey {
    ratchet_key: [u8; KEY_BYTES],
    n: u32,
    message_key: [u8; KEY_BYTES],
}

/// The AES-256-GCM key and nonce of one message.
pub struct MessageKeys {
    /// AES-256 key (wiped on drop).
    pub key: Zeroizing<[u8; KEY_BYTES]>,
    /// Nonce; unique because each message key is used once.
    pub nonce: [u8; NONCE_BYTES],
}

impl std::fmt::Debug for MessageKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKeys(..)")
    }
}

/// Returns the AES-256-GCM key and nonce of message key `mk`.
fn message_keys(mk: &[u8; KEY_BYTES]) -> E2eResult<MessageKeys> {
    let mut okm = Zeroizing::new([0u8; KEY_BYTES + NONCE_BYTES]);
    hkdf_sha256(&[0u8; 32], mk, b"bluetick/v1/message", &mut okm[..])?;
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    key.copy_from_slice(&okm[..KEY_BYTES]);
    let mut nonce = [0u8; NONCE_BYTES];
    nonce.copy_from_slice(&okm[KEY_BYTES..]);
    Ok(MessageKeys { key, nonce })
}

/// `KDF_RK`: returns (root key, chain key).
fn kdf_rk(root_key: &[u8; KEY_BYTES], dh_out: &[u8; KEY_BYTES]) -> E2eResult<(Secret, Secret)> {
    let mut okm = Zeroizing::new([0u8; 64]);
    hkdf_sha256(root_key, dh_out, b"bluetick/v1/ratchet", &mut okm[..])?;
    let mut root = Secret([0; KEY_BYTES]);
    let mut chain = Secret([0; KEY_BYTES]);
    root.0.copy_from_slice(&okm[..32]);
    chain.0.copy_from_slice(&okm[32..]);
    Ok((root, chain))
}

/// `KDF_CK`: returns (next chain key, message key).
fn kdf_ck(chain_key: &[u8; KEY_BYTES]) -> E2eResult<(Secret, Zeroizing<[u8; KEY_BYTES]>)> {
    let message_key = hmac_sha256(chain_key, &[0x01])?;
    let next = hmac_sha256(chain_key, &[0x02])?;
    Ok((Secret(*next), message_key))
}

/// One session's double-ratchet state.
#[derive(Clone, Serialize, Deserialize)]
pub struct Ratchet {
    /// DHs: our current ratchet key pair.
    sending_ratchet: KeyPair,
    /// DHr: the peer's current ratchet public key.
    remote_ratchet_opt: Option<[u8; KEY_BYTES]>,
    root_key: Secret,
    sending_chain_opt: Option<Secret>,
    receiving_chain_opt: Option<Secret>,
    sent: u32,
    received: u32,
    previous_sent: u32,
    /// Oldest first.
    skipped: Vec<SkippedKey>,
}

impl std::fmt::Debug for Ratchet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ratchet")
            .field("sent", &self.sent)
            .field("received", &self.received)
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

impl Ratchet {
    /// `RatchetInitAlice`: the session initiator, from the X3DH secret and the responder's
    /// signed prekey (its first ratchet key).
    ///
    /// # Errors
    /// [`E2eError::BadKey`] for a low-order key, [`E2eError::Random`].
    pub fn new_initiator(
        shared_secret: &[u8; KEY_BYTES],
        remote: [u8; KEY_BYTES],
    ) -> E2eResult<Self> {
        let sending_ratchet = KeyPair::generate()?;
        let dh_out = dh(&sending_ratchet.secret(), &remote)?;
        let (root_key, sending_chain) = kdf_rk(shared_secret, &dh_out)?;
        Ok(Self {
            sending_ratchet,
            remote_ratchet_opt: Some(remote),
            root_key,
            sending_chain_opt: Some(sending_chain),
            receiving_chain_opt: None,
            sent: 0,
            received: 0,
            previous_sent: 0,
            skipped: Vec::new(),
        })
    }

    /// `RatchetInitBob`: the responder, from the X3DH secret and its signed prekey pair.
    pub fn new_responder(shared_secret: &[u8; KEY_BYTES], signed_prekey: KeyPair) -> Self {
        Self {
            sending_ratchet: signed_prekey,
            remote_ratchet_opt: None,
            root_key: Secret(*shared_secret),
            sending_chain_opt: None,
            receiving_chain_opt: None,
            sent: 0,
            received: 0,
            previous_sent: 0,
            skipped: Vec::new(),
        }
    }

    /// Returns true once this side can send (the responder first has to receive).
    pub fn can_send(&self) -> bool {
        self.sending_chain_opt.is_some()
    }

    /// Returns how many skipped message keys are kept.
    #[cfg(test)]
    pub fn skipped_keys(&self) -> usize {
        self.skipped.len()
    }

    /// `RatchetEncrypt` up to the cipher: advances the sending chain and returns the header
    /// and the message's keys.
    ///
    /// # Errors
    /// [`E2eError::NoSession`] when this side cannot send yet.
    pub fn next_sending_keys(&mut self) -> E2eResult<(RatchetHeader, MessageKeys)> {
        let chain = self
            .sending_chain_opt
            .as_ref()
            .ok_or_else(|| E2eError::NoSession("the responder has not received yet".into()))?;
        let (next_chain, message_key) = kdf_ck(&chain.0)?;
        self.sending_chain_opt = Some(next_chain);
        let header = RatchetHeader {
            ratchet_key: self.sending_ratchet.public(),
            previous_chain_length: self.previous_sent,
            n: self.sent,
        };
        self.sent = self
            .sent
            .checked_add(1)
            .ok_or_else(|| E2eError::Internal("sending chain exhausted".into()))?;
        Ok((header, message_keys(&message_key)?))
    }

    /// `RatchetDecrypt` up to the cipher: returns the keys of the message with `header`,
    /// advancing (and skipping) as needed. Call it on a clone and keep the clone only if the
    /// message then opens.
    ///
    /// # Errors
    /// [`E2eError::Replay`] for a message whose key was already used,
    /// [`E2eError::TooManySkipped`] past [`MAX_SKIP`], [`E2eError::BadKey`].
    pub fn receiving_keys(&mut self, header: &RatchetHeader) -> E2eResult<MessageKeys> {
        if let Some(index) = self
            .skipped
            .iter()
            .position(|key| key.ratchet_key == header.ratchet_key && key.n == header.n)
        {
            let used = self.skipped.remove(index);
            return message_keys(&used.message_key);
        }
        if self.remote_ratchet_opt == Some(header.ratchet_key) {
            if header.n < self.received {
                return Err(E2eError::Replay);
            }
        } else {
            self.skip_until(header.previous_chain_length)?;
            self.dh_ratchet(header)?;
        }
        self.skip_until(header.n)?;
        let chain = self
            .receiving_chain_opt
            .as_ref()
            .ok_or_else(|| E2eError::Internal("no receiving chain after ratchet".into()))?;
        let (next_chain, message_key) = kdf_ck(&chain.0)?;
        self.receiving_chain_opt = Some(next_chain);
        self.received = self.received.saturating_add(1);
        message_keys(&message_key)
    }

    fn skip_until(&mut self, until: u32) -> E2eResult<()> {
        if until <= self.received {
            return Ok(());
        }
        if until - self.received > MAX_SKIP {
            return Err(E2eError::TooManySkipped(until - self.received));
        }
        let (Some(remote), Some(chain)) =
            (self.remote_ratchet_opt, self.receiving_chain_opt.take())
        else {
            return Ok(());
        };
        let mut chain = chain;
        while self.received < until {
            let (next_chain, message_key) = kdf_ck(&chain.0)?;
            chain = next_chain;
            self.skipped.push(SkippedKey {
                ratchet_key: remote,
                n: self.received,
                message_key: *message_key,
            });
            self.received += 1;
        }
        self.receiving_chain_opt = Some(chain);
        if self.skipped.len() > MAX_SKIPPED_KEYS {
            let excess = self.skipped.len() - MAX_SKIPPED_KEYS;
            self.skipped.drain(..excess);
        }
        Ok(())
    }

    fn dh_ratchet(&mut self, header: &RatchetHeader) -> E2eResult<()> {
        self.previous_sent = self.sent;
        self.sent = 0;
        self.received = 0;
        self.remote_ratchet_opt = Some(header.ratchet_key);
        let receive_dh = dh(&self.sending_ratchet.secret(), &header.ratchet_key)?;
        let (root_key, receiving_chain) = kdf_rk(&self.root_key.0, &receive_dh)?;
        self.receiving_chain_opt = Some(receiving_chain);
        self.sending_ratchet = KeyPair::generate()?;
        let send_dh = dh(&self.sending_ratchet.secret(), &header.ratchet_key)?;
        let (root_key, sending_chain) = kdf_rk(&root_key.0, &send_dh)?;
        self.root_key = root_key;
        self.sending_chain_opt = Some(sending_chain);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::e2e::primitives::{aead_open, aead_seal};

    fn pair() -> (Ratchet, Ratchet) {
        let shared = [7u8; 32];
        let bob_prekey = KeyPair::generate().unwrap();
        let alice = Ratchet::new_initiator(&shared, bob_prekey.public()).unwrap();
        let bob = Ratchet::new_responder(&shared, bob_prekey);
        (alice, bob)
    }

    fn seal(ratchet: &mut Ratchet, text: &[u8]) -> (RatchetHeader, Vec<u8>) {
        let (header, keys) = ratchet.next_sending_keys().unwrap();
        (
            header,
            aead_seal(&keys.key, &keys.nonce, text, b"").unwrap(),
        )
    }

    fn open(ratchet: &mut Ratchet, header: &RatchetHeader, sealed: &[u8]) -> E2eResult<Vec<u8>> {
        let mut trial = ratchet.clone();
        let keys = trial.receiving_keys(header)?;
        let plain = aead_open(&keys.key, &keys.nonce, sealed, b"")?;
        *ratchet = trial;
        Ok(plain.to_vec())
    }

    #[test]
    fn both_sides_ratchet_and_skipped_keys_open_later() {
        let (mut alice, mut bob) = pair();
        assert!(!bob.can_send());
        let first = seal(&mut alice, b"a0");
        let second = seal(&mut alice, b"a1");
        let third = seal(&mut alice, b"a2");
        assert_eq!(open(&mut bob, &third.0, &third.1).unwrap(), b"a2");
        assert_eq!(bob.skipped_keys(), 2);
        let reply = seal(&mut bob, b"b0");
        assert_eq!(open(&mut alice, &reply.0, &reply.1).unwrap(), b"b0");
        assert_eq!(open(&mut bob, &first.0, &first.1).unwrap(), b"a0");
        assert_eq!(open(&mut bob, &second.0, &second.1).unwrap(), b"a1");
        assert_eq!(bob.skipped_keys(), 0);
        assert!(matches!(
            open(&mut bob, &second.0, &second.1),
            Err(E2eError::Decrypt | E2eError::Replay)
        ));
        assert!(matches!(
            open(&mut bob, &third.0, &third.1),
            Err(E2eError::Replay)
        ));
    }

    #[test]
    fn a_forged_message_leaves_the_state_alone() {
        let (mut alice, mut bob) = pair();
        let (header, mut sealed) = seal(&mut alice, b"hello");
        sealed[0] ^= 1;
        assert!(open(&mut bob, &header, &sealed).is_err());
        sealed[0] ^= 1;
        assert_eq!(open(&mut bob, &header, &sealed).unwrap(), b"hello");
    }
}
