//! The one load engine: the benchmark, the crash test and the cluster measurements drive the
//! stack through it, and measure it the same way.
//!
//! * [`closed_loop`]: `workers` tasks, each sending its next request when the last one is
//!   answered, for a duration or a number of requests; every request is a [`Record`].
//! * [`scheduled`]: tasks started at planned offsets from a common start (the crash test's
//!   payments), each running its own flow.
//! * Latencies go into an `hdrhistogram` (microseconds, 3 significant digits); percentiles are
//!   read from it, whoever measured.
//! * [`Sampler`]: CPU time and resident memory of named processes, and of the whole machine
//!   (`procfs`), over a run; [`machine`]: what the machine is.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use procfs::{Current as _, CurrentSI as _};

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered as expected; `detail` is whatever the caller keeps (e.g. a charge ID).
    Ok { detail: Option<String> },
    /// Anything else: a short kind (e.g. `HTTP 503`, `timeout`, `refused`).
    Error(String),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }
}

/// One request of a run.
#[derive(Debug, Clone)]
pub struct Record {
    pub worker: usize,
    /// The payment ID (or other key) it was for.
    pub key: String,
    /// Which ingress it went to.
    pub ingress: usize,
    /// Since the start of the run.
    pub start: Duration,
    pub end: Duration,
    pub outcome: Outcome,
}

impl Record {
    pub fn latency(&self) -> Duration {
        self.end.saturating_sub(self.start)
    }
}

/// A closed loop (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct ClosedLoop {
    pub workers: usize,
    /// Stop sending after this long...
    pub duration: Duration,
    /// ...or after this many requests.
    pub limit: Option<u64>,
    /// How long a worker waits after a request that failed before it sends the next one (in
    /// no request's latency): a client does not spin on a dead server.
    pub error_pause: Duration,
}

/// What a request function returns: the key, the ingress and the outcome; `None` when the
/// worker has nothing left to send.
pub type Sent = Option<(String, usize, Outcome)>;

/// Runs `request(worker, n)` closed loop (`n` counts requests across workers), sampling
/// `processes` meanwhile.
pub async fn closed_loop<F, Fut>(spec: ClosedLoop, processes: &[(&str, u32)], request: F) -> Run
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Sent> + Send + 'static,
{
    let request = Arc::new(request);
    let counter = Arc::new(AtomicU64::new(0));
    let sampler = Sampler::start(processes);
    let t0 = Instant::now();
    let deadline = t0 + spec.duration;
    let workers: Vec<_> = (0..spec.workers)
        .map(|worker| {
            let (request, counter) = (Arc::clone(&request), Arc::clone(&counter));
            tokio::spawn(async move {
                let mut records = Vec::new();
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    if spec.limit.is_some_and(|limit| n >= limit) {
                        break;
                    }
                    let start = t0.elapsed();
                    let Some((key, ingress, outcome)) = request(worker, n).await else {
                        break;
                    };
                    let failed = !outcome.is_ok();
                    records.push(Record {
                        worker,
                        key,
                        ingress,
                        start,
                        end: t0.elapsed(),
                        outcome,
                    });
                    if failed && !spec.error_pause.is_zero() {
                        tokio::time::sleep(spec.error_pause).await;
                    }
                }
                records
            })
        })
        .collect();
    let mut records = Vec::new();
    for w in workers {
        records.extend(w.await.expect("a load worker panicked"));
    }
    let elapsed = t0.elapsed();
    Run {
        records,
        elapsed,
        usage: sampler.stop().await,
    }
}

