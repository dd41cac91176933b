//! The gRPC face of messaging.

use std::sync::Arc;

use bluetick_common::channel::{internal_channel, with_deadline};
use bluetick_common::ids::IdGenerator;
use bluetick_common::metrics::{metrics, time_store};
use bluetick_common::now_ms;
use bluetick_common::push::GatewayPusher;
use bluetick_common::trace::{TracedChannel, traced};
use bluetick_proto::ack::v1::RecordSentRequest;
use bluetick_proto::ack::v1::ack_client::AckClient;
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

    /// Returns where `user_id`'s devices are connected; empty (and logged) when presence
    /// cannot say, since the message stays stored for the device's reconnect.
    async fn locate(&self, user_id: &str) -> Vec<Route> {
        match self
            .presence
            .clone()
            .locate(with_deadline(LocateRequest {
                user_ids: vec![user_id.to_string()],
            }))
            .await
        {
            Ok(response) => response.into_inner().routes,
            Err(status) => {
                tracing::warn!(%status, "presence unavailable, message stays stored for reconnect");
                Vec::new()
            }
        }
    }

    /// Tells ack about an accepted message.
    async fn record_sent(&self, request: RecordSentRequest) -> Result<(), Status> {
        self.ack
            .clone()
            .record_sent(with_deadline(request))
            .await
            .map(|_| ())
    }

    /// Pushes each frame to the gateway holding its device, if connected, and returns
    /// receivers that complete when the frames were handed over (or given up).
    fn push(
        &self,
        routes: Vec<Route>,
        frames: &[(u32, ServerFrame)],
    ) -> Vec<tokio::sync::oneshot::Receiver<()>> {
        let mut handed_over = Vec::new();
        for route in routes {
            let Some(device) = route.device else { continue };
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
        let inner = &self.inner;
        let request = request.into_inner();
        let sender = inner.validate(&request)?;
        tracing::Span::current().record("sender", tracing::field::display(&sender));
        let message_id = inner.ids.next_id();
        let sent_at_ms = now_ms();
        let recipient_device_ids: Vec<u32> = request
            .envelopes
            .iter()
            .map(|envelope| envelope.device_id)
            .collect();
        let record = AcceptRecord {
            message_id,
            sender: sender.clone(),
            client_msg_id: request.client_msg_id,
            recipient_user_id: request.recipient_user_id.clone(),
            sent_at_ms,
            expires_at_ms: sent_at_ms + inner.message_ttl_ms,
            envelopes: request
                .envelopes
                .into_iter()
                .map(|envelope| (envelope.device_id, envelope.payload))
                .collect(),
        };
        let envelopes = record.envelopes.clone();
        // ack must know the message before any receipt for it can arrive, that is before it
        // is pushed; it is recorded while the inbox commits, and where the recipient is
        // connected is asked meanwhile, so the single tick waits for the slower of the two
        // writes, not their sum. A failed accept leaves an unknown id recorded with ack,
        // which expires with the message TTL.
        let sent = |message_id, sent_at_ms| RecordSentRequest {
            message_id,
            sender: Some(sender.clone()),
            recipient_user_id: request.recipient_user_id.clone(),
            recipient_device_ids: recipient_device_ids.clone(),
            sent_at_ms,
        };
        let (outcome, mut recorded, routes) = tokio::join!(
            time_store("inbox.accept", inner.inbox.accept(record)),
            inner.record_sent(sent(message_id, sent_at_ms)),
            inner.locate(&request.recipient_user_id)
        );
        let (message_id, sent_at_ms, duplicate) = match outcome? {
            AcceptOutcome::Stored => {
                metrics().messages_accepted.inc();
                (message_id, sent_at_ms, false)
            }
            AcceptOutcome::Duplicate {
                message_id: first_id,
                sent_at_ms: first_sent_at_ms,
            } => {
                metrics().messages_duplicate.inc();
                // Recorded again under the first id: harmless, and repairs a crash between
                // the two writes of the first attempt.
                recorded = inner.record_sent(sent(first_id, first_sent_at_ms)).await;
                (first_id, first_sent_at_ms, true)
            }
        };
        tracing::Span::current().record("message_id", message_id);
        recorded.map_err(|status| {
            tracing::warn!(%status, message_id, "ack unavailable");
            Status::unavailable("ack service unavailable, resend with the same client_msg_id")
        })?;
        // Pushed before answering, so the sender's next message is pushed after this one. A
        // duplicate is pushed again too (devices drop copies by id): the first attempt may
        // have stored it and died before pushing.
        let frames: Vec<(u32, ServerFrame)> = envelopes
            .into_iter()
            .map(|(device_id, payload)| {
                let message = InboundMessage {
                    message_id,
                    sender: Some(sender.clone()),
                    sent_at_ms,
                    payload,
                    recipient_device_id: device_id,
                };
                (device_id, ServerFrame::of(Frame::Message(message)))
            })
            .collect();
        // Answer once the push reached the recipient's gateway (bounded): the sender's
        // next message may go through another messaging replica, and its push must not
        // overtake this one. If the gateway is slow or gone, the message is stored anyway.
        let handed_over = inner.push(routes, &frames);
        let _ =
            tokio::time::timeout(PUSH_HANDOVER_WAIT, futures::future::join_all(handed_over)).await;
        Ok(Response::new(AcceptResponse {
            message_id,
            sent_at_ms,
            duplicate,
        }))
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
