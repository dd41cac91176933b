//! [`E2eDevice`]: the cryptographic core of one device, without any network I/O. It owns
//! the identity, generates and publishes prekeys, starts sessions (X3DH), seals and opens
//! payloads (baseline, prekey and ratchet envelopes) and keeps the trust-on-first-use record
//! of peers' identity keys. Every state change is written through to the [`KeyStore`] before
//! the call returns.
//!
//! Derivations (all HKDF-SHA256 with a 32-byte zero salt unless said otherwise):
//!
//! - baseline: `key = HKDF(DH(IK_s, IK_r) || DH(EK, IK_r), info = "bluetick/v1/baseline")`,
//!   random 96-bit nonce in the envelope;
//! - X3DH: `SK = HKDF(0xFF^32 || DH(IK_a, SPK_b) || DH(EK_a, IK_b) || DH(EK_a, SPK_b)
//!   [|| DH(EK_a, OPK_b)], info = "bluetick/v1/x3dh")`, then the double ratchet
//!   ([`super::ratchet`]) starts from `SK` with `SPK_b` as the responder's first ratchet key;
//! - associated data of every message: `"bluetick/v1/ad" || len16 sender_user ||
//!   u32 sender_device || len16 recipient_user || u32 recipient_device || session_ad ||
//!   header_bytes`, where `session_ad = IK_initiator || IK_responder` for sessions (empty
//!   for baseline, whose header carries both keys' inputs) and `header_bytes` is the whole
//!   envelope before the ciphertext (version, kind, client_msg_id, keys, counters, nonce).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use bluetick_proto::common::v1::DeviceAddress;
use bluetick_proto::gateway::v1::{
    PreKey as PreKeyProto, PreKeyBundle, PublishKeysRequest, SignedPreKey as SignedPreKeyProto,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::envelope::{Envelope, EnvelopeKind, Header, PreKeyHeader};
use super::keys::{IdentityKeyPair, KeyPair, SignedPreKey, now_ms, verify_prekey_signature};
use super::primitives::{KEY_BYTES, aead_open, aead_seal, dh, hkdf_sha256, random_array};
use super::ratchet::Ratchet;
use super::store::KeyStoreRef;
use super::{E2eError, E2eResult};

/// One-time prekeys published at first and whenever the server's pool runs low.
pub const ONE_TIME_PREKEY_BATCH: u32 = 100;
/// Refill when the server holds fewer one-time prekeys than this.
pub const ONE_TIME_PREKEY_LOW: u32 = 25;
/// Rotate the signed prekey when it is older than this.
pub const SIGNED_PREKEY_MAX_AGE_MS: u64 = 7 * 24 * 3600 * 1000;
/// Signed prekeys kept (the current one and the previous ones, for messages in flight).
const SIGNED_PREKEYS_KEPT: usize = 3;
/// One-time prekey secrets kept at most (the oldest are dropped first).
const ONE_TIME_PREKEYS_KEPT: usize = 2000;
/// Base keys and baseline ephemeral keys remembered against replays.
const REPLAY_WINDOW: usize = 10_000;
/// Earlier sessions kept per peer device (simultaneous session starts converge on one).
const ARCHIVED_SESSIONS: usize = 4;

/// What [`E2eDevice::open`] returns.
#[derive(Debug)]
pub struct Opened {
    /// The sender's id for the message (authenticated).
    pub client_msg_id: String,
    /// The plaintext (wiped on drop).
    pub plaintext: Zeroizing<Vec<u8>>,
    /// How it was sealed.
    pub kind: EnvelopeKind,
    /// The sender device's identity key.
    pub sender_identity: [u8; KEY_BYTES],
}

/// The outcome of a trust-on-first-use check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityCheck {
    /// Never seen before; now recorded.
    FirstSeen,
    /// The same key as before.
    Unchanged,
    /// A different key than before; the new one is now recorded and old sessions dropped.
    Changed {
        /// The key seen before.
        previous_identity: [u8; KEY_BYTES],
    },
}

