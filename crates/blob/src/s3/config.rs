//! [`S3Config`]: where an [`S3BlobStore`](super::S3BlobStore) keeps its objects, parsed from
//! an `s3://` URL:
//!
//! ```text
//! s3://BUCKET[/PREFIX]?endpoint=http://127.0.0.1:8333&region=us-east-1&path_style=true
//!     [&access_key=…&secret_key=…][&create_bucket=false][&part_size=8388608]
//! ```
//!
//! - `endpoint`: the S3 API base URL; omitted, the AWS endpoint of the region (or
//!   `AWS_ENDPOINT_URL`).
//! - `region`: omitted, `AWS_REGION` or `AWS_DEFAULT_REGION`, else `us-east-1`.
//! - `path_style`: `bucket` in the path rather than the host name; defaults to true when an
//!   endpoint is given (MinIO, SeaweedFS), false otherwise (AWS).
//! - `access_key` / `secret_key`: static credentials; both or neither. Omitted, the usual
//!   AWS chain (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, profile, web identity,
//!   instance metadata). Values are percent-decoded; [`redact_url`] hides the secret in logs.
//! - `create_bucket`: create the bucket at open when it is missing (default true).
//! - `part_size`: bytes per multipart part, at least 5 MiB (default 8 MiB).

use std::fmt;

use crate::{BlobError, BlobResult, redact_blob_url as redact_url};

/// Default bytes per multipart part; also the size below which an upload is one PutObject.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;

/// The smallest part S3 accepts (all parts but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// The largest object CopyObject copies in one request; bigger ones are copied in parts.
pub const MAX_SINGLE_COPY_BYTES: u64 = 5 * 1024 * 1024 * 1024;

/// Part size of a server-side copy in parts (at most 5 GiB each, at most 10,000 parts).
pub const COPY_PART_BYTES: u64 = 1024 * 1024 * 1024;

/// Where and how an S3 blob store keeps its objects.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket holding every object of the store.
    pub bucket: String,
    /// Prepended to every key: empty, or ending in `/`.
    pub prefix: String,
    /// S3 API base URL; `None` for the AWS endpoint of the region.
    pub endpoint_opt: Option<String>,
    /// Signing region; `None` for `AWS_REGION` / `AWS_DEFAULT_REGION`, then `us-east-1`.
    pub region_opt: Option<String>,
    /// Bucket in the path (`endpoint/bucket/key`) instead of the host name.
    pub path_style: bool,
    /// Static credentials `(access key, secret key)`; `None` for the AWS default chain.
    pub credentials_opt: Option<(String, String)>,
    /// Create the bucket at open when it is missing.
    pub create_bucket: bool,
    /// Bytes per multipart part (≥ [`MIN_PART_SIZE`]); uploads smaller than one part are
    /// a single PutObject.
    pub part_size: usize,
    /// Objects up to this size are copied with one CopyObject, bigger ones in parts.
    pub max_single_copy_bytes: u64,
    /// Part size of a copy in parts (≥ [`MIN_PART_SIZE`]).
    pub copy_part_bytes: u64,
}

impl fmt::Debug for S3Config {
    /// Never prints the secret key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint_opt", &self.endpoint_opt)
            .field("region_opt", &self.region_opt)
            .field("path_style", &self.path_style)
            .field(
                "access_key_opt",
                &self
                    .credentials_opt
                    .as_ref()
                    .map(|(access_key, _)| access_key),
            )
            .field("create_bucket", &self.create_bucket)
            .field("part_size", &self.part_size)
            .field("max_single_copy_bytes", &self.max_single_copy_bytes)
            .field("copy_part_bytes", &self.copy_part_bytes)
            .finish()
    }
}

