//! `bluetick.gateway.v1.Chat`: one bidirectional stream per device.
//!
//! A session runs three parts:
//! - the reader (this task): takes frames from the device, notes its activity (the
//!   heartbeat reporter ends sessions that stay silent), and hands sends and receipts to
//! - the ops worker: calls messaging and ack one frame at a time, so a device's sends are
//!   accepted in the order it sent them. Each send and acknowledgement starts its own trace
//!   (a root `chat.send` / `chat.ack` span opened when the frame is read, carried with the
//!   queued op and entered by the worker), so one message is one trace, not one session;
//! - the sync task: attaches the device with presence, sends the backlog of messages and
//!   receipts, then switches the session to live delivery.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bluetick_common::channel::with_deadline;
use bluetick_common::now_ms;
use bluetick_proto::ack::v1::{AcknowledgeRequest, ConfirmReceiptsRequest, FetchReceiptsRequest};
use bluetick_proto::common::v1::{DeviceAddress, TickStatus, Typing};
use bluetick_proto::gateway::v1::chat_server::Chat;
use bluetick_proto::gateway::v1::client_frame::Frame as ClientFrameBody;
use bluetick_proto::gateway::v1::server_frame::Frame;
use bluetick_proto::gateway::v1::*;
use bluetick_proto::messaging::v1::{
    AcceptBatchRequest, AcceptRequest, AcceptResponse, Envelope, FetchBacklogRequest, RelayRequest,
    SettleRequest, accept_result,
};
use bluetick_proto::presence::v1::{AttachRequest, DetachRequest, HeartbeatsRequest, SessionRef};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{Instrument, Span};

use crate::Gateway;
use crate::sessions::SessionHandle;

/// Longest client_msg_id accepted.
const MAX_CLIENT_MSG_ID: usize = 64;
/// Most ids in one Acknowledge or ConfirmReceipts frame.
const MAX_IDS_PER_FRAME: usize = 1_000;
/// Most queued sends of one device accepted in one batch. Enough to fold a fast sender's
/// messages into shared commits; small enough that a batch on a CQL engine (a
/// lightweight transaction per message) finishes well within its deadline.
const MAX_SENDS_PER_BATCH: usize = 32;
/// Frames waiting for the ops worker before the reader stops reading.
const OPS_QUEUE: usize = 256;
/// Backlog page size.
const BACKLOG_PAGE: u32 = 256;
/// How long after a batch's first failure for a reason that may pass (a replica died, a
/// store timed out) a session's send lane keeps trying it before it answers UNAVAILABLE,
/// and the first pause between attempts (doubling, at most [`SEND_RETRY_PAUSE_MAX`]).
const SEND_RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);
const SEND_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
const SEND_RETRY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Implements `bluetick.gateway.v1.Chat`.
#[derive(Clone, Debug)]
pub(crate) struct ChatService {
    gateway: Arc<Gateway>,
}

impl ChatService {
    pub(crate) fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<ServerFrame, Status>> + Send>>;

#[tonic::async_trait]
impl Chat for ChatService {
    type OpenStream = FrameStream;

