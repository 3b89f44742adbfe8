//! `stackctl bench`: the performance benchmark (README "Performance"). Each configuration gets
//! a fresh [`Stack`] (one restate-server, payment-service with the mock gateway at 0 ms and 0
//! declines, and the floor, `bench-floor`), driven through the ingress by the load engine,
//! closed loop (each of `--concurrency` workers sends its next request when the last one is
//! answered). Results go to `.bench/<time>-<config>[-scale]/`: `summary.json`, `report.txt`
//! and the processes' logs.
//!
//! Standard mode, in order: a short warm-up; the floor (`BenchFloor/<fresh id>/Create`) and
//! `CreatePayment` on fresh IDs, alternated `--rounds` times so that both see the same machine;
//! duplicate `CreatePayment` and `GetPayment` on the payments just created; `RefundPayment`,
//! once per created payment; then at concurrency 1: the floor, the floor's duplicate and read,
//! duplicate `CreatePayment` and `GetPayment`. Then, on a second fresh stack whose gateway is
//! the `mock-gateway` process (the service with `--gateway stripe` against it, at 0 ms and 0
//! declines, its database in memory): a warm-up, `CreatePayment` on fresh IDs for
//! `--gateway-duration` seconds, and at concurrency 1; its figures (req/s, p50, p99, the
//! service's and the gateway's CPU per payment) are printed beside the in-process ones and kept
//! in the summary's `mock_gateway`; they are reported, not checked against a target. Scale
//! mode: `CreatePayment` and `GetPayment` on an empty server, then again once `--preload`
//! payments are stored, each measurement started once restate-server is idle.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use payment_service::gateway::MockConfig;
use serde_json::{Value, json};

use crate::client::{PaymentClient, encode_key};
use crate::load::{self, ClosedLoop, Latency, Outcome, ProcUsage, Run};
use crate::paths;
use crate::stack::{ExtraService, Stack};

mod gateway;
use gateway::gateway_process_side;

// Targets (issue 4).
const TARGET_CREATE_VS_FLOOR: f64 = 0.95;
const TARGET_P50_VS_FLOOR: f64 = 1.10;
const TARGET_P99_LOADED_VS_EMPTY: f64 = 1.25;
const TARGET_RSS_MB: f64 = 30.0;

const CREATE_BODY: &str =
    r#"{"amount":10000,"currency":"USD","description":"benchmark","customerId":"cust-bench"}"#;
const REFUND_BODY: &str = r#"{"reason":"benchmark","amount":10000}"#;
const EMPTY_BODY: &str = "{}";
const PAYMENTS: &str = "PaymentService";
const FLOOR: &str = "BenchFloor";

/// Options of `stackctl bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// restate-server settings: tuned (`restate/restate.toml`), stock (Restate's defaults, no
    /// configuration file), both (tuned, then stock, each on a fresh stack, then a
    /// comparison), or a FILE.toml.
    #[arg(long, default_value = "tuned")]
    pub config: String,
    /// Concurrent requests (closed loop: one connection per worker).
    #[arg(long, short = 'c', default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds each scenario runs, except the floor / CreatePayment rounds.
    #[arg(long, short = 'd', default_value_t = 10)]
    pub duration: u64,
    /// Floor / CreatePayment rounds, in ABBA order.
    #[arg(long, default_value_t = 40)]
    pub rounds: u32,
    /// Seconds each side runs per floor / CreatePayment round. Short rounds, many of them:
    /// restate-server's flushes and compactions last seconds, and with short rounds each one
    /// falls on both sides instead of on whichever ran a 10-second round.
    #[arg(long, default_value_t = 2)]
    pub round_duration: u64,
    /// Seconds each concurrency-1 latency scenario runs (0 skips them).
    #[arg(long, default_value_t = 10)]
    pub latency_duration: u64,
    /// Seconds of unrecorded warm-up load on the floor and on CreatePayment.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Standard mode: seconds of CreatePayment (at `--concurrency`) on the second stack, whose
    /// gateway is the `mock-gateway` process; 0 skips that stack.
    #[arg(long, default_value_t = 20)]
    pub gateway_duration: u64,
    /// Scale mode: p99 on an empty server vs with `--preload` payments stored.
    #[arg(long)]
    pub scale: bool,
    /// Scale mode: payments stored before the second measurement.
    #[arg(long, default_value_t = 100_000)]
    pub preload: u64,
    /// Keep Restate's data folder (default: deleted at the end).
    #[arg(long)]
    pub keep: bool,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Compare two JSON summaries (e.g. tuned and stock) and exit.
    #[arg(long, num_args = 2, value_names = ["A_JSON", "B_JSON"])]
    pub compare: Option<Vec<PathBuf>>,
}

/// `stackctl bench`: every configuration asked for, each on a fresh stack.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(paths) = &args.compare {
        return compare(&paths[0], &paths[1]);
    }
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let configs: Vec<(String, Option<PathBuf>)> = match args.config.as_str() {
        "tuned" => vec![("tuned".into(), Some(paths::single_node_config()))],
        "stock" => vec![("stock".into(), None)],
        "both" => vec![
            ("tuned".into(), Some(paths::single_node_config())),
            ("stock".into(), None),
        ],
        file if file.ends_with(".toml") => {
            let file = std::fs::canonicalize(file).with_context(|| format!("--config {file}"))?;
            let name = file.file_stem().unwrap_or_default().to_string_lossy();
            vec![(name.into_owned(), Some(file))]
        }
        other => bail!("--config must be tuned, stock, both or a .toml file, not {other:?}"),
    };
    let stamp = timestamp();
    let suffix = if args.scale { "-scale" } else { "" };
    let mut summaries = Vec::new();
    for (name, config) in configs {
        let out = paths::repo_root().join(format!(".bench/{stamp}-{name}{suffix}"));
        run_config(&args, &name, config, &out)?;
        summaries.push(out.join("summary.json"));
    }
    if let [tuned, stock] = summaries.as_slice() {
        println!();
        println!("tuned vs stock (gain = tuned / stock):");
        compare(tuned, stock)?;
    }
    for s in &summaries {
        eprintln!("[bench] results: {}", s.display());
    }
    Ok(())
}

