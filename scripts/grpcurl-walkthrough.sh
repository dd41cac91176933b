#!/usr/bin/env bash
# Runs the README's "Explore with grpcurl" walkthrough with the real grpcurl (v1.9.3, from
# scripts/tools.sh) against a fresh bluetick-dev cluster on ephemeral loopback ports, and
# checks every answer:
#
#   grpcurl -plaintext GATEWAY list                            the five public services
#   grpcurl -plaintext GATEWAY describe bluetick.gateway.v1.Chat
#   grpcurl ... Accounts/Register (carol, then dave)           device 1 and a token each
#   grpcurl ... Presence/GetLastSeen without a token           Unauthenticated
#   grpcurl -H "authorization: Bearer $TOKEN" ... GetLastSeen  carol's presence
#   grpcurl ... grpc.health.v1.Health/Check on an internal port (messaging) and on the
#   gateway's internal port                                    SERVING
#
# The cluster binary is built with cargo first ($CARGO, default cargo; the same build as
# scripts/python-client-test.sh, so after `make test-fast` nothing is compiled again), or
# taken from $BLUETICK_DEV_BIN. The cluster is stopped by its PID.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$BLUETICK_ROOT"

cargo_cmd="${CARGO:-cargo}"
work_dir="${BLUETICK_ROOT}/target/grpcurl-walkthrough"
pidfile="${work_dir}/cluster.pid"
endpoints_file="${work_dir}/endpoints.json"
cluster_log="${work_dir}/cluster.log"
start_timeout_s="${BLUETICK_CLUSTER_START_TIMEOUT_S:-90}"

bash scripts/tools.sh grpcurl
grpcurl_bin="${BLUETICK_ROOT}/.cache/bin/grpcurl"

# 1. The cluster binary.
dev_bin="${BLUETICK_DEV_BIN:-}"
if [[ -z "$dev_bin" ]]; then
    log "building the workspace (for bluetick-dev)"
    "$cargo_cmd" build --workspace --all-targets --quiet
    dev_bin="${CARGO_TARGET_DIR:-${BLUETICK_ROOT}/target}/debug/bluetick-dev"
fi
[[ -x "$dev_bin" ]] || die "no bluetick-dev binary at ${dev_bin}"

# 2. A fresh cluster on ephemeral ports; the endpoints file appears once every server listens.
stop_by_pidfile "$pidfile"
rm -rf "$work_dir"
mkdir -p "$work_dir"
trap 'stop_by_pidfile "$pidfile"' EXIT
"$dev_bin" --ephemeral-ports --endpoints-file "$endpoints_file" \
    --data-dir "${work_dir}/data" >"$cluster_log" 2>&1 &
echo "$!" >"$pidfile"
log "started bluetick-dev (pid $(cat "$pidfile")), waiting for ${endpoints_file}"
deadline=$((SECONDS + start_timeout_s))
until [[ -s "$endpoints_file" ]]; do
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        tail -n 40 "$cluster_log" >&2
        die "bluetick-dev exited before writing ${endpoints_file}"
    fi
    ((SECONDS < deadline)) || { tail -n 40 "$cluster_log" >&2; die "no endpoints after ${start_timeout_s}s"; }
    sleep 0.1
done

# endpoint NAME : "host:port" of a service in the endpoints file (written as "http://host:port").
endpoint() {
    local url
    url="$(sed -n "s|^ *\"$1\": *\"http://\([^\"]*\)\".*|\1|p" "$endpoints_file")"
    [[ "$url" == 127.0.0.1:* ]] || die "endpoint $1 is '${url}', not on loopback"
    printf '%s\n' "$url"
}
gateway="$(endpoint gateway)"
gateway_internal="$(endpoint gateway_internal)"
messaging="$(endpoint messaging)"
log "gateway ${gateway}, gateway internal ${gateway_internal}, messaging ${messaging}"

# Every grpcurl call below is the README's, with the README's 127.0.0.1:7700 (gateway) and
# 127.0.0.1:7701 (messaging) replaced by this cluster's ports.
grpcurl() {
    "$grpcurl_bin" -max-time 10 "$@"
}

# expect_eq WHAT EXPECTED ACTUAL
expect_eq() {
    if [[ "$2" != "$3" ]]; then
        die "$1: expected
$2
--- got ---
$3"
    fi
    log "ok: $1"
}

# expect_match WHAT REGEX ACTUAL
expect_match() {
    if ! grep -Eq -- "$2" <<<"$3"; then
        die "$1: expected a match for /$2/ in
$3"
    fi
    log "ok: $1"
}

# 3. The walkthrough.
expect_eq "list shows the gateway's public services" \
    "bluetick.gateway.v1.Accounts
bluetick.gateway.v1.Chat
bluetick.gateway.v1.Keys
bluetick.gateway.v1.Presence
grpc.health.v1.Health" \
    "$(grpcurl -plaintext "$gateway" list)"

