#!/usr/bin/env bash
# bluetick scaled out on one machine, with failures: a 3-node Cassandra cluster on
# 127.0.0.2-4 (replication factor 3, LOCAL_QUORUM), SeaweedFS, and every service as its own
# process on its own loopback address, then:
#   1. throughput with 1 replica of each service;
#   2. throughput with 2 replicas of each service (peers given as comma-separated lists,
#      balanced client-side by the services and by the SDK);
#   3. the kill test on the 2-replica cluster: traffic runs while one replica of each
#      service and one Cassandra node are SIGKILLed in turn (by PID); then checks that no
#      acknowledged message was lost, none was shown twice and each sender's order held.
# Everything started here is stopped by PID at the end.
#
# Usage: scripts/multinode.sh            (MULTINODE_SECONDS, MULTINODE_USERS to tune)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$BLUETICK_ROOT"
readonly TARGET="${CARGO_TARGET_DIR:-${BLUETICK_ROOT}/target}"
readonly BIN="${TARGET}/debug"
readonly RUN="${BLUETICK_ROOT}/.cache/multinode"
readonly CQL_NODES=(127.0.0.2 127.0.0.3 127.0.0.4)
readonly HEARTBEAT_MS=2000
readonly USERS="${MULTINODE_USERS:-8}"
readonly SECONDS_KILL="${MULTINODE_SECONDS:-44}"
readonly SECONDS_THROUGHPUT="${MULTINODE_THROUGHPUT_SECONDS:-15}"

# Cassandra: small heaps, a short ring delay and concurrent joins (a fresh, empty cluster).
export CASSANDRA_HEAP="${CASSANDRA_HEAP:-768m}"
export CASSANDRA_SEEDS="${CQL_NODES[0]}"
export CASSANDRA_CLUSTER_NAME="bluetick-multinode"
export CASSANDRA_JVM_EXTRA="-Dcassandra.ring_delay_ms=1000 -Dcassandra.consistent.rangemovement=false -Dcassandra.auto_bootstrap=false"
# SeaweedFS on ports of its own, so a single-node run elsewhere on the machine is left alone.
export SEAWEEDFS_S3_PORT=18333 SEAWEEDFS_MASTER_PORT=19333 SEAWEEDFS_VOLUME_PORT=19340
export SEAWEEDFS_FILER_PORT=18888
export AWS_ACCESS_KEY_ID="${SEAWEEDFS_ACCESS_KEY:-ci-key}"
export AWS_SECRET_ACCESS_KEY="${SEAWEEDFS_SECRET_KEY:-ci-secret}"
export AWS_REGION="us-east-1"

readonly STORE="scylla://127.0.0.2:9042,127.0.0.3:9042,127.0.0.4:9042/bluetick_multinode?replication_factor=3&consistency=local_quorum"
readonly MEDIA="s3://bluetick-multinode?endpoint=http://127.0.0.1:${SEAWEEDFS_S3_PORT}&region=us-east-1&path_style=true"

declare -A PIDS=()