impl S3Config {
    /// Returns a config for `bucket` with every default: AWS endpoint and credential chain,
    /// virtual-hosted style, 8 MiB parts, bucket created when missing.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            prefix: String::new(),
            endpoint_opt: None,
            region_opt: None,
            path_style: false,
            credentials_opt: None,
            create_bucket: true,
            part_size: DEFAULT_PART_SIZE,
            max_single_copy_bytes: MAX_SINGLE_COPY_BYTES,
            copy_part_bytes: COPY_PART_BYTES,
        }
    }

    /// Parses an `s3://bucket[/prefix]?…` URL (see the module docs).
    ///
    /// # Errors
    /// [`BlobError::InvalidUrl`] naming the problem: another scheme, a bad bucket name or
    /// prefix, an unknown or repeated parameter, a bad value, half of a key pair.
    pub fn from_url(url: &str) -> BlobResult<Self> {
        let invalid =
            |detail: String| BlobError::InvalidUrl(format!("{}: {detail}", redact_url(url)));
        let rest = url
            .trim()
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("expected s3://bucket".to_string()))?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        validate_bucket_name(bucket).map_err(invalid)?;
        let mut config = Self::new(bucket);
        config.prefix = normalize_prefix(prefix).map_err(invalid)?;

        let mut seen: Vec<String> = Vec::new();
        let mut access_key_opt = None;
        let mut secret_key_opt = None;
        let mut path_style_opt = None;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(raw_value).ok_or_else(|| {
                invalid(format!("parameter {name} is not valid percent-encoding"))
            })?;
            if seen.iter().any(|seen_name| seen_name == name) {
                return Err(invalid(format!("parameter {name} is given twice")));
            }
            seen.push(name.to_string());
            match name {
                "endpoint" => {
                    if !(value.starts_with("http://") || value.starts_with("https://")) {
                        return Err(invalid(format!(
                            "endpoint {value:?} must start with http:// or https://"
                        )));
                    }
                    config.endpoint_opt = Some(value.trim_end_matches('/').to_string());
                }
                "region" => {
                    if value.is_empty() {
                        return Err(invalid("region must not be empty".to_string()));
                    }
                    config.region_opt = Some(value);
                }
                "path_style" => path_style_opt = Some(parse_bool(name, &value).map_err(invalid)?),
                "create_bucket" => {
                    config.create_bucket = parse_bool(name, &value).map_err(invalid)?
                }
                "access_key" => access_key_opt = Some(value),
                "secret_key" => secret_key_opt = Some(value),
                "part_size" => {
                    let part_size = value
                        .parse::<usize>()
                        .ok()
                        .filter(|size| *size >= MIN_PART_SIZE)
                        .ok_or_else(|| {
                            invalid(format!("part_size must be a byte count ≥ {MIN_PART_SIZE}"))
                        })?;
                    config.part_size = part_size;
                }
                other => return Err(invalid(format!("unknown parameter {other}"))),
            }
        }
        config.path_style = path_style_opt.unwrap_or(config.endpoint_opt.is_some());
        config.credentials_opt = match (access_key_opt, secret_key_opt) {
            (Some(access_key), Some(secret_key)) if !access_key.is_empty() => {
                Some((access_key, secret_key))
            }
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "access_key and secret_key go together, both non-empty".to_string(),
                ));
            }
        };
        Ok(config)
    }

    /// Returns the key of the blob whose hash is `hex`: `<prefix>blobs/<aa>/<hex>`.
    pub fn blob_key(&self, hex: &str) -> String {
        format!("{}blobs/{}/{hex}", self.prefix, &hex[..2.min(hex.len())])
    }

    /// Returns the prefix of upload temp keys: `<prefix>tmp/`.
    pub fn temp_prefix(&self) -> String {
        format!("{}tmp/", self.prefix)
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("{name} must be true or false, not {value:?}")),
    }
}

/// Checks the S3 bucket naming rules: 3–63 of `a-z 0-9 . -`, starting and ending with a
/// letter or digit.
fn validate_bucket_name(bucket: &str) -> Result<(), String> {
    let valid_chars = bucket.bytes().all(|byte| {
        byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'.' || byte == b'-'
    });
    let valid_ends = bucket
        .bytes()
        .next()
        .zip(bucket.bytes().last())
        .is_some_and(|(first, last)| first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric());
    if (3..=63).contains(&bucket.len()) && valid_chars && valid_ends {
        Ok(())
    } else {
        Err(format!(
            "bucket {bucket:?} is not a valid bucket name (3-63 of a-z 0-9 . -)"
        ))
    }
}

