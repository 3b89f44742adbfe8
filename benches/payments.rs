//! The load client of the performance benchmark: drives a running stack through the Restate
//! ingress, closed loop (each of `--concurrency` workers sends its next request when the last
//! one is answered), and prints throughput, p50/p90/p99 latency and errors per scenario, beside
//! a JSON summary. `scripts/bench.sh` starts a fresh stack (restate-server, payment-service and
//! the floor, `examples/bench_floor.rs`) and runs this; by hand, against a stack you started:
//!
//! ```text
//! cargo bench --bench payments -- --ingress http://127.0.0.1:8080 --concurrency 64 \
//!     --duration 15 --service-pid <pid of payment-service> --json out.json
//! cargo bench --bench payments -- --compare tuned.json stock.json
//! ```
//!
//! Standard mode, in order: a short warm-up; the floor (`BenchFloor/<fresh id>/Create`) and
//! `CreatePayment` on fresh IDs, alternated `--rounds` times so that both see the same machine;
//! duplicate `CreatePayment` and `GetPayment` on the payments just created; `RefundPayment`,
//! once per created payment; then at concurrency 1: the floor, the floor's duplicate and read,
//! duplicate `CreatePayment` and `GetPayment`. Scale mode: `CreatePayment` and `GetPayment` on
//! an empty server, then again once `--preload` payments are stored, each measurement started
//! once restate-server is idle.
//!
//! Only started by `cargo bench` (which passes `--bench`): under `cargo test` it exits at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

/// Load client for payment-service (see `scripts/bench.sh`).
#[derive(Debug, Parser)]
#[command(name = "payments-bench")]
struct Args {
    /// Restate ingress base URL.
    #[arg(long, env = "BENCH_INGRESS", default_value = "http://127.0.0.1:8080")]
    ingress: String,
    /// Concurrent requests (closed loop: one connection per worker).
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Seconds each scenario runs at `--concurrency`.
    #[arg(long, short = 'd', default_value_t = 10)]
    duration: u64,
    /// Floor / CreatePayment rounds, in ABBA order.
    #[arg(long, default_value_t = 40)]
    rounds: u32,
    /// Seconds each side runs per floor / CreatePayment round. Short rounds, many of them:
    /// restate-server's flushes and compactions last seconds, and with short rounds each one
    /// falls on both sides instead of on whichever ran a 10-second round.
    #[arg(long, default_value_t = 2)]
    round_duration: u64,
    /// Seconds each concurrency-1 latency scenario runs (0 skips them).
    #[arg(long, default_value_t = 10)]
    latency_duration: u64,
    /// Seconds of unrecorded warm-up load on the floor and on CreatePayment.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Standard)]
    mode: Mode,
    /// Scale mode: payments stored before the second measurement.
    #[arg(long, default_value_t = 100_000)]
    preload: u64,
    /// payment-service's pid: its VmRSS is sampled during load, its CPU time measured.
    #[arg(long)]
    service_pid: Option<u32>,
    /// The floor's pid (same measurements).
    #[arg(long)]
    floor_pid: Option<u32>,
    /// restate-server's pid (the native binary): CPU time and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A name for this run in the report, e.g. "tuned" or "stock".
    #[arg(long, default_value = "")]
    label: String,
    /// Free text recorded in the JSON summary (scripts/bench.sh: binaries, RUST_LOG).
    #[arg(long, default_value = "")]
    note: String,
    /// Also write the JSON summary here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Compare two JSON summaries (e.g. tuned and stock) and exit.
    #[arg(long, num_args = 2, value_names = ["A_JSON", "B_JSON"])]
    compare: Option<Vec<PathBuf>>,
    /// Passed by `cargo bench` to harness-less benchmarks.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Throughput and latency of every handler, the floor, memory.
    Standard,
    /// p99 on an empty server vs with `--preload` payments stored.
    Scale,
}

// ---------------------------------------------------------------------------------------------
// Targets (issue 4)

const TARGET_CREATE_VS_FLOOR: f64 = 0.95;
const TARGET_P50_VS_FLOOR: f64 = 1.10;
const TARGET_P99_LOADED_VS_EMPTY: f64 = 1.25;
const TARGET_RSS_MB: f64 = 30.0;

const CREATE_BODY: &str =
    r#"{"amount":10000,"currency":"USD","description":"benchmark","customerId":"cust-bench"}"#;
const REFUND_BODY: &str = r#"{"reason":"benchmark","amount":10000}"#;
const EMPTY_BODY: &str = "{}";

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Which keys a scenario calls.
#[derive(Clone)]
enum Keys {
    /// A new key per request: `<prefix>-<n>`; the ones answered 2xx are collected.
    Fresh { prefix: String },
    /// Keys of `pool`, picked at random (uniformly).
    Random(Arc<Vec<String>>),
    /// Each key of `pool` once, in order; the scenario ends when they run out.
    Once(Arc<Vec<String>>),
}

