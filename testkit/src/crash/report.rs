//! What the crash test prints: the plan, the stack, the summary, and after a failure the
//! suspects' ledger lines and journals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::audit::{ChaosLog, EndState, Findings, PaymentLog, show};
use super::plan::{DECLINE_RATE, GATEWAY_DELAY_MS, Kill, Params, PaymentPlan, Target};
use crate::client::Counters;
use crate::stack::{CLUSTER_REPLICATION, Stack};

/// Violations printed in full; the rest are counted (all are in `violations.txt`).
const MAX_PRINTED_VIOLATIONS: usize = 60;

pub fn announce(p: &Params, kills: &[Kill]) {
    let nodes: Vec<String> = kills
        .iter()
        .filter_map(|k| match k.target {
            Target::Node(i) => Some(format!("node-{}", i + 1)),
            Target::Service | Target::Gateway => None,
        })
        .collect();
    let gateway_kills = kills.iter().filter(|k| k.target == Target::Gateway).count();
    let servers = if p.cluster() {
        format!(
            "Restate nodes, one at a time: {}; on a {}-node cluster, replication \
             {CLUSTER_REPLICATION}, load across the {} ingresses",
            nodes.join(", "),
            p.nodes,
            p.nodes
        )
    } else {
        "restate-server".to_owned()
    };
    let gateway = if p.gateway_process {
        let g = &p.gateway;
        format!(
            "gateway: mock-gateway process (service --gateway stripe), {gateway_kills} SIGKILLs, \
             error rate {}, drop-response rate {}, hang rate {}, delay {GATEWAY_DELAY_MS} ms",
            g.error_rate, g.drop_response_rate, g.hang_rate
        )
    } else {
        format!(
            "gateway: in-process mock, delay {GATEWAY_DELAY_MS} ms + response delay {} ms",
            p.response_delay_ms
        )
    };
    println!(
        "crash: {} run, seed {}: {} payments, kills for {:.0} s ({} of the service, {} of \
         {servers}); {gateway}; decline rate {DECLINE_RATE}, idempotency keys {}",
        match (p.full, p.cluster()) {
            (true, false) => "full",
            (false, false) => "small",
            (true, true) => "full cluster",
            (false, true) => "small cluster",
        },
        p.seed,
        p.payments,
        p.duration.as_secs_f64(),
        kills.len() - nodes.len() - gateway_kills,
        nodes.len(),
        if p.ignore_keys {
            "IGNORED (GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS: this run must fail)"
        } else {
            "honoured"
        },
    );
}

pub fn stack_up(stack: &Stack, took: Duration) {
    println!(
        "crash: {} node(s) up in {:.1} s, every node serving (ingresses {}; admin APIs {}), \
         service {}; data and logs in {}",
        stack.node_count(),
        took.as_secs_f64(),
        stack.ingress_urls().join(", "),
        (0..stack.node_count())
            .map(|i| stack.admin_url(i))
            .collect::<Vec<_>>()
            .join(", "),
        stack.service_url(),
        stack.dir.display()
    );
}

/// Everything the summary shows.
pub struct Summary<'a> {
    pub params: &'a Params,
    pub plans: &'a [PaymentPlan],
    pub logs: &'a [PaymentLog],
    pub counters: &'a Counters,
    pub chaos: &'a ChaosLog,
    pub end: &'a EndState,
    pub findings: &'a Findings,
    /// From the last kill until every client had its answer.
    pub clients: Duration,
    /// From the last kill until no invocation was left unfinished.
    pub settled: Duration,
}

fn row(k: &str, v: String) {
    println!("  {k:<28} {v}");
}

