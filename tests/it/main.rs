//! The integration tests, as one binary (one build, one link): each module an area, all over
//! [`helpers`] and the `testkit` harness. The tests share one stack, started on first use;
//! the ones that need other settings or kill processes start their own, one at a time.
//!
//! `cargo test --test it walkthrough::` runs one area.

mod accept;
mod api;
mod async_payments;
mod cancel;
mod errors;
mod gateway_faults;
mod gateway_process;
mod helpers;
mod holds;
mod limits;
mod logging;
mod mock_gateway;
mod refunds;
mod schema;
mod signing;
mod stripe_conformance;
mod unknown_outcomes;
mod upgrade;
mod walkthrough;
mod webhooks;
