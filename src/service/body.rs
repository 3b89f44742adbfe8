//! Handler input taken as raw bytes, so that the domain parses it and answers bad input with
//! its own messages (a typed `Json<T>` input would fail inside the SDK with a serde message).

use std::convert::Infallible;
use std::marker::PhantomData;

use bytes::Bytes;
use restate_sdk::serde::{Deserialize, InputMetadata, PayloadMetadata, Serialize};
use schemars::JsonSchema;

use crate::payment::{CapturePaymentBody, CreatePaymentBody, NoInput, RefundPaymentBody};

/// A JSON request body, not yet parsed. `S` documents the expected shape: its JSON schema,
/// and whether a body is required, are published to Restate (and so to the admin API's
/// OpenAPI); the handler's parser accepts exactly that.
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

/// A request body's shape: its schema, and whether the request needs a body at all.
pub trait BodyShape: JsonSchema {
    const REQUIRED: bool;
}

impl BodyShape for CreatePaymentBody {
    const REQUIRED: bool = true;
}

/// No body refunds in full, with no reason.
impl BodyShape for RefundPaymentBody {
    const REQUIRED: bool = false;
}

/// Stripe always posts its event.
impl BodyShape for super::StripeEventBody {
    const REQUIRED: bool = true;
}

/// No body captures the whole hold.
impl BodyShape for CapturePaymentBody {
    const REQUIRED: bool = false;
}

/// The seed calls `GetPayment` with `{}`; no body at all is as good.
impl BodyShape for NoInput {
    const REQUIRED: bool = false;
}

impl<S: BodyShape> PayloadMetadata for JsonBody<S> {
    fn json_schema() -> Option<serde_json::Value> {
        Some(schemars::schema_for!(S).to_value())
    }

    fn input_metadata() -> InputMetadata {
        InputMetadata {
            accept_content_type: "application/json",
            is_required: S::REQUIRED,
        }
    }
}
