#!/usr/bin/env bash
# Installs the pinned localstripe (scripts/localstripe/requirements.txt) from PyPI into a
# virtual environment at scripts/localstripe/venv, for the Stripe adapter's conformance test.
#
# Idempotent: does nothing when the venv's localstripe is there, imports, and was installed
# from the current requirements.txt. Otherwise builds the venv afresh. Works from any working
# directory. Needs python3 (>= 3.9) with its venv module.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg_dir="$repo_root/scripts/localstripe"
venv="$pkg_dir/venv"
requirements="$pkg_dir/requirements.txt"
# pip never writes this file: it records which requirements the venv came from, so a bumped
# pin triggers a reinstall.
stamp="$venv/.installed-requirements.sha256"

requirements_hash() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$requirements" | cut -d' ' -f1
    else
        shasum -a 256 "$requirements" | cut -d' ' -f1
    fi
}

up_to_date() {
    [[ -f "$stamp" && "$(cat "$stamp")" == "$(requirements_hash)" ]] || return 1
    [[ -x "$venv/bin/localstripe" ]] || return 1
    # Imports the server module: proves the interpreter and every dependency are there.
    "$venv/bin/python" -c 'import localstripe.server' >/dev/null 2>&1
}

if ! up_to_date; then
    if ! command -v python3 >/dev/null 2>&1; then
        echo "install-localstripe: python3 not found; install Python (>= 3.9) first" >&2
        exit 1
    fi
    echo "install-localstripe: installing localstripe from scripts/localstripe/requirements.txt ..." >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$requirements" >&2
    requirements_hash >"$stamp"
    if ! up_to_date; then
        echo "install-localstripe: pip finished but localstripe does not import" >&2
        exit 1
    fi
fi

printf '%-15s %s (%s)\n' localstripe "$venv/bin/localstripe" \
    "$("$venv/bin/python" -c 'import localstripe; print(localstripe.__version__)')"
