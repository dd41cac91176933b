//! The table of devices connected to this gateway instance.
//!
//! Each connected device has a bounded outbound queue. Frames pushed by other services
//! ([`Sessions::deliver`]) are queued without waiting: a device whose queue is full is too
//! slow and is disconnected, so memory never grows with a slow reader. While a new session
//! is still sending its backlog, pushed frames wait in a (bounded) buffer and are sent after
//! it, which keeps a sender's messages in order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bluetick_common::metrics::metrics;
use bluetick_common::now_ms;
use bluetick_proto::common::v1::DeviceAddress;
use bluetick_proto::gateway::v1::{ServerFrame, server_frame::Frame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// What one connected device's session shares with the table.
#[derive(Debug)]
pub(crate) struct SessionHandle {
    pub(crate) device: DeviceAddress,
    pub(crate) session_id: u64,
    /// Frames to the device. Bounded: full means the device is too slow. Boxed, so the
    /// queue's first block (32 slots, allocated with the channel) costs 256 bytes per
    /// connected device instead of 32 frames' worth.
    pub(crate) outbound: mpsc::Sender<Box<ServerFrame>>,
    /// Ends the session; the response stream then ends with `termination`.
    pub(crate) cancel: CancellationToken,
    /// Why the session was ended, sent as the stream's final status.
    pub(crate) termination: Mutex<Option<Status>>,
    /// Last frame received from the device, ms since the epoch.
    pub(crate) last_activity_ms: AtomicU64,
}

impl SessionHandle {
    /// Ends the session with `status`, unless it is already ending.
    pub(crate) fn terminate(&self, status: Status) {
        let mut termination = self
            .termination
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if termination.is_none() && !self.cancel.is_cancelled() {
            *termination = Some(status);
        }
        drop(termination);
        self.cancel.cancel();
    }

    /// Ends the response stream normally once the frames queued for the device are sent:
    /// the device closed its side (or its side failed) and nothing more will be queued by
    /// the session. Frames pushed meanwhile by other services are redelivered later.
    pub(crate) fn finish(&self) {
        self.terminate(Status::ok("session closed"));
    }

    pub(crate) fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
    }
}

enum Mode {
    /// The backlog is still being sent; pushed frames wait here.
    Syncing(Vec<ServerFrame>),
    Live,
}

struct Entry {
    handle: Arc<SessionHandle>,
    mode: Mode,
}

/// Connected devices by address.
#[derive(Default)]
pub(crate) struct Sessions {
    entries: Mutex<HashMap<DeviceAddress, Entry>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("connected", &self.lock().len())
            .finish()
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceAddress, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Registers a new session in syncing mode, ending any older session of the device.
    pub(crate) fn insert(&self, handle: Arc<SessionHandle>) {
        let previous = self.lock().insert(
            handle.device.clone(),
            Entry {
                handle,
                mode: Mode::Syncing(Vec::new()),
            },
        );
        match previous {
            None => {
                metrics().connected_devices.inc();
            }
            Some(previous) => previous.handle.terminate(Status::aborted(
                "replaced by a newer connection of this device",
            )),
        }
    }

    /// Removes the session if it is still the device's current one.
    pub(crate) fn remove(&self, device: &DeviceAddress, session_id: u64) {
        let mut entries = self.lock();
        if entries
            .get(device)
            .is_some_and(|entry| entry.handle.session_id == session_id)
        {
            entries.remove(device);
            metrics().connected_devices.dec();
        }
    }

    /// Returns the device's session if it is still `session_id`.
    pub(crate) fn current(
        &self,
        device: &DeviceAddress,
        session_id: u64,
    ) -> Option<Arc<SessionHandle>> {
        self.lock()
            .get(device)
            .filter(|entry| entry.handle.session_id == session_id)
            .map(|entry| entry.handle.clone())
    }

    /// Queues a frame for a connected device. Returns false if the device is not connected
    /// here. A device whose queue is full is disconnected.
    pub(crate) fn deliver(
        &self,
        device: &DeviceAddress,
        frame: ServerFrame,
        capacity: usize,
    ) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(device) else {
            return false;
        };
        match &mut entry.mode {
            Mode::Syncing(buffer) => {
                if buffer.len() >= capacity {
                    entry.handle.terminate(Status::resource_exhausted(
                        "device too slow: outbound queue full",
                    ));
                } else {
                    buffer.push(frame);
                }
            }
            Mode::Live => match entry.handle.outbound.try_send(frame.into()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(device = %device, "device too slow, disconnecting");
                    entry.handle.terminate(Status::resource_exhausted(
                        "device too slow: outbound queue full",
                    ));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            },
        }
        true
    }

    /// Ends syncing: sends the frames pushed meanwhile (skipping messages the backlog
    /// already carried), then switches the session to live delivery.
    ///
    /// Returns false if the session ended first.
    pub(crate) async fn go_live(
        &self,
        handle: &SessionHandle,
        sent_in_backlog: &HashSet<u64>,
    ) -> bool {
        loop {
            let buffered = {
                let mut entries = self.lock();
                let Some(entry) = entries.get_mut(&handle.device) else {
                    return false;
                };
                if entry.handle.session_id != handle.session_id {
                    return false;
                }
                match &mut entry.mode {
                    Mode::Syncing(buffer) if buffer.is_empty() => {
                        entry.mode = Mode::Live;
                        return true;
                    }
                    Mode::Syncing(buffer) => std::mem::take(buffer),
                    Mode::Live => return true,
                }
            };
            for frame in buffered {
                if let Some(Frame::Message(message)) = &frame.frame
                    && sent_in_backlog.contains(&message.message_id)
                {
                    continue;
                }
                if handle.outbound.send(frame.into()).await.is_err() {
                    return false;
                }
            }
        }
    }

    /// Ends every session silent since before `silent_before_ms` (missed heartbeats) and
    /// returns `(device, session id, last activity)` of the others. One sweep over the table
    /// per heartbeat interval replaces a timer per session: an idle device costs no wake-ups
    /// of its own.
    pub(crate) fn sweep(&self, silent_before_ms: u64) -> Vec<(DeviceAddress, u64, u64)> {
        self.lock()
            .values()
            .filter_map(|entry| {
                let handle = &entry.handle;
                let last_activity_ms = handle.last_activity_ms.load(Ordering::Relaxed);
                if last_activity_ms < silent_before_ms {
                    handle.terminate(Status::deadline_exceeded("missed heartbeats"));
                    return None;
                }
                Some((handle.device.clone(), handle.session_id, last_activity_ms))
            })
            .collect()
    }

    /// Returns how many devices are connected.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}
