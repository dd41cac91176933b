#!/usr/bin/env bash
# Benchmarks (`make bench`, `make bench-idle-100k`): builds release binaries, starts
# bluetick-dev on ephemeral loopback ports with a fresh data directory, runs bluetick-bench
# scenarios against it and prints a table of figures against the targets of BENCHMARKS.md.
#
#   scripts/bench.sh            online, paced, offline, idle (10,000 devices), media
#   scripts/bench.sh media      the media scenario alone
#   scripts/bench.sh idle-100k  19,000 devices on one gateway, then 100,000 devices across
#                               several gateway processes and generator processes
#
# Environment: STORE and MEDIA point the services at engines (as for `make run`);
# BENCH_RUNS repeats each default scenario (the table shows medians, and totals of losses);
# BENCH_IDLE_DEVICES, BENCH_MEDIA_MIB and BENCH_100K_GATEWAYS change sizes. Everything lives under
# .cache/bench/ (git-ignored): each run's directory keeps results.jsonl, the server's log and
# every paced delivery's latency (paced-N.csv); processes are stopped by the PIDs recorded
# when started.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODE="${1:-default}"
CARGO="${CARGO:-cargo}"
TARGET_DIR="${CARGO_TARGET_DIR:-${BLUETICK_ROOT}/target}"
RUNS="${BENCH_RUNS:-1}"
IDLE_DEVICES="${BENCH_IDLE_DEVICES:-10000}"
MEDIA_MIB="${BENCH_MEDIA_MIB:-100}"
GATEWAYS_100K="${BENCH_100K_GATEWAYS:-6}"
STORE="${STORE:-}"
MEDIA="${MEDIA:-}"

RUN_DIR="${BLUETICK_ROOT}/.cache/bench/$(date +%Y%m%d-%H%M%S)-$$"
RESULTS="${RUN_DIR}/results.jsonl"
mkdir -p "$RUN_DIR"

