//! The managed chat session: one `Chat.Open` stream per device, kept alive.
//!
//! [`BluetickClient::open_chat`] connects, waits for the server's `Welcome` and returns a
//! [`ChatHandle`] (cheap to clone; sends commands) and [`ChatEvents`] (the typed
//! [`ChatEvent`] stream). A background task owns the stream and:
//!
//! - sends a heartbeat every interval the server asked for (its own task, so a slow event
//!   consumer does not make the device look offline);
//! - reconnects with exponential backoff and jitter when the stream breaks, and re-sends
//!   every send not answered yet with the same `client_msg_id` (the server answers a resend
//!   with the original `message_id`);
//! - drops duplicate inbound messages by `message_id` (bounded window) and re-acknowledges
//!   them, so a lost acknowledgement heals on redelivery;
//! - acknowledges DELIVERED in batches and confirms receipts (both configurable).
//!
//! Everything is bounded: commands, events, the outbound queue and sends in flight (a
//! caller of [`ChatHandle::send`] waits when [`ChatConfig::max_in_flight_sends`] are
//! unanswered). Dropping every [`ChatHandle`] closes the session gracefully.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bluetick_proto::common::v1::{
    DeviceAddress, InboundMessage, PresenceState, TickStatus, Typing,
};
use bluetick_proto::gateway::v1::client_frame::Frame as ClientFrameBody;
use bluetick_proto::gateway::v1::server_frame::Frame as ServerFrameBody;
use bluetick_proto::gateway::v1::{
    Acknowledge, ClientFrame, ConfirmReceipts, DevicePayload, FrameError, Heartbeat, SendMessage,
    ServerFrame, TypingNotice, WatchPresence, Welcome,
};
use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};
use tracing::{debug, warn};

use crate::api::BluetickClient;
use crate::backoff::Backoff;
use crate::content::Content;
use crate::dedup::DedupWindow;
use crate::error::{ClientError, ClientResult};

