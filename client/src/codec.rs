//! The protobuf codec of every waft gRPC service: prost's encoding, with a malformed message
//! reported as `INVALID_ARGUMENT` (the sender's fault) rather than `INTERNAL` (ours).

use prost::Message;
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};

/// Encodes `T`, decodes `U`.
#[derive(Debug, Clone)]
pub struct WaftCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WaftCodec<T, U> {
    fn default() -> Self {
        WaftCodec(PhantomData)
    }
}

impl<T, U> Codec for WaftCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = WaftDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        WaftDecoder(PhantomData)
    }
}

/// Decodes one message; a malformed one is `INVALID_ARGUMENT` naming what was wrong.
#[derive(Debug, Clone)]
pub struct WaftDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for WaftDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed protobuf message: {e}")))
    }
}
