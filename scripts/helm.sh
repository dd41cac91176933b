#!/usr/bin/env bash
# The pinned helm (v3.22.0 in .cache/bin, built by scripts/tools.sh on first use), and the
# plain manifests in k8s/, which are rendered from the chart so the two never drift apart.
#
#   scripts/helm.sh render-k8s        rewrites k8s/*.yaml (not k8s/README.md, k8s/examples/)
#                                     from helm/bluetick with its default values, without
#                                     helm's bookkeeping labels
#   scripts/helm.sh check-k8s         exits 1 when k8s/ differs from what the chart renders
#   scripts/helm.sh template [ARGS]   helm template of helm/bluetick (release "bluetick")
#   scripts/helm.sh HELM_ARGS...      any other helm command, e.g. scripts/helm.sh lint helm/bluetick
#
# Rendering targets Kubernetes $BLUETICK_KUBE_VERSION (default 1.30.0): helm built with
# `go install` does not know its client-go version and would otherwise assume 1.20.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$BLUETICK_ROOT"

helm_bin="${BLUETICK_ROOT}/.cache/bin/helm"
kube_version="${BLUETICK_KUBE_VERSION:-1.30.0}"
chart_dir="helm/bluetick"
k8s_dir="k8s"

if [[ ! -x "$helm_bin" ]] || ! go version -m "$helm_bin" 2>/dev/null | grep -q 'helm.sh/helm/v3[[:space:]]*v3.22.0'; then
    bash "${BLUETICK_ROOT}/scripts/tools.sh" helm
fi

# render_plain DIR : writes the plain manifests into DIR, one file per chart template
# (gateway.yaml, messaging.yaml, ...), plus a kustomization.yaml listing them.
render_plain() {
    local out_dir="$1"
    local rendered
    rendered="$(mktemp)"
    # shellcheck disable=SC2064
    trap "rm -f '$rendered'" RETURN
    "$helm_bin" template bluetick "$chart_dir" --kube-version "$kube_version" \
        --set helmLabels=false >"$rendered"
    python3 - "$rendered" "$out_dir" <<'PY'
import os
import re
import sys

rendered, out_dir = sys.argv[1], sys.argv[2]
header = (
    "# Generated from helm/bluetick (default values) by `scripts/helm.sh render-k8s`:\n"
    "# edit the chart, then run that command again. `make test` fails when this file\n"
    "# differs from what the chart renders. See k8s/README.md.\n"
)
files = {}
order = []
for document in re.split(r"^---\n", open(rendered).read(), flags=re.M):
    match = re.match(r"# Source: [^/]+/templates/(\S+)\n", document)
    if not match:
        if document.strip():
            sys.exit(f"rendered document without a '# Source:' line: {document[:200]!r}")
        continue
    name = match.group(1)
    body = document[match.end():].rstrip("\n") + "\n"
    if name not in files:
        files[name] = []
        order.append(name)
    files[name].append(body)
for name in order:
    with open(os.path.join(out_dir, name), "w") as f:
        f.write(header)
        for body in files[name]:
            f.write("---\n")
            f.write(body)
with open(os.path.join(out_dir, "kustomization.yaml"), "w") as f:
    f.write(header)
    f.write("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n")
    for name in sorted(order):
        f.write(f"  - {name}\n")
PY
}

# is_generated FILE : true when FILE was written by render_plain.
is_generated() {
    [[ -f "$1" ]] && grep -q '^# Generated from helm/bluetick' "$1"
}

case "${1:-}" in
render-k8s)
    mkdir -p "$k8s_dir"
    # Remove earlier generated files (a template may have been renamed), keep the rest.
    for file in "$k8s_dir"/*.yaml; do
        if is_generated "$file"; then rm -f "$file"; fi
    done
    render_plain "$k8s_dir"
    log "rendered helm/bluetick into ${k8s_dir}/ (edit the chart, not these files)"
    ;;
check-k8s)
    fresh="$(mktemp -d)"
    trap 'rm -rf "$fresh"' EXIT
    render_plain "$fresh"
    committed="$(mktemp -d)"
    trap 'rm -rf "$fresh" "$committed"' EXIT
    for file in "$k8s_dir"/*.yaml; do
        if is_generated "$file"; then cp "$file" "$committed/"; fi
    done
    if ! diff -ru "$committed" "$fresh" >&2; then
        die "k8s/ is out of date with helm/bluetick: run scripts/helm.sh render-k8s and commit"
    fi
    log "k8s/ matches helm/bluetick"
    ;;
template)
    shift
    exec "$helm_bin" template bluetick "$chart_dir" --kube-version "$kube_version" "$@"
    ;;
"")
    die "usage: $0 render-k8s | check-k8s | template [ARGS] | HELM_ARGS..."
    ;;
*)
    exec "$helm_bin" "$@"
    ;;
esac