/// An identity key seen for a peer device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenIdentity {
    /// The X25519 identity key.
    pub identity_key: [u8; KEY_BYTES],
    /// The Ed25519 prekey-signing key.
    pub signing_key: [u8; KEY_BYTES],
    /// When first seen (ms since the Unix epoch).
    pub first_seen_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session {
    ratchet: Ratchet,
    peer_identity: [u8; KEY_BYTES],
    local_is_initiator: bool,
    /// The initiator's ephemeral key: names the session in prekey messages.
    base_key: [u8; KEY_BYTES],
    /// Until the responder answers: (signed prekey id, one-time prekey id).
    pending_prekey_opt: Option<(u32, Option<u32>)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SessionRecord {
    /// The current session first.
    sessions: Vec<Session>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PreKeyState {
    next_key_id: u32,
    /// Newest last.
    signed: Vec<SignedPreKey>,
    one_time: BTreeMap<u32, KeyPair>,
    recent_base_keys: VecDeque<[u8; KEY_BYTES]>,
}

impl PreKeyState {
    fn take_key_id(&mut self) -> u32 {
        self.next_key_id = self.next_key_id.wrapping_add(1).max(1);
        self.next_key_id
    }

    fn remember_base_key(&mut self, base_key: [u8; KEY_BYTES]) {
        self.recent_base_keys.push_back(base_key);
        while self.recent_base_keys.len() > REPLAY_WINDOW {
            self.recent_base_keys.pop_front();
        }
    }
}

#[derive(Debug, Default)]
struct State {
    prekeys: PreKeyState,
    sessions: HashMap<String, SessionRecord>,
}

/// The cryptographic core of one device. Cheap calls (a few X25519 operations and a store
/// write); safe to share between tasks (`Arc<E2eDevice>`).
#[derive(Debug)]
pub struct E2eDevice {
    address: DeviceAddress,
    identity: IdentityKeyPair,
    store: KeyStoreRef,
    state: Mutex<State>,
}

fn load<T: DeserializeOwned>(store: &KeyStoreRef, name: &str) -> E2eResult<Option<T>> {
    match store.get(name)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| E2eError::Store(format!("record {name} is corrupt: {error}"))),
        None => Ok(None),
    }
}

fn save<T: Serialize>(store: &KeyStoreRef, name: &str, value: &T) -> E2eResult<()> {
    let bytes = Zeroizing::new(
        serde_json::to_vec(value)
            .map_err(|error| E2eError::Store(format!("cannot encode {name}: {error}")))?,
    );
    store.put(name, &bytes)
}

fn session_name(peer: &DeviceAddress) -> String {
    format!("session~{}~{}", peer.user_id, peer.device_id)
}

fn seen_name(peer: &DeviceAddress) -> String {
    format!("seen~{}~{}", peer.user_id, peer.device_id)
}

fn key32(bytes: &[u8], what: &str) -> E2eResult<[u8; KEY_BYTES]> {
    bytes
        .try_into()
        .map_err(|_| E2eError::BadKey(format!("{what} is not 32 bytes")))
}

/// Returns the associated data of a message (see the module docs).
fn associated_data(
    sender: &DeviceAddress,
    recipient: &DeviceAddress,
    session_ad: &[u8],
    header_bytes: &[u8],
) -> Vec<u8> {
    let mut ad = Vec::with_capacity(96 + session_ad.len() + header_bytes.len());
    ad.extend_from_slice(b"bluetick/v1/ad");
    for address in [sender, recipient] {
        ad.extend_from_slice(&(address.user_id.len() as u16).to_be_bytes());
        ad.extend_from_slice(address.user_id.as_bytes());
        ad.extend_from_slice(&address.device_id.to_be_bytes());
    }
    ad.extend_from_slice(session_ad);
    ad.extend_from_slice(header_bytes);
    ad
}

fn baseline_key(dh_static: &[u8; 32], dh_ephemeral: &[u8; 32]) -> E2eResult<Zeroizing<[u8; 32]>> {
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(dh_static);
    ikm[32..].copy_from_slice(dh_ephemeral);
    let mut key = Zeroizing::new([0u8; 32]);
    hkdf_sha256(&[0u8; 32], &ikm[..], b"bluetick/v1/baseline", &mut key[..])?;
    Ok(key)
}

fn x3dh_secret(dhs: &[&[u8; 32]]) -> E2eResult<Zeroizing<[u8; 32]>> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * 5));
    ikm.extend_from_slice(&[0xFF; 32]);
    for dh_out in dhs {
        ikm.extend_from_slice(&dh_out[..]);
    }
    let mut secret = Zeroizing::new([0u8; 32]);
    hkdf_sha256(&[0u8; 32], &ikm, b"bluetick/v1/x3dh", &mut secret[..])?;
    Ok(secret)
}

