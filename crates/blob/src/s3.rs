//! [`S3BlobStore`]: blobs as objects of an S3 bucket (AWS, MinIO, SeaweedFS…), through
//! `aws-sdk-s3`. Configured by an `s3://` URL ([`S3Config`]).
//!
//! Layout: `<prefix>blobs/<aa>/<64 hex digits>` per blob (`aa` = first hash byte, as in the
//! local store), `<prefix>tmp/<random>` for big uploads in progress.
//!
//! Uploads are streamed and hold at most about two parts in memory (one being filled, one
//! being sent), whatever the blob's size:
//!
//! - bytes are buffered up to one part ([`S3Config::part_size`], 8 MiB by default);
//! - an upload that finishes within its first part is one `PutObject` straight to the hash
//!   key (after a `HeadObject`: an existing blob is not written again);
//! - once the first part is full, a multipart upload starts on a fresh temp key and every
//!   full part is sent while the next one fills. On finish the last part is sent, then a
//!   `HeadObject` of the hash key decides: present → `AbortMultipartUpload` (deduplicated,
//!   nothing is written); absent → `CompleteMultipartUpload`, server-side copy to the hash
//!   key (`CopyObject` up to 5 GiB, `UploadPartCopy` parts beyond) and delete the temp;
//! - abort, a failure, or dropping the upload aborts the multipart upload (on drop in a
//!   spawned task, best effort). Leftovers of a crash (temp objects, multipart uploads
//!   older than an hour) are swept when a store is opened; a bucket lifecycle rule
//!   (`AbortIncompleteMultipartUpload`, expiry on `tmp/`) is the belt to these braces.
//!
//! A blob becomes visible under its hash in one step (a `PutObject`, `CopyObject` or
//! `CompleteMultipartUpload` is atomic), so readers never see part of one.
//!
//! Requests use SigV4, path-style addressing when configured, and checksums only when an
//! operation requires them (`WhenRequired`: S3-compatible servers reject the SDK's
//! default CRC32 headers). Part and PutObject payloads are sent unsigned
//! (`UNSIGNED-PAYLOAD`): the caller already hashes every byte, so hashing each part
//! again for the signature would double the CPU per upload.
//!
//! Errors: connection failures, timeouts and 5xx/429 answers are [`BlobError::Unavailable`]
//! (the service answers UNAVAILABLE and the client retries); 404 is
//! [`BlobError::NotFound`]; anything else (403, a missing bucket…) is
//! [`BlobError::Backend`]. The SDK opens connections per request, so calls work again once
//! the server is back, without reopening the store.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
};
use aws_smithy_http_client::tls::{Provider as TlsProvider, rustls_provider::CryptoMode};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::{
    BlobError, BlobResult, BlobStore, BlobStream, BlobUpload, ContentHash, FinishedUpload,
    checked_read_length,
};

mod config;

pub use config::{
    COPY_PART_BYTES, DEFAULT_PART_SIZE, MAX_SINGLE_COPY_BYTES, MIN_PART_SIZE, S3Config,
};

/// Temp objects and multipart uploads untouched for this long are leftovers of a crash,
/// swept on open.
const STALE_UPLOAD_AGE: Duration = Duration::from_secs(3600);

/// How long to wait for a TCP connection to the endpoint before calling it unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Region used when neither the URL nor `AWS_REGION` / `AWS_DEFAULT_REGION` names one.
const FALLBACK_REGION: &str = "us-east-1";

/// Blobs as objects of an S3 bucket. Cheap to clone.
#[derive(Clone, Debug)]
pub struct S3BlobStore {
    shared: Arc<Shared>,
}

/// What the store and its uploads share.
#[derive(Debug)]
struct Shared {
    client: Client,
    config: S3Config,
    /// For error messages: where the server is.
    endpoint_label: String,
}

impl S3BlobStore {
    /// Returns a store on the bucket of `config`: checks the bucket is reachable, creates
    /// it when missing (if allowed), and sweeps stale temp objects and multipart uploads.
    ///
    /// # Errors
    /// [`BlobError::Unavailable`] when the endpoint cannot be reached (the message names
    /// it), [`BlobError::Backend`] when the bucket is missing and may not be created or
    /// the credentials are refused.
    pub async fn open(config: S3Config) -> BlobResult<Self> {
        let client = build_client(&config).await;
        let endpoint_label = config
            .endpoint_opt
            .clone()
            .unwrap_or_else(|| "the AWS S3 endpoint".to_string());
        let store = Self {
            shared: Arc::new(Shared {
                client,
                config,
                endpoint_label,
            }),
        };
        store.ensure_bucket().await?;
        store.sweep_stale_uploads().await;
        Ok(store)
    }