described="$(grpcurl -plaintext "$gateway" describe bluetick.gateway.v1.Chat)"
expect_match "describe shows the Chat service" '^bluetick\.gateway\.v1\.Chat is a service:' "$described"
expect_match "describe shows the Open stream" \
    'rpc Open \( stream \.bluetick\.gateway\.v1\.ClientFrame \) returns \( stream \.bluetick\.gateway\.v1\.ServerFrame \)' \
    "$described"

registered_carol="$(grpcurl -plaintext -d '{"user_id":"carol","display_name":"Carol"}' \
    "$gateway" bluetick.gateway.v1.Accounts/Register)"
expect_match "Register carol returns device 1" '"deviceId": 1,' "$registered_carol"
expect_match "Register carol returns a token" '"token": "[0-9a-f]{64}"' "$registered_carol"

registered_dave="$(grpcurl -plaintext -d '{"user_id":"dave","display_name":"Dave"}' \
    "$gateway" bluetick.gateway.v1.Accounts/Register)"
expect_match "Register dave returns device 1" '"deviceId": 1,' "$registered_dave"
TOKEN="$(sed -n 's/.*"token": "\([0-9a-f]*\)".*/\1/p' <<<"$registered_dave")"
[[ -n "$TOKEN" ]] || die "no token in: ${registered_dave}"

duplicate_status=0
duplicate="$(grpcurl -plaintext -d '{"user_id":"carol","display_name":"Carol"}' \
    "$gateway" bluetick.gateway.v1.Accounts/Register 2>&1)" || duplicate_status=$?
((duplicate_status != 0)) || die "registering carol twice succeeded: ${duplicate}"
expect_match "registering carol again is refused" 'Code: AlreadyExists' "$duplicate"

anonymous_status=0
anonymous="$(grpcurl -plaintext -d '{"user_id":"carol"}' \
    "$gateway" bluetick.gateway.v1.Presence/GetLastSeen 2>&1)" || anonymous_status=$?
((anonymous_status != 0)) || die "GetLastSeen without a token succeeded: ${anonymous}"
expect_match "GetLastSeen without a token is Unauthenticated" 'Code: Unauthenticated' "$anonymous"

expect_eq "GetLastSeen with dave's bearer token shows carol's presence" \
    '{
  "presence": {
    "userId": "carol"
  }
}' \
    "$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"user_id":"carol"}' \
        "$gateway" bluetick.gateway.v1.Presence/GetLastSeen)"

# Health on internal ports, exactly as the README writes it. The servers list
# grpc.health.v1.Health, but until crates/common registers tonic-health's descriptor set
# with reflection, grpcurl cannot resolve it by reflection ("does not expose service"): then
# the check is repeated with health.proto from the tonic-health crate, and a warning says so.
health_proto_args=()
health_check() {
    local address="$1" output status=0
    output="$(grpcurl -plaintext "${health_proto_args[@]}" -d '{"service":""}' \
        "$address" grpc.health.v1.Health/Check 2>&1)" || status=$?
    if ((status != 0)) && ((${#health_proto_args[@]} == 0)) &&
        grep -q 'does not expose service "grpc.health.v1.Health"' <<<"$output"; then
        # The health.proto of the tonic-health version in Cargo.lock, from cargo's registry
        # sources (present once the workspace has been built).
        local version proto_dir=""
        version="$(sed -n '/^name = "tonic-health"$/{n;s/^version = "\(.*\)"$/\1/p;}' Cargo.lock | head -n 1)"
        if [[ -n "$version" ]]; then
            proto_dir="$(find "${CARGO_HOME:-${HOME}/.cargo}/registry/src" -maxdepth 3 -type d \
                -path "*/tonic-health-${version}/proto" 2>/dev/null | head -n 1 || true)"
        fi
        [[ -n "$proto_dir" && -f "${proto_dir}/health.proto" ]] ||
            die "grpc.health.v1.Health is not resolvable by reflection and tonic-health ${version:-?}'s health.proto was not found"
        log "WARNING: reflection cannot resolve grpc.health.v1.Health (the README's health command fails):" \
            "crates/common/src/server.rs must register tonic_health::pb::FILE_DESCRIPTOR_SET;" \
            "checking with ${proto_dir}/health.proto instead"
        health_proto_args=(-import-path "$proto_dir" -proto health.proto)
        status=0
        output="$(grpcurl -plaintext "${health_proto_args[@]}" -d '{"service":""}' \
            "$address" grpc.health.v1.Health/Check 2>&1)" || status=$?
    fi
    ((status == 0)) || die "health check on ${address} failed: ${output}"
    printf '%s\n' "$output"
}
# Runs in this shell (not in $(...)) so that a fallback found once is kept.
for internal in "messaging:${messaging}" "gateway-internal:${gateway_internal}"; do
    health_check "${internal#*:}" >"${work_dir}/health.out"
    expect_eq "${internal%%:*} (an internal port) is SERVING" \
        '{
  "status": "SERVING"
}' \
        "$(cat "${work_dir}/health.out")"
done

# 4. Stop by PID (graceful: SIGTERM, the servers report NOT_SERVING and drain).
stop_by_pidfile "$pidfile" 15
trap - EXIT
log "grpcurl walkthrough passed"
