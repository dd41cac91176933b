//! [`KeyStore`]: where a device keeps its secrets (identity, prekey secrets, ratchet
//! sessions) and what it has seen (the identity keys of its contacts' devices, trusted on
//! first use). A store is a small map of named records; the names are
//!
//! - `identity` — the device's [`super::IdentityKeyPair`];
//! - `prekeys` — signed and one-time prekey secrets, counters, recently used base keys;
//! - `session~<user>~<device>` — the ratchet sessions with one peer device;
//! - `seen~<user>~<device>` — the identity key seen for one peer device.
//!
//! [`MemoryKeyStore`] is for tests; [`FileKeyStore`] keeps one file per record in a folder
//! only its owner can read (0700, files 0600, written atomically).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use super::{E2eError, E2eResult};

/// Persistent storage of a device's key records. Implementations must keep records only on
/// the device and make `put` durable before returning (a lost session update desynchronises
/// the ratchet).
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// Returns the record `name`, if any.
    ///
    /// # Errors
    /// [`E2eError::Store`] when the storage fails.
    fn get(&self, name: &str) -> E2eResult<Option<Zeroizing<Vec<u8>>>>;
    /// Replaces the record `name`.
    ///
    /// # Errors
    /// [`E2eError::Store`] when the storage fails.
    fn put(&self, name: &str, value: &[u8]) -> E2eResult<()>;
    /// Deletes the record `name` (no error if absent).
    ///
    /// # Errors
    /// [`E2eError::Store`] when the storage fails.
    fn delete(&self, name: &str) -> E2eResult<()>;
    /// Returns the names starting with `prefix`, sorted.
    ///
    /// # Errors
    /// [`E2eError::Store`] when the storage fails.
    fn list(&self, prefix: &str) -> E2eResult<Vec<String>>;
}

/// A shared key store.
pub type KeyStoreRef = Arc<dyn KeyStore>;

/// Returns an error unless `name` is a safe record name.
fn check_name(name: &str) -> E2eResult<()> {
    let valid = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'));
    if valid {
        Ok(())
    } else {
        Err(E2eError::Store(format!("invalid record name {name:?}")))
    }
}

/// An in-memory [`KeyStore`] (tests, short-lived tools). Records are wiped when dropped.
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    records: Mutex<BTreeMap<String, Zeroizing<Vec<u8>>>>,
}

impl MemoryKeyStore {
    /// Returns an empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns an empty store, shared.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::new())
    }

    /// Returns a deep copy of every record (to capture a device's state in tests).
    pub fn snapshot(&self) -> MemoryKeyStore {
        let records = self
            .records
            .lock()
            .map(|records| records.clone())
            .unwrap_or_default();
        MemoryKeyStore {
            records: Mutex::new(records),
        }
    }

    /// Returns the concatenation of every record (to scan a device's state in tests).
    pub fn dump(&self) -> Vec<u8> {
        self.records
            .lock()
            .map(|records| records.values().flat_map(|v| v.iter().copied()).collect())
            .unwrap_or_default()
    }

    fn lock(&self) -> E2eResult<std::sync::MutexGuard<'_, BTreeMap<String, Zeroizing<Vec<u8>>>>> {
        self.records
            .lock()
            .map_err(|_| E2eError::Store("memory store poisoned".into()))
    }
}

impl KeyStore for MemoryKeyStore {
    fn get(&self, name: &str) -> E2eResult<Option<Zeroizing<Vec<u8>>>> {
        Ok(self.lock()?.get(name).cloned())
    }

    fn put(&self, name: &str, value: &[u8]) -> E2eResult<()> {
        check_name(name)?;
        self.lock()?
            .insert(name.to_string(), Zeroizing::new(value.to_vec()));
        Ok(())
    }

    fn delete(&self, name: &str) -> E2eResult<()> {
        self.lock()?.remove(name);
        Ok(())
    }

    fn list(&self, prefix: &str) -> E2eResult<Vec<String>> {
        Ok(self
            .lock()?
            .keys()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect())
    }
}

/// A [`KeyStore`] in a folder: one file per record, the folder 0700 and files 0600 (owner
/// only), each write to a temporary file that is synced and renamed.
#[derive(Debug, Clone)]
pub struct FileKeyStore {
    dir: PathBuf,
}

impl FileKeyStore {
    /// Opens (creating it owner-only if needed) the store in `dir`.
    ///
    /// # Errors
    /// [`E2eError::Store`] when the folder cannot be created or restricted.
    pub fn open(dir: impl AsRef<Path>) -> E2eResult<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|error| store_error(&dir, error))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|error| store_error(&dir, error))?;
        }
        Ok(Self { dir })
    }

    /// Returns the store's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn store_error(path: &Path, error: std::io::Error) -> E2eError {
    E2eError::Store(format!("{}: {error}", path.display()))
}

impl KeyStore for FileKeyStore {
    fn get(&self, name: &str) -> E2eResult<Option<Zeroizing<Vec<u8>>>> {
        check_name(name)?;
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(Zeroizing::new(bytes))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(store_error(&path, error)),
        }
    }

    fn put(&self, name: &str, value: &[u8]) -> E2eResult<()> {
        check_name(name)?;
        let path = self.dir.join(name);
        let temporary = self.dir.join(format!(".{name}.tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&temporary)
            .map_err(|error| store_error(&temporary, error))?;
        file.write_all(value)
            .and_then(|()| file.sync_all())
            .map_err(|error| store_error(&temporary, error))?;
        drop(file);
        std::fs::rename(&temporary, &path).map_err(|error| store_error(&path, error))
    }

    fn delete(&self, name: &str) -> E2eResult<()> {
        check_name(name)?;
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(store_error(&path, error)),
        }
    }

    fn list(&self, prefix: &str) -> E2eResult<Vec<String>> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|error| store_error(&self.dir, error))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|error| store_error(&self.dir, error))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && name.starts_with(prefix) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn exercise(store: &dyn KeyStore) {
        assert!(store.get("identity").unwrap().is_none());
        store.put("identity", b"one").unwrap();
        store.put("identity", b"two").unwrap();
        store.put("session~bob~1", b"s").unwrap();
        store.put("session~bob~2", b"t").unwrap();
        assert_eq!(&store.get("identity").unwrap().unwrap()[..], b"two");
        assert_eq!(
            store.list("session~bob~").unwrap(),
            vec!["session~bob~1", "session~bob~2"]
        );
        store.delete("session~bob~1").unwrap();
        store.delete("session~bob~1").unwrap();
        assert_eq!(store.list("session~").unwrap(), vec!["session~bob~2"]);
        assert!(store.put("../escape", b"x").is_err());
        assert!(store.put("a/b", b"x").is_err());
    }

    #[test]
    fn memory_store_behaves() {
        exercise(&MemoryKeyStore::new());
    }

    #[test]
    fn file_store_behaves_and_is_owner_only() {
        let home = tempfile::tempdir().unwrap();
        let store = FileKeyStore::open(home.path().join("keys")).unwrap();
        exercise(&store);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let file_mode = std::fs::metadata(store.dir().join("identity"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(file_mode & 0o777, 0o600);
            let dir_mode = std::fs::metadata(store.dir()).unwrap().permissions().mode();
            assert_eq!(dir_mode & 0o777, 0o700);
        }
        let reopened = FileKeyStore::open(store.dir()).unwrap();
        assert_eq!(&reopened.get("identity").unwrap().unwrap()[..], b"two");
    }
}
