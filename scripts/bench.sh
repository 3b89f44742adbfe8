#!/usr/bin/env bash
# The performance benchmark (README "Performance"): `stackctl bench`
# (testkit/src/bench.rs), after installing Restate if missing and a release
# build. `scripts/bench.sh --help` lists the flags (--config tuned|stock|both|
# FILE.toml, --scale, --concurrency, --rounds, --gateway-duration (the second
# stack's, with the mock-gateway process; 0 skips it), ...); --no-build uses the
# binaries already built. Results: .bench/<time>-<config>[-scale]/.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/stackctl" bench "$@"