/// Heartbeat interval used when the server's Welcome does not give one.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Frames queued toward the server per connection.
const OUTBOUND_BUFFER: usize = 256;
/// READ acknowledgements remembered to be written again after a reconnect.
const REMEMBERED_READS: usize = 4_096;
/// A connection that held this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// How long [`ChatHandle::close`] waits for the server to end the stream after half-close.
const HALF_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Tunables of a chat session. `Default` suits apps; tests may shorten timers.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Acknowledge DELIVERED for every new message once it is handed to [`ChatEvents`].
    pub auto_ack_delivered: bool,
    /// Confirm every receipt once it is handed to [`ChatEvents`] (else call
    /// [`ChatHandle::confirm_receipts`]; unconfirmed receipts come back on reconnect).
    pub auto_confirm_receipts: bool,
    /// Most message or receipt ids per Acknowledge / ConfirmReceipts frame.
    pub ack_batch_max: usize,
    /// How often acknowledgements queued outside frame handling (reads marked by the app,
    /// retries) are written. Those that receiving frames produces are written as soon as
    /// the frames that arrived together are handled.
    pub ack_flush_interval: Duration,
    /// Message ids remembered for duplicate suppression.
    pub dedup_capacity: usize,
    /// Events buffered for the consumer before the session waits for it.
    pub event_buffer: usize,
    /// Commands buffered from handles.
    pub command_buffer: usize,
    /// Sends not answered yet before [`ChatHandle::send`] waits.
    pub max_in_flight_sends: usize,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Deadline for opening the stream and receiving Welcome.
    pub connect_timeout: Duration,
    /// Heartbeat interval to use instead of the server's (tests only, normally `None`).
    pub heartbeat_interval_override_opt: Option<Duration>,
    /// Reconnect when the stream breaks (else the session closes with the error).
    pub reconnect: bool,
    /// How often a send rejected with UNAVAILABLE is retried before it fails.
    pub unavailable_send_retries: u32,
    /// How long [`ChatHandle::close`] waits for unanswered sends.
    pub close_timeout: Duration,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            auto_ack_delivered: true,
            auto_confirm_receipts: true,
            ack_batch_max: 256,
            ack_flush_interval: Duration::from_millis(20),
            dedup_capacity: 16_384,
            event_buffer: 1024,
            command_buffer: 256,
            max_in_flight_sends: 1024,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            heartbeat_interval_override_opt: None,
            reconnect: true,
            unavailable_send_retries: 5,
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// What a chat session reports.
#[derive(Debug)]
pub enum ChatEvent {
    /// The stream is open and authenticated (first connect or a reconnect).
    Connected {
        /// This device.
        device: DeviceAddress,
        /// The heartbeat interval in use.
        heartbeat_interval: Duration,
        /// Largest payload the server accepts per device.
        max_payload_bytes: u32,
        /// How many times the session reconnected before this (0 for the first connect).
        reconnects: u32,
    },
    /// The stored backlog has been sent; what follows is live.
    BacklogDone {
        /// Backlog messages the server sent (duplicates included).
        messages: u32,
        /// Backlog receipts the server sent.
        receipts: u32,
    },
    /// The stream broke; the session reconnects after `retry_in`.
    Disconnected {
        /// Why the stream broke or the last connect attempt failed.
        error: ClientError,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// A new message for this device (never the same `message_id` twice in the window).
    Message(InboundMessage),
    /// The single tick: the server stored a send durably.
    Sent {
        /// The id the send was made with.
        client_msg_id: String,
        /// The server's id for the message.
        message_id: u64,
        /// When the server accepted it, milliseconds since the Unix epoch.
        sent_at_ms: u64,
        /// True when the server had already accepted this `client_msg_id`.
        duplicate: bool,
    },
    /// The server refused a send (nothing stored), or the session closed before an answer.
    SendFailed {
        /// The id the send was made with.
        client_msg_id: String,
        /// Why (NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, FAILED_PRECONDITION,
        /// UNAVAILABLE after retries, CANCELLED when the session closed first).
        code: Code,
        /// The server's explanation.
        message: String,
        /// With FAILED_PRECONDITION: the recipient's current devices.
        recipient_device_ids: Vec<u32>,
    },
    /// A tick change for one of this device's messages: DELIVERED (double) or READ (blue).
    Receipt {
        /// The receipt's id (confirmed automatically unless configured otherwise).
        receipt_id: u64,
        /// The message it is about.
        message_id: u64,
        /// The recipient device whose state changed.
        recipient: DeviceAddress,
        /// DELIVERED or READ.
        status: TickStatus,
        /// When the recipient reported it, milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// Presence of a watched user.
    Presence(PresenceState),
    /// Someone started or stopped typing to this user.
    Typing(Typing),
    /// The server could not act on a frame; the stream stays open.
    Error(FrameError),
    /// The session ended: after [`ChatHandle::close`] (`error` is `None`) or a fatal error
    /// (e.g. the token was revoked). No event follows.
    Closed {
        /// The fatal error, if any.
        error_opt: Option<ClientError>,
    },
}

/// Returns a fresh random `client_msg_id` (128 bits, hex).
pub fn new_client_msg_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[derive(Debug)]
enum Command {
    Send {
        frame: SendMessage,
        permit: OwnedSemaphorePermit,
    },
    Ack {
        status: TickStatus,
        message_ids: Vec<u64>,
    },
    ConfirmReceipts(Vec<u64>),
    Typing(TypingNotice),
    WatchPresence(Vec<String>),
    /// A send rejected with UNAVAILABLE is due again.
    RetrySend(String),
    /// Acknowledgements the server refused with UNAVAILABLE are due again.
    RetryAcks(Vec<u64>),
    Close(oneshot::Sender<()>),
}

/// Sends commands to a chat session. Cheap to clone; the session closes when the last
/// handle is dropped or [`ChatHandle::close`] is called.
#[derive(Debug, Clone)]
pub struct ChatHandle {
    commands: mpsc::Sender<Command>,
    in_flight: Arc<Semaphore>,
    connected: watch::Receiver<bool>,
    device: DeviceAddress,
    max_payload_bytes: u32,
}

impl ChatHandle {
    /// Returns this device's address, as the server authenticated it.
    pub fn device(&self) -> &DeviceAddress {
        &self.device
    }

    /// Returns the largest payload per device the server accepts (from its Welcome).
    pub fn max_payload_bytes(&self) -> u32 {
        self.max_payload_bytes
    }

    /// Returns true while the stream is up.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until the stream is up.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] after `timeout`, [`ClientError::Closed`] if the session ended.
    pub async fn wait_connected(&self, timeout: Duration) -> ClientResult<()> {
        let mut connected = self.connected.clone();
        match tokio::time::timeout(timeout, connected.wait_for(|up| *up)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout("not connected in time".into())),
        }
    }

    /// Sends one payload for every device of `recipient` and returns the `client_msg_id`;
    /// the answer arrives as [`ChatEvent::Sent`] or [`ChatEvent::SendFailed`].
    ///
    /// # Errors
    /// [`ClientError::Closed`] when the session has ended.
    pub async fn send(&self, recipient: &str, payload: impl Into<Bytes>) -> ClientResult<String> {
        self.send_to_devices(recipient, vec![(0, payload.into())])
            .await
    }

    /// Sends a [`Content`] (as JSON) to every device of `recipient`.
    ///
    /// # Errors
    /// [`ClientError::Closed`] when the session has ended.
    pub async fn send_content(&self, recipient: &str, content: &Content) -> ClientResult<String> {
        self.send(recipient, content.encode()).await
    }

    /// Sends one payload per recipient device (`(device_id, payload)`, e.g. sealed per
    /// device) and returns the `client_msg_id`.
    ///
    /// # Errors
    /// [`ClientError::Closed`] when the session has ended.
    pub async fn send_to_devices(
        &self,
        recipient: &str,
        payloads: Vec<(u32, Bytes)>,
    ) -> ClientResult<String> {
        let client_msg_id = new_client_msg_id();
        let payloads = payloads
            .into_iter()
            .map(|(device_id, payload)| DevicePayload { device_id, payload })
            .collect();
        self.send_with_id(client_msg_id.clone(), recipient, payloads)
            .await?;
        Ok(client_msg_id)
    }

    /// Sends with a caller-chosen `client_msg_id` (a resend of an earlier id is answered
    /// with the earlier `message_id` and `duplicate: true`).
    ///
    /// # Errors
    /// [`ClientError::Closed`] when the session has ended.
    pub async fn send_with_id(
        &self,
        client_msg_id: String,
        recipient: &str,
        payloads: Vec<DevicePayload>,
    ) -> ClientResult<()> {
        let permit = Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Closed)?;
        let frame = SendMessage {
            client_msg_id,
            recipient_user_id: recipient.to_string(),
            payloads,
        };
        self.command(Command::Send { frame, permit }).await
    }

    /// Reports messages as read on this device (blue ticks; the server then deletes them).
    ///
    /// # Errors
    /// [`ClientError::Closed`] when the session has ended.
    pub async fn mark_read(&self, message_ids: Vec<u64>) -> ClientResult<()> {
        self.command(Command::Ack {
            status: TickStatus::Read,
            message_ids,
        })
        .await
    }

