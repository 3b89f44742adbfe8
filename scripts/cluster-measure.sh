#!/usr/bin/env bash
# "What survives what", measured: runs CreatePayment load through the three
# ingresses of a fresh local cluster (scripts/cluster-lib.sh) and breaks it.
# Each scenario gets a fresh cluster; the service runs with GATEWAY_DELAY_MS=0
# and GATEWAY_DECLINE_RATE=0, so what is measured is Restate, not the mock.
#
#   steady    all three nodes up: throughput and latency
#   single    the same load on one restate-server (restate/restate.toml, as
#             scripts/run-stack.sh runs it) through one ingress, for comparison
#   one-down  SIGKILL node 2 at 20 s, start it again at 50 s; load until 140 s
#   two-down  SIGKILL node 2 at 15 s and node 3 at 20 s (no quorum), start
#             node 2 at 40 s, node 3 at 70 s; load until 100 s
#   bench     the benchmark client (benches/payments.rs, as scripts/bench.sh
#             runs it against one node) against node 1's ingress, with the
#             floor (examples/bench_floor.rs) registered too
#
# Every scenario but bench ends with the load driver's check
# (scripts/cluster-load.py): every acknowledged payment present with its
# chargeId, nothing left pending, no double charge in the gateway's ledger.
#
# Usage: scripts/cluster-measure.sh [--no-build] [SCENARIO...]   (default: all five)
#   --concurrency N   load driver workers per ingress [16]
#   --no-build        use the binaries already built
# Results: .bench/cluster-<time>/<scenario>/ (report.txt, requests.jsonl, logs), beside
# scripts/bench.sh's results (not in .cluster/, which run-cluster.sh --fresh deletes).
# Ports as in scripts/run-cluster.sh (INGRESS_PORTS, ...); the cluster of
# scripts/run-cluster.sh must not be running.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/cluster-lib.sh
source "$repo_root/scripts/cluster-lib.sh"
cd "$repo_root"

build=true
concurrency=16
scenarios=()
while (($#)); do
    case "$1" in
        --no-build) build=false; shift ;;
        --concurrency | -c) concurrency="${2:?}"; shift 2 ;;
        steady | single | one-down | two-down | bench) scenarios+=("$1"); shift ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) cluster_die "unknown argument '$1' (try --help)" ;;
    esac
