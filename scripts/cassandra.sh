#!/usr/bin/env bash
# Apache Cassandra 5.0.8 for bluetick's CQL tests, from Maven Central jars on Java 17 (no
# Docker, no tarball download). See scripts/cassandra/ for the pom, configuration and probe.
#
# Usage: scripts/cassandra.sh COMMAND...   (commands run in order, e.g. `install start`)
#   install      resolve cassandra-all and its runtime jars into .cache/cassandra/lib (once)
#   start        start one node in the background, wait until it answers CQL
#   stop         stop the node by the PID recorded at start
#   status       print whether the node runs and answers CQL (exit 1 if not)
#   cqlsh-check  run `SELECT release_version FROM system.local` against the node
#
# One node per (address, native port). Environment (defaults in brackets):
#   CASSANDRA_LISTEN_ADDRESS  listen/rpc address                      [127.0.0.1]
#   CASSANDRA_NATIVE_PORT     CQL port                                [9042]
#   CASSANDRA_STORAGE_PORT    inter-node port                         [7000]
#   CASSANDRA_SEEDS           comma-separated seed addresses          [the listen address]
#   CASSANDRA_NUM_TOKENS      vnodes per node                         [1]
#   CASSANDRA_CLUSTER_NAME    cluster name (same on every node)       [bluetick-ci]
#   CASSANDRA_STORAGE_DIR     data, commitlog, hints (wiped at start) [.cache/cassandra/data-ADDR-PORT]
#   CASSANDRA_KEEP_DATA       1: keep the storage dir at start (restart with the same data) [0]
#   CASSANDRA_HEAP            -Xms/-Xmx                               [1g]
#   CASSANDRA_START_TIMEOUT   seconds to wait for CQL                 [180]
#   CASSANDRA_JVM_EXTRA       extra JVM arguments, space-separated    []
#                             (scripts/multinode.sh: a short ring delay, concurrent joins)
#   JAVA_HOME                 Java 17 (else `java` on PATH)
# A 3-node loopback cluster: for n in 2 3 4; do CASSANDRA_LISTEN_ADDRESS=127.0.0.$n
#   CASSANDRA_SEEDS=127.0.0.2 scripts/cassandra.sh start; done   (start the seed first).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly CASSANDRA_VERSION="5.0.8"
readonly CONF_DIR="${BLUETICK_ROOT}/scripts/cassandra"
readonly CACHE_DIR="${BLUETICK_ROOT}/.cache/cassandra"
readonly LIB_DIR="${CACHE_DIR}/lib"
readonly RUN_DIR="${CACHE_DIR}/run"

LISTEN_ADDRESS="${CASSANDRA_LISTEN_ADDRESS:-127.0.0.1}"
NATIVE_PORT="${CASSANDRA_NATIVE_PORT:-9042}"
STORAGE_PORT="${CASSANDRA_STORAGE_PORT:-7000}"
SEEDS="${CASSANDRA_SEEDS:-${LISTEN_ADDRESS}}"
NUM_TOKENS="${CASSANDRA_NUM_TOKENS:-1}"
CLUSTER_NAME="${CASSANDRA_CLUSTER_NAME:-bluetick-ci}"
NODE_NAME="${LISTEN_ADDRESS}-${NATIVE_PORT}"
STORAGE_DIR="${CASSANDRA_STORAGE_DIR:-${CACHE_DIR}/data-${NODE_NAME}}"
HEAP="${CASSANDRA_HEAP:-1g}"
START_TIMEOUT="${CASSANDRA_START_TIMEOUT:-180}"
PIDFILE="${RUN_DIR}/cassandra-${NODE_NAME}.pid"
LOGFILE="${RUN_DIR}/cassandra-${NODE_NAME}.log"
NODE_CONF_DIR="${RUN_DIR}/conf-${NODE_NAME}"

case "$LISTEN_ADDRESS" in
    127.*) ;;
    *) die "CASSANDRA_LISTEN_ADDRESS must be a loopback address (127.x.y.z), got ${LISTEN_ADDRESS}" ;;
