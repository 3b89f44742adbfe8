//! The crash test's small run, as CI runs it: payments under load while payment-service and
//! restate-server are SIGKILLed and restarted, then the audit (see `testkit::crash`). The full
//! runs, the cluster and the replays come from `stackctl crash` (`scripts/crash-test.sh`).
//! `CRASH_SEED=<n>` replays a schedule.

use testkit::crash::{self, plan::Params};

#[test]
fn no_payment_is_charged_twice_or_lost_when_processes_are_killed() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let params = Params::new(false, 1, seed);
    let service = env!("CARGO_BIN_EXE_payment-service").into();
    let outcome = crash::run(&params, Some(service), false).expect("the crash run");
    assert!(
        outcome.passed(),
        "seed {seed}: {} violations, e.g. {}; replay with CRASH_SEED={seed}; kept {}",
        outcome.findings.violations.len(),
        outcome.findings.violations[0],
        outcome.dir.display()
    );
}
