#!/usr/bin/env bash
# MinIO (single drive) for bluetick's S3 tests, a second S3 engine beside SeaweedFS. Built
# from source with `go install` at a pinned version into the git-ignored .cache/minio/bin
# (no prebuilt download, no Docker). MinIO is AGPL: it only ever runs as a separate server
# process, nothing links it.
#
# Usage: scripts/minio.sh COMMAND...   (commands run in order, e.g. `install start`)
#   install   build the pinned MinIO into .cache/minio/bin (skipped when that binary is
#             already the pinned version; a cold build takes ~16 min on 2 cores)
#   start     start one server in the background on loopback with a fresh data folder and
#             wait until /minio/health/ready answers and a signed ListBuckets succeeds
#   stop      stop the server by the PID recorded at start
#   status    print whether the server runs and S3 answers (exit 1 if not)
#   url       print the blob store URL of the running server (s3://…, credentials excluded)
#
# Every port is explicit (a busy default port would silently move). Environment (defaults
# in brackets):
#   MINIO_S3_PORT        S3 API                                   [9100]
#   MINIO_CONSOLE_PORT   web console                              [9101]
#   MINIO_ACCESS_KEY     S3 access key (MINIO_ROOT_USER)          [ci-key]
#   MINIO_SECRET_KEY     S3 secret key (MINIO_ROOT_PASSWORD, ≥ 8 characters) [ci-secret-key]
#   MINIO_START_TIMEOUT  seconds to wait for readiness            [90]
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly MINIO_MODULE="github.com/minio/minio"
readonly MINIO_VERSION="v0.0.0-20260212201848-7aac2a2c5b7c"
readonly BIN_DIR="${BLUETICK_ROOT}/.cache/minio/bin"
readonly MINIO="${BIN_DIR}/minio"
readonly PROBE="${BLUETICK_ROOT}/scripts/seaweedfs/s3_probe.py"
readonly ADDRESS="127.0.0.1"

S3_PORT="${MINIO_S3_PORT:-9100}"
CONSOLE_PORT="${MINIO_CONSOLE_PORT:-9101}"
ACCESS_KEY="${MINIO_ACCESS_KEY:-ci-key}"
SECRET_KEY="${MINIO_SECRET_KEY:-ci-secret-key}"
START_TIMEOUT="${MINIO_START_TIMEOUT:-90}"

readonly RUN_DIR="${BLUETICK_ROOT}/.cache/minio-run/s3-${S3_PORT}"
readonly PIDFILE="${RUN_DIR}/minio.pid"
readonly LOGFILE="${RUN_DIR}/minio.log"
readonly ENDPOINT="http://${ADDRESS}:${S3_PORT}"

# Prints the module version the binary was built from (empty when there is none).
installed_version() {
    [[ -x "$MINIO" ]] || return 0
    go version -m "$MINIO" 2>/dev/null | awk '$1 == "mod" { print $3; exit }'
}

cmd_install() {
    command -v go >/dev/null 2>&1 || die "go is required to build MinIO (go install)"
    if [[ "$(installed_version)" == "$MINIO_VERSION" ]]; then
        log "minio ${MINIO_VERSION} already in ${BIN_DIR}"
        return 0
    fi
    local started=$SECONDS
    log "building ${MINIO_MODULE}@${MINIO_VERSION} into ${BIN_DIR} (cold: ~16 min on 2 cores)"
    mkdir -p "$BIN_DIR"
    # Outside the repository so no go.mod/go.work of ours is in play.
    (cd / && GOBIN="$BIN_DIR" go install "${MINIO_MODULE}@${MINIO_VERSION}")
    [[ "$(installed_version)" == "$MINIO_VERSION" ]] ||
        die "go install finished but ${MINIO} is not ${MINIO_VERSION}"
    log "minio ${MINIO_VERSION} ready in ${BIN_DIR} ($((SECONDS - started))s)"
}

running_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}

ready_probe() {
    curl --silent --fail --output /dev/null --max-time "${1:-5}" \
        "${ENDPOINT}/minio/health/ready"
}