    async fn open(
        &self,
        request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<Self::OpenStream>, Status> {
        let device = self.gateway.authenticate(request.metadata()).await?;
        if self.gateway.shutdown.is_cancelled() {
            return Err(Status::unavailable("gateway is shutting down"));
        }
        let inbound = request.into_inner();
        let (outbound, outbound_rx) = mpsc::channel(self.gateway.config.device_queue_capacity);
        let handle = Arc::new(SessionHandle {
            device,
            session_id: rand::random(),
            outbound,
            cancel: self.gateway.shutdown.child_token(),
            termination: Mutex::new(None),
            last_activity_ms: AtomicU64::new(now_ms()),
        });
        let stream = response_stream(outbound_rx, handle.clone());
        self.gateway.sessions.insert(handle.clone());
        tokio::spawn(run_session(self.gateway.clone(), handle, inbound));
        Ok(Response::new(stream))
    }
}

/// The frames of a session, ending with the session's termination status if it was ended
/// by the server (slow device, missed heartbeats, replaced, shutdown).
///
/// A plain struct rather than a stream combinator over an async block: every connected
/// device holds one, and this one is a few words instead of a kilobyte of future state.
struct SessionFrames {
    receiver: mpsc::Receiver<Box<ServerFrame>>,
    cancelled: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    handle: Arc<SessionHandle>,
    done: bool,
}

fn response_stream(
    receiver: mpsc::Receiver<Box<ServerFrame>>,
    handle: Arc<SessionHandle>,
) -> FrameStream {
    Box::pin(SessionFrames {
        receiver,
        cancelled: Box::pin(handle.cancel.clone().cancelled_owned()),
        handle,
        done: false,
    })
}

impl Stream for SessionFrames {
    type Item = Result<ServerFrame, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future;
        use std::task::Poll;

        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        // The end of the session first: a terminated device gets its status, not more
        // of a queue it was too slow for.
        if this.cancelled.as_mut().poll(cx).is_ready() {
            let mut termination = this
                .handle
                .termination
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            // A session that finished normally (`SessionHandle::finish`) sends what is
            // queued, then ends the stream with OK.
            if termination
                .as_ref()
                .is_some_and(|status| status.code() == Code::Ok)
            {
                if let Ok(frame) = this.receiver.try_recv() {
                    return Poll::Ready(Some(Ok(*frame)));
                }
                this.done = true;
                return Poll::Ready(None);
            }
            this.done = true;
            let status = termination
                .take()
                .unwrap_or_else(|| Status::unavailable("gateway is shutting down, reconnect"));
            return Poll::Ready(Some(Err(status)));
        }
        this.receiver
            .poll_recv(cx)
            .map(|frame| frame.map(|frame| Ok(*frame)))
    }
}

/// Work the reader hands to the ops worker, with the span (trace) it runs in.
enum Op {
    Send(SendMessage, Span),
    Ack(Acknowledge, Span),
    Confirm(ConfirmReceipts),
}

async fn run_session(
    gateway: Arc<Gateway>,
    handle: Arc<SessionHandle>,
    mut inbound: Streaming<ClientFrame>,
) {
    let device = handle.device.clone();
    tracing::debug!(device = %device, "session opened");
    let welcome = ServerFrame::of(Frame::Welcome(Welcome {
        device: Some(device.clone()),
        heartbeat_interval_ms: gateway.config.heartbeat_interval.as_millis() as u32,
        max_payload_bytes: gateway.config.max_payload_bytes as u32,
    }));
    if handle.outbound.send(welcome.into()).await.is_err() {
        gateway.sessions.remove(&device, handle.session_id);
        return;
    }

    let mut ops = OpsLanes::default();
    // Not joined: a finished task's memory is freed only once its JoinHandle is gone, and
    // the session would hold it for as long as the device stays connected. It stops when
    // the session ends, however it ends (`finish` below or `terminate`: both cancel).
    tokio::spawn({
        let (gateway, handle) = (gateway.clone(), handle.clone());
        async move {
            tokio::select! {
                biased;
                _ = handle.cancel.cancelled() => {}
                _ = sync_backlog(gateway, handle.clone()) => {}
            }
        }
    });
    let mut watch: Option<tokio::task::JoinHandle<()>> = None;

    // Missed heartbeats end the session from the heartbeat reporter's sweep.
    loop {
        tokio::select! {
            _ = handle.cancel.cancelled() => break,
            frame = inbound.message() => match frame {
                Ok(Some(frame)) => {
                    handle.touch();
                    if matches!(frame.frame, Some(ClientFrameBody::Heartbeat(_))) {
                        continue;
                    }
                    // Boxed: the session's own future stays small while it waits.
                    if !Box::pin(handle_frame(&gateway, &handle, frame, &mut ops, &mut watch)).await {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(device = %device, %status, "device stream failed");
                    break;
                }
            },
        }
    }

    let workers: Vec<_> = ops.close().collect();
    if let Some(watch) = watch {
        watch.abort();
    }
    // Let queued sends and receipts finish unless the session was cut.
    for worker in workers {
        let _ = worker.await;
    }
    // Then end the response stream after their replies (a device that half-closed, as the
    // SDK's graceful close does, waits for this end).
    handle.finish();
    gateway.sessions.remove(&device, handle.session_id);
    let detach = DetachRequest {
        device: Some(device.clone()),
        session_id: handle.session_id,
        last_activity_ms: handle
            .last_activity_ms
            .load(std::sync::atomic::Ordering::Relaxed),
    };
    if let Err(status) = gateway
        .tell_every_presence(|mut presence| {
            let request = with_deadline(detach.clone());
            async move { presence.detach(request).await.map(|_| ()) }
        })
        .await
    {
        tracing::warn!(device = %device, %status, "presence detach failed; it will expire");
    }
    tracing::debug!(device = %device, "session closed");
}

/// Returns false when the session should end.
async fn handle_frame(
    gateway: &Arc<Gateway>,
    handle: &Arc<SessionHandle>,
    frame: ClientFrame,
    ops: &mut OpsLanes,
    watch: &mut Option<tokio::task::JoinHandle<()>>,
) -> bool {
    let op = match frame.frame {
        Some(ClientFrameBody::Heartbeat(_)) => return true,
        Some(ClientFrameBody::Send(send)) => {
            // A new trace per message; ids only, never the payload.
            let span = tracing::info_span!(
                parent: None,
                "chat.send",
                sender = %handle.device,
                client_msg_id = %send.client_msg_id,
                recipient_user_id = %send.recipient_user_id,
                message_id = tracing::field::Empty,
            );
            Op::Send(send, span)
        }
        Some(ClientFrameBody::Ack(ack)) => {
            let span = tracing::info_span!(
                parent: None,
                "chat.ack",
                recipient = %handle.device,
                status = ack.status,
                messages = ack.message_ids.len(),
                first_message_id = ack.message_ids.first().copied().unwrap_or(0),
            );
            Op::Ack(ack, span)
        }
        Some(ClientFrameBody::ConfirmReceipts(confirm)) => Op::Confirm(confirm),
        Some(ClientFrameBody::Typing(typing)) => {
            relay_typing(gateway.clone(), handle.device.clone(), typing);
            return true;
        }
        Some(ClientFrameBody::WatchPresence(request)) => {
            if let Some(previous) = watch.take() {
                previous.abort();
            }
            if !request.user_ids.is_empty() {
                *watch = Some(tokio::spawn(forward_presence(
                    gateway.clone(),
                    handle.clone(),
                    request.user_ids,
                )));
            }
            return true;
        }
        None => {
            send_frame(
                handle,
                ServerFrame::error(Code::InvalidArgument, "empty or unknown frame", vec![]),
            )
            .await;
            return true;
        }
    };
    let ops = ops.lane_for(&op).sender(gateway, handle);
    tokio::select! {
        _ = handle.cancel.cancelled() => false,
        sent = ops.send(op) => sent.is_ok(),
    }
}

/// A queue from a session's reader to an ops worker, started with the first op: most
/// connected devices sit idle, and an idle device then holds neither the worker task nor
/// its queue.
#[derive(Default)]
struct OpsLane {
    started_opt: Option<(mpsc::Sender<Op>, tokio::task::JoinHandle<()>)>,
}

impl OpsLane {
    fn sender(&mut self, gateway: &Arc<Gateway>, handle: &Arc<SessionHandle>) -> &mpsc::Sender<Op> {
        let (sender, _) = self.started_opt.get_or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(OPS_QUEUE);
            let worker = tokio::spawn(run_ops(gateway.clone(), handle.clone(), receiver));
            (sender, worker)
        });
        sender
    }