    /// Reports messages as delivered (only needed with `auto_ack_delivered: false`).
    ///
    /// # Errors
    /// [`ClientError::Closed`] when the session has ended.
    pub async fn ack_delivered(&self, message_ids: Vec<u64>) -> ClientResult<()> {
        self.command(Command::Ack {
            status: TickStatus::Delivered,
            message_ids,
        })
        .await
    }

    /// Confirms receipts (only needed with `auto_confirm_receipts: false`).
    ///
    /// # Errors
    /// [`ClientError::Closed`] when the session has ended.
    pub async fn confirm_receipts(&self, receipt_ids: Vec<u64>) -> ClientResult<()> {
        self.command(Command::ConfirmReceipts(receipt_ids)).await
    }

    /// Tells `recipient` this device is (or stopped) typing. Dropped while disconnected.
    ///
    /// # Errors
    /// [`ClientError::Closed`] when the session has ended.
    pub async fn typing(&self, recipient: &str, active: bool) -> ClientResult<()> {
        self.command(Command::Typing(TypingNotice {
            recipient_user_id: recipient.to_string(),
            active,
        }))
        .await
    }

    /// Follows the presence of `user_ids` (replacing the previous list; empty stops). The
    /// list is sent again after every reconnect.
    ///
    /// # Errors
    /// [`ClientError::Closed`] when the session has ended.
    pub async fn watch_presence(&self, user_ids: Vec<String>) -> ClientResult<()> {
        self.command(Command::WatchPresence(user_ids)).await
    }

    /// Closes the session gracefully: flushes acknowledgements, waits (up to
    /// [`ChatConfig::close_timeout`]) for unanswered sends, half-closes the stream and
    /// returns once the background task has ended. Closing twice is fine.
    ///
    /// # Errors
    /// None in practice; kept for symmetry with the other calls.
    pub async fn close(&self) -> ClientResult<()> {
        let (done_tx, done_rx) = oneshot::channel();
        if self.commands.send(Command::Close(done_tx)).await.is_err() {
            return Ok(());
        }
        let _ = done_rx.await;
        Ok(())
    }

    async fn command(&self, command: Command) -> ClientResult<()> {
        self.commands
            .send(command)
            .await
            .map_err(|_| ClientError::Closed)
    }
}

/// The events of a chat session, with waiting helpers for tests and tools.
///
/// The helpers that wait for a particular event discard the events they skip.
#[derive(Debug)]
pub struct ChatEvents {
    events: mpsc::Receiver<ChatEvent>,
}

impl ChatEvents {
    /// Returns the next event, or `None` once the session has ended and all were read.
    pub async fn recv(&mut self) -> Option<ChatEvent> {
        self.events.recv().await
    }

    /// Returns the next event if one is ready.
    pub fn try_recv(&mut self) -> Option<ChatEvent> {
        self.events.try_recv().ok()
    }

    /// Returns the next event within `timeout`.
    ///
    /// # Errors
    /// [`ClientError::Timeout`], or [`ClientError::Closed`] when no event will come.
    pub async fn next_event(&mut self, timeout: Duration) -> ClientResult<ChatEvent> {
        self.next_event_matching(|_| true, timeout).await
    }

    /// Returns the first event for which `predicate` holds, within `timeout`, discarding
    /// the others.
    ///
    /// # Errors
    /// [`ClientError::Timeout`], or [`ClientError::Closed`] when the session ended first.
    pub async fn next_event_matching(
        &mut self,
        mut predicate: impl FnMut(&ChatEvent) -> bool,
        timeout: Duration,
    ) -> ClientResult<ChatEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => {
                    return Err(ClientError::Timeout(format!(
                        "no matching chat event within {timeout:?}"
                    )));
                }
                Ok(None) => return Err(ClientError::Closed),
                Ok(Some(event)) if predicate(&event) => return Ok(event),
                Ok(Some(_)) => {}
            }
        }
    }

    /// Returns the next inbound message within `timeout`.
    ///
    /// # Errors
    /// As [`ChatEvents::next_event_matching`].
    pub async fn next_message(&mut self, timeout: Duration) -> ClientResult<InboundMessage> {
        match self
            .next_event_matching(|event| matches!(event, ChatEvent::Message(_)), timeout)
            .await?
        {
            ChatEvent::Message(message) => Ok(message),
            _ => Err(ClientError::Protocol("unreachable event kind".into())),
        }
    }

    /// Returns the next `count` inbound messages, all within `timeout`.
    ///
    /// # Errors
    /// As [`ChatEvents::next_event_matching`].
    pub async fn next_messages(
        &mut self,
        count: usize,
        timeout: Duration,
    ) -> ClientResult<Vec<InboundMessage>> {
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::with_capacity(count);
        while messages.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            messages.push(self.next_message(left).await?);
        }
        Ok(messages)
    }

    /// Waits for the answer to send `client_msg_id` and returns its `message_id`.
    ///
    /// # Errors
    /// The rejection as a typed error (e.g. [`ClientError::NotFound`] for an unknown
    /// recipient), or as [`ChatEvents::next_event_matching`].
    pub async fn wait_sent(&mut self, client_msg_id: &str, timeout: Duration) -> ClientResult<u64> {
        let event = self
            .next_event_matching(
                |event| match event {
                    ChatEvent::Sent {
                        client_msg_id: id, ..
                    }
                    | ChatEvent::SendFailed {
                        client_msg_id: id, ..
                    } => id == client_msg_id,
                    _ => false,
                },
                timeout,
            )
            .await?;
        match event {
            ChatEvent::Sent { message_id, .. } => Ok(message_id),
            ChatEvent::SendFailed { code, message, .. } => {
                Err(ClientError::from_code(code, message))
            }
            _ => Err(ClientError::Protocol("unreachable event kind".into())),
        }
    }

    /// Waits for a receipt of `message_id` at `status` or beyond (READ counts for
    /// DELIVERED) and returns the recipient device.
    ///
    /// # Errors
    /// As [`ChatEvents::next_event_matching`].
    pub async fn wait_receipt(
        &mut self,
        message_id: u64,
        status: TickStatus,
        timeout: Duration,
    ) -> ClientResult<DeviceAddress> {
        let event = self
            .next_event_matching(
                |event| {
                    matches!(event, ChatEvent::Receipt { message_id: id, status: got, .. }
                        if *id == message_id && (*got as i32) >= (status as i32))
                },
                timeout,
            )
            .await?;
        match event {
            ChatEvent::Receipt { recipient, .. } => Ok(recipient),
            _ => Err(ClientError::Protocol("unreachable event kind".into())),
        }
    }

    /// Returns the events as a `Stream`.
    pub fn into_stream(self) -> ReceiverStream<ChatEvent> {
        ReceiverStream::new(self.events)
    }
}

