#!/usr/bin/env bash
# The full crash test (README "Crash test"), release build: `stackctl crash --full` with any
# other options passed on (--seed N, --cluster, --small, --payments N, --duration S,
# --server-kills N, --response-delay-ms N, --recovery-timeout S, --keep; --help lists them).
# GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS=1 switches the gateway's key check off: it must fail.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/stackctl" crash --full "$@"
