#!/usr/bin/env bash
# Runs node-postgres's own tests through pgsluice (or, for comparison, PgBouncer or
# PostgreSQL itself) in front of a throwaway cluster: pg's integration files one by one, as
# its Makefile does (`make test-integration`), then pg-pool's and pg-cursor's mocha suites.
# Prints each failing file and a summary.
#
#   tests/clients/node-postgres-suite.sh NODE_POSTGRES_CHECKOUT [transaction|session]
#   TARGET=pgbouncer tests/clients/node-postgres-suite.sh ~/node-postgres session
#
# NODE_POSTGRES_CHECKOUT is a git checkout of https://github.com/brianc/node-postgres; the
# script runs `yarn install` and `yarn build` there on first use (needs Node.js and the npm
# registry). The tests use databases `postgres` and `template1`, which are routed. Not part
# of .ci/run.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

checkout=${1:?usage: node-postgres-suite.sh NODE_POSTGRES_CHECKOUT [transaction|session]}
checkout=$(cd "$checkout" && pwd)
mode=${2:-transaction}

if [ ! -d "$checkout/packages/pg-protocol/dist" ]; then
    clients_log "installing node-postgres's dependencies"
    command -v yarn >/dev/null || npm install -g yarn
    (cd "$checkout" && yarn install --frozen-lockfile --ignore-engines && yarn build) >&2
fi

clients_start "$mode" postgres template1
log=${LOG:-/tmp/node-postgres-suite-${TARGET:-pgsluice}-$mode.log}
: >"$log"
passed=0
failed=()
run_file() { # name, command...
    local name=$1
    shift
    if timeout 600 "$@" >>"$log" 2>&1; then
        passed=$((passed + 1))
    else
        failed+=("$name")
        echo "FAILED $name" | tee -a "$log"
    fi
}
cd "$checkout/packages/pg"
for f in $(find test/integration -name '*-tests.js' | sort); do
    echo "== pg $f" >>"$log"
    run_file "pg/$f" node "$f"
done
for pkg in pg-pool pg-cursor; do
    echo "== $pkg (mocha)" >>"$log"
    cd "$checkout/packages/$pkg"
    run_file "$pkg" yarn --silent test
done
echo "node-postgres through ${TARGET:-pgsluice} ($mode): $passed passed, ${#failed[@]} failed (full output: $log)"
[ "${#failed[@]}" = 0 ]
