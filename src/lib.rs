//! # payment-service
//!
//! An idempotent payment service on [Restate](https://restate.dev): a virtual object
//! `PaymentService`, keyed by payment ID, that charges a customer at most once per payment ID
//! however often the client retries, however many duplicates arrive at once, and whichever
//! process crashes in the middle.
//!
//! ## Layout
//!
//! | module        | what it holds                                                                |
//! |---------------|------------------------------------------------------------------------------|
//! | [`payment`]   | the domain, plain Rust: valid-only types, request parsing, states, the error |
//! | [`service`]   | the Restate object: thin handlers, state keys, the journal, error mapping    |
//! | [`gateway`]   | the gateway trait, a step's retries, the in-process mock, the Stripe adapter |
//! | [`stripe_sim`] | the simulated Stripe both mocks share: its stores, ledger and HTTP face      |
//! | [`server`]    | the HTTP endpoint and graceful shutdown on SIGINT/SIGTERM                     |
//! | [`config`]    | flags and environment variables (clap)                                       |
//! | [`telemetry`] | `tracing` setup, replay-aware                                                |
//! | [`rfc3339`]   | timestamps as clients and logs read them, written without a format parser     |
//!
//! `src/main.rs` only wires these together. Integration tests in `tests/` start a real
//! `restate-server` and the service binary through the workspace's harness crate, `testkit/`
//! (also the crash test, the benchmark and `stackctl`).

pub mod config;
pub mod gateway;
pub mod payment;
pub mod rfc3339;
pub mod server;
pub mod service;
pub mod stripe_sim;
pub mod telemetry;