    /// Returns the configuration the store runs with.
    pub fn config(&self) -> &S3Config {
        &self.shared.config
    }

    /// Returns the SDK client, for tests and tools that look at the bucket directly.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Returns the key of the blob under `hash`.
    pub fn blob_key(&self, hash: &ContentHash) -> String {
        self.shared.config.blob_key(&hash.to_hex())
    }

    async fn ensure_bucket(&self) -> BlobResult<()> {
        let shared = &self.shared;
        let bucket = &shared.config.bucket;
        let head = shared.client.head_bucket().bucket(bucket).send().await;
        match head {
            Ok(_) => return Ok(()),
            Err(error) if status_of(&error) == Some(404) => {}
            Err(error) => {
                return Err(shared.error(format!("cannot open bucket {bucket}"), error));
            }
        }
        if !shared.config.create_bucket {
            return Err(BlobError::Backend(format!(
                "bucket {bucket} does not exist at {} (and create_bucket=false)",
                shared.endpoint_label
            )));
        }
        let mut create = shared.client.create_bucket().bucket(bucket);
        // us-east-1 is the one region that takes no location constraint.
        if let Some(region) = shared
            .client
            .config()
            .region()
            .map(|region| region.as_ref())
            .filter(|region| *region != FALLBACK_REGION)
        {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => {
                tracing::info!(%bucket, endpoint = %shared.endpoint_label, "created blob bucket");
                Ok(())
            }
            // Another replica created it first.
            Err(error) if status_of(&error) == Some(409) => Ok(()),
            Err(error) => Err(shared.error(format!("cannot create bucket {bucket}"), error)),
        }
    }

    /// Aborts multipart uploads and deletes temp objects older than [`STALE_UPLOAD_AGE`]
    /// (one listing page each; failures are logged, never fatal).
    async fn sweep_stale_uploads(&self) {
        let shared = &self.shared;
        let temp_prefix = shared.config.temp_prefix();
        let cutoff_secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |now| {
                now.as_secs().saturating_sub(STALE_UPLOAD_AGE.as_secs())
            }) as i64;
        let is_stale = |time_opt: Option<&aws_sdk_s3::primitives::DateTime>| {
            time_opt.is_some_and(|time| time.secs() < cutoff_secs)
        };
        match shared
            .client
            .list_multipart_uploads()
            .bucket(&shared.config.bucket)
            .prefix(&temp_prefix)
            .send()
            .await
        {
            Ok(listing) => {
                for upload in listing.uploads() {
                    if let (Some(key), Some(upload_id)) = (upload.key(), upload.upload_id())
                        && is_stale(upload.initiated())
                    {
                        tracing::info!(%key, "aborting stale multipart upload");
                        shared.abort_multipart(key, upload_id).await;
                    }
                }
            }
            Err(error) => tracing::warn!(
                error = %DisplayErrorContext(&error),
                "cannot list multipart uploads to sweep"
            ),
        }
        match shared
            .client
            .list_objects_v2()
            .bucket(&shared.config.bucket)
            .prefix(&temp_prefix)
            .send()
            .await
        {
            Ok(listing) => {
                for object in listing.contents() {
                    if let Some(key) = object.key()
                        && is_stale(object.last_modified())
                    {
                        tracing::info!(%key, "deleting stale upload temp object");
                        shared.delete_quietly(key).await;
                    }
                }
            }
            Err(error) => tracing::warn!(
                error = %DisplayErrorContext(&error),
                "cannot list temp objects to sweep"
            ),
        }
    }
}