cleanup() {
    local pidfile
    for pidfile in "$RUN_DIR"/*.pid; do
        [[ -e "$pidfile" ]] && stop_by_pidfile "$pidfile" 15
    done
    if [[ -z "${BENCH_KEEP_DATA:-}" ]]; then
        rm -rf "${RUN_DIR}/data" "${RUN_DIR}"/gw*-store "${RUN_DIR}/media-blobs" "${RUN_DIR}/bin"
    fi
}
trap cleanup EXIT

# Share of the machine's CPU time left idle over two seconds (from /proc/stat): the figures
# are bluetick's only if nothing else is running.
idle_percent() {
    local before after
    before=($(head -1 /proc/stat))
    sleep 2
    after=($(head -1 /proc/stat))
    python3 -c '
import sys
b, a = [list(map(int, x.split())) for x in sys.argv[1:3]]
delta = [y - x for x, y in zip(b, a)]
print(round(100 * (delta[3] + delta[4]) / max(1, sum(delta))))' "${before[*]:1}" "${after[*]:1}"
}

log "building release binaries"
"$CARGO" build --release -p bluetick-dev -p bluetick-bench -p bluetick-gateway -p bluetick-media
# A private copy: another build in a shared target directory may replace the binaries
# while the benchmarks run.
mkdir -p "${RUN_DIR}/bin"
for binary in bluetick-dev bluetick-bench bluetick-gateway bluetick-media; do
    cp "${TARGET_DIR}/release/${binary}" "${RUN_DIR}/bin/"
done
# Everything written so far goes to disk now (these copies are ~450 MB; an earlier run's
# deletions add more). Left dirty, it would be written back by the kernel 30 s later
# (vm.dirty_expire_centisecs), in the middle of the third paced run, and every journal
# fdatasync would wait behind it (BENCHMARKS.md, "the third paced run").
sync
BIN="${RUN_DIR}/bin"

# free_port : prints a TCP port free on 127.0.0.1 right now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# bench ARGS... : runs bluetick-bench with --json and appends its record to $RESULTS.
bench() {
    local line
    line="$("${BIN}/bluetick-bench" --json "$@")" || {
        log "bluetick-bench $* failed"
        [[ -n "$line" ]] && printf '%s\n' "$line" >>"$RESULTS"
        return 1
    }
    printf '%s\n' "$line" | tee -a "$RESULTS" >&2
}

IDLE_BEFORE="$(idle_percent)"
log "machine ${IDLE_BEFORE} % idle before the run"
log "starting bluetick-dev (data in ${RUN_DIR}/data, store ${STORE:-embedded}, media ${MEDIA:-local})"
BLUETICK_STORE="$STORE" BLUETICK_MEDIA="$MEDIA" RUST_LOG="${RUST_LOG:-warn}" \
    "${BIN}/bluetick-dev" --ephemeral-ports --endpoints-file "${RUN_DIR}/endpoints.json" \
    --data-dir "${RUN_DIR}/data" >"${RUN_DIR}/dev.log" 2>&1 &
DEV_PID=$!
echo "$DEV_PID" >"${RUN_DIR}/dev.pid"
deadline=$((SECONDS + 180))
until [[ -s "${RUN_DIR}/endpoints.json" ]]; do
    kill -0 "$DEV_PID" 2>/dev/null || die "bluetick-dev exited; see ${RUN_DIR}/dev.log"
    ((SECONDS < deadline)) || die "bluetick-dev not ready after 180 s"
    sleep 0.2
done
GATEWAY="$(jq -r .gateway "${RUN_DIR}/endpoints.json")"
GATEWAY_INTERNAL="$(jq -r .gateway_internal "${RUN_DIR}/endpoints.json")"
MESSAGING="$(jq -r .messaging "${RUN_DIR}/endpoints.json")"
ACK="$(jq -r .ack "${RUN_DIR}/endpoints.json")"
PRESENCE="$(jq -r .presence "${RUN_DIR}/endpoints.json")"
log "bluetick-dev pid ${DEV_PID}, gateway ${GATEWAY}"

# start_media : starts a standalone bluetick-media (so its memory is measured alone) and
# sets MEDIA_URL and MEDIA_PID.
start_media() {
    local port
    port="$(free_port)"
    RUST_LOG=warn "${BIN}/bluetick-media" --listen "127.0.0.1:${port}" \
        --blobs "${MEDIA:-${RUN_DIR}/media-blobs}" --gateway-url "$GATEWAY_INTERNAL" \
        --max-upload-bytes $((MEDIA_MIB * 1024 * 1024 + 1024 * 1024)) \
        >"${RUN_DIR}/media.log" 2>&1 &
    MEDIA_PID=$!
    echo "$MEDIA_PID" >"${RUN_DIR}/media.pid"
    wait_for_port 127.0.0.1 "$port" 30 || die "bluetick-media did not start; see ${RUN_DIR}/media.log"
    MEDIA_URL="http://127.0.0.1:${port}"
}

# print_table : every figure in $RESULTS against its target (medians; losses summed).
print_table() {
    python3 - "$RESULTS" <<'EOF'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
for record in records:
    if "lost" in record:
        record["lost_and_duplicated"] = record["lost"] + record.get("duplicated", 0)
# A figure is the median over the runs; a count of lost and duplicated messages is their
# total (combine=sum), since one run that lost a message fails the guarantee whatever the
# others did.
rows = []
def row(figure, scenario, key, target, ok, fmt="{:.0f}", where=lambda r: True, combine=statistics.median):
    values = [r[key] for r in records if r.get("scenario") == scenario and where(r) and r.get(key) is not None]
    if not values:
        return
    value = combine(values)
    over = f" ({'total' if combine is sum else 'median'} of {len(values)})" if len(values) > 1 else ""
    met = "yes" if ok(value) else "NO"
    rows.append((figure, fmt.format(value) + over, target, met))
row("online delivered msgs/s", "online", "messages_per_second", ">= 40,000", lambda v: v >= 40000)
row("online one-way p50 ms", "online", "one_way_p50_ms", "-", lambda v: True, "{:.2f}")
row("online one-way p99 ms", "online", "one_way_p99_ms", "-", lambda v: True, "{:.2f}")
row("online one-way max ms", "online", "one_way_max_ms", "-", lambda v: True, "{:.2f}")
row("online lost + duplicated", "online", "lost_and_duplicated", "0", lambda v: v == 0, combine=sum)
row("online generator CPU %", "online", "generator_cpu_percent", "(share)", lambda v: True)
row("online server CPU %", "online", "server_cpu_percent", "(of 200)", lambda v: True)
row("online server CPU us/msg", "online", "server_cpu_us_per_message", "(cost)", lambda v: True)
row("online generator CPU us/msg", "online", "generator_cpu_us_per_message", "(cost)", lambda v: True)
row("paced msgs/s", "paced", "messages_per_second", "2,000", lambda v: v >= 1900)
row("paced one-way p50 ms", "paced", "one_way_p50_ms", "-", lambda v: True, "{:.2f}")
row("paced one-way p99 ms", "paced", "one_way_p99_ms", "<= 2", lambda v: v <= 2, "{:.2f}")
row("paced one-way max ms", "paced", "one_way_max_ms", "-", lambda v: True, "{:.2f}")
row("paced send->double tick p99 ms", "paced", "double_tick_p99_ms", "<= 4", lambda v: v <= 4, "{:.2f}")
row("paced lost + duplicated", "paced", "lost_and_duplicated", "0", lambda v: v == 0, combine=sum)
row("paced server CPU us/msg", "paced", "server_cpu_us_per_message", "(cost)", lambda v: True)
row("offline store s", "offline", "store_seconds", "-", lambda v: True, "{:.2f}")
row("offline drain msgs/s", "offline", "messages_per_second", ">= 20,000", lambda v: v >= 20000)
row("offline lost + duplicated", "offline", "lost_and_duplicated", "0", lambda v: v == 0, combine=sum)
single = lambda r: r.get("server_pids")
row("idle devices connected", "idle", "connected", "all", lambda v: True, where=single)
row("idle server KiB per device", "idle", "server_rss_per_device_kib", "<= 16", lambda v: v <= 16, "{:.1f}", where=single)
row("idle server CPU % (one core)", "idle", "server_cpu_percent", "-", lambda v: True, "{:.1f}", where=single)
row("idle generator CPU %", "idle", "generator_cpu_percent", "(share)", lambda v: True, "{:.1f}", where=single)
row("media upload MiB/s", "media", "upload_mib_per_second", ">= 300", lambda v: v >= 300)
row("media download MiB/s", "media", "download_mib_per_second", ">= 300", lambda v: v >= 300)
row("media server peak RSS MiB", "media", "server_peak_rss_mib", "< 64", lambda v: v < 64, "{:.1f}")
row("media generator CPU %", "media", "generator_cpu_percent", "(share)", lambda v: True)
for record in records:
    if record.get("scenario") == "idle-100k":
        held = record["connected"] - record["dropped"]
        valid = record["dropped"] == 0
        rows.append(("100k: devices connected", str(record["connected"]), "100,000", "yes" if record["connected"] >= 100000 else "NO"))
        rows.append(("100k: devices still connected at the end", str(held), "100,000", "yes" if held >= 100000 else "NO"))
        rows.append(("100k: reconnects during the run", str(record.get("reconnects", 0)), "-", "-"))
        if not valid:
            rows.append(("100k: memory and CPU figures", "invalid: devices dropped", "-", "NO"))
            continue
        rows.append(("100k: gateway processes", str(record["gateways"]), "several", "-"))
        rows.append(("100k: server KiB per device", f'{record["rss_per_device_kib"]:.1f}', "<= 16", "yes" if record["rss_per_device_kib"] <= 16 else "NO"))
        rows.append(("100k: server CPU % of one core", f'{record["server_cpu_percent"]:.1f}', "< 100", "yes" if record["server_cpu_percent"] < 100 else "NO"))
        rows.append(("100k: generators CPU %", f'{record["generator_cpu_percent"]:.1f}', "(share)", "-"))
width = [max(len(r[i]) for r in rows + [("figure", "measured", "target", "met?")]) for i in range(4)]
line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |"
print(line(("figure", "measured", "target", "met?")))
print("|" + "|".join("-" * (w + 2) for w in width) + "|")
for r in rows:
    print(line(r))
EOF
}

run_default() {
    local run
    for ((run = 1; run <= RUNS; run++)); do
        log "run ${run}/${RUNS}: online"
        bench --gateway "$GATEWAY" --server-pid "$DEV_PID" online --users 200 --messages 50 || true
        log "run ${run}/${RUNS}: paced"
        # Every delivery's latency, with its wall-clock send time, kept beside results.jsonl
        # (a slow spell can be lined up with dev.log, e.g. under RUST_LOG=warn,fjall=debug).
        bench --gateway "$GATEWAY" --server-pid "$DEV_PID" --latency-log "${RUN_DIR}/paced-${run}.csv" \
            paced --users 200 --rate 2000 --seconds 10 || true
        log "run ${run}/${RUNS}: offline"
        bench --gateway "$GATEWAY" --server-pid "$DEV_PID" offline --users 200 --messages 20 || true
    done
    log "idle: ${IDLE_DEVICES} devices on one gateway"
    bench --gateway "$GATEWAY" --server-pid "$DEV_PID" idle --devices "$IDLE_DEVICES" \
        --source-ips 127.0.0.2,127.0.0.3 || true
    run_media
}

run_media() {
    start_media
    for ((run = 1; run <= RUNS; run++)); do
        log "run ${run}/${RUNS}: media ${MEDIA_MIB} MiB"
        bench --gateway "$GATEWAY" --media "$MEDIA_URL" --server-pid "$MEDIA_PID" media \
            --size-mib "$MEDIA_MIB" || true
    done
}

run_idle_100k() {
    log "idle: 19,000 devices on one gateway (open files hard limit $(ulimit -Hn))"
    bench --deadline-secs 900 --gateway "$GATEWAY" --server-pid "$DEV_PID" idle \
        --devices 19000 --source-ips 127.0.0.2,127.0.0.3 || true

    local total=100000 per i
    per=$(((total + GATEWAYS_100K - 1) / GATEWAYS_100K))
    local barrier="${RUN_DIR}/barrier"
    mkdir -p "$barrier"
    local gateway_pids=() gateway_urls=()
    for ((i = 0; i < GATEWAYS_100K; i++)); do
        local port
        port="$(free_port)"
        RUST_LOG=warn "${BIN}/bluetick-gateway" --listen "127.0.0.1:${port}" \
            --internal-listen 127.0.0.1:0 --store "${STORE:-${RUN_DIR}/gw${i}-store}" \
            --messaging-url "$MESSAGING" --ack-url "$ACK" --presence-url "$PRESENCE" \
            >"${RUN_DIR}/gw${i}.log" 2>&1 &
        gateway_pids+=("$!")
        echo "$!" >"${RUN_DIR}/gw${i}.pid"
        wait_for_port 127.0.0.1 "$port" 60 || die "gateway ${i} did not start; see ${RUN_DIR}/gw${i}.log"
        gateway_urls+=("http://127.0.0.1:${port}")
    done
    log "${GATEWAYS_100K} gateways up (pids ${gateway_pids[*]}); ${per} devices each"
    local generator_pids=()
    for ((i = 0; i < GATEWAYS_100K; i++)); do
        "${BIN}/bluetick-bench" --json --deadline-secs 1200 --gateway "${gateway_urls[$i]}" idle \
            --devices "$per" --source-ips "127.0.0.$((10 + 2 * i)),127.0.0.$((11 + 2 * i))" \
            --barrier-dir "$barrier" --barrier-name "$i" --hold-secs 900 \
            >"${RUN_DIR}/gen${i}.json" 2>"${RUN_DIR}/gen${i}.log" &
        generator_pids+=("$!")
        echo "$!" >"${RUN_DIR}/gen${i}.pid"
    done
    wait_barrier() {
        local stage="$1" timeout_s="$2"
        local deadline=$((SECONDS + timeout_s))
        while (($(find "$barrier" -name "${stage}.*" | wc -l) < GATEWAYS_100K)); do
            ((SECONDS < deadline)) || die "generators not ${stage} after ${timeout_s} s"
            local pid
            for pid in "${generator_pids[@]}"; do
                kill -0 "$pid" 2>/dev/null || die "generator ${pid} exited early; see ${RUN_DIR}/gen*.log"
            done
            sleep 1
        done
    }
    wait_barrier registered 600
    local all_pids
    all_pids="$(
        IFS=,
        echo "${DEV_PID},${gateway_pids[*]}"
    )"
    local before
    before="$("${BIN}/bluetick-bench" --json --server-pid "$all_pids" procstat --seconds 0)"
    log "all registered; connecting 100,000 devices"
    local connect_start=$SECONDS
    touch "${barrier}/go"
    wait_barrier connected 900
    log "all connected in $((SECONDS - connect_start)) s; settling 15 s, measuring 30 s"
    sleep 15
    local after
    after="$("${BIN}/bluetick-bench" --json --server-pid "$all_pids" procstat --seconds 30)"
    touch "${barrier}/stop"
    for i in "${!generator_pids[@]}"; do
        wait "${generator_pids[$i]}" || log "generator ${i} reported a failure"
        rm -f "${RUN_DIR}/gen${i}.pid"
    done
    jq -c --argjson before "$before" --argjson after "$after" --argjson gateways "$GATEWAYS_100K" -s '{
        scenario: "idle-100k",
        gateways: $gateways,
        devices: (map(.devices) | add),
        connected: (map(.connected) | add),
        failed: (map(.failed) | add),
        dropped: (map(.dropped) | add),
        reconnects: (map(.reconnects) | add),
        server_rss_before_kib: $before.total_rss_kib,
        server_rss_after_kib: $after.total_rss_kib,
        rss_per_device_kib: (($after.total_rss_kib - $before.total_rss_kib) / (map(.connected) | add)),
        server_cpu_percent: $after.cpu_percent,
        processes: $after.processes,
        generator_cpu_percent: (map(.generator_cpu_percent) | add)
    }' "${RUN_DIR}"/gen*.json | tee -a "$RESULTS" >&2
}

case "$MODE" in
default) run_default ;;
media) run_media ;;
idle-100k) run_idle_100k ;;
*) die "unknown mode ${MODE} (default, media or idle-100k)" ;;
esac

printf '\nbluetick benchmarks (%s, store %s, media %s, %s cores, load average %s, %s %% idle before the run)\n\n' \
    "$MODE" "${STORE:-embedded}" "${MEDIA:-local}" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$IDLE_BEFORE"
if ((IDLE_BEFORE < 90)); then
    printf 'WARNING: other work used %s %% of the CPU before the run; throughput and latency\nfigures below are partly the machine'"'"'s (memory figures are not). Rerun on a quiet machine.\n\n' \
        "$((100 - IDLE_BEFORE))"
fi
print_table
log "records in ${RESULTS}"