    /// Closes the queue; returns the worker, which finishes what was queued.
    fn close(self) -> Option<tokio::task::JoinHandle<()>> {
        self.started_opt.map(|(_, worker)| worker)
    }
}

/// A session's two ops lanes. Sends keep their order in one lane; receipts (acks and
/// confirmations) keep theirs in the other. The two are independent, so a device that
/// sends and receives at once does not hold its next send behind the store writes of an
/// acknowledgement, or the other way round.
#[derive(Default)]
struct OpsLanes {
    sends: OpsLane,
    receipts: OpsLane,
}

impl OpsLanes {
    fn lane_for(&mut self, op: &Op) -> &mut OpsLane {
        match op {
            Op::Send(..) => &mut self.sends,
            Op::Ack(..) | Op::Confirm(_) => &mut self.receipts,
        }
    }

    /// Closes both queues; returns the workers, which finish what was queued.
    fn close(self) -> impl Iterator<Item = tokio::task::JoinHandle<()>> {
        self.sends.close().into_iter().chain(self.receipts.close())
    }
}

/// An acknowledgement carries up to 1,000 ids and an accept batch up to 32 messages, each a
/// write on the store; on a CQL engine under load that can outlast the 5 s internal
/// deadline, and a timed-out batch is sent again whole, which only adds load. Such batches
/// get more time.
fn with_batch_deadline<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(std::time::Duration::from_secs(60));
    request
}

/// Sends a frame to the device, waiting for room; gives up when the session ends.
async fn send_frame(handle: &SessionHandle, frame: ServerFrame) {
    tokio::select! {
        _ = handle.cancel.cancelled() => {}
        _ = handle.outbound.send(frame.into()) => {}
    }
}