/// Returns an SDK client for `config`: rustls (ring) HTTPS client, explicit or chained
/// credentials and region, checksums only when required, path style as configured.
async fn build_client(config: &S3Config) -> Client {
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(TlsProvider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .build(),
        );
    // Always an explicit region: the default chain would ask instance metadata, which off
    // AWS is a slow, noisy failure.
    let region = config
        .region_opt
        .clone()
        .or_else(|| {
            std::env::var("AWS_REGION")
                .ok()
                .filter(|region| !region.is_empty())
        })
        .or_else(|| {
            std::env::var("AWS_DEFAULT_REGION")
                .ok()
                .filter(|region| !region.is_empty())
        })
        .unwrap_or_else(|| FALLBACK_REGION.to_string());
    loader = loader.region(Region::new(region));
    if let Some(endpoint) = &config.endpoint_opt {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some((access_key, secret_key)) = &config.credentials_opt {
        loader = loader.credentials_provider(Credentials::new(
            access_key,
            secret_key,
            None,
            None,
            "bluetick-blob-url",
        ));
    }
    let sdk_config = loader.load().await;
    let s3_config = aws_sdk_s3::config::Builder::from(&sdk_config)
        .force_path_style(config.path_style)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(s3_config)
}

/// Returns the HTTP status of a service error, `None` when there was no answer.
fn status_of<E>(error: &SdkError<E>) -> Option<u16> {
    match error {
        SdkError::ServiceError(service_error) => Some(service_error.raw().status().as_u16()),
        SdkError::ResponseError(response_error) => Some(response_error.raw().status().as_u16()),
        _ => None,
    }
}

impl Shared {
    /// Maps an SDK error to a [`BlobError`]: no answer, 5xx and 429 → Unavailable, other
    /// answers → Backend. Callers handle 404 themselves where it means "no such blob".
    fn error<E>(&self, context: String, error: SdkError<E>) -> BlobError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let unavailable = match &error {
            SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
                status_of(&error).is_none_or(|status| status >= 500 || status == 429)
            }
            SdkError::ConstructionFailure(_) => false,
            // Dispatch failures (refused, reset, DNS), timeouts and future variants.
            _ => true,
        };
        let detail = format!(
            "{context} at {}: {}",
            self.endpoint_label,
            DisplayErrorContext(&error)
        );
        if unavailable {
            BlobError::Unavailable(detail)
        } else {
            BlobError::Backend(detail)
        }
    }

    /// Returns the size of the object under `key`, `None` when there is none.
    async fn head_size(&self, key: &str) -> BlobResult<Option<u64>> {
        match self
            .client
            .head_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(
                head.content_length()
                    .and_then(|length| u64::try_from(length).ok())
                    .unwrap_or(0),
            )),
            Err(error) if status_of(&error) == Some(404) => Ok(None),
            Err(error) => Err(self.error(format!("cannot stat {key}"), error)),
        }
    }

    async fn put_object(&self, key: &str, body: Bytes) -> BlobResult<()> {
        self.client
            .put_object()
            .bucket(&self.config.bucket)
            .key(key)
            .content_type("application/octet-stream")
            .body(ByteStream::from(body))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|error| self.error(format!("cannot put {key}"), error))?;
        Ok(())
    }

    async fn create_multipart(&self, key: &str) -> BlobResult<String> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .content_type("application/octet-stream")
            .send()
            .await
            .map_err(|error| self.error(format!("cannot start multipart upload {key}"), error))?;
        created
            .upload_id()
            .map(str::to_string)
            .ok_or_else(|| BlobError::Backend(format!("no upload id for multipart upload {key}")))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> BlobResult<CompletedPart> {
        let uploaded = self
            .client
            .upload_part()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .body(ByteStream::from(body))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|error| {
                self.error(format!("cannot upload part {part_number} of {key}"), error)
            })?;
        let e_tag = uploaded.e_tag().ok_or_else(|| {
            BlobError::Backend(format!("no etag for part {part_number} of {key}"))
        })?;
        Ok(CompletedPart::builder()
            .e_tag(e_tag)
            .part_number(part_number)
            .build())
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        mut parts: Vec<CompletedPart>,
    ) -> BlobResult<()> {
        parts.sort_by_key(|part| part.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|error| {
                self.error(format!("cannot complete multipart upload {key}"), error)
            })?;
        Ok(())
    }

    /// Aborts a multipart upload; failures are logged (the sweep on open retries).
    async fn abort_multipart(&self, key: &str, upload_id: &str) {
        if let Err(error) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            && status_of(&error) != Some(404)
        {
            tracing::warn!(
                %key,
                error = %DisplayErrorContext(&error),
                "cannot abort multipart upload"
            );
        }
    }

    async fn delete_object(&self, key: &str) -> BlobResult<()> {
        self.client
            .delete_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
            .map_err(|error| self.error(format!("cannot delete {key}"), error))?;
        Ok(())
    }

    /// Deletes `key`, logging a failure (the sweep on open retries).
    async fn delete_quietly(&self, key: &str) {
        if let Err(error) = self.delete_object(key).await {
            tracing::warn!(%key, %error, "cannot delete object");
        }
    }

    /// Copies `source_key` (of `size` bytes) to `target_key` on the server.
    async fn copy_object(&self, source_key: &str, target_key: &str, size: u64) -> BlobResult<()> {
        let copy_source = format!("{}/{source_key}", self.config.bucket);
        if size <= self.config.max_single_copy_bytes {
            self.client
                .copy_object()
                .bucket(&self.config.bucket)
                .key(target_key)
                .copy_source(&copy_source)
                .content_type("application/octet-stream")
                .send()
                .await
                .map_err(|error| self.error(format!("cannot copy to {target_key}"), error))?;
            return Ok(());
        }
        let upload_id = self.create_multipart(target_key).await?;
        match self
            .copy_in_parts(&copy_source, target_key, &upload_id, size)
            .await
        {
            Ok(parts) => {
                let completed = self.complete_multipart(target_key, &upload_id, parts).await;
                if completed.is_err() {
                    self.abort_multipart(target_key, &upload_id).await;
                }
                completed
            }
            Err(error) => {
                self.abort_multipart(target_key, &upload_id).await;
                Err(error)
            }
        }
    }

    async fn copy_in_parts(
        &self,
        copy_source: &str,
        target_key: &str,
        upload_id: &str,
        size: u64,
    ) -> BlobResult<Vec<CompletedPart>> {
        let part_bytes = self.config.copy_part_bytes.max(MIN_PART_SIZE as u64);
        let mut parts = Vec::new();
        let mut first = 0u64;
        let mut part_number = 1i32;
        while first < size {
            let last = (first + part_bytes).min(size) - 1;
            let copied = self
                .client
                .upload_part_copy()
                .bucket(&self.config.bucket)
                .key(target_key)
                .upload_id(upload_id)
                .part_number(part_number)
                .copy_source(copy_source)
                .copy_source_range(format!("bytes={first}-{last}"))
                .send()
                .await
                .map_err(|error| {
                    self.error(
                        format!("cannot copy part {part_number} to {target_key}"),
                        error,
                    )
                })?;
            let e_tag = copied
                .copy_part_result()
                .and_then(|result| result.e_tag())
                .ok_or_else(|| {
                    BlobError::Backend(format!("no etag for copied part {part_number}"))
                })?;
            parts.push(
                CompletedPart::builder()
                    .e_tag(e_tag)
                    .part_number(part_number)
                    .build(),
            );
            first = last + 1;
            part_number += 1;
        }
        Ok(parts)
    }

    /// Returns a stream of `length` (> 0) bytes of `key` from `offset`.
    async fn get_range(
        &self,
        hash: &ContentHash,
        key: &str,
        offset: u64,
        length: u64,
    ) -> BlobResult<BlobStream> {
        let last = offset + length - 1;
        let object = match self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .range(format!("bytes={offset}-{last}"))
            .send()
            .await
        {
            Ok(object) => object,
            Err(error) if status_of(&error) == Some(404) => return Err(BlobError::NotFound(*hash)),
            Err(error) => return Err(self.error(format!("cannot read {key}"), error)),
        };
        // A server that ignores Range would send the whole object: refuse rather than
        // hand out the wrong bytes.
        let returned_length_opt = object
            .content_length()
            .and_then(|returned| u64::try_from(returned).ok());
        if returned_length_opt.is_some_and(|returned| returned != length) {
            return Err(BlobError::Backend(format!(
                "asked {key} for {length} bytes from {offset}, got {returned_length_opt:?}"
            )));
        }
        let endpoint_label = self.endpoint_label.clone();
        let key = key.to_string();
        let stream = futures::stream::unfold(Some(object.body), move |body_opt| {
            let endpoint_label = endpoint_label.clone();
            let key = key.clone();
            async move {
                let mut body = body_opt?;
                loop {
                    match body.next().await {
                        Some(Ok(chunk)) if chunk.is_empty() => continue,
                        Some(Ok(chunk)) => return Some((Ok(chunk), Some(body))),
                        Some(Err(error)) => {
                            let error = BlobError::Unavailable(format!(
                                "reading {key} from {endpoint_label} failed: {}",
                                DisplayErrorContext(&error)
                            ));
                            return Some((Err(error), None));
                        }
                        None => return None,
                    }
                }
            }
        });
        Ok(stream.boxed())
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn begin_upload(&self) -> BlobResult<Box<dyn BlobUpload>> {
        Ok(Box::new(S3Upload {
            shared: self.shared.clone(),
            buffer: BytesMut::new(),
            written_bytes: 0,
            multipart_opt: None,
        }))
    }

    async fn stat(&self, hash: &ContentHash) -> BlobResult<Option<u64>> {
        self.shared.head_size(&self.blob_key(hash)).await
    }

    async fn read(
        &self,
        hash: &ContentHash,
        offset: u64,
        length: Option<u64>,
    ) -> BlobResult<BlobStream> {
        let key = self.blob_key(hash);
        let size = self
            .shared
            .head_size(&key)
            .await?
            .ok_or(BlobError::NotFound(*hash))?;
        let read_length = checked_read_length(offset, length, size)?;
        if read_length == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        self.shared.get_range(hash, &key, offset, read_length).await
    }
}

