//! The crash test: payments under load while payment-service and restate-server (or the nodes
//! of a cluster) are SIGKILLed and restarted, then an audit of what the gateway did against
//! what Restate and the clients saw.
//!
//! ```text
//! cargo test --test crash                        # the small run (CI)
//! stackctl crash --full                          # the full run (scripts/crash-test.sh)
//! stackctl crash --full --seed 42                # replay a schedule
//! stackctl crash --full --cluster                # on a three-node cluster
//! stackctl crash --full --gateway-process        # the gateway as a process, with its faults
//! ```
//!
//! With `--gateway-process` the gateway is `mock-gateway` (the service reaches it as Stripe,
//! `--gateway stripe`), and on top of the kills above it is SIGKILLed and started again, drops
//! answers after acting and hangs, at rates drawn from the seed; the service runs with short
//! attempts and settle rounds ([`plan::GATEWAY_PROCESS_SERVICE_ENV`]), and the audit reads the
//! gateway's own ledger and counts the unknown outcomes the service settled by itself.
//!
//! * [`plan`]: the load and the kills, from the seed;
//! * the clients ([`flows`]): 2-3 concurrent `CreatePayment` per payment ID, then refunds
//!   (some duplicated, some partial, some of declined payments), through the typed client,
//!   which retries connection errors, timeouts and 5xx with the same payment ID until
//!   answered, moving to the next ingress that is up;
//! * [`chaos`]: the kills, executed on the stack;
//! * then nobody intervenes: the run waits (admin SQL API) until no `PaymentService`
//!   invocation is left unfinished, reads the end state, and [`audit`]s it;
//! * [`report`]: the summary and, on failure, each suspect payment's ledger lines and journal.

pub mod audit;
pub mod chaos;
pub mod flows;
pub mod plan;
pub mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use payment_service::gateway::MockConfig;

use self::audit::{EndState, Findings};
use self::plan::{DECLINE_RATE, GATEWAY_DELAY_MS, GATEWAY_PROCESS_SERVICE_ENV, Params};
use crate::admin::Invocation;
use crate::process;
use crate::stack::Stack;

/// Options of `stackctl crash` (defaults: the small run on one node).
#[derive(Debug, Clone, clap::Args)]
pub struct CrashArgs {
    /// The full run: 240 payments, 20 s of kills, 2 server kills (cluster: 30 s, 3 node kills).
    #[arg(long, overrides_with = "small")]
    pub full: bool,
    /// The small run (the default; CI's): 60 payments, 8 s of kills, 1 server kill (cluster:
    /// 40 payments, 1 node kill). The last of `--full` and `--small` wins.
    #[arg(long, overrides_with = "full")]
    pub small: bool,
    /// On a three-node Restate cluster (replication 2): load across the three ingresses,
    /// SIGKILL + restart of one node at a time.
    #[arg(long)]
    pub cluster: bool,
    /// Replay a schedule (default: a random seed, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Payment IDs (default: 240 full, 60 small, 40 small on a cluster).
    #[arg(long)]
    pub payments: Option<usize>,
    /// Seconds of kills (the service every 1-2 s).
    #[arg(long)]
    pub duration: Option<f64>,
    /// restate-server kills during that time (cluster: node kills).
    #[arg(long)]
    pub server_kills: Option<usize>,
    /// The gateway's delay between acting and answering (default: 50-150, from the seed).
    #[arg(long)]
    pub response_delay_ms: Option<u64>,
    /// Seconds the system may take to settle after the last kill.
    #[arg(long)]
    pub recovery_timeout: Option<f64>,
    /// Keep the temp dir (logs, ledger, server data) even when the run passes.
    #[arg(long)]
    pub keep: bool,
    /// Fault injection: the gateway's key check off. The run must then fail.
    #[arg(long, env = "GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS", value_parser = clap::builder::BoolishValueParser::new())]
    pub ignore_keys: bool,
    /// The gateway as a process (`mock-gateway`, the service with `--gateway stripe`), killed
    /// and restarted, dropping answers and hanging, on top of the other kills.
    #[arg(long)]
    pub gateway_process: bool,
    /// With --gateway-process: SIGKILLs of the gateway (default: 2 full, 1 small).
    #[arg(long, requires = "gateway_process")]
    pub gateway_kills: Option<usize>,
    /// With --gateway-process: share of calls answered 5xx/429 before acting (default: from
    /// the seed, 0.01-0.04).
    #[arg(long, requires = "gateway_process")]
    pub error_rate: Option<f64>,
    /// With --gateway-process: share of calls whose answer is dropped after acting (default:
    /// from the seed, 0.03-0.08).
    #[arg(long, requires = "gateway_process")]
    pub drop_response_rate: Option<f64>,
    /// With --gateway-process: share of calls never answered (default: from the seed,
    /// 0.01-0.03).
    #[arg(long, requires = "gateway_process")]
    pub hang_rate: Option<f64>,
}

