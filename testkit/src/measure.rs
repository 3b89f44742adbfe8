//! `stackctl measure`: "What survives what", measured (README). Each scenario gets a fresh
//! [`Stack`] (the service's mock gateway at 0 ms and 0 declines, so that what is measured is
//! Restate, not the mock), CreatePayment load for new payment IDs through the load engine,
//! closed loop, `--concurrency` workers per ingress, and its faults done on the stack itself:
//!
//! | scenario   | what                                                                          |
//! |------------|-------------------------------------------------------------------------------|
//! | `steady`   | three nodes up: throughput and latency                                        |
//! | `single`   | the same load on one restate-server (`restate/restate.toml`) through its one ingress |
//! | `one-down` | SIGKILL node 2 at 20 s, start it again at 50 s; load until 140 s              |
//! | `two-down` | SIGKILL node 2 at 15 s and node 3 at 20 s (no quorum), start node 2 at 40 s, node 3 at 70 s; load until 100 s |
//! | `bench`    | the benchmark (`stackctl bench`'s standard mode) through node 1's ingress, the floor registered too |
//! | `bodies`   | not in the default five: one node; a 10 MB body and a 1 GiB slow one, through the ingress and to the service's port; memory before, during, after ([`crate::bodies`]) |
//! | `rss`      | not in the default five: one node; the service's resident memory every `--rss-every` payments up to `--payments`, with the in-process mock or (`--gateway-process`) `mock-gateway` ([`rss`]) |
//!
//! Every scenario but `bench`, `bodies` and `rss` ends with the verification: every payment acknowledged with 200
//! is there (GetPayment) with the same chargeId; every other request left no payment or a
//! completed one, never a pending one; the gateway's ledger charged no payment twice and every
//! acknowledged one once. Results: `.bench/cluster-<time>/<scenario>/` (`report.txt`,
//! `requests.jsonl`, the processes' logs).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use payment_service::gateway::MockConfig;
use serde_json::{Value, json};

use crate::bench::{self, BenchArgs, Report};
use crate::bodies;
use crate::client::{CREATE, CallError, GET, PaymentClient, is_not_found};
use crate::ledger::{LedgerOp, LedgerOutcome, read_ledger};
use crate::load::{self, ClosedLoop, Latency, Outcome, Record, Run};
use crate::paths;
use crate::process::lock;
use crate::stack::Stack;

mod rss;

const CREATE_BODY: &str =
    r#"{"amount":10000,"currency":"USD","description":"cluster load","customerId":"cust-cluster"}"#;
/// Workers of the verification's GetPayment calls.
const VERIFY_CONCURRENCY: usize = 32;
/// Before the verification: the invocations still running finish.
const VERIFY_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Steady,
    Single,
    OneDown,
    TwoDown,
    Bench,
    Bodies,
    Rss,
}

/// Options of `stackctl measure`.
#[derive(Debug, clap::Args)]
pub struct MeasureArgs {
    /// Scenarios to run, each on a fresh stack [default: all five but bodies].
    #[arg(value_enum)]
    pub scenarios: Vec<Scenario>,
    /// Load workers per ingress.
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds of measured load of steady and single.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds of unrecorded warm-up load before steady and single.
    #[arg(long, default_value_t = 5.0)]
    pub warmup: f64,
    /// Multiplies the times of one-down's and two-down's faults and their load's length (e.g.
    /// 0.25 for a quick run: one-down kills at 5 s).
    #[arg(long, default_value_t = 1.0)]
    pub time_factor: f64,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Seconds a worker waits after a failed request.
    #[arg(long, default_value_t = 0.1)]
    pub error_pause: f64,
    /// Skip the verification (GetPayment of every payment tried, the ledger).
    #[arg(long)]
    pub no_verify: bool,
    /// Seconds the verification waits for ingress 1 to serve requests.
    #[arg(long, default_value_t = 120)]
    pub verify_wait: u64,
    /// The bench scenario: seconds per scenario (`stackctl bench --duration`).
    #[arg(long, default_value_t = 15)]
    pub bench_duration: u64,
    /// The bench scenario: floor / CreatePayment rounds (each side `--bench-duration` long).
    #[arg(long, default_value_t = 2)]
    pub bench_rounds: u32,
    /// The bench scenario: seconds per concurrency-1 scenario (0 skips them).
    #[arg(long, default_value_t = 10)]
    pub bench_latency_duration: u64,
    /// The bodies scenario: KiB per chunk of the slow bodies.
    #[arg(long, default_value_t = 64)]
    pub body_chunk_kib: usize,
    /// The bodies scenario: milliseconds between the slow bodies' chunks.
    #[arg(long, default_value_t = 10)]
    pub body_pace_ms: u64,
    /// The rss scenario: CreatePayment requests to send (fresh IDs).
    #[arg(long, default_value_t = 100_000)]
    pub payments: u64,
    /// The rss scenario: a line every this many completed payments.
    #[arg(long, default_value_t = 10_000)]
    pub rss_every: u64,
    /// The rss scenario: the gateway as the `mock-gateway` process (the service with
    /// `--gateway stripe` against it) instead of the in-process mock.
    #[arg(long)]
    pub gateway_process: bool,
    /// The service binary to run instead of this build's (e.g. an older build, to compare).
    #[arg(long)]
    pub service_bin: Option<std::path::PathBuf>,
    /// Runs restate-server with its stock settings instead of restate/restate.toml and
    /// restate/cluster/cluster.toml (e.g. its 32 MiB ingress body limit).
    #[arg(long)]
    pub stock_restate: bool,
}