/// One configuration on a fresh stack whose data and logs go to `out`.
fn run_config(
    args: &BenchArgs,
    label: &str,
    config: Option<PathBuf>,
    out: &Path,
) -> anyhow::Result<()> {
    eprintln!("[bench] [{label}] starting the stack in {}", out.display());
    let stack = Stack::builder()
        .config(config.clone())
        .gateway(MockConfig {
            delay: Duration::ZERO,
            decline_rate: 0.0,
            ..MockConfig::default()
        })
        .extra_service(floor()?)
        // As the floor: no fsync per call (the service's own work is what is measured).
        .without_ledger()
        .dir(out)
        .start()?;
    let m = load::machine();
    eprintln!(
        "[bench] [{label}] stack ready; {} CPUs, load average {:?}",
        m.cpus,
        m.loadavg.unwrap_or_default()
    );
    let result = run_on(&stack, args, label, out);
    drop(stack);
    remove_data(args, out);
    let summary = result?;
    if !args.scale && args.gateway_duration > 0 {
        gateway_process_side(args, label, config, out, summary)?;
    }
    Ok(())
}

/// Restate's data folder of a stack in `out` (unless `--keep`), once the stack is down.
fn remove_data(args: &BenchArgs, out: &Path) {
    let data = out.join("restate-data");
    eprintln!(
        "[bench] restate data: {:.1} MB",
        dir_bytes(&data) as f64 / 1e6
    );
    if !args.keep {
        let _ = std::fs::remove_dir_all(&data);
    }
}

/// The floor as an extra deployment of a stack (`BENCH_FLOOR_BIN`, or the build's own).
pub fn floor() -> anyhow::Result<ExtraService> {
    Ok(ExtraService {
        name: "bench-floor".into(),
        bin: paths::workspace_bin("BENCH_FLOOR_BIN", "bench-floor")?,
        args: Vec::new(),
        version: None,
        register: true,
    })
}

/// Runs the benchmark (`args.scale`: the scale mode) through ingress 1 of a running `stack`
/// with the floor as its first extra deployment; prints the report and writes it to
/// `out/report.txt`, the summary to `out/summary.json`, and returns the summary.
pub fn run_on(stack: &Stack, args: &BenchArgs, label: &str, out: &Path) -> anyhow::Result<Value> {
    std::fs::create_dir_all(out)?;
    let pids = sampled_pids([
        ("service", stack.service_pid()),
        ("floor", stack.extra_pid(0)),
        ("server", stack.node_pid(0)),
    ])?;
    let ingress = stack.ingress_url(0);
    let mut bench = Bench {
        client: PaymentClient::new(vec![ingress.clone()])
            .with_timeout(Duration::from_secs(args.timeout)),
        pids,
        args,
        id: format!("b{:x}", unix_millis()),
        report: Report::default(),
    };
    bench.report.line(format!(
        "payments bench{}: mode {}, concurrency {}, {} s per scenario, ingress {ingress}",
        if label.is_empty() {
            String::new()
        } else {
            format!(" [{label}]")
        },
        if args.scale { "Scale" } else { "Standard" },
        args.concurrency,
        args.duration,
    ));
    let started = unix_millis() / 1000;
    // One thread, as a load client of its own: its CPU is measured apart from the stack's.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        if args.scale {
            bench.scale().await
        } else {
            bench.standard().await
        }
    });
    let mut summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            bench.report.save(&out.join("report.txt"))?;
            return Err(e);
        }
    };
    summary["label"] = json!(label);
    summary["note"] = json!(note(stack));
    summary["started_unix"] = json!(started);
    summary["machine"] = machine_json();
    summary["settings"] = json!({
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "round_duration_s": args.round_duration,
        "latency_duration_s": args.latency_duration,
        "warmup_s": args.warmup,
        "preload": args.preload,
        "ingress": ingress,
    });
    let text = serde_json::to_string_pretty(&summary)?;
    bench.report.line("");
    bench.report.line("JSON summary:");
    bench.report.line(&text);
    bench.report.save(&out.join("report.txt"))?;
    let json_path = out.join("summary.json");
    std::fs::write(&json_path, format!("{text}\n"))
        .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!("JSON summary written to {}", json_path.display());
    Ok(summary)
}

/// Lines printed as they come and kept for the report file.
#[derive(Debug, Default)]
pub(crate) struct Report(String);

impl Report {
    pub(crate) fn line(&mut self, line: impl Display) {
        println!("{line}");
        self.0.push_str(&format!("{line}\n"));
    }

    /// Keeps a line for the report file without printing it (it was printed already).
    pub(crate) fn keep(&mut self, line: impl Display) {
        self.0.push_str(&format!("{line}\n"));
    }

    pub(crate) fn text(&self) -> &str {
        &self.0
    }

