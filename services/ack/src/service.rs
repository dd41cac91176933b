//! The gRPC face of ack.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bluetick_common::channel::{internal_channel, with_deadline};
use bluetick_common::ids::IdGenerator;
use bluetick_common::metrics::{metrics, time_store};
use bluetick_common::now_ms;
use bluetick_common::push::GatewayPusher;
use bluetick_common::trace::{TracedChannel, traced};
use bluetick_proto::ack::v1::ack_server::Ack;
use bluetick_proto::ack::v1::*;
use bluetick_proto::common::v1::{DeviceAddress, Receipt, TickStatus};
use bluetick_proto::gateway::v1::{Delivery, ServerFrame, server_frame::Frame};
use bluetick_proto::presence::v1::LocateRequest;
use bluetick_proto::presence::v1::presence_client::PresenceClient;
use bluetick_proto::required_device;
use bluetick_store::{AckOutcome, SentRecord, StoredReceipt, TickStoreRef};
use tonic::{Code, Request, Response, Status};

use crate::AckConfig;

/// Most message ids per call.
const MAX_IDS: usize = 1_000;
/// Largest receipt page.
const MAX_PAGE: usize = 1_000;
/// Tick records live as long as the messages they describe, plus a day for late receipts.
const RECORD_TTL: Duration = Duration::from_secs(31 * 24 * 3600);

/// Implements `bluetick.ack.v1.Ack`.
#[derive(Clone, Debug)]
pub struct AckService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ticks: TickStoreRef,
    presence: PresenceClient<TracedChannel>,
    pusher: GatewayPusher,
    ids: IdGenerator,
}

impl AckService {
    /// Returns the service over `ticks`.
    ///
    /// # Errors
    /// When the presence URL is invalid.
    pub fn new(config: &AckConfig, ticks: TickStoreRef) -> anyhow::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                ticks,
                presence: PresenceClient::new(traced(internal_channel(&config.presence_url)?)),
                pusher: GatewayPusher::new(),
                ids: IdGenerator::new(config.node_id),
            }),
        })
    }
}

fn check_ids(ids: &[u64]) -> Result<(), Status> {
    if ids.is_empty() || ids.len() > MAX_IDS {
        return Err(Status::invalid_argument(format!(
            "between 1 and {MAX_IDS} ids per call"
        )));
    }
    Ok(())
}

/// Counts a tick that moved forward and records how long after acceptance it came.
fn record_tick(receipt: &StoredReceipt) {
    let accepted_at_ms = IdGenerator::timestamp_ms(receipt.message_id);
    let seconds = receipt.at_ms.saturating_sub(accepted_at_ms) as f64 / 1_000.0;
    let tick = match receipt.status {
        TickStatus::Delivered => {
            metrics().messages_delivered.inc();
            "delivered"
        }
        TickStatus::Read => {
            metrics().messages_read.inc();
            "read"
        }
        _ => return,
    };
    metrics()
        .tick_latency
        .get_or_create(&[("tick", tick)])
        .observe(seconds);
}

fn receipt_frame(receipt: &StoredReceipt) -> ServerFrame {
    ServerFrame::of(Frame::Receipt(to_proto(receipt)))
}

fn to_proto(receipt: &StoredReceipt) -> Receipt {
    Receipt {
        receipt_id: receipt.receipt_id,
        message_id: receipt.message_id,
        recipient: Some(receipt.recipient.clone()),
        status: receipt.status as i32,
        at_ms: receipt.at_ms,
    }
}

