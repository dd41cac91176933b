#!/usr/bin/env bash
# Runs the S3 tests against a real S3 server: installs and starts SeaweedFS with
# scripts/seaweedfs.sh, runs the ignored tests of bluetick-blob (tests/s3.rs: conformance
# suite, keys by hash, aborted multipart uploads, recovery) and bluetick-media (tests/s3.rs:
# 1 GiB through the media binary in bounded memory) with BLUETICK_TEST_S3_URL and the
# credentials, and stops the server again unless KEEP_ENGINES=1.
#
# Usage: scripts/test-s3.sh [extra cargo test args...]   (e.g. --release for throughput)
# Environment: KEEP_ENGINES=1 to leave SeaweedFS running; BLUETICK_TEST_S3_URL to use
# another server (default s3://bluetick-test?endpoint=http://127.0.0.1:<SEAWEEDFS_S3_PORT>
# &region=us-east-1&path_style=true; each test makes its own bucket); every SEAWEEDFS_*
# variable of scripts/seaweedfs.sh (the access and secret keys become AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY for the tests).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

seaweedfs="${BLUETICK_ROOT}/scripts/seaweedfs.sh"
port="${SEAWEEDFS_S3_PORT:-8333}"
url="${BLUETICK_TEST_S3_URL:-s3://bluetick-test?endpoint=http://127.0.0.1:${port}&region=us-east-1&path_style=true}"

cleanup() {
    local status=$?
    if [[ "${KEEP_ENGINES:-0}" == "1" ]]; then
        log "KEEP_ENGINES=1: leaving seaweedfs running on 127.0.0.1:${port} (scripts/seaweedfs.sh stop)"
    else
        "$seaweedfs" stop || true
    fi
    exit "$status"
}

"$seaweedfs" install
trap cleanup EXIT
"$seaweedfs" start

export BLUETICK_TEST_S3_URL="$url"
export AWS_ACCESS_KEY_ID="${SEAWEEDFS_ACCESS_KEY:-ci-key}"
export AWS_SECRET_ACCESS_KEY="${SEAWEEDFS_SECRET_KEY:-ci-secret}"
cd "$BLUETICK_ROOT"
log "running the S3 blob store tests against ${url}"
started=$SECONDS
cargo test -p bluetick-blob --test s3 "$@" -- --ignored
log "running the media service on S3 tests (1 GiB round trip)"
cargo test -p bluetick-media --test s3 "$@" -- --ignored --nocapture
log "S3 tests passed in $((SECONDS - started))s"
