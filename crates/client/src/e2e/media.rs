//! Encrypted media: a fresh random key per file, the file sealed in 64 KiB chunks with
//! AES-256-GCM in the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár), so a file of
//! any size streams through a fixed amount of memory and a truncated, reordered, dropped or
//! altered chunk fails.
//!
//! Ciphertext layout: `"BTM1" || nonce_prefix[7] || u32 chunk_bytes` (the 15-byte header),
//! then each chunk's `ciphertext || tag[16]`. Chunk `i` uses the nonce
//! `nonce_prefix || u32 i || last_flag` (last_flag 1 only on the final chunk, which is empty
//! only for an empty file) and the header as associated data. The media service stores and addresses the
//! ciphertext; the key, the ciphertext's SHA-256, the MIME type and the plaintext size travel
//! inside the sealed message ([`MediaAttachment`]). The receiver downloads the ciphertext,
//! checks its SHA-256, then decrypts.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::primitives::{KEY_BYTES, NONCE_BYTES, TAG_BYTES, aead_open, aead_seal, random_array};
use super::{E2eError, E2eResult};
use crate::api::BluetickClient;
use crate::media::Progress;

/// Plaintext bytes per chunk.
pub const MEDIA_CHUNK_BYTES: usize = 64 * 1024;
/// Length of the ciphertext header.
pub const MEDIA_HEADER_BYTES: usize = 15;
const MAGIC: &[u8; 4] = b"BTM1";
const PREFIX_BYTES: usize = 7;
/// Names the construction in [`MediaAttachment::cipher`].
pub const MEDIA_CIPHER: &str = "aes256gcm-stream64k-v1";

/// A file's 256-bit key (hex in JSON; wiped on drop).
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct MediaKey([u8; KEY_BYTES]);

impl std::fmt::Debug for MediaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MediaKey(..)")
    }
}

impl MediaKey {
    /// Returns a fresh random key.
    ///
    /// # Errors
    /// [`E2eError::Random`].
    pub fn generate() -> E2eResult<Self> {
        Ok(Self(random_array()?))
    }

    /// Returns the key of 32 raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }
}

impl Serialize for MediaKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(hex::encode(self.0));
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for MediaKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(deserializer)?);
        let bytes = Zeroizing::new(hex::decode(text.as_bytes()).map_err(serde::de::Error::custom)?);
        let key: [u8; KEY_BYTES] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::custom("media key is not 32 bytes"))?;
        Ok(MediaKey(key))
    }
}

/// What a sealed message says about an encrypted file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaAttachment {
    /// Lowercase hex SHA-256 of the ciphertext (the media service's address).
    pub sha256: String,
    /// Size of the plaintext file in bytes.
    pub size: u64,
    /// MIME type.
    pub mime: String,
    /// The sender's file name (untrusted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Optional caption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// The file key.
    pub key: MediaKey,
    /// The construction, [`MEDIA_CIPHER`].
    pub cipher: String,
}

/// Returns the ciphertext size of a `plaintext_size`-byte file.
pub fn ciphertext_size(plaintext_size: u64) -> u64 {
    let chunks = plaintext_size.div_ceil(MEDIA_CHUNK_BYTES as u64).max(1);
    MEDIA_HEADER_BYTES as u64 + plaintext_size + chunks * TAG_BYTES as u64
}

fn chunk_nonce(prefix: &[u8; PREFIX_BYTES], counter: u32, last: bool) -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    nonce[..PREFIX_BYTES].copy_from_slice(prefix);
    nonce[PREFIX_BYTES..PREFIX_BYTES + 4].copy_from_slice(&counter.to_be_bytes());
    nonce[NONCE_BYTES - 1] = u8::from(last);
    nonce
}

/// Seals a file chunk by chunk.
#[derive(Debug)]
pub struct MediaEncryptor {
    key: MediaKey,
    prefix: [u8; PREFIX_BYTES],
    header: [u8; MEDIA_HEADER_BYTES],
    counter: u32,
    finished: bool,
}

