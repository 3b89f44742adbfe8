#!/usr/bin/env bash
# Installs the pinned Restate server and CLIs (restate-server, restate,
# restatectl) from npm into scripts/restate/node_modules.
#
# Idempotent: does nothing when the three binaries are there, run, and were
# installed from the current package-lock.json. Otherwise runs `npm ci`.
# Works from any working directory.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg_dir="$repo_root/scripts/restate"
bin_dir="$pkg_dir/node_modules/.bin"
# npm ci never writes this file: it records which lock the install came from,
# so a bumped version in package-lock.json triggers a reinstall.
stamp="$pkg_dir/node_modules/.installed-lock.sha256"

lock_hash() {
    # sha256sum (GNU) or shasum (macOS), whichever exists.
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$pkg_dir/package-lock.json" | cut -d' ' -f1
    else
        shasum -a 256 "$pkg_dir/package-lock.json" | cut -d' ' -f1
    fi
}

up_to_date() {
    [[ -f "$stamp" && "$(cat "$stamp")" == "$(lock_hash)" ]] || return 1
    local b
    for b in restate-server restate restatectl; do
        # The .bin entries are node wrappers around a per-platform native
        # binary (an optional npm dependency); --version proves both exist.
        "$bin_dir/$b" --version >/dev/null 2>&1 || return 1
    done
}

if ! up_to_date; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "install-restate: npm not found; install Node.js (>= 18) and npm first" >&2
        exit 1
    fi
    echo "install-restate: installing Restate from scripts/restate/package-lock.json ..." >&2
    # SCARF_ANALYTICS=false: the packages depend on @scarf/scarf, whose
    # install hook would otherwise try to send install analytics.
    SCARF_ANALYTICS=false npm ci --prefix "$pkg_dir" --no-audit --no-fund >&2
    lock_hash >"$stamp"
    if ! up_to_date; then
        echo "install-restate: npm ci finished but the binaries do not run (unsupported platform?)" >&2
        exit 1
    fi
fi

for b in restate-server restate restatectl; do
    printf '%-15s %s (%s)\n' "$b" "$bin_dir/$b" "$("$bin_dir/$b" --version 2>/dev/null | head -n1)"
done
