#!/usr/bin/env bash
# The whole local stack in the foreground: restate-server + payment-service, registered, on
# 8080 (ingress), 9070 (admin), 5122 (node), 9090 (service); Ctrl-C stops both. Data in
# .stack/ (kept between runs; --fresh wipes it). Ports: INGRESS_PORT, ADMIN_PORT, NODE_PORT,
# SERVICE_PORT; the service's own settings (GATEWAY_*, IDENTITY_KEYS, DEPLOYMENT_VERSION,
# RUST_LOG) pass through. Each build is registered as a deployment of its own (no force).
# `stackctl stack up --help` lists everything.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/stackctl" stack up "$@"
