//! Ordered, batched delivery of frames to gateway instances.
//!
//! messaging, ack and presence push frames to the gateway that holds a device. Each gateway
//! endpoint gets one bounded queue drained by one task, so frames reach a gateway in the
//! order they were pushed, and everything queued meanwhile goes in one `Deliver` call. A
//! push that cannot be made is dropped after a few tries: what matters is stored
//! (messages in the inbox, receipts in the outbox) and reaches the device on reconnect.
//!
//! Each queued frame carries the trace context of the span that pushed it (the message's or
//! receipt's trace). A `Deliver` call carrying several frames runs in one `gateway.push`
//! span whose parent is the first frame's context, with links to the other frames' traces
//! ([`crate::trace::batch_span`]): the first message's trace shows the delivery, the others
//! point at it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluetick_proto::gateway::v1::gateway_internal_client::GatewayInternalClient;
use bluetick_proto::gateway::v1::{DeliverRequest, Delivery};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::channel::{internal_channel, with_deadline};
use crate::metrics::metrics;
use crate::trace::{TracedChannel, batch_span, current_context, traced};

/// Frames queued per gateway before further pushes are dropped.
const QUEUE_CAPACITY: usize = 65_536;
/// Frames per `Deliver` call at most.
const MAX_BATCH: usize = 1_024;
/// A queue idle this long ends its task.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A frame waiting for its gateway, with the trace context it was pushed in and, optionally,
/// who waits until its batch was handed over.
#[derive(Debug)]
struct Queued {
    delivery: Delivery,
    context: opentelemetry::Context,
    done: Option<oneshot::Sender<()>>,
}

/// Pushes frames to gateway instances by endpoint. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct GatewayPusher {
    queues: Arc<Mutex<HashMap<String, mpsc::Sender<Queued>>>>,
}

impl GatewayPusher {
    /// Returns a pusher with no queues yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `delivery` for the gateway at `endpoint`. Returns false if it was dropped
    /// because that gateway's queue is full or the endpoint is invalid. The current span's
    /// trace context travels with it.
    pub fn push(&self, endpoint: &str, delivery: Delivery) -> bool {
        self.enqueue(endpoint, delivery, None)
    }

    /// Queues `delivery` like [`GatewayPusher::push`] and returns a receiver that completes
    /// once the batch holding it was handed to the gateway or given up (the sender is
    /// dropped either way); `None` when it was dropped at once.
    ///
    /// messaging waits on it before answering an accept: with several messaging replicas
    /// the next message of the same sender may be accepted by another replica, whose queue
    /// to the recipient's gateway must not overtake this one.
    pub fn push_and_notify(
        &self,
        endpoint: &str,
        delivery: Delivery,
    ) -> Option<oneshot::Receiver<()>> {
        let (done, handed_over) = oneshot::channel();
        self.enqueue(endpoint, delivery, Some(done))
            .then_some(handed_over)
    }

    fn enqueue(
        &self,
        endpoint: &str,
        delivery: Delivery,
        done: Option<oneshot::Sender<()>>,
    ) -> bool {
        let mut item = Queued {
            delivery,
            context: current_context(),
            done,
        };
        let mut queues = self
            .queues
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for _ in 0..2 {
            let sender = match queues.get(endpoint) {
                Some(sender) => sender.clone(),
                None => match self.start_queue(endpoint) {
                    Some(sender) => {
                        queues.insert(endpoint.to_string(), sender.clone());
                        sender
                    }
                    None => return false,
                },
            };
            match sender.try_send(item) {
                Ok(()) => {
                    metrics().push_queue_depth.inc();
                    return true;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(endpoint, "gateway push queue full, dropping frame");
                    metrics().push_dropped.inc();
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(returned)) => {
                    // The task ended (idle); start a new one.
                    queues.remove(endpoint);
                    item = returned;
                }
            }
        }
        false
    }

    fn start_queue(&self, endpoint: &str) -> Option<mpsc::Sender<Queued>> {
        let channel = match internal_channel(endpoint) {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(endpoint, %error, "invalid gateway endpoint");
                return None;
            }
        };
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(drain_queue(
            endpoint.to_string(),
            GatewayInternalClient::new(traced(channel)),
            receiver,
        ));
        Some(sender)
    }
}

async fn drain_queue(
    endpoint: String,
    mut client: GatewayInternalClient<TracedChannel>,
    mut receiver: mpsc::Receiver<Queued>,
) {
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = match tokio::time::timeout(IDLE_TIMEOUT, receiver.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) | Err(_) => return,
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        metrics().push_queue_depth.dec_by(batch.len() as i64);
        let span = batch_span(
            tracing::info_span!(
                "gateway.push",
                otel.kind = "client",
                frames = batch.len(),
                endpoint = %endpoint,
            ),
            batch.iter().map(|item| &item.context),
        );
        let mut waiters = Vec::new();
        let request = DeliverRequest {
            deliveries: batch
                .drain(..)
                .map(|item| {
                    waiters.extend(item.done);
                    item.delivery
                })
                .collect(),
        };
        deliver_with_retries(&endpoint, &mut client, request)
            .instrument(span)
            .await;
        for waiter in waiters {
            let _ = waiter.send(());
        }
    }
}

/// Sends one batch, retrying a few times with backoff; failures are logged, not returned.
async fn deliver_with_retries(
    endpoint: &str,
    client: &mut GatewayInternalClient<TracedChannel>,
    request: DeliverRequest,
) {
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=4 {
        match client.deliver(with_deadline(request.clone())).await {
            Ok(_) => break,
            Err(status) if attempt < 4 => {
                tracing::debug!(%endpoint, %status, attempt, "gateway push failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(status) => {
                tracing::warn!(
                    %endpoint, %status, frames = request.deliveries.len(),
                    "gateway push failed, frames stay stored for reconnect"
                );
            }
        }
    }
}
