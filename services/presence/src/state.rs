//! In-memory presence: routes, online users, watchers and pending last-seen writes.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;
use std::time::Duration;

use bluetick_common::now_ms;
use bluetick_proto::common::v1::{self as pb, DeviceAddress, LastSeenVisibility};
use bluetick_proto::presence::v1::Route;
use bluetick_store::{PresenceStoreRef, Privacy, StoreResult};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One connected device.
#[derive(Clone, Debug)]
struct DeviceRoute {
    gateway_endpoint: String,
    session_id: u64,
    last_beat_ms: u64,
}

/// Someone watching a user's presence.
#[derive(Debug)]
struct Watcher {
    requester: String,
    sender: mpsc::Sender<Result<pb::PresenceState, tonic::Status>>,
}

#[derive(Debug, Default)]
struct Tables {
    /// user → device → route. A user with an entry here is online.
    routes: HashMap<String, HashMap<u32, DeviceRoute>>,
    /// watched user → watchers.
    watchers: HashMap<String, Vec<Watcher>>,
    /// Latest seen time per user not yet written to the store.
    dirty_last_seen: HashMap<String, u64>,
}

/// The presence service's shared state.
#[derive(Debug)]
pub(crate) struct PresenceState {
    store: PresenceStoreRef,
    /// A device silent for longer is offline.
    expiry: Duration,
    tables: Mutex<Tables>,
}

/// A user going online or offline, to be announced to watchers.
struct Transition {
    user_id: String,
    online: bool,
    last_seen_ms: u64,
}