impl MediaEncryptor {
    /// Returns an encryptor with a fresh random nonce prefix.
    ///
    /// # Errors
    /// [`E2eError::Random`].
    pub fn new(key: &MediaKey) -> E2eResult<Self> {
        let prefix = random_array::<PREFIX_BYTES>()?;
        let mut header = [0u8; MEDIA_HEADER_BYTES];
        header[..4].copy_from_slice(MAGIC);
        header[4..11].copy_from_slice(&prefix);
        header[11..].copy_from_slice(&(MEDIA_CHUNK_BYTES as u32).to_be_bytes());
        Ok(Self {
            key: key.clone(),
            prefix,
            header,
            counter: 0,
            finished: false,
        })
    }

    /// Returns the header to write before the first chunk.
    pub fn header(&self) -> [u8; MEDIA_HEADER_BYTES] {
        self.header
    }

    /// Seals the next chunk (at most [`MEDIA_CHUNK_BYTES`]; only the last may be shorter).
    ///
    /// # Errors
    /// [`E2eError::Internal`] after the last chunk, for an oversize chunk, or past 2^32 chunks.
    pub fn seal_chunk(&mut self, plaintext: &[u8], last: bool) -> E2eResult<Vec<u8>> {
        if self.finished || plaintext.len() > MEDIA_CHUNK_BYTES {
            return Err(E2eError::Internal("media chunk out of sequence".into()));
        }
        let nonce = chunk_nonce(&self.prefix, self.counter, last);
        let sealed = aead_seal(&self.key.0, &nonce, plaintext, &self.header)?;
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| E2eError::Internal("file too large".into()))?;
        self.finished = last;
        Ok(sealed)
    }
}

/// Opens a file chunk by chunk.
#[derive(Debug)]
pub struct MediaDecryptor {
    key: MediaKey,
    prefix: [u8; PREFIX_BYTES],
    header: [u8; MEDIA_HEADER_BYTES],
    counter: u32,
    finished: bool,
}

impl MediaDecryptor {
    /// Returns a decryptor for the ciphertext starting with `header`.
    ///
    /// # Errors
    /// [`E2eError::Media`] for an unknown header.
    pub fn new(key: &MediaKey, header: &[u8; MEDIA_HEADER_BYTES]) -> E2eResult<Self> {
        if &header[..4] != MAGIC
            || u32::from_be_bytes([header[11], header[12], header[13], header[14]])
                != MEDIA_CHUNK_BYTES as u32
        {
            return Err(E2eError::Media("not a bluetick encrypted file".into()));
        }
        let mut prefix = [0u8; PREFIX_BYTES];
        prefix.copy_from_slice(&header[4..11]);
        Ok(Self {
            key: key.clone(),
            prefix,
            header: *header,
            counter: 0,
            finished: false,
        })
    }

    /// Opens the next chunk (`ciphertext || tag`); `last` says whether the stream ends after it.
    ///
    /// # Errors
    /// [`E2eError::Media`] for a chunk that does not open in this place.
    pub fn open_chunk(&mut self, sealed: &[u8], last: bool) -> E2eResult<Zeroizing<Vec<u8>>> {
        if self.finished {
            return Err(E2eError::Media("data after the final chunk".into()));
        }
        let nonce = chunk_nonce(&self.prefix, self.counter, last);
        let plaintext = aead_open(&self.key.0, &nonce, sealed, &self.header).map_err(|_| {
            E2eError::Media(format!(
                "chunk {} is altered, reordered or truncated",
                self.counter
            ))
        })?;
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| E2eError::Media("too many chunks".into()))?;
        self.finished = last;
        Ok(plaintext)
    }
}

/// Reads until `buffer` holds `want` bytes or the reader ends.
async fn read_up_to<R: AsyncRead + Unpin>(reader: &mut R, want: usize) -> std::io::Result<Vec<u8>> {
    let mut buffer = Vec::with_capacity(want);
    while buffer.len() < want {
        let read = (&mut *reader)
            .take((want - buffer.len()) as u64)
            .read_to_end(&mut buffer)
            .await?;
        if read == 0 {
            break;
        }
    }
    Ok(buffer)
}

struct EncryptState<R> {
    reader: R,
    encryptor: MediaEncryptor,
    lookahead_opt: Option<Vec<u8>>,
    header_sent: bool,
}