/// Starts `run(item)` for every `(offset, item)` at `t0 + offset`; the results in plan order.
pub async fn scheduled<T, R, F, Fut>(t0: Instant, plan: Vec<(Duration, T)>, run: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let run = Arc::new(run);
    let tasks: Vec<_> = plan
        .into_iter()
        .map(|(offset, item)| {
            let run = Arc::clone(&run);
            tokio::spawn(async move {
                tokio::time::sleep_until((t0 + offset).into()).await;
                run(item).await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.expect("a scheduled task panicked"));
    }
    results
}

/// A finished run.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub records: Vec<Record>,
    pub elapsed: Duration,
    pub usage: Usage,
}

impl Run {
    pub fn ok(&self) -> u64 {
        self.records.iter().filter(|r| r.outcome.is_ok()).count() as u64
    }

    /// Error kinds and how often each happened.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        let mut errors = BTreeMap::new();
        for r in &self.records {
            if let Outcome::Error(kind) = &r.outcome {
                *errors.entry(kind.clone()).or_default() += 1;
            }
        }
        errors
    }

    pub fn error_count(&self) -> u64 {
        self.records.len() as u64 - self.ok()
    }

    /// Successful requests per second.
    pub fn throughput(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latencies of the records `keep` selects.
    pub fn latency(&self, keep: impl Fn(&Record) -> bool) -> Latency {
        Latency::of(self.records.iter().filter(|r| keep(r)).map(Record::latency))
    }

    /// The keys answered `Ok`, in order of completion.
    pub fn ok_keys(&self) -> Vec<String> {
        let mut ok: Vec<&Record> = self.records.iter().filter(|r| r.outcome.is_ok()).collect();
        ok.sort_by_key(|r| r.end);
        ok.into_iter().map(|r| r.key.clone()).collect()
    }

    /// Several runs as one: records pooled (start and end times shifted to follow each other),
    /// time and usage summed.
    pub fn merge<'a>(runs: impl IntoIterator<Item = &'a Run>) -> Run {
        let mut all = Run::default();
        for run in runs {
            let shift = all.elapsed;
            all.records.extend(run.records.iter().cloned().map(|mut r| {
                r.start += shift;
                r.end += shift;
                r
            }));
            all.elapsed += run.elapsed;
            all.usage.add(&run.usage);
        }
        all
    }
}

/// A latency distribution, in microseconds.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Latency {
    pub fn of(latencies: impl IntoIterator<Item = Duration>) -> Self {
        let mut h =
            Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        for l in latencies {
            h.saturating_record((l.as_micros() as u64).max(1));
        }
        Self(h)
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile (0.5 = p50, 1.0 = max) in milliseconds; NaN when empty.
    pub fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.mean() / 1000.0
    }
}

/// CPU and memory of one process over a run.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcUsage {
    pub role: String,
    pub pid: u32,
    pub cpu_seconds: f64,
    /// The largest VmRSS sampled (every 100 ms), kB.
    pub rss_max_kb: Option<u64>,
}

/// What the sampled processes and the machine used over a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub processes: Vec<ProcUsage>,
    /// CPU time the whole machine spent busy (all cores), seconds.
    pub machine_busy_seconds: f64,
    pub seconds: f64,
}

impl Usage {
    pub fn of(&self, role: &str) -> Option<&ProcUsage> {
        self.processes.iter().find(|p| p.role == role)
    }

    /// Cores kept busy by processes other than the sampled ones: the noise of a shared machine.
    pub fn other_cores(&self) -> f64 {
        let ours: f64 = self.processes.iter().map(|p| p.cpu_seconds).sum();
        ((self.machine_busy_seconds - ours) / self.seconds.max(1e-9)).max(0.0)
    }

    fn add(&mut self, other: &Usage) {
        self.machine_busy_seconds += other.machine_busy_seconds;
        self.seconds += other.seconds;
        for p in &other.processes {
            match self.processes.iter_mut().find(|q| q.role == p.role) {
                Some(q) => {
                    q.cpu_seconds += p.cpu_seconds;
                    q.rss_max_kb = q.rss_max_kb.max(p.rss_max_kb);
                }
                None => self.processes.push(p.clone()),
            }
        }
    }
}

/// Samples named processes while a run goes on (see the module doc).
pub struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Usage>,
}