#[derive(Clone)]
struct Scenario {
    name: String,
    service: &'static str,
    handler: &'static str,
    body: &'static str,
    keys: Keys,
    concurrency: usize,
    /// Stop after this long (at the latest)...
    duration: Duration,
    /// ...or after this many requests.
    limit: Option<u64>,
    /// A 2xx answer must contain this, or it counts as an error.
    expect: Option<&'static str>,
}

/// What one scenario measured.
#[derive(Debug, Default)]
struct Stats {
    name: String,
    concurrency: usize,
    ok: u64,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    /// Latencies of the answered requests (2xx or not), microseconds, sorted.
    latencies_us: Vec<u32>,
    created: Vec<String>,
    procs: Vec<ProcUsage>,
    /// CPU time the whole machine spent busy during the scenario, seconds (all cores).
    machine_busy_seconds: f64,
}

impl Stats {
    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        percentile_ms(&self.latencies_us, p)
    }

    fn mean_ms(&self) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let sum: u64 = self.latencies_us.iter().map(|&l| u64::from(l)).sum();
        sum as f64 / self.latencies_us.len() as f64 / 1000.0
    }

    fn proc(&self, role: &str) -> Option<&ProcUsage> {
        self.procs.iter().find(|p| p.role == role)
    }

    /// CPU time per answered request of everything the request needs: restate-server, the
    /// handler's process (the floor's for floor scenarios) and this client, µs. When the
    /// machine is the limit, throughput is inversely proportional to it; unlike req/s, it
    /// barely moves when other processes compete for the cores.
    fn stack_cpu_us(&self) -> f64 {
        let app = if self.name.starts_with("floor") {
            "floor"
        } else {
            "service"
        };
        ["server", app, "client"]
            .iter()
            .filter_map(|role| self.proc(role))
            .map(|p| p.cpu_seconds)
            .sum::<f64>()
            * 1e6
            / self.ok.max(1) as f64
    }

    /// Cores kept busy by processes other than the measured ones (server, service, floor,
    /// this client): the noise of a shared machine.
    fn other_cores(&self) -> f64 {
        let ours: f64 = self.procs.iter().map(|p| p.cpu_seconds).sum();
        ((self.machine_busy_seconds - ours) / self.elapsed.as_secs_f64().max(1e-9)).max(0.0)
    }

    fn to_json(&self) -> Value {
        let procs: serde_json::Map<String, Value> = self
            .procs
            .iter()
            .map(|p| {
                (
                    p.role.to_owned(),
                    json!({
                        "cpu_seconds": round3(p.cpu_seconds),
                        "cpu_us_per_request": round1(p.cpu_seconds * 1e6 / self.ok.max(1) as f64),
                        "cpu_cores": round3(p.cpu_seconds / self.elapsed.as_secs_f64().max(1e-9)),
                        "rss_max_mb": p.rss_max_kb.map(kb_to_mb),
                    }),
                )
            })
            .collect();
        json!({
            "name": self.name,
            "concurrency": self.concurrency,
            "requests_ok": self.ok,
            "errors": self.error_count(),
            "error_kinds": self.errors,
            "seconds": round3(self.elapsed.as_secs_f64()),
            "throughput_rps": round1(self.throughput()),
            "latency_ms": {
                "p50": round3(self.percentile_ms(0.50)),
                "p90": round3(self.percentile_ms(0.90)),
                "p99": round3(self.percentile_ms(0.99)),
                "max": round3(self.percentile_ms(1.0)),
                "mean": round3(self.mean_ms()),
            },
            "processes": procs,
            "other_processes_cpu_cores": round3(self.other_cores()),
            "stack_cpu_us_per_request": round1(self.stack_cpu_us()),
        })
    }
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted_us.len() as f64).ceil() as usize;
    f64::from(sorted_us[rank.clamp(1, sorted_us.len()) - 1]) / 1000.0
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

/// One worker's share of a scenario.
#[derive(Default)]
struct WorkerResult {
    ok: u64,
    errors: BTreeMap<String, u64>,
    latencies_us: Vec<u32>,
    created: Vec<String>,
}

/// A cheap per-worker PRNG (xorshift64*), for picking keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

struct Bench {
    client: reqwest::Client,
    ingress: String,
    pids: Vec<(&'static str, u32)>,
}

impl Bench {
    /// Waits until restate-server is idle: below 0.1 core over a second, i.e. done with the
    /// flushes and compactions of the load before, so that a measurement starts on a server
    /// that carries its data and not the last minute's write backlog. Returns the time waited
    /// (`None` without a server pid); gives up after `max`.
    async fn settle(&self, max: Duration) -> Option<Duration> {
        let pid = self.pids.iter().find(|(role, _)| *role == "server")?.1;
        let start = Instant::now();
        let mut before = cpu_seconds(pid)?;
        while start.elapsed() < max {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = cpu_seconds(pid)?;
            if now - before < 0.1 {
                break;
            }
            before = now;
        }
        Some(start.elapsed())
    }

