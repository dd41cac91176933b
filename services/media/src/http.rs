//! Plain HTTP on the gRPC port, for clients without gRPC (and browsers, `curl`, CDNs):
//!
//! - `PUT /v1/media`: the body is the blob, streamed; needs `authorization: Bearer …`.
//!   Answers `{"sha256":…,"size":…,"deduplicated":…}`; 413 past the limit (checked up
//!   front from `Content-Length` and again while streaming), 401 without a valid token.
//! - `GET` / `HEAD /v1/media/{sha256}`: no token (the hash is the capability). Single
//!   `Range: bytes=a-b` / `a-` / `-n` ranges (206 + `Content-Range`, 416 when
//!   unsatisfiable), `Content-Length`, a strong `ETag` (the hash), `If-None-Match` → 304.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, put};
use bluetick_blob::ContentHash;
use futures::TryStreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use tonic::metadata::MetadataMap;

use crate::error::{MediaError, MediaResult};
use crate::service::MediaService;
use crate::upload::MediaUpload;

/// Returns the HTTP routes, to be merged with the gRPC routes on one port.
pub(crate) fn router(service: MediaService) -> Router {
    Router::new()
        .route("/v1/media", put(put_media))
        .route("/v1/media/{sha256}", get(get_media).head(get_media))
        .with_state(service)
}

async fn put_media(
    State(service): State<MediaService>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    put_media_inner(service, headers, body)
        .await
        .unwrap_or_else(MediaError::into_http_response)
}

async fn put_media_inner(
    service: MediaService,
    headers: HeaderMap,
    body: Body,
) -> MediaResult<Response> {
    let announced_length_opt = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let device = service
        .authenticate(&MetadataMap::from_headers(headers))
        .await?;
    if let Some(announced_length) = announced_length_opt {
        MediaUpload::check_announced_size(announced_length, service.max_upload_bytes())?;
    }
    let chunks = body.into_data_stream().map_err(|error| {
        MediaError::InvalidArgument(format!("failed to read request body: {error}"))
    });
    let stored = service.store_stream(chunks, announced_length_opt).await?;
    tracing::info!(
        device = %device,
        sha256 = %stored.hash,
        size = stored.size,
        deduplicated = stored.deduplicated,
        "media uploaded over http"
    );
    let json = serde_json::json!({
        "sha256": stored.hash.to_hex(),
        "size": stored.size,
        "deduplicated": stored.deduplicated,
    });
    let status = if stored.deduplicated {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    response_builder(status, &stored.hash)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json.to_string()))
        .map_err(|error| MediaError::Internal(format!("failed to build response: {error}")))
}

async fn get_media(
    State(service): State<MediaService>,
    Path(sha256): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    get_media_inner(service, &sha256, method, headers)
        .await
        .unwrap_or_else(MediaError::into_http_response)
}

async fn get_media_inner(
    service: MediaService,
    sha256: &str,
    method: Method,
    headers: HeaderMap,
) -> MediaResult<Response> {
    let hash: ContentHash = sha256.parse()?;
    let size = service.blob_size(&hash).await?;
    let build_error =
        |error: http::Error| MediaError::Internal(format!("failed to build response: {error}"));

    if if_none_match_hits(&headers, &hash) {
        return response_builder(StatusCode::NOT_MODIFIED, &hash)
            .body(Body::empty())
            .map_err(build_error);
    }
    let range_header_opt = headers
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok());
    let (status, offset, length) = match parse_range(range_header_opt, size) {
        ByteRange::Full => (StatusCode::OK, 0, size),
        ByteRange::Partial { first, last } => {
            (StatusCode::PARTIAL_CONTENT, first, last - first + 1)
        }
        ByteRange::Unsatisfiable => {
            return response_builder(StatusCode::RANGE_NOT_SATISFIABLE, &hash)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(Body::empty())
                .map_err(build_error);
        }
    };
    let mut response = response_builder(status, &hash)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, length);
    if status == StatusCode::PARTIAL_CONTENT {
        let last = offset + length - 1;
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {offset}-{last}/{size}"),
        );
    }
    let body = if method == Method::HEAD || length == 0 {
        Body::empty()
    } else {
        let chunks = service.store().read(&hash, offset, Some(length)).await?;
        Body::from_stream(chunks)
    };
    response.body(body).map_err(build_error)
}