async fn run_ops(gateway: Arc<Gateway>, handle: Arc<SessionHandle>, mut ops: mpsc::Receiver<Op>) {
    let mut held: Option<Op> = None;
    loop {
        let op = match held.take() {
            Some(op) => op,
            None => tokio::select! {
                _ = handle.cancel.cancelled() => return,
                op = ops.recv() => match op { Some(op) => op, None => return },
            },
        };
        let replies = match op {
            Op::Send(send, span) => {
                // The sends queued behind this one go with it: one batch, in order.
                let mut sends = vec![(send, span)];
                held = absorb_queued(&mut ops, |op| match op {
                    Op::Send(send, span) if sends.len() < MAX_SENDS_PER_BATCH => {
                        sends.push((send, span));
                        Ok(())
                    }
                    other => Err(other),
                });
                handle_sends(&gateway, &handle, sends).await
            }
            Op::Ack(mut ack, span) => {
                // Acknowledgements of the same status queued behind this one go with it:
                // one pair of store writes instead of one per frame.
                held = absorb_queued(&mut ops, |op| match op {
                    Op::Ack(next, _)
                        if next.status == ack.status
                            && !ack.message_ids.is_empty()
                            && !next.message_ids.is_empty()
                            && ack.message_ids.len() + next.message_ids.len()
                                <= MAX_IDS_PER_FRAME =>
                    {
                        ack.message_ids.extend(next.message_ids);
                        Ok(())
                    }
                    other => Err(other),
                });
                handle_ack(&gateway, &handle.device, ack)
                    .instrument(span)
                    .await
            }
            Op::Confirm(mut confirm) => {
                held = absorb_queued(&mut ops, |op| match op {
                    Op::Confirm(next)
                        if !confirm.receipt_ids.is_empty()
                            && !next.receipt_ids.is_empty()
                            && confirm.receipt_ids.len() + next.receipt_ids.len()
                                <= MAX_IDS_PER_FRAME =>
                    {
                        confirm.receipt_ids.extend(next.receipt_ids);
                        Ok(())
                    }
                    other => Err(other),
                });
                handle_confirm(&gateway, &handle.device, confirm).await
            }
        };
        for reply in replies {
            send_frame(&handle, reply).await;
        }
    }
}

/// Takes the ops already queued behind the current one for as long as `absorb` folds them
/// into it; returns the first it refuses, which is handled next.
fn absorb_queued(
    ops: &mut mpsc::Receiver<Op>,
    mut absorb: impl FnMut(Op) -> Result<(), Op>,
) -> Option<Op> {
    while let Ok(op) = ops.try_recv() {
        if let Err(refused) = absorb(op) {
            return Some(refused);
        }
    }
    None
}

fn rejected(client_msg_id: String, status: Status) -> ServerFrame {
    ServerFrame::of(Frame::SendRejected(SendRejected {
        client_msg_id,
        code: status.code() as i32,
        message: status.message().to_string(),
        recipient_device_ids: vec![],
    }))
}

/// Has messaging accept a device's consecutive sends in one batch; returns one reply per
/// send, in order.
async fn handle_sends(
    gateway: &Gateway,
    handle: &SessionHandle,
    sends: Vec<(SendMessage, Span)>,
) -> Vec<ServerFrame> {
    let sender = &handle.device;
    let mut replies: Vec<Option<ServerFrame>> = Vec::with_capacity(sends.len());
    let mut requests = Vec::new();
    let mut waiting = Vec::new();
    for (send, span) in sends {
        match prepare_send(gateway, sender, send)
            .instrument(span.clone())
            .await
        {
            Ok(request) => {
                waiting.push((replies.len(), request.client_msg_id.clone(), span.clone()));
                requests.push(request);
                replies.push(None);
            }
            Err(reply) => replies.push(Some(reply)),
        }
    }
    if !requests.is_empty() {
        // The batch runs in the first message's trace.
        let span = waiting
            .first()
            .map(|(_, _, span)| span.clone())
            .unwrap_or_else(Span::none);
        let results = accept_in_order(gateway, handle, requests)
            .instrument(span)
            .await;
        for ((index, client_msg_id, span), result) in waiting.into_iter().zip(results) {
            replies[index] = Some(accept_reply(client_msg_id, result, &span));
        }
    }
    replies.into_iter().flatten().collect()
}

