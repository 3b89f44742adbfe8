//! Handler input taken as raw bytes, so that the domain parses it and answers bad input with
//! its own messages (a typed `Json<T>` input would fail inside the SDK with a serde message).

use std::convert::Infallible;
use std::marker::PhantomData;

use bytes::Bytes;
use restate_sdk::serde::{Deserialize, InputMetadata, PayloadMetadata, Serialize};
use schemars::JsonSchema;

/// A JSON request body, not yet parsed. `S` only documents the expected shape: its JSON schema
/// is published to Restate (and so to the admin API's OpenAPI). The body is optional at the
/// ingress (`GetPayment` is called both with `{}` and with no body); handlers that need one
/// say so with a 400.
pub struct JsonBody<S> {
    bytes: Bytes,
    shape: PhantomData<fn() -> S>,
}

impl<S> JsonBody<S> {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl<S> Deserialize for JsonBody<S> {
    type Error = Infallible;

    fn deserialize(bytes: &mut Bytes) -> Result<Self, Self::Error> {
        Ok(Self {
            bytes: bytes.clone(),
            shape: PhantomData,
        })
    }
}

impl<S> Serialize for JsonBody<S> {
    type Error = Infallible;

    fn serialize(&self) -> Result<Bytes, Self::Error> {
        Ok(self.bytes.clone())
    }
}

impl<S: JsonSchema> PayloadMetadata for JsonBody<S> {
    fn json_schema() -> Option<serde_json::Value> {
        Some(schemars::schema_for!(S).to_value())
    }

    fn input_metadata() -> InputMetadata {
        InputMetadata {
            accept_content_type: "application/json",
            is_required: false,
        }
    }
}