    pub(crate) fn save(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, &self.0).with_context(|| format!("writing {}", path.display()))
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Which keys a scenario calls.
#[derive(Clone)]
enum Keys {
    /// A new key per request: `<prefix>-<n>`; the ones answered as expected are the run's
    /// [`Run::ok_keys`].
    Fresh(String),
    /// Keys of the pool, picked at random (uniformly).
    Random(Arc<Vec<String>>),
    /// Each key of the pool once, in order; the scenario ends when they run out.
    Once(Arc<Vec<String>>),
}

impl Keys {
    /// The key of request `n` (`None`: none left).
    fn pick(&self, n: u64) -> Option<String> {
        match self {
            Keys::Fresh(prefix) => Some(format!("{prefix}-{n}")),
            Keys::Random(pool) => Some(pool[(mix(n) % pool.len() as u64) as usize].clone()),
            Keys::Once(pool) => pool.get(n as usize).cloned(),
        }
    }
}

/// splitmix64: request numbers to well-spread pseudo-random numbers, for picking keys.
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Clone)]
struct Scenario {
    name: String,
    object: &'static str,
    handler: &'static str,
    body: &'static str,
    keys: Keys,
    concurrency: usize,
    /// Stop after this long (at the latest)...
    duration: Duration,
    /// ...or after this many requests.
    limit: Option<u64>,
    /// A 2xx answer must contain this, or it counts as an error.
    expect: &'static str,
}

/// What one scenario measured.
struct Measured {
    name: String,
    concurrency: usize,
    run: Run,
    /// Of every request, answered as expected or not.
    latency: Latency,
}

impl Measured {
    fn new(name: impl Into<String>, concurrency: usize, run: Run) -> Self {
        let latency = run.latency(|_| true);
        Self {
            name: name.into(),
            concurrency,
            run,
            latency,
        }
    }

    fn proc(&self, role: &str) -> Option<&ProcUsage> {
        self.run.usage.of(role)
    }

    /// The handler's process: the floor for floor scenarios, payment-service otherwise.
    fn app(&self) -> Option<&ProcUsage> {
        self.proc(if self.name.starts_with("floor") {
            "floor"
        } else {
            "service"
        })
    }

    /// CPU time per answered request of everything the request needs: restate-server, the
    /// handler's process and this client, µs. When the machine is the limit, throughput is
    /// inversely proportional to it; unlike req/s, it barely moves when other processes
    /// compete for the cores.
    fn stack_cpu_us(&self) -> f64 {
        let cpu: f64 = [self.proc("server"), self.app(), self.proc("client")]
            .into_iter()
            .flatten()
            .map(|p| p.cpu_seconds)
            .sum();
        cpu * 1e6 / self.run.ok().max(1) as f64
    }

    fn other_cores(&self) -> f64 {
        self.run.usage.other_cores()
    }

    fn to_json(&self) -> Value {
        let secs = self.run.elapsed.as_secs_f64().max(1e-9);
        let ok = self.run.ok().max(1) as f64;
        let procs: serde_json::Map<String, Value> = self
            .run
            .usage
            .processes
            .iter()
            .map(|p| {
                let usage = json!({
                    "cpu_seconds": round3(p.cpu_seconds),
                    "cpu_us_per_request": round1(p.cpu_seconds * 1e6 / ok),
                    "cpu_cores": round3(p.cpu_seconds / secs),
                    "rss_max_mb": p.rss_max_kb.map(kb_to_mb),
                });
                (p.role.clone(), usage)
            })
            .collect();
        let l = &self.latency;
        json!({
            "name": self.name,
            "concurrency": self.concurrency,
            "requests_ok": self.run.ok(),
            "errors": self.run.error_count(),
            "error_kinds": self.run.errors(),
            "seconds": round3(self.run.elapsed.as_secs_f64()),
            "throughput_rps": round1(self.run.throughput()),
            "latency_ms": {
                "p50": round3(l.ms(0.50)),
                "p90": round3(l.ms(0.90)),
                "p99": round3(l.ms(0.99)),
                "max": round3(l.ms(1.0)),
                "mean": round3(l.mean_ms()),
            },
            "processes": procs,
            "other_processes_cpu_cores": round3(self.other_cores()),
            "stack_cpu_us_per_request": round1(self.stack_cpu_us()),
        })
    }
}

struct Bench<'a> {
    client: PaymentClient,
    pids: Vec<(&'static str, u32)>,
    args: &'a BenchArgs,
    /// Prefix of this run's payment IDs.
    id: String,
    report: Report,
}

