//! [`Content`]: the small message format of the CLI and the tests, carried as JSON in the
//! opaque payload. The server never looks at it (a later layer encrypts it).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::ClientResult;

/// What a message says. Encoded as JSON, e.g. `{"text":"hi"}` or
/// `{"media":{"sha256":"…","size":3,"mime":"image/png","name":"a.png"}}`.
/// Unknown fields are ignored when decoding so later versions can add some.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// A text message.
    Text(String),
    /// A file stored in the media service, addressed by its hash.
    Media {
        /// Lowercase hex SHA-256 of the stored bytes.
        sha256: String,
        /// Size in bytes.
        size: u64,
        /// MIME type, e.g. `image/jpeg`.
        mime: String,
        /// The file name as the sender had it (untrusted: never use it as a path as is).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Optional caption.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caption: Option<String>,
    },
}

impl Content {
    /// Returns a text message.
    pub fn text(text: impl Into<String>) -> Self {
        Content::Text(text.into())
    }

    /// Returns the payload bytes of this content.
    pub fn encode(&self) -> Bytes {
        // Serializing these plain types cannot fail; fall back to an empty object anyway.
        Bytes::from(serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec()))
    }

    /// Returns the content encoded in `payload`.
    ///
    /// # Errors
    /// [`crate::ClientError::Content`] when the bytes are not a known content.
    pub fn decode(payload: &[u8]) -> ClientResult<Self> {
        Ok(serde_json::from_slice(payload)?)
    }

    /// Returns a one-line human summary (text as is, media as `[mime name, size]`).
    pub fn summary(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Media {
                size,
                mime,
                name,
                caption,
                ..
            } => {
                let mut line = format!(
                    "[{mime} {}, {size} bytes]",
                    name.as_deref().unwrap_or("file")
                );
                if let Some(caption) = caption {
                    line.push(' ');
                    line.push_str(caption);
                }
                line
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_as_compact_json() {
        let content = Content::text("hello ✓✓");
        let bytes = content.encode();
        assert_eq!(&bytes[..], "{\"text\":\"hello ✓✓\"}".as_bytes());
        assert_eq!(Content::decode(&bytes).unwrap(), content);
    }

    #[test]
    fn media_round_trips_and_skips_absent_fields() {
        let content = Content::Media {
            sha256: "ab".repeat(32),
            size: 3,
            mime: "image/png".into(),
            name: Some("cat.png".into()),
            caption: None,
        };
        let bytes = content.encode();
        assert!(!String::from_utf8_lossy(&bytes).contains("caption"));
        assert_eq!(Content::decode(&bytes).unwrap(), content);
        assert_eq!(content.summary(), "[image/png cat.png, 3 bytes]");
    }

    #[test]
    fn unknown_fields_are_ignored_and_garbage_is_an_error() {
        let decoded = Content::decode(
            br#"{"media":{"sha256":"00","size":1,"mime":"a/b","key":"future field"}}"#,
        )
        .unwrap();
        assert!(matches!(decoded, Content::Media { name: None, .. }));
        assert!(Content::decode(b"\x00\x01 not json").is_err());
        assert!(Content::decode(br#"{"sticker":1}"#).is_err());
    }
}