impl BluetickClient {
    /// Opens the chat stream and returns the session's handle and events; the first event
    /// is [`ChatEvent::Connected`].
    ///
    /// # Errors
    /// The first connection's failure: [`ClientError::Unauthenticated`] for a bad token,
    /// [`ClientError::Unavailable`] when the gateway is unreachable, [`ClientError::Timeout`]
    /// when no Welcome arrived within [`ChatConfig::connect_timeout`].
    pub async fn open_chat(&self, config: ChatConfig) -> ClientResult<(ChatHandle, ChatEvents)> {
        let connection = connect_once(self, &config).await?;
        let (events_tx, events_rx) = mpsc::channel(config.event_buffer.max(1));
        let (commands_tx, commands_rx) = mpsc::channel(config.command_buffer.max(1));
        let (connected_tx, connected_rx) = watch::channel(false);
        let device = connection.welcome.device.clone().unwrap_or_else(|| {
            DeviceAddress::new(
                self.credentials().user_id.clone(),
                self.credentials().device_id,
            )
        });
        let handle = ChatHandle {
            commands: commands_tx.clone(),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight_sends.max(1))),
            connected: connected_rx,
            device,
            max_payload_bytes: connection.welcome.max_payload_bytes,
        };
        let session = Session {
            client: self.clone(),
            backoff: Backoff::new(config.backoff_initial, config.backoff_max),
            ack_backoff: Backoff::new(config.backoff_initial, config.backoff_max),
            dedup: DedupWindow::new(config.dedup_capacity),
            receipt_dedup: DedupWindow::new(config.dedup_capacity),
            config,
            events_tx,
            commands_rx,
            retry_tx: commands_tx.downgrade(),
            connected_tx,
            pending: HashMap::new(),
            pending_order: BTreeMap::new(),
            next_seq: 0,
            delivered_queue: Vec::new(),
            read_queue: Vec::new(),
            confirm_queue: Vec::new(),
            reads_written: VecDeque::new(),
            watch_opt: None,
            reconnects: 0,
        };
        tokio::spawn(session.run(connection));
        Ok((handle, ChatEvents { events: events_rx }))
    }
}

/// One open stream.
struct Connection {
    outbound: mpsc::Sender<ClientFrame>,
    inbound: Streaming<ServerFrame>,
    welcome: Welcome,
    opened_at: Instant,
    /// Holds a clone of `outbound`; aborted when the connection ends or half-closes.
    heartbeat_task_opt: Option<JoinHandle<()>>,
}

async fn connect_once(client: &BluetickClient, config: &ChatConfig) -> ClientResult<Connection> {
    let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_BUFFER);
    let mut chat = client.chat();
    let opened = tokio::time::timeout(
        config.connect_timeout,
        chat.open(ReceiverStream::new(outbound_rx)),
    )
    .await
    .map_err(|_| ClientError::Timeout("opening the chat stream timed out".into()))??;
    let mut inbound = opened.into_inner();
    let first = tokio::time::timeout(config.connect_timeout, inbound.message())
        .await
        .map_err(|_| ClientError::Timeout("no welcome from the server in time".into()))??;
    match first.and_then(|frame| frame.frame) {
        Some(ServerFrameBody::Welcome(welcome)) => Ok(Connection {
            outbound,
            inbound,
            welcome,
            opened_at: Instant::now(),
            heartbeat_task_opt: None,
        }),
        Some(_) => Err(ClientError::Protocol(
            "the server's first frame was not a welcome".into(),
        )),
        None => Err(ClientError::Unavailable(
            "the server ended the stream before its welcome".into(),
        )),
    }
}

/// How far a message seen in this session was acknowledged, to re-acknowledge a redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckState {
    /// Handed to the app, not acknowledged (manual acknowledgements).
    Shown,
    Delivered,
    Read,
}

#[derive(Debug)]
struct PendingSend {
    seq: u64,
    frame: SendMessage,
    /// Answers still expected (a caller may send the same id twice on purpose).
    outstanding: u32,
    /// Released as answers arrive, freeing room for more sends.
    permits: Vec<OwnedSemaphorePermit>,
    unavailable_retries: u32,
}

/// Why a connection ended.
enum ConnectionEnd {
    Closed,
    Broken(ClientError),
}

