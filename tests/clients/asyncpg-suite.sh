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
# $ASYNCPG_VENV (default ASYNCPG_CHECKOUT/.pgsluice-venv). The tests open the databases
# `postgres`, `testdb` and `asyncpg_intro_test` (the last two they create) as well as
# `asyncpg_test`; all are routed. Extra pytest arguments go in
# PYTEST_ARGS. Not part of .ci/run.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

checkout=${1:?usage: asyncpg-suite.sh ASYNCPG_CHECKOUT [transaction|session]}
checkout=$(cd "$checkout" && pwd)
mode=${2:-transaction}
version=${ASYNCPG_VERSION:-0.31.0}

# One per line: a file, or file::Class::test; see pgsluice_deselect.py.
DESELECT='
# Checks the source tree'"'"'s own code style, not the driver at work.
tests/test__sourcecode.py
# Compare a NOTIFY'"'"'s sender pid with the backend pid the client was given (through a pooler,
# the proxy'"'"'s own).
tests/test_listeners.py::TestListeners::test_listen_01
tests/test_listeners.py::TestListeners::test_listen_02
tests/test_listeners.py::TestListeners::test_listen_notletters
'

venv=${ASYNCPG_VENV:-$checkout/.pgsluice-venv}
if [ ! -x "$venv/bin/pytest" ]; then
    clients_log "creating $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q pytest pytest-timeout "asyncpg==$version" "uvloop" "distro"
fi

clients_start "$mode" postgres asyncpg_test +testdb +asyncpg_intro_test
export PGDATABASE=postgres
# A test waiting for something a pooler cannot deliver (a NOTIFY in transaction mode) fails
# after TEST_TIMEOUT seconds instead of holding up the run.
args=(-q -p no:cacheprovider --timeout "${TEST_TIMEOUT:-30}")
export PGSLUICE_DESELECT=$DESELECT PYTHONPATH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)${PYTHONPATH:+:$PYTHONPATH}
args+=(-p pgsluice_deselect)
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