impl CrashArgs {
    /// The run's parameters: the defaults of its size, with the options given.
    pub fn params(&self) -> Params {
        let seed = self.seed.unwrap_or_else(rand::random);
        let mut p = Params::new(
            self.full && !self.small,
            if self.cluster { 3 } else { 1 },
            seed,
        );
        if let Some(n) = self.payments {
            p.payments = n.max(1);
        }
        if let Some(s) = self.duration {
            p.duration = Duration::from_secs_f64(s.clamp(1.0, 3600.0));
        }
        if let Some(n) = self.server_kills {
            p.server_kills = n;
        }
        if let Some(ms) = self.response_delay_ms {
            p.response_delay_ms = ms;
        }
        if let Some(s) = self.recovery_timeout {
            p.recovery_timeout = Duration::from_secs_f64(s.clamp(1.0, 3600.0));
        }
        p.ignore_keys = self.ignore_keys;
        if self.gateway_process {
            p = p.with_gateway_process();
            let g = &mut p.gateway;
            for (value, given) in [
                (&mut g.error_rate, self.error_rate),
                (&mut g.drop_response_rate, self.drop_response_rate),
                (&mut g.hang_rate, self.hang_rate),
            ] {
                if let Some(rate) = given {
                    *value = rate.clamp(0.0, 1.0);
                }
            }
            if let Some(n) = self.gateway_kills {
                g.kills = n;
            }
        }
        p
    }

    /// The command that replays this run.
    pub fn replay_command(&self, seed: u64) -> String {
        let mut cmd = String::from("scripts/crash-test.sh");
        if !self.full || self.small {
            cmd.push_str(" --small");
        }
        if self.cluster {
            cmd.push_str(" --cluster");
        }
        if self.gateway_process {
            cmd.push_str(" --gateway-process");
        }
        cmd.push_str(&format!(" --seed {seed}"));
        for (flag, value) in [
            ("--payments", self.payments.map(|v| v.to_string())),
            ("--duration", self.duration.map(|v| v.to_string())),
            ("--server-kills", self.server_kills.map(|v| v.to_string())),
            (
                "--response-delay-ms",
                self.response_delay_ms.map(|v| v.to_string()),
            ),
            (
                "--recovery-timeout",
                self.recovery_timeout.map(|v| v.to_string()),
            ),
            ("--gateway-kills", self.gateway_kills.map(|v| v.to_string())),
            ("--error-rate", self.error_rate.map(|v| v.to_string())),
            (
                "--drop-response-rate",
                self.drop_response_rate.map(|v| v.to_string()),
            ),
            ("--hang-rate", self.hang_rate.map(|v| v.to_string())),
        ] {
            if let Some(v) = value {
                cmd.push_str(&format!(" {flag} {v}"));
            }
        }
        if self.ignore_keys {
            cmd = format!("GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS=1 {cmd}");
        }
        cmd
    }
}

/// `stackctl crash`: runs, prints the summary and the replay command; whether it passed.
pub fn run_cli(args: CrashArgs) -> anyhow::Result<bool> {
    let params = args.params();
    let began = Instant::now();
    let passed = match run(&params, None, args.keep) {
        Ok(outcome) => outcome.passed(),
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
        args.replay_command(params.seed)
    );
    println!("crash: {}", if passed { "PASSED" } else { "FAILED" });
    Ok(passed)
}

/// A finished run.
pub struct Outcome {
    pub findings: Findings,
    pub dir: PathBuf,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.findings.violations.is_empty()
    }
}