/// Returns a reader of the ciphertext of everything `reader` yields under `key` (header
/// first), reading [`MEDIA_CHUNK_BYTES`] at a time. A read error of `reader` surfaces as a
/// read error, so an upload of it is cancelled rather than completed.
///
/// # Errors
/// [`E2eError::Random`].
pub fn encrypting_reader<R>(
    reader: R,
    key: &MediaKey,
) -> E2eResult<impl AsyncRead + Unpin + Send + 'static>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let state = EncryptState {
        reader,
        encryptor: MediaEncryptor::new(key)?,
        lookahead_opt: None,
        header_sent: false,
    };
    let chunks = futures::stream::unfold(Some(state), |state_opt| async move {
        let mut state = state_opt?;
        let result = async {
            let current = match state.lookahead_opt.take() {
                Some(chunk) => chunk,
                None => read_up_to(&mut state.reader, MEDIA_CHUNK_BYTES).await?,
            };
            let mut last = current.len() < MEDIA_CHUNK_BYTES;
            if !last {
                let next = read_up_to(&mut state.reader, MEDIA_CHUNK_BYTES).await?;
                if next.is_empty() {
                    last = true;
                } else {
                    state.lookahead_opt = Some(next);
                }
            }
            let sealed = state
                .encryptor
                .seal_chunk(&current, last)
                .map_err(std::io::Error::other)?;
            let mut out = Vec::with_capacity(MEDIA_HEADER_BYTES + sealed.len());
            if !state.header_sent {
                out.extend_from_slice(&state.encryptor.header());
                state.header_sent = true;
            }
            out.extend_from_slice(&sealed);
            Ok::<_, std::io::Error>((Bytes::from(out), last))
        }
        .await;
        match result {
            Ok((bytes, true)) => Some((Ok(bytes), None)),
            Ok((bytes, false)) => Some((Ok(bytes), Some(state))),
            Err(error) => Some((Err(error), None)),
        }
    });
    Ok(tokio_util::io::StreamReader::new(Box::pin(chunks)))
}

/// Decrypts the ciphertext `reader` yields under `key` into `writer` and returns the
/// plaintext size. Each chunk is authenticated before it is written; on error the writer
/// may hold a prefix of the file and must be discarded.
///
/// # Errors
/// [`E2eError::Media`] for an altered, truncated, reordered or extended ciphertext,
/// [`E2eError::Io`] when reading or writing fails.
pub async fn decrypt_stream<R, W>(key: &MediaKey, reader: &mut R, writer: &mut W) -> E2eResult<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let header_bytes = read_up_to(reader, MEDIA_HEADER_BYTES).await?;
    let header: [u8; MEDIA_HEADER_BYTES] = header_bytes
        .as_slice()
        .try_into()
        .map_err(|_| E2eError::Media("ciphertext shorter than its header".into()))?;
    let mut decryptor = MediaDecryptor::new(key, &header)?;
    let segment = MEDIA_CHUNK_BYTES + TAG_BYTES;
    let mut lookahead_opt: Option<Vec<u8>> = None;
    let mut written = 0u64;
    loop {
        let current = match lookahead_opt.take() {
            Some(chunk) => chunk,
            None => read_up_to(reader, segment).await?,
        };
        let mut last = current.len() < segment;
        if !last {
            let next = read_up_to(reader, segment).await?;
            if next.is_empty() {
                last = true;
            } else {
                lookahead_opt = Some(next);
            }
        }
        let plaintext = decryptor.open_chunk(&current, last)?;
        writer.write_all(&plaintext).await?;
        written += plaintext.len() as u64;
        if last {
            break;
        }
    }
    writer.flush().await?;
    Ok(written)
}

impl MediaAttachment {
    /// Returns a decoded attachment if `plaintext` is an encrypted-media message.
    pub fn from_plaintext(plaintext: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Wrapper {
            media: MediaAttachment,
        }
        serde_json::from_slice::<Wrapper>(plaintext)
            .ok()
            .map(|wrapper| wrapper.media)
    }

    /// Returns the message plaintext carrying this attachment: the JSON of a
    /// [`crate::Content::Media`] plus `key` and `cipher`, so [`crate::Content::decode`]
    /// reads it as media.
    ///
    /// # Errors
    /// [`E2eError::Internal`] if encoding fails.
    pub fn to_plaintext(&self) -> E2eResult<Zeroizing<Vec<u8>>> {
        #[derive(Serialize)]
        struct Wrapper<'a> {
            media: &'a MediaAttachment,
        }
        serde_json::to_vec(&Wrapper { media: self })
            .map(Zeroizing::new)
            .map_err(|error| E2eError::Internal(error.to_string()))
    }
}