/// `stackctl measure`: the scenarios, one after the other; an error names those that failed.
pub fn run(args: MeasureArgs) -> anyhow::Result<()> {
    let scenarios = if args.scenarios.is_empty() {
        vec![
            Scenario::Steady,
            Scenario::Single,
            Scenario::OneDown,
            Scenario::TwoDown,
            Scenario::Bench,
        ]
    } else {
        args.scenarios.clone()
    };
    let root = paths::repo_root().join(format!(".bench/cluster-{}", bench::timestamp()));
    let mut failed = Vec::new();
    for scenario in scenarios {
        let name = scenario_name(scenario);
        eprintln!("\n[measure] === scenario {name} ===");
        let dir = root.join(name);
        if let Err(e) = run_scenario(&args, scenario, &dir) {
            eprintln!("[measure] {name} failed: {e:#}");
            failed.push(name);
        }
    }
    eprintln!("\n[measure] results in {}/", root.display());
    anyhow::ensure!(failed.is_empty(), "failed: {}", failed.join(", "));
    Ok(())
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Steady => "steady",
        Scenario::Single => "single",
        Scenario::OneDown => "one-down",
        Scenario::TwoDown => "two-down",
        Scenario::Bench => "bench",
        Scenario::Bodies => "bodies",
        Scenario::Rss => "rss",
    }
}

/// A fault, done on the stack at a time of the load.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL a node (refused while another is down).
    Kill(usize),
    /// SIGKILL a node while another is down: the cluster loses its quorum.
    KillSecond(usize),
    /// Start a node again; done once it serves.
    Start(usize),
}

impl Fault {
    fn label(self) -> String {
        match self {
            Fault::Kill(i) | Fault::KillSecond(i) => format!("kill node-{}", i + 1),
            Fault::Start(i) => format!("start node-{}", i + 1),
        }
    }

    fn apply(self, stack: &Stack) -> anyhow::Result<()> {
        match self {
            Fault::Kill(i) => stack.kill_node(i).map(drop),
            Fault::KillSecond(i) => {
                stack.kill_node_unchecked(i);
                Ok(())
            }
            Fault::Start(i) => stack.start_node(i).map(drop),
        }
    }
}

