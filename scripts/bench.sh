#!/usr/bin/env bash
# The performance benchmark, in one command: installs Restate if missing, builds
# release, starts restate-server on free ports with a fresh data folder under
# .bench/, starts payment-service and the floor (examples/bench_floor.rs),
# registers both, runs the load client (benches/payments.rs) through the
# ingress, then stops everything. See README "Performance".
#
# Usage: scripts/bench.sh [options] [-- extra load-client flags]
#   --config tuned|stock|both  restate-server settings [tuned]
#                 tuned: --config-file restate/restate.toml
#                 stock: Restate's defaults (no --config-file)
#                 both:  tuned, then stock, each on a fresh stack, then a comparison
#                 FILE.toml: another configuration file (for experiments)
#   --concurrency N       concurrent requests [64]
#   --duration S          seconds per scenario, except the floor/CreatePayment rounds [10]
#   --rounds N            floor/CreatePayment rounds, alternated ABBA [40]
#   --round-duration S    seconds per side per round [2]
#   --latency-duration S  seconds per concurrency-1 scenario, 0 to skip [10]
#   --scale               scale mode: p99 on an empty server vs with --preload
#                         payments stored (takes ~2 min more per 100k)
#   --preload N           payments stored before the scale mode's second
#                         measurement [100000]
#   --keep                keep Restate's data folder (default: deleted at the end)
#   --no-build            use the binaries already built
#
# Results (JSON summaries, logs): .bench/<time>-<config>[-scale]/.
# Environment: RUST_LOG is passed to payment-service (unset: its default, info);
# the mock gateway runs with GATEWAY_DELAY_MS=0 and GATEWAY_DECLINE_RATE=0.
# PAYMENT_SERVICE_BIN, BENCH_FLOOR_BIN: measure these binaries instead of the
# ones built here (e.g. patched builds, for an A/B comparison).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

config=tuned
concurrency=64
duration=10
rounds=40
round_duration=2
latency_duration=10
mode=standard
preload=100000
keep=false
build=true
extra=()
while (($#)); do
    case "$1" in
        --config) config="${2:?--config needs a value}"; shift 2 ;;
        --concurrency | -c) concurrency="${2:?}"; shift 2 ;;
        --duration | -d) duration="${2:?}"; shift 2 ;;
        --rounds) rounds="${2:?}"; shift 2 ;;
        --round-duration) round_duration="${2:?}"; shift 2 ;;
        --latency-duration) latency_duration="${2:?}"; shift 2 ;;
        --scale) mode=scale; shift ;;
        --preload) preload="${2:?}"; shift 2 ;;
        --keep) keep=true; shift ;;
        --no-build) build=false; shift ;;
        --) shift; extra=("$@"); break ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) echo "bench: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
case "$config" in
    tuned | stock | both) ;;
    *.toml) [[ -f "$config" ]] || { echo "bench: no such file: $config" >&2; exit 2; }
        config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")" ;;
    *) echo "bench: --config must be tuned, stock, both or a .toml file" >&2; exit 2 ;;
esac
for v in concurrency duration rounds round_duration latency_duration preload; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "bench: --${v//_/-} must be a number" >&2; exit 2; }
done

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v curl >/dev/null 2>&1 || die "curl is required"
command -v cargo >/dev/null 2>&1 || die "cargo is required (https://rustup.rs)"

# --- install & build ----------------------------------------------------------
scripts/install-restate.sh >/dev/null
case "$(uname -m)" in x86_64) arch=x64 ;; aarch64 | arm64) arch=arm64 ;; *) arch="$(uname -m)" ;; esac
os="$(uname -s | tr '[:upper:]' '[:lower:]')"
# The native binary, not the node wrapper in node_modules/.bin: its pid is the
# server's (for CPU and memory figures, and for stopping it).
restate_server="$repo_root/scripts/restate/node_modules/@restatedev/restate-server-$os-$arch/bin/restate-server"
[[ -x "$restate_server" ]] || die "restate-server binary not found at $restate_server"

if $build; then
    log "building (release): payment-service, the floor, the load client"
    cargo build --release --bin payment-service --example bench_floor
    cargo bench --bench payments --no-run
fi
target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" == /* ]] || target_dir="$repo_root/$target_dir"
service_bin="${PAYMENT_SERVICE_BIN:-$target_dir/release/payment-service}"
floor_bin="${BENCH_FLOOR_BIN:-$target_dir/release/examples/bench_floor}"
[[ -x "$service_bin" && -x "$floor_bin" ]] || die "binaries not built (drop --no-build)"

