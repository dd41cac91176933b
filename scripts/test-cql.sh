#!/usr/bin/env bash
# Runs the CQL store tests (crates/store/tests/cql.rs) against a real Apache Cassandra node:
# installs and starts it with scripts/cassandra.sh, runs the ignored tests with
# BLUETICK_TEST_CQL_URL, prints the per-operation latencies, and stops the node again
# unless KEEP_ENGINES=1.
#
# Usage: scripts/test-cql.sh [extra cargo test args...]
# Environment: KEEP_ENGINES=1 to leave the node running; BLUETICK_TEST_CQL_URL to override
# the URL (default scylla://<CASSANDRA_LISTEN_ADDRESS>:<CASSANDRA_NATIVE_PORT>/bluetick_test);
# every CASSANDRA_* variable of scripts/cassandra.sh.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cassandra="${BLUETICK_ROOT}/scripts/cassandra.sh"
address="${CASSANDRA_LISTEN_ADDRESS:-127.0.0.1}"
port="${CASSANDRA_NATIVE_PORT:-9042}"
url="${BLUETICK_TEST_CQL_URL:-scylla://${address}:${port}/bluetick_test}"

cleanup() {
    local status=$?
    if [[ "${KEEP_ENGINES:-0}" == "1" ]]; then
        log "KEEP_ENGINES=1: leaving cassandra running on ${address}:${port} (scripts/cassandra.sh stop)"
    else
        "$cassandra" stop || true
    fi
    exit "$status"
}

"$cassandra" install
trap cleanup EXIT
"$cassandra" start

log "running the CQL store tests against ${url}"
started=$SECONDS
cd "$BLUETICK_ROOT"
BLUETICK_TEST_CQL_URL="$url" cargo test -p bluetick-store --test cql "$@" -- --ignored --nocapture
log "CQL store tests passed in $((SECONDS - started))s"
