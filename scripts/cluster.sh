#!/usr/bin/env bash
# Commands to the cluster that scripts/run-cluster.sh runs (through its control socket):
#   status | kill N | start N | stop N | wait-ready N | kill-service | start-service
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/stackctl" --no-build cluster "$@"