/// Returns a response builder with the headers every media response carries.
fn response_builder(status: StatusCode, hash: &ContentHash) -> http::response::Builder {
    let builder = http::Response::builder()
        .status(status)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable");
    match HeaderValue::from_str(&etag(hash)) {
        Ok(etag) => builder.header(header::ETAG, etag),
        Err(_) => builder,
    }
}

/// Returns the strong ETag of a blob: its hash, quoted.
fn etag(hash: &ContentHash) -> String {
    format!("\"{hash}\"")
}

/// Returns true when `If-None-Match` names this blob (or `*`): the client has it already.
fn if_none_match_hits(headers: &HeaderMap, hash: &ContentHash) -> bool {
    let expected = etag(hash);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == expected)
}

/// What a `Range` header asks of a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ByteRange {
    /// No usable range: send everything (a malformed or multi-range header is ignored, as
    /// RFC 9110 allows).
    Full,
    /// Bytes `first..=last`, both within the blob.
    Partial { first: u64, last: u64 },
    /// The range starts past the end: 416.
    Unsatisfiable,
}

/// Parses a single `bytes=` range against a blob of `size` bytes.
fn parse_range(header_opt: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = header_opt.and_then(|header| header.trim().strip_prefix("bytes=")) else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first_text, last_text)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let parse = |text: &str| text.trim().parse::<u64>().ok();
    match (first_text.trim().is_empty(), last_text.trim().is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match parse(last_text) {
            Some(0) => ByteRange::Unsatisfiable,
            Some(_) if size == 0 => ByteRange::Unsatisfiable,
            Some(suffix) => ByteRange::Partial {
                first: size.saturating_sub(suffix),
                last: size - 1,
            },
            None => ByteRange::Full,
        },
        // bytes=a-: from a to the end.
        (false, true) => match parse(first_text) {
            Some(first) if first >= size => ByteRange::Unsatisfiable,
            Some(first) => ByteRange::Partial {
                first,
                last: size - 1,
            },
            None => ByteRange::Full,
        },
        // bytes=a-b: a through b, b clamped to the end.
        (false, false) => match (parse(first_text), parse(last_text)) {
            (Some(first), Some(last)) if first <= last => {
                if first >= size {
                    ByteRange::Unsatisfiable
                } else {
                    ByteRange::Partial {
                        first,
                        last: last.min(size - 1),
                    }
                }
            }
            _ => ByteRange::Full,
        },
        (true, true) => ByteRange::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_byte_ranges() {
        use ByteRange::*;
        let cases = [
            (None, 100, Full),
            (Some("bytes=0-9"), 100, Partial { first: 0, last: 9 }),
            (
                Some("bytes=90-"),
                100,
                Partial {
                    first: 90,
                    last: 99,
                },
            ),
            (
                Some("bytes=-10"),
                100,
                Partial {
                    first: 90,
                    last: 99,
                },
            ),
            (Some("bytes=-1000"), 100, Partial { first: 0, last: 99 }),
            (
                Some("bytes=50-1000"),
                100,
                Partial {
                    first: 50,
                    last: 99,
                },
            ),
            (Some("bytes=100-"), 100, Unsatisfiable),
            (Some("bytes=100-200"), 100, Unsatisfiable),
            (Some("bytes=-0"), 100, Unsatisfiable),
            (Some("bytes=0-"), 0, Unsatisfiable),
            (Some("bytes=9-1"), 100, Full),
            (Some("bytes=0-1,5-6"), 100, Full),
            (Some("items=0-1"), 100, Full),
            (Some("bytes=x-y"), 100, Full),
        ];
        for (header, size, expected) in cases {
            assert_eq!(parse_range(header, size), expected, "{header:?}");
        }
    }

    #[test]
    fn if_none_match_matches_the_hash_etag() {
        let hash = ContentHash::of(b"abc");
        let mut headers = HeaderMap::new();
        assert!(!if_none_match_hits(&headers, &hash));
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"other\", {}", etag(&hash))).unwrap(),
        );
        assert!(if_none_match_hits(&headers, &hash));
    }
}
