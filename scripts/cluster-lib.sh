#!/usr/bin/env bash
# Helpers for the local three-node Restate cluster of scripts/run-cluster.sh.
#
# Sourced by scripts/run-cluster.sh (and by anything else that drives the
# cluster, e.g. a crash test), or run as a command against a cluster that
# scripts/run-cluster.sh started, from another terminal:
#
#   scripts/cluster-lib.sh status            restatectl status, plus which pids are up
#   scripts/cluster-lib.sh kill N            SIGKILL node N (1-3)
#   scripts/cluster-lib.sh stop N            SIGTERM node N, wait until it is gone
#   scripts/cluster-lib.sh start N           start node N again (same name, same data)
#   scripts/cluster-lib.sh restart N         kill N, then start it again
#   scripts/cluster-lib.sh wait-ready N      wait until node N's ingress serves requests
#   scripts/cluster-lib.sh pid N             print node N's pid (exit 1 if it is down)
#   scripts/cluster-lib.sh kill-service      SIGKILL payment-service
#   scripts/cluster-lib.sh stop-service      SIGTERM payment-service
#   scripts/cluster-lib.sh start-service     start payment-service again (PAYMENT_SERVICE_BIN
#                                            or target/release/payment-service), wait until healthy
#   scripts/cluster-lib.sh stop-all          stop the service and every node
#   scripts/cluster-lib.sh env               print the cluster's addresses as shell variables
#
# Every process the cluster runs is recorded in $CLUSTER_DIR/run/<name>.pid and
# is only ever signalled after checking that the pid still belongs to that
# process (its command line names the binary and, for a node, its data folder),
# never by name.
#
# Environment (the same for scripts/run-cluster.sh; defaults in brackets):
# Node N listens on 2N080 (ingress), 2N070 (admin), 2N122 (node-to-node): below
# 32768, out of Linux's ephemeral port range, so that a node restarted in the
# middle of a test never finds its port taken by some outgoing connection.
#   CLUSTER_DIR [.cluster]                     data, logs and pid files
#   CLUSTER_NAME [payment-cluster]             Restate cluster name
#   INGRESS_PORTS ["21080 22080 23080"]        ingress port of node 1, 2, 3
#   ADMIN_PORTS ["21070 22070 23070"]          admin API port of node 1, 2, 3
#   NODE_PORTS ["21122 22122 23122"]           node-to-node port of node 1, 2, 3
#   SERVICE_PORT [20090]                       payment-service
#   CLUSTER_REPLICATION [2]                    default-replication (logs and partitions)
#   STARTUP_TIMEOUT [60]                       seconds to wait for a process to be ready

# This file is sourced: no `set -euo pipefail` of its own at the top level; the
# functions work under `set -euo pipefail` (the callers' setting).

cluster_lib_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="${repo_root:-$(cd "$cluster_lib_dir/.." && pwd)}"

CLUSTER_DIR="${CLUSTER_DIR:-$repo_root/.cluster}"
CLUSTER_NAME="${CLUSTER_NAME:-payment-cluster}"
INGRESS_PORTS="${INGRESS_PORTS:-21080 22080 23080}"
ADMIN_PORTS="${ADMIN_PORTS:-21070 22070 23070}"
NODE_PORTS="${NODE_PORTS:-21122 22122 23122}"
SERVICE_PORT="${SERVICE_PORT:-20090}"
CLUSTER_REPLICATION="${CLUSTER_REPLICATION:-2}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-60}"

read -r -a cluster_ingress_ports <<<"$INGRESS_PORTS"
read -r -a cluster_admin_ports <<<"$ADMIN_PORTS"
read -r -a cluster_node_ports <<<"$NODE_PORTS"
cluster_nodes=(1 2 3)

cluster_set_dir() { # cluster_set_dir DIR: use another data/log/pid folder from now on
    # Exported: commands started from here (scripts/cluster-lib.sh kill N, the
    # load driver) must find the same pid files.
    export CLUSTER_DIR="$1"
    cluster_log_dir="$CLUSTER_DIR/logs"
    cluster_run_dir="$CLUSTER_DIR/run"
}
cluster_set_dir "$CLUSTER_DIR"
cluster_config="$repo_root/restate/cluster/cluster.toml"

