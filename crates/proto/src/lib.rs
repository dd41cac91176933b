//! bluetick's gRPC contracts, generated from `proto/` at build time, plus the few helpers
//! every service shares: the descriptor set for reflection, id formatting and the mapping
//! between gRPC codes and frame error codes.
//!
//! Public contracts (clients): [`gateway::v1`] (accounts, keys, chat, presence) and
//! [`media::v1`]. Internal contracts (service to service): [`gateway::v1::gateway_internal_client`],
//! [`messaging::v1`], [`ack::v1`], [`presence::v1`].

#![allow(missing_debug_implementations)]

use std::fmt;

pub mod codec;

/// Generated code for `bluetick.common.v1`.
pub mod common {
    pub mod v1 {
        #![allow(clippy::all, unreachable_pub)]
        tonic::include_proto!("bluetick.common.v1");
    }
}

/// Generated code for `bluetick.gateway.v1`: the public API and the gateway's internal one.
pub mod gateway {
    pub mod v1 {
        #![allow(clippy::all, unreachable_pub)]
        tonic::include_proto!("bluetick.gateway.v1");
    }
}

/// Generated code for `bluetick.messaging.v1` (internal).
pub mod messaging {
    pub mod v1 {
        #![allow(clippy::all, unreachable_pub)]
        tonic::include_proto!("bluetick.messaging.v1");
    }
}

/// Generated code for `bluetick.ack.v1` (internal).
pub mod ack {
    pub mod v1 {
        #![allow(clippy::all, unreachable_pub)]
        tonic::include_proto!("bluetick.ack.v1");
    }
}

/// Generated code for `bluetick.presence.v1` (internal).
pub mod presence {
    pub mod v1 {
        #![allow(clippy::all, unreachable_pub)]
        tonic::include_proto!("bluetick.presence.v1");
    }
}

/// Generated code for `bluetick.media.v1` (public).
pub mod media {
    pub mod v1 {
        #![allow(clippy::all, unreachable_pub)]
        tonic::include_proto!("bluetick.media.v1");
    }
}

/// The encoded `FileDescriptorSet` of every bluetick proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bluetick_descriptor.bin"));

use common::v1::{DeviceAddress, TickStatus};
use gateway::v1::{ServerFrame, server_frame::Frame};

impl DeviceAddress {
    /// Returns the address of `user_id`'s device number `device_id`.
    pub fn new(user_id: impl Into<String>, device_id: u32) -> Self {
        Self {
            user_id: user_id.into(),
            device_id,
        }
    }
}

/// Returns the device in a request field, or INVALID_ARGUMENT naming `field` when it is
/// missing, has no user or has device number 0.
///
/// # Errors
/// INVALID_ARGUMENT as above.
pub fn required_device(
    device: Option<DeviceAddress>,
    field: &str,
) -> Result<DeviceAddress, tonic::Status> {
    match device {
        Some(device) if !device.user_id.is_empty() && device.device_id > 0 => Ok(device),
        _ => Err(tonic::Status::invalid_argument(format!(
            "{field} is required"
        ))),
    }
}

impl fmt::Display for DeviceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.user_id, self.device_id)
    }
}

impl TickStatus {
    /// Returns true for the states a recipient device may report (DELIVERED, READ).
    pub fn is_receipt(self) -> bool {
        matches!(self, TickStatus::Delivered | TickStatus::Read)
    }
}

impl ServerFrame {
    /// Wraps a frame body.
    pub fn of(frame: Frame) -> Self {
        Self { frame: Some(frame) }
    }

    /// Returns an error frame with a gRPC code.
    pub fn error(code: tonic::Code, message: impl Into<String>, message_ids: Vec<u64>) -> Self {
        Self::of(Frame::Error(gateway::v1::FrameError {
            code: code as i32,
            message: message.into(),
            message_ids,
        }))
    }
}
