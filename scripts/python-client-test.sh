#!/usr/bin/env bash
# The cross-language client test: a Python client generated from proto/ drives a real
# bluetick-dev cluster.
#
#   1. builds target/debug/bluetick-dev with cargo ($CARGO, default cargo), as part of the
#      whole workspace: the same feature set as `cargo test --workspace`, so after
#      `make test-fast` nothing but binaries is compiled again
#   2. creates .cache/py (a venv with the pinned tests/python/requirements.txt), once
#   3. generates Python stubs from proto/ into tests/python/gen/ (the import root)
#   4. runs pytest on tests/python; its fixture starts the cluster on ephemeral ports,
#      waits for the endpoints file and stops the cluster by PID afterwards
#
# Extra arguments go to pytest, e.g. scripts/python-client-test.sh -k unauthenticated
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$BLUETICK_ROOT"

cargo_cmd="${CARGO:-cargo}"
venv_dir=".cache/py"
gen_dir="tests/python/gen"
work_dir="target/python-client-test"
# Bounds the whole pytest run; a hung RPC must not hang CI.
pytest_timeout_s="${BLUETICK_PYTEST_TIMEOUT_S:-600}"

# 1. The dev cluster binary.
[[ -f crates/dev/Cargo.toml ]] || die "crates/dev is missing: the bluetick-dev crate is needed"
log "building the workspace (for target/debug/bluetick-dev)"
build_log="$(mktemp)"
trap 'rm -f "$build_log"' EXIT
if ! "$cargo_cmd" build --workspace --all-targets --message-format=json-render-diagnostics \
    >"$build_log"; then
    die "cargo could not build the workspace with the bluetick-dev binary; see the errors above"
fi

# 2. The Python environment (also gives us a JSON parser for cargo's output).
ensure_venv "$venv_dir" tests/python/requirements.txt
python_bin="${venv_dir}/bin/python"

dev_bin="$("$python_bin" -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg["target"]["name"] == "bluetick-dev" \
            and "bin" in msg["target"]["kind"] and not msg["profile"]["test"]:
        print(msg["executable"])
        break
' "$build_log")"
[[ -n "$dev_bin" && -x "$dev_bin" ]] ||
    die "cargo built no bluetick-dev executable (crates/dev must have src/main.rs or a [[bin]] bluetick-dev)"
log "dev cluster binary: ${dev_bin}"

# 3. Stubs. Regenerated every run (about a second) so they always match proto/.
rm -rf "$gen_dir"
mkdir -p "$gen_dir"
mapfile -t proto_files < <(find proto -name '*.proto' | sort)
((${#proto_files[@]} > 0)) || die "no .proto files under proto/"
"$python_bin" -m grpc_tools.protoc -I proto \
    --python_out "$gen_dir" --grpc_python_out "$gen_dir" "${proto_files[@]}"
# Generated modules import e.g. bluetick.common.v1.common_pb2: gen/ is the import root,
# and each folder below it is a regular package.
find "$gen_dir" -mindepth 1 -type d -exec touch {}/__init__.py \;
log "generated Python stubs for ${#proto_files[@]} proto files into ${gen_dir}"

# 4. The test. The fixture records the cluster's PID in cluster.pid; if pytest itself is
# killed (timeout) and cannot tear down, the trap stops the cluster by that PID.
rm -rf "$work_dir"
mkdir -p "$work_dir"
pidfile="${work_dir}/cluster.pid"
trap 'stop_by_pidfile "$pidfile"; rm -f "$build_log"' EXIT

status=0
BLUETICK_DEV_BIN="$dev_bin" \
    BLUETICK_TEST_WORK_DIR="$work_dir" \
    PYTHONDONTWRITEBYTECODE=1 \
    timeout --kill-after=15 "$pytest_timeout_s" \
    "$python_bin" -m pytest tests/python "$@" || status=$?

if ((status != 0)); then
    if [[ -f "${work_dir}/cluster.log" ]]; then
        log "last lines of the cluster log (${work_dir}/cluster.log):"
        tail -n 60 "${work_dir}/cluster.log" >&2 || true
    fi
    if ((status == 124)); then
        log "pytest timed out after ${pytest_timeout_s}s"
    fi
    die "python client test failed (exit ${status})"
fi
log "python client test passed"