# The native binaries, not the node wrappers in node_modules/.bin: the pid we
# record is then the server's own, and SIGKILL kills the server, not a wrapper.
case "$(uname -m)" in x86_64) cluster_arch=x64 ;; aarch64 | arm64) cluster_arch=arm64 ;; *) cluster_arch="$(uname -m)" ;; esac
cluster_os="$(uname -s | tr '[:upper:]' '[:lower:]')"
cluster_restate_pkgs="$repo_root/scripts/restate/node_modules/@restatedev"
restate_server_bin="$cluster_restate_pkgs/restate-server-$cluster_os-$cluster_arch/bin/restate-server"
restatectl_bin="$cluster_restate_pkgs/restatectl-$cluster_os-$cluster_arch/bin/restatectl"
# shellcheck disable=SC2034 # used by the scripts that source this file
restate_cli_bin="$cluster_restate_pkgs/restate-$cluster_os-$cluster_arch/bin/restate"

if [[ -t 2 ]]; then cluster_tag=$'\033[1m[cluster]\033[0m'; else cluster_tag='[cluster]'; fi
cluster_log() { printf '%s %s\n' "$cluster_tag" "$*" >&2; }
cluster_die() {
    cluster_log "ERROR: $*"
    exit 1
}

# --- addresses -----------------------------------------------------------------
cluster_check_config() { # validates the port lists; dies on a bad one
    local list p
    for list in cluster_ingress_ports cluster_admin_ports cluster_node_ports; do
        local -n ports="$list"
        ((${#ports[@]} == 3)) || cluster_die "${list#cluster_} needs 3 ports, got '${ports[*]}'"
        for p in "${ports[@]}"; do
            [[ "$p" =~ ^[0-9]+$ ]] || cluster_die "not a port number: '$p' (in ${list#cluster_})"
        done
    done
    [[ "$SERVICE_PORT" =~ ^[0-9]+$ ]] || cluster_die "SERVICE_PORT must be a port number"
    [[ "$CLUSTER_REPLICATION" =~ ^[1-3]$ ]] || cluster_die "CLUSTER_REPLICATION must be 1, 2 or 3"
}

cluster_check_node() { # cluster_check_node N: dies unless N is 1, 2 or 3
    [[ "${1:-}" =~ ^[123]$ ]] || cluster_die "node must be 1, 2 or 3, got '${1:-}'"
}

cluster_node_name() { echo "node-$1"; }
cluster_ingress_url() { echo "http://127.0.0.1:${cluster_ingress_ports[$1 - 1]}"; }
cluster_admin_url() { echo "http://127.0.0.1:${cluster_admin_ports[$1 - 1]}"; }
cluster_node_url() { echo "http://127.0.0.1:${cluster_node_ports[$1 - 1]}"; }
cluster_service_url() { echo "http://127.0.0.1:$SERVICE_PORT"; }

cluster_metadata_addresses() { # the JSON list every node gets: all three nodes
    local n out=""
    for n in "${cluster_nodes[@]}"; do out+="${out:+,}\"$(cluster_node_url "$n")\""; done
    echo "[$out]"
}

cluster_restatectl_addresses() { # comma-separated, for restatectl --address
    local n out=""
    for n in "${cluster_nodes[@]}"; do out+="${out:+,}$(cluster_node_url "$n")"; done
    echo "$out"
}

cluster_port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# --- processes -----------------------------------------------------------------
if command -v setsid >/dev/null 2>&1; then cluster_detach=(setsid); else cluster_detach=(); fi

cluster_alive() { # a reaped or zombie process counts as gone
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

# cluster_owned_pid NAME: prints the pid recorded for NAME if that process is
# still alive and still the one we started (its command line contains the
# marker recorded next to the pid); else prints nothing and returns 1.
cluster_owned_pid() {
    local name="$1" pidfile="$cluster_run_dir/$1.pid" pid marker cmdline
    [[ -f "$pidfile" ]] || return 1
    { read -r pid && read -r marker; } <"$pidfile" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    cluster_alive "$pid" || return 1
    cmdline="$(ps -ww -o args= -p "$pid" 2>/dev/null)" || return 1
    [[ "$cmdline" == *"$marker"* ]] || return 1
    echo "$pid"
}

# cluster_spawn NAME MARKER LOGFILE CMD...: starts CMD detached (own session,
# stdin closed, output appended to LOGFILE), records its pid and MARKER (a
# string its command line contains) in $cluster_run_dir/NAME.pid.
cluster_spawn() {
    local name="$1" marker="$2" logfile="$3"
    shift 3
    mkdir -p "$cluster_run_dir" "$(dirname "$logfile")"
    printf -- '--- %s: starting %s\n' "$(date -u +%FT%TZ)" "$name" >>"$logfile"
    # nohup: a node restarted from another terminal must outlive that shell.
    "${cluster_detach[@]}" nohup "$@" >>"$logfile" 2>&1 </dev/null &
    local pid=$!
    # Not a job of this shell: no "Killed" line when a node is SIGKILLed on
    # purpose. Bash still reaps it; cluster_alive treats a zombie as gone.
    disown "$pid" 2>/dev/null || true
    printf '%s\n%s\n' "$pid" "$marker" >"$cluster_run_dir/$name.pid"
    CLUSTER_SPAWNED_PID="$pid"
}

# cluster_signal_wait NAME SIGNAL TIMEOUT_S: sends SIGNAL, waits until the
# process is gone; after TIMEOUT_S sends SIGKILL. Returns 0 if it was running.
cluster_signal_wait() {
    local name="$1" sig="$2" timeout="$3" pid i
    pid="$(cluster_owned_pid "$name")" || return 1
    kill -"$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        cluster_alive "$pid" || break
        sleep 0.1
    done
    if cluster_alive "$pid"; then
        cluster_log "$name (pid $pid) still running after ${timeout}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while cluster_alive "$pid"; do sleep 0.05; done
    fi
    # Reap it if it is our child (no-op otherwise).
    wait "$pid" 2>/dev/null || true
    return 0
}

# --- nodes ---------------------------------------------------------------------
# Restate keeps a node's data in <base dir>/<node name>/: .cluster/nodes/node-N/.
cluster_nodes_dir() { echo "$CLUSTER_DIR/nodes"; }
cluster_node_log() { echo "$cluster_log_dir/node-$1.log"; }

# cluster_node_start N: starts node N (its data folder is kept between runs).
cluster_node_start() {
    local n="$1" name pid
    cluster_check_node "$n"
    name="$(cluster_node_name "$n")"
    if pid="$(cluster_owned_pid "$name")"; then
        cluster_log "$name already running (pid $pid)"
        return 0
    fi
    local p
    for p in "${cluster_ingress_ports[n - 1]}" "${cluster_admin_ports[n - 1]}" "${cluster_node_ports[n - 1]}"; do
        if cluster_port_in_use "$p"; then
            cluster_die "port $p (for $name) is already in use; move the cluster's ports with INGRESS_PORTS/ADMIN_PORTS/NODE_PORTS (see --help)"
        fi
    done
    mkdir -p "$(cluster_nodes_dir)" "$cluster_log_dir"
    # Only node 1 may provision the cluster; the others wait until it has,
    # then join. Provisioning happens once: on later starts node 1 finds the
    # cluster in the metadata store and joins it like the others.
    local provision=false
    ((n == 1)) && provision=true
    # The node name is a flag, not an environment variable, so that the
    # command line identifies the process: "--base-dir <dir> --node-name <name>"
    # is the marker its pid file records.
    local ident=(--base-dir "$(cluster_nodes_dir)" --node-name "$name")
    local args=("${ident[@]}" --config-file "$cluster_config" --no-logo
        # TCP only: unix sockets under a long base dir exceed the socket path limit.
        --listen-mode tcp)
    # RUST_LOG is meant for payment-service; keep it away from restate-server.
    cluster_spawn "$name" "${ident[*]}" "$(cluster_node_log "$n")" \
        env -u RUST_LOG \
        RESTATE_LOG_DISABLE_ANSI_CODES=true \
        RESTATE_CLUSTER_NAME="$CLUSTER_NAME" \
        RESTATE_AUTO_PROVISION="$provision" \
        RESTATE_DEFAULT_REPLICATION="$CLUSTER_REPLICATION" \
        RESTATE_BIND_ADDRESS="127.0.0.1:${cluster_node_ports[n - 1]}" \
        RESTATE_ADVERTISED_ADDRESS="$(cluster_node_url "$n")" \
        RESTATE_INGRESS__BIND_ADDRESS="127.0.0.1:${cluster_ingress_ports[n - 1]}" \
        RESTATE_ADMIN__BIND_ADDRESS="127.0.0.1:${cluster_admin_ports[n - 1]}" \
        RESTATE_METADATA_CLIENT__ADDRESSES="$(cluster_metadata_addresses)" \
        "$restate_server_bin" "${args[@]}"
    cluster_log "started $name (pid $CLUSTER_SPAWNED_PID): ingress :${cluster_ingress_ports[n - 1]}, admin :${cluster_admin_ports[n - 1]}, node :${cluster_node_ports[n - 1]}"
}

cluster_node_pid() { cluster_owned_pid "$(cluster_node_name "$1")"; }

# cluster_node_kill N: SIGKILL, as a crash would; returns once the process is gone.
cluster_node_kill() {
    local n="$1" name pid
    cluster_check_node "$n"
    name="$(cluster_node_name "$n")"
    if ! pid="$(cluster_owned_pid "$name")"; then
        cluster_log "$name is not running"
        return 0
    fi
    kill -KILL "$pid" 2>/dev/null || true
    while cluster_alive "$pid"; do sleep 0.02; done
    wait "$pid" 2>/dev/null || true
    cluster_log "killed $name (pid $pid, SIGKILL)"
}

# cluster_node_stop N: SIGTERM (graceful), SIGKILL after 30 s.
cluster_node_stop() {
    local n="$1" name
    cluster_check_node "$n"
    name="$(cluster_node_name "$n")"
    if cluster_signal_wait "$name" TERM 30; then
        cluster_log "stopped $name"
    fi
}

cluster_node_restart() { # kill, then start again with the same name and data
    cluster_node_kill "$1"
    cluster_node_start "$1"
}

# cluster_wait_http NAME PID_NAME LOGFILE CURL_ARGS...: polls until curl
# succeeds; dies if the process named PID_NAME exits or STARTUP_TIMEOUT passes.
cluster_wait_http() {
    local what="$1" pname="$2" logfile="$3"
    shift 3
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until curl -fsS --max-time 2 -o /dev/null "$@" 2>/dev/null; do
        if ! cluster_owned_pid "$pname" >/dev/null; then
            tail -n 30 "$logfile" >&2 || true
            cluster_die "$what: $pname exited"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$logfile" >&2 || true
            cluster_die "$what: not ready after ${STARTUP_TIMEOUT}s"
        fi
        sleep 0.2
    done
}

# cluster_wait_node_up N: the node's admin API and ingress answer /health.
cluster_wait_node_up() {
    local n="$1" name
    name="$(cluster_node_name "$n")"
    cluster_wait_http "$name admin API" "$name" "$(cluster_node_log "$n")" "$(cluster_admin_url "$n")/health"
    cluster_wait_http "$name ingress" "$name" "$(cluster_node_log "$n")" "$(cluster_ingress_url "$n")/restate/health"
}

# cluster_wait_node_ready N: node N's ingress runs a real invocation end to end:
# GetPayment of an ID that has no payment answers the service's own 404
# ("payment readiness-probe-N not found"). Needs the service registered.
# Health endpoints answer before the node has caught up with the cluster, and
# a node that has just started may answer 404 "service 'PaymentService' not
# found" from the ingress itself until it has loaded the registered services:
# neither counts as ready.
cluster_wait_node_ready() { # cluster_wait_node_ready N [PROCESS]: PROCESS defaults to node-N
    local n="$1" name="${2:-$(cluster_node_name "$1")}" out deadline
    deadline=$((SECONDS + STARTUP_TIMEOUT))
    while :; do
        out="$(curl -sS --max-time 5 -X POST \
            "$(cluster_ingress_url "$n")/PaymentService/readiness-probe-$n/GetPayment" \
            -H 'content-type: application/json' -d '{}' 2>&1)" || true
        [[ "$out" == *"payment readiness-probe-$n not found"* ]] && return 0
        cluster_owned_pid "$name" >/dev/null || cluster_die "$name exited while waiting for it to serve requests"
        if ((SECONDS >= deadline)); then
            tail -n 30 "$cluster_log_dir/$name.log" >&2 || true
            cluster_die "$name ingress does not serve requests after ${STARTUP_TIMEOUT}s (last answer: ${out:0:200})"
        fi
        sleep 0.2
    done
}

# --- payment-service -------------------------------------------------------------
# cluster_service_start BIN: starts payment-service on SERVICE_PORT; the
# environment (GATEWAY_*, RUST_LOG) is passed through.
cluster_service_start() {
    local bin="$1" pid
    if pid="$(cluster_owned_pid payment-service)"; then
        cluster_log "payment-service already running (pid $pid)"
        return 0
    fi
    cluster_port_in_use "$SERVICE_PORT" && cluster_die "port $SERVICE_PORT (SERVICE_PORT) is already in use"
    # The gateway's audit ledger lives with the cluster's data unless GATEWAY_LEDGER says otherwise.
    cluster_spawn payment-service "$bin" "$cluster_log_dir/payment-service.log" \
        env BIND_ADDR="127.0.0.1:$SERVICE_PORT" \
        GATEWAY_LEDGER="${GATEWAY_LEDGER:-$CLUSTER_DIR/gateway.ledger.jsonl}" "$bin"
    cluster_log "started payment-service (pid $CLUSTER_SPAWNED_PID) on 127.0.0.1:$SERVICE_PORT"
}

cluster_service_wait_up() {
    cluster_wait_http payment-service payment-service "$cluster_log_dir/payment-service.log" \
        --http2-prior-knowledge "$(cluster_service_url)/health"
}

cluster_service_kill() {
    local pid
    pid="$(cluster_owned_pid payment-service)" || return 0
    kill -KILL "$pid" 2>/dev/null || true
    while cluster_alive "$pid"; do sleep 0.02; done
    wait "$pid" 2>/dev/null || true
    cluster_log "killed payment-service (pid $pid, SIGKILL)"
}

cluster_service_stop() {
    if cluster_signal_wait payment-service TERM 15; then cluster_log "stopped payment-service"; fi
}

# cluster_register [N [URI]]: registers the service (or the deployment at URI)
# through node N's admin API (default 1). The deployment is cluster metadata:
# one registration serves all three ingresses.
cluster_register() {
    local n="${1:-1}" uri="${2:-$(cluster_service_url)}" out code body id deadline
    deadline=$((SECONDS + STARTUP_TIMEOUT))
    while :; do
        # force: the binary may have been rebuilt since the last registration.
        out="$(curl -sS --max-time 30 -w '\n%{http_code}' -X POST "$(cluster_admin_url "$n")/deployments" \
            -H 'content-type: application/json' \
            -d "{\"uri\":\"$uri\",\"force\":true}" 2>&1)" || out=$'\n000'
        code="${out##*$'\n'}"
        body="${out%$'\n'*}"
        [[ "$code" == 2* ]] && break
        # A freshly provisioned cluster may answer 5xx for a moment.
        if ((SECONDS >= deadline)); then cluster_die "registration failed (HTTP $code): $body"; fi
        sleep 0.5
    done
    id="$(sed -n 's/.*"id" *: *"\([^"]*\)".*/\1/p' <<<"$body" | head -n1)"
    cluster_log "registered $uri through node $n's admin API: deployment ${id:-?} (HTTP $code)"
}

# --- whole cluster ---------------------------------------------------------------
cluster_stop_all() { # the service (and anything else spawned) first, then the nodes all at once
    local f other
    for f in "$cluster_run_dir"/*.pid; do
        [[ -e "$f" ]] || continue
        other="$(basename "$f" .pid)"
        [[ "$other" == node-? ]] && continue
        if cluster_signal_wait "$other" TERM 15; then cluster_log "stopped $other"; fi
    done
    local n name pid pids=()
    for n in "${cluster_nodes[@]}"; do
        name="$(cluster_node_name "$n")"
        if pid="$(cluster_owned_pid "$name")"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    local i p
    for ((i = 0; i < 300; i++)); do
        local left=0
        for p in "${pids[@]}"; do cluster_alive "$p" && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for p in "${pids[@]}"; do
        if cluster_alive "$p"; then
            cluster_log "pid $p still running after 30s; sending SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
        wait "$p" 2>/dev/null || true
    done
    ((${#pids[@]} == 0)) || cluster_log "stopped ${#pids[@]} node(s)"
    rm -f "$cluster_run_dir"/*.pid
}

cluster_status() {
    local n name pid
    for n in "${cluster_nodes[@]}"; do
        name="$(cluster_node_name "$n")"
        if pid="$(cluster_owned_pid "$name")"; then
            printf '%s  up (pid %s)  ingress %s  admin %s  node %s\n' "$name" "$pid" \
                "$(cluster_ingress_url "$n")" "$(cluster_admin_url "$n")" "$(cluster_node_url "$n")"
        else
            printf '%s  DOWN\n' "$name"
        fi
    done
    if pid="$(cluster_owned_pid payment-service)"; then
        printf 'payment-service  up (pid %s)  %s\n' "$pid" "$(cluster_service_url)"
    else
        printf 'payment-service  DOWN\n'
    fi
    echo
    "$restatectl_bin" --address "$(cluster_restatectl_addresses)" status
}

# --- command-line use --------------------------------------------------------------
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    cluster_check_config
    cmd="${1:-}"
    case "$cmd" in
        status) cluster_status ;;
        kill | stop | start | restart | wait-ready | pid)
            [[ $# -eq 2 ]] || cluster_die "usage: $0 $cmd N (N = 1, 2 or 3)"
            cluster_check_node "$2"
            case "$cmd" in
                kill) cluster_node_kill "$2" ;;
                stop) cluster_node_stop "$2" ;;
                start) cluster_node_start "$2" ;;
                restart) cluster_node_restart "$2" ;;
                wait-ready) cluster_wait_node_ready "$2" ;;
                pid) cluster_node_pid "$2" ;;
            esac
            ;;
        stop-all) cluster_stop_all ;;
        kill-service) cluster_service_kill ;;
        stop-service) cluster_service_stop ;;
        start-service)
            bin="${PAYMENT_SERVICE_BIN:-${CARGO_TARGET_DIR:-$repo_root/target}/release/payment-service}"
            [[ -x "$bin" ]] || cluster_die "payment-service binary not found at $bin (set PAYMENT_SERVICE_BIN)"
            cluster_service_start "$bin"
            cluster_service_wait_up
            ;;
        env)
            for n in "${cluster_nodes[@]}"; do
                printf 'NODE%s_INGRESS=%s\nNODE%s_ADMIN=%s\nNODE%s_ADDRESS=%s\n' \
                    "$n" "$(cluster_ingress_url "$n")" "$n" "$(cluster_admin_url "$n")" "$n" "$(cluster_node_url "$n")"
            done
            printf 'SERVICE_URL=%s\nRESTATECTL_ADDRESS=%s\nCLUSTER_DIR=%s\n' \
                "$(cluster_service_url)" "$(cluster_restatectl_addresses)" "$CLUSTER_DIR"
            ;;
        -h | --help | help | "")
            sed -n '2,/^#   STARTUP_TIMEOUT/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            ;;
        *) cluster_die "unknown command '$cmd' (try --help)" ;;
    esac
fi
