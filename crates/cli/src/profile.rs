//! Per-profile state on disk: `<home>/<profile>/` holds `credentials.json` (the device's
//! token, mode 0600), `inbox.json` (messages received but not read yet, so `read` works
//! after `listen` acknowledged delivery) and `sent.json` (recent own messages and their
//! ticks), `attachments.json` (keys of encrypted media received, by ciphertext hash, so
//! `download` can decrypt them) and `keys/` (the device's end-to-end encryption secrets: a
//! [`FileKeyStore`], folder 0700, files 0600). Messages kept locally are the opened
//! plaintext; only this device can read them. Files are written to a temporary name and
//! renamed, so a crash never leaves a half-written file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bluetick_client::e2e::{FileKeyStore, KeyStoreRef, MediaAttachment};
use bluetick_client::{Credentials, InboundMessage, SecureMessage, TickStatus};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Own messages remembered in `sent.json`.
const SENT_LOG_CAPACITY: usize = 1000;

/// One profile's directory.
#[derive(Debug, Clone)]
pub struct Profile {
    /// The profile's name.
    pub name: String,
    /// `<home>/<name>`.
    pub dir: PathBuf,
}

/// Returns the bluetick home: `explicit_opt`, else `~/.bluetick`.
pub fn home_dir(explicit_opt: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(explicit) = explicit_opt {
        return Ok(explicit);
    }
    let user_home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .context("HOME is not set; pass --home or set BLUETICK_HOME")?;
    Ok(PathBuf::from(user_home).join(".bluetick"))
}

/// Returns an error unless `name` is a safe profile name (letters, digits, `-`, `_`, `.`).
pub fn validate_profile_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        bail!("invalid profile name {name:?}: use letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

impl Profile {
    /// Returns profile `name` under `home`.
    pub fn new(home: &Path, name: &str) -> Result<Self> {
        validate_profile_name(name)?;
        Ok(Self {
            name: name.to_string(),
            dir: home.join(name),
        })
    }

    /// Returns the credentials file path.
    pub fn credentials_path(&self) -> PathBuf {
        self.dir.join("credentials.json")
    }

    fn inbox_path(&self) -> PathBuf {
        self.dir.join("inbox.json")
    }

    fn sent_path(&self) -> PathBuf {
        self.dir.join("sent.json")
    }

    fn attachments_path(&self) -> PathBuf {
        self.dir.join("attachments.json")
    }

    /// Returns the device's key store (`keys/`, owner only), creating it if needed.
    pub fn key_store(&self) -> Result<KeyStoreRef> {
        self.ensure_dir()?;
        let store = FileKeyStore::open(self.dir.join("keys"))
            .with_context(|| format!("cannot open the key store of profile {:?}", self.name))?;
        Ok(std::sync::Arc::new(store))
    }

    /// Reads the keys of encrypted media received, by ciphertext hash.
    pub fn load_attachments(&self) -> Result<BTreeMap<String, MediaAttachment>> {
        let path = self.attachments_path();
        if !path.exists() {
            return Ok(BTreeMap::new());
        }
        read_json(&path)
    }

    /// Remembers an encrypted attachment so `download <sha256>` can decrypt it.
    pub fn remember_attachment(&self, attachment: &MediaAttachment) -> Result<()> {
        let mut attachments = self.load_attachments()?;
        attachments.insert(attachment.sha256.clone(), attachment.clone());
        while attachments.len() > SENT_LOG_CAPACITY {
            attachments.pop_first();
        }
        self.write_json(&self.attachments_path(), &attachments)
    }

    /// Returns true when the profile has credentials.
    pub fn exists(&self) -> bool {
        self.credentials_path().exists()
    }

    /// Writes the credentials, readable by the owner only.
    pub fn save_credentials(&self, credentials: &Credentials) -> Result<()> {
        self.write_json(&self.credentials_path(), credentials)
    }

    /// Reads the credentials.
    pub fn load_credentials(&self) -> Result<Credentials> {
        let path = self.credentials_path();
        if !path.exists() {
            bail!(
                "profile {:?} has no credentials ({}); run `bluetick register <user>` first",
                self.name,
                path.display()
            );
        }
        read_json(&path)
    }

    /// Reads the local inbox of unread messages.
    pub fn load_inbox(&self) -> Result<Inbox> {
        let path = self.inbox_path();
        if !path.exists() {
            return Ok(Inbox::default());
        }
        read_json(&path)
    }

    /// Writes the local inbox.
    pub fn save_inbox(&self, inbox: &Inbox) -> Result<()> {
        self.write_json(&self.inbox_path(), inbox)
    }

    /// Reads the log of own messages.
    pub fn load_sent_log(&self) -> Result<SentLog> {
        let path = self.sent_path();
        if !path.exists() {
            return Ok(SentLog::default());
        }
        read_json(&path)
    }

    /// Writes the log of own messages.
    pub fn save_sent_log(&self, log: &SentLog) -> Result<()> {
        self.write_json(&self.sent_path(), log)
    }

    fn ensure_dir(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot restrict {}", self.dir.display()))?;
        }
        Ok(())
    }

    fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<()> {
        self.ensure_dir()?;
        let bytes = serde_json::to_vec_pretty(value)?;
        write_private_file(path, &bytes)
    }
}