fn run_scenario(args: &MeasureArgs, scenario: Scenario, dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.gateway_process || scenario == Scenario::Rss,
        "--gateway-process is for the rss scenario"
    );
    let nodes = if matches!(
        scenario,
        Scenario::Single | Scenario::Bodies | Scenario::Rss
    ) {
        1
    } else {
        3
    };
    let mut builder = Stack::builder()
        .nodes(nodes)
        .gateway(MockConfig {
            delay: Duration::ZERO,
            decline_rate: 0.0,
            ..MockConfig::default()
        })
        .dir(dir);
    if scenario == Scenario::Bench {
        builder = builder.extra_service(bench::floor()?);
    }
    if scenario == Scenario::Rss {
        // The keys in memory, no fsync per call, as the benchmark runs the gateway.
        builder = builder.without_ledger();
        if args.gateway_process {
            builder = builder.gateway_process();
        }
    }
    if let Some(bin) = &args.service_bin {
        builder = builder.service_bin(bin);
    }
    if args.stock_restate {
        builder = builder.config(None);
    }
    let stack = builder.start()?;
    eprintln!(
        "[measure] {} node(s) ready in {}; load average {:?}",
        nodes,
        dir.display(),
        load::machine().loadavg.unwrap_or_default()
    );
    let t = |s: f64| s * args.time_factor;
    let result = match scenario {
        Scenario::Steady | Scenario::Single => {
            let concurrency = args.concurrency * if nodes == 1 { 3 } else { 1 };
            let warmup = Plan::new(args, concurrency, args.warmup, vec![]);
            drive(&stack, &warmup, "warmup");
            let plan = Plan::new(args, concurrency, args.duration, vec![]);
            measure(&stack, args, &plan, dir)
        }
        Scenario::OneDown => {
            let events = vec![(t(20.0), Fault::Kill(1)), (t(50.0), Fault::Start(1))];
            measure(
                &stack,
                args,
                &Plan::new(args, args.concurrency, t(140.0), events),
                dir,
            )
        }
        Scenario::TwoDown => {
            let events = vec![
                (t(15.0), Fault::Kill(1)),
                (t(20.0), Fault::KillSecond(2)),
                (t(40.0), Fault::Start(1)),
                (t(70.0), Fault::Start(2)),
            ];
            measure(
                &stack,
                args,
                &Plan::new(args, args.concurrency, t(100.0), events),
                dir,
            )
        }
        Scenario::Bench => {
            let bench_args = BenchArgs {
                config: "cluster".into(),
                concurrency: 64,
                duration: args.bench_duration,
                rounds: args.bench_rounds,
                // Rounds as long as the other scenarios, as the README's cluster table measured
                // them (2 x 15 s).
                round_duration: args.bench_duration,
                latency_duration: args.bench_latency_duration,
                warmup: 3,
                gateway_duration: 0,
                scale: false,
                preload: 0,
                keep: false,
                timeout: 30,
                compare: None,
            };
            bench::run_on(&stack, &bench_args, "cluster", dir).map(drop)
        }
        Scenario::Rss => rss::measure(&stack, args, dir),
        Scenario::Bodies => {
            let bodies_args = bodies::BodiesArgs {
                chunk: args.body_chunk_kib * 1024,
                pace: Duration::from_millis(args.body_pace_ms),
                timeout: Duration::from_secs(args.timeout.max(300)),
            };
            bodies::measure(&stack, &bodies_args).and_then(|report| {
                println!("{report}");
                std::fs::write(dir.join("report.txt"), report).context("writing report.txt")
            })
        }
    };
    drop(stack);
    let data = dir.join("restate-data");
    let _ = std::fs::remove_dir_all(data);
    result
}

/// One load run: how many workers per ingress, how long, which faults when.
struct Plan {
    concurrency: usize,
    duration: f64,
    events: Vec<(f64, Fault)>,
    timeout: Duration,
    error_pause: Duration,
}

impl Plan {
    fn new(
        args: &MeasureArgs,
        concurrency: usize,
        duration: f64,
        events: Vec<(f64, Fault)>,
    ) -> Self {
        Self {
            concurrency,
            duration,
            events,
            timeout: Duration::from_secs(args.timeout),
            error_pause: Duration::from_secs_f64(args.error_pause),
        }
    }
}

/// A fault as it happened, in seconds since the start of the load.
struct Event {
    started: f64,
    done: f64,
    label: String,
    error: Option<String>,
}

/// What a load run left: the requests, the faults, the CPU split, first error bodies.
struct Driven {
    prefix: String,
    ingresses: usize,
    urls: Vec<String>,
    run: Run,
    events: Vec<Event>,
    cpu: CpuSplit,
    /// The first answer body of each error kind: (when, ingress, body).
    samples: BTreeMap<String, (f64, usize, String)>,
}

impl Driven {
    fn end(&self, plan: &Plan) -> f64 {
        self.run.elapsed.as_secs_f64().max(plan.duration)
    }
}

/// What the load's requests tell while it runs: progress, and the first body of each error.
struct Tally {
    t0: Instant,
    prefix: String,
    ingresses: usize,
    client: PaymentClient,
    answered: AtomicU64,
    /// Since the last progress line.
    ok: AtomicU64,
    samples: Mutex<BTreeMap<String, (f64, usize, String)>>,
}

