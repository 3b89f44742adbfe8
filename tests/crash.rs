//! The crash test: payments under load while payment-service and restate-server are SIGKILLed
//! and restarted, then an audit of what the gateway did against what Restate and the clients saw.
//!
//! ```text
//! cargo test --test crash                                   # small run (CI)
//! cargo test --release --test crash -- --full               # full run (scripts/crash-test.sh)
//! cargo test --release --test crash -- --full --seed 42     # replay a schedule
//! cargo test --release --test crash -- --full --cluster     # on a three-node cluster
//! ```
//!
//! A real restate-server and the service run as separate processes ([`OwnedStack`]); the mock
//! gateway keeps its JSONL ledger and answers `GATEWAY_RESPONSE_DELAY_MS` after it has acted, so
//! that kills land between the gateway acting and the journal recording the step. Clients send
//! 2–3 concurrent `CreatePayment` per payment ID, retry on connection errors, timeouts and 5xx
//! until they get an answer (or a deadline), then refund some payments (some refunds duplicated,
//! some partial, some of declined payments). Meanwhile the service is killed every 1–2 s and the
//! server at least twice. Then nobody intervenes: the test only waits (admin SQL API) until no
//! `PaymentService` invocation is left unfinished, and audits:
//!
//! * from the ledger: no payment charged (a non-replay succeeded charge) more than once, none
//!   refunded more than once, a refund only of a charged payment and within its amount;
//! * every payment ends `completed`, `failed` or `refunded` (GetPayment), consistent with the
//!   ledger: the same chargeId, failed ⇔ declined and never charged, refunded ⇔ refunded once,
//!   with the refund stored in Restate's state being the one in the ledger;
//! * every client that got an answer got the same chargeId (and refundId), and at most one got
//!   "processed successfully"; a 409 on a refund only for a failed payment;
//! * no invocation left pending, and none failed other than with that 409.
//!
//! The run must also show gateway calls re-executed (a key seen again in the ledger: a step that
//! ran again after a crash); with none, it proved nothing and fails. Everything random (the load
//! and the kill schedule) comes from the seed, printed at start; interleavings are up to the
//! machine, so a replay repeats the schedule, not every race.
//!
//! `--cluster` runs the same on a three-node Restate cluster ([`OwnedCluster`], replication 2):
//! every client call picks one of the three ingresses (from the seed) and a retry goes to the
//! next ingress that is up; the faults are the service kills plus SIGKILL and restart of one
//! node at a time (never two down at once: the next node kill waits until the last node killed
//! runs invocations again), on a thread of their own, so that the service may be killed while a
//! node is down. The settling and the audit's SQL need every node's admin API to give the same
//! answer, so that a node that is behind cannot make the run look settled.
//!
//! This binary has its own `main` (`harness = false`); `--help` lists its options.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use common::cluster::{self, OwnedCluster};
use common::owned::OwnedStack;
use common::{LedgerEntry, process, sql_str};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

const USAGE: &str = "\
The crash test of payment-service (see tests/crash.rs).

usage: cargo test [--release] --test crash -- [options]

  (no option)              the small run, as CI runs it
  --full                   the full run: 240 payments, 20 s of kills, 2 server kills
  --cluster                on a three-node Restate cluster (replication 2), load across the
                           three ingresses, SIGKILL + restart of one node at a time; full: 240
                           payments, 30 s of kills, 3 node kills (one per node); small: 40
                           payments, 8 s, 1 node kill
  --seed N                 replay a schedule (default: a random seed, printed)
  --payments N             number of payment IDs
  --duration S             seconds of kills (the service every 1-2 s)
  --server-kills N         restate-server kills during that time (--cluster: node kills)
  --response-delay-ms N    the gateway's delay between acting and answering (default: 50-150, seeded)
  --recovery-timeout S     how long the system may take to settle after the last kill
  --keep                   keep the temp dir (logs, ledger, server data) even when passing
  -h, --help               this text

GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS=1 switches off the gateway's key check (the run must
then fail). Unknown libtest flags (--nocapture, --test-threads, ...) are ignored.";

/// The name this test has for filters and `--list`.
const TEST_NAME: &str = "crash";
/// Time the mock gateway takes before it acts.
const GATEWAY_DELAY_MS: u64 = 20;
/// The seed's decline rate.
const DECLINE_RATE: f64 = 0.1;
/// One HTTP attempt of a client.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(12);
/// Backoff between a client's attempts.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Violations printed in full; the rest are counted.
const MAX_PRINTED_VIOLATIONS: usize = 60;

// ---- parameters ------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Params {
    full: bool,
    /// On a three-node cluster ([`OwnedCluster`]) instead of one server.
    cluster: bool,
    seed: u64,
    payments: usize,
    duration: Duration,
    server_kills: usize,
    response_delay_ms: u64,
    recovery_timeout: Duration,
    keep: bool,
    ignore_keys: bool,
    /// The options given, for the replay command.
    overrides: Vec<String>,
}

enum Cli {
    Run(Params),
    Help,
    List,
    FilteredOut,
}

fn parse_args(args: &[String]) -> Result<Cli, String> {
    let mut full = false;
    let mut cluster = false;
    let mut seed = None;
    let mut payments = None;
    let mut duration = None;
    let mut server_kills = None;
    let mut response_delay_ms = None;
    let mut recovery_timeout = None;
    let mut keep = false;
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let mut overrides = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs {what}"))
        };
        match name {
            "-h" | "--help" => return Ok(Cli::Help),
            "--list" => return Ok(Cli::List),
            "--full" => full = true,
            "--small" => full = false,
            "--cluster" => cluster = true,
            "--keep" => keep = true,
            "--seed" => seed = Some(number(name, &value("a number")?)?),
            "--payments" => {
                let n: usize = number(name, &value("a number")?)?;
                if n == 0 {
                    return Err("--payments must be at least 1".into());
                }
                payments = Some(n);
                overrides.push(format!("--payments {n}"));
            }
            "--duration" => {
                let s: f64 = number(name, &value("seconds")?)?;
                if !(1.0..=3600.0).contains(&s) {
                    return Err("--duration must be between 1 and 3600 seconds".into());
                }
                duration = Some(Duration::from_secs_f64(s));
                overrides.push(format!("--duration {s}"));
            }
            "--server-kills" => {
                let n: usize = number(name, &value("a number")?)?;
                server_kills = Some(n);
                overrides.push(format!("--server-kills {n}"));
            }
            "--response-delay-ms" => {
                let n: u64 = number(name, &value("milliseconds")?)?;
                response_delay_ms = Some(n);
                overrides.push(format!("--response-delay-ms {n}"));
            }
            "--recovery-timeout" => {
                let s: f64 = number(name, &value("seconds")?)?;
                if !(1.0..=3600.0).contains(&s) {
                    return Err("--recovery-timeout must be between 1 and 3600 seconds".into());
                }
                recovery_timeout = Some(Duration::from_secs_f64(s));
                overrides.push(format!("--recovery-timeout {s}"));
            }
            // libtest options that `cargo test` may pass on: no meaning here.
            "--test-threads" | "--color" | "--format" | "-Z" | "--logfile" => {
                if inline.is_none() {
                    it.next();
                }
            }
            "--skip" => skips.push(value("a filter")?),
            other if other.starts_with('-') => {
                eprintln!("crash: ignoring option {other}");
            }
            filter => filters.push(filter.to_owned()),
        }
    }
    if (!filters.is_empty() && !filters.iter().any(|f| TEST_NAME.contains(f.as_str())))
        || skips.iter().any(|s| TEST_NAME.contains(s.as_str()))
    {
        return Ok(Cli::FilteredOut);
    }
    let seed = seed.unwrap_or_else(rand::random);
    let mut schedule = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let (default_payments, default_duration, default_kills, default_recovery) =
        match (full, cluster) {
            (true, false) => (240, 20.0, 2, 180.0),
            (false, false) => (60, 8.0, 1, 90.0),
            // Node restarts take longer than a single server's (a node catches up with the
            // others before it serves): a longer window keeps the load running across them.
            (true, true) => (240, 30.0, 3, 240.0),
            (false, true) => (40, 8.0, 1, 150.0),
        };
    Ok(Cli::Run(Params {
        full,
        cluster,
        seed,
        payments: payments.unwrap_or(default_payments),
        duration: duration.unwrap_or(Duration::from_secs_f64(default_duration)),
        server_kills: server_kills.unwrap_or(default_kills),
        response_delay_ms: response_delay_ms.unwrap_or_else(|| schedule.random_range(50..=150)),
        recovery_timeout: recovery_timeout.unwrap_or(Duration::from_secs_f64(default_recovery)),
        keep,
        ignore_keys: env_flag("GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS"),
        overrides,
    }))
}