impl Inner {
    /// Pushes receipts to their senders' connected devices, in order per sender.
    async fn route(&self, receipts: Vec<StoredReceipt>) {
        let users: Vec<String> = receipts
            .iter()
            .map(|receipt| receipt.sender.user_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let routes = match self
            .presence
            .clone()
            .locate(with_deadline(LocateRequest { user_ids: users }))
            .await
        {
            Ok(response) => response.into_inner().routes,
            Err(status) => {
                tracing::warn!(%status, "presence unavailable, receipts stay stored");
                return;
            }
        };
        let endpoints: HashMap<DeviceAddress, String> = routes
            .into_iter()
            .filter_map(|route| route.device.map(|device| (device, route.gateway_endpoint)))
            .collect();
        for receipt in receipts {
            if let Some(endpoint) = endpoints.get(&receipt.sender) {
                self.pusher.push(
                    endpoint,
                    Delivery {
                        device: Some(receipt.sender.clone()),
                        frame: Some(receipt_frame(&receipt)),
                    },
                );
            }
        }
    }
}

#[tonic::async_trait]
impl Ack for AckService {
    async fn record_sent(
        &self,
        request: Request<RecordSentRequest>,
    ) -> Result<Response<RecordSentResponse>, Status> {
        let messages = request.into_inner().messages;
        if messages.is_empty() || messages.len() > MAX_IDS {
            return Err(Status::invalid_argument(format!(
                "between 1 and {MAX_IDS} messages per call"
            )));
        }
        let mut records = Vec::with_capacity(messages.len());
        for (index, message) in messages.into_iter().enumerate() {
            let sender = required_device(message.sender, "sender").map_err(|status| {
                Status::invalid_argument(format!("messages[{index}]: {}", status.message()))
            })?;
            if message.message_id == 0 || message.recipient_device_ids.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "messages[{index}]: message_id and recipient_device_ids are required"
                )));
            }
            records.push(SentRecord {
                message_id: message.message_id,
                sender,
                recipient_user_id: message.recipient_user_id,
                recipient_device_ids: message.recipient_device_ids,
                sent_at_ms: message.sent_at_ms,
                expires_at_ms: message.sent_at_ms + RECORD_TTL.as_millis() as u64,
            });
        }
        // Concurrently: the embedded store writes them all in one group commit, CQL in
        // parallel statements.
        futures::future::try_join_all(
            records.into_iter().map(|record| {
                time_store("ticks.record_sent", self.inner.ticks.record_sent(record))
            }),
        )
        .await?;
        Ok(Response::new(RecordSentResponse {}))
    }

    #[tracing::instrument(
        name = "ack.acknowledge",
        skip_all,
        fields(recipient = tracing::field::Empty, status = tracing::field::Empty, messages = tracing::field::Empty)
    )]
    async fn acknowledge(
        &self,
        request: Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        let request = request.into_inner();
        let recipient = required_device(request.recipient, "recipient")?;
        check_ids(&request.message_ids)?;
        let status = match TickStatus::try_from(request.status) {
            Ok(status) if status.is_receipt() => status,
            _ => return Err(Status::invalid_argument("status must be DELIVERED or READ")),
        };
        let span = tracing::Span::current();
        span.record("recipient", tracing::field::display(&recipient));
        span.record("status", status.as_str_name());
        span.record("messages", request.message_ids.len());
        let acks = request
            .message_ids
            .iter()
            .map(|message_id| (*message_id, self.inner.ids.next_id()))
            .collect();
        let outcomes = time_store(
            "ticks.acknowledge",
            self.inner
                .ticks
                .acknowledge(&recipient, status, acks, now_ms()),
        )
        .await?;
        let mut response = AcknowledgeResponse::default();
        let mut advanced = Vec::new();
        for (message_id, outcome) in request.message_ids.iter().zip(outcomes) {
            match outcome {
                AckOutcome::Advanced(receipt) => {
                    record_tick(&receipt);
                    response.accepted.push(*message_id);
                    advanced.push(receipt);
                }
                AckOutcome::Unchanged => response.accepted.push(*message_id),
                AckOutcome::NotFound => response.rejected.push(AckRejection {
                    message_id: *message_id,
                    code: Code::NotFound as i32,
                }),
                AckOutcome::NotRecipient => response.rejected.push(AckRejection {
                    message_id: *message_id,
                    code: Code::PermissionDenied as i32,
                }),
            }
        }
        // The receipts go to their senders while the ticks are made durable; the answer
        // waits for both. The caller settles the inbox only after this answer, so a crash
        // before the flush loses ticks whose messages are still pending: they are delivered
        // again, acknowledged again, and their receipts sent again.
        let route = async {
            if !advanced.is_empty() {
                self.inner.route(advanced).await;
            }
        };
        let ((), flushed) =
            tokio::join!(route, time_store("ticks.flush", self.inner.ticks.flush()));
        flushed?;
        Ok(Response::new(response))
    }

    async fn fetch_receipts(
        &self,
        request: Request<FetchReceiptsRequest>,
    ) -> Result<Response<FetchReceiptsResponse>, Status> {
        let request = request.into_inner();
        let device = required_device(request.device, "device")?;
        let limit = (request.limit as usize).clamp(1, MAX_PAGE);
        let mut receipts = time_store(
            "ticks.pending_receipts",
            self.inner
                .ticks
                .pending_receipts(&device, request.after_receipt_id, limit + 1),
        )
        .await?;
        let more = receipts.len() > limit;
        receipts.truncate(limit);
        Ok(Response::new(FetchReceiptsResponse {
            receipts: receipts.iter().map(to_proto).collect(),
            more,
        }))
    }

    async fn confirm_receipts(
        &self,
        request: Request<ConfirmReceiptsRequest>,
    ) -> Result<Response<ConfirmReceiptsResponse>, Status> {
        let request = request.into_inner();
        let device = required_device(request.device, "device")?;
        check_ids(&request.receipt_ids)?;
        time_store(
            "ticks.confirm_receipts",
            self.inner
                .ticks
                .confirm_receipts(&device, &request.receipt_ids),
        )
        .await?;
        Ok(Response::new(ConfirmReceiptsResponse {}))
    }

    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let request = request.into_inner();
        let sender = required_device(request.sender, "sender")?;
        check_ids(&request.message_ids)?;
        let ticks = self
            .inner
            .ticks
            .status(&sender, &request.message_ids)
            .await?
            .into_iter()
            .map(|(message_id, recipient_device_id, status)| DeviceTick {
                message_id,
                recipient_device_id,
                status: status as i32,
            })
            .collect();
        Ok(Response::new(GetStatusResponse { ticks }))
    }
}
