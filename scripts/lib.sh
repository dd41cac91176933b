# shellcheck shell=bash
# Small helpers shared by the scripts in this folder. Source it, don't run it:
#
#   # shellcheck source=scripts/lib.sh
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Processes are only ever stopped by the PID we recorded when starting them.

# Repository root (the parent of scripts/).
BLUETICK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BLUETICK_ROOT

# log MESSAGE... : prints a timestamped line on stderr.
log() {
    printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

# die MESSAGE... : prints an error on stderr and exits 1.
die() {
    printf '[%s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2
    exit 1
}

# wait_for_port HOST PORT TIMEOUT_SECONDS : polls until HOST:PORT accepts a TCP connection.
# Returns 1 on timeout.
wait_for_port() {
    local host="$1" port="$2" timeout_s="$3"
    local deadline=$((SECONDS + timeout_s))
    while ((SECONDS < deadline)); do
        if (exec 3<>"/dev/tcp/${host}/${port}") 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    log "timed out after ${timeout_s}s waiting for ${host}:${port}"
    return 1
}

# stop_by_pidfile PIDFILE [GRACE_SECONDS] : sends SIGTERM to the PID recorded in PIDFILE,
# waits up to GRACE_SECONDS (default 10) for it to exit, then sends SIGKILL. Removes the
# pidfile. A missing pidfile or an already exited process is not an error.
stop_by_pidfile() {
    local pidfile="$1" grace_s="${2:-10}"
    [[ -f "$pidfile" ]] || return 0
    local pid
    pid="$(tr -dc '0-9' <"$pidfile")"
    rm -f "$pidfile"
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    log "stopping pid ${pid} (${pidfile})"
    kill -TERM "$pid" 2>/dev/null || return 0
    local deadline=$((SECONDS + grace_s))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid ${pid} still running after ${grace_s}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

# ensure_venv DIR REQUIREMENTS_FILE : creates a Python venv in DIR (git-ignored, e.g. .cache/py)
# and installs the pinned REQUIREMENTS_FILE into it, unless DIR already holds exactly those
# requirements. Idempotent; rebuilds from scratch when the requirements change or a previous
# install was interrupted. The interpreter is $PYTHON, else python3.11, else python3.
ensure_venv() {
    local venv="$1" requirements="$2"
    local stamp="${venv}/.requirements.sha256"
    local wanted
    wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
    if [[ -x "${venv}/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        return 0
    fi
    local python="${PYTHON:-}"
    if [[ -z "$python" ]]; then
        if command -v python3.11 >/dev/null 2>&1; then python=python3.11; else python=python3; fi
    fi
    log "creating venv ${venv} with $("$python" --version 2>&1) from ${requirements}"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "${venv}/bin/python" -m pip install --quiet \
        --no-input -r "$requirements"
    printf '%s\n' "$wanted" >"$stamp"
}
