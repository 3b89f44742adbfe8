#!/usr/bin/env bash
# "What survives what", measured (README): `stackctl measure`
# (testkit/src/measure.rs), after installing Restate if missing and a release
# build. `scripts/cluster-measure.sh --help` lists the scenarios (steady,
# single, one-down, two-down, bench; default all five) and flags
# (--concurrency, --no-verify, ...); --no-build uses the binaries already
# built. Results: .bench/cluster-<time>/<scenario>/.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/stackctl" measure "$@"