/// Writes `bytes` to `path` atomically with mode 0600 (owner read/write only).
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut temporary_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    temporary_name.push(format!(".tmp{}", std::process::id()));
    let temporary_path = path.with_file_name(temporary_name);
    let _ = std::fs::remove_file(&temporary_path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&temporary_path)
        .with_context(|| format!("cannot create {}", temporary_path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary_path, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is corrupt", path.display()))
}

/// A message kept locally until it is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The server's id.
    pub message_id: u64,
    /// Sender user.
    pub sender_user_id: String,
    /// Sender device.
    pub sender_device_id: u32,
    /// When the server accepted it.
    pub sent_at_ms: u64,
    /// The payload, hex encoded.
    pub payload_hex: String,
}

impl StoredMessage {
    /// Returns the stored form of `message`.
    pub fn from_inbound(message: &InboundMessage) -> Self {
        let sender = message.sender.clone().unwrap_or_default();
        Self {
            message_id: message.message_id,
            sender_user_id: sender.user_id,
            sender_device_id: sender.device_id,
            sent_at_ms: message.sent_at_ms,
            payload_hex: hex::encode(&message.payload),
        }
    }

    /// Returns the stored form of an opened message (its plaintext).
    pub fn from_opened(message: &SecureMessage) -> Self {
        Self {
            message_id: message.message_id,
            sender_user_id: message.sender.user_id.clone(),
            sender_device_id: message.sender.device_id,
            sent_at_ms: message.sent_at_ms,
            payload_hex: hex::encode(&message.plaintext[..]),
        }
    }

    /// Returns the payload bytes (empty if the file was edited into garbage).
    pub fn payload(&self) -> Vec<u8> {
        hex::decode(&self.payload_hex).unwrap_or_default()
    }
}

/// Messages received (and acknowledged as delivered) but not read yet, by message id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inbox {
    /// Unread messages in id (time) order.
    pub messages: BTreeMap<u64, StoredMessage>,
}

impl Inbox {
    /// Keeps `message`; returns false if it was already kept.
    pub fn add(&mut self, message: StoredMessage) -> bool {
        if self.messages.contains_key(&message.message_id) {
            return false;
        }
        self.messages.insert(message.message_id, message);
        true
    }

    /// Forgets messages (once read).
    pub fn remove(&mut self, message_ids: &[u64]) {
        for message_id in message_ids {
            self.messages.remove(message_id);
        }
    }
}

