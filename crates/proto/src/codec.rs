//! The protobuf codec of every service but media.
//!
//! tonic allocates a codec buffer of `buffer_size` per direction for every call and every
//! stream up front, 8 KiB by default: 16 KiB held by each connected device's chat stream
//! for as long as it stays connected, and allocated and freed by every internal call. Chat
//! frames and internal requests are a few hundred bytes, so these buffers start at 256
//! bytes; a larger message grows its buffer as needed (decoding reserves exactly the frame).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial codec buffer per direction.
const BUFFER_SIZE: usize = 256;
/// tonic's default: how much a streaming response batches into one write at most.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with 256-byte initial buffers.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