/// Has messaging accept `requests` (one sender's consecutive sends); returns one result per
/// request, in order.
///
/// Requests that failed but were not refused (see [`refuses_the_message`]) are sent again,
/// with the same `client_msg_id`s (a request stored before the failure is answered as a
/// duplicate with its first id), for up to [`SEND_RETRY_WINDOW`] after the first failure. The
/// session's later sends wait in its lane meanwhile: answering UNAVAILABLE at once would let
/// them be accepted first, ahead of the device's own resend, and a sender's messages would
/// arrive out of the order typed. Retrying stops when the session ends.
async fn accept_in_order(
    gateway: &Gateway,
    handle: &SessionHandle,
    requests: Vec<AcceptRequest>,
) -> Vec<Result<AcceptResponse, Status>> {
    let mut results: Vec<Result<AcceptResponse, Status>> =
        vec![Err(Status::internal("accept result missing")); requests.len()];
    let mut todo: Vec<usize> = (0..requests.len()).collect();
    // Counted from the first failure: an attempt may itself take long to fail (a store
    // timing out).
    let mut give_up_at_opt = None;
    let mut pause = SEND_RETRY_PAUSE;
    loop {
        let batch: Vec<AcceptRequest> = todo.iter().map(|&index| requests[index].clone()).collect();
        let answers: Vec<Result<AcceptResponse, Status>> = match gateway
            .messaging
            .clone()
            .accept_batch(with_batch_deadline(AcceptBatchRequest { requests: batch }))
            .await
        {
            Ok(response) => response
                .into_inner()
                .results
                .into_iter()
                .map(|result| match result.result {
                    Some(accept_result::Result::Accepted(accepted)) => Ok(accepted),
                    Some(accept_result::Result::Error(error)) => {
                        Err(Status::new(Code::from_i32(error.code), error.message))
                    }
                    None => Err(Status::internal("empty accept result")),
                })
                .collect(),
            Err(status) => vec![Err(status); todo.len()],
        };
        let mut failed = Vec::new();
        let mut answers = answers.into_iter();
        for index in todo {
            let answer = answers
                .next()
                .unwrap_or_else(|| Err(Status::internal("accept result missing")));
            if let Err(status) = &answer
                && !refuses_the_message(status.code())
            {
                failed.push(index);
            }
            results[index] = answer;
        }
        let now = tokio::time::Instant::now();
        let give_up_at = *give_up_at_opt.get_or_insert(now + SEND_RETRY_WINDOW);
        if failed.is_empty() || now + pause > give_up_at {
            return results;
        }
        tracing::debug!(
            failed = failed.len(),
            pause_ms = pause.as_millis() as u64,
            "accept failed, trying again"
        );
        // Nobody is left to answer once the session ends: the device resends on its next
        // connection.
        tokio::select! {
            _ = handle.cancel.cancelled() => return results,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(SEND_RETRY_PAUSE_MAX);
        todo = failed;
    }
}

/// Whether messaging refused the message itself (bad input, too large, unknown recipient):
/// the device gets that code. Any other failure may pass: the gateway tries again, and if it
/// still fails the device is told UNAVAILABLE, to resend.
fn refuses_the_message(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::ResourceExhausted | Code::NotFound
    )
}

/// The reply to one send from messaging's answer.
fn accept_reply(
    client_msg_id: String,
    result: Result<AcceptResponse, Status>,
    span: &Span,
) -> ServerFrame {
    match result {
        Ok(response) => {
            span.record("message_id", response.message_id);
            ServerFrame::of(Frame::SendAccepted(SendAccepted {
                client_msg_id,
                message_id: response.message_id,
                sent_at_ms: response.sent_at_ms,
                duplicate: response.duplicate,
            }))
        }
        Err(status) => {
            let status = match status.code() {
                code if refuses_the_message(code) => status,
                _ => {
                    tracing::warn!(parent: span, %status, "messaging accept failed");
                    Status::unavailable("message not stored, resend with the same client_msg_id")
                }
            };
            rejected(client_msg_id, status)
        }
    }
}

/// Checks a send and resolves the recipient's devices: the request for messaging, or the
/// reply refusing it.
async fn prepare_send(
    gateway: &Gateway,
    sender: &DeviceAddress,
    send: SendMessage,
) -> Result<AcceptRequest, ServerFrame> {
    let client_msg_id = send.client_msg_id;
    if client_msg_id.is_empty() || client_msg_id.len() > MAX_CLIENT_MSG_ID {
        return Err(rejected(
            client_msg_id,
            Status::invalid_argument(format!(
                "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} bytes"
            )),
        ));
    }
    if send.recipient_user_id.is_empty() {
        return Err(rejected(
            client_msg_id,
            Status::invalid_argument("recipient_user_id is required"),
        ));
    }
    if send.payloads.is_empty() {
        return Err(rejected(
            client_msg_id,
            Status::invalid_argument("a payload is required"),
        ));
    }
    let limit = gateway.config.max_payload_bytes;
    if let Some(oversize) = send
        .payloads
        .iter()
        .find(|payload| payload.payload.len() > limit)
    {
        return Err(rejected(
            client_msg_id,
            Status::resource_exhausted(format!(
                "payload of {} bytes exceeds the {limit} byte limit",
                oversize.payload.len()
            )),
        ));
    }
    let recipient = match bluetick_common::metrics::time_store(
        "accounts.get_user",
        gateway.accounts.get_user(&send.recipient_user_id),
    )
    .await
    {
        Ok(Some(user)) => user,
        Ok(None) => {
            return Err(rejected(
                client_msg_id,
                Status::not_found("unknown recipient"),
            ));
        }
        Err(error) => return Err(rejected(client_msg_id, error.into())),
    };
    let envelopes: Vec<Envelope> = if send.payloads.len() == 1 && send.payloads[0].device_id == 0 {
        let payload = send.payloads[0].payload.clone();
        recipient
            .device_ids
            .iter()
            .map(|device_id| Envelope {
                device_id: *device_id,
                payload: payload.clone(),
            })
            .collect()
    } else {
        let addressed: HashSet<u32> = send
            .payloads
            .iter()
            .map(|payload| payload.device_id)
            .collect();
        let current: HashSet<u32> = recipient.device_ids.iter().copied().collect();
        if addressed != current || addressed.len() != send.payloads.len() {
            return Err(ServerFrame::of(Frame::SendRejected(SendRejected {
                client_msg_id,
                code: Code::FailedPrecondition as i32,
                message: "payloads must address each of the recipient's devices once".into(),
                recipient_device_ids: recipient.device_ids,
            })));
        }
        send.payloads
            .into_iter()
            .map(|payload| Envelope {
                device_id: payload.device_id,
                payload: payload.payload,
            })
            .collect()
    };
    Ok(AcceptRequest {
        sender: Some(sender.clone()),
        client_msg_id,
        recipient_user_id: send.recipient_user_id,
        envelopes,
    })
}