pub fn summary(s: &Summary<'_>) {
    let p = s.params;
    println!();
    println!(
        "crash: summary ({} run{}, seed {})",
        if p.full { "full" } else { "small" },
        if p.cluster() { ", 3-node cluster" } else { "" },
        p.seed
    );
    load_rows(s);
    client_rows(s);
    gateway_rows(s);
    let f = s.findings;
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
             failed payment or, in parts, more than is left, or of a hold's capture or cancel \
             that came second; {} the 404 of a readiness probe)",
            s.end.invocations,
            s.end.unfinished.len(),
            s.end.failed_invocations.len(),
            f.expected_409s,
            f.probe_404s
        ),
    );
    row(
        "recovery after last kill",
        format!(
            "clients answered in {:.1} s, invocations settled in {:.1} s",
            s.clients.as_secs_f64(),
            s.settled.as_secs_f64()
        ),
    );
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

fn load_rows(s: &Summary<'_>) {
    let plans = s.plans;
    let creates: usize = plans.iter().map(|p| p.creates).sum();
    let refunds_planned: usize = plans.iter().map(|p| p.refunds.len()).sum();
    let refunds_sent: usize = s.logs.iter().map(|l| l.refunds.len()).sum();
    let decline_customers = plans
        .iter()
        .filter(|p| p.customer.starts_with("decline-"))
        .count();
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
            "{refunds_sent} of {refunds_planned} planned, for {} payments ({} duplicated, {} \
             partial)",
            plans.iter().filter(|p| !p.refunds.is_empty()).count(),
            plans.iter().filter(|p| p.refunds.len() > 1).count(),
            plans
                .iter()
                .filter(|p| matches!(p.refunds.first(), Some(Some(a)) if *a > 0 && *a < p.amount))
                .count()
        ),
    );
    let in_parts = plans.iter().filter(|p| !p.keyed_refunds.is_empty());
    let parts: usize = in_parts.clone().map(|p| p.keyed_refunds.len()).sum();
    let parts_sent: usize = s.logs.iter().map(|l| l.keyed_refunds.len()).sum();
    row(
        "refunds in parts",
        format!(
            "{parts_sent} RefundPayment calls with refund keys, {parts} refunds for {} payments \
             (some asking more than is left)",
            in_parts.count()
        ),
    );
}