/// A multipart upload under way on a temp key.
#[derive(Debug)]
struct Multipart {
    temp_key: String,
    upload_id: String,
    /// Parts the server confirmed, in any order.
    completed_parts: Vec<CompletedPart>,
    /// The part being sent while the next one fills (at most one, bounding memory).
    in_flight_opt: Option<JoinHandle<BlobResult<CompletedPart>>>,
    next_part_number: i32,
}

impl Multipart {
    /// Waits for the part being sent, if any.
    async fn settle_in_flight(&mut self) -> BlobResult<()> {
        if let Some(in_flight) = self.in_flight_opt.take() {
            let part = in_flight.await.map_err(|join_error| {
                BlobError::Io(std::io::Error::other(format!(
                    "part upload task failed: {join_error}"
                )))
            })??;
            self.completed_parts.push(part);
        }
        Ok(())
    }
}

/// An upload into an [`S3BlobStore`]: buffered up to one part, then multipart on a temp key.
#[derive(Debug)]
struct S3Upload {
    shared: Arc<Shared>,
    /// Bytes not sent yet, less than one part.
    buffer: BytesMut,
    written_bytes: u64,
    /// Set once the first part is full; taken by finish and abort, so `Drop` aborts only
    /// uploads left unfinished.
    multipart_opt: Option<Multipart>,
}

