#!/usr/bin/env bash
# A local three-node Restate cluster (replication 2) + payment-service, registered, in the
# foreground; Ctrl-C stops everything. Node N: ingress 2N080, admin 2N070, node 2N122; the
# service on 20090. Data in .cluster/ (--fresh deletes it). From another terminal,
# scripts/cluster.sh status|kill N|start N|stop N|wait-ready N|kill-service|start-service.
# `stackctl cluster up --help` lists the port variables.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/stackctl" cluster up "$@"
