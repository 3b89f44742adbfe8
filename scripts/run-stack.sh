#!/usr/bin/env bash
# Runs the whole local stack in the foreground: a Restate server (from npm,
# see scripts/install-restate.sh) plus payment-service, registered with it.
# Ctrl-C (or SIGTERM) stops both and leaves no process behind.
#
# Usage: scripts/run-stack.sh [--fresh] [--no-build]
#   --fresh     wipe .stack/ (Restate's journal and state, logs, ledger) first
#   --no-build  skip `cargo build --release`; run the binary already built in
#               ${CARGO_TARGET_DIR:-target}/release/
#
# Environment (defaults in brackets):
#   INGRESS_PORT [8080]  Restate ingress (where clients call handlers)
#   ADMIN_PORT   [9070]  Restate admin API (registration, CLI)
#   NODE_PORT    [5122]  Restate node-to-node port
#   SERVICE_PORT [9090]  payment-service's HTTP/2 endpoint
#   RUST_LOG and GATEWAY_* (GATEWAY_DELAY_MS, GATEWAY_DECLINE_RATE, ...)
#                        passed through to payment-service, unchanged
#   GATEWAY_LEDGER [.stack/gateway.ledger.jsonl]  the service's audit ledger
#   STARTUP_TIMEOUT [60]  seconds to wait for each process to become healthy
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stack_dir="$repo_root/.stack"
log_dir="$stack_dir/logs"
restate_bin_dir="$repo_root/scripts/restate/node_modules/.bin"

INGRESS_PORT="${INGRESS_PORT:-8080}"
ADMIN_PORT="${ADMIN_PORT:-9070}"
NODE_PORT="${NODE_PORT:-5122}"
SERVICE_PORT="${SERVICE_PORT:-9090}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-60}"

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
            echo "run-stack: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

