#!/usr/bin/env bash
# The CQL engine failing under bluetick, tested from the outside with the real binaries:
#   1. engine unreachable at start-up: bluetick-dev exits non-zero with a clear message;
#   2. engine stopped while running: calls fail with UNAVAILABLE, nothing panics;
#   3. engine back (same data): calls succeed again without restarting bluetick, and the
#      message stored before the outage is still there.
# Expects a running node from scripts/cassandra.sh; restarts it with its data.
#
# Usage: scripts/engine-outage.sh HOST:PORT
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$BLUETICK_ROOT"
cql_host="${1:-127.0.0.1:9042}"
work="$(mktemp -d "${TMPDIR:-/tmp}/bluetick-outage.XXXXXX")"
dev_pid=""

finish() {
    local status=$?
    if [[ -n "$dev_pid" ]] && kill -0 "$dev_pid" 2>/dev/null; then
        kill -TERM "$dev_pid" || true
        wait "$dev_pid" 2>/dev/null || true
    fi
    if ((status != 0)); then
        log "bluetick-dev log (tail):"
        tail -n 40 "$work/dev.log" >&2 || true
    fi
    rm -rf "$work"
    exit "$status"
}
trap finish EXIT

[[ "${BLUETICK_PREBUILT:-0}" == "1" ]] || cargo build -q -p bluetick-dev -p bluetick-cli
dev="target/debug/bluetick-dev"
cli="target/debug/bluetick"

# 1. Unreachable engine at start-up.
if timeout 60 "$dev" --data-dir "$work/none" --ephemeral-ports \
    --store "scylla://127.0.0.1:1/bluetick_outage" >"$work/unreachable.log" 2>&1; then
    die "bluetick-dev started without its engine"
fi
grep -q "cannot reach the CQL engine" "$work/unreachable.log" ||
    die "no clear start-up error: $(tail -n 5 "$work/unreachable.log")"
grep -q "panicked" "$work/unreachable.log" && die "bluetick-dev panicked"
log "outage: unreachable engine at start-up is a clear error"

# 2. Running on the engine.
"$dev" --data-dir "$work/data" --ephemeral-ports --endpoints-file "$work/endpoints.json" \
    --store "scylla://${cql_host}/bluetick_outage" >"$work/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 600); do
    [[ -f "$work/endpoints.json" ]] && break
    kill -0 "$dev_pid" 2>/dev/null || die "bluetick-dev exited"
    sleep 0.1
done
[[ -f "$work/endpoints.json" ]] || die "bluetick-dev did not start"
gateway="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["gateway"])' "$work/endpoints.json")"
media="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["media"])' "$work/endpoints.json")"
export BLUETICK_HOME="$work/home"
suffix="$RANDOM$RANDOM"
"$cli" --profile a register "alice${suffix}" --server "$gateway" --media "$media" >/dev/null
"$cli" --profile b register "bob${suffix}" --server "$gateway" --media "$media" >/dev/null
"$cli" --profile a send "bob${suffix}" "before the outage" --wait 0 >/dev/null

scripts/cassandra.sh stop
if out="$(timeout 120 "$cli" --profile a last-seen "bob${suffix}" 2>&1)"; then
    die "a call succeeded with the engine down: $out"
fi
grep -qi "unavailable" <<<"$out" || die "expected UNAVAILABLE with the engine down, got: $out"
kill -0 "$dev_pid" 2>/dev/null || die "bluetick-dev died with its engine"
log "outage: engine down gives UNAVAILABLE ($out)"

# 3. Back with its data: bluetick resumes on its own.
CASSANDRA_KEEP_DATA=1 scripts/cassandra.sh start
resumed=""
for _ in $(seq 1 60); do
    if "$cli" --profile a send "bob${suffix}" "after the outage" --wait 0 >/dev/null 2>&1; then
        resumed=1
        break
    fi
    sleep 2
done
[[ -n "$resumed" ]] || die "bluetick did not resume after the engine came back"
unread="$("$cli" --profile b read)"
grep -q "before the outage" <<<"$unread" || die "message stored before the outage lost: $unread"
grep -q "after the outage" <<<"$unread" || die "message sent after the outage missing: $unread"
grep -q "panicked" "$work/dev.log" && die "bluetick-dev panicked"
log "outage: service resumed without a restart; no message lost"