    async fn run(&self, scenario: &Scenario) -> Stats {
        let counter = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + scenario.duration;
        let sampler = Sampler::start(&self.pids);
        let start = Instant::now();
        let workers: Vec<_> = (0..scenario.concurrency)
            .map(|w| {
                let client = self.client.clone();
                let ingress = self.ingress.clone();
                let scenario = scenario.clone();
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    worker(client, ingress, scenario, counter, deadline, w as u64).await
                })
            })
            .collect();
        let mut stats = Stats {
            name: scenario.name.clone(),
            concurrency: scenario.concurrency,
            ..Stats::default()
        };
        for w in workers {
            let r = w.await.expect("worker panicked");
            stats.ok += r.ok;
            for (k, v) in r.errors {
                *stats.errors.entry(k).or_default() += v;
            }
            stats.latencies_us.extend(r.latencies_us);
            stats.created.extend(r.created);
        }
        stats.elapsed = start.elapsed();
        (stats.procs, stats.machine_busy_seconds) = sampler.stop().await;
        stats.latencies_us.sort_unstable();
        stats
    }
}

async fn worker(
    client: reqwest::Client,
    ingress: String,
    scenario: Scenario,
    counter: Arc<AtomicU64>,
    deadline: Instant,
    seed: u64,
) -> WorkerResult {
    let mut result = WorkerResult::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (seed.wrapping_add(1)).wrapping_mul(0xA24B_AED4));
    while Instant::now() < deadline {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        if scenario.limit.is_some_and(|limit| n >= limit) {
            break;
        }
        let key = match &scenario.keys {
            Keys::Fresh { prefix } => format!("{prefix}-{n}"),
            Keys::Random(pool) => pool[(rng.next() % pool.len() as u64) as usize].clone(),
            Keys::Once(pool) => match pool.get(n as usize) {
                Some(key) => key.clone(),
                None => break,
            },
        };
        let url = format!("{ingress}/{}/{key}/{}", scenario.service, scenario.handler);
        let sent = Instant::now();
        let answer = client
            .post(&url)
            .header("content-type", "application/json")
            .body(scenario.body)
            .send()
            .await;
        let outcome = match answer {
            Ok(response) => {
                let status = response.status();
                match response.bytes().await {
                    Ok(body) if status.is_success() => match scenario.expect {
                        Some(needle) if !contains(&body, needle.as_bytes()) => Err(format!(
                            "unexpected answer: {}",
                            String::from_utf8_lossy(&body)
                        )),
                        _ => Ok(()),
                    },
                    Ok(body) => Err(format!(
                        "HTTP {}: {}",
                        status.as_u16(),
                        String::from_utf8_lossy(&body)
                            .chars()
                            .take(120)
                            .collect::<String>()
                    )),
                    Err(e) => Err(format!("reading the answer: {e}")),
                }
            }
            Err(e) => Err(format!("request failed: {e}")),
        };
        let latency = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        result.latencies_us.push(latency);
        match outcome {
            Ok(()) => {
                result.ok += 1;
                if matches!(scenario.keys, Keys::Fresh { .. }) {
                    result.created.push(key);
                }
            }
            Err(kind) => *result.errors.entry(kind).or_default() += 1,
        }
    }
    result
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Process sampling: VmRSS every 100 ms, CPU time (utime + stime) before and after.

#[derive(Debug, Clone)]
struct ProcUsage {
    role: &'static str,
    cpu_seconds: f64,
    rss_max_kb: Option<u64>,
}

struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(Vec<ProcUsage>, f64)>,
}

impl Sampler {
    fn start(pids: &[(&'static str, u32)]) -> Self {
        let pids = pids.to_vec();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let busy0 = machine_busy_seconds();
            let cpu0: Vec<Option<f64>> = pids.iter().map(|&(_, pid)| cpu_seconds(pid)).collect();
            let mut rss_max: Vec<Option<u64>> = vec![None; pids.len()];
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                for (i, &(_, pid)) in pids.iter().enumerate() {
                    if let Some(kb) = proc_status_kb(pid, "VmRSS") {
                        rss_max[i] = Some(rss_max[i].map_or(kb, |m| m.max(kb)));
                    }
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => break,
                }
            }
            let procs = pids
                .iter()
                .enumerate()
                .map(|(i, &(role, pid))| ProcUsage {
                    role,
                    cpu_seconds: match (cpu0[i], cpu_seconds(pid)) {
                        (Some(a), Some(b)) => b - a,
                        _ => f64::NAN,
                    },
                    rss_max_kb: rss_max[i],
                })
                .collect();
            let busy = match (busy0, machine_busy_seconds()) {
                (Some(a), Some(b)) => b - a,
                _ => f64::NAN,
            };
            (procs, busy)
        });
        Self { stop, task }
    }

    async fn stop(self) -> (Vec<ProcUsage>, f64) {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// A `/proc/<pid>/status` field in kB, e.g. `VmRSS` or `VmHWM`.
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// CPU time all cores spent busy since boot (`/proc/stat`: all but idle and iowait), seconds.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let times: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .filter_map(|t| t.parse().ok())
        .collect();
    let idle = times.get(3)? + times.get(4)?;
    let total: u64 = times.iter().sum();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((total - idle) as f64 / ticks)
}