/// Encrypts what `reader` yields under a fresh key while uploading it, and returns the
/// attachment to send (MIME type, name and caption as given).
///
/// # Errors
/// As [`BluetickClient::upload_reader`], as [`E2eError::Client`].
pub async fn upload_encrypted<R, P>(
    client: &BluetickClient,
    reader: R,
    plaintext_size: u64,
    mime: &str,
    name_opt: Option<String>,
    caption_opt: Option<String>,
    progress: P,
) -> E2eResult<MediaAttachment>
where
    R: AsyncRead + Unpin + Send + 'static,
    P: Progress,
{
    let key = MediaKey::generate()?;
    let counting = CountingReader {
        inner: reader,
        count: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    let read_count = std::sync::Arc::clone(&counting.count);
    let encrypted = encrypting_reader(counting, &key)?;
    let uploaded = client
        .upload_reader(encrypted, Some(ciphertext_size(plaintext_size)), progress)
        .await?;
    let size = read_count.load(std::sync::atomic::Ordering::SeqCst);
    if size != plaintext_size {
        return Err(E2eError::Media(format!(
            "the file changed while it was sent ({plaintext_size} bytes expected, {size} read)"
        )));
    }
    Ok(MediaAttachment {
        sha256: uploaded.sha256,
        size,
        mime: mime.to_string(),
        name: name_opt,
        caption: caption_opt,
        key,
        cipher: MEDIA_CIPHER.to_string(),
    })
}

/// Encrypts and uploads the file at `path` (see [`upload_encrypted`]).
///
/// # Errors
/// As [`upload_encrypted`], plus [`E2eError::Io`] if the file cannot be opened.
pub async fn upload_encrypted_path<P: Progress>(
    client: &BluetickClient,
    path: &Path,
    mime: &str,
    caption_opt: Option<String>,
    progress: P,
) -> E2eResult<MediaAttachment> {
    let file = tokio::fs::File::open(path).await?;
    let size = file.metadata().await?.len();
    let name_opt = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned());
    upload_encrypted(client, file, size, mime, name_opt, caption_opt, progress).await
}

