//! The gRPC face of messaging.

use std::sync::Arc;

use bluetick_common::channel::{internal_channel, with_deadline};
use bluetick_common::ids::IdGenerator;
use bluetick_common::metrics::{metrics, time_store};
use bluetick_common::now_ms;
use bluetick_common::push::GatewayPusher;
use bluetick_common::trace::{TracedChannel, traced};
use bluetick_proto::ack::v1::ack_client::AckClient;
use bluetick_proto::ack::v1::{RecordSentRequest, SentMessage};
use bluetick_proto::common::v1::{DeviceAddress, InboundMessage, TickStatus};
use bluetick_proto::gateway::v1::{Delivery, ServerFrame, server_frame::Frame};
use bluetick_proto::messaging::v1::messaging_server::Messaging;
use bluetick_proto::messaging::v1::*;
use bluetick_proto::presence::v1::presence_client::PresenceClient;
use bluetick_proto::presence::v1::{LocateRequest, Route};
use bluetick_proto::required_device;
use bluetick_store::{AcceptOutcome, AcceptRecord, InboxStoreRef, StoredMessage};
use tonic::{Request, Response, Status};

use crate::MessagingConfig;

/// Longest an accept waits for its push to reach the recipient's gateway.
const PUSH_HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Most messages per AcceptBatch.
const MAX_ACCEPT_BATCH: usize = 256;
/// Longest client_msg_id accepted.
const MAX_CLIENT_MSG_ID: usize = 64;
/// Largest backlog page.
const MAX_PAGE: usize = 1_000;
/// Most ids per Settle.
const MAX_SETTLE: usize = 10_000;

/// Implements `bluetick.messaging.v1.Messaging`.
#[derive(Clone, Debug)]
pub struct MessagingService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    inbox: InboxStoreRef,
    ack: AckClient<TracedChannel>,
    presence: PresenceClient<TracedChannel>,
    pusher: GatewayPusher,
    ids: IdGenerator,
    message_ttl_ms: u64,
    max_payload_bytes: usize,
}

impl MessagingService {
    /// Returns the service over `inbox`, with clients for the peers in `config`.
    ///
    /// # Errors
    /// When a peer URL is invalid.
    pub fn new(config: &MessagingConfig, inbox: InboxStoreRef) -> anyhow::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                inbox,
                ack: AckClient::new(traced(internal_channel(&config.ack_url)?)),
                presence: PresenceClient::new(traced(internal_channel(&config.presence_url)?)),
                pusher: GatewayPusher::new(),
                ids: IdGenerator::new(config.node_id),
                message_ttl_ms: config.message_ttl.as_millis() as u64,
                max_payload_bytes: config.max_payload_bytes,
            }),
        })
    }
}

fn inbound(message: StoredMessage) -> InboundMessage {
    InboundMessage {
        message_id: message.message_id,
        sender: Some(message.sender),
        sent_at_ms: message.sent_at_ms,
        payload: message.payload,
        recipient_device_id: message.recipient.device_id,
    }
}

