//! [`ContentHash`]: the SHA-256 a blob is addressed by, written as 64 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The SHA-256 of a blob's bytes: its address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// Returns the hash with these digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Returns the digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Returns the SHA-256 of `data` (for small data; stream large data through a
    /// [`ContentHasher`]).
    pub fn of(data: &[u8]) -> Self {
        let mut hasher = ContentHasher::new();
        hasher.update(data);
        hasher.finalize()
    }

    /// Returns the 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({self})")
    }
}

/// Why a string is not a [`ContentHash`]. Maps to INVALID_ARGUMENT.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid sha256 {input:?}: expected 64 lowercase hex digits")]
pub struct InvalidContentHash {
    /// The offending input, cut to 80 characters.
    pub input: String,
}

impl FromStr for ContentHash {
    type Err = InvalidContentHash;

    /// Parses exactly 64 lowercase hex digits (one spelling per blob, so one URL per blob).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidContentHash {
            input: text.chars().take(80).collect(),
        };
        if text.len() != 64
            || !text
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| invalid())?;
        Ok(Self(bytes))
    }
}

impl From<InvalidContentHash> for tonic::Status {
    fn from(error: InvalidContentHash) -> Self {
        tonic::Status::invalid_argument(error.to_string())
    }
}

/// Incremental SHA-256 over streamed bytes, yielding a [`ContentHash`].
#[derive(Clone, Debug, Default)]
pub struct ContentHasher(Sha256);

impl ContentHasher {
    /// Returns a hasher over no bytes yet.
    pub fn new() -> Self {
        Self(Sha256::new())
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// Returns the hash of every byte fed.
    pub fn finalize(self) -> ContentHash {
        ContentHash(self.0.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn hashes_and_round_trips_through_hex() {
        let hash = ContentHash::of(b"");
        assert_eq!(hash.to_string(), EMPTY_SHA256);
        assert_eq!(EMPTY_SHA256.parse::<ContentHash>().unwrap(), hash);
        let mut hasher = ContentHasher::new();
        hasher.update(b"hello ");
        hasher.update(b"world");
        assert_eq!(hasher.finalize(), ContentHash::of(b"hello world"));
    }

    #[test]
    fn refuses_malformed_hashes() {
        let upper = EMPTY_SHA256.to_uppercase();
        let too_short = &EMPTY_SHA256[..63];
        let not_hex = format!("{}g", &EMPTY_SHA256[..63]);
        let multibyte = format!("{}é", &EMPTY_SHA256[..62]);
        for input in [
            "",
            too_short,
            &upper,
            &not_hex,
            &multibyte,
            "../../etc/passwd",
        ] {
            let error = input.parse::<ContentHash>().unwrap_err();
            assert_eq!(
                tonic::Status::from(error).code(),
                tonic::Code::InvalidArgument,
                "{input}"
            );
        }
    }
}
