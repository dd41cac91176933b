//! The behaviour every [`BlobStore`] must show, run against each implementation (feature
//! `testsuite`). Each function panics with a description of the first violation.
//!
//! A store passed in must be empty. Implementation-specific checks (no temp files left on
//! disk, the folder layout) belong to the implementation's own tests.

use bytes::Bytes;
use futures::TryStreamExt;

use crate::{BlobError, BlobStore, BlobStoreRef, ContentHash, ContentHasher, FinishedUpload};

/// Runs every check of the suite against `store`.
pub async fn run_all(store: BlobStoreRef) {
    upload_then_stat_and_read_round_trip(store.as_ref()).await;
    second_upload_of_same_bytes_is_deduplicated(store.as_ref()).await;
    empty_blob_round_trips(store.as_ref()).await;
    aborted_upload_leaves_nothing(store.as_ref()).await;
    dropped_upload_leaves_nothing(store.as_ref()).await;
    ranged_reads_return_exactly_the_range(store.as_ref()).await;
    ranges_past_the_end_are_refused(store.as_ref()).await;
    unknown_hash_is_absent_and_not_found(store.as_ref()).await;
    concurrent_uploads_do_not_mix(store).await;
}

/// Returns `size` bytes of a deterministic pattern that differs per `seed`.
pub fn test_bytes(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|index| {
            (index as u64)
                .wrapping_mul(31)
                .wrapping_add(seed as u64 * 7) as u8
                ^ seed
        })
        .collect()
}

/// Uploads `data` in chunks of `chunk_size` bytes and returns its hash and what finishing did.
pub async fn upload_in_chunks(
    store: &dyn BlobStore,
    data: &[u8],
    chunk_size: usize,
) -> (ContentHash, FinishedUpload) {
    let mut upload = store.begin_upload().await.expect("begin_upload failed");
    let mut hasher = ContentHasher::new();
    for chunk in data.chunks(chunk_size.max(1)) {
        hasher.update(chunk);
        upload
            .write(Bytes::copy_from_slice(chunk))
            .await
            .expect("write failed");
    }
    let hash = hasher.finalize();
    let finished = upload.finish(hash).await.expect("finish failed");
    (hash, finished)
}

/// Returns every byte of the range read from `store`.
pub async fn read_to_vec(
    store: &dyn BlobStore,
    hash: &ContentHash,
    offset: u64,
    length: Option<u64>,
) -> Result<Vec<u8>, BlobError> {
    let stream = store.read(hash, offset, length).await?;
    let chunks: Vec<Bytes> = stream.try_collect().await?;
    Ok(chunks.concat())
}

/// A multi-chunk upload becomes visible under its hash with its size and bytes.
pub async fn upload_then_stat_and_read_round_trip(store: &dyn BlobStore) {
    let data = test_bytes(3 * 1024 * 1024 + 17, 1);
    let (hash, finished) = upload_in_chunks(store, &data, 100_003).await;
    assert_eq!(
        finished,
        FinishedUpload {
            size: data.len() as u64,
            deduplicated: false
        }
    );
    assert_eq!(hash, ContentHash::of(&data));
    assert_eq!(
        store.stat(&hash).await.expect("stat failed"),
        Some(data.len() as u64)
    );
    let read_back = read_to_vec(store, &hash, 0, None)
        .await
        .expect("read failed");
    assert!(read_back == data, "read bytes differ from uploaded bytes");
    let mut stream = store.read(&hash, 0, None).await.expect("read failed");
    while let Some(chunk) = stream.try_next().await.expect("read chunk failed") {
        assert!(!chunk.is_empty(), "read streams yield no empty chunks");
    }
}

/// Uploading bytes already stored reports deduplicated and keeps one copy.
pub async fn second_upload_of_same_bytes_is_deduplicated(store: &dyn BlobStore) {
    let data = test_bytes(300_000, 2);
    let (first_hash, first) = upload_in_chunks(store, &data, 65_536).await;
    assert!(!first.deduplicated, "first upload is not deduplicated");
    let (second_hash, second) = upload_in_chunks(store, &data, 7_777).await;
    assert_eq!(first_hash, second_hash);
    assert!(second.deduplicated, "second upload is deduplicated");
    assert_eq!(second.size, data.len() as u64);
    let read_back = read_to_vec(store, &first_hash, 0, None)
        .await
        .expect("read failed");
    assert!(read_back == data, "deduplicated blob still reads back");
}