impl Tally {
    fn since(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Request `n` of `worker`: a new payment through the worker's ingress.
    async fn request(self: Arc<Self>, worker: usize, n: u64) -> load::Sent {
        let ingress = worker % self.ingresses;
        let key = format!(
            "{}-{}-{}-{n}",
            self.prefix,
            ingress + 1,
            worker / self.ingresses
        );
        let (outcome, body) = create(&self.client, ingress, &key).await;
        self.answered.fetch_add(1, Ordering::Relaxed);
        match (&outcome, body) {
            (Outcome::Ok { .. }, _) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            (Outcome::Error(kind), Some(body)) => {
                let at = (self.since(), ingress + 1, body);
                lock(&self.samples).entry(kind.clone()).or_insert(at);
            }
            _ => {}
        }
        Some((key, ingress, outcome))
    }

    fn progress(&self) {
        let n = self.answered.load(Ordering::Relaxed);
        let ok = self.ok.swap(0, Ordering::Relaxed);
        eprintln!(
            "[load] t={:5.1}s  {n} requests answered, {:.0} ok/s in the last 5 s",
            self.since(),
            ok as f64 / 5.0
        );
    }

    /// Does `fault` at `at` seconds of the load.
    fn fault(&self, stack: &Stack, at: f64, fault: Fault) -> Event {
        let due = self.t0 + Duration::from_secs_f64(at);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let started = self.since();
        let error = fault.apply(stack).err().map(|e| format!("{e:#}"));
        let done = self.since();
        let failed = error.as_deref().map(|e| format!("  FAILED: {e}"));
        eprintln!(
            "[load] t={started:6.2}s..{done:.2}s  {}{}",
            fault.label(),
            failed.unwrap_or_default()
        );
        Event {
            started,
            done,
            label: fault.label(),
            error,
        }
    }
}

/// The load, the faults at their times (each on a thread of its own, as a node's start takes
/// as long as it takes), a progress line every 5 s and the CPU split, all at once.
fn drive(stack: &Stack, plan: &Plan, prefix: &str) -> Driven {
    let prefix = format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let ingresses = stack.node_count();
    eprintln!(
        "[load] {ingresses} ingress(es) x {} workers, {:.0}s, IDs {prefix}-*",
        plan.concurrency, plan.duration
    );
    let tally = Arc::new(Tally {
        t0: Instant::now(),
        prefix: prefix.clone(),
        ingresses,
        client: stack.client().with_timeout(plan.timeout),
        answered: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        samples: Mutex::new(BTreeMap::new()),
    });
    let spec = ClosedLoop {
        workers: plan.concurrency * ingresses,
        duration: Duration::from_secs_f64(plan.duration),
        limit: None,
        error_pause: plan.error_pause,
    };
    let done = AtomicBool::new(false);
    let mut cpu = CpuSplit::default();
    let (run, mut events) = std::thread::scope(|scope| {
        let faults: Vec<_> = plan
            .events
            .iter()
            .map(|&(at, fault)| {
                let tally = &tally;
                scope.spawn(move || tally.fault(stack, at, fault))
            })
            .collect();
        let (cpu, done, progress) = (&mut cpu, &done, &tally);
        scope.spawn(move || cpu.sample(stack, done, || progress.progress()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let requests = Arc::clone(&tally);
        let run = rt.block_on(load::closed_loop(spec, &[], move |worker, n| {
            Arc::clone(&requests).request(worker, n)
        }));
        done.store(true, Ordering::SeqCst);
        let events: Vec<Event> = faults
            .into_iter()
            .map(|f| f.join().expect("a fault thread panicked"))
            .collect();
        (run, events)
    });
    events.sort_by(|a, b| a.started.total_cmp(&b.started));
    let samples = lock(&tally.samples).clone();
    Driven {
        prefix,
        ingresses,
        urls: stack.ingress_urls(),
        run,
        events,
        cpu,
        samples,
    }
}

/// One CreatePayment, one attempt: `Ok` with the chargeId when answered `completed`, else an
/// error kind (`HTTP 503`, `timeout`, `200-pending`, ...) and the answer's first 300 bytes.
async fn create(client: &PaymentClient, ingress: usize, key: &str) -> (Outcome, Option<String>) {
    let body = Some(Bytes::from_static(CREATE_BODY.as_bytes()));
    match client.call_raw(ingress, key, CREATE, body, &[]).await {
        Ok((200, answer)) => match answer["status"].as_str() {
            Some("completed") => {
                let charge = answer["chargeId"].as_str().map(str::to_owned);
                (Outcome::Ok { detail: charge }, None)
            }
            status => (
                Outcome::Error(format!("200-{}", status.unwrap_or("unexpected"))),
                Some(clip(&answer.to_string())),
            ),
        },
        Ok((status, answer)) => (
            Outcome::Error(format!("HTTP {status}")),
            Some(clip(&answer.to_string())),
        ),
        Err(e) => {
            // A transient HTTP answer's body (e.g. an ingress's 404); none for a broken connection.
            let body = match &e {
                CallError::Silent(last) => last
                    .strip_prefix("HTTP ")
                    .and_then(|rest| rest.split_once(": "))
                    .map(|(_, body)| clip(body)),
                CallError::Unexpected(answer) => Some(clip(answer)),
            };
            (Outcome::Error(e.kind()), body)
        }
    }
}

fn clip(text: &str) -> String {
    text.chars().take(300).collect()
}

/// Where the machine's CPU went during a load, sampled every second: the stack's processes
/// (whatever their pids are at the time: restarted nodes get new ones), this driver, and
/// everything else.
#[derive(Debug, Default)]
struct CpuSplit {
    stack: f64,
    driver: f64,
    machine: f64,
    seconds: f64,
}

impl CpuSplit {
    fn sample(&mut self, stack: &Stack, done: &AtomicBool, mut progress: impl FnMut()) {
        let pids = || -> Vec<u32> {
            (0..stack.node_count())
                .filter_map(|i| stack.node_pid(i))
                .chain(stack.service_pid())
                .collect()
        };
        let snapshot = || {
            let stack_cpu: HashMap<u32, f64> = pids()
                .into_iter()
                .filter_map(|p| Some((p, load::cpu_seconds(p)?)))
                .collect();
            (
                Instant::now(),
                load::machine_busy_seconds(),
                load::cpu_seconds(std::process::id()),
                stack_cpu,
            )
        };
        let mut prev = snapshot();
        for tick in 1u64.. {
            std::thread::sleep(Duration::from_secs(1));
            if done.load(Ordering::SeqCst) {
                break;
            }
            let cur = snapshot();
            if let ((_, Some(m0), Some(d0), _), (_, Some(m1), Some(d1), _)) = (&prev, &cur) {
                self.machine += m1 - m0;
                self.driver += d1 - d0;
                self.seconds += cur.0.duration_since(prev.0).as_secs_f64();
                // Only processes seen both times: a node killed or started meanwhile counts
                // from its next second.
                self.stack += cur
                    .3
                    .iter()
                    .filter_map(|(p, c)| Some(c - prev.3.get(p)?))
                    .sum::<f64>();
            }
            prev = cur;
            if tick % 5 == 0 {
                progress();
            }
        }
    }

    fn line(&self) -> String {
        if self.seconds == 0.0 {
            return "cpu: not measured".into();
        }
        let cores = |s: f64| s / self.seconds;
        let other = (self.machine - self.stack - self.driver).max(0.0);
        format!(
            "cpu during the load ({} cores): machine busy {:.2} cores = cluster (nodes + service) \
             {:.2} + this driver {:.2} + other processes {:.2}",
            load::machine().cpus,
            cores(self.machine),
            cores(self.stack),
            cores(self.driver),
            cores(other)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// A measured run: load, verification, report

fn measure(stack: &Stack, args: &MeasureArgs, plan: &Plan, dir: &Path) -> anyhow::Result<()> {
    let driven = drive(stack, plan, "load");
    let found = if args.no_verify {
        None
    } else {
        std::thread::sleep(VERIFY_DELAY);
        eprintln!(
            "[load] checking {} payment IDs with GetPayment",
            driven.run.records.len()
        );
        verify(stack, &driven.run, Duration::from_secs(args.verify_wait))
    };
    let mut report = Report::default();
    let command: Vec<String> = std::env::args().collect();
    report.line(format!("{}\n", command.join(" ")));
    report_load(&mut report, &driven, plan);
    let mut problems = 0;
    if !args.no_verify {
        problems += match &found {
            Some(found) => report_verification(&mut report, &driven.run, found),
            None => {
                report.line("verification: NOT DONE (the ingress did not serve requests)");
                1
            }
        };
        problems += report_ledger(
            &mut report,
            &driven,
            stack
                .ledger()
                .context("the measurements check the gateway's ledger")?,
        )?;
    }
    problems += driven.events.iter().filter(|e| e.error.is_some()).count();
    report.save(&dir.join("report.txt"))?;
    write_requests(&dir.join("requests.jsonl"), &driven.run, found.as_ref())?;
    eprintln!(
        "[measure] load average at the end {:?}",
        load::machine().loadavg.unwrap_or_default()
    );
    anyhow::ensure!(
        problems == 0,
        "{problems} problems (see {})",
        dir.join("report.txt").display()
    );
    Ok(())
}

/// What GetPayment says of a payment after the run: its status and chargeId, `absent` (the
/// handler's 404), `http-<status>` or `unreachable`.
type Found = HashMap<String, (String, Option<String>)>;

/// GetPayment of every ID tried, through ingress 1, retried while the answer is transient;
/// `None` if ingress 1 does not serve requests within `wait`.
fn verify(stack: &Stack, run: &Run, wait: Duration) -> Option<Found> {
    let client = PaymentClient::new(vec![stack.ingress_url(0)]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    client.retry_until(Some(Instant::now() + wait));
    let probe = "verify-probe";
    let served = rt.block_on(client.call_raw(0, probe, GET, Some(Bytes::from_static(b"{}")), &[]));
    if !matches!(&served, Ok((404, body)) if is_not_found(body, probe)) {
        eprintln!(
            "[load] {} does not serve requests after {wait:?}; no verification",
            stack.ingress_url(0)
        );
        return None;
    }
    // A restarted node may still be loading; give each payment as long again.
    client.retry_until(Some(Instant::now() + wait));
    let ids: Arc<Vec<String>> = Arc::new(run.records.iter().map(|r| r.key.clone()).collect());
    let found = Arc::new(Mutex::new(Found::new()));
    let spec = ClosedLoop {
        workers: VERIFY_CONCURRENCY,
        duration: Duration::from_secs(24 * 3600),
        limit: Some(ids.len() as u64),
        error_pause: Duration::ZERO,
    };
    let get = {
        let found = found.clone();
        move |_, n: u64| {
            let (client, found, ids) = (client.clone(), found.clone(), ids.clone());
            async move {
                let id = ids.get(n as usize)?.clone();
                let now = match client
                    .call_raw(0, &id, GET, Some(Bytes::from_static(b"{}")), &[])
                    .await
                {
                    Ok((200, p)) => (
                        p["status"].as_str().unwrap_or("?").to_owned(),
                        p["chargeId"].as_str().map(str::to_owned),
                    ),
                    Ok((404, _)) => ("absent".to_owned(), None),
                    Ok((status, _)) => (format!("http-{status}"), None),
                    Err(_) => ("unreachable".to_owned(), None),
                };
                lock(&found).insert(id.clone(), now);
                Some((id, 0, Outcome::Ok { detail: None }))
            }
        }
    };
    rt.block_on(load::closed_loop(spec, &[], get));
    let found = lock(&found).clone();
    Some(found)
}

fn fmt_ms(ms: f64) -> String {
    if ms.is_nan() {
        "-".into()
    } else {
        format!("{ms:.0}")
    }
}

/// Seconds since the start of the load.
fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn kinds<'a>(records: impl Iterator<Item = &'a Record>) -> BTreeMap<String, u64> {
    let mut errors = BTreeMap::new();
    for r in records {
        *errors.entry(outcome_label(r)).or_default() += 1;
    }
    errors
}

/// `200` or the error kind.
fn outcome_label(r: &Record) -> String {
    match &r.outcome {
        Outcome::Ok { .. } => "200".into(),
        Outcome::Error(kind) => kind.clone(),
    }
}

fn report_load(report: &mut Report, d: &Driven, plan: &Plan) {
    let recs = &d.run.records;
    report.line(format!(
        "requests: {}, duration {:.0}s, {} workers per ingress, {} ingress(es), timeout {}s",
        recs.len(),
        plan.duration,
        plan.concurrency,
        d.ingresses,
        plan.timeout.as_secs()
    ));
    report.line(d.cpu.line());
    report.line("");
    report_phases(report, d, plan);
    report_windows(report, d, plan);
    report_timeline(report, d);
    report_outages(report, d);
}

fn report_phases(report: &mut Report, d: &Driven, plan: &Plan) {
    report.line("per phase (requests by start time; latency of answered requests, ms):");
    report.line(format!(
        "{:34} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>7}  errors by kind",
        "phase", "ingress", "ok", "errors", "ok/s", "p50", "p99", "max"
    ));
    let mut cuts = vec![0.0];
    cuts.extend(d.events.iter().map(|e| e.done));
    cuts.push(d.end(plan));
    let labels: Vec<String> = std::iter::once("start".to_owned())
        .chain(d.events.iter().map(|e| e.label.clone()))
        .collect();
    for k in 0..cuts.len() - 1 {
        let (a, b) = (cuts[k], cuts[k + 1]);
        let label: String = format!("{a:5.1}-{b:5.1}s after {}", labels[k])
            .chars()
            .take(34)
            .collect();
        let in_phase = |r: &&Record| (a..b).contains(&secs(r.start));
        for ingress in std::iter::once(None).chain((0..d.ingresses).map(Some)) {
            let rs: Vec<&Record> = d
                .run
                .records
                .iter()
                .filter(in_phase)
                .filter(|r| ingress.is_none_or(|i| r.ingress == i))
                .collect();
            let ok: Vec<&Record> = rs.iter().copied().filter(|r| r.outcome.is_ok()).collect();
            let errors = kinds(rs.iter().copied().filter(|r| !r.outcome.is_ok()));
            let lat = Latency::of(ok.iter().map(|r| r.latency()));
            report.line(format!(
                "{:34} {:>7} {:>7} {:>7} {:>7.0} {:>6} {:>6} {:>7}  {}",
                if ingress.is_none() {
                    label.as_str()
                } else {
                    ""
                },
                ingress.map_or("all".into(), |i| (i + 1).to_string()),
                ok.len(),
                errors.values().sum::<u64>(),
                ok.len() as f64 / (b - a).max(1e-9),
                fmt_ms(lat.ms(0.5)),
                fmt_ms(lat.ms(0.99)),
                fmt_ms(lat.ms(1.0)),
                if errors.is_empty() {
                    String::new()
                } else {
                    format!("{errors:?}")
                },
            ));
        }
    }
    report.line("");
}

fn report_windows(report: &mut Report, d: &Driven, plan: &Plan) {
    report.line("per 10 s (requests by start time, all ingresses; latency of 200s, ms):");
    report.line(format!(
        "{:>10} {:>6} {:>7} {:>6} {:>6} {:>7}",
        "window", "ok/s", "errors", "p50", "p99", "max"
    ));
    let (mut w, end) = (0.0, d.end(plan));
    while w < end {
        // The last window may be shorter: its rate over its own length.
        let span = (end - w).min(10.0);
        let rs: Vec<&Record> = d
            .run
            .records
            .iter()
            .filter(|r| (w..w + 10.0).contains(&secs(r.start)))
            .collect();
        let lat = Latency::of(rs.iter().filter(|r| r.outcome.is_ok()).map(|r| r.latency()));
        report.line(format!(
            "{w:4.0}-{:3.0}s {:6.0} {:7} {:>6} {:>6} {:>7}",
            w + 10.0,
            lat.count() as f64 / span,
            rs.len() as u64 - lat.count(),
            fmt_ms(lat.ms(0.5)),
            fmt_ms(lat.ms(0.99)),
            fmt_ms(lat.ms(1.0)),
        ));
        w += 10.0;
    }
    report.line("");
}

fn report_timeline(report: &mut Report, d: &Driven) {
    report.line("timeline (by completion second; per ingress: ok/errors p99 ms):");
    let secs_total = d
        .run
        .records
        .iter()
        .map(|r| secs(r.end) as usize + 1)
        .max()
        .unwrap_or(0);
    // [second][ingress] -> records
    let mut grid: Vec<Vec<Vec<&Record>>> = vec![vec![Vec::new(); d.ingresses]; secs_total];
    for r in &d.run.records {
        grid[secs(r.end) as usize][r.ingress].push(r);
    }
    let mut header = String::from("   t  ");
    for i in 0..d.ingresses {
        let _ = write!(header, "{:>20}  ", format!("ingress {}", i + 1));
    }
    report.line(header.trim_end());
    for (s, cells) in grid.iter().enumerate() {
        let mut line = format!("{s:4}  ");
        for cell in cells {
            let ok: Vec<&&Record> = cell.iter().filter(|r| r.outcome.is_ok()).collect();
            let p99 = Latency::of(ok.iter().map(|r| r.latency())).ms(0.99);
            let text = format!(
                "{:>5}/{:<4} p99 {:>5}",
                ok.len(),
                cell.len() - ok.len(),
                fmt_ms(p99)
            );
            let _ = write!(line, "{text:>20}  ");
        }
        let here: Vec<&str> = d
            .events
            .iter()
            .filter(|e| e.done as usize == s)
            .map(|e| e.label.as_str())
            .collect();
        let mut line = line.trim_end().to_owned();
        if !here.is_empty() {
            let _ = write!(line, "   <- {}", here.join(", "));
        }
        report.line(line);
    }
    report.line("");
}

fn report_outages(report: &mut Report, d: &Driven) {
    report.line("per ingress: failures and the longest time without a successful answer:");
    let ended = secs(d.run.elapsed);
    for i in 0..d.ingresses {
        let mut rs: Vec<&Record> = d.run.records.iter().filter(|r| r.ingress == i).collect();
        rs.sort_by_key(|r| r.end);
        let errs: Vec<&Record> = rs.iter().copied().filter(|r| !r.outcome.is_ok()).collect();
        let (mut gap, mut gap_at, mut prev) = (0.0, 0.0, 0.0);
        let oks = rs.iter().filter(|r| r.outcome.is_ok()).map(|r| secs(r.end));
        for t in oks.chain([ended]) {
            if t - prev > gap {
                (gap, gap_at) = (t - prev, prev);
            }
            prev = t;
        }
        let slowest = rs
            .iter()
            .filter(|r| r.outcome.is_ok())
            .map(|r| secs(r.latency()))
            .fold(0.0, f64::max);
        let tail = format!(
            "longest gap without a 200: {gap:.2}s from t={gap_at:.2}s; slowest 200: {:.0} ms",
            slowest * 1000.0
        );
        let name = format!("ingress {} ({})", i + 1, d.urls[i]);
        if errs.is_empty() {
            report.line(format!("  {name}: no failures; {tail}"));
        } else {
            let from = errs
                .iter()
                .map(|r| secs(r.start))
                .fold(f64::INFINITY, f64::min);
            let to = errs.iter().map(|r| secs(r.end)).fold(0.0, f64::max);
            report.line(format!(
                "  {name}: {} failed requests, from t={from:.2}s to t={to:.2}s {:?}; {tail}",
                errs.len(),
                kinds(errs.iter().copied())
            ));
        }
    }
    for (kind, (t, ingress, body)) in &d.samples {
        report.line(format!(
            "  first {kind} (t={t:.2}s, ingress {ingress}): {body}"
        ));
    }
    // Requests in flight across each event: started before it, answered after it.
    for e in &d.events {
        let inflight: Vec<&Record> = d
            .run
            .records
            .iter()
            .filter(|r| secs(r.start) < e.started && secs(r.end) > e.done)
            .collect();
        let longest = inflight
            .iter()
            .map(|r| secs(r.latency()))
            .fold(0.0, f64::max);
        report.line(format!(
            "  in flight across '{}' (t={:.2}s): {} requests, outcomes {:?}{}",
            e.label,
            e.started,
            inflight.len(),
            kinds(inflight.iter().copied()),
            if inflight.is_empty() {
                String::new()
            } else {
                format!(", answered after up to {longest:.2}s")
            }
        ));
        if let Some(error) = &e.error {
            report.line(format!("  '{}' FAILED: {error}", e.label));
        }
    }
    report.line("");
}

/// The verification of the answers; the number of problems.
fn report_verification(report: &mut Report, run: &Run, found: &Found) -> usize {
    let now = |r: &Record| found.get(&r.key).cloned().unwrap_or(("?".into(), None));
    let acked: Vec<&Record> = run.records.iter().filter(|r| r.outcome.is_ok()).collect();
    let lost: Vec<&&Record> = acked.iter().filter(|r| now(r).0 != "completed").collect();
    let changed: Vec<&&Record> = acked
        .iter()
        .filter(|r| matches!(&r.outcome, Outcome::Ok { detail } if now(r).1 != *detail))
        .collect();
    let others: Vec<&Record> = run.records.iter().filter(|r| !r.outcome.is_ok()).collect();
    let mut fate: BTreeMap<String, u64> = BTreeMap::new();
    for r in &others {
        *fate.entry(now(r).0).or_default() += 1;
    }
    let half: Vec<&&Record> = others
        .iter()
        .filter(|r| !["completed", "absent"].contains(&now(r).0.as_str()))
        .collect();
    report.line("verification (GetPayment of every ID tried, after the run):");
    report.line(format!(
        "  acknowledged (200): {}; present and completed: {}; LOST: {}; chargeId differs: {}",
        acked.len(),
        acked.len() - lost.len(),
        lost.len(),
        changed.len()
    ));
    report.line(format!(
        "  not acknowledged (errors, timeouts): {}; now {fate:?}; neither completed nor absent: {}",
        others.len(),
        half.len()
    ));
    for r in lost.iter().chain(&changed).chain(&half).take(10) {
        report.line(format!(
            "    {}: answered {}, now {:?}",
            r.key,
            outcome_label(r),
            now(r)
        ));
    }
    lost.len() + changed.len() + half.len()
}

/// The gateway's ledger: no payment of this run charged twice, none acknowledged and never
/// charged; the number of problems.
fn report_ledger(report: &mut Report, d: &Driven, ledger: &Path) -> anyhow::Result<usize> {
    let read = read_ledger(ledger).with_context(|| format!("reading {}", ledger.display()))?;
    let ours = format!("charge:{}-", d.prefix);
    let mut charges: HashMap<&str, u64> = HashMap::new();
    for e in &read.entries {
        if e.op == LedgerOp::Charge
            && e.idempotency_key.starts_with(&ours)
            && e.outcome == LedgerOutcome::Succeeded
            && !e.replay
        {
            *charges.entry(e.payment_id.as_str()).or_default() += 1;
        }
    }
    let doubles = charges.values().filter(|&&n| n > 1).count();
    let uncharged = d
        .run
        .records
        .iter()
        .filter(|r| r.outcome.is_ok() && !charges.contains_key(r.key.as_str()))
        .count();
    report.line(format!(
        "gateway ledger: {} charges for {} payments of this run; charged twice: {doubles}; \
         acknowledged but never charged: {uncharged}",
        charges.values().sum::<u64>(),
        charges.len()
    ));
    Ok(doubles + uncharged)
}

/// Every request, one JSON line each: ID, ingress (1-based), start and end (s), outcome (200
/// or the error kind), chargeId, and what GetPayment said afterwards.
fn write_requests(path: &Path, run: &Run, found: Option<&Found>) -> anyhow::Result<()> {
    let mut out = String::new();
    for r in &run.records {
        let outcome = match &r.outcome {
            Outcome::Ok { .. } => json!(200),
            Outcome::Error(kind) => json!(kind),
        };
        let charge = match &r.outcome {
            Outcome::Ok { detail } => json!(detail),
            Outcome::Error(_) => Value::Null,
        };
        let line = json!({
            "id": r.key,
            "ingress": r.ingress + 1,
            "start": (secs(r.start) * 1e4).round() / 1e4,
            "end": (secs(r.end) * 1e4).round() / 1e4,
            "outcome": outcome,
            "chargeId": charge,
            "now": found.and_then(|f| f.get(&r.key)).map(|(s, c)| json!([s, c])),
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}
