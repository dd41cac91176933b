#!/usr/bin/env bash
# Runs make targets one after another as the phases of `make test`, printing each phase's
# wall time as it ends and a summary at the end. Stops at the first failing phase.
#
#   scripts/run-phases.sh fmt lint test-fast test-python
#
# $MAKE (default: make) runs each phase. Each phase's output is also kept in
# .cache/phases/PHASE.log; when a phase fails, the lines that say why (errors, failed
# tests, the multinode verdict) are printed again just above the summary, so that the end
# of a long log names the cause.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(($# > 0)) || die "usage: $0 PHASE..."

make_cmd="${MAKE:-make}"
logs="${BLUETICK_ROOT}/.cache/phases"
mkdir -p "$logs"
summary=()
total_start=$SECONDS

free_disk() {
    df -Ph . | awk 'NR == 2 { print $4 " free" }'
}

print_summary() {
    local line
    printf '\n==== phase summary ====\n' >&2
    for line in "${summary[@]}"; do
        printf '%s\n' "$line" >&2
    done
    printf '%-24s %6ss\n' "total" "$((SECONDS - total_start))" >&2
}

for phase in "$@"; do
    printf '\n==== phase %s ====\n' "$phase" >&2
    phase_start=$SECONDS
    status=0
    "$make_cmd" --no-print-directory "$phase" 2>&1 | tee "${logs}/${phase}.log" >&2 ||
        status=${PIPESTATUS[0]}
    elapsed=$((SECONDS - phase_start))
    if ((status != 0)); then
        printf '\n==== why phase %s failed (from %s) ====\n' "$phase" "${logs}/${phase}.log" >&2
        grep -E 'ERROR|FAILED|panicked|^error|^failures:|^---- |lost=|multinode: .*(still had|lost, dup)|Error: ' \
            "${logs}/${phase}.log" | grep -v '^==== ' | tail -n 12 | cut -c1-400 >&2 || true
        summary+=("$(printf '%-24s %6ss  FAILED (exit %d), disk %s' "$phase" "$elapsed" "$status" "$(free_disk)")")
        printf '==== phase %s FAILED after %ss ====\n' "$phase" "$elapsed" >&2
        print_summary
        exit "$status"
    fi
    summary+=("$(printf '%-24s %6ss  ok, disk %s' "$phase" "$elapsed" "$(free_disk)")")
    printf '==== phase %s ok in %ss ====\n' "$phase" "$elapsed" >&2
done
print_summary