/// A zero-byte blob is a blob like any other.
pub async fn empty_blob_round_trips(store: &dyn BlobStore) {
    let upload = store.begin_upload().await.expect("begin_upload failed");
    let hash = ContentHash::of(b"");
    let finished = upload.finish(hash).await.expect("finish failed");
    assert_eq!(finished.size, 0);
    assert_eq!(store.stat(&hash).await.expect("stat failed"), Some(0));
    let read_back = read_to_vec(store, &hash, 0, None)
        .await
        .expect("read failed");
    assert!(read_back.is_empty());
}

/// An aborted upload is never visible.
pub async fn aborted_upload_leaves_nothing(store: &dyn BlobStore) {
    let data = test_bytes(2 * 1024 * 1024, 3);
    let mut upload = store.begin_upload().await.expect("begin_upload failed");
    upload
        .write(Bytes::from(data.clone()))
        .await
        .expect("write failed");
    upload.abort().await.expect("abort failed");
    let hash = ContentHash::of(&data);
    assert_eq!(store.stat(&hash).await.expect("stat failed"), None);
}

/// An upload dropped without finishing is never visible.
pub async fn dropped_upload_leaves_nothing(store: &dyn BlobStore) {
    let data = test_bytes(1_500_000, 4);
    let mut upload = store.begin_upload().await.expect("begin_upload failed");
    upload
        .write(Bytes::from(data.clone()))
        .await
        .expect("write failed");
    drop(upload);
    let hash = ContentHash::of(&data);
    assert_eq!(store.stat(&hash).await.expect("stat failed"), None);
}

/// Reads of a range return exactly those bytes.
pub async fn ranged_reads_return_exactly_the_range(store: &dyn BlobStore) {
    let data = test_bytes(1024 * 1024 + 5, 5);
    let (hash, _) = upload_in_chunks(store, &data, 1 << 20).await;
    let size = data.len() as u64;
    let cases: [(u64, Option<u64>); 7] = [
        (0, Some(1)),
        (1, Some(10)),
        (1000, None),
        (size - 1, Some(1)),
        (size, None),
        (size, Some(0)),
        (300_000, Some(500_000)),
    ];
    for (offset, length) in cases {
        let read_back = read_to_vec(store, &hash, offset, length)
            .await
            .expect("ranged read failed");
        let start = offset as usize;
        let end = length.map_or(data.len(), |length| start + length as usize);
        assert!(
            read_back == data[start..end],
            "range offset {offset} length {length:?} differs"
        );
    }
}

/// Ranges that end past the blob are refused with [`BlobError::InvalidRange`].
pub async fn ranges_past_the_end_are_refused(store: &dyn BlobStore) {
    let data = test_bytes(1000, 6);
    let (hash, _) = upload_in_chunks(store, &data, 1000).await;
    for (offset, length) in [
        (1001, None),
        (1000, Some(1)),
        (999, Some(2)),
        (0, Some(1001)),
        (u64::MAX, Some(u64::MAX)),
    ] {
        let result = store.read(&hash, offset, length).await;
        assert!(
            matches!(result, Err(BlobError::InvalidRange { .. })),
            "offset {offset} length {length:?} is refused as an invalid range"
        );
    }
}

/// A hash never uploaded has no size and cannot be read.
pub async fn unknown_hash_is_absent_and_not_found(store: &dyn BlobStore) {
    let hash = ContentHash::of(b"never uploaded");
    assert_eq!(store.stat(&hash).await.expect("stat failed"), None);
    let result = store.read(&hash, 0, None).await;
    assert!(matches!(result, Err(BlobError::NotFound(found)) if found == hash));
}

/// Uploads running at the same time each store their own bytes.
pub async fn concurrent_uploads_do_not_mix(store: BlobStoreRef) {
    let mut tasks = Vec::new();
    for seed in 10..18u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let data = test_bytes(200_000 + seed as usize * 1000, seed);
            let (hash, finished) = upload_in_chunks(store.as_ref(), &data, 16_384).await;
            assert!(!finished.deduplicated);
            (hash, data)
        }));
    }
    for task in tasks {
        let (hash, data) = task.await.expect("upload task panicked");
        let read_back = read_to_vec(store.as_ref(), &hash, 0, None)
            .await
            .expect("read failed");
        assert!(read_back == data, "concurrent upload {hash} reads back");
    }
}