fn number<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    text.parse()
        .map_err(|e| format!("{name}: {text:?} is not valid: {e}"))
}

/// A boolean environment variable as clap reads one (`1`, `true`, `yes`, `on`).
fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

impl Params {
    /// Ingresses the load spreads over: one per node.
    fn ingresses(&self) -> usize {
        if self.cluster { cluster::NODES } else { 1 }
    }

    fn replay_command(&self) -> String {
        let mut cmd = String::from("cargo test");
        if self.full {
            cmd.push_str(" --release");
        }
        cmd.push_str(" --test crash --");
        if self.full {
            cmd.push_str(" --full");
        }
        if self.cluster {
            cmd.push_str(" --cluster");
        }
        cmd.push_str(&format!(" --seed {}", self.seed));
        for o in &self.overrides {
            cmd.push(' ');
            cmd.push_str(o);
        }
        if self.ignore_keys {
            cmd = format!("GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS=1 {cmd}");
        }
        cmd
    }
}

// ---- the plan: load and kills, all from the seed --------------------------------------------

#[derive(Debug, Clone)]
struct PaymentPlan {
    id: String,
    amount: u64,
    customer: String,
    /// Concurrent CreatePayment calls (the first plus duplicates).
    creates: usize,
    /// When the first CreatePayment goes out, from the start of the load.
    start: Duration,
    /// Concurrent RefundPayment calls after the payment was answered: the `amount` each asks
    /// for (`None`: no amount field, a full refund; `Some(0)`: full too). Empty: no refund.
    refunds: Vec<Option<u64>>,
    /// Pause between the CreatePayment answer and the refunds.
    refund_pause: Duration,
    /// The ingress each client call goes to first (a node index; always 0 on one server): the
    /// CreatePayment calls, then the RefundPayment calls, then the GetPayment.
    ingresses: Vec<usize>,
}

impl PaymentPlan {
    /// The refund amounts this plan may legitimately end with.
    fn refund_amounts(&self) -> BTreeSet<u64> {
        self.refunds
            .iter()
            .map(|a| match a {
                None | Some(0) => self.amount,
                Some(a) => *a,
            })
            .collect()
    }
}

fn plan_payments(p: &Params) -> Vec<PaymentPlan> {
    let mut rng = StdRng::seed_from_u64(p.seed);
    // Payments start during most of the kill window, so that kills land on all of them.
    let window = p.duration.mul_f64(0.85);
    let mut plans: Vec<PaymentPlan> = (0..p.payments)
        .map(|i| {
            let amount = rng.random_range(100..=50_000_u64);
            let customer = if rng.random_bool(0.06) {
                format!("decline-cust-{i}")
            } else {
                format!("cust-{}", rng.random_range(0..50))
            };
            let creates = rng.random_range(2..=3);
            let start = window.mul_f64(rng.random::<f64>());
            let refunds = if rng.random_bool(0.45) {
                let copies = rng.random_range(1..=2);
                let partial = amount > 1 && rng.random_bool(0.4);
                let first = if partial {
                    Some(rng.random_range(1..amount))
                } else {
                    [None, Some(0), Some(amount)][rng.random_range(0..3)]
                };
                let mut amounts = vec![first];
                if copies == 2 {
                    // Mostly the same request again; sometimes another amount, of which the
                    // first to run wins and the other gets the same refund back.
                    amounts.push(if rng.random_bool(0.75) {
                        first
                    } else if partial {
                        None
                    } else {
                        Some(rng.random_range(1..=amount))
                    });
                }
                amounts
            } else {
                Vec::new()
            };
            PaymentPlan {
                id: format!("crash-{i:04}"),
                amount,
                customer,
                creates,
                start,
                refunds,
                refund_pause: Duration::from_millis(rng.random_range(0..400)),
                ingresses: Vec::new(),
            }
        })
        .collect();
    // From an RNG of their own: the plans of a seed are the same with and without --cluster.
    let mut ingress_rng = StdRng::seed_from_u64(p.seed ^ 0x1656_67b1_9e37_79f9);
    for plan in &mut plans {
        let calls = plan.creates + plan.refunds.len() + 1;
        plan.ingresses = (0..calls)
            .map(|_| ingress_rng.random_range(0..p.ingresses()))
            .collect();
    }
    plans
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Service,
    Server,
    /// A node of the cluster (index 0-2).
    Node(usize),
}

#[derive(Debug, Clone, Copy)]
struct Kill {
    at: Duration,
    target: Target,
    /// How long it stays down before it is started again.
    down_for: Duration,
}

fn plan_kills(p: &Params) -> Vec<Kill> {
    let mut rng = StdRng::seed_from_u64(p.seed ^ 0xc2b2_ae3d_27d4_eb4f);
    let secs = p.duration.as_secs_f64();
    let mut kills = Vec::new();
    let mut at = rng.random_range(1.0..2.0);
    while at < secs {
        kills.push(Kill {
            at: Duration::from_secs_f64(at),
            target: Target::Service,
            down_for: Duration::from_millis(rng.random_range(0..300)),
        });
        at += rng.random_range(1.0..2.0);
    }
    if kills.is_empty() {
        kills.push(Kill {
            at: p.duration.mul_f64(0.5),
            target: Target::Service,
            down_for: Duration::ZERO,
        });
    }
    let n = p.server_kills;
    // The cluster's nodes in a seeded order, repeated: each node is killed before any is killed
    // twice, never the same node twice in a row.
    // (No draw from the RNG without --cluster: a seed replays the same single-server schedule.)
    let mut order: Vec<usize> = (0..cluster::NODES).collect();
    if p.cluster {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
    }
    for k in 0..n {
        // Spread over the window, off the service kills' beat.
        let centre = secs * (k as f64 + 1.0) / (n as f64 + 1.0);
        let at = (centre + rng.random_range(-0.4..0.4)).clamp(0.5, secs.max(0.5));
        let (target, down_ms) = if p.cluster {
            // Down long enough for the others to take over its partitions' leadership.
            (
                Target::Node(order[k % order.len()]),
                rng.random_range(500..3000),
            )
        } else {
            (Target::Server, rng.random_range(0..1000))
        };
        kills.push(Kill {
            at: Duration::from_secs_f64(at),
            target,
            down_for: Duration::from_millis(down_ms),
        });
    }
    kills.sort_by_key(|k| k.at);
    kills
}

// ---- the clients -----------------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    /// HTTP attempts sent to each ingress, and final answers (any status) from each.
    attempts_by_ingress: Vec<AtomicU64>,
    answers_by_ingress: Vec<AtomicU64>,
    /// Retries that went to another ingress than the attempt before.
    moved: AtomicU64,
    retries: AtomicU64,
    connection_errors: AtomicU64,
    timeouts: AtomicU64,
    /// Transient HTTP answers (5xx, and the like), by status.
    transient: Mutex<BTreeMap<u16, u64>>,
    payments_done: AtomicUsize,
}