# --- processes ------------------------------------------------------------------
if command -v setsid >/dev/null 2>&1; then detach=(setsid); else detach=(); fi
pids=()

alive() {
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

signal() { # signal SIG PID: its process group if it leads one (setsid), else it alone
    kill "-$1" -- "-$2" 2>/dev/null || kill "-$1" "$2" 2>/dev/null || true
}

stop_pid() { # SIGTERM, up to 20 s, then SIGKILL
    local pid="$1" i
    alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    signal TERM "$pid"
    for ((i = 0; i < 200; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "pid $pid did not stop in 20 s; killing it"
    fi
    # Also whatever is left of its process group (e.g. the load client under cargo).
    signal KILL "$pid"
    wait "$pid" 2>/dev/null || true
}

stop_all() {
    local i
    # Last started first: the service and the floor, then the server.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[i]}"; done
    pids=()
}

# shellcheck disable=SC2317 # reached through the traps
on_exit() {
    trap - EXIT INT TERM HUP
    stop_all
}
trap on_exit EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM
trap 'log hangup; exit 129' HUP

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Below the ephemeral range, where outgoing connections (the load's among them)
# take their local ports: a port free now could be taken there a moment later.
ephemeral_low="$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
((ephemeral_low > 12000)) || ephemeral_low=32768
taken=" "
free_port() {
    local p
    while :; do
        p=$((10000 + RANDOM % (ephemeral_low - 10000)))
        [[ "$taken" == *" $p "* ]] && continue
        port_in_use "$p" && continue
        taken+="$p "
        echo "$p"
        return
    done
}

wait_for() { # wait_for WHAT PID LOG CURL_ARGS...: until curl succeeds (60 s)
    # Returns 1 if the process exits meanwhile (e.g. a port taken since it was picked).
    local what="$1" pid="$2" logfile="$3" i
    shift 3
    for ((i = 0; i < 300; i++)); do
        if curl -fsS --max-time 2 -o /dev/null "$@" 2>/dev/null; then return 0; fi
        if ! alive "$pid"; then
            tail -n 12 "$logfile" >&2
            log "$what exited during startup"
            return 1
        fi
        sleep 0.2
    done
    tail -n 30 "$logfile" >&2
    die "$what not ready after 60 s"
}

# Starts the server, the service and the floor on fresh ports and registers the
# two; sets ingress_port, server_pid, service_pid, floor_pid. Returns 1 if a
# process exited during startup (everything started is stopped again).
start_stack() { # start_stack CFG LABEL DIR
    local cfg="$1" label="$2" dir="$3"
    local admin_port node_port service_port floor_port
    ingress_port="$(free_port)"
    admin_port="$(free_port)"
    node_port="$(free_port)"
    service_port="$(free_port)"
    floor_port="$(free_port)"
    rm -rf "$dir/restate-data"

    local server_args=(--base-dir "$dir/restate-data" --no-logo --node-name bench --listen-mode tcp)
    case "$cfg" in
        tuned) server_args+=(--config-file "$repo_root/restate/restate.toml") ;;
        stock) ;;
        *) server_args+=(--config-file "$cfg") ;;
    esac
    log "[$label] restate-server: ingress :$ingress_port, admin :$admin_port (log: ${dir#"$repo_root"/}/restate-server.log)"
    "${detach[@]}" env -u RUST_LOG RESTATE_LOG_DISABLE_ANSI_CODES=true \
        RESTATE_INGRESS__BIND_ADDRESS="127.0.0.1:$ingress_port" \
        RESTATE_ADMIN__BIND_ADDRESS="127.0.0.1:$admin_port" \
        RESTATE_BIND_ADDRESS="127.0.0.1:$node_port" \
        "$restate_server" "${server_args[@]}" >"$dir/restate-server.log" 2>&1 </dev/null &
    server_pid=$!
    pids+=("$server_pid")

    log "[$label] payment-service on :$service_port, floor on :$floor_port"
    "${detach[@]}" env BIND_ADDR="127.0.0.1:$service_port" GATEWAY_DELAY_MS=0 GATEWAY_DECLINE_RATE=0 \
        "$service_bin" >"$dir/payment-service.log" 2>&1 </dev/null &
    service_pid=$!
    pids+=("$service_pid")
    "${detach[@]}" env -u RUST_LOG BIND_ADDR="127.0.0.1:$floor_port" \
        "$floor_bin" >"$dir/bench-floor.log" 2>&1 </dev/null &
    floor_pid=$!
    pids+=("$floor_pid")

    wait_for payment-service "$service_pid" "$dir/payment-service.log" \
        --http2-prior-knowledge "http://127.0.0.1:$service_port/health" || { stop_all; return 1; }
    wait_for bench_floor "$floor_pid" "$dir/bench-floor.log" \
        --http2-prior-knowledge "http://127.0.0.1:$floor_port/health" || { stop_all; return 1; }
    wait_for "restate admin" "$server_pid" "$dir/restate-server.log" \
        "http://127.0.0.1:$admin_port/health" || { stop_all; return 1; }
    wait_for "restate ingress" "$server_pid" "$dir/restate-server.log" \
        "http://127.0.0.1:$ingress_port/restate/health" || { stop_all; return 1; }

    local port
    for port in "$service_port" "$floor_port"; do
        curl -fsS --max-time 30 -o /dev/null -X POST "http://127.0.0.1:$admin_port/deployments" \
            -H 'content-type: application/json' \
            -d "{\"uri\":\"http://127.0.0.1:$port\",\"force\":true}" ||
            die "registering http://127.0.0.1:$port failed"
    done
    # Registered means known to the admin API; wait until the ingress routes to both.
    wait_for "PaymentService via the ingress" "$server_pid" "$dir/restate-server.log" \
        -X POST "http://127.0.0.1:$ingress_port/PaymentService/bench-probe/CreatePayment" \
        -H 'content-type: application/json' -d '{"amount":1,"customerId":"cust-bench"}' ||
        { stop_all; return 1; }
    wait_for "BenchFloor via the ingress" "$server_pid" "$dir/restate-server.log" \
        -X POST "http://127.0.0.1:$ingress_port/BenchFloor/bench-probe/Create" \
        -H 'content-type: application/json' -d '{}' || { stop_all; return 1; }
}

# --- one run: a fresh stack with one configuration -----------------------------
run_one() { # run_one tuned|stock|FILE RESULT_JSON
    local cfg="$1" result="$2" dir label="$1" attempt
    [[ "$cfg" == *.toml ]] && label="$(basename "$cfg" .toml)"
    dir="$(dirname "$result")"
    mkdir -p "$dir"
    for attempt in 1 2 3; do
        start_stack "$cfg" "$label" "$dir" && break
        ((attempt < 3)) || die "the stack did not start (logs in ${dir#"$repo_root"/}/)"
        log "[$label] retrying on other ports"
    done
    log "[$label] stack ready; $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"

    # In the background (and its own session), so that a signal to this script
    # stops it at once instead of after the run.
    local status=0 client_pid
    "${detach[@]}" cargo bench -q --bench payments -- \
        --ingress "http://127.0.0.1:$ingress_port" \
        --mode "$mode" --preload "$preload" \
        --concurrency "$concurrency" --duration "$duration" --rounds "$rounds" --round-duration "$round_duration" \
        --latency-duration "$latency_duration" \
        --service-pid "$service_pid" --floor-pid "$floor_pid" --server-pid "$server_pid" \
        --label "$label" --json "$result" \
        --note "payment-service $service_bin (sha256 $(sha256sum "$service_bin" 2>/dev/null | cut -c1-12)); floor $floor_bin; RUST_LOG=${RUST_LOG:-unset}; $("$restate_server" --version 2>/dev/null | head -n1)" \
        "${extra[@]}" > >(tee "$dir/report.txt") &
    client_pid=$!
    pids+=("$client_pid")
    wait "$client_pid" || status=$?

    du -sh "$dir/restate-data" 2>/dev/null | sed 's/^/[bench] restate data: /' >&2 || true
    stop_all
    if ! $keep; then rm -rf "$dir/restate-data"; fi
    return "$status"
}

stamp="$(date +%Y%m%d-%H%M%S)"
suffix=""
[[ "$mode" == scale ]] && suffix="-scale"
results=()
if [[ "$config" == both ]]; then configs=(tuned stock); else configs=("$config"); fi
for cfg in "${configs[@]}"; do
    name="$cfg"
    [[ "$cfg" == *.toml ]] && name="$(basename "$cfg" .toml)"
    result="$repo_root/.bench/$stamp-$name$suffix/summary.json"
    run_one "$cfg" "$result"
    results+=("$result")
done
if ((${#results[@]} == 2)); then
    echo
    echo "tuned vs stock (gain = tuned / stock):"
    cargo bench -q --bench payments -- --compare "${results[0]}" "${results[1]}"
fi
log "results: ${results[*]#"$repo_root"/}"