/// Records receipts with ack, then settles the inbox with messaging.
async fn handle_ack(
    gateway: &Gateway,
    device: &DeviceAddress,
    ack: Acknowledge,
) -> Vec<ServerFrame> {
    let status = match TickStatus::try_from(ack.status) {
        Ok(status) if status.is_receipt() => status,
        _ => {
            return vec![ServerFrame::error(
                Code::InvalidArgument,
                "ack status must be DELIVERED or READ",
                ack.message_ids,
            )];
        }
    };
    if ack.message_ids.is_empty() || ack.message_ids.len() > MAX_IDS_PER_FRAME {
        return vec![ServerFrame::error(
            Code::InvalidArgument,
            format!("an ack carries 1 to {MAX_IDS_PER_FRAME} message ids"),
            vec![],
        )];
    }
    let response = match gateway
        .ack
        .clone()
        .acknowledge(with_batch_deadline(AcknowledgeRequest {
            recipient: Some(device.clone()),
            status: status as i32,
            message_ids: ack.message_ids.clone(),
        }))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tracing::warn!(%status, "ack unavailable");
            return vec![ServerFrame::error(
                Code::Unavailable,
                "receipts not recorded, send them again",
                ack.message_ids,
            )];
        }
    };
    let mut replies = Vec::new();
    let mut not_found = Vec::new();
    let mut denied = Vec::new();
    for rejection in response.rejected {
        if rejection.code == Code::PermissionDenied as i32 {
            denied.push(rejection.message_id);
        } else {
            not_found.push(rejection.message_id);
        }
    }
    if !denied.is_empty() {
        replies.push(ServerFrame::error(
            Code::PermissionDenied,
            "these messages were not sent to this device",
            denied,
        ));
    }
    if !not_found.is_empty() {
        replies.push(ServerFrame::error(
            Code::NotFound,
            "unknown messages",
            not_found,
        ));
    }
    if !response.accepted.is_empty()
        && let Err(status) = gateway
            .messaging
            .clone()
            .settle(with_batch_deadline(SettleRequest {
                device: Some(device.clone()),
                status: status as i32,
                message_ids: response.accepted,
            }))
            .await
    {
        // The ticks are recorded; the inbox may redeliver, and clients drop copies.
        tracing::warn!(%status, "settling inbox failed");
    }
    replies
}

async fn handle_confirm(
    gateway: &Gateway,
    device: &DeviceAddress,
    confirm: ConfirmReceipts,
) -> Vec<ServerFrame> {
    if confirm.receipt_ids.is_empty() || confirm.receipt_ids.len() > MAX_IDS_PER_FRAME {
        return vec![ServerFrame::error(
            Code::InvalidArgument,
            format!("a confirmation carries 1 to {MAX_IDS_PER_FRAME} receipt ids"),
            vec![],
        )];
    }
    match gateway
        .ack
        .clone()
        .confirm_receipts(with_deadline(ConfirmReceiptsRequest {
            device: Some(device.clone()),
            receipt_ids: confirm.receipt_ids,
        }))
        .await
    {
        Ok(_) => vec![],
        Err(status) => {
            tracing::warn!(%status, "confirming receipts failed");
            vec![]
        }
    }
}