/// Returns the key prefix for the URL path: empty or `segments/` of `A-Za-z0-9 _ . -`.
fn normalize_prefix(path: &str) -> Result<String, String> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    let valid = trimmed.split('/').all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || b"_.-".contains(&byte))
    });
    if valid {
        Ok(format!("{trimmed}/"))
    } else {
        Err(format!(
            "prefix {path:?} must be /-separated segments of A-Za-z0-9 _ . -"
        ))
    }
}

/// Decodes `%XX` escapes; `None` for a malformed escape or invalid UTF-8. `+` stays `+`
/// (secret keys contain it).
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex_digits = bytes.get(index + 1..index + 3)?;
            let text = std::str::from_utf8(hex_digits).ok()?;
            decoded.push(u8::from_str_radix(text, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_parameter() {
        let config = S3Config::from_url(
            "s3://media-bucket/env/prod?endpoint=http://127.0.0.1:8333/&region=eu-west-1\
             &path_style=false&access_key=ci-key&secret_key=a%2Bb%2Fc&create_bucket=false\
             &part_size=6291456",
        )
        .unwrap();
        assert_eq!(config.bucket, "media-bucket");
        assert_eq!(config.prefix, "env/prod/");
        assert_eq!(
            config.endpoint_opt.as_deref(),
            Some("http://127.0.0.1:8333")
        );
        assert_eq!(config.region_opt.as_deref(), Some("eu-west-1"));
        assert!(!config.path_style);
        assert_eq!(
            config.credentials_opt,
            Some(("ci-key".to_string(), "a+b/c".to_string()))
        );
        assert!(!config.create_bucket);
        assert_eq!(config.part_size, 6 * 1024 * 1024);
        let hex = "ab".repeat(32);
        assert_eq!(config.blob_key(&hex), format!("env/prod/blobs/ab/{hex}"));
        assert_eq!(config.temp_prefix(), "env/prod/tmp/");
    }

    #[test]
    fn defaults_follow_the_endpoint() {
        let plain = S3Config::from_url("s3://bucket").unwrap();
        assert_eq!(plain, S3Config::new("bucket"));
        assert!(!plain.path_style && plain.create_bucket && plain.credentials_opt.is_none());
        let local = S3Config::from_url("s3://bucket?endpoint=http://localhost:9000").unwrap();
        assert!(local.path_style);
        assert_eq!(
            local.blob_key(&"0f".repeat(32)),
            format!("blobs/0f/{}", "0f".repeat(32))
        );
    }

    #[test]
    fn refuses_bad_urls() {
        for url in [
            "s3://",
            "s3://ab",
            "s3://Upper",
            "s3://-bucket",
            "s3://bucket/../x",
            "s3://bucket/a b",
            "s3://bucket?endpoint=ftp://x",
            "s3://bucket?colour=blue",
            "s3://bucket?region=a&region=b",
            "s3://bucket?path_style=maybe",
            "s3://bucket?access_key=only",
            "s3://bucket?secret_key=only",
            "s3://bucket?part_size=1024",
            "s3://bucket?secret_key=%zz&access_key=k",
            "file:///tmp",
        ] {
            assert!(
                matches!(S3Config::from_url(url), Err(BlobError::InvalidUrl(_))),
                "{url}"
            );
        }
    }

    #[test]
    fn secrets_stay_out_of_errors_logs_and_debug() {
        let url = "s3://bucket?access_key=ci-key&secret_key=hunter2&colour=blue";
        assert_eq!(
            redact_url(url),
            "s3://bucket?access_key=ci-key&secret_key=***&colour=blue"
        );
        let error = S3Config::from_url(url).unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
        let config =
            S3Config::from_url("s3://bucket?access_key=ci-key&secret_key=hunter2").unwrap();
        let debug = format!("{config:?}");
        assert!(
            debug.contains("ci-key") && !debug.contains("hunter2"),
            "{debug}"
        );
    }
}
