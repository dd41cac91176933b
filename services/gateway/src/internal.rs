//! `bluetick.gateway.v1.GatewayInternal`: what other services ask of this instance.

use std::sync::Arc;

use bluetick_proto::gateway::v1::gateway_internal_server::GatewayInternal;
use bluetick_proto::gateway::v1::*;
use tonic::{Request, Response, Status};

use crate::Gateway;

#[derive(Clone, Debug)]
pub(crate) struct InternalService {
    gateway: Arc<Gateway>,
}

impl InternalService {
    pub(crate) fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[tonic::async_trait]
impl GatewayInternal for InternalService {
    #[tracing::instrument(
        name = "gateway.deliver",
        skip_all,
        fields(frames = request.get_ref().deliveries.len(), not_connected = tracing::field::Empty)
    )]
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let capacity = self.gateway.config.device_queue_capacity;
        let mut not_connected = Vec::new();
        for (index, delivery) in request.into_inner().deliveries.into_iter().enumerate() {
            let (Some(device), Some(frame)) = (delivery.device, delivery.frame) else {
                return Err(Status::invalid_argument(
                    "every delivery needs a device and a frame",
                ));
            };
            if !self.gateway.sessions.deliver(&device, frame, capacity) {
                not_connected.push(index as u32);
            }
        }
        tracing::Span::current().record("not_connected", not_connected.len());
        Ok(Response::new(DeliverResponse { not_connected }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let device = self
            .gateway
            .authenticate_token(&request.into_inner().token)
            .await?;
        Ok(Response::new(AuthenticateResponse {
            device: Some(device),
        }))
    }
}