impl Bench<'_> {
    /// A scenario at `--concurrency` for `--duration`.
    fn scenario(
        &self,
        name: impl Into<String>,
        (object, handler, body): (&'static str, &'static str, &'static str),
        keys: Keys,
        expect: &'static str,
    ) -> Scenario {
        Scenario {
            name: name.into(),
            object,
            handler,
            body,
            keys,
            concurrency: self.args.concurrency,
            duration: Duration::from_secs(self.args.duration),
            limit: None,
            expect,
        }
    }

    /// CreatePayment on fresh IDs `<run>-<prefix>-<n>`, each answered `completed`.
    fn create_fresh(&self, name: impl Into<String>, prefix: &str) -> Scenario {
        let keys = Keys::Fresh(format!("{}-{prefix}", self.id));
        self.scenario(name, CREATE, keys, "\"completed\"")
    }

    /// The floor's Create on fresh IDs, for one round.
    fn floor_fresh(&self, name: impl Into<String>, prefix: &str) -> Scenario {
        let keys = Keys::Fresh(format!("{}-{prefix}", self.id));
        Scenario {
            duration: Duration::from_secs(self.args.round_duration),
            ..self.scenario(name, FLOOR_CREATE, keys, "completed")
        }
    }

    async fn run(&self, scenario: &Scenario) -> Measured {
        let spec = ClosedLoop {
            workers: scenario.concurrency,
            duration: scenario.duration,
            limit: scenario.limit,
            error_pause: Duration::ZERO,
        };
        let shared = Arc::new(scenario.clone());
        let client = self.client.clone();
        let run = load::closed_loop(spec, &self.pids, move |_, n| {
            let (s, client) = (Arc::clone(&shared), client.clone());
            async move {
                let key = s.keys.pick(n)?;
                let outcome = call(&client, &s, &key).await;
                Some((key, 0, outcome))
            }
        })
        .await;
        Measured::new(&scenario.name, scenario.concurrency, run)
    }

    /// Runs and prints a row.
    async fn row(&mut self, scenario: &Scenario) -> Measured {
        let m = self.run(scenario).await;
        self.print_row(&m);
        m
    }

    /// Waits until restate-server is idle: below 0.1 core over a second, i.e. done with the
    /// flushes and compactions of the load before, so that a measurement starts on a server
    /// that carries its data and not the last minute's write backlog. Gives up after 120 s.
    async fn settle(&mut self, at: &str) {
        let Some(&(_, pid)) = self.pids.iter().find(|(role, _)| *role == "server") else {
            return;
        };
        let start = Instant::now();
        let mut before = load::cpu_seconds(pid);
        while start.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = load::cpu_seconds(pid);
            if let (Some(a), Some(b)) = (before, now)
                && b - a < 0.1
            {
                break;
            }
            before = now;
        }
        let waited = start.elapsed().as_secs_f64();
        self.report
            .line(format!("restate-server idle after {waited:.1} s ({at})"));
    }

    fn hwm_kb(&self, role: &str) -> Option<u64> {
        let &(_, pid) = self.pids.iter().find(|(r, _)| *r == role)?;
        load::status_kb(pid).map(|(_, hwm)| hwm)
    }
}

const CREATE: (&str, &str, &str) = (PAYMENTS, "CreatePayment", CREATE_BODY);
const GET: (&str, &str, &str) = (PAYMENTS, "GetPayment", EMPTY_BODY);
const REFUND: (&str, &str, &str) = (PAYMENTS, "RefundPayment", REFUND_BODY);
const FLOOR_CREATE: (&str, &str, &str) = (FLOOR, "Create", CREATE_BODY);
const FLOOR_GET: (&str, &str, &str) = (FLOOR, "Get", EMPTY_BODY);

