#!/usr/bin/env bash
# The project's test command: installs the pinned Restate server if missing,
# then runs `cargo test --all-targets` with any extra arguments passed through,
# e.g. `scripts/test.sh -- --nocapture` or `scripts/test.sh --test e2e`.
#
# The integration tests start their own restate-server; they find it through
# RESTATE_SERVER_BIN (default: the npm-installed one, exported here). The Stripe adapter's
# conformance test starts its own localstripe, found through LOCALSTRIPE_BIN (default: the
# pip-installed one, scripts/install-localstripe.sh, exported here).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ -z "${RESTATE_SERVER_BIN:-}" ]]; then
    scripts/install-restate.sh
    RESTATE_SERVER_BIN="$repo_root/scripts/restate/node_modules/.bin/restate-server"
fi
export RESTATE_SERVER_BIN
echo "test.sh: RESTATE_SERVER_BIN=$RESTATE_SERVER_BIN" >&2

if [[ -z "${LOCALSTRIPE_BIN:-}" ]]; then
    scripts/install-localstripe.sh
    LOCALSTRIPE_BIN="$repo_root/scripts/localstripe/venv/bin/localstripe"
fi
export LOCALSTRIPE_BIN
echo "test.sh: LOCALSTRIPE_BIN=$LOCALSTRIPE_BIN" >&2

exec cargo test --workspace --all-targets "$@"
