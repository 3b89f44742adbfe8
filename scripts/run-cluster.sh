#!/usr/bin/env bash
# Starts a local three-node Restate cluster and payment-service, in one command:
# installs the pinned Restate release if missing, builds the service (release),
# starts three restate-server nodes on loopback (one cluster, replication 2,
# data in .cluster/), starts the service, waits until every node serves
# requests, registers the service once (through node 1's admin API), and prints
# the three ingress and admin addresses. Ctrl-C (or SIGTERM) stops everything.
#
# A node that dies (or is killed: scripts/cluster-lib.sh kill N) is reported,
# and the rest keeps running: that is what the cluster is for. Restart it from
# another terminal with scripts/cluster-lib.sh start N; Ctrl-C here still stops
# it.
#
# Usage: scripts/run-cluster.sh [--fresh] [--no-build] [--help]
#   --fresh     delete .cluster/ (all three nodes' data) before starting
#   --no-build  use the payment-service binary already built
#
# Environment (defaults in brackets):
#   INGRESS_PORTS ["21080 22080 23080"]  ingress port of node 1, 2, 3
#   ADMIN_PORTS ["21070 22070 23070"]    admin API port of node 1, 2, 3
#   NODE_PORTS ["21122 22122 23122"]     node-to-node port of node 1, 2, 3 (restatectl)
#   SERVICE_PORT [20090]                 payment-service
#   CLUSTER_NAME [payment-cluster]       Restate cluster name
#   CLUSTER_REPLICATION [2]              replication of logs and partitions
#   CLUSTER_DIR [.cluster]               data, logs, pid files
#   STARTUP_TIMEOUT [60]                 seconds to wait for each step
#   GATEWAY_DELAY_MS, GATEWAY_DECLINE_RATE, ... and RUST_LOG are passed to
#   payment-service; GATEWAY_LEDGER defaults to .cluster/gateway.ledger.jsonl.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/cluster-lib.sh
source "$repo_root/scripts/cluster-lib.sh"

fresh=false
build=true
for arg in "$@"; do
    case "$arg" in
        --fresh) fresh=true ;;
        --no-build) build=false ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "run-cluster: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

cluster_check_config

# A cluster left running by an earlier run (e.g. this script was SIGKILLed).
for name in node-1 node-2 node-3 payment-service; do
    if pid="$(cluster_owned_pid "$name")"; then
        cluster_die "$name from an earlier run is still running (pid $pid); stop it with: scripts/cluster-lib.sh stop-all"
    fi
done
# Fail early with a clear message instead of a bind error buried in a log.
for p in "${cluster_ingress_ports[@]}" "${cluster_admin_ports[@]}" "${cluster_node_ports[@]}" "$SERVICE_PORT"; do
    if cluster_port_in_use "$p"; then
        cluster_die "port $p is already in use; move the cluster with INGRESS_PORTS, ADMIN_PORTS, NODE_PORTS, SERVICE_PORT (see --help)"
    fi
done

# --- install & build ---------------------------------------------------------------
command -v curl >/dev/null 2>&1 || cluster_die "curl is required"
cluster_log "checking Restate installation"
"$repo_root/scripts/install-restate.sh" >/dev/null
[[ -x "$restate_server_bin" ]] || cluster_die "restate-server binary not found at $restate_server_bin"

if $build; then
    command -v cargo >/dev/null 2>&1 || cluster_die "cargo is required (https://rustup.rs)"
    cluster_log "building payment-service (cargo build --release)"
    (cd "$repo_root" && cargo build --release --bin payment-service)
fi
target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" == /* ]] || target_dir="$repo_root/$target_dir"
service_bin="$target_dir/release/payment-service"
[[ -x "$service_bin" ]] || cluster_die "built binary not found at $service_bin"

if $fresh; then
    cluster_log "--fresh: deleting ${CLUSTER_DIR#"$repo_root"/}"
    rm -rf "$CLUSTER_DIR"
fi
mkdir -p "$CLUSTER_DIR" "$cluster_log_dir"