/// The background task's state.
struct Session {
    client: BluetickClient,
    config: ChatConfig,
    events_tx: mpsc::Sender<ChatEvent>,
    commands_rx: mpsc::Receiver<Command>,
    /// Lets a retry timer post `RetrySend` without keeping the session alive.
    retry_tx: mpsc::WeakSender<Command>,
    connected_tx: watch::Sender<bool>,
    /// Sends not answered yet, by `client_msg_id`; re-sent after every reconnect.
    pending: HashMap<String, PendingSend>,
    /// The order sends were made in, so a reconnect re-sends them in that order.
    pending_order: BTreeMap<u64, String>,
    next_seq: u64,
    dedup: DedupWindow<AckState>,
    receipt_dedup: DedupWindow<()>,
    /// Acknowledgements and confirmations not written yet; they survive a reconnect.
    delivered_queue: Vec<u64>,
    read_queue: Vec<u64>,
    confirm_queue: Vec<u64>,
    /// READ acknowledgements written on the current connection. The server does not confirm
    /// them, and one lost with a breaking stream would leave a read message stored until
    /// its TTL (a delivered message is not redelivered), so they are written again after a
    /// reconnect; acknowledging twice is harmless.
    reads_written: VecDeque<u64>,
    /// Spaces out acknowledgements written again after the server refused them with
    /// UNAVAILABLE (receipts not recorded); reset by a reconnect.
    ack_backoff: Backoff,
    /// The presence watch list, re-sent after every reconnect.
    watch_opt: Option<Vec<String>>,
    backoff: Backoff,
    reconnects: u32,
}

fn frame(body: ClientFrameBody) -> ClientFrame {
    ClientFrame { frame: Some(body) }
}

/// Errors after which reconnecting cannot help. FAILED_PRECONDITION (the gateway's ABORTED)
/// means a newer connection of this same device replaced this one: the newest wins, and
/// reconnecting would only take the stream back and forth.
fn is_fatal(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Unauthenticated(_)
            | ClientError::PermissionDenied(_)
            | ClientError::InvalidArgument(_)
            | ClientError::FailedPrecondition(_)
    )
}

impl Session {
    async fn run(mut self, first: Connection) {
        let mut connection_opt = Some(first);
        loop {
            let Some(connection) = connection_opt.take() else {
                return;
            };
            let opened_at = connection.opened_at;
            match self.drive(connection).await {
                // Every path that closes has already reported it.
                ConnectionEnd::Closed => return,
                ConnectionEnd::Broken(error) => {
                    let _ = self.connected_tx.send(false);
                    if opened_at.elapsed() >= STABLE_CONNECTION {
                        self.backoff.reset();
                    }
                    if is_fatal(&error) || !self.config.reconnect {
                        self.finish(Some(error)).await;
                        return;
                    }
                    debug!(error = %error, "chat stream broke, reconnecting");
                    connection_opt = self.reconnect(error).await;
                }
            }
        }
    }