esac

java_bin() {
    if [[ -n "${JAVA_HOME:-}" ]]; then
        printf '%s\n' "${JAVA_HOME}/bin/java"
    else
        command -v java || die "java not found: install Java 17 (Cassandra 5.0 runs on 11 or 17 only)"
    fi
}

check_java() {
    local java version
    java="$(java_bin)"
    version="$("$java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)"
    case "$version" in
        11 | 17) ;;
        *) die "Cassandra ${CASSANDRA_VERSION} needs Java 11 or 17, ${java} is ${version:-unknown}" ;;
    esac
}

# The stamp records which pom filled lib/, so a changed pom triggers a fresh copy.
pom_stamp() {
    sha256sum "${CONF_DIR}/pom.xml" | cut -d' ' -f1
}

cmd_install() {
    local stamp="${LIB_DIR}/.installed"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$(pom_stamp)" ]]; then
        log "cassandra ${CASSANDRA_VERSION} already installed in ${LIB_DIR}"
        return 0
    fi
    command -v mvn >/dev/null 2>&1 || die "mvn not found: install Maven 3.8+"
    check_java
    log "resolving cassandra-all ${CASSANDRA_VERSION} from Maven Central into ${LIB_DIR}"
    local started=$SECONDS
    local staging="${LIB_DIR}.tmp"
    rm -rf "$staging"
    mkdir -p "$CACHE_DIR"
    mvn -B -q -Dstyle.color=never -f "${CONF_DIR}/pom.xml" \
        org.apache.maven.plugins:maven-dependency-plugin:3.11.0:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$staging"
    [[ -f "${staging}/cassandra-all-${CASSANDRA_VERSION}.jar" ]] ||
        die "maven finished but cassandra-all-${CASSANDRA_VERSION}.jar is missing"
    pom_stamp >"${staging}/.installed"
    rm -rf "$LIB_DIR"
    mv "$staging" "$LIB_DIR"
    log "installed $(find "$LIB_DIR" -name '*.jar' | wc -l) jars in $((SECONDS - started))s"
}

running_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}

cql_probe() {
    python3 "${CONF_DIR}/cql_probe.py" "$LISTEN_ADDRESS" "$NATIVE_PORT" "${1:-5}"
}

render_config() {
    mkdir -p "$NODE_CONF_DIR"
    sed -e "s|@CLUSTER_NAME@|${CLUSTER_NAME}|g" \
        -e "s|@NUM_TOKENS@|${NUM_TOKENS}|g" \
        -e "s|@LISTEN_ADDRESS@|${LISTEN_ADDRESS}|g" \
        -e "s|@STORAGE_PORT@|${STORAGE_PORT}|g" \
        -e "s|@NATIVE_PORT@|${NATIVE_PORT}|g" \
        -e "s|@SEEDS@|${SEEDS}|g" \
        "${CONF_DIR}/cassandra.yaml.in" >"${NODE_CONF_DIR}/cassandra.yaml"
}

