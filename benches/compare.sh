#!/usr/bin/env bash
# Runs the shared harness (../shared/bench/compare.sh) with pgsluice as a custom target beside
# direct PostgreSQL and PgBouncer, in one interleaved run. Extra arguments and the harness's
# environment variables (DURATION, ROUNDS, WORKLOADS, ...) pass through.
#   benches/compare.sh                                   # default workloads
#   DURATION=5 ROUNDS=2 WORKLOADS="select-c16 select-c1000" benches/compare.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
harness=${HARNESS:-$here/../../shared/bench/compare.sh}
command -v pgbouncer >/dev/null || { apt-get update && apt-get install -y pgbouncer; }
(cd "$here/.." && cargo build --release)
exec "$harness" direct pgbouncer "custom:pgsluice:${PGSLUICE_PORT:-25450}:$here/pgsluice-target.sh" "$@"
