//! The cryptographic primitives exactly as the protocol uses them, each a thin wrapper over a
//! well-kept crate: X25519 (`x25519-dalek`), HKDF-SHA256 (`hkdf`), HMAC-SHA256 (`hmac`, via
//! `hkdf`), AES-256-GCM (`aes-gcm`) and the operating system's random generator (`rand`).
//! Known-answer tests at the end pin every parameter (RFC 7748, RFC 5869, RFC 4231, and the
//! McGrew-Viega GCM vectors).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use hkdf::hmac::{Hmac, Mac};
use rand::TryRngCore;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::{E2eError, E2eResult};

/// Length of X25519 keys and of every symmetric key.
pub const KEY_BYTES: usize = 32;
/// Length of an AES-GCM nonce.
pub const NONCE_BYTES: usize = 12;
/// Length of an AES-GCM tag.
pub const TAG_BYTES: usize = 16;

/// Returns `N` bytes from the operating system's random generator.
///
/// # Errors
/// [`E2eError::Random`] when the OS generator fails.
pub fn random_array<const N: usize>() -> E2eResult<[u8; N]> {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|error| E2eError::Random(error.to_string()))?;
    Ok(bytes)
}

/// Returns a fresh X25519 secret (clamped by `x25519-dalek`).
#[cfg(test)]
///
/// # Errors
/// [`E2eError::Random`] when the OS generator fails.
pub fn new_x25519_secret() -> E2eResult<StaticSecret> {
    let bytes = Zeroizing::new(random_array::<KEY_BYTES>()?);
    Ok(StaticSecret::from(*bytes))
}

/// Returns X25519(secret, public), refusing a non-contributory result (a low-order public
/// key, which would make the shared secret predictable).
///
/// # Errors
/// [`E2eError::BadKey`] for a low-order public key.
pub fn dh(secret: &StaticSecret, public: &[u8; KEY_BYTES]) -> E2eResult<Zeroizing<[u8; 32]>> {
    let shared = secret.diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(E2eError::BadKey("low-order x25519 public key".into()));
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// Fills `output` with HKDF-SHA256(salt, ikm, info) (RFC 5869 extract, then expand).
///
/// # Errors
/// [`E2eError::Internal`] when `output` is longer than HKDF allows (255 × 32 bytes).
pub fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], output: &mut [u8]) -> E2eResult<()> {
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, output)
        .map_err(|_| E2eError::Internal("hkdf output too long".into()))
}

/// Returns HMAC-SHA256(key, data).
///
/// # Errors
/// [`E2eError::Internal`] never in practice (HMAC takes keys of any length).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> E2eResult<Zeroizing<[u8; 32]>> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .map_err(|_| E2eError::Internal("hmac refused its key".into()))?;
    mac.update(data);
    Ok(Zeroizing::new(mac.finalize().into_bytes().into()))
}

/// Returns AES-256-GCM(key, nonce) of `plaintext` with `associated_data`: ciphertext || tag.
///
/// # Errors
/// [`E2eError::Internal`] if the cipher refuses (plaintext over 64 GiB).
pub fn aead_seal(
    key: &[u8; KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
    plaintext: &[u8],
    associated_data: &[u8],
) -> E2eResult<Vec<u8>> {
    Aes256Gcm::new(key.into())
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad: associated_data,
            },
        )
        .map_err(|_| E2eError::Internal("aes-gcm refused to seal".into()))
}