    /// Waits out the backoff (still taking commands) and connects again; `None` when the
    /// session ended meanwhile.
    async fn reconnect(&mut self, mut error: ClientError) -> Option<Connection> {
        loop {
            let retry_in = self.backoff.next_delay();
            self.emit(ChatEvent::Disconnected { error, retry_in }).await;
            let wake_at = Instant::now() + retry_in;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(wake_at) => break,
                    command_opt = self.commands_rx.recv() => match command_opt {
                        None => {
                            self.finish(None).await;
                            return None;
                        }
                        Some(Command::Close(done)) => {
                            self.finish(None).await;
                            let _ = done.send(());
                            return None;
                        }
                        Some(command) => {
                            if let Err(error) = self.apply_command(command, None).await {
                                debug!(error = %error, "command while disconnected failed");
                            }
                        }
                    },
                }
            }
            match connect_once(&self.client, &self.config).await {
                Ok(connection) => {
                    self.reconnects += 1;
                    return Some(connection);
                }
                Err(connect_error) if is_fatal(&connect_error) => {
                    self.finish(Some(connect_error)).await;
                    return None;
                }
                Err(connect_error) => error = connect_error,
            }
        }
    }

    /// Fails every unanswered send and reports the end of the session.
    async fn finish(&mut self, error_opt: Option<ClientError>) {
        let _ = self.connected_tx.send(false);
        let order = std::mem::take(&mut self.pending_order);
        for client_msg_id in order.into_values() {
            if let Some(pending) = self.pending.remove(&client_msg_id) {
                for _ in 0..pending.outstanding {
                    self.emit(ChatEvent::SendFailed {
                        client_msg_id: client_msg_id.clone(),
                        code: Code::Cancelled,
                        message: "the session closed before the server answered".into(),
                        recipient_device_ids: Vec::new(),
                    })
                    .await;
                }
            }
        }
        self.emit(ChatEvent::Closed { error_opt }).await;
    }

    async fn emit(&self, event: ChatEvent) {
        // A consumer that dropped its receiver no longer wants events; keep running.
        let _ = self.events_tx.send(event).await;
    }

    async fn drive(&mut self, mut connection: Connection) -> ConnectionEnd {
        let heartbeat_interval = self
            .config
            .heartbeat_interval_override_opt
            .unwrap_or_else(|| match connection.welcome.heartbeat_interval_ms {
                0 => DEFAULT_HEARTBEAT_INTERVAL,
                ms => Duration::from_millis(u64::from(ms)),
            });
        connection.heartbeat_task_opt = Some(spawn_heartbeats(
            connection.outbound.clone(),
            heartbeat_interval,
        ));
        let end = self
            .drive_connected(&mut connection, heartbeat_interval)
            .await;
        if let Some(heartbeat_task) = connection.heartbeat_task_opt.take() {
            heartbeat_task.abort();
        }
        end
    }

    async fn drive_connected(
        &mut self,
        connection: &mut Connection,
        heartbeat_interval: Duration,
    ) -> ConnectionEnd {
        let _ = self.connected_tx.send(true);
        let device = connection.welcome.device.clone().unwrap_or_else(|| {
            DeviceAddress::new(
                self.client.credentials().user_id.clone(),
                self.client.credentials().device_id,
            )
        });
        self.emit(ChatEvent::Connected {
            device,
            heartbeat_interval,
            max_payload_bytes: connection.welcome.max_payload_bytes,
            reconnects: self.reconnects,
        })
        .await;
        if let Err(error) = self.on_connected(&connection.outbound).await {
            return ConnectionEnd::Broken(error);
        }
        let mut flush_timer =
            tokio::time::interval(self.config.ack_flush_interval.max(Duration::from_millis(1)));
        flush_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                frame_result = connection.inbound.message() => {
                    if let Err(error) = self.handle_arrived(frame_result, connection).await {
                        return ConnectionEnd::Broken(error);
                    }
                }
                _ = flush_timer.tick() => {
                    if let Err(error) = self.flush_acks(&connection.outbound).await {
                        return ConnectionEnd::Broken(error);
                    }
                }
                command_opt = self.commands_rx.recv() => match command_opt {
                    None => {
                        self.close_gracefully(connection).await;
                        self.finish(None).await;
                        return ConnectionEnd::Closed;
                    }
                    Some(Command::Close(done)) => {
                        self.close_gracefully(connection).await;
                        self.finish(None).await;
                        let _ = done.send(());
                        return ConnectionEnd::Closed;
                    }
                    Some(command) => {
                        if let Err(error) = self.apply_command(command, Some(&connection.outbound)).await {
                            return ConnectionEnd::Broken(error);
                        }
                    }
                },
            }
        }
    }

    /// Handles `first` and every frame that has already arrived behind it (up to one ack
    /// batch), then writes the acknowledgements they produced at once. A quiet stream gets
    /// its receipts out without waiting for the flush timer; a busy one still acknowledges
    /// in batches, as large as what arrived together.
    async fn handle_arrived(
        &mut self,
        first: Result<Option<ServerFrame>, tonic::Status>,
        connection: &mut Connection,
    ) -> ClientResult<()> {
        let mut next = first;
        let mut handled = 0;
        loop {
            match next {
                Ok(Some(frame)) => self.handle_frame(frame, &connection.outbound).await?,
                Ok(None) => {
                    return Err(ClientError::Unavailable(
                        "the server closed the chat stream".into(),
                    ));
                }
                Err(status) => return Err(ClientError::from(status)),
            }
            handled += 1;
            if handled >= self.config.ack_batch_max {
                break;
            }
            // `message()` is cancel-safe: a frame not yet complete stays buffered.
            match connection.inbound.message().now_or_never() {
                Some(result) => next = result,
                None => break,
            }
        }
        self.flush_acks(&connection.outbound).await
    }

    /// Re-sends what a fresh stream needs: unanswered sends in order, the presence watch
    /// list and queued acknowledgements.
    async fn on_connected(&mut self, outbound: &mpsc::Sender<ClientFrame>) -> ClientResult<()> {
        self.ack_backoff.reset();
        let resend: Vec<(SendMessage, u32)> = self
            .pending_order
            .values()
            .filter_map(|id| self.pending.get(id))
            .map(|pending| (pending.frame.clone(), pending.outstanding))
            .collect();
        for (send, outstanding) in resend {
            for _ in 0..outstanding {
                write(outbound, frame(ClientFrameBody::Send(send.clone()))).await?;
            }
        }
        if let Some(user_ids) = self.watch_opt.clone() {
            write(
                outbound,
                frame(ClientFrameBody::WatchPresence(WatchPresence { user_ids })),
            )
            .await?;
        }
        // READs written on the previous connection may have died with it.
        let again: Vec<u64> = self.reads_written.drain(..).collect();
        self.read_queue.splice(0..0, again);
        self.flush_acks(outbound).await
    }

    async fn handle_frame(
        &mut self,
        server_frame: ServerFrame,
        outbound: &mpsc::Sender<ClientFrame>,
    ) -> ClientResult<()> {
        let Some(body) = server_frame.frame else {
            return Ok(());
        };
        match body {
            ServerFrameBody::Welcome(_) => debug!("ignoring a second welcome"),
            ServerFrameBody::Message(message) => {
                let message_id = message.message_id;
                match self.dedup.get(message_id) {
                    Some(AckState::Read) => self.read_queue.push(message_id),
                    Some(AckState::Delivered) => self.delivered_queue.push(message_id),
                    Some(AckState::Shown) => {}
                    None => {
                        let state = if self.config.auto_ack_delivered {
                            AckState::Delivered
                        } else {
                            AckState::Shown
                        };
                        self.dedup.insert(message_id, state);
                        self.emit(ChatEvent::Message(message)).await;
                        if self.config.auto_ack_delivered {
                            self.delivered_queue.push(message_id);
                        }
                    }
                }
                if self.delivered_queue.len() >= self.config.ack_batch_max {
                    self.flush_acks(outbound).await?;
                }
            }
            ServerFrameBody::SendAccepted(accepted) => {
                if self.take_answer(&accepted.client_msg_id) {
                    self.emit(ChatEvent::Sent {
                        client_msg_id: accepted.client_msg_id,
                        message_id: accepted.message_id,
                        sent_at_ms: accepted.sent_at_ms,
                        duplicate: accepted.duplicate,
                    })
                    .await;
                } else {
                    debug!(client_msg_id = %accepted.client_msg_id, "answer for no pending send");
                }
            }
            ServerFrameBody::SendRejected(rejected) => {
                let code = Code::from_i32(rejected.code);
                if code == Code::Unavailable && self.schedule_retry(&rejected.client_msg_id) {
                    return Ok(());
                }
                if self.take_answer(&rejected.client_msg_id) {
                    self.emit(ChatEvent::SendFailed {
                        client_msg_id: rejected.client_msg_id,
                        code,
                        message: rejected.message,
                        recipient_device_ids: rejected.recipient_device_ids,
                    })
                    .await;
                }
            }
            ServerFrameBody::Receipt(receipt) => {
                if self.receipt_dedup.insert(receipt.receipt_id, ()) {
                    let status =
                        TickStatus::try_from(receipt.status).unwrap_or(TickStatus::Unspecified);
                    self.emit(ChatEvent::Receipt {
                        receipt_id: receipt.receipt_id,
                        message_id: receipt.message_id,
                        recipient: receipt.recipient.unwrap_or_default(),
                        status,
                        at_ms: receipt.at_ms,
                    })
                    .await;
                }
                if self.config.auto_confirm_receipts {
                    self.confirm_queue.push(receipt.receipt_id);
                    if self.confirm_queue.len() >= self.config.ack_batch_max {
                        self.flush_acks(outbound).await?;
                    }
                }
            }
            ServerFrameBody::Presence(presence) => self.emit(ChatEvent::Presence(presence)).await,
            ServerFrameBody::Typing(typing) => self.emit(ChatEvent::Typing(typing)).await,
            ServerFrameBody::Error(error)
                if error.code == Code::Unavailable as i32 && !error.message_ids.is_empty() =>
            {
                // Only acknowledgements are refused this way (sends are answered by
                // `client_msg_id`): the receipts were not recorded, write them again.
                debug!(
                    ids = error.message_ids.len(),
                    message = %error.message,
                    "acknowledgements refused, retrying"
                );
                self.schedule_ack_retry(error.message_ids);
            }
            ServerFrameBody::Error(error) => {
                warn!(code = error.code, message = %error.message, "the server refused a frame");
                self.emit(ChatEvent::Error(error)).await;
            }
            ServerFrameBody::BacklogDone(done) => {
                self.flush_acks(outbound).await?;
                self.emit(ChatEvent::BacklogDone {
                    messages: done.messages,
                    receipts: done.receipts,
                })
                .await;
            }
        }
        Ok(())
    }

    /// Counts one answer for `client_msg_id`; returns false when none was expected.
    fn take_answer(&mut self, client_msg_id: &str) -> bool {
        let Some(pending) = self.pending.get_mut(client_msg_id) else {
            return false;
        };
        pending.outstanding = pending.outstanding.saturating_sub(1);
        pending.permits.pop();
        if pending.outstanding == 0 {
            let seq = pending.seq;
            self.pending.remove(client_msg_id);
            self.pending_order.remove(&seq);
        }
        true
    }

    /// Plans another attempt of a send the server could not take now; false when its
    /// retries are used up.
    fn schedule_retry(&mut self, client_msg_id: &str) -> bool {
        let Some(pending) = self.pending.get_mut(client_msg_id) else {
            return false;
        };
        if pending.unavailable_retries >= self.config.unavailable_send_retries {
            return false;
        }
        pending.unavailable_retries += 1;
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut delay = Duration::ZERO;
        for _ in 0..pending.unavailable_retries {
            delay = backoff.next_delay();
        }
        let retry_tx = self.retry_tx.clone();
        let client_msg_id = client_msg_id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(commands) = retry_tx.upgrade() {
                let _ = commands.send(Command::RetrySend(client_msg_id)).await;
            }
        });
        true
    }

    /// Posts `RetryAcks(message_ids)` after the next acknowledgement back-off delay.
    fn schedule_ack_retry(&mut self, message_ids: Vec<u64>) {
        let delay = self.ack_backoff.next_delay();
        let retry_tx = self.retry_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(commands) = retry_tx.upgrade() {
                let _ = commands.send(Command::RetryAcks(message_ids)).await;
            }
        });
    }

    async fn apply_command(
        &mut self,
        command: Command,
        outbound_opt: Option<&mpsc::Sender<ClientFrame>>,
    ) -> ClientResult<()> {
        match command {
            Command::Send {
                frame: send,
                permit,
            } => {
                let client_msg_id = send.client_msg_id.clone();
                match self.pending.get_mut(&client_msg_id) {
                    Some(pending) => {
                        pending.outstanding += 1;
                        pending.permits.push(permit);
                    }
                    None => {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        self.pending_order.insert(seq, client_msg_id.clone());
                        self.pending.insert(
                            client_msg_id,
                            PendingSend {
                                seq,
                                frame: send.clone(),
                                outstanding: 1,
                                permits: vec![permit],
                                unavailable_retries: 0,
                            },
                        );
                    }
                }
                if let Some(outbound) = outbound_opt {
                    write(outbound, frame(ClientFrameBody::Send(send))).await?;
                }
            }
            Command::RetrySend(client_msg_id) => {
                if let (Some(outbound), Some(pending)) =
                    (outbound_opt, self.pending.get(&client_msg_id))
                {
                    write(
                        outbound,
                        frame(ClientFrameBody::Send(pending.frame.clone())),
                    )
                    .await?;
                }
            }
            Command::RetryAcks(message_ids) => {
                // The acknowledged state is the newest one the application gave.
                for message_id in message_ids {
                    match self.dedup.get(message_id) {
                        Some(AckState::Read) => self.read_queue.push(message_id),
                        Some(AckState::Delivered) => self.delivered_queue.push(message_id),
                        Some(AckState::Shown) | None => {}
                    }
                }
                if let Some(outbound) = outbound_opt {
                    self.flush_acks(outbound).await?;
                }
            }
            Command::Ack {
                status,
                message_ids,
            } => {
                for &message_id in &message_ids {
                    let state = if status == TickStatus::Read {
                        AckState::Read
                    } else {
                        AckState::Delivered
                    };
                    match self.dedup.get(message_id) {
                        Some(AckState::Read) => {}
                        Some(_) => {
                            self.dedup.update(message_id, state);
                        }
                        None => {
                            self.dedup.insert(message_id, state);
                        }
                    }
                }
                if status == TickStatus::Read {
                    self.read_queue.extend(message_ids);
                } else {
                    self.delivered_queue.extend(message_ids);
                }
                if let Some(outbound) = outbound_opt {
                    self.flush_acks(outbound).await?;
                }
            }
            Command::ConfirmReceipts(receipt_ids) => {
                self.confirm_queue.extend(receipt_ids);
                if let Some(outbound) = outbound_opt {
                    self.flush_acks(outbound).await?;
                }
            }
            Command::Typing(notice) => {
                if let Some(outbound) = outbound_opt {
                    write(outbound, frame(ClientFrameBody::Typing(notice))).await?;
                }
            }
            Command::WatchPresence(user_ids) => {
                self.watch_opt = Some(user_ids.clone());
                if let Some(outbound) = outbound_opt {
                    write(
                        outbound,
                        frame(ClientFrameBody::WatchPresence(WatchPresence { user_ids })),
                    )
                    .await?;
                }
            }
            Command::Close(done) => {
                // Only reached from paths that handle Close themselves; answer anyway.
                let _ = done.send(());
            }
        }
        Ok(())
    }

    /// Writes queued acknowledgements (DELIVERED before READ) and confirmations in batches.
    /// On failure the unwritten ids stay queued for the next connection.
    async fn flush_acks(&mut self, outbound: &mpsc::Sender<ClientFrame>) -> ClientResult<()> {
        let batch_max = self.config.ack_batch_max.max(1);
        flush_queue(&mut self.delivered_queue, batch_max, outbound, |ids| {
            ClientFrameBody::Ack(Acknowledge {
                status: TickStatus::Delivered as i32,
                message_ids: ids,
            })
        })
        .await?;
        let reads: Vec<u64> = self.read_queue.clone();
        let unwritten = flush_queue(&mut self.read_queue, batch_max, outbound, |ids| {
            ClientFrameBody::Ack(Acknowledge {
                status: TickStatus::Read as i32,
                message_ids: ids,
            })
        })
        .await;
        let written = reads.len() - self.read_queue.len();
        self.reads_written.extend(&reads[..written]);
        while self.reads_written.len() > REMEMBERED_READS {
            self.reads_written.pop_front();
        }
        unwritten?;
        flush_queue(&mut self.confirm_queue, batch_max, outbound, |ids| {
            ClientFrameBody::ConfirmReceipts(ConfirmReceipts { receipt_ids: ids })
        })
        .await
    }

    /// Flushes acknowledgements, waits for unanswered sends (while still handling inbound
    /// frames), then half-closes and lets the server end the stream.
    async fn close_gracefully(&mut self, connection: &mut Connection) {
        let _ = self.flush_acks(&connection.outbound).await;
        let deadline = Instant::now() + self.config.close_timeout;
        while !self.pending.is_empty() {
            match tokio::time::timeout_at(deadline, connection.inbound.message()).await {
                Ok(Ok(Some(frame))) => {
                    if self
                        .handle_frame(frame, &connection.outbound)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                _ => break,
            }
        }
        let _ = self.flush_acks(&connection.outbound).await;
        // Half-close: drop every sender so the request stream ends.
        if let Some(heartbeat_task) = connection.heartbeat_task_opt.take() {
            heartbeat_task.abort();
            let _ = heartbeat_task.await;
        }
        let (closed_tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut connection.outbound, closed_tx));
        let grace_deadline = Instant::now() + HALF_CLOSE_GRACE;
        while let Ok(Ok(Some(_))) =
            tokio::time::timeout_at(grace_deadline, connection.inbound.message()).await
        {
            // Frames after half-close cannot be acknowledged; the server redelivers them.
        }
    }
}

async fn flush_queue(
    queue: &mut Vec<u64>,
    batch_max: usize,
    outbound: &mpsc::Sender<ClientFrame>,
    make: impl Fn(Vec<u64>) -> ClientFrameBody,
) -> ClientResult<()> {
    while !queue.is_empty() {
        let take = queue.len().min(batch_max);
        let batch: Vec<u64> = queue[..take].to_vec();
        write(outbound, frame(make(batch))).await?;
        queue.drain(..take);
    }
    Ok(())
}

async fn write(
    outbound: &mpsc::Sender<ClientFrame>,
    client_frame: ClientFrame,
) -> ClientResult<()> {
    outbound
        .send(client_frame)
        .await
        .map_err(|_| ClientError::Unavailable("the chat stream is closed".into()))
}

fn spawn_heartbeats(outbound: mpsc::Sender<ClientFrame>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if outbound
                .send(frame(ClientFrameBody::Heartbeat(Heartbeat {})))
                .await
                .is_err()
            {
                return;
            }
        }
    })
}