impl Counters {
    fn new(ingresses: usize) -> Self {
        Self {
            attempts_by_ingress: (0..ingresses).map(|_| AtomicU64::new(0)).collect(),
            answers_by_ingress: (0..ingresses).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone)]
enum Answer {
    /// HTTP 200 and its body.
    Ok(Value),
    /// A final non-200 answer (a 4xx): status and body.
    Refused(u16, Value),
    /// Nothing but errors until the deadline; the last one.
    Silent(String),
}

struct Load {
    http: reqwest::Client,
    /// One ingress per node (one on a single server).
    ingresses: Vec<String>,
    /// Which ingresses are up (the cluster's readiness flags), as a load balancer's health
    /// checks would tell: a retry goes to the next one that is.
    up: Arc<Vec<AtomicBool>>,
    counters: Counters,
    /// Clients give up retrying at this time: set once the last kill is known.
    deadline: Mutex<Instant>,
}

impl Load {
    /// POSTs until a final answer or the deadline: connection errors, timeouts and transient
    /// statuses are retried with backoff, with the same payment ID and body. The first attempt
    /// goes to ingress `first`, each retry to the next ingress that is up.
    async fn call(&self, id: &str, handler: &str, body: &Value, first: usize) -> Answer {
        let mut at = first % self.ingresses.len();
        let mut backoff = RETRY_MIN;
        loop {
            let url = format!("{}/{}/{id}/{handler}", self.ingresses[at], common::SERVICE);
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            self.counters.attempts_by_ingress[at].fetch_add(1, Ordering::Relaxed);
            let sent = self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            let last = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match resp.text().await {
                        Ok(text) => {
                            let value = serde_json::from_str(&text)
                                .unwrap_or_else(|_| Value::String(text.clone()));
                            if status == 200 {
                                self.counters.answers_by_ingress[at]
                                    .fetch_add(1, Ordering::Relaxed);
                                return Answer::Ok(value);
                            }
                            if !transient(status, &value, id) {
                                self.counters.answers_by_ingress[at]
                                    .fetch_add(1, Ordering::Relaxed);
                                return Answer::Refused(status, value);
                            }
                            *self
                                .counters
                                .transient
                                .lock()
                                .unwrap()
                                .entry(status)
                                .or_default() += 1;
                            format!("HTTP {status}: {text}")
                        }
                        Err(e) => self.count_error(&e),
                    }
                }
                Err(e) => self.count_error(&e),
            };
            if Instant::now() + backoff >= self.deadline() {
                return Answer::Silent(last);
            }
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(RETRY_MAX);
            let next = self.next_ingress(at);
            if next != at {
                self.counters.moved.fetch_add(1, Ordering::Relaxed);
                at = next;
            }
        }
    }

    /// The next ingress after `at` that is up (`at` itself when it is the only one); the next
    /// one anyway when none is up.
    fn next_ingress(&self, at: usize) -> usize {
        let n = self.ingresses.len();
        (1..=n)
            .map(|k| (at + k) % n)
            .find(|&i| self.up[i].load(Ordering::SeqCst))
            .unwrap_or((at + 1) % n)
    }

    fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_deadline(&self, deadline: Instant) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = deadline;
    }

    fn count_error(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters
                .connection_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        format!("{e}")
    }
}

/// Worth retrying: the server is not (yet) able to answer, as opposed to the service's answer.
/// The service's only 404 is `payment <id> not found`; any other (e.g. a server that has not
/// loaded its registrations yet after a restart) is the server's.
fn transient(status: u16, body: &Value, id: &str) -> bool {
    match status {
        408 | 429 => true,
        404 => body["message"].as_str() != Some(&format!("payment {id} not found")),
        s => s >= 500,
    }
}

/// What the clients of one payment got.
#[derive(Debug, Clone, Default)]
struct PaymentLog {
    creates: Vec<Answer>,
    /// (amount asked, answer)
    refunds: Vec<(Option<u64>, Answer)>,
    /// GetPayment right after the CreatePayment answers.
    get: Option<Answer>,
}

async fn run_payment(load: Arc<Load>, plan: PaymentPlan, t0: Instant) -> PaymentLog {
    tokio::time::sleep_until((t0 + plan.start).into()).await;
    let body = json!({
        "amount": plan.amount,
        "currency": "USD",
        "description": "crash test",
        "customerId": plan.customer,
    });
    let id = Arc::new(plan.id.clone());
    let ingress = |call: usize| plan.ingresses.get(call).copied().unwrap_or(0);
    let creates: Vec<_> = (0..plan.creates)
        .map(|k| {
            let (load, id, body, at) = (load.clone(), id.clone(), body.clone(), ingress(k));
            tokio::spawn(async move { load.call(&id, "CreatePayment", &body, at).await })
        })
        .collect();
    let mut log = PaymentLog::default();
    for c in creates {
        log.creates.push(c.await.expect("client task panicked"));
    }
    if log.creates.iter().any(|a| matches!(a, Answer::Ok(_))) {
        if !plan.refunds.is_empty() {
            tokio::time::sleep(plan.refund_pause).await;
            let refunds: Vec<_> = plan
                .refunds
                .iter()
                .enumerate()
                .map(|(k, &amount)| {
                    let mut body = json!({"reason": "crash test refund"});
                    if let Some(a) = amount {
                        body["amount"] = json!(a);
                    }
                    let (load, id, at) = (load.clone(), id.clone(), ingress(plan.creates + k));
                    tokio::spawn(async move {
                        (amount, load.call(&id, "RefundPayment", &body, at).await)
                    })
                })
                .collect();
            for r in refunds {
                log.refunds.push(r.await.expect("client task panicked"));
            }
        }
        let at = ingress(plan.creates + plan.refunds.len());
        log.get = Some(load.call(&id, "GetPayment", &json!({}), at).await);
    }
    load.counters.payments_done.fetch_add(1, Ordering::Relaxed);
    log
}

// ---- the chaos -------------------------------------------------------------------------------

/// The system under test: one restate-server, or a three-node cluster.
enum Sut {
    Single(OwnedStack),
    Cluster(OwnedCluster),
}

impl Sut {
    fn dir(&self) -> &Path {
        match self {
            Sut::Single(s) => &s.dir,
            Sut::Cluster(c) => &c.dir,
        }
    }

    fn ledger(&self) -> &Path {
        match self {
            Sut::Single(s) => s.ledger(),
            Sut::Cluster(c) => c.ledger(),
        }
    }

    /// The ingress URLs, one per node.
    fn ingresses(&self) -> Vec<String> {
        match self {
            Sut::Single(s) => vec![s.app.ingress.clone()],
            Sut::Cluster(c) => c.ingress_urls(),
        }
    }

    /// Which ingresses are up (always the one of a single server: its clients have nowhere
    /// else to go).
    fn up_flags(&self) -> Arc<Vec<AtomicBool>> {
        match self {
            Sut::Single(_) => Arc::new(vec![AtomicBool::new(true)]),
            Sut::Cluster(c) => c.ready_flags(),
        }
    }

    /// SQL on the admin API (of a live node).
    fn query(&self, sql: &str) -> Result<Vec<Value>, String> {
        match self {
            Sut::Single(s) => s.app.try_query(sql),
            Sut::Cluster(c) => c.app().try_query(sql),
        }
    }

