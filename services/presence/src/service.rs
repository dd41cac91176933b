//! The gRPC face of presence: validates requests and calls [`PresenceState`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bluetick_proto::common::v1::LastSeenVisibility;
use bluetick_proto::presence::v1::presence_server::Presence;
use bluetick_proto::presence::v1::*;
use bluetick_proto::required_device;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::state::PresenceState;

/// Users one Watch call may follow.
const MAX_WATCHED_USERS: usize = 1_000;

/// Implements `bluetick.presence.v1.Presence`.
#[derive(Clone, Debug)]
pub struct PresenceService {
    state: Arc<PresenceState>,
    /// The end of the warm-up: until then this replica reports NOT_SERVING, so no message
    /// was located through it, and the routes it learns from heartbeats are not repairs.
    warm_until: Instant,
}

impl PresenceService {
    pub(crate) fn new(state: Arc<PresenceState>, warm_up: Duration) -> Self {
        Self {
            state,
            warm_until: Instant::now() + warm_up,
        }
    }
}

fn required_user(user_id: &str, field: &str) -> Result<(), Status> {
    if user_id.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}

#[tonic::async_trait]
impl Presence for PresenceService {
    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        let request = request.into_inner();
        let device = required_device(request.device, "device")?;
        if request.gateway_endpoint.is_empty() {
            return Err(Status::invalid_argument("gateway_endpoint is required"));
        }
        self.state
            .attach(&device, &request.gateway_endpoint, request.session_id)
            .await;
        Ok(Response::new(AttachResponse {}))
    }

    async fn detach(
        &self,
        request: Request<DetachRequest>,
    ) -> Result<Response<DetachResponse>, Status> {
        let request = request.into_inner();
        let device = required_device(request.device, "device")?;
        self.state
            .detach(&device, request.session_id, request.last_activity_ms)
            .await;
        Ok(Response::new(DetachResponse {}))
    }

    async fn heartbeats(
        &self,
        request: Request<HeartbeatsRequest>,
    ) -> Result<Response<HeartbeatsResponse>, Status> {
        let request = request.into_inner();
        let sessions = request
            .sessions
            .into_iter()
            .filter_map(|session| {
                session
                    .device
                    .map(|device| (device, session.session_id, session.last_activity_ms))
            })
            .collect();
        let mut repaired = self
            .state
            .heartbeats(&request.gateway_endpoint, sessions)
            .await;
        if Instant::now() < self.warm_until {
            repaired.clear();
        }
        let repaired = repaired
            .into_iter()
            .map(|(device, session_id)| SessionRef {
                device: Some(device),
                session_id,
                last_activity_ms: 0,
            })
            .collect();
        Ok(Response::new(HeartbeatsResponse { repaired }))
    }

    async fn locate(
        &self,
        request: Request<LocateRequest>,
    ) -> Result<Response<LocateResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(LocateResponse {
            routes: self.state.locate(&request.user_ids),
        }))
    }

    async fn get_last_seen(
        &self,
        request: Request<GetLastSeenRequest>,
    ) -> Result<Response<GetLastSeenResponse>, Status> {
        let request = request.into_inner();
        required_user(&request.requester_user_id, "requester_user_id")?;
        required_user(&request.user_id, "user_id")?;
        let presence = self
            .state
            .presence_for(&request.requester_user_id, &request.user_id)
            .await?;
        Ok(Response::new(GetLastSeenResponse {
            presence: Some(presence),
        }))
    }

    type WatchStream = ReceiverStream<Result<bluetick_proto::common::v1::PresenceState, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        required_user(&request.requester_user_id, "requester_user_id")?;
        if request.user_ids.len() > MAX_WATCHED_USERS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_WATCHED_USERS} users per watch"
            )));
        }
        let (sender, receiver) = mpsc::channel(request.user_ids.len() + 64);
        let current = self
            .state
            .watch(
                &request.requester_user_id,
                &request.user_ids,
                sender.clone(),
            )
            .await?;
        for state in current {
            // The channel has room for every initial state.
            let _ = sender.try_send(Ok(state));
        }
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn set_privacy(
        &self,
        request: Request<SetPrivacyRequest>,
    ) -> Result<Response<SetPrivacyResponse>, Status> {
        let request = request.into_inner();
        required_user(&request.user_id, "user_id")?;
        let visibility = match LastSeenVisibility::try_from(request.last_seen) {
            Ok(LastSeenVisibility::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(
                    "last_seen must be EVERYONE, CONTACTS or NOBODY",
                ));
            }
            Ok(visibility) => visibility,
        };
        self.state
            .store()
            .set_visibility(&request.user_id, visibility)
            .await?;
        Ok(Response::new(SetPrivacyResponse {}))
    }

    async fn set_contacts(
        &self,
        request: Request<SetContactsRequest>,
    ) -> Result<Response<SetContactsResponse>, Status> {
        let request = request.into_inner();
        required_user(&request.user_id, "user_id")?;
        if request.contact_user_ids.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10000 contacts"));
        }
        self.state
            .store()
            .set_contacts(&request.user_id, request.contact_user_ids)
            .await?;
        Ok(Response::new(SetContactsResponse {}))
    }
}
