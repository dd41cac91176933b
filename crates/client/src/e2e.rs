//! End-to-end encryption: every message and media file is sealed on the sending device for
//! each device of the recipient, and only those devices can open it. Servers move opaque
//! bytes.
//!
//! Layout:
//! - [`SecureChat`] + [`SecureEvents`] (in `secure`): the layer apps use. It wraps a
//!   [`crate::ChatHandle`]/[`crate::ChatEvents`] pair: [`SecureChat::send_content`] seals a
//!   [`crate::Content`] for each device of the recipient (starting sessions from the key
//!   directory as needed, resealing when the device list changed), and [`SecureEvents`]
//!   opens what arrives, yielding [`SecureEvent::Message`] or
//!   [`SecureEvent::Undecryptable`], and [`SecureEvent::IdentityChanged`] warnings.
//! - [`E2eDevice`] (in `device`): the cryptographic core without network I/O: identity,
//!   prekeys, X3DH, baseline sealing, sessions, trust on first use.
//! - [`KeyStore`] with [`MemoryKeyStore`] and [`FileKeyStore`]: where secrets live.
//! - `ratchet`: the double ratchet; `envelope`: the versioned wire format; `primitives`:
//!   X25519, HKDF, HMAC and AES-GCM wrappers with known-answer tests.
//! - [`media`]: chunked streaming encryption of files (STREAM over AES-GCM).
//! - [`safety_number`]: comparable fingerprints of two users' keys.
//!
//! Messages are bound to the sender's `client_msg_id`, not the server's `message_id`: the
//! server assigns `message_id` after the message was sealed.

mod device;
mod envelope;
mod keys;
pub mod media;
mod primitives;
mod ratchet;
mod safety;
mod secure;
mod store;

pub use device::{
    E2eDevice, IdentityCheck, ONE_TIME_PREKEY_BATCH, ONE_TIME_PREKEY_LOW, Opened,
    SIGNED_PREKEY_MAX_AGE_MS, SeenIdentity,
};
pub use envelope::{
    Envelope, EnvelopeKind, Header, MAX_CLIENT_MSG_ID_BYTES, PROTOCOL_VERSION, PreKeyHeader,
    RatchetHeader,
};
pub use keys::{IdentityKeyPair, KeyPair, verify_prekey_signature};
pub use media::{MediaAttachment, MediaKey};
pub use ratchet::{MAX_SKIP, MAX_SKIPPED_KEYS};
pub use safety::{DeviceKeys, fingerprint, safety_number};
pub use secure::{
    IdentityWarning, SafetyNumber, SecureChat, SecureEvent, SecureEvents, SecureMessage,
    maintain_prekeys, safety_number_for, setup_device,
};
pub use store::{FileKeyStore, KeyStore, KeyStoreRef, MemoryKeyStore};

use crate::error::ClientError;

/// Result of an end-to-end encryption call.
pub type E2eResult<T> = Result<T, E2eError>;

/// What went wrong sealing or opening.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    /// The payload does not open: sealed for someone else, or altered.
    #[error("message could not be opened (wrong recipient or altered)")]
    Decrypt,
    /// The message was opened before (its key is gone).
    #[error("message refused: replayed or already opened")]
    Replay,
    /// The message would make the receiver skip more message keys than allowed.
    #[error("message refused: {0} skipped messages is more than allowed")]
    TooManySkipped(u32),
    /// The prekey a message names is unknown or already used.
    #[error("unknown or already used prekey {0}")]
    UnknownPreKey(u32),
    /// No session to seal or open with.
    #[error("no session: {0}")]
    NoSession(String),
    /// A public key is malformed or of low order.
    #[error("bad key: {0}")]
    BadKey(String),
    /// A signed prekey's signature does not verify.
    #[error("signed prekey signature does not verify")]
    BadSignature,
    /// The bytes are not an envelope.
    #[error("malformed envelope: {0}")]
    BadEnvelope(String),
    /// An envelope of a protocol version this SDK does not know.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The sender's identity key is not the one the key directory publishes.
    #[error("identity mismatch: {0}")]
    IdentityMismatch(String),
    /// The recipient has devices without published keys.
    #[error("no keys: {0}")]
    NoKeys(String),
    /// An encrypted file does not decrypt.
    #[error("media: {0}")]
    Media(String),
    /// The key store failed.
    #[error("key store: {0}")]
    Store(String),
    /// The OS random generator failed.
    #[error("random generator failed: {0}")]
    Random(String),
    /// A bug or an impossible state.
    #[error("internal: {0}")]
    Internal(String),
    /// A call to the servers failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A local file failed.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}
