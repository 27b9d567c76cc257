#!/usr/bin/env bash
# Runs asyncpg's own tests (the tests directory of a checkout the user provides) against the
# released asyncpg through pgsluice (or, for comparison, PgBouncer or PostgreSQL itself) in
# front of a throwaway cluster, and prints pytest's summary.
#
#   tests/clients/asyncpg-suite.sh ASYNCPG_CHECKOUT [transaction|session]
#   TARGET=pgbouncer tests/clients/asyncpg-suite.sh ~/asyncpg session
#
# Check out the tag of the release under test (ASYNCPG_VERSION, default 0.31.0: git checkout
# v0.31.0), so tests and driver match. The driver is installed from PyPI into a virtualenv at
# $ASYNCPG_VENV (default ASYNCPG_CHECKOUT/.pgsluice-venv). The tests open the database
# `postgres` as well as `asyncpg_test`; both are routed. Extra pytest arguments go in
# PYTEST_ARGS. Not part of .ci/run.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

checkout=${1:?usage: asyncpg-suite.sh ASYNCPG_CHECKOUT [transaction|session]}
checkout=$(cd "$checkout" && pwd)
mode=${2:-transaction}
version=${ASYNCPG_VERSION:-0.31.0}

DESELECT=(
    # Checks the source tree's own code style (flake8/mypy), not the driver at work.
    "tests/test__sourcecode.py"
)

venv=${ASYNCPG_VENV:-$checkout/.pgsluice-venv}
if [ ! -x "$venv/bin/pytest" ]; then
    clients_log "creating $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q pytest "asyncpg==$version" "uvloop" "distro"
fi

clients_start "$mode" postgres asyncpg_test
export PGDATABASE=postgres
args=(-q -p no:cacheprovider)
for t in "${DESELECT[@]}"; do args+=(--deselect "$t"); done
log=${LOG:-/tmp/asyncpg-suite-${TARGET:-pgsluice}-$mode.log}
# Run from an empty directory, so `import asyncpg` is the installed release, not the checkout.
mkdir -p "$CLIENTS_TMP/run"
cp -r "$checkout/tests" "$CLIENTS_TMP/run/tests"
cd "$CLIENTS_TMP/run"
clients_log "pytest ${args[*]} ${PYTEST_ARGS:-} (full output: $log)"
rc=0
"$venv/bin/pytest" "${args[@]}" ${PYTEST_ARGS:-} tests >"$log" 2>&1 || rc=$?
grep -E '^(FAILED|ERROR) ' "$log" || true
tail -n 1 "$log"
exit "$rc"