/// User plus system CPU time of a process (all its threads), seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) as f64 / ticks)
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn print_header() {
    println!(
        "columns: latency percentiles of answered requests; app µs/rq: CPU time of the \
         handler's process (the floor's on floor rows, payment-service's otherwise) per \
         answered request; srv µs/rq: restate-server's; app MB: the handler process's largest \
         VmRSS sampled; other: cores kept busy by processes outside the benchmark (noise)"
    );
    println!(
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
    );
}

fn print_row(s: &Stats) {
    // The handler's process: the floor for floor scenarios, payment-service otherwise.
    let app = if s.name.starts_with("floor") {
        s.proc("floor")
    } else {
        s.proc("service")
    };
    let per_req = |p: Option<&ProcUsage>| {
        p.map_or("-".to_owned(), |p| {
            format!("{:.0}", p.cpu_seconds * 1e6 / s.ok.max(1) as f64)
        })
    };
    println!(
        "{:<28} {:>4} {:>8} {:>6} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>9} {:>9} {:>8} {:>6.2}",
        s.name,
        s.concurrency,
        s.ok,
        s.error_count(),
        s.throughput(),
        s.percentile_ms(0.50),
        s.percentile_ms(0.90),
        s.percentile_ms(0.99),
        s.percentile_ms(1.0),
        per_req(app),
        per_req(s.proc("server")),
        app.and_then(|p| p.rss_max_kb)
            .map_or("-".to_owned(), |kb| format!("{:.1}", kb as f64 / 1024.0)),
        s.other_cores(),
    );
    for (kind, count) in &s.errors {
        println!("    {count} × {kind}");
    }
}

/// Other processes busy during the run make req/s and latency comparisons unreliable.
fn warn_noise(other_cores_max: f64) {
    if other_cores_max > 0.2 {
        println!(
            "WARNING: processes outside the benchmark kept up to {other_cores_max:.2} cores busy \
             during a scenario (column 'other'); throughput and latency ratios are unreliable. \
             Rerun on a quiet machine; CPU per request (the 'from CPU per request' ratio) is \
             the figure least affected."
        );
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// A named check against a target, for both reports.
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

    fn print(&self) {
        println!(
            "  {:<44} {:>8.3}  (target {} {}) {}  {}",
            self.name,
            self.value,
            if self.at_least { "≥" } else { "≤" },
            self.target,
            verdict(self.pass()),
            self.detail
        );
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

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let mem_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
    });
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
        "mem_total_gib": mem_kb.map(|kb| round1(kb as f64 / 1024.0 / 1024.0)),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

// ---------------------------------------------------------------------------------------------
// The runs

fn run_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("b{ms:x}")
}

impl Args {
    /// CreatePayment on fresh IDs starting with `prefix`, each answered `completed`.
    fn create_fresh(&self, name: impl Into<String>, prefix: String) -> Scenario {
        Scenario {
            expect: Some("\"completed\""),
            ..self.scenario(
                name,
                "PaymentService",
                "CreatePayment",
                CREATE_BODY,
                fresh(prefix),
            )
        }
    }

    fn scenario(
        &self,
        name: impl Into<String>,
        service: &'static str,
        handler: &'static str,
        body: &'static str,
        keys: Keys,
    ) -> Scenario {
        Scenario {
            name: name.into(),
            service,
            handler,
            body,
            keys,
            concurrency: self.concurrency,
            duration: Duration::from_secs(self.duration),
            limit: None,
            expect: None,
        }
    }
}

fn fresh(prefix: String) -> Keys {
    Keys::Fresh { prefix }
}