if [[ -t 2 ]]; then tag=$'\033[1m[run-stack]\033[0m'; else tag='[run-stack]'; fi
log() { printf '%s %s\n' "$tag" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

for p in INGRESS_PORT ADMIN_PORT NODE_PORT SERVICE_PORT; do
    [[ "${!p}" =~ ^[0-9]+$ ]] || die "$p must be a port number, got '${!p}'"
done

# Fail early with a clear message instead of a bind error buried in a log.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in INGRESS_PORT ADMIN_PORT NODE_PORT SERVICE_PORT; do
    if port_in_use "${!p}"; then
        die "port ${!p} ($p) is already in use; pick another, e.g. $p=$((${!p} + 10000)) $0"
    fi
done

# --- child process management ----------------------------------------------
# Children run in their own session (setsid, where available) so that a
# terminal Ctrl-C reaches only this script, which then stops them in order;
# it also lets us kill a child's whole process group (restate-server is a
# node wrapper around the native binary) if a graceful stop times out.
if command -v setsid >/dev/null 2>&1; then use_setsid=true; else use_setsid=false; fi
svc_pid=""
rs_pid=""

spawn() { # spawn LOGFILE CMD... ; sets $! to the child's pid
    local logfile="$1"
    shift
    if $use_setsid; then
        setsid "$@" >"$logfile" 2>&1 </dev/null &
    else
        "$@" >"$logfile" 2>&1 </dev/null &
    fi
}

alive() { # a reaped or zombie process counts as gone
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

# shellcheck disable=SC2317 # only reached through the traps below
stop_child() { # stop_child PID NAME: SIGTERM, wait up to 15 s, then SIGKILL
    local pid="$1" name="$2" i
    [[ -n "$pid" ]] || return 0
    if alive "$pid"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            log "$name did not stop in 15s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    # Anything left in its process group (e.g. an orphaned native binary).
    if $use_setsid; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317 # only reached through the traps below
cleanup() {
    trap - EXIT INT TERM HUP
    # Service first: Restate then just sees an unreachable deployment and
    # keeps any in-flight invocation in its journal for the next run.
    stop_child "$svc_pid" payment-service
    stop_child "$rs_pid" restate-server
    svc_pid=""
    rs_pid=""
}
# shellcheck disable=SC2317 # only reached through the traps below
on_signal() {
    log "got SIG$1, shutting down"
    cleanup
    log "stopped"
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

show_log_tail() {
    log "last lines of $1:"
    tail -n 30 "$1" >&2 || true
}

wait_healthy() { # wait_healthy NAME PID LOGFILE CURL_ARGS...
    local name="$1" pid="$2" logfile="$3"
    shift 3
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until curl -fsS --max-time 2 -o /dev/null "$@" 2>/dev/null; do
        if ! alive "$pid"; then
            show_log_tail "$logfile"
            die "$name exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail "$logfile"
            die "$name not healthy after ${STARTUP_TIMEOUT}s"
        fi
        sleep 0.2
    done
    log "$name is healthy"
}

# --- install & build ---------------------------------------------------------
command -v curl >/dev/null 2>&1 || die "curl is required"
if $build; then
    command -v cargo >/dev/null 2>&1 || die "cargo is required (https://rustup.rs)"
fi

log "checking Restate installation"
"$repo_root/scripts/install-restate.sh" >/dev/null

if $build; then
    log "building payment-service (cargo build --release)"
    (cd "$repo_root" && cargo build --release --bin payment-service)
fi
target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" == /* ]] || target_dir="$repo_root/$target_dir"
service_bin="$target_dir/release/payment-service"
[[ -x "$service_bin" ]] || die "built binary not found at $service_bin"

if $fresh; then
    log "--fresh: wiping $stack_dir"
    rm -rf "$stack_dir"
fi
mkdir -p "$stack_dir/restate" "$log_dir"

# --- start payment-service -------------------------------------------------------
export GATEWAY_LEDGER="${GATEWAY_LEDGER:-$stack_dir/gateway.ledger.jsonl}"
log "starting payment-service on 127.0.0.1:$SERVICE_PORT (log: $log_dir/payment-service.log)"
spawn "$log_dir/payment-service.log" \
    env BIND_ADDR="127.0.0.1:$SERVICE_PORT" "$service_bin"
svc_pid=$!

# --- start restate-server ------------------------------------------------------
restate_args=(--base-dir "$stack_dir/restate" --no-logo
    # A fixed node name: Restate keys its data dir by node name, and the
    # default (the hostname) may change between runs.
    --node-name payment-stack
    # TCP only: the default also binds unix sockets under the base dir, which
    # fails when the checkout's path is long (socket paths max ~108 bytes).
    --listen-mode tcp)
if [[ -f "$repo_root/restate/restate.toml" ]]; then
    restate_args+=(--config-file "$repo_root/restate/restate.toml")
fi
log "starting restate-server (ingress :$INGRESS_PORT, admin :$ADMIN_PORT, node :$NODE_PORT; log: $log_dir/restate-server.log)"
# RUST_LOG is meant for payment-service; keep it from restate-server.
spawn "$log_dir/restate-server.log" env -u RUST_LOG \
    RESTATE_INGRESS__BIND_ADDRESS="127.0.0.1:$INGRESS_PORT" \
    RESTATE_ADMIN__BIND_ADDRESS="127.0.0.1:$ADMIN_PORT" \
    RESTATE_BIND_ADDRESS="127.0.0.1:$NODE_PORT" \
    "$restate_bin_dir/restate-server" "${restate_args[@]}"
rs_pid=$!

# --- readiness & registration --------------------------------------------------
# The SDK endpoint answers GET /health, over HTTP/2 cleartext only.
wait_healthy payment-service "$svc_pid" "$log_dir/payment-service.log" \
    --http2-prior-knowledge "http://127.0.0.1:$SERVICE_PORT/health"
wait_healthy "restate admin API" "$rs_pid" "$log_dir/restate-server.log" \
    "http://127.0.0.1:$ADMIN_PORT/health"
wait_healthy "restate ingress" "$rs_pid" "$log_dir/restate-server.log" \
    "http://127.0.0.1:$INGRESS_PORT/restate/health"

log "registering http://127.0.0.1:$SERVICE_PORT with Restate"
# force: the binary was just rebuilt and its handlers may have changed since
# the deployment was last registered with this (persistent) server.
if ! reg_out="$(curl -sS --max-time 30 -w '\n%{http_code}' -X POST \
    "http://127.0.0.1:$ADMIN_PORT/deployments" \
    -H 'content-type: application/json' \
    -d "{\"uri\":\"http://127.0.0.1:$SERVICE_PORT\",\"force\":true}")"; then
    die "could not reach the admin API to register the deployment"
fi
reg_code="${reg_out##*$'\n'}"
reg_body="${reg_out%$'\n'*}"
if [[ "$reg_code" != 2* ]]; then
    die "registration failed (HTTP $reg_code): $reg_body"
fi
deployment_id="$(sed -n 's/.*"id" *: *"\([^"]*\)".*/\1/p' <<<"$reg_body" | head -n1)"
log "registered deployment ${deployment_id:-?} (HTTP $reg_code)"

# --- tell the user what to do next ------------------------------------------
ingress="http://127.0.0.1:$INGRESS_PORT"
cat <<EOF

Stack is up. Restate ingress $ingress, admin http://127.0.0.1:$ADMIN_PORT,
payment-service 127.0.0.1:$SERVICE_PORT. Logs in ${log_dir#"$repo_root"/}/.

Create a payment (run it twice: the second call returns the same result, no second charge):
  curl -X POST $ingress/PaymentService/payment-001/CreatePayment \\
    -H 'Content-Type: application/json' \\
    -d '{"amount": 10000, "currency": "USD", "description": "Premium subscription", "customerId": "cust-alice"}'

Get its status:
  curl -X POST $ingress/PaymentService/payment-001/GetPayment \\
    -H 'Content-Type: application/json' -d '{}'

Refund it:
  curl -X POST $ingress/PaymentService/payment-001/RefundPayment \\
    -H 'Content-Type: application/json' \\
    -d '{"reason": "Customer request", "amount": 10000}'

Inspect the virtual object's state with the Restate CLI:
  RESTATE_ADMIN_URL=http://127.0.0.1:$ADMIN_PORT $restate_bin_dir/restate kv get PaymentService payment-001

Gateway audit ledger (one line per real gateway call): $GATEWAY_LEDGER
State persists in .stack/ across runs; use --fresh to start over.
Press Ctrl-C to stop everything.

EOF

# --- wait until Ctrl-C / SIGTERM, or until a child dies ----------------------
set +e
wait -n "$svc_pid" "$rs_pid"
status=$?
set -e
if ! alive "$svc_pid"; then
    show_log_tail "$log_dir/payment-service.log"
    log "payment-service exited unexpectedly (status $status); stopping restate-server"
else
    show_log_tail "$log_dir/restate-server.log"
    log "restate-server exited unexpectedly (status $status); stopping payment-service"
fi
exit 1
