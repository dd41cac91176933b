#!/usr/bin/env bash
# Runs bluetick against real engines: Apache Cassandra (the CQL engine standing in for
# ScyllaDB) and SeaweedFS (S3). Installs and starts both once, then:
#   1. the storage conformance suites on CQL and the blob suite on S3;
#   2. the media service on S3 (including the 1 GiB upload/download with its peak RSS);
#   3. the whole end-to-end suite (tests/) with every service on the engines;
#   4. an outage: the engine down at start-up is a clear error; down while running gives
#      UNAVAILABLE; back up, service resumes without a restart.
# Both engines are stopped at the end unless KEEP_ENGINES=1.
#
# Usage: scripts/test-engines.sh [store|media|e2e|outage]...   (default: all, in order)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$BLUETICK_ROOT"
cassandra="scripts/cassandra.sh"
seaweedfs="scripts/seaweedfs.sh"
cql_host="127.0.0.1:${CASSANDRA_NATIVE_PORT:-9042}"
s3_endpoint="http://127.0.0.1:${SEAWEEDFS_S3_PORT:-8333}"
export AWS_ACCESS_KEY_ID="${SEAWEEDFS_ACCESS_KEY:-ci-key}"
export AWS_SECRET_ACCESS_KEY="${SEAWEEDFS_SECRET_KEY:-ci-secret}"
export AWS_REGION="us-east-1"

phases=("$@")
((${#phases[@]} > 0)) || phases=(store media e2e outage)

cleanup() {
    local status=$?
    if ((status != 0)); then
        # What the engine said is the first thing a failed CI run needs.
        "$seaweedfs" log >&2 || true
    fi
    if [[ "${KEEP_ENGINES:-0}" == "1" ]]; then
        log "KEEP_ENGINES=1: leaving cassandra and seaweedfs running"
    else
        "$cassandra" stop || true
        "$seaweedfs" stop || true
    fi
    exit "$status"
}

timed() {
    local name=$1
    shift
    local started=$SECONDS
    log "engines: ${name}"
    "$@"
    log "engines: ${name} passed in $((SECONDS - started))s"
}

started=$SECONDS
"$cassandra" install
"$seaweedfs" install
log "engines installed in $((SECONDS - started))s"
trap cleanup EXIT
started=$SECONDS
"$seaweedfs" start
"$cassandra" start
log "engines started in $((SECONDS - started))s"

phase_store() {
    BLUETICK_TEST_CQL_URL="scylla://${cql_host}/bluetick_store_test" \
        cargo test -p bluetick-store --test cql -- --ignored --nocapture
    BLUETICK_TEST_S3_URL="s3://bluetick-blob-test?endpoint=${s3_endpoint}&region=us-east-1&path_style=true" \
        cargo test -p bluetick-blob --test s3 -- --ignored --nocapture
}

phase_media() {
    BLUETICK_TEST_S3_URL="s3://bluetick-media-test?endpoint=${s3_endpoint}&region=us-east-1&path_style=true" \
        cargo test -p bluetick-media --test s3 -- --ignored --nocapture
}

# The in-process suites that exercise storage, on the engines (the encryption, flow and
# crash suites do not touch it differently and run on the embedded store). One test at a
# time: each test has its own tokio runtime, and a CQL session belongs to the runtime that
# opened it.
phase_e2e() {
    BLUETICK_TEST_STORE_URL="scylla://${cql_host}/bluetick_e2e" \
        BLUETICK_TEST_MEDIA_URL="s3://bluetick-e2e?endpoint=${s3_endpoint}&region=us-east-1&path_style=true" \
        cargo test -p bluetick-tests --test messaging --test presence --test media \
        --test bad_input -- --test-threads=1
}

phase_outage() {
    bash scripts/engine-outage.sh "$cql_host"
}

for phase in "${phases[@]}"; do
    case "$phase" in
        store | media | e2e | outage) timed "$phase" "phase_${phase}" ;;
        *) die "unknown phase ${phase} (store, media, e2e, outage)" ;;
    esac
done
