#!/usr/bin/env bash
# Prepare a checkout for the demo and the tests; safe to run any number of
# times.  Installs the Redis server, sentinel, CLI and openssl, and the
# Compose CLI that checks docker-compose.yml, with apt-get when one of them
# is missing, insists on Redis 7 or newer, and keeps the virtual
# environment in .venv in step with pyproject.toml.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly MIN_REDIS_MAJOR=7
readonly VENV=.venv
readonly STAMP="$VENV/.installed"
# test: the suite; bench: the peers benchmarks/compare.py measures.
readonly EXTRAS="test,bench"

die() {
    echo "setup: $*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 \
        || die "apt-get not found; install these by hand: $*"
    echo "setup: installing $* with apt-get" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_system_tools() {
    local missing=0
    local tool
    for tool in redis-server redis-cli redis-sentinel openssl; do
        command -v "$tool" >/dev/null 2>&1 || missing=1
    done
    if [ "$missing" -eq 1 ]; then
        apt_install redis-server redis-tools redis-sentinel openssl
    fi
}

# tests/test_topology.py checks docker-compose.yml with the Compose CLI;
# `config` reads the file only, so no Docker engine is needed.
install_compose_cli() {
    if docker compose version >/dev/null 2>&1 \
        || docker-compose version >/dev/null 2>&1; then
        return
    fi
    apt_install docker-compose
}

check_redis_version() {
    local banner major
    banner="$(redis-server --version)"
    major="$(sed -n 's/.* v=\([0-9][0-9]*\)\..*/\1/p' <<<"$banner")"
    [ -n "$major" ] || die "cannot read the version from: $banner"
    if [ "$major" -lt "$MIN_REDIS_MAJOR" ]; then
        die "redis-server $major.x found, $MIN_REDIS_MAJOR.0 or newer" \
            "needed (the distribution's package is too old; install" \
            "Redis from the Redis project's own package repository)"
    fi
}

make_venv() {
    [ -x "$VENV/bin/python" ] && return
    command -v python3 >/dev/null 2>&1 || die "python3 not found"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "Python 3.10 or newer needed, found $(python3 --version)"

    # Debian and Ubuntu ship venv's pip bootstrap as a separate package.
    if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    python3 -m venv "$VENV"
}

install_project() {
    # The stamp records the extras it was made with, so that a venv made
    # before an extra was added here is brought up to date.
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$EXTRAS" ] \
        && [ ! pyproject.toml -nt "$STAMP" ] \
        && [ ! constraints.txt -nt "$STAMP" ]; then
        return
    fi
    # Pinned, so that every run tests the same versions.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c constraints.txt -e ".[$EXTRAS]"
    echo "$EXTRAS" >"$STAMP"
}

install_system_tools
install_compose_cli
check_redis_version
make_venv
install_project