impl S3Upload {
    fn part_size(&self) -> usize {
        self.shared.config.part_size
    }

    /// Sends the full buffer as the next part (starting the multipart upload first if
    /// needed), after the previous part has been confirmed.
    async fn send_buffer_as_part(&mut self) -> BlobResult<()> {
        let part_size = self.part_size();
        let part = std::mem::replace(&mut self.buffer, BytesMut::new()).freeze();
        if self.multipart_opt.is_none() {
            let temp_key = format!(
                "{}{:032x}",
                self.shared.config.temp_prefix(),
                rand::random::<u128>()
            );
            let upload_id = self.shared.create_multipart(&temp_key).await?;
            self.multipart_opt = Some(Multipart {
                temp_key,
                upload_id,
                completed_parts: Vec::new(),
                in_flight_opt: None,
                next_part_number: 1,
            });
        }
        let multipart = self
            .multipart_opt
            .as_mut()
            .ok_or_else(|| BlobError::Io(std::io::Error::other("multipart upload missing")))?;
        multipart.settle_in_flight().await?;
        let part_number = multipart.next_part_number;
        multipart.next_part_number += 1;
        let shared = self.shared.clone();
        let temp_key = multipart.temp_key.clone();
        let upload_id = multipart.upload_id.clone();
        multipart.in_flight_opt = Some(tokio::spawn(async move {
            shared
                .upload_part(&temp_key, &upload_id, part_number, part)
                .await
        }));
        self.buffer.reserve(part_size);
        Ok(())
    }