/// Returns the plaintext of AES-256-GCM `ciphertext` (ciphertext || tag).
///
/// # Errors
/// [`E2eError::Decrypt`] when the tag does not verify (any altered byte of key, nonce,
/// ciphertext, tag or associated data).
pub fn aead_open(
    key: &[u8; KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
    ciphertext: &[u8],
    associated_data: &[u8],
) -> E2eResult<Zeroizing<Vec<u8>>> {
    Aes256Gcm::new(key.into())
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: associated_data,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| E2eError::Decrypt)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn array32(text: &str) -> [u8; 32] {
        hex::decode(text).unwrap().try_into().unwrap()
    }

    /// RFC 7748 section 5.2, first vector: X25519 of a scalar and a u-coordinate.
    #[test]
    fn x25519_matches_rfc7748_function_vector() {
        let scalar = array32("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
        let u = array32("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
        let out = dh(&StaticSecret::from(scalar), &u).unwrap();
        assert_eq!(
            hex::encode(*out),
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
        );
    }

    /// RFC 7748 section 6.1: Alice's and Bob's public keys and their shared secret.
    #[test]
    fn x25519_matches_rfc7748_diffie_hellman_vector() {
        let alice = StaticSecret::from(array32(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob = StaticSecret::from(array32(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        let alice_public = PublicKey::from(&alice);
        let bob_public = PublicKey::from(&bob);
        assert_eq!(
            hex::encode(alice_public.as_bytes()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        assert_eq!(
            hex::encode(bob_public.as_bytes()),
            "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
        );
        let shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742";
        assert_eq!(
            hex::encode(*dh(&alice, bob_public.as_bytes()).unwrap()),
            shared
        );
        assert_eq!(
            hex::encode(*dh(&bob, alice_public.as_bytes()).unwrap()),
            shared
        );
    }

    #[test]
    fn x25519_refuses_low_order_points() {
        let secret = new_x25519_secret().unwrap();
        assert!(matches!(dh(&secret, &[0u8; 32]), Err(E2eError::BadKey(_))));
    }

    /// RFC 5869 test cases 1 and 3 (HKDF-SHA256, with and without salt and info).
    #[test]
    fn hkdf_matches_rfc5869() {
        let ikm = [0x0bu8; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let mut okm = [0u8; 42];
        hkdf_sha256(&salt, &ikm, &info, &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
        // Test case 3: empty salt (treated as HashLen zeros) and empty info.
        hkdf_sha256(&[], &ikm, &[], &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
        );
        // The protocol passes 32 zero bytes where it means "no salt": same as RFC's default.
        let mut with_zero_salt = [0u8; 42];
        hkdf_sha256(&[0u8; 32], &ikm, &[], &mut with_zero_salt).unwrap();
        assert_eq!(with_zero_salt, okm);
    }

    /// RFC 4231 test case 2 (HMAC-SHA256).
    #[test]
    fn hmac_matches_rfc4231() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?").unwrap();
        assert_eq!(
            hex::encode(*mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// McGrew & Viega GCM test case 16 (AES-256, 60-byte plaintext, 20-byte AAD), also in
    /// NIST's GCM validation set.
    #[test]
    fn aes_gcm_matches_mcgrew_viega_test_case_16() {
        let key = array32("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
        let nonce: [u8; 12] = hex::decode("cafebabefacedbaddecaf888")
            .unwrap()
            .try_into()
            .unwrap();
        let plaintext = hex::decode(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        )
        .unwrap();
        let aad = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").unwrap();
        let sealed = aead_seal(&key, &nonce, &plaintext, &aad).unwrap();
        assert_eq!(
            hex::encode(&sealed[..plaintext.len()]),
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
        );
        assert_eq!(
            hex::encode(&sealed[plaintext.len()..]),
            "76fc6ece0f4e1768cddf8853bb2d551b"
        );
        assert_eq!(
            &aead_open(&key, &nonce, &sealed, &aad).unwrap()[..],
            &plaintext[..]
        );
        let mut bad_aad = aad.clone();
        bad_aad[0] ^= 1;
        assert!(matches!(
            aead_open(&key, &nonce, &sealed, &bad_aad),
            Err(E2eError::Decrypt)
        ));
    }

    /// McGrew & Viega GCM test case 13 (AES-256, empty plaintext and AAD, zero key).
    #[test]
    fn aes_gcm_matches_mcgrew_viega_test_case_13() {
        let sealed = aead_seal(&[0u8; 32], &[0u8; 12], &[], &[]).unwrap();
        assert_eq!(hex::encode(sealed), "530f8afbc74536b9a963b4f1c4cb738b");
    }

    #[test]
    fn random_arrays_differ() {
        assert_ne!(random_array::<32>().unwrap(), random_array::<32>().unwrap());
    }
}
