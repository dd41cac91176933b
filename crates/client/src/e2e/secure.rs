//! [`SecureChat`] and [`SecureEvents`]: the chat session with end-to-end encryption on by
//! default, plus device set-up, prekey maintenance and safety numbers over the network.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bluetick_proto::common::v1::{DeviceAddress, InboundMessage};
use bluetick_proto::gateway::v1::{DeviceIdentity, DevicePayload};
use bytes::Bytes;
use tonic::Code;
use tracing::{debug, warn};
use zeroize::Zeroizing;

use super::device::{E2eDevice, IdentityCheck};
use super::envelope::{Envelope, EnvelopeKind};
use super::media::MediaAttachment;
use super::safety::{DeviceKeys, safety_number};
use super::store::KeyStoreRef;
use super::{E2eError, E2eResult};
use crate::api::BluetickClient;
use crate::chat::{ChatConfig, ChatEvent, ChatEvents, ChatHandle, new_client_msg_id};
use crate::content::Content;

/// How long a recipient's key directory entry is reused before it is fetched again.
const DIRECTORY_TTL: Duration = Duration::from_secs(300);
/// Reseals of one send after the gateway reported a changed device list.
const MAX_RESEALS: u32 = 3;

/// A warning that a contact's device now has another identity key than first seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityWarning {
    /// The device whose key changed.
    pub device: DeviceAddress,
    /// Hex of the key seen before.
    pub previous_identity_hex: String,
    /// Hex of the new key.
    pub identity_hex: String,
}

impl std::fmt::Display for IdentityWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the identity key of {} changed (was {}…, now {}…); compare safety numbers again",
            self.device,
            &self.previous_identity_hex[..16.min(self.previous_identity_hex.len())],
            &self.identity_hex[..16.min(self.identity_hex.len())]
        )
    }
}

/// An opened message.
#[derive(Debug)]
pub struct SecureMessage {
    /// The server's id (acknowledge and mark read with it).
    pub message_id: u64,
    /// The authenticated sending device.
    pub sender: DeviceAddress,
    /// When the server accepted it, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// The sender's id for the message (bound into the ciphertext).
    pub client_msg_id: String,
    /// What it says.
    pub content: Content,
    /// For media: the key and ciphertext hash to download and decrypt the file.
    pub attachment_opt: Option<MediaAttachment>,
    /// How it was sealed.
    pub kind: EnvelopeKind,
    /// The plaintext bytes (wiped on drop).
    pub plaintext: Zeroizing<Vec<u8>>,
}

/// What [`SecureEvents`] yields.
#[derive(Debug)]
pub enum SecureEvent {
    /// A message that opened (boxed: it is much larger than the other events).
    Message(Box<SecureMessage>),
    /// A message that did not open (forged, replayed, or sealed with keys this device lost).
    /// It is acknowledged like any other so the server stops redelivering it.
    Undecryptable {
        /// The message as it arrived.
        message: InboundMessage,
        /// Why it did not open.
        error: E2eError,
    },
    /// A contact's identity key changed.
    IdentityChanged(IdentityWarning),
    /// Any other chat event (ticks, presence, typing, connection).
    Chat(ChatEvent),
}

struct PendingSend {
    recipient: String,
    plaintext: Zeroizing<Vec<u8>>,
    reseals: u32,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<String, PendingSend>>,
    notices: Mutex<VecDeque<SecureEvent>>,
    directory: Mutex<HashMap<String, (Instant, Vec<DeviceIdentity>)>>,
    send_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared(..)")
    }
}

#[derive(Debug, Clone)]
struct Inner {
    client: BluetickClient,
    chat: ChatHandle,
    device: Arc<E2eDevice>,
    shared: Arc<Shared>,
}

/// Sends end-to-end encrypted messages. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SecureChat {
    inner: Inner,
}

/// The opened events of a [`SecureChat`].
#[derive(Debug)]
pub struct SecureEvents {
    inner: Inner,
    events: ChatEvents,
}

fn key32(bytes: &[u8]) -> E2eResult<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| E2eError::BadKey("published key is not 32 bytes".into()))
}

