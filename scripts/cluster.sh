#!/usr/bin/env bash
# Commands to the cluster that scripts/run-cluster.sh runs (through its control socket):
#   status | kill N | start N | stop N | wait-ready N | kill-service | start-service
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${CARGO_TARGET_DIR:-target}/release/stackctl" cluster "$@"