/// Attaches the device with presence, sends its backlog and stored receipts, then goes live.
async fn sync_backlog(gateway: Arc<Gateway>, handle: Arc<SessionHandle>) {
    // Held until the device is live; released if the session ends first (this future is
    // dropped). Never closed, so an error cannot happen.
    let Ok(_sync_permit) = gateway.syncs.acquire().await else {
        return;
    };
    let device = handle.device.clone();
    let attach = AttachRequest {
        device: Some(device.clone()),
        gateway_endpoint: gateway.internal_url.clone(),
        session_id: handle.session_id,
    };
    if let Err(status) = gateway
        .tell_every_presence(|mut presence| {
            let request = with_deadline(attach.clone());
            async move { presence.attach(request).await.map(|_| ()) }
        })
        .await
    {
        tracing::warn!(device = %device, %status, "presence attach failed");
        handle.terminate(Status::unavailable("presence unavailable, reconnect"));
        return;
    }
    let sent_in_backlog = match send_backlog(&gateway, &handle).await {
        Ok(Some(sent)) => sent,
        Ok(None) => return,
        Err(status) => {
            tracing::warn!(device = %device, %status, "backlog unavailable");
            handle.terminate(Status::unavailable("backlog unavailable, reconnect"));
            return;
        }
    };
    let mut receipts_sent = 0u32;
    let mut after_receipt = 0;
    loop {
        let page = match gateway
            .ack
            .clone()
            .fetch_receipts(with_deadline(FetchReceiptsRequest {
                device: Some(device.clone()),
                after_receipt_id: after_receipt,
                limit: BACKLOG_PAGE,
            }))
            .await
        {
            Ok(page) => page.into_inner(),
            Err(status) => {
                tracing::warn!(device = %device, %status, "stored receipts unavailable");
                handle.terminate(Status::unavailable("receipts unavailable, reconnect"));
                return;
            }
        };
        for receipt in page.receipts {
            after_receipt = after_receipt.max(receipt.receipt_id);
            receipts_sent += 1;
            if handle
                .outbound
                .send(ServerFrame::of(Frame::Receipt(receipt)).into())
                .await
                .is_err()
            {
                return;
            }
        }
        if !page.more {
            break;
        }
    }
    let done = ServerFrame::of(Frame::BacklogDone(BacklogDone {
        messages: sent_in_backlog.len() as u32,
        receipts: receipts_sent,
    }));
    if handle.outbound.send(done.into()).await.is_err() {
        return;
    }
    gateway.sessions.go_live(&handle, &sent_in_backlog).await;
}

/// Sessions whose backlog one heartbeat report's repairs send again at once.
const RESYNC_CONCURRENCY: usize = 16;

/// Sends the device's stored messages, oldest first, and returns their ids; `Ok(None)` when
/// the session's stream closed meanwhile.
async fn send_backlog(
    gateway: &Gateway,
    handle: &SessionHandle,
) -> Result<Option<HashSet<u64>>, Status> {
    let mut sent = HashSet::new();
    let mut after = 0;
    loop {
        let page = gateway
            .messaging
            .clone()
            .fetch_backlog(with_deadline(FetchBacklogRequest {
                device: Some(handle.device.clone()),
                after_message_id: after,
                limit: BACKLOG_PAGE,
            }))
            .await?
            .into_inner();
        for message in page.messages {
            after = after.max(message.message_id);
            sent.insert(message.message_id);
            if handle
                .outbound
                .send(ServerFrame::of(Frame::Message(message)).into())
                .await
                .is_err()
            {
                return Ok(None);
            }
        }
        if !page.more {
            return Ok(Some(sent));
        }
    }
}

/// Sends these live sessions their stored messages again, because a presence replica
/// reported that it had no route (or a stale one) for them: a message located through
/// that replica may have been stored without reaching this gateway. Devices drop the
/// copies they already have by id; a session that ended or was replaced is skipped.
///
/// One task for the whole report, [`RESYNC_CONCURRENCY`] sessions at a time (and within
/// the gateway's sync limit): after a lone presence instance restarts, its first report
/// names every connected device.
fn resync(gateway: &Arc<Gateway>, sessions: HashSet<(DeviceAddress, u64)>) {
    if sessions.is_empty() {
        return;
    }
    let gateway = gateway.clone();
    tokio::spawn(async move {
        futures::stream::iter(sessions)
            .for_each_concurrent(RESYNC_CONCURRENCY, |(device, session_id)| {
                let gateway = gateway.clone();
                async move {
                    let Some(handle) = gateway.sessions.current(&device, session_id) else {
                        return;
                    };
                    let Ok(_sync_permit) = gateway.syncs.acquire().await else {
                        return;
                    };
                    tokio::select! {
                        biased;
                        _ = handle.cancel.cancelled() => {}
                        result = send_backlog(&gateway, &handle) => match result {
                            Ok(Some(sent)) => tracing::debug!(
                                device = %device,
                                messages = sent.len(),
                                "backlog sent again after a presence route repair"
                            ),
                            Ok(None) => {}
                            Err(status) => tracing::warn!(
                                device = %device,
                                %status,
                                "backlog unavailable after a presence route repair; it waits for the next connect"
                            ),
                        },
                    }
                }
            })
            .await;
    });
}

