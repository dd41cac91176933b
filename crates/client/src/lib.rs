//! bluetick's client SDK, used by the CLI, the end-to-end tests and the benchmarks.
//!
//! Layout:
//! - [`register`] creates a user and returns its first device's [`Credentials`];
//!   [`BluetickClient`] wraps credentials with lazily connected gRPC channels and offers
//!   the unary calls (devices, presence, privacy, contacts, keys) and raw stubs.
//! - [`chat`]: the managed chat session ([`BluetickClient::open_chat`] → [`ChatHandle`] +
//!   [`ChatEvents`] of [`ChatEvent`]) with heartbeats, reconnects, resends, dedup and
//!   automatic acknowledgements.
//! - [`media`]: streaming, hash-verified upload and download.
//! - [`Content`]: the JSON message format of the CLI and the tests.
//! - [`e2e`]: end-to-end encryption: [`e2e::SecureChat`] seals every message and file for
//!   each device of the recipient (X3DH, double ratchet, baseline sealing, safety numbers).
//! - [`ClientError`]: typed errors mapped from gRPC statuses, with a retry hint.
//!
//! Payloads are opaque bytes everywhere, so an end-to-end encryption layer can seal them
//! per device before [`ChatHandle::send_to_devices`].
//!
//! ```no_run
//! # async fn demo() -> bluetick_client::ClientResult<()> {
//! use std::time::Duration;
//! use bluetick_client::{BluetickClient, ChatConfig, Content, register};
//!
//! let alice = register("http://127.0.0.1:7700", "http://127.0.0.1:7704", "alice", "Alice").await?;
//! let client = BluetickClient::new(alice)?;
//! let (chat, mut events) = client.open_chat(ChatConfig::default()).await?;
//! let client_msg_id = chat.send_content("bob", &Content::text("hi")).await?;
//! let message_id = events.wait_sent(&client_msg_id, Duration::from_secs(5)).await?;
//! # let _ = message_id;
//! chat.close().await?;
//! # Ok(()) }
//! ```

mod api;
mod backoff;
pub mod chat;
mod content;
mod credentials;
mod dedup;
pub mod e2e;
mod error;
pub mod media;

pub use api::{
    AuthInterceptor, Authed, BluetickClient, DeviceList, UNARY_DEADLINE, endpoint,
    new_device_token, register, register_with_token,
};
pub use backoff::Backoff;
pub use chat::{ChatConfig, ChatEvent, ChatEvents, ChatHandle, new_client_msg_id};
pub use content::Content;
pub use credentials::{Credentials, DEFAULT_GATEWAY_URL, DEFAULT_MEDIA_URL};
pub use dedup::DedupWindow;
pub use e2e::{E2eError, E2eResult, SecureChat, SecureEvent, SecureEvents, SecureMessage};
pub use error::{ClientError, ClientResult};
pub use media::{Progress, Uploaded, no_progress};

/// The generated protocol types, re-exported so SDK users need no direct dependency.
pub use bluetick_proto as proto;
pub use bluetick_proto::common::v1::{
    DeviceAddress, InboundMessage, LastSeenVisibility, PresenceState, TickStatus, Typing,
};
/// gRPC status codes, as found in [`ChatEvent::SendFailed`] and [`ClientError::code`].
pub use tonic::Code;