/// One request of a scenario: one attempt, answered as expected or an error kind.
async fn call(client: &PaymentClient, s: &Scenario, key: &str) -> Outcome {
    let body = Some(Bytes::from_static(s.body.as_bytes()));
    let answer = client
        .call_object_raw(0, s.object, &encode_key(key), key, s.handler, body, &[])
        .await;
    match answer {
        Ok((status, body)) => {
            let text = match &body {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if !(200..300).contains(&status) {
                Outcome::Error(format!("HTTP {status}: {}", clip(&text, 120)))
            } else if !text.contains(s.expect) {
                Outcome::Error(format!("unexpected answer: {}", clip(&text, 120)))
            } else {
                Outcome::Ok { detail: None }
            }
        }
        Err(e) => Outcome::Error(e.kind()),
    }
}

fn clip(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

// ---------------------------------------------------------------------------------------------
// Standard mode

/// What the standard mode measured, for its checks and summary.
struct Standard {
    rows: Vec<Measured>,
    floor_rounds: Vec<Measured>,
    create_rounds: Vec<Measured>,
    c1: BTreeMap<&'static str, Measured>,
}

impl Bench<'_> {
    async fn standard(&mut self) -> anyhow::Result<Value> {
        self.warm_up().await?;
        self.print_header();
        let (floor_rounds, create_rounds) = self.abba_rounds().await;
        let created: Arc<Vec<String>> =
            Arc::new(create_rounds.iter().flat_map(|m| m.run.ok_keys()).collect());
        let floor_keys: Arc<Vec<String>> =
            Arc::new(floor_rounds.iter().flat_map(|m| m.run.ok_keys()).collect());
        if created.is_empty() || floor_keys.is_empty() {
            bail!("no payment was created; see the errors above");
        }
        let merged = |name: &str, rounds: &[Measured]| {
            let concurrency = rounds.first().map_or(0, |m| m.concurrency);
            Measured::new(name, concurrency, Run::merge(rounds.iter().map(|m| &m.run)))
        };
        let mut rows = vec![
            merged("floor", &floor_rounds),
            merged("create fresh", &create_rounds),
        ];
        // The other handlers, on the payments just created: a refund takes each payment once.
        let others = [
            (
                "create duplicate",
                CREATE,
                Keys::Random(created.clone()),
                "already processed",
            ),
            ("get", GET, Keys::Random(created.clone()), "\"completed\""),
            ("refund", REFUND, Keys::Once(created.clone()), "refundId"),
        ];
        for (name, call, keys, expect) in others {
            let s = self.scenario(name, call, keys, expect);
            rows.push(self.row(&s).await);
        }
        let c1 = self.concurrency_one(&created, &floor_keys).await;
        let results = Standard {
            rows,
            floor_rounds,
            create_rounds,
            c1,
        };
        Ok(self.standard_summary(&results))
    }

    async fn warm_up(&mut self) -> anyhow::Result<()> {
        if self.args.warmup == 0 {
            return Ok(());
        }
        eprintln!(
            "warm-up: {} s on the floor and on CreatePayment",
            self.args.warmup
        );
        for s in [
            self.floor_fresh("warm-up floor", "wf"),
            self.create_fresh("warm-up create", "wc"),
        ] {
            let s = Scenario {
                duration: Duration::from_secs(self.args.warmup),
                ..s
            };
            let m = self.run(&s).await;
            if m.run.ok() == 0 {
                bail!(
                    "warm-up '{}': no request succeeded; errors: {:?}",
                    s.name,
                    m.run.errors()
                );
            }
        }
        Ok(())
    }

    /// Alternated floor, create / create, floor (ABBA): whichever goes second in a round runs
    /// on a server that holds a little more data and is still compacting the first's writes.
    async fn abba_rounds(&mut self) -> (Vec<Measured>, Vec<Measured>) {
        let (mut floor_rounds, mut create_rounds) = (Vec::new(), Vec::new());
        for round in 1..=self.args.rounds {
            let floor_first = round % 2 == 1;
            for floor_turn in [floor_first, !floor_first] {
                if floor_turn {
                    let s =
                        self.floor_fresh(format!("floor (round {round})"), &format!("f{round}"));
                    floor_rounds.push(self.row(&s).await);
                } else {
                    let s = Scenario {
                        duration: Duration::from_secs(self.args.round_duration),
                        ..self.create_fresh(
                            format!("create fresh (round {round})"),
                            &format!("c{round}"),
                        )
                    };
                    create_rounds.push(self.row(&s).await);
                }
            }
        }
        (floor_rounds, create_rounds)
    }

    /// Concurrency 1: latency with the server idle but for one request.
    async fn concurrency_one(
        &mut self,
        created: &Arc<Vec<String>>,
        floor_keys: &Arc<Vec<String>>,
    ) -> BTreeMap<&'static str, Measured> {
        let mut c1 = BTreeMap::new();
        if self.args.latency_duration == 0 {
            return c1;
        }
        let floor_pool = || Keys::Random(floor_keys.clone());
        let pool = || Keys::Random(created.clone());
        let plan = [
            ("floor", self.floor_fresh("floor c=1", "f1c")),
            (
                "floor_dup",
                self.scenario(
                    "floor duplicate c=1",
                    FLOOR_CREATE,
                    floor_pool(),
                    "chargeId",
                ),
            ),
            (
                "floor_get",
                self.scenario("floor get c=1", FLOOR_GET, floor_pool(), "chargeId"),
            ),
            ("create", self.create_fresh("create fresh c=1", "c1c")),
            (
                "create_dup",
                self.scenario("create duplicate c=1", CREATE, pool(), "already processed"),
            ),
            ("get", self.scenario("get c=1", GET, pool(), "\"status\"")),
        ];
        for (key, s) in plan {
            let s = Scenario {
                concurrency: 1,
                duration: Duration::from_secs(self.args.latency_duration),
                ..s
            };
            c1.insert(key, self.row(&s).await);
        }
        c1
    }

    fn standard_checks(&self, r: &Standard) -> Vec<Check> {
        let (floor, create) = (&r.rows[0], &r.rows[1]);
        let per_round: Vec<String> = r
            .floor_rounds
            .iter()
            .zip(&r.create_rounds)
            .map(|(f, c)| format!("{:.3}", c.run.throughput() / f.run.throughput()))
            .collect();
        let mut checks = vec![Check {
            name: "CreatePayment throughput / floor's",
            value: create.run.throughput() / floor.run.throughput(),
            target: TARGET_CREATE_VS_FLOOR,
            at_least: true,
            detail: format!(
                "{:.0} vs {:.0} req/s; per round: {}; from CPU per request: {:.3} ({:.0} vs {:.0} µs)",
                create.run.throughput(),
                floor.run.throughput(),
                per_round.join(", "),
                floor.stack_cpu_us() / create.stack_cpu_us(),
                create.stack_cpu_us(),
                floor.stack_cpu_us(),
            ),
        }];
        let p50 = |key: &str| r.c1.get(key).map_or(f64::NAN, |m| m.latency.ms(0.5));
        if r.c1.contains_key("floor") {
            let fp = p50("floor");
            for (name, key, own, what) in [
                (
                    "duplicate CreatePayment p50 / floor p50, c=1",
                    "create_dup",
                    "floor_dup",
                    "duplicate",
                ),
                (
                    "GetPayment p50 / floor p50, c=1",
                    "get",
                    "floor_get",
                    "read",
                ),
            ] {
                let p = p50(key);
                checks.push(Check {
                    name,
                    value: p / fp,
                    target: TARGET_P50_VS_FLOOR,
                    at_least: false,
                    detail: format!(
                        "{p:.2} vs {fp:.2} ms (floor's own {what}: {:.2} ms)",
                        p50(own)
                    ),
                });
            }
        }
        let sampled = r
            .rows
            .iter()
            .chain(r.c1.values())
            .filter_map(|m| m.proc("service").and_then(|p| p.rss_max_kb))
            .max();
        checks.extend(self.rss_check(
            "payment-service peak RSS under load, MB",
            sampled,
            |sampled, hwm| {
                format!("largest VmRSS sampled every 100 ms {sampled}, VmHWM at the end {hwm}")
            },
        ));
        checks
    }

    /// The service's peak memory: the largest VmRSS sampled, or the kernel's high-water mark
    /// (VmHWM), which also catches spikes between samples (e.g. a hash table copied while it
    /// grows).
    fn rss_check(
        &self,
        name: &'static str,
        sampled_kb: Option<u64>,
        detail: impl Fn(String, String) -> String,
    ) -> Option<Check> {
        let hwm = self.hwm_kb("service");
        let peak = sampled_kb.max(hwm)?;
        let mb =
            |kb: Option<u64>| kb.map_or("-".into(), |kb| format!("{:.1} MB", kb as f64 / 1024.0));
        Some(Check {
            name,
            value: peak as f64 / 1024.0,
            target: TARGET_RSS_MB,
            at_least: false,
            detail: detail(mb(sampled_kb), mb(hwm)),
        })
    }

    fn standard_summary(&mut self, r: &Standard) -> Value {
        let checks = self.standard_checks(r);
        self.print_checks(&checks);
        let noise = r
            .rows
            .iter()
            .chain(r.c1.values())
            .map(Measured::other_cores)
            .fold(0.0, f64::max);
        self.warn_noise(noise);
        let scenarios: Vec<Value> = r
            .rows
            .iter()
            .chain(&r.floor_rounds)
            .chain(&r.create_rounds)
            .map(Measured::to_json)
            .collect();
        let c1: serde_json::Map<String, Value> =
            r.c1.iter()
                .map(|(k, m)| (k.to_string(), m.to_json()))
                .collect();
        let rss_max = r
            .rows
            .iter()
            .chain(r.c1.values())
            .filter_map(|m| m.proc("service").and_then(|p| p.rss_max_kb))
            .max();
        json!({
            "mode": "standard",
            "scenarios": scenarios,
            "concurrency_1": c1,
            "checks": checks.iter().map(Check::to_json).collect::<Vec<_>>(),
            "other_processes_cpu_cores_max": round3(noise),
            "service_rss_max_mb": rss_max.map(kb_to_mb),
            "service_vmhwm_mb": self.hwm_kb("service").map(kb_to_mb),
            "floor_vmhwm_mb": self.hwm_kb("floor").map(kb_to_mb),
            "server_vmhwm_mb": self.hwm_kb("server").map(kb_to_mb),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Scale mode

/// What the scale mode measured.
struct Scale {
    empty_create: Measured,
    empty_get: Measured,
    preload: Measured,
    loaded_create: Measured,
    loaded_get: Measured,
    /// Payments stored during the empty-server measurement, and after the preload.
    stored_at_empty: usize,
    stored: usize,
}

impl Bench<'_> {
    async fn scale(&mut self) -> anyhow::Result<Value> {
        let mut stored: Vec<String> = Vec::new();
        if self.args.warmup > 0 {
            eprintln!("warm-up: {} s on CreatePayment", self.args.warmup);
            let s = Scenario {
                duration: Duration::from_secs(self.args.warmup),
                ..self.create_fresh("warm-up", "w")
            };
            stored.extend(self.run(&s).await.run.ok_keys());
        }
        self.settle("before the empty-server measurement").await;
        self.print_header();
        let s = self.create_fresh("create fresh, empty", "e");
        let empty_create = self.row(&s).await;
        stored.extend(empty_create.run.ok_keys());
        let get = |b: &Self, name: &str, pool: &[String]| {
            b.scenario(
                name,
                GET,
                Keys::Random(Arc::new(pool.to_vec())),
                "\"status\"",
            )
        };
        let s = get(self, "get, empty", &stored);
        let empty_get = self.row(&s).await;
        let stored_at_empty = stored.len();

        let missing = self.args.preload.saturating_sub(stored.len() as u64);
        self.report.line(format!(
            "preloading {missing} payments ({} stored so far) at concurrency {} ...",
            stored.len(),
            self.args.concurrency
        ));
        let preload = Scenario {
            duration: Duration::from_secs(24 * 3600),
            limit: Some(missing),
            ..self.create_fresh("preload", "p")
        };
        let preload = self.row(&preload).await;
        if preload.run.error_count() > 0 {
            eprintln!("preload: {} errors", preload.run.error_count());
        }
        stored.extend(preload.run.ok_keys());
        self.settle("after the preload").await;
        let n = stored.len();
        let s = self.create_fresh(format!("create fresh, {n} stored"), "l");
        let loaded_create = self.row(&s).await;
        let s = get(self, &format!("get, {n} stored"), &stored);
        let loaded_get = self.row(&s).await;
        let scale = Scale {
            empty_create,
            empty_get,
            preload,
            loaded_create,
            loaded_get,
            stored_at_empty,
            stored: n,
        };
        Ok(self.scale_summary(scale))
    }

    fn scale_summary(&mut self, s: Scale) -> Value {
        let n = s.stored;
        let mut checks = vec![
            p99_check(
                "CreatePayment p99, stored / empty",
                &s.loaded_create,
                &s.empty_create,
            ),
            p99_check(
                "GetPayment p99, stored / empty",
                &s.loaded_get,
                &s.empty_get,
            ),
        ];
        let rss = |ms: [&Measured; 2]| {
            ms.iter()
                .filter_map(|m| m.proc("service").and_then(|p| p.rss_max_kb))
                .max()
        };
        let empty_rss = rss([&s.empty_create, &s.empty_get]);
        checks.extend(self.rss_check(
            "payment-service peak RSS, stored, MB",
            rss([&s.loaded_create, &s.loaded_get]),
            |_, _| {
                format!(
                    "largest of VmRSS sampled every 100 ms and VmHWM, with {n} payments stored \
                     (empty server: {})",
                    empty_rss.map_or("-".into(), |kb| format!("{:.1} MB", kb as f64 / 1024.0))
                )
            },
        ));
        self.report.line("");
        self.report.line(format!(
            "stored payments: {} during the empty-server measurement, {n} after the preload",
            s.stored_at_empty
        ));
        self.print_checks(&checks);
        let measured = [
            &s.empty_create,
            &s.empty_get,
            &s.loaded_create,
            &s.loaded_get,
        ];
        let noise = measured.iter().map(|m| m.other_cores()).fold(0.0, f64::max);
        self.warn_noise(noise);
        json!({
            "mode": "scale",
            "other_processes_cpu_cores_max": round3(noise),
            "stored_during_empty": s.stored_at_empty,
            "stored_after_preload": n,
            "scenarios": [s.empty_create.to_json(), s.empty_get.to_json(), s.preload.to_json(), s.loaded_create.to_json(), s.loaded_get.to_json()],
            "checks": checks.iter().map(Check::to_json).collect::<Vec<_>>(),
            "service_vmhwm_mb": self.hwm_kb("service").map(kb_to_mb),
            "server_vmhwm_mb": self.hwm_kb("server").map(kb_to_mb),
        })
    }
}

fn p99_check(name: &'static str, loaded: &Measured, empty: &Measured) -> Check {
    let (lp, ep) = (loaded.latency.ms(0.99), empty.latency.ms(0.99));
    Check {
        name,
        value: lp / ep,
        target: TARGET_P99_LOADED_VS_EMPTY,
        at_least: false,
        detail: format!(
            "{lp:.2} vs {ep:.2} ms; {:.0} vs {:.0} req/s; CPU {:.0} vs {:.0} µs/request; \
             other processes {:.2} vs {:.2} cores",
            loaded.run.throughput(),
            empty.run.throughput(),
            loaded.stack_cpu_us(),
            empty.stack_cpu_us(),
            loaded.other_cores(),
            empty.other_cores(),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting

impl Bench<'_> {
    fn print_header(&mut self) {
        self.report.line(
            "columns: latency percentiles of answered requests; app µs/rq: CPU time of the \
             handler's process (the floor's on floor rows, payment-service's otherwise) per \
             answered request; srv µs/rq: restate-server's; app MB: the handler process's largest \
             VmRSS sampled; other: cores kept busy by processes outside the benchmark (noise)",
        );
        self.report.line(format!(
            "{:<28} {:>4} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>6}",
            "scenario",
            "conc",
            "ok",
            "errors",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "app µs/rq",
            "srv µs/rq",
            "app MB",
            "other"
        ));
    }

    fn print_row(&mut self, m: &Measured) {
        let ok = m.run.ok().max(1) as f64;
        let per_req = |p: Option<&ProcUsage>| {
            p.map_or("-".into(), |p| format!("{:.0}", p.cpu_seconds * 1e6 / ok))
        };
        let l = &m.latency;
        self.report.line(format!(
            "{:<28} {:>4} {:>8} {:>6} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>9} {:>9} {:>8} {:>6.2}",
            m.name,
            m.concurrency,
            m.run.ok(),
            m.run.error_count(),
            m.run.throughput(),
            l.ms(0.50),
            l.ms(0.90),
            l.ms(0.99),
            l.ms(1.0),
            per_req(m.app()),
            per_req(m.proc("server")),
            m.app()
                .and_then(|p| p.rss_max_kb)
                .map_or("-".into(), |kb| format!("{:.1}", kb as f64 / 1024.0)),
            m.other_cores(),
        ));
        for (kind, count) in m.run.errors() {
            self.report.line(format!("    {count} × {kind}"));
        }
    }

    fn print_checks(&mut self, checks: &[Check]) {
        self.report.line("");
        self.report.line("targets:");
        for check in checks {
            self.report.line(check.line());
        }
    }

    /// Other processes busy during the run make req/s and latency comparisons unreliable.
    fn warn_noise(&mut self, other_cores_max: f64) {
        if other_cores_max > 0.2 {
            self.report.line(format!(
                "WARNING: processes outside the benchmark kept up to {other_cores_max:.2} cores \
                 busy during a scenario (column 'other'); throughput and latency ratios are \
                 unreliable. Rerun on a quiet machine; CPU per request (the 'from CPU per \
                 request' ratio) is the figure least affected."
            ));
        }
    }
}

/// A named check against a target.
struct Check {
    name: &'static str,
    value: f64,
    target: f64,
    /// `true`: the value must be at least the target; `false`: at most.
    at_least: bool,
    detail: String,
}

impl Check {
    fn pass(&self) -> bool {
        if self.at_least {
            self.value >= self.target
        } else {
            self.value <= self.target
        }
    }

    fn line(&self) -> String {
        format!(
            "  {:<44} {:>8.3}  (target {} {}) {}  {}",
            self.name,
            self.value,
            if self.at_least { "≥" } else { "≤" },
            self.target,
            if self.pass() { "PASS" } else { "FAIL" },
            self.detail
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "value": round3(self.value),
            "target": self.target,
            "comparison": if self.at_least { ">=" } else { "<=" },
            "pass": self.pass(),
            "detail": self.detail,
        })
    }
}

fn machine_json() -> Value {
    let m = load::machine();
    json!({
        "cpus": m.cpus,
        "cpu_model": m.cpu_model,
        "mem_total_gib": m.mem_total_kb.map(|kb| round1(kb as f64 / 1024.0 / 1024.0)),
        "loadavg": m.loadavg.map(|[a, b, c]| format!("{a:.2} {b:.2} {c:.2}")),
    })
}

/// Which binaries were measured: for telling runs of patched builds apart.
fn note(stack: &Stack) -> String {
    let server = paths::restate_server()
        .map(|p| first_line(&p.display().to_string(), &["--version"]))
        .unwrap_or_default();
    format!(
        "payment-service {}; floor {}; RUST_LOG={}; {server}; stack {}",
        bin_note(paths::payment_service()),
        bin_note(paths::workspace_bin("BENCH_FLOOR_BIN", "bench-floor")),
        std::env::var("RUST_LOG").unwrap_or_else(|_| "unset".into()),
        stack.dir.display(),
    )
}

/// A binary's path and the start of its sha256.
fn bin_note(path: anyhow::Result<PathBuf>) -> String {
    path.map_or("?".into(), |p| {
        let p = p.display().to_string();
        let sha = first_line("sha256sum", &[&p]);
        format!("{p} (sha256 {})", sha.get(..12).unwrap_or("?"))
    })
}

/// The first line a command prints ("" if it fails).
fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default()
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn kb_to_mb(kb: u64) -> f64 {
    round1(kb as f64 / 1024.0)
}

fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// `YYYYmmdd-HHMMSS`, UTC: the results folders' names.
pub(crate) fn timestamp() -> String {
    let format = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    time::OffsetDateTime::now_utc()
        .format(format)
        .unwrap_or_default()
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Comparing two summaries (e.g. the tuned configuration against stock settings)

fn compare(a_path: &Path, b_path: &Path) -> anyhow::Result<()> {
    let read = |p: &Path| -> anyhow::Result<Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let (a, b) = (read(a_path)?, read(b_path)?);
    let label = |v: &Value, p: &Path| {
        v["label"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map_or_else(|| p.display().to_string(), str::to_owned)
    };
    let (la, lb) = (label(&a, a_path), label(&b, b_path));
    let (ia, ib) = (scenarios_by_name(&a), scenarios_by_name(&b));
    println!(
        "{:<24} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6} {:>6}",
        "scenario",
        format!("{la} rps"),
        format!("{lb} rps"),
        "gain",
        format!("{la} p99"),
        format!("{lb} p99"),
        "ratio",
        format!("{la} cpu"),
        format!("{lb} cpu"),
        "ratio",
        "other"
    );
    let num = |s: &Value, ptr: &str| s.pointer(ptr).and_then(Value::as_f64).unwrap_or(f64::NAN);
    for (name, sa) in &ia {
        if name.contains("(round") {
            continue;
        }
        let Some(sb) = ib.get(name) else { continue };
        let (ra, rb) = (num(sa, "/throughput_rps"), num(sb, "/throughput_rps"));
        let (pa, pb) = (num(sa, "/latency_ms/p99"), num(sb, "/latency_ms/p99"));
        // CPU per request of restate-server, the handler's process and the client, µs. Unlike
        // req/s, it hardly depends on what else the machine runs at the time.
        let cpu = "/stack_cpu_us_per_request";
        let (ca, cb) = (num(sa, cpu), num(sb, cpu));
        println!(
            "{name:<24} {ra:>9.0} {rb:>9.0} {:>5.2}× {pa:>9.2} {pb:>9.2} {:>5.2}× {ca:>9.0} {cb:>9.0} {:>5.2}× {:>2.1}/{:.1}",
            ra / rb,
            pa / pb,
            ca / cb,
            num(sa, "/other_processes_cpu_cores"),
            num(sb, "/other_processes_cpu_cores"),
        );
    }
    println!(
        "rps: answered requests per second; p99: ms; cpu: CPU time per request of \
         restate-server, the handler's process and the load client, µs; other: cores busy \
         outside the benchmark during each run (a fair req/s comparison needs both near 0)"
    );
    Ok(())
}

/// A summary's scenarios (and concurrency-1 scenarios) by name.
fn scenarios_by_name(summary: &Value) -> BTreeMap<String, Value> {
    let c1 = summary["concurrency_1"].as_object().into_iter().flatten();
    summary["scenarios"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(c1.map(|(_, s)| s))
        .filter_map(|s| Some((s["name"].as_str()?.to_owned(), s.clone())))
        .collect()
}

/// The processes a benchmark samples: each role's PID (an error if one is not running), and
/// this process as the load client.
pub(crate) fn sampled_pids<const N: usize>(
    roles: [(&'static str, Option<u32>); N],
) -> anyhow::Result<Vec<(&'static str, u32)>> {
    let mut pids = Vec::with_capacity(N + 1);
    for (role, pid) in roles {
        pids.push((
            role,
            pid.with_context(|| format!("the {role} is not running"))?,
        ));
    }
    pids.push(("client", std::process::id()));
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_random_from_the_pool_or_each_once() {
        assert_eq!(
            Keys::Fresh("b-c1".into()).pick(7).as_deref(),
            Some("b-c1-7")
        );
        let pool = Arc::new(vec!["a".to_owned(), "b".to_owned()]);
        let once = Keys::Once(pool.clone());
        assert_eq!(once.pick(1).as_deref(), Some("b"));
        assert_eq!(once.pick(2), None);
        let random = Keys::Random(pool);
        let picks: Vec<String> = (0..100).filter_map(|n| random.pick(n)).collect();
        assert!(picks.iter().any(|k| k == "a") && picks.iter().any(|k| k == "b"));
    }

    #[test]
    fn checks_pass_on_the_right_side_of_the_target() {
        let check = |value, at_least| Check {
            name: "x",
            value,
            target: 1.0,
            at_least,
            detail: String::new(),
        };
        assert!(check(1.0, true).pass() && check(1.1, true).pass() && !check(0.9, true).pass());
        assert!(check(0.9, false).pass() && !check(1.1, false).pass());
        assert!(!check(f64::NAN, false).pass());
    }
}
