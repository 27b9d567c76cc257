#!/usr/bin/env bash
# Runs psycopg 3's own test suite through pgsluice (or, for comparison, PgBouncer or
# PostgreSQL itself) in front of a throwaway cluster, and prints pytest's summary.
#
#   tests/clients/psycopg-suite.sh PSYCOPG_CHECKOUT [transaction|session]
#   TARGET=pgbouncer tests/clients/psycopg-suite.sh ~/psycopg transaction
#   TARGET=direct tests/clients/psycopg-suite.sh ~/psycopg
#
# PSYCOPG_CHECKOUT is a git checkout of https://github.com/psycopg/psycopg (3.2 or newer); the
# suite is not vendored. It is installed with its pure-Python implementation (the system
# libpq) into a virtualenv at $PSYCOPG_VENV (default PSYCOPG_CHECKOUT/.pgsluice-venv), made
# on first use. Extra pytest arguments go in PYTEST_ARGS. Not part of .ci/run.
#
# Deselected everywhere, so the figures compare like with like (README, "Driver
# compatibility"):
#   -m refcount / timing / flakey   the gc/leak reference-count tests and the timing-based
#                                   ones psycopg itself marks as unreliable on slow machines
#   -m dns                          needs dnspython and a resolver
#   -m mypy                         type-checks examples with mypy (not the driver at work)
#   the tests listed in DESELECT below, with the reasons.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

checkout=${1:?usage: psycopg-suite.sh PSYCOPG_CHECKOUT [transaction|session]}
checkout=$(cd "$checkout" && pwd)
mode=${2:-transaction}

# One per line: a file, or file::test (all its parametrisations); see pgsluice_deselect.py.
DESELECT='
# Compare the backend pid the client was given (BackendKeyData: through a pooler, the
# proxy'"'"'s own) with the server'"'"'s pg_backend_pid() or a NOTIFY'"'"'s sender, or terminate the
# backend by that pid from another connection.
tests/test_connection_info.py::test_backend_pid
tests/pq/test_pgconn.py::test_backend_pid
tests/pq/test_pgconn.py::test_notify
tests/pq/test_pgconn.py::test_weakref
tests/test_notify.py::test_notify_handlers
tests/test_notify_async.py::test_notify_handlers
tests/pool/test_pool.py::test_connect_check
tests/pool/test_pool.py::test_connect_no_check
tests/pool/test_pool.py::test_getconn_check
tests/pool/test_pool.py::test_stats_check
tests/pool/test_pool_async.py::test_connect_check
tests/pool/test_pool_async.py::test_connect_no_check
tests/pool/test_pool_async.py::test_getconn_check
tests/pool/test_pool_async.py::test_stats_check
tests/pool/test_pool_common.py::test_check_connection
tests/pool/test_pool_common_async.py::test_check_connection
tests/test_concurrency.py::test_concurrent_close
tests/test_concurrency.py::test_ctrl_c
tests/test_concurrency_async.py::test_concurrent_close
tests/test_concurrency_async.py::test_ctrl_c
tests/test_connection.py::test_broken
tests/test_connection.py::test_context_inerror_rollback_no_clobber
tests/test_connection.py::test_right_exception_on_server_disconnect
tests/test_connection_async.py::test_broken
tests/test_connection_async.py::test_context_inerror_rollback_no_clobber
tests/test_connection_async.py::test_right_exception_on_server_disconnect
tests/test_transaction.py::test_context_inerror_rollback_no_clobber
tests/test_transaction_async.py::test_context_inerror_rollback_no_clobber
# Try hosts other than loopback (the machines this runs on have no network).
tests/test_conninfo_attempts.py
tests/test_conninfo_attempts_async.py
'

venv=${PSYCOPG_VENV:-$checkout/.pgsluice-venv}
if [ ! -x "$venv/bin/pytest" ]; then
    clients_log "creating $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q pytest anyio pproxy "$checkout/psycopg" "$checkout/psycopg_pool"
fi

clients_start "$mode" psycopg_test
dsn="host=$PGHOST port=$PGPORT user=$PGUSER password=$PGPASSWORD dbname=$PGDATABASE"
args=(-q -p no:randomly -o "cache_dir=$CLIENTS_TMP/pytest-cache" --test-dsn "$dsn"
    -m "not refcount and not timing and not flakey and not dns and not mypy")

export PGSLUICE_DESELECT=$DESELECT PYTHONPATH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)${PYTHONPATH:+:$PYTHONPATH}
args+=(-p pgsluice_deselect)
log=${LOG:-/tmp/psycopg-suite-${TARGET:-pgsluice}-$mode.log}
cd "$checkout"
clients_log "pytest ${args[*]} ${PYTEST_ARGS:-} (full output: $log)"
rc=0
PSYCOPG_IMPL=python "$venv/bin/pytest" "${args[@]}" ${PYTEST_ARGS:-} >"$log" 2>&1 || rc=$?
grep -E '^(FAILED|ERROR) ' "$log" || true
tail -n 1 "$log"
exit "$rc"