impl Session {
    fn session_ad(&self, own_identity: &[u8; KEY_BYTES]) -> [u8; 2 * KEY_BYTES] {
        let (initiator, responder) = if self.local_is_initiator {
            (own_identity, &self.peer_identity)
        } else {
            (&self.peer_identity, own_identity)
        };
        let mut ad = [0u8; 2 * KEY_BYTES];
        ad[..KEY_BYTES].copy_from_slice(initiator);
        ad[KEY_BYTES..].copy_from_slice(responder);
        ad
    }
}

impl E2eDevice {
    /// Returns the device `address` with its identity from `store`, creating and storing a
    /// fresh identity the first time.
    ///
    /// # Errors
    /// [`E2eError::Store`] when the store fails or holds corrupt records.
    pub fn load_or_create(address: DeviceAddress, store: KeyStoreRef) -> E2eResult<Self> {
        let identity = match load::<IdentityKeyPair>(&store, "identity")? {
            Some(identity) => identity,
            None => {
                let identity = IdentityKeyPair::generate()?;
                save(&store, "identity", &identity)?;
                identity
            }
        };
        let prekeys = load::<PreKeyState>(&store, "prekeys")?.unwrap_or_default();
        Ok(Self {
            address,
            identity,
            store,
            state: Mutex::new(State {
                prekeys,
                sessions: HashMap::new(),
            }),
        })
    }

    /// Returns this device's address.
    pub fn address(&self) -> &DeviceAddress {
        &self.address
    }

    /// Returns this device's X25519 identity public key.
    pub fn identity_public(&self) -> [u8; KEY_BYTES] {
        self.identity.identity_public()
    }

    /// Returns this device's Ed25519 prekey-signing public key.
    pub fn signing_public(&self) -> [u8; KEY_BYTES] {
        self.identity.signing_public()
    }

