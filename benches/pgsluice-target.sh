#!/usr/bin/env bash
# Launcher for ../shared/bench/compare.sh: writes a pgsluice config from the harness's
# variables (PG_HOST, PG_PORT, BENCH_USER, BENCH_PASSWORD, BENCH_DB, POOL_SIZE, TARGET_PORT,
# TARGET_DIR) and execs the release binary in the foreground. Settings mirror the harness's
# PgBouncer: transaction pooling, POOL_SIZE server connections, clients wait up to 120 s.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${PGSLUICE_BIN:-$here/../target/release/pgsluice}
cfg="$TARGET_DIR/pgsluice.toml"
auth=trust
[ "${PG_AUTH:-trust}" = scram ] && auth=scram-sha-256
cat >"$cfg" <<TOML
listen_addr = "127.0.0.1:$TARGET_PORT"
pool_mode = "transaction"
default_pool_size = $POOL_SIZE
max_client_conn = 5000
query_wait_timeout = "120s"

[databases.$BENCH_DB]
host = "$PG_HOST"
port = $PG_PORT

[users.$BENCH_USER]
password = "$BENCH_PASSWORD"
auth = "$auth"
TOML
export PGSLUICE_LOG=${PGSLUICE_LOG:-warn}
exec "$bin" --config "$cfg"