/// Runs the crash test with `params` (`service_bin`: the payment-service binary, default the
/// build's own). On failure, or with `keep`, the temp dir stays (logs, ledger,
/// `violations.txt`, `suspects.txt`, the server's data).
pub fn run(params: &Params, service_bin: Option<PathBuf>, keep: bool) -> anyhow::Result<Outcome> {
    let plans = plan::payments(params);
    let kills = plan::kills(params);
    report::announce(params, &kills);
    let began = Instant::now();
    let g = &params.gateway;
    let mut builder = Stack::builder().nodes(params.nodes).gateway(MockConfig {
        delay: Duration::from_millis(GATEWAY_DELAY_MS),
        decline_rate: DECLINE_RATE,
        error_rate: g.error_rate,
        drop_response_rate: g.drop_response_rate,
        hang_rate: g.hang_rate,
        response_delay: Duration::from_millis(params.response_delay_ms),
        ledger: None,
        ignore_idempotency_keys: params.ignore_keys,
        settle_delay: plan::SETTLE_DELAY,
        ..MockConfig::default()
    });
    // Short holds and deadlines: the plan's holds left alone expire within the run, and its
    // charges no customer confirms are cancelled within it.
    builder = builder
        .service_env("HOLD_EXPIRY", plan::HOLD_EXPIRY)
        .service_env("CONFIRM_DEADLINE", plan::CONFIRM_DEADLINE);
    if params.gateway_process {
        builder = builder.gateway_process().webhooks(plan::WEBHOOK_SECRET);
        for (name, value) in GATEWAY_PROCESS_SERVICE_ENV {
            builder = builder.service_env(name, value);
        }
    }
    if let Some(bin) = service_bin {
        builder = builder.service_bin(bin);
    }
    let stack = builder.start().with_context(|| {
        if params.ignore_keys {
            "the key check can be switched off only in a build with the fault-injection feature \
             (scripts/crash-test.sh builds one; or set PAYMENT_SERVICE_BIN and MOCK_GATEWAY_BIN)"
        } else {
            "starting the stack"
        }
    })?;
    report::stack_up(&stack, began.elapsed());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = stack.client().with_timeout(Duration::from_secs(12));
    // Until the kills are over, clients never give up.
    client.retry_until(Some(Instant::now() + Duration::from_secs(24 * 3600)));

    let t0 = Instant::now();
    let load = rt.spawn(flows::run_all(client.clone(), plans.clone(), t0));
    let chaos = chaos::run(&stack, &kills, t0);
    let last_kill = Instant::now();
    let deadline = last_kill + params.recovery_timeout;
    client.retry_until(Some(deadline));
    if let Some(e) = &chaos.error {
        println!("crash: chaos stopped: {e}");
        stack
            .ensure_up()
            .context("bringing the stack back up after the chaos stopped")?;
    }

    // Recovery, by itself: first the clients (they retry until answered), then the
    // invocations nobody waits for any more.
    let logs = rt.block_on(load).context("the clients' task")?;
    let clients_done = last_kill.elapsed();
    let unfinished = wait_for_invocations(&stack, deadline.max(Instant::now()));
    let settled = last_kill.elapsed();

    client.retry_until(Some(Instant::now() + Duration::from_secs(30)));
    let finals = rt.block_on(flows::final_states(client.clone(), plans.clone()));
    let end = end_state(&stack, finals, unfinished)?;
    let findings = audit::audit(params, &plans, &logs, &end, &chaos);
    report::summary(&report::Summary {
        params,
        plans: &plans,
        logs: &logs,
        counters: &client.counters,
        chaos: &chaos,
        end: &end,
        findings: &findings,
        clients: clients_done,
        settled,
    });
    let outcome = Outcome {
        findings,
        dir: stack.dir.clone(),
    };
    if !outcome.passed() || keep {
        process::keep_temp_dirs();
        report::keep(&stack, &outcome.findings, &end);
    }
    stack.stop();
    Ok(outcome)
}

/// Polls until no `PaymentService` invocation is left unfinished, or until `deadline`;
/// returns those left. On a cluster, every node's admin API must say so, and the same number
/// of invocations, twice in a row.
fn wait_for_invocations(stack: &Stack, deadline: Instant) -> Vec<Invocation> {
    let mut last_report = Instant::now();
    let mut last_count = None;
    loop {
        let unfinished = agreed(stack, |a| a.unfinished());
        if unfinished.as_ref().is_ok_and(Vec::is_empty) {
            if stack.node_count() == 1 {
                return Vec::new();
            }
            let count = agreed(stack, |a| a.invocation_count()).ok();
            if count.is_some() && count == last_count {
                return Vec::new();
            }
            last_count = count;
        } else {
            last_count = None;
        }
        if Instant::now() >= deadline {
            return unfinished.unwrap_or_default();
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            match &unfinished {
                Ok(rows) => println!("crash: waiting for {} invocations to finish", rows.len()),
                Err(e) => println!("crash: waiting for invocations to finish: {e:#}"),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A query whose answer the audit relies on. On a cluster every node's admin API must give
/// the same answer: a node whose view is behind cannot stand for the cluster.
fn agreed<T: PartialEq + std::fmt::Debug>(
    stack: &Stack,
    query: impl Fn(&crate::admin::Admin) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let first = query(&stack.admin(0)).with_context(|| stack.node_name(0).to_owned())?;
    for i in 1..stack.node_count() {
        let other = query(&stack.admin(i)).with_context(|| stack.node_name(i).to_owned())?;
        anyhow::ensure!(
            other == first,
            "{} and {} disagree",
            stack.node_name(0),
            stack.node_name(i)
        );
    }
    Ok(first)
}

/// [`agreed`], retried for up to a minute while the nodes disagree or fail.
fn settled<T: PartialEq + std::fmt::Debug>(
    stack: &Stack,
    query: impl Fn(&crate::admin::Admin) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match agreed(stack, &query) {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Reads the settled system: the stored refunds and the invocations (admin SQL API, agreed by
/// every node), the gateway's ledger.
fn end_state(
    stack: &Stack,
    finals: Vec<audit::Reply<payment_service::payment::Payment>>,
    unfinished: Vec<Invocation>,
) -> anyhow::Result<EndState> {
    let path = stack
        .ledger()
        .context("the crash test audits the gateway's ledger")?;
    let ledger = crate::ledger::read_ledger(path)?;
    if let Some(torn) = &ledger.torn_tail {
        println!("crash: torn last ledger line (a crash mid-append): {torn}");
    }
    Ok(EndState {
        finals,
        stored_refunds: settled(stack, |a| a.state_key("refund"))?,
        unfinished,
        failed_invocations: settled(stack, |a| a.invocations("completion_result = 'failure'"))?,
        invocations: settled(stack, |a| a.invocation_count())?,
        ledger: ledger.entries,
    })
}