impl Inner {
    fn validate(&self, request: &AcceptRequest) -> Result<DeviceAddress, Status> {
        let sender = required_device(request.sender.clone(), "sender")?;
        if request.client_msg_id.is_empty() || request.client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Err(Status::invalid_argument(format!(
                "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} bytes"
            )));
        }
        if request.recipient_user_id.is_empty() {
            return Err(Status::invalid_argument("recipient_user_id is required"));
        }
        if request.envelopes.is_empty() {
            return Err(Status::invalid_argument(
                "at least one envelope is required",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for envelope in &request.envelopes {
            if envelope.device_id == 0 || !seen.insert(envelope.device_id) {
                return Err(Status::invalid_argument(
                    "envelopes need distinct, non-zero device ids",
                ));
            }
            if envelope.payload.len() > self.max_payload_bytes {
                return Err(Status::resource_exhausted(format!(
                    "payload of {} bytes exceeds the {} byte limit",
                    envelope.payload.len(),
                    self.max_payload_bytes
                )));
            }
        }
        Ok(sender)
    }

    /// Returns where the devices of `user_ids` are connected; empty (and logged) when
    /// presence cannot say, since the messages stay stored for the devices' reconnect.
    async fn locate(&self, user_ids: Vec<String>) -> Vec<Route> {
        if user_ids.is_empty() {
            return Vec::new();
        }
        match self
            .presence
            .clone()
            .locate(with_deadline(LocateRequest { user_ids }))
            .await
        {
            Ok(response) => response.into_inner().routes,
            Err(status) => {
                tracing::warn!(%status, "presence unavailable, message stays stored for reconnect");
                Vec::new()
            }
        }
    }

    /// Accepts consecutive messages of one sender (see `AcceptBatch`): ids are assigned in
    /// request order; the inbox stores the batch in one call (which makes the messages
    /// visible in order) while ack records them, so the single ticks wait for one write of
    /// each, not for each message in turn. Then the recipients are located (after the
    /// writes, see below), every message is pushed in order, and the answer waits until the
    /// pushes reached the recipients' gateways (with several messaging replicas the
    /// sender's next batch may go through another one, whose pushes must not overtake
    /// these).
    ///
    /// ack must know a message before any receipt for it can arrive, that is before it is
    /// pushed. A failed inbox write leaves an unknown id recorded with ack, which expires
    /// with the message TTL.
    async fn accept_all(
        &self,
        requests: Vec<AcceptRequest>,
    ) -> Vec<Result<AcceptResponse, Status>> {
        struct Prepared {
            sender: DeviceAddress,
            recipient_user_id: String,
            recipient_device_ids: Vec<u32>,
            message_id: u64,
            sent_at_ms: u64,
        }
        let sent = |prepared: &Prepared, message_id, sent_at_ms| SentMessage {
            message_id,
            sender: Some(prepared.sender.clone()),
            recipient_user_id: prepared.recipient_user_id.clone(),
            recipient_device_ids: prepared.recipient_device_ids.clone(),
            sent_at_ms,
        };
        let mut prepared = Vec::with_capacity(requests.len());
        let mut records = Vec::new();
        for request in requests {
            let sender = match self.validate(&request) {
                Ok(sender) => sender,
                Err(status) => {
                    prepared.push(Err(status));
                    continue;
                }
            };
            let message_id = self.ids.next_id();
            let sent_at_ms = now_ms();
            let recipient_device_ids = request
                .envelopes
                .iter()
                .map(|envelope| envelope.device_id)
                .collect();
            records.push(AcceptRecord {
                message_id,
                sender: sender.clone(),
                client_msg_id: request.client_msg_id,
                recipient_user_id: request.recipient_user_id.clone(),
                sent_at_ms,
                expires_at_ms: sent_at_ms + self.message_ttl_ms,
                envelopes: request
                    .envelopes
                    .into_iter()
                    .map(|envelope| (envelope.device_id, envelope.payload))
                    .collect(),
            });
            prepared.push(Ok(Prepared {
                sender,
                recipient_user_id: request.recipient_user_id,
                recipient_device_ids,
                message_id,
                sent_at_ms,
            }));
        }
        let valid: Vec<&Prepared> = prepared.iter().filter_map(|p| p.as_ref().ok()).collect();
        if let Some(first) = valid.first() {
            tracing::Span::current().record("sender", tracing::field::display(&first.sender));
        }
        let envelopes: Vec<Vec<(u32, bytes::Bytes)>> = records
            .iter()
            .map(|record| record.envelopes.clone())
            .collect();
        let mut recipients: Vec<String> = valid
            .iter()
            .map(|prepared| prepared.recipient_user_id.clone())
            .collect();
        recipients.sort_unstable();
        recipients.dedup();
        let (outcomes, recorded_all) = tokio::join!(
            time_store("inbox.accept_batch", self.inbox.accept_batch(records)),
            self.record_sent(
                valid
                    .iter()
                    .map(|prepared| sent(prepared, prepared.message_id, prepared.sent_at_ms))
                    .collect()
            ),
        );
        // Only now, with the messages stored, ask where the recipients are. A device that
        // reconnects attaches with presence before it reads its backlog: either this lookup
        // sees the new route, or the attach came later and the backlog read finds the
        // messages. A backlog read racing with the writes sees a prefix of the batch (the
        // store's order guarantee), and the rest is pushed to the new route. Looked up concurrently with the writes, a reconnect between the two
        // could miss both, leaving the messages stored but unseen until the next reconnect.
        let routes = self.locate(recipients).await;

        let mut handed_over = Vec::new();
        let mut accepted = Vec::with_capacity(valid.len());
        for ((prepared, outcome), envelopes) in valid.iter().zip(outcomes).zip(envelopes) {
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(error) => {
                    accepted.push(Err(Status::from(error)));
                    continue;
                }
            };
            let (message_id, sent_at_ms, duplicate, recorded) = match outcome {
                AcceptOutcome::Stored => {
                    metrics().messages_accepted.inc();
                    let recorded = recorded_all.clone();
                    (prepared.message_id, prepared.sent_at_ms, false, recorded)
                }
                AcceptOutcome::Duplicate {
                    message_id,
                    sent_at_ms,
                } => {
                    metrics().messages_duplicate.inc();
                    // Recorded again under the first id: harmless, and repairs a crash
                    // between the two writes of the first attempt.
                    let recorded = self
                        .record_sent(vec![sent(prepared, message_id, sent_at_ms)])
                        .await;
                    (message_id, sent_at_ms, true, recorded)
                }
            };
            if let Err(status) = recorded {
                tracing::warn!(%status, message_id, "ack unavailable");
                accepted.push(Err(Status::unavailable(
                    "ack service unavailable, resend with the same client_msg_id",
                )));
                continue;
            }
            // A duplicate is pushed again too (devices drop copies by id): the first attempt
            // may have stored it and died before pushing.
            let frames: Vec<(u32, ServerFrame)> = envelopes
                .into_iter()
                .map(|(device_id, payload)| {
                    let message = InboundMessage {
                        message_id,
                        sender: Some(prepared.sender.clone()),
                        sent_at_ms,
                        payload,
                        recipient_device_id: device_id,
                    };
                    (device_id, ServerFrame::of(Frame::Message(message)))
                })
                .collect();
            handed_over.extend(self.push(&routes, &prepared.recipient_user_id, &frames));
            accepted.push(Ok(AcceptResponse {
                message_id,
                sent_at_ms,
                duplicate,
            }));
        }
        let pushes = handed_over.len();
        if tokio::time::timeout(PUSH_HANDOVER_WAIT, futures::future::join_all(handed_over))
            .await
            .is_err()
        {
            // The answer goes out before the pushes were handed over: a later send of the
            // same sender through another messaging replica may now overtake them.
            tracing::warn!(
                pushes,
                wait_ms = PUSH_HANDOVER_WAIT.as_millis() as u64,
                "pushes not handed over in time, answering anyway"
            );
        }
        let mut accepted = accepted.into_iter();
        prepared
            .into_iter()
            .map(|prepared| match prepared {
                Ok(_) => accepted
                    .next()
                    .unwrap_or_else(|| Err(Status::internal("accept result missing"))),
                Err(status) => Err(status),
            })
            .collect()
    }

    /// Tells ack about accepted messages, all in one call.
    async fn record_sent(&self, messages: Vec<SentMessage>) -> Result<(), Status> {
        if messages.is_empty() {
            return Ok(());
        }
        self.ack
            .clone()
            .record_sent(with_deadline(RecordSentRequest { messages }))
            .await
            .map(|_| ())
    }

    /// Pushes each frame to the gateway holding its device, if connected, and returns
    /// receivers that complete when the frames were handed over (or given up).
    fn push(
        &self,
        routes: &[Route],
        user_id: &str,
        frames: &[(u32, ServerFrame)],
    ) -> Vec<tokio::sync::oneshot::Receiver<()>> {
        let mut handed_over = Vec::new();
        for route in routes {
            let Some(device) = &route.device else {
                continue;
            };
            if device.user_id != user_id {
                continue;
            }
            for (device_id, frame) in frames {
                if *device_id == device.device_id {
                    handed_over.extend(self.pusher.push_and_notify(
                        &route.gateway_endpoint,
                        Delivery {
                            device: Some(device.clone()),
                            frame: Some(frame.clone()),
                        },
                    ));
                }
            }
        }
        handed_over
    }
}

#[tonic::async_trait]
impl Messaging for MessagingService {
    #[tracing::instrument(
        name = "messaging.accept",
        skip_all,
        fields(sender = tracing::field::Empty, message_id = tracing::field::Empty)
    )]
    async fn accept(
        &self,
        request: Request<AcceptRequest>,
    ) -> Result<Response<AcceptResponse>, Status> {
        let mut results = self.inner.accept_all(vec![request.into_inner()]).await;
        match results.pop() {
            Some(result) => {
                if let Ok(accepted) = &result {
                    tracing::Span::current().record("message_id", accepted.message_id);
                }
                result.map(Response::new)
            }
            None => Err(Status::internal("no accept result")),
        }
    }

    #[tracing::instrument(
        name = "messaging.accept_batch",
        skip_all,
        fields(
            sender = tracing::field::Empty,
            messages = tracing::field::Empty,
            first_message_id = tracing::field::Empty
        )
    )]
    async fn accept_batch(
        &self,
        request: Request<AcceptBatchRequest>,
    ) -> Result<Response<AcceptBatchResponse>, Status> {
        let requests = request.into_inner().requests;
        if requests.len() > MAX_ACCEPT_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_ACCEPT_BATCH} messages per batch"
            )));
        }
        tracing::Span::current().record("messages", requests.len());
        let results = self.inner.accept_all(requests).await;
        if let Some(Ok(first)) = results.iter().find(|result| result.is_ok()) {
            tracing::Span::current().record("first_message_id", first.message_id);
        }
        let results = results
            .into_iter()
            .map(|result| AcceptResult {
                result: Some(match result {
                    Ok(accepted) => accept_result::Result::Accepted(accepted),
                    Err(status) => accept_result::Result::Error(AcceptError {
                        code: status.code() as i32,
                        message: status.message().to_string(),
                    }),
                }),
            })
            .collect();
        Ok(Response::new(AcceptBatchResponse { results }))
    }

    async fn fetch_backlog(
        &self,
        request: Request<FetchBacklogRequest>,
    ) -> Result<Response<FetchBacklogResponse>, Status> {
        let request = request.into_inner();
        let device = required_device(request.device, "device")?;
        let limit = (request.limit as usize).clamp(1, MAX_PAGE);
        let mut messages = time_store(
            "inbox.pending",
            self.inner
                .inbox
                .pending(&device, request.after_message_id, limit + 1, now_ms()),
        )
        .await?;
        let more = messages.len() > limit;
        messages.truncate(limit);
        Ok(Response::new(FetchBacklogResponse {
            messages: messages.into_iter().map(inbound).collect(),
            more,
        }))
    }

    async fn settle(
        &self,
        request: Request<SettleRequest>,
    ) -> Result<Response<SettleResponse>, Status> {
        let request = request.into_inner();
        let device = required_device(request.device, "device")?;
        if request.message_ids.len() > MAX_SETTLE {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_SETTLE} ids per call"
            )));
        }
        match TickStatus::try_from(request.status) {
            Ok(TickStatus::Delivered) => {
                time_store(
                    "inbox.mark_delivered",
                    self.inner
                        .inbox
                        .mark_delivered(&device, &request.message_ids),
                )
                .await?
            }
            Ok(TickStatus::Read) => {
                time_store(
                    "inbox.remove",
                    self.inner.inbox.remove(&device, &request.message_ids),
                )
                .await?
            }
            _ => return Err(Status::invalid_argument("status must be DELIVERED or READ")),
        }
        Ok(Response::new(SettleResponse {}))
    }

    async fn relay(
        &self,
        request: Request<RelayRequest>,
    ) -> Result<Response<RelayResponse>, Status> {
        let request = request.into_inner();
        if request.recipient_user_id.is_empty() {
            return Err(Status::invalid_argument("recipient_user_id is required"));
        }
        let frame = request
            .frame
            .ok_or_else(|| Status::invalid_argument("frame is required"))?;
        let routes = self
            .inner
            .presence
            .clone()
            .locate(with_deadline(LocateRequest {
                user_ids: vec![request.recipient_user_id],
            }))
            .await?
            .into_inner()
            .routes;
        for route in routes {
            self.inner.pusher.push(
                &route.gateway_endpoint,
                Delivery {
                    device: route.device,
                    frame: Some(frame.clone()),
                },
            );
        }
        Ok(Response::new(RelayResponse {}))
    }
}