impl PresenceState {
    pub(crate) fn new(store: PresenceStoreRef, expiry: Duration) -> Self {
        Self {
            store,
            expiry,
            tables: Mutex::new(Tables::default()),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub(crate) fn store(&self) -> &PresenceStoreRef {
        &self.store
    }

    /// Records a device as connected at `gateway_endpoint`.
    pub(crate) async fn attach(
        &self,
        device: &DeviceAddress,
        gateway_endpoint: &str,
        session_id: u64,
    ) {
        let now = now_ms();
        let transition = {
            let mut tables = self.tables();
            let devices = tables.routes.entry(device.user_id.clone()).or_default();
            let was_offline = devices.is_empty();
            devices.insert(
                device.device_id,
                DeviceRoute {
                    gateway_endpoint: gateway_endpoint.to_string(),
                    session_id,
                    last_beat_ms: now,
                },
            );
            tables.dirty_last_seen.insert(device.user_id.clone(), now);
            was_offline.then(|| Transition {
                user_id: device.user_id.clone(),
                online: true,
                last_seen_ms: now,
            })
        };
        if let Some(transition) = transition {
            self.announce(transition).await;
        }
    }

    /// Records a device's stream as closed, unless a newer session replaced it.
    /// `last_activity_ms` (when the gateway last heard from the device; 0 if unknown) becomes
    /// the user's last seen.
    pub(crate) async fn detach(
        &self,
        device: &DeviceAddress,
        session_id: u64,
        last_activity_ms: u64,
    ) {
        let now = now_ms();
        let seen = if last_activity_ms == 0 {
            now
        } else {
            last_activity_ms.min(now)
        };
        let transition = {
            let mut tables = self.tables();
            let Some(devices) = tables.routes.get_mut(&device.user_id) else {
                return;
            };
            match devices.get(&device.device_id) {
                Some(route) if route.session_id == session_id => {
                    devices.remove(&device.device_id);
                }
                _ => return,
            }
            let now_offline = devices.is_empty();
            if now_offline {
                tables.routes.remove(&device.user_id);
            }
            let entry = tables
                .dirty_last_seen
                .entry(device.user_id.clone())
                .or_insert(0);
            *entry = (*entry).max(seen);
            now_offline.then(|| Transition {
                user_id: device.user_id.clone(),
                online: false,
                last_seen_ms: seen,
            })
        };
        if let Some(transition) = transition {
            self.announce(transition).await;
        }
    }

    /// Refreshes routes from a gateway's heartbeat batch, re-creating routes this instance
    /// did not know (after a presence restart, or an attach it missed). Returns the
    /// `(device, session id)` whose route it had to set that way: a message located here
    /// before may not have reached the device.
    pub(crate) async fn heartbeats(
        &self,
        gateway_endpoint: &str,
        sessions: Vec<(DeviceAddress, u64, u64)>,
    ) -> Vec<(DeviceAddress, u64)> {
        let now = now_ms();
        let mut transitions = Vec::new();
        let mut repaired = Vec::new();
        {
            let mut tables = self.tables();
            for (device, session_id, last_activity_ms) in sessions {
                let seen = if last_activity_ms == 0 {
                    now
                } else {
                    last_activity_ms.min(now)
                };
                let devices = tables.routes.entry(device.user_id.clone()).or_default();
                let was_offline = devices.is_empty();
                match devices.entry(device.device_id) {
                    Entry::Vacant(vacant) => {
                        // Missed the attach (or restarted since): no route until now.
                        vacant.insert(DeviceRoute {
                            gateway_endpoint: gateway_endpoint.to_string(),
                            session_id,
                            last_beat_ms: seen,
                        });
                        repaired.push((device.clone(), session_id));
                    }
                    Entry::Occupied(mut occupied) => {
                        let route = occupied.get_mut();
                        if route.session_id == session_id {
                            route.last_beat_ms = route.last_beat_ms.max(seen);
                            route.gateway_endpoint = gateway_endpoint.to_string();
                        } else if seen > route.last_beat_ms {
                            // A replica that missed an attach (it was down) still holds the
                            // route of the device's previous stream, maybe on a gateway that
                            // died: the session heard from last is the live one.
                            *route = DeviceRoute {
                                gateway_endpoint: gateway_endpoint.to_string(),
                                session_id,
                                last_beat_ms: seen,
                            };
                            repaired.push((device.clone(), session_id));
                        }
                    }
                }
                let entry = tables
                    .dirty_last_seen
                    .entry(device.user_id.clone())
                    .or_insert(0);
                *entry = (*entry).max(seen);
                if was_offline {
                    transitions.push(Transition {
                        user_id: device.user_id,
                        online: true,
                        last_seen_ms: now,
                    });
                }
            }
        }
        for transition in transitions {
            self.announce(transition).await;
        }
        repaired
    }

    /// Returns the routes of the connected devices of `user_ids`.
    pub(crate) fn locate(&self, user_ids: &[String]) -> Vec<Route> {
        let tables = self.tables();
        let mut routes = Vec::new();
        for user_id in user_ids {
            if let Some(devices) = tables.routes.get(user_id) {
                for (device_id, route) in devices {
                    routes.push(Route {
                        device: Some(DeviceAddress::new(user_id.clone(), *device_id)),
                        gateway_endpoint: route.gateway_endpoint.clone(),
                    });
                }
            }
        }
        routes
    }

    /// Returns `user_id`'s presence as `requester` may see it.
    pub(crate) async fn presence_for(
        &self,
        requester: &str,
        user_id: &str,
    ) -> StoreResult<pb::PresenceState> {
        let privacy = self.store.privacy(user_id).await?;
        if !may_see(requester, user_id, &privacy) {
            return Ok(hidden(user_id));
        }
        let (online, memory_last_seen) = {
            let tables = self.tables();
            let online_beat = tables
                .routes
                .get(user_id)
                .and_then(|devices| devices.values().map(|route| route.last_beat_ms).max());
            let dirty = tables.dirty_last_seen.get(user_id).copied();
            (online_beat.is_some(), online_beat.max(dirty))
        };
        let stored = self.store.last_seen(user_id).await?;
        Ok(pb::PresenceState {
            user_id: user_id.to_string(),
            online,
            last_seen_ms: memory_last_seen.max(stored).unwrap_or(0),
            hidden: false,
        })
    }

    /// Registers a watcher of `user_ids` and returns the current state of each.
    pub(crate) async fn watch(
        &self,
        requester: &str,
        user_ids: &[String],
        sender: mpsc::Sender<Result<pb::PresenceState, tonic::Status>>,
    ) -> StoreResult<Vec<pb::PresenceState>> {
        {
            let mut tables = self.tables();
            for user_id in user_ids {
                tables
                    .watchers
                    .entry(user_id.clone())
                    .or_default()
                    .push(Watcher {
                        requester: requester.to_string(),
                        sender: sender.clone(),
                    });
            }
        }
        let mut current = Vec::with_capacity(user_ids.len());
        for user_id in user_ids {
            current.push(self.presence_for(requester, user_id).await?);
        }
        Ok(current)
    }

    async fn announce(&self, transition: Transition) {
        let watchers: Vec<(String, mpsc::Sender<_>)> = {
            let mut tables = self.tables();
            let Some(watchers) = tables.watchers.get_mut(&transition.user_id) else {
                return;
            };
            watchers.retain(|watcher| !watcher.sender.is_closed());
            watchers
                .iter()
                .map(|watcher| (watcher.requester.clone(), watcher.sender.clone()))
                .collect()
        };
        if watchers.is_empty() {
            return;
        }
        let privacy = match self.store.privacy(&transition.user_id).await {
            Ok(privacy) => privacy,
            Err(error) => {
                tracing::warn!(%error, "cannot read privacy, not announcing presence");
                return;
            }
        };
        for (requester, sender) in watchers {
            let state = if may_see(&requester, &transition.user_id, &privacy) {
                pb::PresenceState {
                    user_id: transition.user_id.clone(),
                    online: transition.online,
                    last_seen_ms: transition.last_seen_ms,
                    hidden: false,
                }
            } else {
                hidden(&transition.user_id)
            };
            // A watcher that cannot keep up misses a change, not the next ones.
            let _ = sender.try_send(Ok(state));
        }
    }

    /// Drops devices that missed their heartbeats; returns the users that went offline.
    async fn sweep(&self) {
        let now = now_ms();
        let expiry_ms = self.expiry.as_millis() as u64;
        let mut transitions = Vec::new();
        {
            let mut tables = self.tables();
            let mut offline_users = Vec::new();
            for (user_id, devices) in tables.routes.iter_mut() {
                let mut latest = 0;
                devices.retain(|_, route| {
                    latest = latest.max(route.last_beat_ms);
                    now.saturating_sub(route.last_beat_ms) <= expiry_ms
                });
                if devices.is_empty() {
                    offline_users.push((user_id.clone(), latest));
                }
            }
            for (user_id, last_beat) in offline_users {
                tables.routes.remove(&user_id);
                let entry = tables.dirty_last_seen.entry(user_id.clone()).or_insert(0);
                *entry = (*entry).max(last_beat);
                transitions.push(Transition {
                    user_id,
                    online: false,
                    last_seen_ms: last_beat,
                });
            }
            for watchers in tables.watchers.values_mut() {
                watchers.retain(|watcher| !watcher.sender.is_closed());
            }
            tables.watchers.retain(|_, watchers| !watchers.is_empty());
        }
        for transition in transitions {
            self.announce(transition).await;
        }
    }

    /// Writes the coalesced last-seen times.
    async fn flush(&self) {
        let dirty: Vec<(String, u64)> = std::mem::take(&mut self.tables().dirty_last_seen)
            .into_iter()
            .collect();
        if dirty.is_empty() {
            return;
        }
        if let Err(error) = self.store.record_last_seen(dirty.clone()).await {
            tracing::warn!(%error, users = dirty.len(), "cannot write last seen, will retry");
            let mut tables = self.tables();
            for (user_id, seen) in dirty {
                let entry = tables.dirty_last_seen.entry(user_id).or_insert(0);
                *entry = (*entry).max(seen);
            }
        }
    }
}

/// Returns whether `requester` may see `user_id`'s presence under `privacy`.
fn may_see(requester: &str, user_id: &str, privacy: &Privacy) -> bool {
    if requester == user_id {
        return true;
    }
    match privacy.visibility {
        LastSeenVisibility::Nobody => false,
        LastSeenVisibility::Contacts => privacy.contacts.iter().any(|contact| contact == requester),
        LastSeenVisibility::Everyone | LastSeenVisibility::Unspecified => true,
    }
}

fn hidden(user_id: &str) -> pb::PresenceState {
    pb::PresenceState {
        user_id: user_id.to_string(),
        online: false,
        last_seen_ms: 0,
        hidden: true,
    }
}

/// Sweeps expired devices every heartbeat interval and flushes last seen every
/// `flush_interval`, until `shutdown`; then flushes once more.
pub(crate) async fn run_background(
    state: std::sync::Arc<PresenceState>,
    heartbeat_interval: Duration,
    flush_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut sweep_tick = tokio::time::interval(heartbeat_interval.max(Duration::from_millis(10)));
    let mut flush_tick = tokio::time::interval(flush_interval.max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sweep_tick.tick() => state.sweep().await,
            _ = flush_tick.tick() => state.flush().await,
        }
    }
    state.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privacy_rules() {
        let contacts = Privacy {
            visibility: LastSeenVisibility::Contacts,
            contacts: vec!["bob".into()],
        };
        assert!(may_see("bob", "alice", &contacts));
        assert!(!may_see("carol", "alice", &contacts));
        assert!(may_see("alice", "alice", &contacts));
        let nobody = Privacy {
            visibility: LastSeenVisibility::Nobody,
            contacts: vec!["bob".into()],
        };
        assert!(!may_see("bob", "alice", &nobody));
        assert!(may_see("carol", "alice", &Privacy::default()));
    }

    /// A heartbeat reports the routes it had to set: a device this replica never saw
    /// attach, and a session newer than the one it knew. A route it knew is no repair.
    #[tokio::test]
    async fn heartbeats_report_the_routes_they_repair() {
        let dir = tempfile::tempdir().unwrap();
        let store = bluetick_store::open_presence_store(&dir.path().to_string_lossy())
            .await
            .unwrap();
        let state = PresenceState::new(store, Duration::from_secs(15));
        let known = DeviceAddress::new("alice".to_string(), 1);
        let missed = DeviceAddress::new("bob".to_string(), 1);
        state.attach(&known, "http://gw-1", 10).await;
        let now = now_ms();

        let repaired = state
            .heartbeats(
                "http://gw-1",
                vec![(known.clone(), 10, now), (missed.clone(), 20, now)],
            )
            .await;
        assert_eq!(
            repaired,
            vec![(missed.clone(), 20)],
            "only the unknown route"
        );
        assert_eq!(
            state.locate(&["bob".to_string()])[0].gateway_endpoint,
            "http://gw-1"
        );

        // Alice reconnected through gw-2 while this replica missed the attach.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let later = now_ms();
        let repaired = state
            .heartbeats("http://gw-2", vec![(known.clone(), 11, later)])
            .await;
        assert_eq!(repaired, vec![(known.clone(), 11)], "the newer session");
        assert_eq!(
            state.locate(&["alice".to_string()])[0].gateway_endpoint,
            "http://gw-2"
        );

        // Once repaired, the same heartbeats are no repairs.
        let repaired = state
            .heartbeats(
                "http://gw-2",
                vec![(known.clone(), 11, later), (missed, 20, later)],
            )
            .await;
        assert!(repaired.is_empty(), "{repaired:?}");
    }
}
