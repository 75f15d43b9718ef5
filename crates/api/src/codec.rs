//! The protobuf codec of every Rollcall gRPC service: prost, with smaller buffers than tonic's.
//!
//! tonic allocates `buffer_size` bytes up front for each direction of each call and grows a
//! buffer in steps of that size. Its default (8 KiB) suits unary calls; an `Attach` stream lives
//! as long as its agent and carries messages of a few hundred bytes, so a coordinator holding
//! 10,000 streams would keep 160 MB of mostly empty buffers. 1 KiB holds any heartbeat, command
//! or result; a larger message grows its buffer as it needs.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size and growth step of the encode and decode buffers of one call.
pub const BUFFER_SIZE: usize = 1024;
/// Up to this many bytes of ready messages go out in one batch (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with [`BUFFER_SIZE`] buffers; named by the generated code.
#[derive(Debug, Clone, Copy)]
pub struct ProstCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        ProstCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for ProstCodec<T, U>
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