cmd_start() {
    [[ -f "${LIB_DIR}/.installed" ]] || die "cassandra is not installed: run scripts/cassandra.sh install"
    check_java
    local pid
    if pid="$(running_pid)"; then
        log "cassandra ${NODE_NAME} already running (pid ${pid})"
        cql_probe >/dev/null
        return 0
    fi
    if (exec 3<>"/dev/tcp/${LISTEN_ADDRESS}/${NATIVE_PORT}") 2>/dev/null; then
        die "${LISTEN_ADDRESS}:${NATIVE_PORT} is in use by a process this script did not start"
    fi
    mkdir -p "$RUN_DIR"
    if [[ "${CASSANDRA_KEEP_DATA:-0}" != "1" ]]; then
        rm -rf "$STORAGE_DIR"
    fi
    mkdir -p "$STORAGE_DIR"
    render_config

    local -a jvm_opts=()
    local line
    while IFS= read -r line; do
        [[ "$line" == -* ]] && jvm_opts+=("$line")
    done <"${CONF_DIR}/jvm.options"
    # "--add-exports a=b" lines are two arguments.
    local -a jvm_args=()
    for line in "${jvm_opts[@]}"; do
        # shellcheck disable=SC2206
        jvm_args+=($line)
    done

    local -a jvm_extra=()
    read -r -a jvm_extra <<<"${CASSANDRA_JVM_EXTRA:-}"

    log "starting cassandra ${CASSANDRA_VERSION} on ${LISTEN_ADDRESS}:${NATIVE_PORT} (storage ${STORAGE_DIR}, log ${LOGFILE})"
    local started=$SECONDS
    nohup "$(java_bin)" \
        "-Xms${HEAP}" "-Xmx${HEAP}" \
        "${jvm_args[@]}" \
        "-javaagent:${LIB_DIR}/jamm-0.4.0.jar" \
        "-Dcassandra.config=file://${NODE_CONF_DIR}/cassandra.yaml" \
        -Dcassandra-foreground=yes \
        "-Dcassandra.storagedir=${STORAGE_DIR}" \
        "-Dcassandra.logdir=${STORAGE_DIR}/logs" \
        "-Dlogback.configurationFile=${CONF_DIR}/logback.xml" \
        -Dcassandra.skip_wait_for_gossip_to_settle=0 \
        -Dcassandra.superuser_setup_delay_ms=0 \
        "${jvm_extra[@]}" \
        -cp "${LIB_DIR}/*" \
        org.apache.cassandra.service.CassandraDaemon \
        >"$LOGFILE" 2>&1 </dev/null &
    pid=$!
    printf '%s\n' "$pid" >"$PIDFILE"

    local deadline=$((SECONDS + START_TIMEOUT)) version=""
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            log "cassandra exited during startup; last log lines:"
            tail -n 60 "$LOGFILE" >&2 || true
            die "cassandra ${NODE_NAME} failed to start"
        fi
        if version="$(cql_probe 2 2>/dev/null)"; then
            log "cassandra ${version} answers CQL on ${LISTEN_ADDRESS}:${NATIVE_PORT} (pid ${pid}) after $((SECONDS - started))s"
            return 0
        fi
        sleep 1
    done
    log "cassandra did not answer CQL within ${START_TIMEOUT}s; last log lines:"
    tail -n 60 "$LOGFILE" >&2 || true
    stop_by_pidfile "$PIDFILE" 30
    die "cassandra ${NODE_NAME} failed to start"
}

cmd_stop() {
    if ! running_pid >/dev/null; then
        rm -f "$PIDFILE"
        log "cassandra ${NODE_NAME} is not running"
        return 0
    fi
    stop_by_pidfile "$PIDFILE" 30
    log "cassandra ${NODE_NAME} stopped"
}

cmd_status() {
    local pid
    if ! pid="$(running_pid)"; then
        log "cassandra ${NODE_NAME}: not running"
        return 1
    fi
    local version
    if version="$(cql_probe 2>/dev/null)"; then
        log "cassandra ${NODE_NAME}: running (pid ${pid}), release ${version}"
    else
        log "cassandra ${NODE_NAME}: running (pid ${pid}) but not answering CQL yet"
        return 1
    fi
}

cmd_cqlsh_check() {
    local version
    version="$(cql_probe)" || die "no CQL answer from ${LISTEN_ADDRESS}:${NATIVE_PORT}"
    printf 'release_version %s\n' "$version"
}

main() {
    (($# > 0)) || die "usage: $0 {install|start|stop|status|cqlsh-check}..."
    local command
    for command in "$@"; do
        case "$command" in
            install) cmd_install ;;
            start) cmd_start ;;
            stop) cmd_stop ;;
            status) cmd_status ;;
            cqlsh-check) cmd_cqlsh_check ;;
            *) die "unknown command ${command}: expected install, start, stop, status or cqlsh-check" ;;
        esac
    done
}

main "$@"
