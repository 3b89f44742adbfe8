#!/usr/bin/env bash
# The full crash test (tests/crash.rs): 240 payments with concurrent duplicates,
# client retries, declines and refunds, while payment-service is SIGKILLed and
# restarted every 1-2 s for 20 s and restate-server twice; then it waits for
# the system to settle by itself and audits the gateway's ledger against
# Restate's state and what the clients were told. Prints its figures, ends with
# `crash: 1 passed, 0 failed` (exit 0) or `crash: 0 passed, 1 failed` (exit 1).
#
# Usage: scripts/crash-test.sh [options]     (run in release mode)
#   --seed N               replay a schedule (the seed is printed by every run)
#   --payments N           payment IDs (default 240)
#   --duration S           seconds of kills (default 20)
#   --server-kills N       restate-server kills (default 2)
#   --response-delay-ms N  the gateway's delay between acting and answering
#                          (default: 50-150, from the seed)
#   --recovery-timeout S   how long the system may take to settle (default 180)
#   --keep                 keep the temp dir (logs, ledger, data) even on success
#   --small                the small run CI does instead (`cargo test` runs it)
#   --cluster              on a local three-node Restate cluster (replication 2): load
#                          across the three ingresses, SIGKILL + restart of one node at a
#                          time besides the service kills; 30 s of kills, 3 node kills
#                          (one per node) by default, --server-kills N for more
#
# GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS=1 switches off the gateway's key
# check: the run must then fail with double charges. On a failure the temp dir
# is kept and its path printed (logs, ledger, violations.txt, suspects.txt).
# RESTATE_SERVER_BIN overrides the server binary (default: the pinned one,
# installed by scripts/install-restate.sh if missing).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

for arg in "$@"; do
    case "$arg" in
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
    esac
done

if [[ -z "${RESTATE_SERVER_BIN:-}" ]]; then
    scripts/install-restate.sh
    RESTATE_SERVER_BIN="$repo_root/scripts/restate/node_modules/.bin/restate-server"
fi
export RESTATE_SERVER_BIN

exec cargo test --release --test crash -- --full "$@"
