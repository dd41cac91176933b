//! Safety numbers: a 60-digit number two users compare (aloud, or side by side) to know
//! that no one sits between them.
//!
//! Per user, a fingerprint over the public keys of all of the user's devices, sorted by
//! device id (`u32 device_id || identity_key || signing_key` each), computed as Signal does
//! with iterated SHA-512: `h = SHA-512(u16 version=0 || keys || user_id)`, then 5200 times
//! `h = SHA-512(h || keys)`; the first 30 bytes become six 5-digit groups (each 5 bytes, a
//! big-endian integer mod 100000). The safety number is the two users' 30 digits, the
//! lexicographically smaller user id first, so both sides see the same number. It changes
//! whenever either user's set of devices or any device key changes.

use sha2::{Digest, Sha512};

use super::primitives::KEY_BYTES;

/// SHA-512 iterations per fingerprint (Signal's value).
const ITERATIONS: usize = 5200;

/// The public keys of one device, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeys {
    /// The device number.
    pub device_id: u32,
    /// X25519 identity key.
    pub identity_key: [u8; KEY_BYTES],
    /// Ed25519 prekey-signing key.
    pub signing_key: [u8; KEY_BYTES],
}

/// Returns the 30-digit fingerprint of `user_id` with devices `devices`.
pub fn fingerprint(user_id: &str, devices: &[DeviceKeys]) -> String {
    let mut sorted = devices.to_vec();
    sorted.sort_by_key(|device| device.device_id);
    let mut keys = Vec::with_capacity(sorted.len() * 68);
    for device in &sorted {
        keys.extend_from_slice(&device.device_id.to_be_bytes());
        keys.extend_from_slice(&device.identity_key);
        keys.extend_from_slice(&device.signing_key);
    }
    let mut hasher = Sha512::new();
    hasher.update(0u16.to_be_bytes());
    hasher.update(&keys);
    hasher.update(user_id.as_bytes());
    let mut hash = hasher.finalize();
    for _ in 0..ITERATIONS {
        let mut hasher = Sha512::new();
        hasher.update(hash);
        hasher.update(&keys);
        hash = hasher.finalize();
    }
    let mut digits = String::with_capacity(30);
    for chunk in hash[..30].chunks(5) {
        let value = chunk
            .iter()
            .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
        digits.push_str(&format!("{:05}", value % 100_000));
    }
    digits
}

/// Returns the safety number of two users: 60 digits in twelve groups of five.
pub fn safety_number(
    user_a: &str,
    devices_a: &[DeviceKeys],
    user_b: &str,
    devices_b: &[DeviceKeys],
) -> String {
    let fingerprint_a = fingerprint(user_a, devices_a);
    let fingerprint_b = fingerprint(user_b, devices_b);
    let combined = if user_a <= user_b {
        fingerprint_a + &fingerprint_b
    } else {
        fingerprint_b + &fingerprint_a
    };
    combined
        .as_bytes()
        .chunks(5)
        .map(|group| String::from_utf8_lossy(group).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(device_id: u32, seed: u8) -> DeviceKeys {
        DeviceKeys {
            device_id,
            identity_key: [seed; 32],
            signing_key: [seed.wrapping_add(1); 32],
        }
    }

    #[test]
    fn both_sides_see_the_same_number_and_any_key_change_shows() {
        let alice = vec![device(1, 1), device(2, 2)];
        let bob = vec![device(1, 9)];
        let seen_by_alice = safety_number("alice", &alice, "bob", &bob);
        let seen_by_bob = safety_number("bob", &bob, "alice", &[device(2, 2), device(1, 1)]);
        assert_eq!(seen_by_alice, seen_by_bob);
        assert_eq!(seen_by_alice.len(), 60 + 11);
        assert!(
            seen_by_alice
                .chars()
                .all(|c| c.is_ascii_digit() || c == ' ')
        );
        let changed = safety_number("alice", &alice, "bob", &[device(1, 10)]);
        assert_ne!(changed, seen_by_alice);
        let more_devices = safety_number("alice", &alice, "bob", &[device(1, 9), device(2, 3)]);
        assert_ne!(more_devices, seen_by_alice);
    }
}
