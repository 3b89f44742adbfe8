#!/usr/bin/env bash
# The full crash test (README "Crash test"), release build: `stackctl crash --full` with any
# other options passed on (--seed N, --cluster, --small, --payments N, --duration S,
# --server-kills N, --response-delay-ms N, --recovery-timeout S, --keep, --gateway-process
# and its --gateway-kills N, --error-rate R, --drop-response-rate R, --hang-rate R; --help
# lists them). GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS=1 switches the gateway's key check off
# (in the service's mock, or in mock-gateway with --gateway-process; both from a build with the
# fault-injection feature, made here): the run must then fail.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ "${GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS:-}" =~ ^(1|true|yes|on)$ ]]; then
    # The switch exists only in a fault-injection build, kept apart from the production one.
    cargo build -q --release -p payment-service --features fault-injection --target-dir target/fault-injection
    export PAYMENT_SERVICE_BIN="$PWD/target/fault-injection/release/payment-service"
    export MOCK_GATEWAY_BIN="$PWD/target/fault-injection/release/mock-gateway"
fi
exec scripts/stackctl crash --full "$@"