async fn standard(args: &Args, bench: &Bench, id: &str) -> anyhow::Result<Value> {
    let round = Duration::from_secs(args.round_duration);
    let floor_create = |name: String, prefix: String| Scenario {
        expect: Some("completed"),
        duration: round,
        ..args.scenario(name, "BenchFloor", "Create", CREATE_BODY, fresh(prefix))
    };
    let create = |name: String, prefix: String| Scenario {
        duration: round,
        ..args.create_fresh(name, prefix)
    };

    if args.warmup > 0 {
        eprintln!(
            "warm-up: {} s on the floor and on CreatePayment",
            args.warmup
        );
        for s in [
            floor_create("warm-up floor".into(), format!("{id}-wf")),
            create("warm-up create".into(), format!("{id}-wc")),
        ] {
            let s = Scenario {
                duration: Duration::from_secs(args.warmup),
                ..s
            };
            let stats = bench.run(&s).await;
            if stats.ok == 0 {
                bail!(
                    "warm-up '{}': no request succeeded; errors: {:?}",
                    s.name,
                    stats.errors
                );
            }
        }
    }

    let mut rows: Vec<Stats> = Vec::new();
    let mut floor_rounds: Vec<Stats> = Vec::new();
    let mut create_rounds: Vec<Stats> = Vec::new();
    print_header();
    // Alternated floor, create / create, floor (ABBA): whichever goes second in a round runs
    // on a server that holds a little more data and is still compacting the first's writes.
    for round in 1..=args.rounds {
        let floor_first = round % 2 == 1;
        for floor_turn in [floor_first, !floor_first] {
            if floor_turn {
                let f = bench
                    .run(&floor_create(
                        format!("floor (round {round})"),
                        format!("{id}-f{round}"),
                    ))
                    .await;
                print_row(&f);
                floor_rounds.push(f);
            } else {
                let c = bench
                    .run(&create(
                        format!("create fresh (round {round})"),
                        format!("{id}-c{round}"),
                    ))
                    .await;
                print_row(&c);
                create_rounds.push(c);
            }
        }
    }
    let floor = merge("floor", &floor_rounds);
    let create_all = merge("create fresh", &create_rounds);
    let created: Arc<Vec<String>> = Arc::new(
        create_rounds
            .iter()
            .flat_map(|s| s.created.iter().cloned())
            .collect(),
    );
    let floor_keys: Arc<Vec<String>> = Arc::new(
        floor_rounds
            .iter()
            .flat_map(|s| s.created.iter().cloned())
            .collect(),
    );
    if created.is_empty() || floor_keys.is_empty() {
        bail!("no payment was created; see the errors above");
    }
    rows.push(floor);
    rows.push(create_all);

    // The other handlers, on the payments just created: a refund takes each payment once.
    let others = [
        (
            "create duplicate",
            "CreatePayment",
            CREATE_BODY,
            "already processed",
            false,
        ),
        ("get", "GetPayment", EMPTY_BODY, "\"completed\"", false),
        ("refund", "RefundPayment", REFUND_BODY, "refundId", true),
    ];
    for (name, handler, body, expect, once) in others {
        let keys = if once {
            Keys::Once(Arc::clone(&created))
        } else {
            Keys::Random(Arc::clone(&created))
        };
        let stats = bench
            .run(&Scenario {
                expect: Some(expect),
                ..args.scenario(name, "PaymentService", handler, body, keys)
            })
            .await;
        print_row(&stats);
        rows.push(stats);
    }

    // Concurrency 1: latency with the server idle but for one request.
    let mut c1: BTreeMap<&'static str, Stats> = BTreeMap::new();
    if args.latency_duration > 0 {
        let one = |s: Scenario| Scenario {
            concurrency: 1,
            duration: Duration::from_secs(args.latency_duration),
            ..s
        };
        let plan: Vec<(&'static str, Scenario)> = vec![
            (
                "floor",
                one(floor_create("floor c=1".into(), format!("{id}-f1c"))),
            ),
            (
                "floor_dup",
                one(Scenario {
                    keys: Keys::Random(Arc::clone(&floor_keys)),
                    expect: Some("chargeId"),
                    ..floor_create("floor duplicate c=1".into(), String::new())
                }),
            ),
            (
                "floor_get",
                one(Scenario {
                    expect: Some("chargeId"),
                    ..args.scenario(
                        "floor get c=1",
                        "BenchFloor",
                        "Get",
                        EMPTY_BODY,
                        Keys::Random(Arc::clone(&floor_keys)),
                    )
                }),
            ),
            (
                "create",
                one(create("create fresh c=1".into(), format!("{id}-c1c"))),
            ),
            (
                "create_dup",
                one(Scenario {
                    expect: Some("already processed"),
                    ..args.scenario(
                        "create duplicate c=1",
                        "PaymentService",
                        "CreatePayment",
                        CREATE_BODY,
                        Keys::Random(Arc::clone(&created)),
                    )
                }),
            ),
            (
                "get",
                one(Scenario {
                    expect: Some("\"status\""),
                    ..args.scenario(
                        "get c=1",
                        "PaymentService",
                        "GetPayment",
                        EMPTY_BODY,
                        Keys::Random(Arc::clone(&created)),
                    )
                }),
            ),
        ];
        for (key, s) in plan {
            let stats = bench.run(&s).await;
            print_row(&stats);
            c1.insert(key, stats);
        }
    }

    // Checks against the issue's targets.
    let floor = &rows[0];
    let create_all = &rows[1];
    let mut checks = vec![Check {
        name: "CreatePayment throughput / floor's",
        value: create_all.throughput() / floor.throughput(),
        target: TARGET_CREATE_VS_FLOOR,
        at_least: true,
        detail: format!(
            "{:.0} vs {:.0} req/s; per round: {}; from CPU per request: {:.3} ({:.0} vs {:.0} µs)",
            create_all.throughput(),
            floor.throughput(),
            floor_rounds
                .iter()
                .zip(&create_rounds)
                .map(|(f, c)| format!("{:.3}", c.throughput() / f.throughput()))
                .collect::<Vec<_>>()
                .join(", "),
            floor.stack_cpu_us() / create_all.stack_cpu_us(),
            create_all.stack_cpu_us(),
            floor.stack_cpu_us(),
        ),
    }];
    if let (Some(f), Some(d), Some(g)) = (c1.get("floor"), c1.get("create_dup"), c1.get("get")) {
        let (fp, dp, gp) = (
            f.percentile_ms(0.5),
            d.percentile_ms(0.5),
            g.percentile_ms(0.5),
        );
        let like = |key: &str| {
            c1.get(key)
                .map_or(f64::NAN, |s: &Stats| s.percentile_ms(0.5))
        };
        checks.push(Check {
            name: "duplicate CreatePayment p50 / floor p50, c=1",
            value: dp / fp,
            target: TARGET_P50_VS_FLOOR,
            at_least: false,
            detail: format!(
                "{dp:.2} vs {fp:.2} ms (floor's own duplicate: {:.2} ms)",
                like("floor_dup")
            ),
        });
        checks.push(Check {
            name: "GetPayment p50 / floor p50, c=1",
            value: gp / fp,
            target: TARGET_P50_VS_FLOOR,
            at_least: false,
            detail: format!(
                "{gp:.2} vs {fp:.2} ms (floor's own read: {:.2} ms)",
                like("floor_get")
            ),
        });
    }
    let service_rss_max = rows
        .iter()
        .chain(c1.values())
        .filter_map(|s| s.proc("service").and_then(|p| p.rss_max_kb))
        .max();
    let service_hwm = bench
        .pids
        .iter()
        .find(|(role, _)| *role == "service")
        .and_then(|&(_, pid)| proc_status_kb(pid, "VmHWM"));
    // The peak: the largest VmRSS sampled, or the kernel's high-water mark (VmHWM), which
    // also catches spikes between samples (e.g. a hash table copied while it grows).
    if let Some(peak) = service_rss_max.max(service_hwm) {
        checks.push(Check {
            name: "payment-service peak RSS under load, MB",
            value: peak as f64 / 1024.0,
            target: TARGET_RSS_MB,
            at_least: false,
            detail: format!(
                "largest VmRSS sampled every 100 ms {}, VmHWM at the end {}",
                service_rss_max.map_or("-".into(), |kb| format!("{:.1} MB", kb as f64 / 1024.0)),
                service_hwm.map_or("-".into(), |kb| format!("{:.1} MB", kb as f64 / 1024.0))
            ),
        });
    }
    println!();
    println!("targets:");
    for check in &checks {
        check.print();
    }
    let noise = rows
        .iter()
        .chain(c1.values())
        .map(Stats::other_cores)
        .fold(0.0, f64::max);
    warn_noise(noise);

    let mut scenarios: Vec<Value> = rows.iter().map(Stats::to_json).collect();
    scenarios.extend(
        floor_rounds
            .iter()
            .chain(&create_rounds)
            .map(Stats::to_json),
    );
    Ok(json!({
        "mode": "standard",
        "scenarios": scenarios,
        "concurrency_1": c1.iter().map(|(k, s)| (k.to_string(), s.to_json())).collect::<serde_json::Map<_, _>>(),
        "checks": checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        "other_processes_cpu_cores_max": round3(noise),
        "service_rss_max_mb": service_rss_max.map(kb_to_mb),
        "service_vmhwm_mb": service_hwm.map(kb_to_mb),
        "floor_vmhwm_mb": bench.pids.iter().find(|(r, _)| *r == "floor").and_then(|&(_, pid)| proc_status_kb(pid, "VmHWM")).map(kb_to_mb),
        "server_vmhwm_mb": bench.pids.iter().find(|(r, _)| *r == "server").and_then(|&(_, pid)| proc_status_kb(pid, "VmHWM")).map(kb_to_mb),
    }))
}