/// Downloads `attachment` to `path`: the ciphertext goes to `<path>.enc.part` and is checked
/// against its SHA-256, then it is decrypted to `<path>.part`, which is renamed to `path`
/// only when every chunk opened. Returns the plaintext size. Nothing is left at `path` (nor
/// temporary files) on failure.
///
/// # Errors
/// [`E2eError::Client`] ([`crate::ClientError::Integrity`]) for a hash mismatch,
/// [`E2eError::Media`] for a ciphertext that does not decrypt or a size that differs.
pub async fn download_decrypted_path<P: Progress>(
    client: &BluetickClient,
    attachment: &MediaAttachment,
    path: &Path,
    progress: P,
) -> E2eResult<u64> {
    if attachment.cipher != MEDIA_CIPHER {
        return Err(E2eError::Media(format!(
            "unknown media cipher {:?}",
            attachment.cipher
        )));
    }
    let encrypted_path = with_suffix(path, ".enc.part");
    let plain_path = with_suffix(path, ".part");
    let result = async {
        client
            .download_path(&attachment.sha256, &encrypted_path, progress)
            .await?;
        let mut encrypted =
            tokio::io::BufReader::new(tokio::fs::File::open(&encrypted_path).await?);
        let mut plain = tokio::fs::File::create(&plain_path).await?;
        let size = decrypt_stream(&attachment.key, &mut encrypted, &mut plain).await?;
        if size != attachment.size {
            return Err(E2eError::Media(format!(
                "decrypted {size} bytes, the message announced {}",
                attachment.size
            )));
        }
        plain.sync_all().await?;
        Ok(size)
    }
    .await;
    let _ = tokio::fs::remove_file(&encrypted_path).await;
    match result {
        Ok(size) => {
            tokio::fs::rename(&plain_path, path).await?;
            Ok(size)
        }
        Err(error) => {
            let _ = tokio::fs::remove_file(&plain_path).await;
            Err(error)
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|name| name.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Counts the bytes a reader yields.
struct CountingReader<R> {
    inner: R,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for CountingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let added = buf.filled().len() - before;
        self.count
            .fetch_add(added as u64, std::sync::atomic::Ordering::SeqCst);
        poll
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn encrypt(plaintext: &[u8], key: &MediaKey) -> Vec<u8> {
        let mut reader = encrypting_reader(std::io::Cursor::new(plaintext.to_vec()), key).unwrap();
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.unwrap();
        out
    }

    async fn decrypt(ciphertext: &[u8], key: &MediaKey) -> E2eResult<Vec<u8>> {
        let mut out = Vec::new();
        decrypt_stream(key, &mut std::io::Cursor::new(ciphertext), &mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn sizes_round_trip_including_chunk_boundaries() {
        let key = MediaKey::generate().unwrap();
        for size in [
            0,
            1,
            MEDIA_CHUNK_BYTES - 1,
            MEDIA_CHUNK_BYTES,
            MEDIA_CHUNK_BYTES + 1,
            3 * MEDIA_CHUNK_BYTES,
        ] {
            let plaintext: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let ciphertext = encrypt(&plaintext, &key).await;
            assert_eq!(
                ciphertext.len() as u64,
                ciphertext_size(size as u64),
                "size {size}"
            );
            assert_eq!(decrypt(&ciphertext, &key).await.unwrap(), plaintext);
        }
    }

    #[tokio::test]
    async fn tampered_truncated_reordered_and_extended_ciphertexts_fail() {
        let key = MediaKey::generate().unwrap();
        let plaintext = vec![42u8; 3 * MEDIA_CHUNK_BYTES + 100];
        let ciphertext = encrypt(&plaintext, &key).await;
        let segment = MEDIA_CHUNK_BYTES + TAG_BYTES;
        // One flipped bit anywhere: header, a chunk body, a tag.
        for at in [
            0,
            5,
            14,
            15,
            16 + segment,
            MEDIA_HEADER_BYTES + segment - 1,
            ciphertext.len() - 1,
        ] {
            let mut bent = ciphertext.clone();
            bent[at] ^= 0x40;
            assert!(decrypt(&bent, &key).await.is_err(), "flip at {at}");
        }
        // Truncated at a chunk boundary (the new last chunk was not sealed as last) and inside.
        let boundary = MEDIA_HEADER_BYTES + 2 * segment;
        assert!(decrypt(&ciphertext[..boundary], &key).await.is_err());
        assert!(decrypt(&ciphertext[..boundary + 10], &key).await.is_err());
        assert!(
            decrypt(&ciphertext[..MEDIA_HEADER_BYTES], &key)
                .await
                .is_err()
        );
        // Two chunks swapped.
        let mut swapped = ciphertext[..MEDIA_HEADER_BYTES].to_vec();
        swapped.extend_from_slice(
            &ciphertext[MEDIA_HEADER_BYTES + segment..MEDIA_HEADER_BYTES + 2 * segment],
        );
        swapped.extend_from_slice(&ciphertext[MEDIA_HEADER_BYTES..MEDIA_HEADER_BYTES + segment]);
        swapped.extend_from_slice(&ciphertext[MEDIA_HEADER_BYTES + 2 * segment..]);
        assert!(decrypt(&swapped, &key).await.is_err());
        // Bytes appended after the final chunk.
        let mut extended = ciphertext.clone();
        extended.extend_from_slice(&[0u8; 40]);
        assert!(decrypt(&extended, &key).await.is_err());
        // Another key.
        assert!(
            decrypt(&ciphertext, &MediaKey::generate().unwrap())
                .await
                .is_err()
        );
        assert_eq!(decrypt(&ciphertext, &key).await.unwrap(), plaintext);
    }

    #[test]
    fn attachments_read_as_plain_media_content_too() {
        let attachment = MediaAttachment {
            sha256: "ab".repeat(32),
            size: 5,
            mime: "image/png".into(),
            name: Some("a.png".into()),
            caption: None,
            key: MediaKey::from_bytes([1; 32]),
            cipher: MEDIA_CIPHER.into(),
        };
        let plaintext = attachment.to_plaintext().unwrap();
        assert_eq!(
            MediaAttachment::from_plaintext(&plaintext).unwrap(),
            attachment
        );
        assert!(matches!(
            crate::Content::decode(&plaintext).unwrap(),
            crate::Content::Media { size: 5, .. }
        ));
        assert!(MediaAttachment::from_plaintext(&crate::Content::text("hi").encode()).is_none());
        assert!(!format!("{attachment:?}").contains(&hex::encode([1u8; 32])));
    }
}