    /// Finishes the multipart upload: last part, dedup check, complete, copy, delete the
    /// temp. Returns whether the blob was there already. The multipart upload stays in
    /// `self` until it is fully handled, so a cancelled finish is cleaned up by `Drop`.
    async fn finish_multipart(&mut self, hash_key: &str) -> BlobResult<bool> {
        let Self {
            shared,
            buffer,
            written_bytes,
            multipart_opt,
        } = self;
        let multipart = multipart_opt
            .as_mut()
            .ok_or_else(|| BlobError::Io(std::io::Error::other("multipart upload missing")))?;
        multipart.settle_in_flight().await?;
        if !buffer.is_empty() {
            let part = std::mem::take(buffer).freeze();
            let part_number = multipart.next_part_number;
            multipart.next_part_number += 1;
            let completed = shared
                .upload_part(&multipart.temp_key, &multipart.upload_id, part_number, part)
                .await?;
            multipart.completed_parts.push(completed);
        }
        if shared.head_size(hash_key).await?.is_some() {
            shared
                .abort_multipart(&multipart.temp_key, &multipart.upload_id)
                .await;
            *multipart_opt = None;
            return Ok(true);
        }
        let parts = std::mem::take(&mut multipart.completed_parts);
        let part_count = parts.len();
        let started = std::time::Instant::now();
        shared
            .complete_multipart(&multipart.temp_key, &multipart.upload_id, parts)
            .await?;
        let completed = started.elapsed();
        shared
            .copy_object(&multipart.temp_key, hash_key, *written_bytes)
            .await?;
        let copied = started.elapsed() - completed;
        shared.delete_quietly(&multipart.temp_key).await;
        *multipart_opt = None;
        tracing::info!(
            key = %hash_key,
            size = *written_bytes,
            parts = part_count,
            complete_ms = completed.as_millis() as u64,
            copy_ms = copied.as_millis() as u64,
            "multipart upload stored"
        );
        Ok(false)
    }
}

#[async_trait]
impl BlobUpload for S3Upload {
    async fn write(&mut self, mut chunk: Bytes) -> BlobResult<()> {
        self.written_bytes += chunk.len() as u64;
        let part_size = self.part_size();
        while !chunk.is_empty() {
            if self.buffer.capacity() == 0 {
                self.buffer
                    .reserve(part_size.min(chunk.len().max(64 * 1024)));
            }
            let take = (part_size - self.buffer.len()).min(chunk.len());
            self.buffer.extend_from_slice(&chunk.split_to(take));
            if self.buffer.len() == part_size {
                self.send_buffer_as_part().await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>, hash: ContentHash) -> BlobResult<FinishedUpload> {
        let hash_key = self.shared.config.blob_key(&hash.to_hex());
        let size = self.written_bytes;
        if self.multipart_opt.is_none() {
            // Less than one part: one PutObject, straight to the hash key.
            if self.shared.head_size(&hash_key).await?.is_some() {
                return Ok(FinishedUpload {
                    size,
                    deduplicated: true,
                });
            }
            let body = std::mem::take(&mut self.buffer).freeze();
            self.shared.put_object(&hash_key, body).await?;
            return Ok(FinishedUpload {
                size,
                deduplicated: false,
            });
        }
        match self.finish_multipart(&hash_key).await {
            Ok(deduplicated) => Ok(FinishedUpload { size, deduplicated }),
            Err(error) => {
                if let Some(multipart) = self.multipart_opt.take() {
                    abort_multipart(&self.shared, multipart).await;
                }
                Err(error)
            }
        }
    }

    async fn abort(mut self: Box<Self>) -> BlobResult<()> {
        self.buffer = BytesMut::new();
        if let Some(multipart) = self.multipart_opt.take() {
            abort_multipart(&self.shared, multipart).await;
        }
        Ok(())
    }
}

/// Cancels the part in flight and aborts the multipart upload (a completed temp object,
/// if any, is deleted too).
async fn abort_multipart(shared: &Shared, mut multipart: Multipart) {
    if let Some(in_flight) = multipart.in_flight_opt.take() {
        in_flight.abort();
        // Wait until the request is really gone, so it cannot add a part after the abort.
        let _ = in_flight.await;
    }
    shared
        .abort_multipart(&multipart.temp_key, &multipart.upload_id)
        .await;
    if shared
        .head_size(&multipart.temp_key)
        .await
        .ok()
        .flatten()
        .is_some()
    {
        shared.delete_quietly(&multipart.temp_key).await;
    }
}

impl Drop for S3Upload {
    /// An upload dropped unfinished (a client gone mid-stream) aborts its multipart upload
    /// in a spawned task; without a runtime the sweep on open catches it.
    fn drop(&mut self) {
        let Some(multipart) = self.multipart_opt.take() else {
            return;
        };
        let shared = self.shared.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { abort_multipart(&shared, multipart).await });
            }
            Err(_) => tracing::warn!(
                key = %multipart.temp_key,
                "upload dropped outside a runtime, multipart upload left to the sweep"
            ),
        }
    }
}