stop_services() {
    local name
    for name in "${!PIDS[@]}"; do
        local pid="${PIDS[$name]}"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for name in "${!PIDS[@]}"; do
        local pid="${PIDS[$name]}" deadline=$((SECONDS + 10))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

cleanup() {
    local status=$?
    if ((status != 0)); then
        scripts/seaweedfs.sh log >&2 || true
    fi
    stop_services
    if [[ "${KEEP_ENGINES:-0}" != "1" ]]; then
        local node
        for node in "${CQL_NODES[@]}"; do
            CASSANDRA_LISTEN_ADDRESS="$node" scripts/cassandra.sh stop || true
        done
        scripts/seaweedfs.sh stop || true
    fi
    if ((status != 0)); then
        log "multinode failed; service logs in ${RUN}"
        grep -l "panicked" "${RUN}"/*.log 2>/dev/null | head -n 5 >&2 || true
        # A service that exited on an error: its last words, one line each, for the CI summary.
        local service_log
        for service_log in "${RUN}"/*.log; do
            [[ -f "$service_log" ]] || continue
            grep -a "^Error: " "$service_log" | tail -n 1 | sed "s|^|$(basename "$service_log" .log) exited: |" >&2 || true
        done
    fi
    exit "$status"
}

# start NAME HOST PORT COMMAND... : starts a service in the background and waits for its port.
start() {
    local name="$1" host="$2" port="$3"
    shift 3
    "$@" >"${RUN}/${name}.log" 2>&1 &
    PIDS[$name]=$!
    wait_for_port "$host" "$port" 60 || die "${name} did not start (see ${RUN}/${name}.log)"
}

# urls SCHEME_PREFIX PORT N : the comma-separated URLs of N replicas on 127.0.P.1..N.
urls() {
    local third="$1" port="$2" count="$3" list="" replica
    for ((replica = 1; replica <= count; replica++)); do
        list+="${list:+,}http://127.0.${third}.${replica}:${port}"
    done
    printf '%s' "$list"
}

# start_cluster N : N replicas of every service, each on its own loopback address:
# gateway 127.0.1.r, messaging 127.0.2.r, ack 127.0.3.r, presence 127.0.4.r, media 127.0.5.r.
start_cluster() {
    local count="$1" replica warm_up=0
    ((count > 1)) && warm_up=$((2 * HEARTBEAT_MS))
    local messaging ack presence gateway_internal
    messaging="$(urls 2 7701 "$count")"
    ack="$(urls 3 7702 "$count")"
    presence="$(urls 4 7703 "$count")"
    gateway_internal="$(urls 1 7710 "$count")"
    for ((replica = 1; replica <= count; replica++)); do
        start "presence-${replica}" "127.0.4.${replica}" 7703 "${BIN}/bluetick-presence" \
            --listen "127.0.4.${replica}:7703" --store "$STORE" \
            --heartbeat-ms "$HEARTBEAT_MS" --warm-up-ms "$warm_up"
    done
    for ((replica = 1; replica <= count; replica++)); do
        start "ack-${replica}" "127.0.3.${replica}" 7702 "${BIN}/bluetick-ack" \
            --listen "127.0.3.${replica}:7702" --store "$STORE" \
            --presence-url "$presence" --node-id "$replica"
        start "messaging-${replica}" "127.0.2.${replica}" 7701 "${BIN}/bluetick-messaging" \
            --listen "127.0.2.${replica}:7701" --store "$STORE" \
            --ack-url "$ack" --presence-url "$presence" --node-id "$replica"
    done
    for ((replica = 1; replica <= count; replica++)); do
        start "gateway-${replica}" "127.0.1.${replica}" 7700 "${BIN}/bluetick-gateway" \
            --listen "127.0.1.${replica}:7700" --internal-listen "127.0.1.${replica}:7710" \
            --store "$STORE" --messaging-url "$messaging" --ack-url "$ack" \
            --presence-url "$presence" --heartbeat-ms "$HEARTBEAT_MS"
        start "media-${replica}" "127.0.5.${replica}" 7704 "${BIN}/bluetick-media" \
            --listen "127.0.5.${replica}:7704" --blobs "$MEDIA" --gateway-url "$gateway_internal"
    done
    # Let the balancers' first health probes and the presence warm-up pass.
    sleep $((warm_up / 1000 + 2))
    local name
    for name in "${!PIDS[@]}"; do
        kill -0 "${PIDS[$name]}" 2>/dev/null ||
            die "${name} exited: $(tail -n 5 "${RUN}/${name}.log" | tr '\n' ' ' | cut -c1-600)"
    done
    log "multinode: ${count} replica(s) of each service running"
}

drive() {
    "${BIN}/bluetick-multinode" --users "$USERS" "$@"
}

phase_started=$SECONDS
log "multinode: building the service binaries and the traffic driver"
cargo build -q -p bluetick-gateway -p bluetick-messaging -p bluetick-ack -p bluetick-presence \
    -p bluetick-media -p bluetick-tests --bins
scripts/cassandra.sh install
scripts/seaweedfs.sh install
trap cleanup EXIT
rm -rf "$RUN"
mkdir -p "$RUN"

started=$SECONDS
scripts/seaweedfs.sh start
CASSANDRA_LISTEN_ADDRESS="${CQL_NODES[0]}" scripts/cassandra.sh start
CASSANDRA_LISTEN_ADDRESS="${CQL_NODES[1]}" scripts/cassandra.sh start &
join_a=$!
CASSANDRA_LISTEN_ADDRESS="${CQL_NODES[2]}" scripts/cassandra.sh start &
join_b=$!
wait "$join_a" || die "cassandra ${CQL_NODES[1]} did not start"
wait "$join_b" || die "cassandra ${CQL_NODES[2]} did not start"
log "multinode: 3 cassandra nodes and seaweedfs up in $((SECONDS - started))s"

# 1. One replica of each service.
start_cluster 1
one="$(drive --mode throughput --seconds "$SECONDS_THROUGHPUT" \
    --gateways "$(urls 1 7700 1)" --media "$(urls 5 7704 1)" | tee -a /dev/stderr | grep throughput)"
stop_services

# 2. Two replicas of each service.
start_cluster 2
two="$(drive --mode throughput --seconds "$SECONDS_THROUGHPUT" \
    --gateways "$(urls 1 7700 2)" --media "$(urls 5 7704 2)" | tee -a /dev/stderr | grep throughput)"

# 3. Kill one replica of each service and one Cassandra node while traffic runs.
cql_victim_pid="$(tr -dc '0-9' <"${BLUETICK_ROOT}/.cache/cassandra/run/cassandra-${CQL_NODES[2]}-9042.pid")"
drive --mode kill --seconds "$SECONDS_KILL" --kill-every 6 \
    --gateways "$(urls 1 7700 2)" --media "$(urls 5 7704 2)" \
    --kill "gateway-2=${PIDS[gateway-2]}" \
    --kill "messaging-2=${PIDS[messaging-2]}" \
    --kill "ack-2=${PIDS[ack-2]}" \
    --kill "presence-2=${PIDS[presence-2]}" \
    --kill "cassandra-${CQL_NODES[2]}=${cql_victim_pid}" \
    --kill "media-2=${PIDS[media-2]}"
if grep -l "panicked" "${RUN}"/*.log >/dev/null 2>&1; then
    die "a service panicked: $(grep -H -m1 panicked "${RUN}"/*.log | head -n 3 | cut -c1-300 | tr '\n' ' ')"
fi

log "multinode: 1 replica:  ${one#multinode: }"
log "multinode: 2 replicas: ${two#multinode: }"
log "multinode: phase passed in $((SECONDS - phase_started))s"