# --- stop everything on the way out ---------------------------------------------------
# shellcheck disable=SC2317 # only reached through the traps below
cleanup() {
    trap - EXIT INT TERM HUP
    cluster_stop_all
}
# shellcheck disable=SC2317 # only reached through the traps below
on_signal() {
    cluster_log "got SIG$1, shutting down"
    cleanup
    cluster_log "stopped"
    case "$1" in
        INT) exit 130 ;;
        HUP) exit 129 ;;
        *) exit 143 ;;
    esac
}
trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

# --- start ----------------------------------------------------------------------------
cluster_service_start "$service_bin"
# All three at once: node 1 provisions the cluster; the metadata store needs
# two of the three nodes for a quorum, so none of them is ready alone.
for n in "${cluster_nodes[@]}"; do cluster_node_start "$n"; done

cluster_service_wait_up
cluster_log "payment-service is healthy"
for n in "${cluster_nodes[@]}"; do
    cluster_wait_node_up "$n"
    cluster_log "$(cluster_node_name "$n"): admin API and ingress answer /health"
done

# --- register once, then check every ingress end to end ---------------------------------
cluster_register 1
for n in "${cluster_nodes[@]}"; do
    cluster_wait_node_ready "$n"
    cluster_log "$(cluster_node_name "$n") serves PaymentService"
done

# --- tell the user what to do next --------------------------------------------------------
ingress1="$(cluster_ingress_url 1)"
rel_dir="${CLUSTER_DIR#"$repo_root"/}"
cat <<EOF

Cluster '$CLUSTER_NAME' is up: 3 Restate nodes, replication $CLUSTER_REPLICATION, and payment-service $(cluster_service_url).
  node-1  ingress $(cluster_ingress_url 1)  admin $(cluster_admin_url 1)  node $(cluster_node_url 1)
  node-2  ingress $(cluster_ingress_url 2)  admin $(cluster_admin_url 2)  node $(cluster_node_url 2)
  node-3  ingress $(cluster_ingress_url 3)  admin $(cluster_admin_url 3)  node $(cluster_node_url 3)
Any ingress reaches any payment; any admin API shows the same deployments. Logs in $rel_dir/logs/.

Create a payment through node 1, read it through node 3:
  curl -X POST $ingress1/PaymentService/payment-001/CreatePayment \\
    -H 'Content-Type: application/json' \\
    -d '{"amount": 10000, "currency": "USD", "description": "Premium subscription", "customerId": "cust-alice"}'
  curl -X POST $(cluster_ingress_url 3)/PaymentService/payment-001/GetPayment \\
    -H 'Content-Type: application/json' -d '{}'

Cluster status (members, partitions, logs):
  $restatectl_bin --address $(cluster_restatectl_addresses) status
  (or: scripts/cluster-lib.sh status)

The payment's state, through any admin API:
  RESTATE_ADMIN_URL=$(cluster_admin_url 2) $restate_cli_bin kv get PaymentService payment-001

Kill one node and bring it back (from another terminal; the other two keep serving):
  scripts/cluster-lib.sh kill 2
  scripts/cluster-lib.sh start 2

State persists in $rel_dir/ across runs; use --fresh to start over.
Press Ctrl-C to stop everything.

EOF

# --- watch: report nodes going down and coming back, until Ctrl-C/SIGTERM ---------------------
declare -A was_up=()
for name in node-1 node-2 node-3 payment-service; do was_up[$name]=1; done
while :; do
    for name in node-1 node-2 node-3 payment-service; do
        if pid="$(cluster_owned_pid "$name")"; then
            if ((!was_up[$name])); then cluster_log "$name is running again (pid $pid)"; fi
            was_up[$name]=1
        else
            if ((was_up[$name])); then
                if [[ "$name" == payment-service ]]; then
                    cluster_log "payment-service is down (log: $rel_dir/logs/payment-service.log); Restate retries its invocations until it is back"
                else
                    cluster_log "$name is down (log: $rel_dir/logs/$name.log); restart it with: scripts/cluster-lib.sh start ${name#node-}"
                fi
            fi
            was_up[$name]=0
        fi
    done
    # In the background, so that a signal is handled at once, not after the sleep.
    sleep 1 &
    wait $! || true
done
