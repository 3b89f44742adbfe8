//! The kills, executed on a [`Stack`]: SIGKILL, stay down, start again in place, wait until
//! it serves. On one node the kills run in order, one process down at a time. On a cluster
//! the service kills and the node kills run side by side, each in order: the service may be
//! killed while a node is down, but a node is only killed once the one killed before it
//! serves again. The gateway process's kills go in order with the service's.

use std::time::{Duration, Instant};

use super::audit::ChaosLog;
use super::plan::{Kill, Target};
use crate::stack::Stack;

pub fn run(stack: &Stack, kills: &[Kill], t0: Instant) -> ChaosLog {
    let (nodes, services): (Vec<Kill>, Vec<Kill>) = kills
        .iter()
        .partition(|k| matches!(k.target, Target::Node(_)));
    if stack.node_count() == 1 {
        return run_in_order(stack, kills, t0);
    }
    let (from_nodes, from_services) = std::thread::scope(|s| {
        let nodes = s.spawn(|| run_in_order(stack, &nodes, t0));
        let services = run_in_order(stack, &services, t0);
        (
            nodes.join().expect("the node-kill thread panicked"),
            services,
        )
    });
    ChaosLog {
        service_kills: from_services.service_kills,
        gateway_kills: from_services.gateway_kills,
        server_kills: from_nodes.server_kills,
        node_kills: from_nodes.node_kills,
        error: from_nodes.error.or(from_services.error),
    }
}

/// The kills in order, each at its time; time lost waiting for restarts moves the rest of the
/// schedule, which keeps its spacing.
fn run_in_order(stack: &Stack, kills: &[Kill], t0: Instant) -> ChaosLog {
    let mut log = ChaosLog {
        node_kills: vec![0; stack.node_count()],
        ..ChaosLog::default()
    };
    let mut shift = Duration::ZERO;
    for kill in kills {
        let due = t0 + kill.at + shift;
        match due.checked_duration_since(Instant::now()) {
            Some(wait) => std::thread::sleep(wait),
            None => shift += due.elapsed(),
        }
        if let Some(died) = stack.died() {
            log.error = Some(died);
            break;
        }
        let at = t0.elapsed().as_secs_f64();
        let name = name(stack, kill.target);
        let killed = match kill.target {
            Target::Service => Ok(stack.kill_service()),
            Target::Gateway => stack.kill_gateway(),
            Target::Node(i) => stack.kill_node(i),
        };
        match killed {
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
            Target::Gateway => log.gateway_kills += 1,
            Target::Node(i) => {
                log.server_kills += 1;
                log.node_kills[i] += 1;
            }
        }
        std::thread::sleep(kill.down_for);
        match restart(stack, kill.target) {
            Ok(line) => println!(
                "crash: t={at:6.2}s  SIGKILL {name:<15} down {:>4} ms, {line}",
                kill.down_for.as_millis()
            ),
            Err(e) => {
                log.error = Some(format!("restarting {name} failed: {e:#}"));
                break;
            }
        }
    }
    if log.error.is_none() {
        log.error = stack.died();
    }
    log
}

/// Starts the target again (up to three tries); how long it took, as a log line.
fn restart(stack: &Stack, target: Target) -> anyhow::Result<String> {
    let mut last = anyhow::anyhow!("not tried");
    for _ in 0..3 {
        let started = match target {
            Target::Service => stack
                .start_service()
                .map(|took| format!("up again after {:>5} ms", took.as_millis())),
            Target::Gateway => stack
                .start_gateway()
                .map(|took| format!("up again after {:>5} ms", took.as_millis())),
            Target::Node(i) => stack.start_node(i).map(|s| {
                format!(
                    "up again after {:>5} ms, serving after {:>5} ms",
                    s.healthy.as_millis(),
                    s.serving.as_millis()
                )
            }),
        };
        match started {
            Ok(line) => return Ok(line),
            Err(e) => last = e,
        }
    }
    Err(last)
}

pub fn name(stack: &Stack, target: Target) -> String {
    match target {
        Target::Service => "payment-service".into(),
        Target::Gateway => "mock-gateway".into(),
        Target::Node(_) if stack.node_count() == 1 => "restate-server".into(),
        Target::Node(i) => stack.node_name(i).to_owned(),
    }
}