/// Several rounds of one scenario as one: counts and latencies pooled, time summed.
fn merge(name: &str, rounds: &[Stats]) -> Stats {
    let mut all = Stats {
        name: name.to_owned(),
        concurrency: rounds.first().map_or(0, |s| s.concurrency),
        ..Stats::default()
    };
    for s in rounds {
        all.ok += s.ok;
        all.elapsed += s.elapsed;
        all.machine_busy_seconds += s.machine_busy_seconds;
        for (k, v) in &s.errors {
            *all.errors.entry(k.clone()).or_default() += v;
        }
        all.latencies_us.extend(&s.latencies_us);
        for p in &s.procs {
            match all.procs.iter_mut().find(|q| q.role == p.role) {
                Some(q) => {
                    q.cpu_seconds += p.cpu_seconds;
                    q.rss_max_kb = q.rss_max_kb.max(p.rss_max_kb);
                }
                None => all.procs.push(p.clone()),
            }
        }
    }
    all.latencies_us.sort_unstable();
    all
}

async fn scale(args: &Args, bench: &Bench, id: &str) -> anyhow::Result<Value> {
    let create = |name: &str, prefix: String| args.create_fresh(name, prefix);
    let get = |name: &str, pool: &Arc<Vec<String>>| Scenario {
        expect: Some("\"status\""),
        ..args.scenario(
            name,
            "PaymentService",
            "GetPayment",
            EMPTY_BODY,
            Keys::Random(Arc::clone(pool)),
        )
    };
    let mut stored: Vec<String> = Vec::new();
    if args.warmup > 0 {
        eprintln!("warm-up: {} s on CreatePayment", args.warmup);
        let w = bench
            .run(&Scenario {
                duration: Duration::from_secs(args.warmup),
                ..create("warm-up", format!("{id}-w"))
            })
            .await;
        stored.extend(w.created);
    }
    let settle = |at: &'static str| async move {
        if let Some(waited) = bench.settle(Duration::from_secs(120)).await {
            println!(
                "restate-server idle after {:.1} s ({at})",
                waited.as_secs_f64()
            );
        }
    };
    settle("before the empty-server measurement").await;
    print_header();
    let empty_create = bench
        .run(&create("create fresh, empty", format!("{id}-e")))
        .await;
    print_row(&empty_create);
    stored.extend(empty_create.created.iter().cloned());
    let pool = Arc::new(stored.clone());
    let empty_get = bench.run(&get("get, empty", &pool)).await;
    print_row(&empty_get);
    let stored_at_empty = stored.len();

    let missing = args.preload.saturating_sub(stored.len() as u64);
    println!(
        "preloading {missing} payments ({} stored so far) at concurrency {} ...",
        stored.len(),
        args.concurrency
    );
    let preload = bench
        .run(&Scenario {
            duration: Duration::from_secs(24 * 3600),
            limit: Some(missing),
            ..create("preload", format!("{id}-p"))
        })
        .await;
    print_row(&preload);
    if preload.error_count() > 0 {
        eprintln!("preload: {} errors", preload.error_count());
    }
    stored.extend(preload.created.iter().cloned());
    let pool = Arc::new(stored.clone());
    settle("after the preload").await;
    let loaded_create = bench
        .run(&create("create fresh, 100k stored", format!("{id}-l")))
        .await;
    print_row(&loaded_create);
    let loaded_get = bench.run(&get("get, 100k stored", &pool)).await;
    print_row(&loaded_get);

    let p99_check = |name: &'static str, loaded: &Stats, empty: &Stats| Check {
        name,
        value: loaded.percentile_ms(0.99) / empty.percentile_ms(0.99),
        target: TARGET_P99_LOADED_VS_EMPTY,
        at_least: false,
        detail: format!(
            "{:.2} vs {:.2} ms; {:.0} vs {:.0} req/s; CPU {:.0} vs {:.0} µs/request; \
             other processes {:.2} vs {:.2} cores",
            loaded.percentile_ms(0.99),
            empty.percentile_ms(0.99),
            loaded.throughput(),
            empty.throughput(),
            loaded.stack_cpu_us(),
            empty.stack_cpu_us(),
            loaded.other_cores(),
            empty.other_cores(),
        ),
    };
    let mut checks = vec![
        p99_check(
            "CreatePayment p99, stored / empty",
            &loaded_create,
            &empty_create,
        ),
        p99_check("GetPayment p99, stored / empty", &loaded_get, &empty_get),
    ];
    let service_hwm = bench
        .pids
        .iter()
        .find(|(role, _)| *role == "service")
        .and_then(|&(_, pid)| proc_status_kb(pid, "VmHWM"));
    let service_rss_max = [&loaded_create, &loaded_get]
        .iter()
        .filter_map(|s| s.proc("service").and_then(|p| p.rss_max_kb))
        .max()
        .max(service_hwm);
    if let Some(kb) = service_rss_max {
        checks.push(Check {
            name: "payment-service peak RSS, stored, MB",
            value: kb as f64 / 1024.0,
            target: TARGET_RSS_MB,
            at_least: false,
            detail: format!(
                "largest of VmRSS sampled every 100 ms and VmHWM, with {} payments stored \
                 (empty server: {})",
                stored.len(),
                [&empty_create, &empty_get]
                    .iter()
                    .filter_map(|s| s.proc("service").and_then(|p| p.rss_max_kb))
                    .max()
                    .map_or("-".into(), |kb| format!("{:.1} MB", kb as f64 / 1024.0))
            ),
        });
    }
    println!();
    println!(
        "stored payments: {stored_at_empty} during the empty-server measurement, {} after the preload",
        stored.len()
    );
    println!("targets:");
    for check in &checks {
        check.print();
    }
    let noise = [&empty_create, &empty_get, &loaded_create, &loaded_get]
        .iter()
        .map(|s| s.other_cores())
        .fold(0.0, f64::max);
    warn_noise(noise);
    Ok(json!({
        "mode": "scale",
        "other_processes_cpu_cores_max": round3(noise),
        "stored_during_empty": stored_at_empty,
        "stored_after_preload": stored.len(),
        "scenarios": [empty_create.to_json(), empty_get.to_json(), preload.to_json(), loaded_create.to_json(), loaded_get.to_json()],
        "checks": checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        "service_vmhwm_mb": bench.pids.iter().find(|(r, _)| *r == "service").and_then(|&(_, pid)| proc_status_kb(pid, "VmHWM")).map(kb_to_mb),
        "server_vmhwm_mb": bench.pids.iter().find(|(r, _)| *r == "server").and_then(|&(_, pid)| proc_status_kb(pid, "VmHWM")).map(kb_to_mb),
    }))
}

