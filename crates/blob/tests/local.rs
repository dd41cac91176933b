//! The conformance suite and on-disk checks for [`LocalBlobStore`].

use std::path::Path;
use std::sync::Arc;

use bluetick_blob::conformance::{self, test_bytes, upload_in_chunks};
use bluetick_blob::{BlobStore, ContentHash, LocalBlobStore, open_blob_store};
use bytes::Bytes;

/// Returns every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir failed") {
        let path = entry.expect("dir entry failed").path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The local store passes the whole conformance suite.
#[tokio::test]
async fn local_store_passes_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobStore::open(dir.path()).await.unwrap();
    conformance::run_all(Arc::new(store)).await;
    // Nothing partial is left behind by the aborted and dropped uploads.
    assert!(files_under(&dir.path().join("tmp")).is_empty());
}

/// Blobs are stored as `<aa>/<hex>` and a deduplicated upload leaves one file, no temp.
#[tokio::test]
async fn blobs_are_files_named_by_hash_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_blob_store(dir.path().to_str().unwrap()).await.unwrap();
    let data = test_bytes(2 * 1024 * 1024, 42);
    let (hash, first) = upload_in_chunks(store.as_ref(), &data, 300_000).await;
    let (_, second) = upload_in_chunks(store.as_ref(), &data, 1 << 20).await;
    assert!(!first.deduplicated && second.deduplicated);
    let hex = hash.to_hex();
    let expected = dir.path().join(&hex[..2]).join(&hex);
    assert_eq!(files_under(dir.path()), vec![expected.clone()]);
    assert_eq!(std::fs::read(expected).unwrap(), data);
}

/// Temp files exist only while an upload runs; abort and drop remove them.
#[tokio::test]
async fn unfinished_uploads_remove_their_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobStore::open(dir.path()).await.unwrap();
    let tmp = dir.path().join("tmp");
    let mut upload = store.begin_upload().await.unwrap();
    upload.write(Bytes::from(vec![7u8; 3 << 20])).await.unwrap();
    assert_eq!(files_under(&tmp).len(), 1);
    upload.abort().await.unwrap();
    assert!(files_under(&tmp).is_empty());

    let mut upload = store.begin_upload().await.unwrap();
    upload.write(Bytes::from(vec![8u8; 3 << 20])).await.unwrap();
    drop(upload);
    assert!(files_under(dir.path()).is_empty());
}

/// `file://` URLs and plain paths open the same folder; a stored blob is seen by both.
#[tokio::test]
async fn file_urls_and_paths_open_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let by_path = open_blob_store(dir.path().to_str().unwrap()).await.unwrap();
    let (hash, _) = upload_in_chunks(by_path.as_ref(), b"hello", 2).await;
    let by_url = open_blob_store(&format!("file://{}", dir.path().display()))
        .await
        .unwrap();
    assert_eq!(by_url.stat(&hash).await.unwrap(), Some(5));
    assert_eq!(hash, ContentHash::of(b"hello"));
}
