# Shared by the driver-suite scripts in this folder (sourced, not run): a throwaway PostgreSQL
# cluster on a free loopback port, and the target the suite talks to in front of it:
#   TARGET=pgsluice (default)  the release binary of this checkout (built if missing)
#   TARGET=pgbouncer           $PGBOUNCER (default /opt/pgbouncer-new/bin/pgbouncer, built by
#                              ../shared/bench/build-pgbouncer-new.sh; else pgbouncer on PATH)
#   TARGET=direct              PostgreSQL itself
# Both proxies pool `default_pool_size = 20` server connections in the given mode and route
# the databases given to clients_start. PgBouncer gets `max_prepared_statements = 200`, as
# pgsluice has by default. Everything is removed on exit.
#
# After clients_start: PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE are exported for the
# target, and CLIENTS_PG_PORT is PostgreSQL's own port.

set -euo pipefail

CLIENTS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLIENTS_TMP=$(mktemp -d /tmp/pgsluice-clients.XXXXXX)
chmod 755 "$CLIENTS_TMP"
CLIENTS_PIDS=()

clients_log() { echo "clients: $*" >&2; }

clients_cleanup() {
    local pid
    for pid in "${CLIENTS_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ -f "$CLIENTS_TMP/data/postmaster.pid" ]; then
        clients_as_pg "$CLIENTS_PG_BIN/pg_ctl" -D "$CLIENTS_TMP/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$CLIENTS_TMP"
}
trap clients_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command as the postgres user when we are root (setpriv keeps the descriptor limit).
clients_as_pg() {
    if [ "$(id -u)" = 0 ]; then
        setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
    else
        "$@"
    fi
}

clients_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

clients_pg_bin() {
    local d
    if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$d/initdb" ] && { echo "$d"; return; }
    done
    dirname "$(command -v initdb)"
}

# Waits (bounded) until `psql -c 'select 1'` works on port $1.
clients_wait_ready() {
    local port=$1 i
    for i in $(seq 1 300); do
        if PGPASSWORD=postgres "$CLIENTS_PG_BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres \
            -d "$CLIENTS_FIRST_DB" -c 'select 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    clients_log "nothing answers on port $port"
    cat "$CLIENTS_TMP"/*.log >&2 || true
    return 1
}

# clients_start MODE DB [DB ...]: the cluster (superuser postgres / postgres, SCRAM), the
# databases, and the target in MODE (transaction | session), routing them all. A name
# written +NAME is routed but not created (the suite creates it itself).
clients_start() {
    local mode=$1
    shift
    CLIENTS_FIRST_DB=$1
    local routed=("${@#+}")
    CLIENTS_PG_BIN=$(clients_pg_bin)
    CLIENTS_PG_PORT=$(clients_free_port)
    local target=${TARGET:-pgsluice}
    echo postgres >"$CLIENTS_TMP/pwfile"
    chmod 644 "$CLIENTS_TMP/pwfile"
    if [ "$(id -u)" = 0 ]; then chown postgres "$CLIENTS_TMP"; fi
    clients_as_pg "$CLIENTS_PG_BIN/initdb" -D "$CLIENTS_TMP/data" -U postgres --pwfile="$CLIENTS_TMP/pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$CLIENTS_TMP/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $CLIENTS_PG_PORT
unix_socket_directories = '$CLIENTS_TMP'
max_connections = 300
max_prepared_transactions = 10
fsync = off
synchronous_commit = off
CONF
    clients_as_pg "$CLIENTS_PG_BIN/pg_ctl" -D "$CLIENTS_TMP/data" -l "$CLIENTS_TMP/postgres.log" -w start >/dev/null
    local db
    for db in "$@"; do
        case "$db" in postgres | template1 | +*) continue ;; esac
        clients_as_pg "$CLIENTS_PG_BIN/psql" -X -q -h "$CLIENTS_TMP" -p "$CLIENTS_PG_PORT" -U postgres -d postgres \
            -c "CREATE DATABASE \"$db\""
    done
    local port
    CLIENTS_TARGET_PORT=$(clients_free_port)
    case "$target" in
        direct) CLIENTS_TARGET_PORT=$CLIENTS_PG_PORT ;;
        pgsluice) clients_start_pgsluice "$mode" "${routed[@]}" ;;
        pgbouncer) clients_start_pgbouncer "$mode" "${routed[@]}" ;;
        *) clients_log "unknown TARGET $target (pgsluice, pgbouncer, direct)"; return 1 ;;
    esac
    port=$CLIENTS_TARGET_PORT
    clients_wait_ready "$port"
    export PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres PGPASSWORD=postgres PGDATABASE=$CLIENTS_FIRST_DB
    clients_log "$target ($mode) on 127.0.0.1:$port in front of PostgreSQL on $CLIENTS_PG_PORT"
}

clients_start_pgsluice() {
    local mode=$1 port=$CLIENTS_TARGET_PORT db
    shift
    local bin=${PGSLUICE_BIN:-$CLIENTS_ROOT/target/release/pgsluice}
    if [ ! -x "$bin" ]; then (cd "$CLIENTS_ROOT" && cargo build --release >&2); fi
    {
        echo "listen_addr = \"127.0.0.1:$port\""
        echo "pool_mode = \"$mode\""
        echo "default_pool_size = 20"
        echo "max_client_conn = 2000"
        for db in "$@"; do
            printf '\n[databases.%s]\nhost = "127.0.0.1"\nport = %s\n' "$db" "$CLIENTS_PG_PORT"
        done
        printf '\n[users.postgres]\npassword = "postgres"\n'
    } >"$CLIENTS_TMP/pgsluice.toml"
    PGSLUICE_LOG=${PGSLUICE_LOG:-warn} "$bin" --config "$CLIENTS_TMP/pgsluice.toml" \
        >"$CLIENTS_TMP/pgsluice.log" 2>&1 &
    CLIENTS_PIDS+=($!)
}

clients_start_pgbouncer() {
    local mode=$1 port=$CLIENTS_TARGET_PORT db
    shift
    local bin=${PGBOUNCER:-/opt/pgbouncer-new/bin/pgbouncer}
    [ -x "$bin" ] || bin=$(command -v pgbouncer)
    {
        echo "[databases]"
        for db in "$@"; do echo "$db = host=127.0.0.1 port=$CLIENTS_PG_PORT"; done
        cat <<INI
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $CLIENTS_TMP/userlist.txt
pool_mode = $mode
default_pool_size = 20
max_client_conn = 2000
max_prepared_statements = 200
ignore_startup_parameters = extra_float_digits,options
logfile = $CLIENTS_TMP/pgbouncer.log
INI
    } >"$CLIENTS_TMP/pgbouncer.ini"
    echo '"postgres" "postgres"' >"$CLIENTS_TMP/userlist.txt"
    chmod 644 "$CLIENTS_TMP/pgbouncer.ini" "$CLIENTS_TMP/userlist.txt"
    clients_as_pg "$bin" "$CLIENTS_TMP/pgbouncer.ini" >/dev/null 2>&1 &
    CLIENTS_PIDS+=($!)
}