// ---------------------------------------------------------------------------------------------
// Comparing two summaries (e.g. the tuned configuration against stock settings)

fn compare(a_path: &PathBuf, b_path: &PathBuf) -> anyhow::Result<()> {
    let read = |p: &PathBuf| -> anyhow::Result<Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let (a, b) = (read(a_path)?, read(b_path)?);
    let label = |v: &Value, p: &PathBuf| {
        v["label"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map_or_else(|| p.display().to_string(), str::to_owned)
    };
    let (la, lb) = (label(&a, a_path), label(&b, b_path));
    let index = |v: &Value| -> BTreeMap<String, Value> {
        let mut map = BTreeMap::new();
        for s in v["scenarios"].as_array().into_iter().flatten() {
            if let Some(name) = s["name"].as_str() {
                map.insert(name.to_owned(), s.clone());
            }
        }
        for s in v["concurrency_1"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(_, s)| s)
        {
            if let Some(name) = s["name"].as_str() {
                map.insert(name.to_owned(), s.clone());
            }
        }
        map
    };
    let (ia, ib) = (index(&a), index(&b));
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
    // CPU per request of restate-server, the handler's process and the client, µs. Unlike
    // req/s, it hardly depends on what else the machine runs at the time.
    let cpu = |s: &Value| s["stack_cpu_us_per_request"].as_f64().unwrap_or(f64::NAN);
    for (name, sa) in &ia {
        if name.contains("(round") {
            continue;
        }
        let Some(sb) = ib.get(name) else { continue };
        let num = |s: &Value, ptr: &str| s.pointer(ptr).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let (ra, rb) = (num(sa, "/throughput_rps"), num(sb, "/throughput_rps"));
        let (pa, pb) = (num(sa, "/latency_ms/p99"), num(sb, "/latency_ms/p99"));
        let (ca, cb) = (cpu(sa), cpu(sb));
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

// ---------------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; anything else (`cargo test --all-targets`) is not a run.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("payments bench: not started by `cargo bench`, nothing to do");
        return Ok(());
    }
    let args = Args::parse();
    if let Some(paths) = &args.compare {
        return compare(&paths[0], &paths[1]);
    }
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async_main(args))
}