s3_probe() {
    python3 "$PROBE" "$ENDPOINT" "$ACCESS_KEY" "$SECRET_KEY" "${1:-5}"
}

cmd_start() {
    [[ -x "$MINIO" ]] || die "minio is not installed: run scripts/minio.sh install"
    ((${#SECRET_KEY} >= 8)) || die "MINIO_SECRET_KEY must have at least 8 characters"
    ((${#ACCESS_KEY} >= 3)) || die "MINIO_ACCESS_KEY must have at least 3 characters"
    local pid
    if pid="$(running_pid)"; then
        log "minio already running (pid ${pid}) on ${ENDPOINT}"
        s3_probe >/dev/null || die "minio pid ${pid} runs but S3 does not answer"
        return 0
    fi
    local port
    for port in "$S3_PORT" "$CONSOLE_PORT"; do
        if (exec 3<>"/dev/tcp/${ADDRESS}/${port}") 2>/dev/null; then
            die "${ADDRESS}:${port} is in use by a process this script did not start"
        fi
    done
    # A fresh data folder per start: tests expect an empty server.
    rm -rf "$RUN_DIR"
    mkdir -p "${RUN_DIR}/data" "${RUN_DIR}/certs"

    local started=$SECONDS
    # Loopback only (S3 and console); certificates looked up in the run folder, not
    # ~/.minio; no update checks.
    (
        cd "$RUN_DIR"
        MINIO_ROOT_USER="$ACCESS_KEY" MINIO_ROOT_PASSWORD="$SECRET_KEY" \
            MINIO_UPDATE=off MINIO_BROWSER_REDIRECT=off \
            exec "$MINIO" server \
            --address "${ADDRESS}:${S3_PORT}" \
            --console-address "${ADDRESS}:${CONSOLE_PORT}" \
            --certs-dir "${RUN_DIR}/certs" \
            "${RUN_DIR}/data"
    ) >"$LOGFILE" 2>&1 </dev/null &
    pid=$!
    printf '%s\n' "$pid" >"$PIDFILE"
    log "started minio (pid ${pid}), waiting for ${ENDPOINT}/minio/health/ready (log: ${LOGFILE})"

    local deadline=$((SECONDS + START_TIMEOUT))
    until ready_probe 2; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            tail -n 40 "$LOGFILE" >&2 || true
            die "minio exited before it was ready"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 40 "$LOGFILE" >&2 || true
            cmd_stop
            die "minio was not ready within ${START_TIMEOUT}s"
        fi
        sleep 0.5
    done
    # Ready means the drive is up; a signed request also checks the credentials.
    if ! s3_probe 5; then
        tail -n 40 "$LOGFILE" >&2 || true
        cmd_stop
        die "minio is ready but refuses a signed ListBuckets"
    fi
    log "minio S3 answers on ${ENDPOINT} after $((SECONDS - started))s (pid ${pid})"
}

cmd_stop() {
    if [[ ! -f "$PIDFILE" ]]; then
        log "minio on ${ENDPOINT} is not running (no pidfile)"
        return 0
    fi
    stop_by_pidfile "$PIDFILE" 20
}

cmd_status() {
    local pid
    if ! pid="$(running_pid)"; then
        echo "minio on ${ENDPOINT}: not running"
        return 1
    fi
    if ready_probe && s3_probe; then
        echo "minio on ${ENDPOINT}: running (pid ${pid}), S3 answers"
    else
        echo "minio on ${ENDPOINT}: running (pid ${pid}), S3 does not answer"
        return 1
    fi
}

cmd_url() {
    echo "s3://bluetick-test?endpoint=${ENDPOINT}&region=us-east-1&path_style=true"
}

[[ $# -ge 1 ]] || die "usage: scripts/minio.sh {install|start|stop|status|url}..."
for command in "$@"; do
    case "$command" in
        install) cmd_install ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        url) cmd_url ;;
        *) die "unknown command ${command}: expected install, start, stop, status or url" ;;
    esac
done