/// Loads (or creates) this device's identity from `store` and makes sure the key directory
/// holds it, a signed prekey and enough one-time prekeys (refilling and rotating as due).
/// Call it right after registering a device; [`SecureChat::open`] calls it too.
///
/// # Errors
/// [`E2eError::Store`], or the directory's failure as [`E2eError::Client`].
pub async fn setup_device(
    client: &BluetickClient,
    store: KeyStoreRef,
) -> E2eResult<Arc<E2eDevice>> {
    let credentials = client.credentials();
    let address = DeviceAddress::new(credentials.user_id.clone(), credentials.device_id);
    let device = Arc::new(E2eDevice::load_or_create(address, store)?);
    let published = client.identity_keys(&credentials.user_id).await?;
    let ours = published
        .devices
        .iter()
        .find(|entry| entry.device_id == credentials.device_id);
    let current = ours.is_some_and(|entry| {
        entry.identity_key[..] == device.identity_public()[..]
            && entry.signing_key[..] == device.signing_public()[..]
    });
    if current {
        maintain_prekeys(client, &device).await?;
    } else {
        let request = device.prekeys_to_publish(super::ONE_TIME_PREKEY_BATCH, true)?;
        client.publish_keys(request).await?;
    }
    Ok(device)
}

/// Refills the directory's one-time prekeys when fewer than [`super::ONE_TIME_PREKEY_LOW`]
/// are left and rotates the signed prekey when it is older than
/// [`super::SIGNED_PREKEY_MAX_AGE_MS`]. Returns true when it published.
///
/// # Errors
/// The directory's failure as [`E2eError::Client`]; [`E2eError::Store`].
pub async fn maintain_prekeys(client: &BluetickClient, device: &E2eDevice) -> E2eResult<bool> {
    let left = client.count_prekeys().await?;
    match device.prekey_maintenance(left)? {
        Some(request) => {
            client.publish_keys(request).await?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// A safety number and the key checks made while computing it.
#[derive(Debug, Clone)]
pub struct SafetyNumber {
    /// 60 digits in groups of five; the same on both sides when no one is in the middle.
    pub number: String,
    /// Devices of the other user whose key differs from the one first seen.
    pub warnings: Vec<IdentityWarning>,
}

/// Returns the safety number of this device's user and `peer_user`, from the key directory,
/// and records the peer's keys (trust on first use), reporting changes.
///
/// # Errors
/// [`E2eError::Client`] for an unknown user or an unreachable gateway.
pub async fn safety_number_for(
    client: &BluetickClient,
    device: &E2eDevice,
    peer_user: &str,
) -> E2eResult<SafetyNumber> {
    let own_user = client.credentials().user_id.clone();
    let own = client.identity_keys(&own_user).await?.devices;
    let theirs = client.identity_keys(peer_user).await?.devices;
    let mut warnings = Vec::new();
    for entry in &theirs {
        if let Some(warning) = pin_identity(device, peer_user, entry)? {
            warnings.push(warning);
        }
    }
    let to_keys = |devices: &[DeviceIdentity]| -> E2eResult<Vec<DeviceKeys>> {
        devices
            .iter()
            .map(|entry| {
                Ok(DeviceKeys {
                    device_id: entry.device_id,
                    identity_key: key32(&entry.identity_key)?,
                    signing_key: key32(&entry.signing_key)?,
                })
            })
            .collect()
    };
    Ok(SafetyNumber {
        number: safety_number(&own_user, &to_keys(&own)?, peer_user, &to_keys(&theirs)?),
        warnings,
    })
}

/// Records `entry`'s keys for `user`; returns a warning when they changed.
fn pin_identity(
    device: &E2eDevice,
    user: &str,
    entry: &DeviceIdentity,
) -> E2eResult<Option<IdentityWarning>> {
    let peer = DeviceAddress::new(user.to_string(), entry.device_id);
    let identity = key32(&entry.identity_key)?;
    let signing = key32(&entry.signing_key)?;
    match device.check_identity(&peer, &identity, &signing)? {
        IdentityCheck::Changed { previous_identity } => {
            let warning = IdentityWarning {
                device: peer,
                previous_identity_hex: hex::encode(previous_identity),
                identity_hex: hex::encode(identity),
            };
            warn!(device = %warning.device, "identity key changed");
            Ok(Some(warning))
        }
        IdentityCheck::FirstSeen | IdentityCheck::Unchanged => Ok(None),
    }
}

impl SecureChat {
    /// Sets the device up (see [`setup_device`]) and opens an encrypted chat session.
    ///
    /// # Errors
    /// As [`setup_device`] and [`BluetickClient::open_chat`].
    pub async fn open(
        client: &BluetickClient,
        store: KeyStoreRef,
        config: ChatConfig,
    ) -> E2eResult<(SecureChat, SecureEvents)> {
        let device = setup_device(client, store).await?;
        Self::open_with_device(client, device, config).await
    }

    /// Opens an encrypted chat session for a device already set up.
    ///
    /// # Errors
    /// As [`BluetickClient::open_chat`].
    pub async fn open_with_device(
        client: &BluetickClient,
        device: Arc<E2eDevice>,
        config: ChatConfig,
    ) -> E2eResult<(SecureChat, SecureEvents)> {
        let (chat, events) = client.open_chat(config).await?;
        let inner = Inner {
            client: client.clone(),
            chat,
            device,
            shared: Arc::new(Shared::default()),
        };
        Ok((
            SecureChat {
                inner: inner.clone(),
            },
            SecureEvents { inner, events },
        ))
    }

    /// Returns the underlying chat handle (mark read, typing, presence, close).
    pub fn chat(&self) -> &ChatHandle {
        &self.inner.chat
    }

    /// Returns the device's cryptographic core.
    pub fn device(&self) -> &Arc<E2eDevice> {
        &self.inner.device
    }

    /// Returns the client.
    pub fn client(&self) -> &BluetickClient {
        &self.inner.client
    }

    /// Seals `content` for every device of `recipient` and sends it; returns the
    /// `client_msg_id` (answered by [`ChatEvent::Sent`] or [`ChatEvent::SendFailed`] in
    /// [`SecureEvents`]).
    ///
    /// # Errors
    /// [`E2eError::NoKeys`] when the recipient has no device with keys, the directory's or
    /// the session's failures.
    pub async fn send_content(&self, recipient: &str, content: &Content) -> E2eResult<String> {
        let plaintext = Zeroizing::new(content.encode().to_vec());
        self.send_plaintext(recipient, plaintext).await
    }

    /// Seals an encrypted-media message for `attachment` and sends it.
    ///
    /// # Errors
    /// As [`SecureChat::send_content`].
    pub async fn send_attachment(
        &self,
        recipient: &str,
        attachment: &MediaAttachment,
    ) -> E2eResult<String> {
        self.send_plaintext(recipient, attachment.to_plaintext()?)
            .await
    }

    /// Seals raw plaintext bytes for every device of `recipient` and sends them.
    ///
    /// # Errors
    /// As [`SecureChat::send_content`].
    pub async fn send_plaintext(
        &self,
        recipient: &str,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> E2eResult<String> {
        let client_msg_id = new_client_msg_id();
        let _order = self.inner.shared.send_lock.lock().await;
        let payloads = self
            .inner
            .seal_for_user(recipient, &client_msg_id, &plaintext)
            .await?;
        if let Ok(mut pending) = self.inner.shared.pending.lock() {
            pending.insert(
                client_msg_id.clone(),
                PendingSend {
                    recipient: recipient.to_string(),
                    plaintext,
                    reseals: 0,
                },
            );
        }
        self.inner
            .chat
            .send_with_id(client_msg_id.clone(), recipient, payloads)
            .await?;
        Ok(client_msg_id)
    }

    /// Returns the safety number with `peer_user` (see [`safety_number_for`]); key changes
    /// found also come as [`SecureEvent::IdentityChanged`].
    ///
    /// # Errors
    /// As [`safety_number_for`].
    pub async fn safety_number(&self, peer_user: &str) -> E2eResult<SafetyNumber> {
        let number = safety_number_for(&self.inner.client, &self.inner.device, peer_user).await?;
        if let Ok(mut cache) = self.inner.shared.directory.lock() {
            cache.remove(peer_user);
        }
        self.inner.notify(number.warnings.iter().cloned());
        Ok(number)
    }

    /// Closes the chat session (see [`ChatHandle::close`]).
    ///
    /// # Errors
    /// As [`ChatHandle::close`].
    pub async fn close(&self) -> E2eResult<()> {
        Ok(self.inner.chat.close().await?)
    }
}

impl Inner {
    fn notify(&self, warnings: impl IntoIterator<Item = IdentityWarning>) {
        if let Ok(mut notices) = self.shared.notices.lock() {
            notices.extend(warnings.into_iter().map(SecureEvent::IdentityChanged));
        }
    }

    /// Returns `user`'s devices with keys, from the cache or the directory; records their
    /// keys (trust on first use).
    async fn directory(&self, user: &str, refresh: bool) -> E2eResult<Vec<DeviceIdentity>> {
        if !refresh
            && let Ok(cache) = self.shared.directory.lock()
            && let Some((fetched_at, devices)) = cache.get(user)
            && fetched_at.elapsed() < DIRECTORY_TTL
        {
            return Ok(devices.clone());
        }
        let devices = self.client.identity_keys(user).await?.devices;
        let mut warnings = Vec::new();
        for entry in &devices {
            if let Some(warning) = pin_identity(&self.device, user, entry)? {
                warnings.push(warning);
            }
        }
        self.notify(warnings);
        if let Ok(mut cache) = self.shared.directory.lock() {
            cache.insert(user.to_string(), (Instant::now(), devices.clone()));
        }
        Ok(devices)
    }

    /// Seals `plaintext` once per device of `recipient`: on the session with it, starting one
    /// from its prekey bundle when there is none, else with the baseline.
    async fn seal_for_user(
        &self,
        recipient: &str,
        client_msg_id: &str,
        plaintext: &[u8],
    ) -> E2eResult<Vec<DevicePayload>> {
        let mut devices = self.directory(recipient, false).await?;
        if devices.is_empty() {
            return Err(E2eError::NoKeys(format!(
                "{recipient} has no device with published keys"
            )));
        }
        let mut needs_session = Vec::new();
        for entry in &devices {
            let peer = DeviceAddress::new(recipient.to_string(), entry.device_id);
            let session_identity_opt = self.device.session_identity(&peer)?;
            let usable = self.device.has_session(&peer)?
                && session_identity_opt.is_some_and(|key| key[..] == entry.identity_key[..]);
            if !usable {
                needs_session.push(entry.device_id);
            }
        }
        if !needs_session.is_empty() {
            let bundles = self.client.prekey_bundles(recipient).await?.bundles;
            let stale = bundles.iter().any(|bundle| {
                devices.iter().all(|entry| {
                    entry.device_id != bundle.device_id || entry.identity_key != bundle.identity_key
                })
            });
            if stale {
                // Keys changed since the cached directory entry: fetch it again (and warn).
                devices = self.directory(recipient, true).await?;
            }
            for bundle in bundles
                .iter()
                .filter(|bundle| needs_session.contains(&bundle.device_id))
            {
                let expected = devices
                    .iter()
                    .find(|entry| entry.device_id == bundle.device_id);
                if expected.is_none_or(|entry| entry.identity_key != bundle.identity_key) {
                    // The directory changed between the two calls; the next send catches up.
                    continue;
                }
                if let Err(error) = self.device.start_session(recipient, bundle) {
                    warn!(user = recipient, device_id = bundle.device_id, %error,
                        "cannot start a session; sealing with the baseline");
                }
            }
        }
        let mut payloads = Vec::with_capacity(devices.len());
        for entry in &devices {
            let peer = DeviceAddress::new(recipient.to_string(), entry.device_id);
            let sealed = if self.device.has_session(&peer)? {
                self.device.seal(&peer, client_msg_id, plaintext)?
            } else {
                self.device.seal_baseline(
                    &peer,
                    &key32(&entry.identity_key)?,
                    client_msg_id,
                    plaintext,
                )?
            };
            payloads.push(DevicePayload {
                device_id: entry.device_id,
                payload: Bytes::from(sealed),
            });
        }
        Ok(payloads)
    }

    /// Checks the sender identity an envelope names against the trust store, and against
    /// the directory when it is new or changed.
    async fn check_sender_identity(
        &self,
        sender: &DeviceAddress,
        identity: &[u8; 32],
    ) -> E2eResult<()> {
        if self
            .device
            .seen_identity(sender)?
            .is_some_and(|seen| seen.identity_key == *identity)
        {
            return Ok(());
        }
        let devices = self.directory(&sender.user_id, true).await?;
        let published = devices
            .iter()
            .find(|entry| entry.device_id == sender.device_id)
            .ok_or_else(|| {
                E2eError::IdentityMismatch(format!("{sender} has no published identity key"))
            })?;
        if published.identity_key[..] != identity[..] {
            return Err(E2eError::IdentityMismatch(format!(
                "{sender} sealed with a key the directory does not publish"
            )));
        }
        Ok(())
    }

    async fn open_message(&self, message: InboundMessage) -> SecureEvent {
        match self.try_open(&message).await {
            Ok(opened) => SecureEvent::Message(Box::new(opened)),
            Err(error) => {
                debug!(message_id = message.message_id, %error, "message did not open");
                SecureEvent::Undecryptable { message, error }
            }
        }
    }

    async fn try_open(&self, message: &InboundMessage) -> E2eResult<SecureMessage> {
        let sender = message
            .sender
            .clone()
            .ok_or_else(|| E2eError::BadEnvelope("message without sender".into()))?;
        let (envelope, _) = Envelope::decode(&message.payload)?;
        if let Some(identity) = envelope.header.sender_identity_opt() {
            self.check_sender_identity(&sender, &identity).await?;
        }
        let opened = self.device.open(&sender, &message.payload)?;
        if opened.kind == EnvelopeKind::PreKey {
            // A one-time prekey may have been used: top the directory up in the background.
            let client = self.client.clone();
            let device = Arc::clone(&self.device);
            tokio::spawn(async move {
                if let Err(error) = maintain_prekeys(&client, &device).await {
                    debug!(%error, "prekey refill failed");
                }
            });
        }
        let attachment_opt = MediaAttachment::from_plaintext(&opened.plaintext);
        let content = Content::decode(&opened.plaintext)
            .map_err(|error| E2eError::BadEnvelope(format!("unknown content: {error}")))?;
        Ok(SecureMessage {
            message_id: message.message_id,
            sender,
            sent_at_ms: message.sent_at_ms,
            client_msg_id: opened.client_msg_id,
            content,
            attachment_opt,
            kind: opened.kind,
            plaintext: opened.plaintext,
        })
    }

    /// Reseals a send the gateway refused because the recipient's devices changed; returns
    /// false when it cannot (then the failure is reported).
    async fn reseal(&self, client_msg_id: &str, current_device_ids: &[u32]) -> bool {
        let (recipient, plaintext) = {
            let Ok(mut pending) = self.shared.pending.lock() else {
                return false;
            };
            let Some(entry) = pending.get_mut(client_msg_id) else {
                return false;
            };
            if entry.reseals >= MAX_RESEALS {
                return false;
            }
            entry.reseals += 1;
            (entry.recipient.clone(), entry.plaintext.clone())
        };
        let _order = self.shared.send_lock.lock().await;
        let devices = match self.directory(&recipient, true).await {
            Ok(devices) => devices,
            Err(error) => {
                warn!(%error, "cannot refresh the recipient's devices");
                return false;
            }
        };
        let with_keys: Vec<u32> = devices.iter().map(|entry| entry.device_id).collect();
        if current_device_ids.iter().any(|id| !with_keys.contains(id)) {
            warn!(user = %recipient, "a device of the recipient has no keys; cannot seal for it");
            return false;
        }
        let payloads = match self
            .seal_for_user(&recipient, client_msg_id, &plaintext)
            .await
        {
            Ok(payloads) => payloads,
            Err(error) => {
                warn!(%error, "reseal failed");
                return false;
            }
        };
        self.chat
            .send_with_id(client_msg_id.to_string(), &recipient, payloads)
            .await
            .is_ok()
    }

    fn forget(&self, client_msg_id: &str) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.remove(client_msg_id);
        }
    }
}

impl SecureEvents {
    /// Returns the next event, or `None` once the session has ended and all were read.
    /// Messages are opened here; sends refused because the recipient's devices changed are
    /// resealed and sent again transparently.
    pub async fn recv(&mut self) -> Option<SecureEvent> {
        loop {
            if let Some(notice) = self
                .inner
                .shared
                .notices
                .lock()
                .ok()
                .and_then(|mut notices| notices.pop_front())
            {
                return Some(notice);
            }
            let event = self.events.recv().await?;
            match event {
                ChatEvent::Message(message) => {
                    let opened = self.inner.open_message(message).await;
                    if let Some(notice) = self
                        .inner
                        .shared
                        .notices
                        .lock()
                        .ok()
                        .and_then(|mut notices| notices.pop_front())
                    {
                        // Warnings first, then the message.
                        if let Ok(mut notices) = self.inner.shared.notices.lock() {
                            notices.push_front(opened);
                        }
                        return Some(notice);
                    }
                    return Some(opened);
                }
                ChatEvent::SendFailed {
                    client_msg_id,
                    code,
                    message,
                    recipient_device_ids,
                } => {
                    if code == Code::FailedPrecondition
                        && self
                            .inner
                            .reseal(&client_msg_id, &recipient_device_ids)
                            .await
                    {
                        continue;
                    }
                    self.inner.forget(&client_msg_id);
                    return Some(SecureEvent::Chat(ChatEvent::SendFailed {
                        client_msg_id,
                        code,
                        message,
                        recipient_device_ids,
                    }));
                }
                ChatEvent::Sent {
                    client_msg_id,
                    message_id,
                    sent_at_ms,
                    duplicate,
                } => {
                    self.inner.forget(&client_msg_id);
                    return Some(SecureEvent::Chat(ChatEvent::Sent {
                        client_msg_id,
                        message_id,
                        sent_at_ms,
                        duplicate,
                    }));
                }
                other => return Some(SecureEvent::Chat(other)),
            }
        }
    }

    /// Returns the next event within `timeout`.
    ///
    /// # Errors
    /// [`crate::ClientError::Timeout`] or [`crate::ClientError::Closed`], as [`E2eError::Client`].
    pub async fn next_event(&mut self, timeout: Duration) -> E2eResult<SecureEvent> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(crate::ClientError::Closed.into()),
            Err(_) => {
                Err(crate::ClientError::Timeout(format!("no event within {timeout:?}")).into())
            }
        }
    }

    /// Returns the next opened message within `timeout`, skipping other events (and
    /// returning an undecryptable message's error).
    ///
    /// # Errors
    /// The message's [`E2eError`], or as [`SecureEvents::next_event`].
    pub async fn next_message(&mut self, timeout: Duration) -> E2eResult<SecureMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await? {
                SecureEvent::Message(message) => return Ok(*message),
                SecureEvent::Undecryptable { error, .. } => return Err(error),
                _ => {}
            }
        }
    }

    /// Waits for the answer to send `client_msg_id` (resealing as needed) and returns its
    /// `message_id`, skipping other events.
    ///
    /// # Errors
    /// The rejection as [`E2eError::Client`], or as [`SecureEvents::next_event`].
    pub async fn wait_sent(&mut self, client_msg_id: &str, timeout: Duration) -> E2eResult<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await? {
                SecureEvent::Chat(ChatEvent::Sent {
                    client_msg_id: id,
                    message_id,
                    ..
                }) if id == client_msg_id => return Ok(message_id),
                SecureEvent::Chat(ChatEvent::SendFailed {
                    client_msg_id: id,
                    code,
                    message,
                    ..
                }) if id == client_msg_id => {
                    return Err(crate::ClientError::from_code(code, message).into());
                }
                _ => {}
            }
        }
    }

    /// Returns the underlying chat handle.
    pub fn chat(&self) -> &ChatHandle {
        &self.inner.chat
    }
}