async fn async_main(args: Args) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency + 8)
        .timeout(Duration::from_secs(args.timeout))
        .tcp_nodelay(true)
        .build()?;
    let ingress = args.ingress.trim_end_matches('/').to_owned();
    let health = client
        .get(format!("{ingress}/restate/health"))
        .send()
        .await
        .with_context(|| format!("ingress {ingress} unreachable"))?;
    anyhow::ensure!(
        health.status().is_success(),
        "ingress {ingress} not healthy: HTTP {}",
        health.status()
    );
    let mut pids = Vec::new();
    for (role, pid) in [
        ("service", args.service_pid),
        ("floor", args.floor_pid),
        ("server", args.server_pid),
    ] {
        if let Some(pid) = pid {
            anyhow::ensure!(
                proc_status_kb(pid, "VmRSS").is_some(),
                "--{role}-pid {pid}: no such process"
            );
            pids.push((role, pid));
        }
    }
    pids.push(("client", std::process::id()));
    let bench = Bench {
        client,
        ingress,
        pids,
    };
    let id = run_id();
    println!(
        "payments bench{}: mode {:?}, concurrency {}, {} s per scenario, ingress {}",
        if args.label.is_empty() {
            String::new()
        } else {
            format!(" [{}]", args.label)
        },
        args.mode,
        args.concurrency,
        args.duration,
        bench.ingress
    );
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut summary = match args.mode {
        Mode::Standard => standard(&args, &bench, &id).await?,
        Mode::Scale => scale(&args, &bench, &id).await?,
    };
    summary["label"] = json!(args.label);
    summary["note"] = json!(args.note);
    summary["started_unix"] = json!(started);
    summary["machine"] = machine();
    summary["settings"] = json!({
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "round_duration_s": args.round_duration,
        "latency_duration_s": args.latency_duration,
        "warmup_s": args.warmup,
        "preload": args.preload,
        "ingress": bench.ingress,
    });
    let text = serde_json::to_string_pretty(&summary)?;
    println!();
    println!("JSON summary:");
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("JSON summary written to {}", path.display());
    }
    Ok(())
}
