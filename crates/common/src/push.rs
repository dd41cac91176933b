//! Ordered, batched delivery of frames to gateway instances.
//!
//! messaging, ack and presence push frames to the gateway that holds a device. Each gateway
//! endpoint gets one bounded queue drained by one task, so frames reach a gateway in the
//! order they were pushed, and everything queued meanwhile goes in one `Deliver` call. A
//! push that cannot be made is dropped after a few tries: what matters is stored
//! (messages in the inbox, receipts in the outbox) and reaches the device on reconnect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluetick_proto::gateway::v1::gateway_internal_client::GatewayInternalClient;
use bluetick_proto::gateway::v1::{DeliverRequest, Delivery};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use crate::channel::{lazy_channel, with_deadline};

/// Frames queued per gateway before further pushes are dropped.
const QUEUE_CAPACITY: usize = 65_536;
/// Frames per `Deliver` call at most.
const MAX_BATCH: usize = 1_024;
/// A queue idle this long ends its task.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A queued frame and, optionally, who waits until its batch was handed over.
type Queued = (Delivery, Option<oneshot::Sender<()>>);

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
    /// because that gateway's queue is full or the endpoint is invalid.
    pub fn push(&self, endpoint: &str, delivery: Delivery) -> bool {
        self.enqueue(endpoint, (delivery, None))
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
        self.enqueue(endpoint, (delivery, Some(done)))
            .then_some(handed_over)
    }

    fn enqueue(&self, endpoint: &str, delivery: Queued) -> bool {
        let mut queues = self
            .queues
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut delivery = delivery;
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
            match sender.try_send(delivery) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(endpoint, "gateway push queue full, dropping frame");
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(returned)) => {
                    // The task ended (idle); start a new one.
                    queues.remove(endpoint);
                    delivery = returned;
                }
            }
        }
        false
    }

    fn start_queue(&self, endpoint: &str) -> Option<mpsc::Sender<Queued>> {
        let channel = match lazy_channel(endpoint) {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(endpoint, %error, "invalid gateway endpoint");
                return None;
            }
        };
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(drain_queue(
            endpoint.to_string(),
            GatewayInternalClient::new(channel),
            receiver,
        ));
        Some(sender)
    }
}

async fn drain_queue(
    endpoint: String,
    mut client: GatewayInternalClient<Channel>,
    mut receiver: mpsc::Receiver<Queued>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = match tokio::time::timeout(IDLE_TIMEOUT, receiver.recv()).await {
            Ok(Some(delivery)) => delivery,
            Ok(None) | Err(_) => return,
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(delivery) => batch.push(delivery),
                Err(_) => break,
            }
        }
        let (deliveries, waiters): (Vec<Delivery>, Vec<Option<oneshot::Sender<()>>>) =
            std::mem::take(&mut batch).into_iter().unzip();
        let request = DeliverRequest { deliveries };
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
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.send(());
        }
    }
}