fn relay_typing(gateway: Arc<Gateway>, sender: DeviceAddress, typing: TypingNotice) {
    if typing.recipient_user_id.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let frame = ServerFrame::of(Frame::Typing(Typing {
            sender: Some(sender),
            active: typing.active,
        }));
        if let Err(status) = gateway
            .messaging
            .clone()
            .relay(with_deadline(RelayRequest {
                recipient_user_id: typing.recipient_user_id,
                frame: Some(frame),
            }))
            .await
        {
            tracing::debug!(%status, "typing relay failed");
        }
    });
}

/// Forwards presence changes of `user_ids` to the device until aborted. When the presence
/// replica serving the watch goes away, the watch is opened again on another one (which
/// restates the current presence first).
async fn forward_presence(
    gateway: Arc<Gateway>,
    handle: Arc<SessionHandle>,
    user_ids: Vec<String>,
) {
    let mut stream = match gateway
        .watch_presence(&handle.device.user_id, user_ids.clone())
        .await
    {
        Ok(stream) => stream,
        Err(status) => {
            send_frame(
                &handle,
                ServerFrame::error(status.code(), status.message().to_string(), vec![]),
            )
            .await;
            return;
        }
    };
    loop {
        let state = tokio::select! {
            _ = handle.cancel.cancelled() => return,
            state = stream.message() => state,
        };
        match state {
            Ok(Some(state)) => send_frame(&handle, ServerFrame::of(Frame::Presence(state))).await,
            Ok(None) | Err(_) => {
                tracing::debug!("presence watch ended, opening it again");
                loop {
                    tokio::select! {
                        _ = handle.cancel.cancelled() => return,
                        _ = tokio::time::sleep(WATCH_REOPEN_DELAY) => {}
                    }
                    match gateway
                        .watch_presence(&handle.device.user_id, user_ids.clone())
                        .await
                    {
                        Ok(reopened) => {
                            stream = reopened;
                            break;
                        }
                        Err(status) => tracing::debug!(%status, "presence watch not reopened yet"),
                    }
                }
            }
        }
    }
}

/// Pause before a broken presence watch is opened again.
const WATCH_REOPEN_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Every heartbeat interval: ends the sessions silent for `missed_beats` intervals, and
/// reports those that showed activity to presence, so presence keeps their routes and last
/// seen fresh.
pub(crate) async fn report_heartbeats(gateway: Arc<Gateway>) {
    let interval = gateway.config.heartbeat_interval;
    let deadline_ms = (interval * gateway.config.missed_beats).as_millis() as u64;
    let mut tick = tokio::time::interval(interval);
    let mut last_report_ms = 0;
    loop {
        tokio::select! {
            _ = gateway.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let silent_before_ms = now.saturating_sub(deadline_ms);
        let sessions: Vec<SessionRef> = gateway
            .sessions
            .sweep(silent_before_ms)
            .into_iter()
            .filter(|(_, _, last_activity)| *last_activity >= last_report_ms)
            .map(|(device, session_id, last_activity_ms)| SessionRef {
                device: Some(device),
                session_id,
                last_activity_ms,
            })
            .collect();
        last_report_ms = now;
        if sessions.is_empty() {
            continue;
        }
        for chunk in sessions.chunks(10_000) {
            let report = HeartbeatsRequest {
                gateway_endpoint: gateway.internal_url.clone(),
                sessions: chunk.to_vec(),
            };
            match gateway
                .tell_every_presence(|mut presence| {
                    let request = with_deadline(report.clone());
                    async move {
                        presence
                            .heartbeats(request)
                            .await
                            .map(|response| response.into_inner().repaired)
                    }
                })
                .await
            {
                Ok(answers) => {
                    // Two replicas may report the same session.
                    let repaired: HashSet<(DeviceAddress, u64)> = answers
                        .into_iter()
                        .flatten()
                        .filter_map(|session| Some((session.device?, session.session_id)))
                        .collect();
                    resync(&gateway, repaired);
                }
                Err(status) => tracing::warn!(%status, "heartbeat report failed"),
            }
        }
        tracing::trace!(connected = gateway.sessions.len(), "heartbeats reported");
    }
}
