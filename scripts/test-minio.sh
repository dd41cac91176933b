#!/usr/bin/env bash
# Runs the S3 suites against MinIO, the second S3 engine (SeaweedFS is the one in
# `make test`): installs and starts MinIO with scripts/minio.sh, runs the ignored tests of
# bluetick-blob (tests/s3.rs: conformance suite, keys by hash, aborted multipart uploads,
# copies in parts, recovery) and bluetick-media (tests/s3.rs: 1 GiB through the media
# binary in bounded memory), and stops MinIO again unless KEEP_ENGINES=1.
#
# Not a phase of `make test`: a cold MinIO build (go install) takes ~16 minutes of CI's
# budget. Run it with `make test-minio`.
#
# Usage: scripts/test-minio.sh [extra cargo test args...]   (e.g. --release for throughput)
# Environment: KEEP_ENGINES=1 to leave MinIO running; every MINIO_* variable of
# scripts/minio.sh (the access and secret keys become AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY for the tests).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$BLUETICK_ROOT"
minio="scripts/minio.sh"
s3_endpoint="http://127.0.0.1:${MINIO_S3_PORT:-9100}"
export AWS_ACCESS_KEY_ID="${MINIO_ACCESS_KEY:-ci-key}"
export AWS_SECRET_ACCESS_KEY="${MINIO_SECRET_KEY:-ci-secret-key}"
export AWS_REGION="us-east-1"

cleanup() {
    local status=$?
    if [[ "${KEEP_ENGINES:-0}" == "1" ]]; then
        log "KEEP_ENGINES=1: leaving minio running on ${s3_endpoint} (scripts/minio.sh stop)"
    else
        "$minio" stop || true
    fi
    exit "$status"
}

timed() {
    local name=$1
    shift
    local started=$SECONDS
    log "minio: ${name}"
    "$@"
    log "minio: ${name} passed in $((SECONDS - started))s"
}

started=$SECONDS
"$minio" install
log "minio installed in $((SECONDS - started))s"
trap cleanup EXIT
started=$SECONDS
"$minio" start
log "minio started in $((SECONDS - started))s"

suite_blob() {
    BLUETICK_TEST_S3_URL="s3://bluetick-blob-test?endpoint=${s3_endpoint}&region=us-east-1&path_style=true" \
        cargo test -p bluetick-blob --test s3 "$@" -- --ignored --nocapture
}

suite_media() {
    BLUETICK_TEST_S3_URL="s3://bluetick-media-test?endpoint=${s3_endpoint}&region=us-east-1&path_style=true" \
        cargo test -p bluetick-media --test s3 "$@" -- --ignored --nocapture
}

timed blob suite_blob "$@"
timed media suite_media "$@"