    /// SQL whose answer the audit relies on. On a cluster, every node's admin API must give the
    /// same rows (in any order): a node whose view is behind cannot stand for the cluster.
    fn agreed_query(&self, sql: &str) -> Result<Vec<Value>, String> {
        let Sut::Cluster(c) = self else {
            return self.query(sql);
        };
        let mut first: Option<(usize, Vec<String>, Vec<Value>)> = None;
        for i in 0..cluster::NODES {
            let rows = c
                .app_of(i)
                .try_query(sql)
                .map_err(|e| format!("{}: {e}", c.node_name(i)))?;
            let mut key: Vec<String> = rows.iter().map(Value::to_string).collect();
            key.sort();
            match &first {
                None => first = Some((i, key, rows)),
                Some((j, other, _)) if *other != key => {
                    return Err(format!(
                        "{} and {} disagree ({} rows and {} rows) on {sql:?}",
                        c.node_name(*j),
                        c.node_name(i),
                        other.len(),
                        key.len()
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(first.map(|(_, _, rows)| rows).unwrap_or_default())
    }

    /// [`Self::agreed_query`], retried for up to a minute while the nodes disagree or fail.
    fn settled_query(&self, sql: &str) -> Result<Vec<Value>, String> {
        if let Sut::Single(_) = self {
            return self.query(sql);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.agreed_query(sql) {
                Ok(rows) => return Ok(rows),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    fn name(&self, target: Target) -> String {
        match (self, target) {
            (_, Target::Service) => "payment-service".into(),
            (_, Target::Server) => "restate-server".into(),
            (Sut::Cluster(c), Target::Node(i)) => c.node_name(i).to_owned(),
            (Sut::Single(_), Target::Node(i)) => format!("node-{}", i + 1),
        }
    }

    /// SIGKILLs the target; `Ok(false)` if it was not running.
    fn kill(&self, target: Target) -> anyhow::Result<bool> {
        match (self, target) {
            (Sut::Single(s), Target::Service) => Ok(s.kill_service()),
            (Sut::Cluster(c), Target::Service) => Ok(c.kill_service()),
            (Sut::Single(s), Target::Server) => Ok(s.kill_server()),
            (Sut::Cluster(c), Target::Node(i)) => c.kill_node(i),
            (_, t) => anyhow::bail!("no {t:?} to kill here"),
        }
    }

    /// Starts the target again; returns when it is up (how long that took) and, for a server or
    /// node, when it serves invocations again.
    fn start(&self, target: Target) -> anyhow::Result<(Duration, Option<Duration>)> {
        match (self, target) {
            (Sut::Single(s), Target::Service) => Ok((s.start_service()?, None)),
            (Sut::Cluster(c), Target::Service) => Ok((c.start_service()?, None)),
            // A restarted server is healthy before its partitions lead again: the next kill
            // must find it serving, or it would land on an idle system.
            // A retry after a serving timeout finds the server already started: it only waits.
            (Sut::Single(s), Target::Server) => {
                let took = match s.server_pid() {
                    None => s.start_server()?,
                    Some(_) => Duration::ZERO,
                };
                let after = wait_serving(s).context("restate-server is not serving again")?;
                Ok((took, Some(took + after)))
            }
            // A node is back once invocations go through its own ingress (see OwnedCluster).
            (Sut::Cluster(c), Target::Node(i)) => {
                let started = c.start_node(i)?;
                Ok((started.healthy, Some(started.serving)))
            }
            (_, t) => anyhow::bail!("no {t:?} to start here"),
        }
    }

    fn died(&self) -> Option<String> {
        match self {
            Sut::Single(s) => s.died(),
            Sut::Cluster(c) => c.died(),
        }
    }

    fn ensure_up(&self) -> anyhow::Result<()> {
        match self {
            Sut::Single(s) => s.ensure_up(),
            Sut::Cluster(c) => c.ensure_up(),
        }
    }

    fn stop(&self) {
        match self {
            Sut::Single(s) => s.stop(),
            Sut::Cluster(c) => c.stop(),
        }
    }
}

#[derive(Debug, Default)]
struct ChaosLog {
    service_kills: usize,
    /// restate-server kills, or node kills on a cluster.
    server_kills: usize,
    /// Kills of each cluster node (empty on one server).
    node_kills: Vec<usize>,
    /// A restart that did not work, or a process that died by itself: the run is void.
    error: Option<String>,
}

/// Executes the kills. On one server: in order, each at its time (later by the time restarts
/// took): SIGKILL, stay down `down_for`, start again on the same ports and wait until it is up
/// (the server: until invocations go through again). One process at a time: the two are never
/// down together. On a cluster, the service kills and the node kills run side by side, each
/// in order: the service may be killed while a node is down, but a node is only killed once
/// the node killed before it serves again.
fn run_chaos(sut: &Sut, kills: &[Kill], t0: Instant) -> ChaosLog {
    if let Sut::Single(_) = sut {
        return run_kills(sut, kills, t0);
    }
    let (nodes, services): (Vec<Kill>, Vec<Kill>) = kills
        .iter()
        .partition(|k| matches!(k.target, Target::Node(_)));
    let (from_nodes, from_services) = std::thread::scope(|s| {
        let nodes = s.spawn(|| run_kills(sut, &nodes, t0));
        let services = run_kills(sut, &services, t0);
        (
            nodes.join().expect("the node-kill thread panicked"),
            services,
        )
    });
    let mut node_kills = vec![0; cluster::NODES];
    for (i, n) in from_nodes.node_kills.iter().enumerate() {
        node_kills[i] += n;
    }
    ChaosLog {
        service_kills: from_services.service_kills,
        server_kills: from_nodes.server_kills,
        node_kills,
        error: from_nodes.error.or(from_services.error),
    }
}

/// The kills in order, each at its time; time lost waiting for restarts moves the rest.
fn run_kills(sut: &Sut, kills: &[Kill], t0: Instant) -> ChaosLog {
    let mut log = ChaosLog::default();
    if let Sut::Cluster(_) = sut {
        log.node_kills = vec![0; cluster::NODES];
    }
    // Time lost waiting for restarts moves the rest of the schedule, which keeps its spacing.
    let mut shift = Duration::ZERO;
    for kill in kills {
        let due = t0 + kill.at + shift;
        match due.checked_duration_since(Instant::now()) {
            Some(wait) => std::thread::sleep(wait),
            None => shift += due.elapsed(),
        }
        if let Some(died) = sut.died() {
            log.error = Some(died);
            break;
        }
        let at = t0.elapsed().as_secs_f64();
        let name = sut.name(kill.target);
        match sut.kill(kill.target) {
            Ok(true) => {}
            Ok(false) => {
                log.error = Some(format!("{name} was not running at {at:.2}s"));
                break;
            }
            Err(e) => {
                log.error = Some(format!("killing {name} at {at:.2}s: {e:#}"));
                break;
            }
        }
        match kill.target {
            Target::Service => log.service_kills += 1,
            Target::Server => log.server_kills += 1,
            Target::Node(i) => {
                log.server_kills += 1;
                log.node_kills[i] += 1;
            }
        }
        std::thread::sleep(kill.down_for);
        let mut restarted = Err(anyhow::anyhow!("not tried"));
        for _ in 0..3 {
            restarted = sut.start(kill.target);
            if restarted.is_ok() {
                break;
            }
        }
        let (took, serving) = match restarted {
            Ok(times) => times,
            Err(e) => {
                log.error = Some(format!("restarting {name} failed: {e:#}"));
                break;
            }
        };
        let serving = serving
            .map(|s| format!(", serving after {:>5} ms", s.as_millis()))
            .unwrap_or_default();
        println!(
            "crash: t={at:6.2}s  SIGKILL {name:<15} down {:>4} ms, up again after {:>5} ms{serving}",
            kill.down_for.as_millis(),
            took.as_millis()
        );
    }
    if log.error.is_none() {
        log.error = sut.died();
    }
    log
}

/// Prefix of the payment IDs used to probe that the stack serves: never a payment (the same
/// as the cluster's readiness probes).
const PROBE_PREFIX: &str = cluster::PROBE_PREFIX;
/// How long a restarted stack may take to serve again.
const SERVING_TIMEOUT: Duration = Duration::from_secs(180);

/// Waits until an invocation goes through end to end: `GetPayment` of unknown IDs answers the
/// handler's 404 (a few IDs, so a few partitions). Returns how long that took.
fn wait_serving(stack: &OwnedStack) -> anyhow::Result<Duration> {
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let began = Instant::now();
    for _ in 0..3 {
        let id = format!("{PROBE_PREFIX}{}", PROBES.fetch_add(1, Ordering::Relaxed));
        loop {
            match stack.app.try_call(&id, "GetPayment", &json!({})) {
                Ok((404, body)) if !transient(404, &body, &id) => break,
                Ok((status, body)) if began.elapsed() > SERVING_TIMEOUT => {
                    anyhow::bail!("GetPayment {id} answered HTTP {status} {body}")
                }
                Err(e) if began.elapsed() > SERVING_TIMEOUT => anyhow::bail!("{e}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    Ok(began.elapsed())
}

/// [`wait_serving`] for either: on a cluster, through every node's ingress in turn.
fn wait_sut_serving(sut: &Sut) -> anyhow::Result<Duration> {
    match sut {
        Sut::Single(s) => wait_serving(s),
        Sut::Cluster(c) => {
            let began = Instant::now();
            for i in 0..cluster::NODES {
                c.wait_node_ready(i)?;
            }
            Ok(began.elapsed())
        }
    }
}

// ---- the audit -------------------------------------------------------------------------------

/// The ledger, tolerating a torn last line (a crash mid-append): unreadable lines are counted.
fn read_ledger(path: &Path) -> (Vec<LedgerEntry>, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut entries = Vec::new();
    let mut unreadable = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str(line) {
            Ok(e) => entries.push(e),
            Err(_) => unreadable.push(line.to_owned()),
        }
    }
    (entries, unreadable)
}

/// The system once it has settled: what the audit reads.
struct EndState {
    /// The final GetPayment of each payment, in plan order.
    finals: Vec<Answer>,
    /// The `refund` state key of each payment that has one.
    stored_refunds: HashMap<String, Value>,
    /// PaymentService invocations not completed (`sys_invocation`): there must be none.
    unfinished: Vec<Value>,
    /// PaymentService invocations that completed with a failure.
    failed_invocations: Vec<Value>,
    /// All PaymentService invocations.
    invocations: usize,
    ledger: Vec<LedgerEntry>,
    unreadable_ledger_lines: Vec<String>,
}

/// What the audit found: figures and violations.
#[derive(Debug, Default)]
struct Findings {
    ledger_charges: usize,
    ledger_refunds: usize,
    /// Calls whose key the ledger had seen before: a step that ran again.
    reexecuted: usize,
    /// Lines marked `replay` by the gateway (equal to `reexecuted` when keys are honoured).
    replays: usize,
    charged_twice: usize,
    refunded_twice: usize,
    completed: usize,
    failed: usize,
    refunded: usize,
    other_status: usize,
    expected_409s: usize,
    probe_404s: usize,
    violations: Vec<String>,
    /// Payment IDs with a violation, for the journal dump.
    suspects: BTreeSet<String>,
}

impl Findings {
    fn violation(&mut self, id: &str, what: String) {
        self.violations.push(format!("{id}: {what}"));
        self.suspects.insert(id.to_owned());
    }
}

/// A ledger line, short: `refund refund:p-1 2500 succeeded re_… replay=false`.
fn show(e: &LedgerEntry) -> String {
    format!(
        "{} {} {} {} {} replay={}",
        e.op,
        e.idempotency_key,
        e.amount,
        e.outcome,
        e.id.as_deref().unwrap_or("-"),
        e.replay
    )
}

/// A refund answer or stored refund, short: `re_… of 2500`.
fn refund_of(refund: &Value) -> String {
    format!(
        "{} of {}",
        refund["refundId"].as_str().unwrap_or("-"),
        refund["amount"]
    )
}

/// What the gateway did for one payment, from its ledger lines; checks the ledger on its own.
struct GatewayView<'a> {
    /// The charge it made (the first, if it made several).
    charge_id: Option<String>,
    declined: bool,
    refund: Option<&'a LedgerEntry>,
}

impl<'a> GatewayView<'a> {
    fn of(plan: &PaymentPlan, lines: &[&'a LedgerEntry], f: &mut Findings) -> Self {
        let id = plan.id.as_str();
        let acted = |op: &str, outcome: &str| -> Vec<&'a LedgerEntry> {
            lines
                .iter()
                .copied()
                .filter(|e| e.op == op && e.outcome == outcome && !e.replay)
                .collect()
        };
        let charged = acted("charge", "succeeded");
        let declined = acted("charge", "declined");
        let refunded = acted("refund", "succeeded");
        let ids = |lines: &[&LedgerEntry]| lines.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        for e in lines {
            let known = matches!(
                (e.op.as_str(), e.outcome.as_str()),
                ("charge", "succeeded" | "declined") | ("refund", "succeeded")
            );
            if !known {
                f.violation(id, format!("unexpected ledger line {}", show(e)));
            }
            if e.op == "charge" && e.amount != plan.amount as i64 {
                f.violation(
                    id,
                    format!(
                        "charged {} instead of {}: {}",
                        e.amount,
                        plan.amount,
                        show(e)
                    ),
                );
            }
        }
        if charged.len() > 1 {
            f.charged_twice += 1;
            f.violation(
                id,
                format!("CHARGED {} TIMES: {:?}", charged.len(), ids(&charged)),
            );
        }
        if refunded.len() > 1 {
            f.refunded_twice += 1;
            f.violation(
                id,
                format!("REFUNDED {} TIMES: {:?}", refunded.len(), ids(&refunded)),
            );
        }
        if declined.len() > 1 || (!declined.is_empty() && !charged.is_empty()) {
            f.violation(
                id,
                format!(
                    "the gateway decided the charge {} times ({} charged, {} declined)",
                    charged.len() + declined.len(),
                    charged.len(),
                    declined.len()
                ),
            );
        }
        let refund = refunded.first().copied();
        if let Some(r) = refund {
            if charged.is_empty() {
                f.violation(id, format!("refunded without a charge: {}", show(r)));
            }
            let asked = plan.refund_amounts();
            if r.amount <= 0 || r.amount > plan.amount as i64 {
                f.violation(
                    id,
                    format!(
                        "refund of {} outside the charge of {}",
                        r.amount, plan.amount
                    ),
                );
            } else if !asked.contains(&(r.amount as u64)) {
                f.violation(
                    id,
                    format!("refund of {} no client asked for ({asked:?})", r.amount),
                );
            }
        }
        Self {
            charge_id: charged.first().and_then(|e| e.id.clone()),
            declined: !declined.is_empty(),
            refund,
        }
    }
}

/// The audit of one payment: the gateway's ledger, the end state and what clients were told.
fn audit_payment(
    f: &mut Findings,
    plan: &PaymentPlan,
    log: &PaymentLog,
    end: &Answer,
    lines: &[&LedgerEntry],
    stored_refund: Option<&Value>,
) {
    let id = plan.id.as_str();
    let gw = GatewayView::of(plan, lines, f);

    // The end state, as GetPayment tells it, against the ledger.
    let payment = match end {
        Answer::Ok(p) => p,
        other => {
            f.other_status += 1;
            f.violation(id, format!("final GetPayment: {other:?}"));
            return;
        }
    };
    let status = payment["status"].as_str().unwrap_or("?");
    let charge_id = payment["chargeId"].as_str().map(str::to_owned);
    match status {
        "completed" => f.completed += 1,
        "failed" => f.failed += 1,
        "refunded" => f.refunded += 1,
        _ => f.other_status += 1,
    }
    if payment["amount"] != json!(plan.amount) || payment["customerId"] != json!(plan.customer) {
        f.violation(id, format!("the payment is not what was asked: {payment}"));
    }
    match status {
        "completed" | "refunded" if gw.charge_id.is_none() => {
            f.violation(id, format!("{status} but the gateway never charged it"))
        }
        "completed" | "refunded" if charge_id != gw.charge_id => f.violation(
            id,
            format!(
                "chargeId {charge_id:?} is not the gateway's {:?}",
                gw.charge_id
            ),
        ),
        "completed" | "refunded" => {}
        "failed" => {
            if gw.charge_id.is_some() {
                f.violation(
                    id,
                    format!("FAILED BUT CHARGED ({:?}): money taken", gw.charge_id),
                );
            }
            if !gw.declined {
                f.violation(id, "failed without a decline from the gateway".into());
            }
            if charge_id.is_some() {
                f.violation(id, format!("failed with a chargeId: {payment}"));
            }
        }
        _ => f.violation(id, format!("ended {status:?}: {payment}")),
    }
    if status != "failed" && gw.charge_id.is_none() && gw.declined {
        f.violation(id, format!("declined by the gateway but {status}"));
    }

    // The refund: ledger ⇔ status ⇔ stored refund.
    match (status == "refunded", gw.refund, stored_refund) {
        (true, None, _) => f.violation(id, "refunded but no refund in the ledger".into()),
        (false, Some(r), _) => f.violation(
            id,
            format!("{status} but the gateway refunded: {}", show(r)),
        ),
        (true, Some(_), None) => f.violation(id, "refunded without a stored refund".into()),
        (true, Some(r), Some(s)) => {
            if s["refundId"].as_str() != r.id.as_deref() || s["amount"] != json!(r.amount) {
                f.violation(
                    id,
                    format!(
                        "stored refund {} is not the gateway's {}",
                        refund_of(s),
                        show(r)
                    ),
                );
            }
        }
        (false, None, Some(s)) => f.violation(id, format!("{status} with a stored refund {s}")),
        (false, None, None) => {}
    }

    // What the clients were told.
    let told = if status == "failed" {
        "failed"
    } else {
        "completed"
    };
    let mut fresh = 0;
    for answer in &log.creates {
        match answer {
            Answer::Ok(a) => {
                fresh += usize::from(a["message"] != "Payment already processed");
                if a["status"] != told || a["chargeId"].as_str().map(str::to_owned) != charge_id {
                    f.violation(
                        id,
                        format!("a client was told {a}; the payment is {status}, {charge_id:?}"),
                    );
                }
            }
            Answer::Refused(code, body) => {
                f.violation(id, format!("CreatePayment refused: HTTP {code} {body}"))
            }
            Answer::Silent(last) => f.violation(
                id,
                format!("a CreatePayment client got no answer before the deadline: {last}"),
            ),
        }
    }
    if fresh > 1 {
        f.violation(
            id,
            format!("{fresh} clients were told the payment was processed now"),
        );
    }
    for (asked, answer) in &log.refunds {
        match answer {
            Answer::Ok(a) => {
                let as_ledger = gw.refund.is_some_and(|r| {
                    a["refundId"].as_str() == r.id.as_deref() && a["amount"] == json!(r.amount)
                });
                if !as_ledger || stored_refund != Some(a) {
                    f.violation(
                        id,
                        format!(
                            "a refund client (amount {asked:?}) was told {}; the gateway \
                             refunded {}, the state holds {}",
                            refund_of(a),
                            gw.refund.map_or("nothing".into(), |r| format!(
                                "{} of {}",
                                r.id.as_deref().unwrap_or("-"),
                                r.amount
                            )),
                            stored_refund.map_or("nothing".into(), refund_of),
                        ),
                    );
                }
            }
            Answer::Refused(409, _) if status == "failed" => {}
            Answer::Refused(code, body) => f.violation(
                id,
                format!("RefundPayment ({asked:?}) answered HTTP {code} {body}, payment {status}"),
            ),
            Answer::Silent(last) => f.violation(
                id,
                format!("a RefundPayment client got no answer before the deadline: {last}"),
            ),
        }
    }
    match &log.get {
        None => {}
        Some(Answer::Ok(seen)) => {
            let settled = matches!(
                seen["status"].as_str(),
                Some("completed" | "failed" | "refunded")
            );
            if !settled || seen["chargeId"].as_str().map(str::to_owned) != charge_id {
                f.violation(
                    id,
                    format!("GetPayment after the create showed {seen}, the end is {payment}"),
                );
            }
        }
        Some(other) => f.violation(id, format!("GetPayment after the create: {other:?}")),
    }
}

/// The whole audit: the ledger, every payment, the invocations, the kills.
fn audit(
    p: &Params,
    plans: &[PaymentPlan],
    logs: &[PaymentLog],
    end: &EndState,
    chaos: &ChaosLog,
) -> Findings {
    let mut f = Findings::default();
    let mut by_payment: HashMap<&str, Vec<&LedgerEntry>> = HashMap::new();
    let mut seen_keys = BTreeSet::new();
    for e in &end.ledger {
        by_payment.entry(&e.payment_id).or_default().push(e);
        f.reexecuted += usize::from(!seen_keys.insert(e.idempotency_key.as_str()));
        f.replays += usize::from(e.replay);
        f.ledger_charges += usize::from(e.op == "charge");
        f.ledger_refunds += usize::from(e.op == "refund");
    }
    for (i, plan) in plans.iter().enumerate() {
        let lines = by_payment.remove(plan.id.as_str()).unwrap_or_default();
        let stored_refund = end.stored_refunds.get(&plan.id);
        audit_payment(
            &mut f,
            plan,
            &logs[i],
            &end.finals[i],
            &lines,
            stored_refund,
        );
    }
    for id in by_payment.keys() {
        f.violation(id, "the gateway saw a payment no client asked for".into());
    }

    for row in &end.unfinished {
        let key = row["target_service_key"].as_str().unwrap_or("?");
        f.violation(key, format!("invocation left unfinished: {row}"));
    }
    let status_of: HashMap<&str, &str> = plans
        .iter()
        .zip(&end.finals)
        .filter_map(|(plan, answer)| match answer {
            Answer::Ok(p) => Some((plan.id.as_str(), p["status"].as_str()?)),
            _ => None,
        })
        .collect();
    for row in &end.failed_invocations {
        let key = row["target_service_key"].as_str().unwrap_or("?");
        let handler = row["target_handler_name"].as_str().unwrap_or("?");
        let failure = row["completion_failure"].as_str().unwrap_or("?");
        if key.starts_with(PROBE_PREFIX) && handler == "GetPayment" && failure.starts_with("[404]")
        {
            f.probe_404s += 1; // wait_serving's probes
            continue;
        }
        // The only other failure allowed: refusing to refund a failed payment.
        if handler == "RefundPayment"
            && failure.starts_with("[409]")
            && status_of.get(key) == Some(&"failed")
        {
            f.expected_409s += 1;
        } else {
            f.violation(
                key,
                format!("invocation {handler} ended with a failure: {failure}"),
            );
        }
    }

    if let Some(e) = &chaos.error {
        f.violations.push(format!("chaos: {e}"));
    }
    if chaos.service_kills == 0 || chaos.server_kills < p.server_kills {
        f.violations.push(format!(
            "chaos: {} service and {} server kills happened, {} server kills were planned",
            chaos.service_kills, chaos.server_kills, p.server_kills
        ));
    }
    f
}

// ---- the run ---------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let params = match parse_args(&args) {
        Ok(Cli::Run(p)) => p,
        Ok(Cli::Help) => {
            println!("{USAGE}");
            return;
        }
        Ok(Cli::List) => {
            println!("{TEST_NAME}: test");
            return;
        }
        Ok(Cli::FilteredOut) => {
            println!("crash: 0 passed, 0 failed (filtered out)");
            return;
        }
        Err(e) => {
            eprintln!("crash: {e} (--help lists the options)");
            println!("crash: 0 passed, 1 failed");
            std::process::exit(2);
        }
    };
    let began = Instant::now();
    let passed = match run(&params) {
        Ok(passed) => passed,
        Err(e) => {
            process::keep_temp_dirs();
            println!("crash: the run could not be carried out: {e:#}");
            false
        }
    };
    println!(
        "crash: seed {} ({:.1} s); replay: {}",
        params.seed,
        began.elapsed().as_secs_f64(),
        params.replay_command()
    );
    if passed {
        println!("crash: 1 passed, 0 failed");
    } else {
        println!("crash: 0 passed, 1 failed");
        std::process::exit(1);
    }
}

/// How the run went, for the summary.
struct Timings {
    /// From the last kill until every client had its answer.
    clients: Duration,
    /// From the last kill until no invocation was left unfinished.
    settled: Duration,
}

fn run(p: &Params) -> anyhow::Result<bool> {
    let plans = plan_payments(p);
    let kills = plan_kills(p);
    announce(p, &kills);

    let service_env = [
        ("GATEWAY_DELAY_MS", GATEWAY_DELAY_MS.to_string()),
        ("GATEWAY_RESPONSE_DELAY_MS", p.response_delay_ms.to_string()),
        ("GATEWAY_DECLINE_RATE", DECLINE_RATE.to_string()),
        ("GATEWAY_ERROR_RATE", "0".into()),
        (
            "GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS",
            p.ignore_keys.to_string(),
        ),
    ];
    let began = Instant::now();
    let stack = if p.cluster {
        Sut::Cluster(OwnedCluster::start(&service_env)?)
    } else {
        Sut::Single(OwnedStack::start(&service_env)?)
    };
    let serving = wait_sut_serving(&stack).context("the new stack does not serve")?;
    match &stack {
        Sut::Single(s) => println!(
            "crash: stack up (ingress {}, admin {}, service {}), serving after {} ms more, data \
             and logs in {}",
            s.app.ingress,
            s.app.admin,
            s.app.service_url,
            serving.as_millis(),
            s.dir.display()
        ),
        Sut::Cluster(c) => println!(
            "crash: cluster {} up in {:.1} s: {} nodes, replication {} (ingresses {}; admin APIs \
             {}), service {}, every node serving; data and logs in {}",
            c.cluster_name(),
            began.elapsed().as_secs_f64(),
            cluster::NODES,
            cluster::REPLICATION,
            c.ingress_urls().join(", "),
            c.admin_urls().join(", "),
            c.service_url,
            c.dir.display()
        ),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let load = Arc::new(Load {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(ATTEMPT_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .build()?,
        ingresses: stack.ingresses(),
        up: stack.up_flags(),
        counters: Counters::new(p.ingresses()),
        // Until the kills are over, clients never give up.
        deadline: Mutex::new(Instant::now() + Duration::from_secs(24 * 3600)),
    });

    // Load and kills, together.
    let t0 = Instant::now();
    let tasks: Vec<_> = plans
        .iter()
        .map(|plan| rt.spawn(run_payment(load.clone(), plan.clone(), t0)))
        .collect();
    let chaos = run_chaos(&stack, &kills, t0);
    let last_kill = Instant::now();
    let deadline = last_kill + p.recovery_timeout;
    load.set_deadline(deadline);
    if let Some(e) = &chaos.error {
        println!("crash: chaos stopped: {e}");
        stack
            .ensure_up()
            .context("bringing the stack back up after the chaos stopped")?;
    }

    // Recovery, by itself: first the clients (they retry until answered), then the invocations
    // nobody waits for any more.
    let logs = rt.block_on(wait_for_clients(tasks, &load.counters));
    let clients = last_kill.elapsed();
    let unfinished = wait_for_invocations(&stack, deadline.max(Instant::now()));
    let timings = Timings {
        clients,
        settled: last_kill.elapsed(),
    };

    let end = end_state(&stack, &rt, &load, &plans, unfinished)?;
    let findings = audit(p, &plans, &logs, &end, &chaos);
    summary(
        p,
        &plans,
        &logs,
        &load.counters,
        &chaos,
        &end,
        &findings,
        &timings,
    );

    let proved_something = findings.reexecuted > 0;
    if !proved_something {
        println!(
            "crash: FAIL: no gateway call was re-executed: no kill landed between the gateway \
             acting and the journal recording it, so this run proved nothing"
        );
    }
    let passed = findings.violations.is_empty() && proved_something;
    if !passed || p.keep {
        process::keep_temp_dirs();
        let _ = std::fs::write(
            stack.dir().join("violations.txt"),
            findings.violations.join("\n"),
        );
        dump_suspects(&stack, &findings.suspects, &end.ledger);
        let server_logs = if p.cluster {
            "node-1.log, node-2.log, node-3.log"
        } else {
            "restate-server.log"
        };
        println!(
            "crash: kept {} ({server_logs}, payment-service.log, gateway-ledger.jsonl, \
             violations.txt, suspects.txt, restate-data/)",
            stack.dir().display()
        );
    }
    stack.stop();
    Ok(passed)
}

fn announce(p: &Params, kills: &[Kill]) {
    let server_kills = kills.iter().filter(|k| k.target != Target::Service).count();
    let servers = if p.cluster {
        let order: Vec<String> = kills
            .iter()
            .filter_map(|k| match k.target {
                Target::Node(i) => Some(format!("node-{}", i + 1)),
                _ => None,
            })
            .collect();
        format!(
            "Restate nodes, one at a time: {}; on a {}-node cluster, replication {}, load across \
             the {} ingresses",
            order.join(", "),
            cluster::NODES,
            cluster::REPLICATION,
            cluster::NODES
        )
    } else {
        "restate-server".to_owned()
    };
    println!(
        "crash: {} run, seed {}: {} payments, kills for {:.0} s ({} of the service, {} of \
         {servers}), gateway delay {GATEWAY_DELAY_MS} ms + response delay {} ms, decline \
         rate {DECLINE_RATE}, idempotency keys {}",
        match (p.full, p.cluster) {
            (true, false) => "full",
            (false, false) => "small",
            (true, true) => "full cluster",
            (false, true) => "small cluster",
        },
        p.seed,
        p.payments,
        p.duration.as_secs_f64(),
        kills.len() - server_kills,
        server_kills,
        p.response_delay_ms,
        if p.ignore_keys {
            "IGNORED (GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS: this run must fail)"
        } else {
            "honoured"
        },
    );
}

/// Waits for every payment's clients, with a progress line every 10 s.
async fn wait_for_clients(
    tasks: Vec<tokio::task::JoinHandle<PaymentLog>>,
    counters: &Counters,
) -> Vec<PaymentLog> {
    let total = tasks.len();
    let mut logs = Vec::with_capacity(total);
    let mut progress = tokio::time::interval(Duration::from_secs(10));
    progress.tick().await;
    for task in tasks {
        tokio::pin!(task);
        loop {
            tokio::select! {
                log = &mut task => {
                    logs.push(log.expect("payment task panicked"));
                    break;
                }
                _ = progress.tick() => println!(
                    "crash: waiting for clients: {}/{total} payments done",
                    counters.payments_done.load(Ordering::Relaxed),
                ),
            }
        }
    }
    logs
}

/// Polls the admin SQL API until no PaymentService invocation is left unfinished, or until
/// `deadline`; returns those left. On a cluster, every node's admin API must say so, and say
/// the same number of invocations, twice in a row.
fn wait_for_invocations(stack: &Sut, deadline: Instant) -> Vec<Value> {
    let sql = format!(
        "SELECT id, target_service_key, target_handler_name, status, retry_count, last_failure, \
         last_failure_error_code FROM sys_invocation WHERE target_service_name = '{}' \
         AND status != 'completed' ORDER BY created_at",
        common::SERVICE
    );
    let count_sql = format!(
        "SELECT count(*) AS n FROM sys_invocation WHERE target_service_name = '{}'",
        common::SERVICE
    );
    let mut last_report = Instant::now();
    let mut last_count = None;
    loop {
        let rows = stack.agreed_query(&sql);
        if rows.as_ref().is_ok_and(Vec::is_empty) {
            let Sut::Cluster(_) = stack else {
                return Vec::new();
            };
            let count = stack.agreed_query(&count_sql).ok();
            if count.is_some() && count == last_count {
                return Vec::new();
            }
            last_count = count;
        } else {
            last_count = None;
        }
        if Instant::now() >= deadline {
            return rows.unwrap_or_else(|e| vec![json!({ "query failed": e })]);
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            match rows {
                Ok(rows) => println!("crash: waiting for {} invocations to finish", rows.len()),
                Err(e) => println!("crash: waiting for invocations to finish: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Reads the settled system: GetPayment of every payment, the stored refunds and the
/// invocations (admin SQL API), the gateway's ledger.
fn end_state(
    stack: &Sut,
    rt: &tokio::runtime::Runtime,
    load: &Load,
    plans: &[PaymentPlan],
    unfinished: Vec<Value>,
) -> anyhow::Result<EndState> {
    load.set_deadline(Instant::now() + Duration::from_secs(30));
    let finals = rt.block_on(async {
        let mut finals = Vec::with_capacity(plans.len());
        for plan in plans {
            let at = plan.ingresses.last().copied().unwrap_or(0);
            finals.push(load.call(&plan.id, "GetPayment", &json!({}), at).await);
        }
        finals
    });
    let query = |sql: String| stack.settled_query(&sql).map_err(anyhow::Error::msg);
    let service = common::SERVICE;
    let stored_refunds = query(format!(
        "SELECT service_key, value_utf8 FROM state WHERE service_name = '{service}' \
         AND key = 'refund'"
    ))?
    .into_iter()
    .filter_map(|row| {
        let key = row["service_key"].as_str()?.to_owned();
        let value = serde_json::from_str(row["value_utf8"].as_str()?).ok()?;
        Some((key, value))
    })
    .collect();
    let failed_invocations = query(format!(
        "SELECT target_service_key, target_handler_name, completion_failure FROM sys_invocation \
         WHERE target_service_name = '{service}' AND completion_result = 'failure'"
    ))?;
    let invocations = query(format!(
        "SELECT count(*) AS n FROM sys_invocation WHERE target_service_name = '{service}'"
    ))?
    .first()
    .and_then(|r| r["n"].as_u64())
    .unwrap_or(0) as usize;
    let (ledger, unreadable_ledger_lines) = read_ledger(stack.ledger());
    Ok(EndState {
        finals,
        stored_refunds,
        unfinished,
        failed_invocations,
        invocations,
        ledger,
        unreadable_ledger_lines,
    })
}

#[allow(clippy::too_many_arguments)]
fn summary(
    p: &Params,
    plans: &[PaymentPlan],
    logs: &[PaymentLog],
    c: &Counters,
    chaos: &ChaosLog,
    end: &EndState,
    f: &Findings,
    t: &Timings,
) {
    let creates: usize = plans.iter().map(|p| p.creates).sum();
    let refund_payments = plans.iter().filter(|p| !p.refunds.is_empty()).count();
    let refunds_planned: usize = plans.iter().map(|p| p.refunds.len()).sum();
    let refunds_sent: usize = logs.iter().map(|l| l.refunds.len()).sum();
    let duplicated_refunds = plans.iter().filter(|p| p.refunds.len() > 1).count();
    let partial_refunds = plans
        .iter()
        .filter(|p| matches!(p.refunds.first(), Some(Some(a)) if *a > 0 && *a < p.amount))
        .count();
    let unanswered = logs
        .iter()
        .flat_map(|l| {
            l.creates
                .iter()
                .chain(l.refunds.iter().map(|(_, a)| a))
                .chain(&l.get)
        })
        .filter(|a| matches!(a, Answer::Silent(_)))
        .count();
    let decline_customers = plans
        .iter()
        .filter(|p| p.customer.starts_with("decline-"))
        .count();
    let transient = c
        .transient
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();

    let row = |k: &str, v: String| println!("  {k:<28} {v}");
    println!();
    println!(
        "crash: summary ({} run{}, seed {})",
        if p.full { "full" } else { "small" },
        if p.cluster { ", 3-node cluster" } else { "" },
        p.seed
    );
    row(
        "payments",
        format!(
            "{} ({decline_customers} of decline- customers, decline rate {DECLINE_RATE})",
            plans.len()
        ),
    );
    row(
        "CreatePayment calls",
        format!(
            "{creates} ({} concurrent duplicates, 2-3 per payment ID)",
            creates - plans.len()
        ),
    );
    row(
        "RefundPayment calls",
        format!(
            "{refunds_sent} of {refunds_planned} planned, for {refund_payments} payments \
             ({duplicated_refunds} duplicated, {partial_refunds} partial)"
        ),
    );
    row(
        "client retries",
        format!(
            "{} of {} HTTP attempts (connection errors {}, timeouts {}, transient statuses {:?})",
            c.retries.load(Ordering::Relaxed),
            c.attempts.load(Ordering::Relaxed),
            c.connection_errors.load(Ordering::Relaxed),
            c.timeouts.load(Ordering::Relaxed),
            transient
        ),
    );
    row("calls left without answer", unanswered.to_string());
    if p.cluster {
        let per = |v: &[AtomicU64]| {
            v.iter()
                .enumerate()
                .map(|(i, n)| format!("node-{} {}", i + 1, n.load(Ordering::Relaxed)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        row(
            "ingresses: attempts",
            format!(
                "{} ({} retries went to another ingress)",
                per(&c.attempts_by_ingress),
                c.moved.load(Ordering::Relaxed)
            ),
        );
        row("ingresses: final answers", per(&c.answers_by_ingress));
        let nodes = chaos
            .node_kills
            .iter()
            .enumerate()
            .map(|(i, n)| format!("node-{} {n}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        row(
            "kills (SIGKILL + restart)",
            format!(
                "payment-service {}, Restate nodes {} ({nodes}; never two down at once)",
                chaos.service_kills, chaos.server_kills
            ),
        );
    } else {
        row(
            "kills (SIGKILL + restart)",
            format!(
                "payment-service {}, restate-server {}",
                chaos.service_kills, chaos.server_kills
            ),
        );
    }
    row(
        "gateway calls received",
        format!(
            "{} (charges {}, refunds {}; unreadable lines {})",
            end.ledger.len(),
            f.ledger_charges,
            f.ledger_refunds,
            end.unreadable_ledger_lines.len()
        ),
    );
    row(
        "gateway calls re-executed",
        format!(
            "{} (key seen again; answered as replays: {})",
            f.reexecuted, f.replays
        ),
    );
    row(
        "charged / refunded twice",
        format!("{} / {} payments", f.charged_twice, f.refunded_twice),
    );
    row(
        "end states (GetPayment)",
        format!(
            "completed {}, failed {}, refunded {}, other {}",
            f.completed, f.failed, f.refunded, f.other_status
        ),
    );
    row(
        "invocations",
        format!(
            "{} PaymentService, {} not completed, {} failed ({} the 409 of refunding a \
             failed payment, {} the 404 of a readiness probe)",
            end.invocations,
            end.unfinished.len(),
            end.failed_invocations.len(),
            f.expected_409s,
            f.probe_404s
        ),
    );
    row(
        "recovery after last kill",
        format!(
            "clients answered in {:.1} s, invocations settled in {:.1} s",
            t.clients.as_secs_f64(),
            t.settled.as_secs_f64()
        ),
    );
    for line in &end.unreadable_ledger_lines {
        println!("  unreadable ledger line (a torn append?): {line}");
    }
    row("violations", f.violations.len().to_string());
    for v in f.violations.iter().take(MAX_PRINTED_VIOLATIONS) {
        println!("  VIOLATION {v}");
    }
    if f.violations.len() > MAX_PRINTED_VIOLATIONS {
        println!(
            "  ... and {} more (all in violations.txt)",
            f.violations.len() - MAX_PRINTED_VIOLATIONS
        );
    }
}

/// For the payments with a violation: their ledger lines, invocations and journals (admin SQL
/// `sys_journal`), in `suspects.txt`; the first few also on stdout, one line per invocation.
fn dump_suspects(stack: &Sut, suspects: &BTreeSet<String>, ledger: &[LedgerEntry]) {
    let mut file = String::new();
    for (n, id) in suspects.iter().enumerate() {
        let print = n < 3;
        let mut out = |line: String| {
            if print {
                println!("{line}");
            }
            file.push_str(&line);
            file.push('\n');
        };
        out(format!("crash: --- {id} ---"));
        for e in ledger.iter().filter(|e| &e.payment_id == id) {
            out(format!("  ledger  {}", show(e)));
        }
        let sql = format!(
            "SELECT i.id, i.target_handler_name, i.status, i.completion_result, j.index, \
             j.entry_type, j.name FROM sys_journal j JOIN sys_invocation i ON j.id = i.id \
             WHERE i.target_service_name = '{}' AND i.target_service_key = {} \
             ORDER BY i.created_at, j.id, j.index",
            common::SERVICE,
            sql_str(id)
        );
        let rows = match stack.query(&sql) {
            Ok(rows) => rows,
            Err(e) => {
                out(format!("  journal query failed: {e}"));
                continue;
            }
        };
        // One line per invocation: its entries in order, e.g. `Run(charge)`.
        let mut invocations: Vec<(String, String)> = Vec::new();
        for r in &rows {
            let inv = format!(
                "{} {} {}",
                r["id"].as_str().unwrap_or("?"),
                r["target_handler_name"].as_str().unwrap_or("?"),
                r["completion_result"]
                    .as_str()
                    .unwrap_or(r["status"].as_str().unwrap_or("?")),
            );
            let kind = r["entry_type"].as_str().unwrap_or("?");
            let kind = kind.strip_prefix("Command: ").unwrap_or(kind);
            let entry = match r["name"].as_str() {
                Some(name) if !name.is_empty() => format!("{kind}({name})"),
                _ => kind.to_owned(),
            };
            match invocations.last_mut() {
                Some((last, entries)) if *last == inv => {
                    entries.push_str(", ");
                    entries.push_str(&entry);
                }
                _ => invocations.push((inv, entry)),
            }
        }
        for (inv, entries) in invocations {
            out(format!("  journal {inv}: {entries}"));
        }
    }
    let _ = std::fs::write(stack.dir().join("suspects.txt"), file);
}
