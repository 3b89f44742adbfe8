//! `bench-floor`: the benchmark's floor, a Restate virtual object with the journal shape of
//! `PaymentService/CreatePayment` and no logic at all. Bench-only; `stackctl bench` starts it
//! beside the service (`testkit::bench`) and reports our throughput as a ratio of its own.
//!
//! `BenchFloor/<id>/Create` journals what `CreatePayment` journals for a new payment:
//!
//! | # | entry             | here                                                 |
//! |---|-------------------|------------------------------------------------------|
//! | 1 | get state `state` | a stored record is answered with a constant          |
//! | 2 | set state `state` | a `pending` record                                   |
//! | 3 | run `charge`      | a small struct (a random charge ID, two timestamps)  |
//! | 4 | set state `state` | a `completed` record                                 |
//! | 5 | run `receipt`     | nothing                                              |
//!
//! A second `Create` on the same key is step 1 only (the floor of a duplicate `CreatePayment`),
//! and `Get` is a shared handler that answers the stored record (the floor of `GetPayment`).
//! No logging, no parsing of the request body, no gateway. The records and answers have about
//! the sizes of the service's (a stored payment is ~250 bytes of JSON), because sizes matter on
//! the wire: see [`server::listen`]. And the charge ID in them is drawn at random, as a
//! gateway's is: restate-server compresses what it stores, and a floor whose every record held
//! the same ID (it once was all zeros) cost the server less per call than any real payment
//! (README "Performance").
//!
//! ```text
//! cargo run --release -p testkit --bin bench-floor -- --bind 127.0.0.1:9091
//! ```

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use payment_service::server;
use restate_sdk::endpoint::Endpoint;
use restate_sdk::prelude::*;
use serde::{Deserialize, Serialize};

const STATE: &str = "state";
/// The answer to a duplicate `Create`: the size of `CreatePayment`'s (~130 bytes). A new
/// payment's answer names its own charge ID.
const ANSWER: &[u8] = br#"{"paymentId":"floor","status":"completed","chargeId":"ch_00000000000000000000000000000000","message":"Payment processed successfully"}"#;
/// Brings a stored record to about the size of a stored payment.
const PADDING: &str = "paymentId=<id> amount=10000 currency=USD customerId=cust-bench description=benchmark createdAt=<ISO 8601>";

/// The bench-only floor object (see the module doc).
#[derive(Debug, Parser)]
#[command(name = "bench-floor", about)]
struct Args {
    /// Address to listen on for the Restate server (HTTP/2 cleartext).
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:9091")]
    bind: SocketAddr,
    /// Tokio worker threads; the same variable and default as the service's, so that the
    /// floor and the service differ by their handlers only.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
}

/// What the floor stores: `pending` after step 2, `completed` after step 4.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    status: String,
    charge_id: Option<String>,
    accepted_at: Option<u64>,
    charged_at: Option<u64>,
    padding: String,
}

/// The `charge` step's result.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Charged {
    started_at: u64,
    charge_id: String,
    at: u64,
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct BenchFloor;

#[restate_sdk::object(name = "BenchFloor")]
impl BenchFloor {
    /// CreatePayment's journal, without its logic.
    #[handler(name = "Create")]
    async fn create(&self, ctx: ObjectContext<'_>, _body: Bytes) -> Result<Bytes, TerminalError> {
        if ctx.get::<Bytes>(STATE).await?.is_some() {
            return Ok(Bytes::from_static(ANSWER));
        }
        ctx.set(
            STATE,
            Json(Record {
                status: "pending".to_owned(),
                charge_id: None,
                accepted_at: None,
                charged_at: None,
                padding: PADDING.to_owned(),
            }),
        );
        let Json(charged) = ctx
            .run(|| async {
                Ok(Json(Charged {
                    started_at: now_millis(),
                    charge_id: format!("ch_{:032x}", rand::random::<u128>()),
                    at: now_millis(),
                }))
            })
            .name("charge")
            .await?;
        let answer = Bytes::from(format!(
            r#"{{"paymentId":"floor","status":"completed","chargeId":"{}","message":"Payment processed successfully"}}"#,
            charged.charge_id
        ));
        ctx.set(
            STATE,
            Json(Record {
                status: "completed".to_owned(),
                charge_id: Some(charged.charge_id),
                accepted_at: Some(charged.started_at),
                charged_at: Some(charged.at),
                padding: PADDING.to_owned(),
            }),
        );
        ctx.run(|| async { Ok(()) }).name("receipt").await?;
        Ok(answer)
    }

    /// GetPayment's journal: one state read.
    #[handler(name = "Get")]
    async fn get(
        &self,
        ctx: SharedObjectContext<'_>,
        _body: Bytes,
    ) -> Result<Bytes, TerminalError> {
        match ctx.get::<Bytes>(STATE).await? {
            Some(stored) => Ok(stored),
            None => Err(TerminalError::new_with_code(404, "not found")),
        }
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    server::runtime(args.worker_threads)?.block_on(run(args))
}

async fn run(args: Args) -> std::io::Result<()> {
    // TCP_NODELAY, as the service: see `server::listen`.
    let listener = server::listen(args.bind)?;
    eprintln!("bench-floor listening on {}", listener.local_addr()?);
    server::serve(
        listener,
        Endpoint::builder().bind(BenchFloor).build(),
        // Any path: the floor is registered at its bare URL.
        None,
        server::shutdown_signal(),
    )
    .await;
    Ok(())
}
