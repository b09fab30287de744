//! The protobuf codec of every `bastide.v1` RPC: prost's, with smaller starting buffers.
//!
//! tonic gives every stream an 8 KiB encode buffer and an 8 KiB decode buffer up front. A
//! bastion holds one session stream per agent for as long as the agent runs, and what
//! crosses it is mostly heartbeats of a few dozen bytes: at 10,000 agents those two buffers
//! alone were 160 MiB. They start at 512 bytes here and grow as a message needs (a log batch,
//! a configuration push), as tonic's own do past their starting size.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Starting size of a stream's encode and decode buffers.
pub const BUFFER_SIZE: usize = 512;
/// Encoded bytes a stream gathers before it yields them to HTTP/2 (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with [`BUFFER_SIZE`] buffers; the generated clients and servers
/// use it (`codec_path` in build.rs).
#[derive(Debug, Clone, Copy)]
pub struct SmallCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codec::{Decoder, Encoder};

    #[test]
    fn both_directions_start_small() {
        let mut c = SmallCodec::<crate::v1::Heartbeat, crate::v1::HeartbeatAck>::default();
        let want = format!("{:?}", settings());
        assert!(
            want.contains(&format!("buffer_size: {BUFFER_SIZE}")),
            "{want}"
        );
        assert_eq!(format!("{:?}", c.encoder().buffer_settings()), want);
        assert_eq!(format!("{:?}", c.decoder().buffer_settings()), want);
    }
}