/// One of this profile's own messages and its best tick so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentEntry {
    /// The recipient user.
    pub to: String,
    /// A short summary of the content.
    pub summary: String,
    /// 1 sent, 2 delivered, 3 read (a `TickStatus` value).
    pub status: i32,
}

/// Recent own messages by message id, bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentLog {
    /// Entries by message id.
    pub entries: BTreeMap<u64, SentEntry>,
}

impl SentLog {
    /// Records a new own message.
    pub fn record_sent(&mut self, message_id: u64, to: &str, summary: &str) {
        let summary: String = summary.chars().take(60).collect();
        self.entries.entry(message_id).or_insert(SentEntry {
            to: to.to_string(),
            summary,
            status: TickStatus::Sent as i32,
        });
        while self.entries.len() > SENT_LOG_CAPACITY {
            self.entries.pop_first();
        }
    }

    /// Raises a message's tick (ticks never go back).
    pub fn record_status(&mut self, message_id: u64, status: TickStatus) {
        if let Some(entry) = self.entries.get_mut(&message_id) {
            entry.status = entry.status.max(status as i32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> Credentials {
        Credentials {
            gateway_url: "http://127.0.0.1:7700".into(),
            media_url: "http://127.0.0.1:7704".into(),
            user_id: "alice".into(),
            device_id: 1,
            token: "tok".into(),
        }
    }

    #[test]
    fn credentials_round_trip_with_owner_only_permissions() {
        let home = tempfile::tempdir().unwrap();
        let profile = Profile::new(home.path(), "default").unwrap();
        assert!(!profile.exists());
        assert!(profile.load_credentials().is_err());
        profile.save_credentials(&credentials()).unwrap();
        assert!(profile.exists());
        assert_eq!(profile.load_credentials().unwrap(), credentials());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(profile.credentials_path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let dir_mode = std::fs::metadata(&profile.dir)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(dir_mode & 0o777, 0o700);
        }
        // Overwriting keeps the permissions and leaves no temporary file behind.
        profile.save_credentials(&credentials()).unwrap();
        let names: Vec<_> = std::fs::read_dir(&profile.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn profile_names_cannot_escape_the_home() {
        for bad in ["", "../x", "a/b", ".hidden", "x y"] {
            assert!(validate_profile_name(bad).is_err(), "{bad:?}");
        }
        for good in ["default", "bob-2", "work_phone", "a.b"] {
            validate_profile_name(good).unwrap();
        }
    }

    #[test]
    fn inbox_keeps_each_message_once_and_survives_a_round_trip() {
        let home = tempfile::tempdir().unwrap();
        let profile = Profile::new(home.path(), "p").unwrap();
        let mut inbox = profile.load_inbox().unwrap();
        let message = StoredMessage {
            message_id: 7,
            sender_user_id: "bob".into(),
            sender_device_id: 1,
            sent_at_ms: 1,
            payload_hex: hex::encode(b"{\"text\":\"hi\"}"),
        };
        assert!(inbox.add(message.clone()));
        assert!(!inbox.add(message.clone()));
        profile.save_inbox(&inbox).unwrap();
        let mut loaded = profile.load_inbox().unwrap();
        assert_eq!(loaded, inbox);
        assert_eq!(loaded.messages[&7].payload(), b"{\"text\":\"hi\"}");
        loaded.remove(&[7]);
        assert!(loaded.messages.is_empty());
    }

    #[test]
    fn sent_log_ticks_only_go_forward_and_stay_bounded() {
        let mut log = SentLog::default();
        log.record_sent(1, "bob", "hello");
        log.record_status(1, TickStatus::Read);
        log.record_status(1, TickStatus::Delivered);
        assert_eq!(log.entries[&1].status, TickStatus::Read as i32);
        for id in 2..(SENT_LOG_CAPACITY as u64 + 10) {
            log.record_sent(id, "bob", "x");
        }
        assert_eq!(log.entries.len(), SENT_LOG_CAPACITY);
        assert!(!log.entries.contains_key(&1));
    }
}
