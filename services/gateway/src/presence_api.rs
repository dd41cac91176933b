//! `bluetick.gateway.v1.Presence`: the public presence API, answered by the presence
//! service on behalf of the authenticated caller.

use std::pin::Pin;
use std::sync::Arc;

use bluetick_common::channel::with_deadline;
use bluetick_proto::common::v1::PresenceState;
use bluetick_proto::gateway::v1::presence_server::Presence;
use bluetick_proto::gateway::v1::*;
use bluetick_proto::presence::v1 as internal;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::Gateway;

#[derive(Clone, Debug)]
pub(crate) struct PresenceApi {
    gateway: Arc<Gateway>,
}

impl PresenceApi {
    pub(crate) fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

impl Gateway {
    /// Fails with NOT_FOUND unless `user_id` is a registered user.
    pub(crate) async fn require_user(&self, user_id: &str) -> Result<(), Status> {
        match self.accounts.get_user(user_id).await? {
            Some(_) => Ok(()),
            None => Err(Status::not_found(format!("unknown user {user_id:?}"))),
        }
    }

    /// Opens a presence watch for `requester` over `user_ids`.
    pub(crate) async fn watch_presence(
        &self,
        requester: &str,
        user_ids: Vec<String>,
    ) -> Result<tonic::Streaming<PresenceState>, Status> {
        if user_ids.len() > 1_000 {
            return Err(Status::invalid_argument("at most 1000 users per watch"));
        }
        Ok(self
            .presence
            .clone()
            .watch(internal::WatchRequest {
                requester_user_id: requester.to_string(),
                user_ids,
            })
            .await?
            .into_inner())
    }
}

#[tonic::async_trait]
impl Presence for PresenceApi {
    async fn get_last_seen(
        &self,
        request: Request<GetLastSeenRequest>,
    ) -> Result<Response<GetLastSeenResponse>, Status> {
        let caller = self.gateway.authenticate(request.metadata()).await?;
        let request = request.into_inner();
        self.gateway.require_user(&request.user_id).await?;
        let presence = self
            .gateway
            .presence
            .clone()
            .get_last_seen(with_deadline(internal::GetLastSeenRequest {
                requester_user_id: caller.user_id,
                user_id: request.user_id,
            }))
            .await?
            .into_inner()
            .presence;
        Ok(Response::new(GetLastSeenResponse { presence }))
    }

    type WatchPresenceStream = Pin<Box<dyn Stream<Item = Result<PresenceState, Status>> + Send>>;

    async fn watch_presence(
        &self,
        request: Request<WatchPresenceRequest>,
    ) -> Result<Response<Self::WatchPresenceStream>, Status> {
        let caller = self.gateway.authenticate(request.metadata()).await?;
        let stream = self
            .gateway
            .watch_presence(&caller.user_id, request.into_inner().user_ids)
            .await?;
        let shutdown = self.gateway.shutdown.clone();
        Ok(Response::new(Box::pin(stream.take_until(async move {
            shutdown.cancelled_owned().await
        }))))
    }

    async fn set_privacy(
        &self,
        request: Request<SetPrivacyRequest>,
    ) -> Result<Response<SetPrivacyResponse>, Status> {
        let caller = self.gateway.authenticate(request.metadata()).await?;
        self.gateway
            .presence
            .clone()
            .set_privacy(with_deadline(internal::SetPrivacyRequest {
                user_id: caller.user_id,
                last_seen: request.into_inner().last_seen,
            }))
            .await?;
        Ok(Response::new(SetPrivacyResponse {}))
    }

    async fn set_contacts(
        &self,
        request: Request<SetContactsRequest>,
    ) -> Result<Response<SetContactsResponse>, Status> {
        let caller = self.gateway.authenticate(request.metadata()).await?;
        self.gateway
            .presence
            .clone()
            .set_contacts(with_deadline(internal::SetContactsRequest {
                user_id: caller.user_id,
                contact_user_ids: request.into_inner().user_ids,
            }))
            .await?;
        Ok(Response::new(SetContactsResponse {}))
    }
}