impl Sampler {
    pub fn start(processes: &[(&str, u32)]) -> Self {
        let processes: Vec<(String, u32)> =
            processes.iter().map(|&(r, p)| (r.to_owned(), p)).collect();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let t0 = Instant::now();
            let busy0 = machine_busy_seconds();
            let cpu0: Vec<Option<f64>> = processes.iter().map(|&(_, p)| cpu_seconds(p)).collect();
            let mut rss: Vec<Option<u64>> = vec![None; processes.len()];
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                for (i, &(_, pid)) in processes.iter().enumerate() {
                    if let Some(kb) = status_kb(pid).map(|(rss, _)| rss) {
                        rss[i] = Some(rss[i].map_or(kb, |m| m.max(kb)));
                    }
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => break,
                }
            }
            Usage {
                processes: processes
                    .iter()
                    .enumerate()
                    .map(|(i, (role, pid))| ProcUsage {
                        role: role.clone(),
                        pid: *pid,
                        cpu_seconds: match (cpu0[i], cpu_seconds(*pid)) {
                            (Some(a), Some(b)) => b - a,
                            _ => f64::NAN,
                        },
                        rss_max_kb: rss[i],
                    })
                    .collect(),
                machine_busy_seconds: match (busy0, machine_busy_seconds()) {
                    (Some(a), Some(b)) => b - a,
                    _ => f64::NAN,
                },
                seconds: t0.elapsed().as_secs_f64(),
            }
        });
        Self { stop, task }
    }

    pub async fn stop(self) -> Usage {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// User plus system CPU time of a process (all its threads), seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// A process's resident memory now and its high-water mark (VmRSS, VmHWM), kB.
pub fn status_kb(pid: u32) -> Option<(u64, u64)> {
    let status = procfs::process::Process::new(pid as i32)
        .ok()?
        .status()
        .ok()?;
    Some((status.vmrss?, status.vmhwm?))
}

/// CPU time all cores spent busy since boot (all but idle and iowait), seconds.
pub fn machine_busy_seconds() -> Option<f64> {
    let t = procfs::KernelStats::current().ok()?.total;
    let busy = t.user
        + t.nice
        + t.system
        + t.irq.unwrap_or(0)
        + t.softirq.unwrap_or(0)
        + t.steal.unwrap_or(0);
    Some(busy as f64 / procfs::ticks_per_second() as f64)
}

/// What a measurement ran on, for its summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_kb: Option<u64>,
    /// The 1-, 5- and 15-minute load averages.
    pub loadavg: Option<[f32; 3]>,
}

/// The machine now (see [`Machine`]).
pub fn machine() -> Machine {
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: procfs::CpuInfo::current()
            .ok()
            .and_then(|c| c.model_name(0).map(str::to_owned))
            .unwrap_or_default(),
        mem_total_kb: procfs::Meminfo::current().ok().map(|m| m.mem_total / 1024),
        loadavg: procfs::LoadAverage::current()
            .ok()
            .map(|l| [l.one, l.five, l.fifteen]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let l = Latency::of((1..=100).map(Duration::from_millis));
        assert_eq!(l.count(), 100);
        assert!((l.ms(0.5) - 50.0).abs() < 0.1, "{}", l.ms(0.5));
        assert!((l.ms(0.99) - 99.0).abs() < 0.1, "{}", l.ms(0.99));
        assert!((l.ms(1.0) - 100.0).abs() < 0.1, "{}", l.ms(1.0));
        assert!(Latency::of([]).ms(0.5).is_nan());
    }

    #[tokio::test]
    async fn a_failed_request_pauses_its_worker_outside_any_latency() {
        let spec = ClosedLoop {
            workers: 1,
            duration: Duration::from_millis(300),
            limit: None,
            error_pause: Duration::from_millis(100),
        };
        let run = closed_loop(spec, &[], |_, n| async move {
            Some((format!("k{n}"), 0, Outcome::Error("down".into())))
        })
        .await;
        // One request per pause, not thousands of instant failures.
        assert!(
            (2..=4).contains(&run.records.len()),
            "{}",
            run.records.len()
        );
        assert!(run.latency(|_| true).ms(1.0) < 50.0);
    }

    #[test]
    fn the_machine_is_described() {
        let m = machine();
        assert!(m.cpus > 0);
        assert!(m.mem_total_kb.is_some_and(|kb| kb > 0));
        assert!(m.loadavg.is_some());
    }

    #[tokio::test]
    async fn a_closed_loop_stops_at_its_limit_and_counts_errors() {
        let spec = ClosedLoop {
            workers: 4,
            duration: Duration::from_secs(10),
            limit: Some(20),
            error_pause: Duration::ZERO,
        };
        let run = closed_loop(spec, &[("self", std::process::id())], |_, n| async move {
            let outcome = if n % 4 == 0 {
                Outcome::Error("odd".into())
            } else {
                Outcome::Ok { detail: None }
            };
            Some((format!("k{n}"), 0, outcome))
        })
        .await;
        assert_eq!(run.records.len(), 20);
        assert_eq!(run.ok(), 15);
        assert_eq!(run.errors().get("odd"), Some(&5));
        assert!(run.usage.of("self").is_some_and(|p| p.rss_max_kb.is_some()));
    }
}
