//! Key material of one device: the X25519 identity key pair, the Ed25519 key that signs
//! prekeys, signed prekeys and one-time prekeys. Every secret is wiped from memory when
//! dropped ([`zeroize`]); records are serialized only into the device's [`super::KeyStore`].

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::primitives::{KEY_BYTES, random_array};
use super::{E2eError, E2eResult};

/// An X25519 key pair as stored (secret wiped on drop).
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct KeyPair {
    secret: [u8; KEY_BYTES],
    public: [u8; KEY_BYTES],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// Returns a fresh key pair from the OS generator.
    ///
    /// # Errors
    /// [`E2eError::Random`] when the OS generator fails.
    pub fn generate() -> E2eResult<Self> {
        let seed = Zeroizing::new(random_array::<KEY_BYTES>()?);
        Ok(Self::from_secret_bytes(*seed))
    }

    /// Returns the key pair of a secret scalar (clamped by X25519).
    pub fn from_secret_bytes(secret_bytes: [u8; KEY_BYTES]) -> Self {
        let secret = StaticSecret::from(secret_bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Self {
            secret: secret.to_bytes(),
            public,
        }
    }

    /// Returns the secret as an `x25519-dalek` key (wiped on drop).
    pub fn secret(&self) -> StaticSecret {
        StaticSecret::from(self.secret)
    }

    /// Returns the public key.
    pub fn public(&self) -> [u8; KEY_BYTES] {
        self.public
    }
}

/// A device's long-term identity: the X25519 identity key pair and the Ed25519 key that
/// signs its prekeys. Never leaves the device.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct IdentityKeyPair {
    identity: KeyPair,
    signing_secret: [u8; KEY_BYTES],
}

impl std::fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityKeyPair")
            .field("identity_public", &hex::encode(self.identity.public))
            .field("signing_public", &hex::encode(self.signing_public()))
            .finish_non_exhaustive()
    }
}

impl IdentityKeyPair {
    /// Returns a fresh identity.
    ///
    /// # Errors
    /// [`E2eError::Random`] when the OS generator fails.
    pub fn generate() -> E2eResult<Self> {
        Ok(Self {
            identity: KeyPair::generate()?,
            signing_secret: random_array::<KEY_BYTES>()?,
        })
    }

    /// Returns the X25519 identity key pair.
    pub fn identity(&self) -> &KeyPair {
        &self.identity
    }

    /// Returns the X25519 identity public key.
    pub fn identity_public(&self) -> [u8; KEY_BYTES] {
        self.identity.public
    }

    /// Returns the Ed25519 public key that verifies this device's prekeys.
    pub fn signing_public(&self) -> [u8; KEY_BYTES] {
        SigningKey::from_bytes(&self.signing_secret)
            .verifying_key()
            .to_bytes()
    }

    /// Returns the Ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        SigningKey::from_bytes(&self.signing_secret)
            .sign(message)
            .to_bytes()
    }
}

/// Checks that `signature` is `signing_public`'s Ed25519 signature of the prekey public key
/// `prekey_public` (strict verification: no malleable or small-order signatures).
///
/// # Errors
/// [`E2eError::BadSignature`] when it is not.
pub fn verify_prekey_signature(
    signing_public: &[u8],
    prekey_public: &[u8],
    signature: &[u8],
) -> E2eResult<()> {
    let signing: [u8; KEY_BYTES] = signing_public
        .try_into()
        .map_err(|_| E2eError::BadSignature)?;
    let signature: [u8; 64] = signature.try_into().map_err(|_| E2eError::BadSignature)?;
    VerifyingKey::from_bytes(&signing)
        .map_err(|_| E2eError::BadSignature)?
        .verify_strict(prekey_public, &Signature::from_bytes(&signature))
        .map_err(|_| E2eError::BadSignature)
}

/// A signed prekey as the device keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedPreKey {
    /// Its number.
    pub key_id: u32,
    /// The key pair.
    pub pair: KeyPair,
    /// Ed25519 signature of the public key by the identity's signing key.
    pub signature: Vec<u8>,
    /// When it was made, ms since the Unix epoch (drives rotation).
    pub created_at_ms: u64,
}

/// Returns the current time in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// RFC 8032 section 7.1 test 1: Ed25519 of the empty message.
    #[test]
    fn ed25519_matches_rfc8032_test_1() {
        let secret: [u8; 32] =
            hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .unwrap()
                .try_into()
                .unwrap();
        let identity = IdentityKeyPair {
            identity: KeyPair::generate().unwrap(),
            signing_secret: secret,
        };
        assert_eq!(
            hex::encode(identity.signing_public()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let signature = identity.sign(b"");
        assert_eq!(
            hex::encode(signature),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        verify_prekey_signature(&identity.signing_public(), b"", &signature).unwrap();
    }

    #[test]
    fn prekey_signatures_verify_and_forgeries_do_not() {
        let identity = IdentityKeyPair::generate().unwrap();
        let prekey = KeyPair::generate().unwrap();
        let signature = identity.sign(&prekey.public());
        verify_prekey_signature(&identity.signing_public(), &prekey.public(), &signature).unwrap();
        let other = KeyPair::generate().unwrap();
        assert!(
            verify_prekey_signature(&identity.signing_public(), &other.public(), &signature)
                .is_err()
        );
        let mut bent = signature;
        bent[10] ^= 1;
        assert!(
            verify_prekey_signature(&identity.signing_public(), &prekey.public(), &bent).is_err()
        );
        assert!(verify_prekey_signature(&[0; 31], &prekey.public(), &signature).is_err());
    }

    #[test]
    fn debug_output_shows_no_secrets() {
        let identity = IdentityKeyPair::generate().unwrap();
        let text = format!("{identity:?}");
        assert!(text.contains(&hex::encode(identity.identity_public())));
        assert!(!text.contains(&hex::encode(identity.signing_secret)));
        assert!(!text.contains(&hex::encode(identity.identity.secret)));
    }
}