fn client_rows(s: &Summary<'_>) {
    let c = s.counters;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    row(
        "client retries",
        format!(
            "{} of {} HTTP attempts (connection errors {}, timeouts {}, transient statuses {:?})",
            n(&c.retries),
            n(&c.attempts),
            n(&c.connection_errors),
            n(&c.timeouts),
            crate::process::lock(&c.transient_statuses)
        ),
    );
    let unanswered = s
        .findings
        .violations
        .iter()
        .filter(|v| v.kind.name() == "unanswered")
        .count();
    row("calls left without answer", unanswered.to_string());
    let per_node = |v: &[usize]| {
        v.iter()
            .enumerate()
            .map(|(i, k)| format!("node-{} {k}", i + 1))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if s.params.cluster() {
        let per = |v: &[AtomicU64]| per_node(&v.iter().map(|a| n(a) as usize).collect::<Vec<_>>());
        row(
            "ingresses: attempts",
            format!(
                "{} ({} retries went to another ingress)",
                per(&c.attempts_by_ingress),
                n(&c.moved)
            ),
        );
        row("ingresses: final answers", per(&c.answers_by_ingress));
        row(
            "kills (SIGKILL + restart)",
            format!(
                "payment-service {}, mock-gateway {}, Restate nodes {} ({}; never two down at once)",
                s.chaos.service_kills,
                s.chaos.gateway_kills,
                s.chaos.server_kills,
                per_node(&s.chaos.node_kills)
            ),
        );
    } else {
        row(
            "kills (SIGKILL + restart)",
            format!(
                "payment-service {}, restate-server {}, mock-gateway {}",
                s.chaos.service_kills, s.chaos.server_kills, s.chaos.gateway_kills
            ),
        );
    }
}

fn gateway_rows(s: &Summary<'_>) {
    let f = s.findings;
    row(
        "gateway calls received",
        format!(
            "{} (charges {}, refunds {})",
            s.end.ledger.len(),
            f.ledger_charges,
            f.ledger_refunds
        ),
    );
    if s.params.gateway_process {
        row(
            "gateway process",
            format!(
                "{} SIGKILLs; injected faults: {} errors (5xx/429), {} hangs (before acting), {} \
                 answers dropped (after acting)",
                s.chaos.gateway_kills, f.faults_error, f.faults_hang, f.faults_drop
            ),
        );
    }
    row(
        "holds",
        format!(
            "{} holds ({} CapturePayment/CancelPayment calls): {} captured, {} canceled, {} \
             released when their window ended",
            s.plans.iter().filter(|p| p.hold.is_some()).count(),
            s.logs.iter().map(|l| l.holds.len()).sum::<usize>(),
            f.holds_captured,
            f.holds_canceled,
            f.holds_expired
        ),
    );
    row(
        "paid later",
        format!(
            "{} payments the gateway settled later (processing, or waiting on a customer): {} \
             completed (or held), {} failed (declined later, or cancelled at the deadline)",
            s.plans.iter().filter(|p| p.is_async()).count(),
            f.async_completed,
            f.async_failed
        ),
    );
    row(
        "unknown outcomes settled",
        format!(
            "{} payments and {} refunds had attempts > 0 and were settled by the service itself; \
             {} client answers said pending",
            f.settled_unknown_payments, f.settled_unknown_refunds, f.pending_answers
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
        format!(
            "{} / {} payments",
            f.count("charged-twice"),
            f.count("refunded-twice")
        ),
    );
}

/// Writes `violations.txt` and `suspects.txt` (each suspect payment's ledger lines and
/// journals, from `sys_journal`) into the stack's folder, and prints where they are; the
/// first few suspects also on stdout.
pub fn keep(stack: &Stack, findings: &Findings, end: &EndState) {
    let violations: Vec<String> = findings
        .violations
        .iter()
        .map(ToString::to_string)
        .collect();
    let _ = std::fs::write(stack.dir.join("violations.txt"), violations.join("\n"));
    let admin = stack.live_admin();
    let mut file = String::new();
    for (n, id) in findings.suspects().iter().enumerate() {
        let mut lines = vec![format!("crash: --- {id} ---")];
        lines.extend(
            end.ledger
                .iter()
                .filter(|e| &e.payment_id == id)
                .map(|e| format!("  ledger  {}", show(e))),
        );
        match admin.journal_of(id) {
            Ok(entries) => {
                // One line per invocation: its entries in order, e.g. `Run(charge)`.
                let mut by_invocation: Vec<(String, Vec<String>)> = Vec::new();
                for e in entries {
                    let inv = format!(
                        "{} {} {}",
                        e.id,
                        e.target_handler_name,
                        e.completion_result.as_deref().unwrap_or(&e.status)
                    );
                    let kind = e
                        .entry_type
                        .strip_prefix("Command: ")
                        .unwrap_or(&e.entry_type);
                    let entry = match e.name.as_deref() {
                        Some(name) if !name.is_empty() => format!("{kind}({name})"),
                        _ => kind.to_owned(),
                    };
                    match by_invocation.last_mut() {
                        Some((last, list)) if *last == inv => list.push(entry),
                        _ => by_invocation.push((inv, vec![entry])),
                    }
                }
                lines.extend(
                    by_invocation
                        .into_iter()
                        .map(|(inv, list)| format!("  journal {inv}: {}", list.join(", "))),
                );
            }
            Err(e) => lines.push(format!("  journal query failed: {e:#}")),
        }
        if n < 3 {
            println!("{}", lines.join("\n"));
        }
        file.push_str(&lines.join("\n"));
        file.push('\n');
    }
    let _ = std::fs::write(stack.dir.join("suspects.txt"), file);
    println!(
        "crash: kept {} (node logs, payment-service.log, the gateway's ledger {}, violations.txt, \
         suspects.txt, restate-data/)",
        stack.dir.display(),
        stack
            .ledger()
            .map_or("-".into(), |l| l.display().to_string())
    );
}
