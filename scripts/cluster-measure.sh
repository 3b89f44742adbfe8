#!/usr/bin/env bash
# "What survives what", measured (README): `stackctl measure`
# (testkit/src/measure.rs), after installing Restate if missing and a release
# build. `scripts/cluster-measure.sh --help` lists the scenarios (steady,
# single, one-down, two-down, bench; default all five) and flags
# (--concurrency, --no-verify, ...); --no-build uses the binaries already
# built. Results: .bench/cluster-<time>/<scenario>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=true
args=()
for arg in "$@"; do
    if [[ "$arg" == --no-build ]]; then build=false; else args+=("$arg"); fi
done
# RESTATE_SERVER_BIN set: that server, nothing to install (as scripts/test.sh).
[[ -n "${RESTATE_SERVER_BIN:-}" ]] || scripts/install-restate.sh >/dev/null
if $build; then cargo build --release --workspace --bins; fi
exec "${CARGO_TARGET_DIR:-target}/release/stackctl" measure "${args[@]}"
