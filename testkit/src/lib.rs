//! # testkit
//!
//! The one harness of payment-service: everything the integration tests, the crash test, the
//! benchmark and the cluster measurements need, in one place per concern, and `stackctl`, the
//! command line over it.
//!
//! | module      | the one place for                                                          |
//! |-------------|----------------------------------------------------------------------------|
//! | [`process`] | child processes: spawn, SIGKILL, restart in place, stop; owned, so nothing outlives the harness |
//! | [`ports`]   | picking ports, safe for processes restarted in place                       |
//! | [`paths`]   | where the binaries and the Restate configuration files are                 |
//! | [`stack`]   | restate-server as one node or a cluster, payment-service, registration, readiness |
//! | [`admin`]   | Restate's admin API: registration, health, the SQL queries                 |
//! | [`client`]  | the typed client of the three handlers, transient errors, retries          |
//! | [`ledger`]  | the gateway's ledger, read-only, per payment                               |
//! | [`localstripe`] | localstripe, a fake of Stripe's API, on a free port, for the Stripe adapter's conformance test |
//! | [`load`]    | the load engine: closed loop, scheduled, latency histograms, process CPU and memory |
//! | [`bench`]   | the benchmark against the floor (`stackctl bench`, README "Performance")    |
//! | [`bodies`]  | oversized request bodies, sent fast or slowly; `stackctl measure bodies` (README "Limits") |
//! | [`measure`] | the cluster measurements under faults (`stackctl measure`, "What survives what") |
//! | [`schema`]  | the published request schemas as an oracle, and a fuzzer driven by them    |
//! | [`crash`]   | the crash test: plan, clients, kills, audit (a `Violation` enum), report   |
//! | [`cli`]     | `stackctl stack` and `stackctl cluster`: stacks in the foreground, on fixed ports |
//!
//! A test is short: start a [`stack::Stack`], call it through its [`client::PaymentClient`],
//! break it (`kill_node`, `kill_service`), assert with [`admin::Admin`] and the ledger.

pub mod admin;
pub mod bench;
pub mod bodies;
pub mod cli;
pub mod client;
pub mod crash;
pub mod ledger;
pub mod load;
pub mod localstripe;
pub mod measure;
pub mod paths;
pub mod ports;
pub mod process;
pub mod schema;
pub mod stack;