    fn lock(&self) -> E2eResult<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| E2eError::Internal("device state poisoned".into()))
    }

    /// Returns a publish request carrying the identity, a new signed prekey when
    /// `rotate_signed` (or none exists yet) and `one_time_count` new one-time prekeys (at
    /// most 200). Their secrets are stored before this returns.
    ///
    /// # Errors
    /// [`E2eError::Store`], [`E2eError::Random`].
    pub fn prekeys_to_publish(
        &self,
        one_time_count: u32,
        rotate_signed: bool,
    ) -> E2eResult<PublishKeysRequest> {
        let mut state = self.lock()?;
        let mut prekeys = state.prekeys.clone();
        let mut request = PublishKeysRequest {
            identity_key: self.identity.identity_public().to_vec().into(),
            signing_key: self.identity.signing_public().to_vec().into(),
            signed_prekey: None,
            one_time_prekeys: Vec::new(),
        };
        if rotate_signed || prekeys.signed.is_empty() {
            let key_id = prekeys.take_key_id();
            let pair = KeyPair::generate()?;
            let signature = self.identity.sign(&pair.public()).to_vec();
            request.signed_prekey = Some(SignedPreKeyProto {
                key_id,
                public_key: pair.public().to_vec().into(),
                signature: signature.clone().into(),
            });
            prekeys.signed.push(SignedPreKey {
                key_id,
                pair,
                signature,
                created_at_ms: now_ms(),
            });
            while prekeys.signed.len() > SIGNED_PREKEYS_KEPT {
                prekeys.signed.remove(0);
            }
        }
        for _ in 0..one_time_count.min(200) {
            let key_id = prekeys.take_key_id();
            let pair = KeyPair::generate()?;
            request.one_time_prekeys.push(PreKeyProto {
                key_id,
                public_key: pair.public().to_vec().into(),
            });
            prekeys.one_time.insert(key_id, pair);
        }
        while prekeys.one_time.len() > ONE_TIME_PREKEYS_KEPT {
            prekeys.one_time.pop_first();
        }
        save(&self.store, "prekeys", &prekeys)?;
        state.prekeys = prekeys;
        Ok(request)
    }

    /// Returns what to publish given that the server holds `server_one_time_count` one-time
    /// prekeys: a refill when it runs low, a new signed prekey when the current one is older
    /// than [`SIGNED_PREKEY_MAX_AGE_MS`], or `None` when nothing is due.
    ///
    /// # Errors
    /// As [`E2eDevice::prekeys_to_publish`].
    pub fn prekey_maintenance(
        &self,
        server_one_time_count: u32,
    ) -> E2eResult<Option<PublishKeysRequest>> {
        let rotate = {
            let state = self.lock()?;
            state.prekeys.signed.last().is_none_or(|signed| {
                now_ms().saturating_sub(signed.created_at_ms) > SIGNED_PREKEY_MAX_AGE_MS
            })
        };
        let refill = if server_one_time_count < ONE_TIME_PREKEY_LOW {
            ONE_TIME_PREKEY_BATCH.saturating_sub(server_one_time_count)
        } else {
            0
        };
        if !rotate && refill == 0 {
            return Ok(None);
        }
        self.prekeys_to_publish(refill, rotate).map(Some)
    }

    /// Returns how many one-time prekey secrets this device holds.
    ///
    /// # Errors
    /// [`E2eError::Internal`] if the state lock is poisoned.
    pub fn one_time_prekey_secrets(&self) -> E2eResult<usize> {
        Ok(self.lock()?.prekeys.one_time.len())
    }

    /// Checks `identity_key`/`signing_key` of `peer` against what this device saw before,
    /// records them, and drops sessions made with an earlier key.
    ///
    /// # Errors
    /// [`E2eError::Store`].
    pub fn check_identity(
        &self,
        peer: &DeviceAddress,
        identity_key: &[u8; KEY_BYTES],
        signing_key: &[u8; KEY_BYTES],
    ) -> E2eResult<IdentityCheck> {
        let mut state = self.lock()?;
        let name = seen_name(peer);
        let seen_opt = load::<SeenIdentity>(&self.store, &name)?;
        let check = match &seen_opt {
            Some(seen)
                if seen.identity_key == *identity_key && seen.signing_key == *signing_key =>
            {
                return Ok(IdentityCheck::Unchanged);
            }
            Some(seen) => IdentityCheck::Changed {
                previous_identity: seen.identity_key,
            },
            None => IdentityCheck::FirstSeen,
        };
        save(
            &self.store,
            &name,
            &SeenIdentity {
                identity_key: *identity_key,
                signing_key: *signing_key,
                first_seen_ms: now_ms(),
            },
        )?;
        if matches!(check, IdentityCheck::Changed { .. }) {
            state.sessions.remove(&session_name(peer));
            self.store.delete(&session_name(peer))?;
        }
        Ok(check)
    }

    /// Returns the identity recorded for `peer`, if any.
    ///
    /// # Errors
    /// [`E2eError::Store`].
    pub fn seen_identity(&self, peer: &DeviceAddress) -> E2eResult<Option<SeenIdentity>> {
        load(&self.store, &seen_name(peer))
    }

    fn session_record<'a>(
        &self,
        state: &'a mut State,
        peer: &DeviceAddress,
    ) -> E2eResult<&'a mut SessionRecord> {
        let name = session_name(peer);
        if !state.sessions.contains_key(&name) {
            let record = load::<SessionRecord>(&self.store, &name)?.unwrap_or_default();
            state.sessions.insert(name.clone(), record);
        }
        state
            .sessions
            .get_mut(&name)
            .ok_or_else(|| E2eError::Internal("session cache lost a record".into()))
    }

    fn save_record(&self, peer: &DeviceAddress, record: &SessionRecord) -> E2eResult<()> {
        save(&self.store, &session_name(peer), record)
    }

    /// Returns true when this device has a session with `peer` it can send on.
    ///
    /// # Errors
    /// [`E2eError::Store`].
    pub fn has_session(&self, peer: &DeviceAddress) -> E2eResult<bool> {
        let mut state = self.lock()?;
        let record = self.session_record(&mut state, peer)?;
        Ok(record
            .sessions
            .first()
            .is_some_and(|session| session.ratchet.can_send()))
    }

    /// Returns the identity key of the current session with `peer`, if any.
    ///
    /// # Errors
    /// [`E2eError::Store`].
    pub fn session_identity(&self, peer: &DeviceAddress) -> E2eResult<Option<[u8; KEY_BYTES]>> {
        let mut state = self.lock()?;
        let record = self.session_record(&mut state, peer)?;
        Ok(record.sessions.first().map(|session| session.peer_identity))
    }

    /// Starts a session with device `bundle.device_id` of `peer_user` from its prekey
    /// bundle (X3DH, as the initiator): verifies the signed prekey's signature, and uses the
    /// one-time prekey when the bundle has one.
    ///
    /// # Errors
    /// [`E2eError::BadSignature`] for a signed prekey that does not verify,
    /// [`E2eError::NoSession`] when the bundle has no signed prekey, [`E2eError::BadKey`].
    pub fn start_session(&self, peer_user: &str, bundle: &PreKeyBundle) -> E2eResult<()> {
        let peer = DeviceAddress::new(peer_user.to_string(), bundle.device_id);
        let signed = bundle
            .signed_prekey
            .as_ref()
            .ok_or_else(|| E2eError::NoSession(format!("{peer} has no signed prekey")))?;
        verify_prekey_signature(&bundle.signing_key, &signed.public_key, &signed.signature)?;
        let peer_identity = key32(&bundle.identity_key, "identity key")?;
        let signed_prekey = key32(&signed.public_key, "signed prekey")?;
        let ephemeral = KeyPair::generate()?;
        let dh1 = dh(&self.identity.identity().secret(), &signed_prekey)?;
        let dh2 = dh(&ephemeral.secret(), &peer_identity)?;
        let dh3 = dh(&ephemeral.secret(), &signed_prekey)?;
        let (secret, one_time_id_opt) = match &bundle.one_time_prekey {
            Some(one_time) => {
                let dh4 = dh(
                    &ephemeral.secret(),
                    &key32(&one_time.public_key, "one-time prekey")?,
                )?;
                (
                    x3dh_secret(&[&dh1, &dh2, &dh3, &dh4])?,
                    Some(one_time.key_id),
                )
            }
            None => (x3dh_secret(&[&dh1, &dh2, &dh3])?, None),
        };
        let session = Session {
            ratchet: Ratchet::new_initiator(&secret, signed_prekey)?,
            peer_identity,
            local_is_initiator: true,
            base_key: ephemeral.public(),
            pending_prekey_opt: Some((signed.key_id, one_time_id_opt)),
        };
        let mut state = self.lock()?;
        let mut record = self.session_record(&mut state, &peer)?.clone();
        record.sessions.insert(0, session);
        record.sessions.truncate(1 + ARCHIVED_SESSIONS);
        self.save_record(&peer, &record)?;
        *self.session_record(&mut state, &peer)? = record;
        Ok(())
    }

    /// Seals `plaintext` for `peer` on the current session (a prekey envelope until the peer
    /// has answered, then ratchet envelopes).
    ///
    /// # Errors
    /// [`E2eError::NoSession`] without a session that can send; [`E2eError::Store`].
    pub fn seal(
        &self,
        peer: &DeviceAddress,
        client_msg_id: &str,
        plaintext: &[u8],
    ) -> E2eResult<Vec<u8>> {
        let own_identity = self.identity.identity_public();
        let mut state = self.lock()?;
        let record = self.session_record(&mut state, peer)?;
        let mut session = record
            .sessions
            .first()
            .cloned()
            .ok_or_else(|| E2eError::NoSession(format!("no session with {peer}")))?;
        let (ratchet_header, keys) = session.ratchet.next_sending_keys()?;
        let header = match session.pending_prekey_opt {
            Some((signed_prekey_id, one_time_prekey_id_opt)) => Header::PreKey {
                prekey: PreKeyHeader {
                    sender_identity: own_identity,
                    base_key: session.base_key,
                    signed_prekey_id,
                    one_time_prekey_id_opt,
                },
                ratchet: ratchet_header,
            },
            None => Header::Ratchet(ratchet_header),
        };
        let header_bytes = Envelope::header_bytes(client_msg_id, &header)?;
        let ad = associated_data(
            &self.address,
            peer,
            &session.session_ad(&own_identity),
            &header_bytes,
        );
        let ciphertext = aead_seal(&keys.key, &keys.nonce, plaintext, &ad)?;
        let mut updated = record.clone();
        updated.sessions[0] = session;
        self.save_record(peer, &updated)?;
        *self.session_record(&mut state, peer)? = updated;
        Ok(Envelope::encode_with(&header_bytes, &ciphertext))
    }

    /// Seals `plaintext` for `peer` without a session (the baseline): static and ephemeral
    /// X25519 to `peer_identity`, a fresh random nonce. Works when the peer has no prekeys.
    ///
    /// # Errors
    /// [`E2eError::BadKey`], [`E2eError::Random`].
    pub fn seal_baseline(
        &self,
        peer: &DeviceAddress,
        peer_identity: &[u8; KEY_BYTES],
        client_msg_id: &str,
        plaintext: &[u8],
    ) -> E2eResult<Vec<u8>> {
        let ephemeral = KeyPair::generate()?;
        let dh_static = dh(&self.identity.identity().secret(), peer_identity)?;
        let dh_ephemeral = dh(&ephemeral.secret(), peer_identity)?;
        let key = baseline_key(&dh_static, &dh_ephemeral)?;
        let nonce = random_array::<12>()?;
        let header = Header::Baseline {
            sender_identity: self.identity.identity_public(),
            ephemeral: ephemeral.public(),
            nonce,
        };
        let header_bytes = Envelope::header_bytes(client_msg_id, &header)?;
        let ad = associated_data(&self.address, peer, &[], &header_bytes);
        let ciphertext = aead_seal(&key, &nonce, plaintext, &ad)?;
        Ok(Envelope::encode_with(&header_bytes, &ciphertext))
    }

    /// Opens a payload `sender` sent to this device. The caller must have checked the
    /// sender identity a baseline or prekey envelope names against the key directory or its
    /// trust store (see [`Envelope::decode`] and [`E2eDevice::check_identity`]); ratchet
    /// envelopes are bound to the identity of the session.
    ///
    /// # Errors
    /// [`E2eError::Decrypt`] when the payload does not open (wrong recipient, any altered
    /// byte), [`E2eError::Replay`] for a message opened before, [`E2eError::TooManySkipped`],
    /// [`E2eError::UnknownPreKey`] for a used or unknown prekey, [`E2eError::NoSession`],
    /// [`E2eError::BadEnvelope`] / [`E2eError::UnsupportedVersion`] for malformed bytes.
    pub fn open(&self, sender: &DeviceAddress, payload: &[u8]) -> E2eResult<Opened> {
        let (envelope, header_len) = Envelope::decode(payload)?;
        let header_bytes = &payload[..header_len];
        match envelope.header {
            Header::Baseline {
                sender_identity,
                ephemeral,
                nonce,
            } => {
                let own = self.identity.identity().secret();
                let dh_static = dh(&own, &sender_identity)?;
                let dh_ephemeral = dh(&own, &ephemeral)?;
                let key = baseline_key(&dh_static, &dh_ephemeral)?;
                let ad = associated_data(sender, &self.address, &[], header_bytes);
                let plaintext = aead_open(&key, &nonce, &envelope.ciphertext, &ad)?;
                let mut state = self.lock()?;
                if state.prekeys.recent_base_keys.contains(&ephemeral) {
                    return Err(E2eError::Replay);
                }
                let mut prekeys = state.prekeys.clone();
                prekeys.remember_base_key(ephemeral);
                save(&self.store, "prekeys", &prekeys)?;
                state.prekeys = prekeys;
                Ok(Opened {
                    client_msg_id: envelope.client_msg_id,
                    plaintext,
                    kind: EnvelopeKind::Baseline,
                    sender_identity,
                })
            }
            Header::PreKey { prekey, ratchet } => {
                self.open_prekey(sender, &envelope, header_bytes, &prekey, &ratchet)
            }
            Header::Ratchet(ratchet) => {
                let mut state = self.lock()?;
                let record = self.session_record(&mut state, sender)?.clone();
                if record.sessions.is_empty() {
                    return Err(E2eError::NoSession(format!("no session with {sender}")));
                }
                let mut first_error_opt = None;
                for index in 0..record.sessions.len() {
                    match self.try_session(
                        &record.sessions[index],
                        sender,
                        &envelope.ciphertext,
                        header_bytes,
                        &ratchet,
                    ) {
                        Ok((session, plaintext)) => {
                            let sender_identity = session.peer_identity;
                            let mut updated = record.clone();
                            updated.sessions.remove(index);
                            updated.sessions.insert(0, session);
                            self.save_record(sender, &updated)?;
                            *self.session_record(&mut state, sender)? = updated;
                            return Ok(Opened {
                                client_msg_id: envelope.client_msg_id,
                                plaintext,
                                kind: EnvelopeKind::Ratchet,
                                sender_identity,
                            });
                        }
                        Err(error) => {
                            first_error_opt.get_or_insert(error);
                        }
                    }
                }
                Err(first_error_opt.unwrap_or(E2eError::Decrypt))
            }
        }
    }

    /// Opens with a copy of `session`; returns the advanced copy and the plaintext.
    fn try_session(
        &self,
        session: &Session,
        sender: &DeviceAddress,
        ciphertext: &[u8],
        header_bytes: &[u8],
        ratchet: &super::envelope::RatchetHeader,
    ) -> E2eResult<(Session, Zeroizing<Vec<u8>>)> {
        let mut trial = session.clone();
        let keys = trial.ratchet.receiving_keys(ratchet)?;
        let ad = associated_data(
            sender,
            &self.address,
            &trial.session_ad(&self.identity.identity_public()),
            header_bytes,
        );
        let plaintext = aead_open(&keys.key, &keys.nonce, ciphertext, &ad)?;
        // The peer answered on this session, so it no longer needs the X3DH parameters.
        trial.pending_prekey_opt = None;
        Ok((trial, plaintext))
    }

    fn open_prekey(
        &self,
        sender: &DeviceAddress,
        envelope: &Envelope,
        header_bytes: &[u8],
        prekey: &PreKeyHeader,
        ratchet: &super::envelope::RatchetHeader,
    ) -> E2eResult<Opened> {
        let mut state = self.lock()?;
        let record = self.session_record(&mut state, sender)?.clone();
        // A later message of a session this device already answers to.
        if let Some(index) = record.sessions.iter().position(|session| {
            !session.local_is_initiator
                && session.base_key == prekey.base_key
                && session.peer_identity == prekey.sender_identity
        }) {
            let (session, plaintext) = self.try_session(
                &record.sessions[index],
                sender,
                &envelope.ciphertext,
                header_bytes,
                ratchet,
            )?;
            let mut updated = record.clone();
            updated.sessions.remove(index);
            updated.sessions.insert(0, session);
            self.save_record(sender, &updated)?;
            *self.session_record(&mut state, sender)? = updated;
            return Ok(Opened {
                client_msg_id: envelope.client_msg_id.clone(),
                plaintext,
                kind: EnvelopeKind::PreKey,
                sender_identity: prekey.sender_identity,
            });
        }
        if state.prekeys.recent_base_keys.contains(&prekey.base_key) {
            return Err(E2eError::Replay);
        }
        let signed = state
            .prekeys
            .signed
            .iter()
            .find(|signed| signed.key_id == prekey.signed_prekey_id)
            .ok_or(E2eError::UnknownPreKey(prekey.signed_prekey_id))?
            .pair
            .clone();
        let one_time_opt = match prekey.one_time_prekey_id_opt {
            Some(key_id) => Some(
                state
                    .prekeys
                    .one_time
                    .get(&key_id)
                    .ok_or(E2eError::UnknownPreKey(key_id))?
                    .clone(),
            ),
            None => None,
        };
        let dh1 = dh(&signed.secret(), &prekey.sender_identity)?;
        let dh2 = dh(&self.identity.identity().secret(), &prekey.base_key)?;
        let dh3 = dh(&signed.secret(), &prekey.base_key)?;
        let secret = match &one_time_opt {
            Some(one_time) => {
                let dh4 = dh(&one_time.secret(), &prekey.base_key)?;
                x3dh_secret(&[&dh1, &dh2, &dh3, &dh4])?
            }
            None => x3dh_secret(&[&dh1, &dh2, &dh3])?,
        };
        let session = Session {
            ratchet: Ratchet::new_responder(&secret, signed),
            peer_identity: prekey.sender_identity,
            local_is_initiator: false,
            base_key: prekey.base_key,
            pending_prekey_opt: None,
        };
        let (session, plaintext) = self.try_session(
            &session,
            sender,
            &envelope.ciphertext,
            header_bytes,
            ratchet,
        )?;
        // It opened: the one-time prekey is used up, and the base key is remembered so a
        // replay cannot start the session again.
        let mut prekeys = state.prekeys.clone();
        if let Some(key_id) = prekey.one_time_prekey_id_opt {
            prekeys.one_time.remove(&key_id);
        }
        prekeys.remember_base_key(prekey.base_key);
        save(&self.store, "prekeys", &prekeys)?;
        state.prekeys = prekeys;
        let mut updated = record;
        updated.sessions.insert(0, session);
        updated.sessions.truncate(1 + ARCHIVED_SESSIONS);
        self.save_record(sender, &updated)?;
        *self.session_record(&mut state, sender)? = updated;
        Ok(Opened {
            client_msg_id: envelope.client_msg_id.clone(),
            plaintext,
            kind: EnvelopeKind::PreKey,
            sender_identity: prekey.sender_identity,
        })
    }
}
