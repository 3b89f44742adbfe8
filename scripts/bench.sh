#!/usr/bin/env bash
# The performance benchmark (README "Performance"): `stackctl bench`
# (testkit/src/bench.rs), after installing Restate if missing and a release
# build. `scripts/bench.sh --help` lists the flags (--config tuned|stock|both|
# FILE.toml, --scale, --concurrency, --rounds, ...); --no-build uses the
# binaries already built. Results: .bench/<time>-<config>[-scale]/.
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
exec "${CARGO_TARGET_DIR:-target}/release/stackctl" bench "${args[@]}"