done
((${#scenarios[@]})) || scenarios=(steady single one-down two-down bench)
[[ "$concurrency" =~ ^[0-9]+$ ]] || cluster_die "--concurrency must be a number"
cluster_check_config

scripts/install-restate.sh >/dev/null
if $build; then
    cluster_log "building (release): payment-service, the floor, the benchmark client"
    cargo build --release --bin payment-service --example bench_floor
    cargo bench --bench payments --no-run
fi
target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" == /* ]] || target_dir="$repo_root/$target_dir"
service_bin="$target_dir/release/payment-service"
floor_bin="$target_dir/release/examples/bench_floor"
[[ -x "$service_bin" ]] || cluster_die "payment-service not built (drop --no-build)"

export GATEWAY_DELAY_MS=0 GATEWAY_DECLINE_RATE=0
out_root="$repo_root/.bench/cluster-$(date +%Y%m%d-%H%M%S)"
floor_port=$((SERVICE_PORT + 1))

# shellcheck disable=SC2317 # reached through the traps
on_exit() {
    trap - EXIT INT TERM HUP
    cluster_stop_all
}
trap on_exit EXIT
trap 'cluster_log interrupted; exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

start_cluster() { # start_cluster DIR [with-floor]
    cluster_set_dir "$1"
    rm -rf "$CLUSTER_DIR"
    mkdir -p "$cluster_log_dir"
    cluster_service_start "$service_bin"
    local n
    for n in "${cluster_nodes[@]}"; do cluster_node_start "$n"; done
    cluster_service_wait_up
    for n in "${cluster_nodes[@]}"; do cluster_wait_node_up "$n"; done
    cluster_register 1
    if [[ "${2:-}" == with-floor ]]; then
        [[ -x "$floor_bin" ]] || cluster_die "bench_floor not built (drop --no-build)"
        cluster_spawn bench-floor "$floor_bin" "$cluster_log_dir/bench-floor.log" \
            env -u RUST_LOG BIND_ADDR="127.0.0.1:$floor_port" "$floor_bin"
        cluster_wait_http bench-floor bench-floor "$cluster_log_dir/bench-floor.log" \
            --http2-prior-knowledge "http://127.0.0.1:$floor_port/health"
        cluster_register 1 "http://127.0.0.1:$floor_port"
    fi
    for n in "${cluster_nodes[@]}"; do cluster_wait_node_ready "$n"; done
    cluster_log "cluster ready in ${CLUSTER_DIR#"$repo_root"/}; load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

start_single() { # start_single DIR: one restate-server on node 1's ports, as run-stack.sh runs it
    cluster_set_dir "$1"
    rm -rf "$CLUSTER_DIR"
    mkdir -p "$cluster_log_dir"
    cluster_service_start "$service_bin"
    local args=(--base-dir "$CLUSTER_DIR/single-data" --node-name single --no-logo --listen-mode tcp)
    [[ -f restate/restate.toml ]] && args+=(--config-file "$repo_root/restate/restate.toml")
    cluster_spawn restate-single "$CLUSTER_DIR/single-data" "$cluster_log_dir/restate-single.log" \
        env -u RUST_LOG RESTATE_LOG_DISABLE_ANSI_CODES=true \
        RESTATE_INGRESS__BIND_ADDRESS="127.0.0.1:${cluster_ingress_ports[0]}" \
        RESTATE_ADMIN__BIND_ADDRESS="127.0.0.1:${cluster_admin_ports[0]}" \
        RESTATE_BIND_ADDRESS="127.0.0.1:${cluster_node_ports[0]}" \
        "$restate_server_bin" "${args[@]}"
    cluster_service_wait_up
    cluster_wait_http "restate-single admin API" restate-single "$cluster_log_dir/restate-single.log" \
        "$(cluster_admin_url 1)/health"
    cluster_register 1
    cluster_wait_node_ready 1 restate-single
    cluster_log "single node ready in ${CLUSTER_DIR#"$repo_root"/}; load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

load() { # load NAME ARGS...: the driver, with its report and requests kept
    local name="$1"
    shift
    local status=0
    scripts/cluster-load.py -c "$concurrency" --ledger "$CLUSTER_DIR/gateway.ledger.jsonl" \
        --run-dir "$cluster_run_dir" --out "$CLUSTER_DIR" "$@" || status=$?
    cluster_log "$name: load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
    return "$status"
}

lib="scripts/cluster-lib.sh"
failed=()
for s in "${scenarios[@]}"; do
    echo
    cluster_log "=== scenario $s ==="
    dir="$out_root/$s"
    case "$s" in
        steady)
            start_cluster "$dir"
            # Unrecorded warm-up, then the measurement.
            scripts/cluster-load.py -c "$concurrency" -d 5 --no-verify --prefix warmup \
                --run-dir "$cluster_run_dir" >/dev/null
            load "$s" -d 30 || failed+=("$s")
            ;;
        single)
            start_single "$dir"
            scripts/cluster-load.py --ingress "$(cluster_ingress_url 1)" -c "$((3 * concurrency))" -d 5 \
                --no-verify --prefix warmup --run-dir "$cluster_run_dir" >/dev/null
            load "$s" --ingress "$(cluster_ingress_url 1)" -c "$((3 * concurrency))" -d 30 || failed+=("$s")
            ;;
        one-down)
            start_cluster "$dir"
            load "$s" -d 140 \
                --event "20=$lib kill 2" \
                --event "50=$lib start 2" || failed+=("$s")
            ;;
        two-down)
            start_cluster "$dir"
            load "$s" -d 100 \
                --event "15=$lib kill 2" \
                --event "20=$lib kill 3" \
                --event "40=$lib start 2" \
                --event "70=$lib start 3" || failed+=("$s")
            ;;
        bench)
            start_cluster "$dir" with-floor
            cargo bench -q --bench payments -- \
                --ingress "$(cluster_ingress_url 1)" --concurrency 64 --duration 15 --rounds 2 \
                --service-pid "$(cluster_owned_pid payment-service)" \
                --floor-pid "$(cluster_owned_pid bench-floor)" \
                --label cluster --json "$CLUSTER_DIR/summary.json" | tee "$CLUSTER_DIR/report.txt" ||
                failed+=("$s")
            ;;
    esac
    cluster_stop_all
    du -sh "$CLUSTER_DIR/nodes" "$CLUSTER_DIR/single-data" 2>/dev/null | sed 's/^/[cluster] data: /' >&2 || true
    rm -rf "$CLUSTER_DIR/nodes" "$CLUSTER_DIR/single-data"
done

echo
cluster_log "results in ${out_root#"$repo_root"/}/"
if ((${#failed[@]})); then
    cluster_die "failed: ${failed[*]}"
fi
