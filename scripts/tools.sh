#!/usr/bin/env bash
# Installs the deployment tooling that `make test` needs into git-ignored folders of this
# clone, once:
#
#   .cache/bin/helm       helm v3.22.0   (go install; renders and lints helm/bluetick)
#   .cache/bin/grpcurl    grpcurl v1.9.3 (go install; scripts/grpcurl-walkthrough.sh)
#   .cache/py-k8s/        venv with PyPI kubernetes-validate 1.37.0 (offline schemas for
#                         Kubernetes 1.25-1.37; scripts/k8s-validate.sh)
#
#   scripts/tools.sh              all three
#   scripts/tools.sh helm grpcurl only the ones named (helm, grpcurl, kubernetes-validate)
#
# Idempotent: a tool is rebuilt only when it is missing or is not the pinned version (Go
# binaries are checked with `go version -m`, which reads the module version embedded at
# build time; the venv is checked by the hash of its pinned requirements). Only GOBIN is
# set: GOMODCACHE and GOCACHE keep Go's defaults, which do not depend on the clone, so a
# second clone or a CI rerun reuses the downloaded modules and compiled packages. A cold
# helm build compiles a large part of the Kubernetes client tree (several minutes on two
# cores); a warm one takes seconds.
#
# Prints nothing on stdout; progress goes to stderr.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$BLUETICK_ROOT"

readonly helm_module="helm.sh/helm/v3"
readonly helm_version="v3.22.0"
readonly grpcurl_module="github.com/fullstorydev/grpcurl"
readonly grpcurl_version="v1.9.3"
readonly kubernetes_validate_version="1.37.0"

bin_dir="${BLUETICK_ROOT}/.cache/bin"
k8s_venv="${BLUETICK_ROOT}/.cache/py-k8s"

# go_binary_has_module BINARY MODULE VERSION : true when BINARY exists and was built by
# `go install` from MODULE at VERSION.
go_binary_has_module() {
    local binary="$1" module="$2" version="$3"
    [[ -x "$binary" ]] || return 1
    go version -m "$binary" 2>/dev/null |
        awk -v m="$module" -v v="$version" '$1 == "mod" && $2 == m && $3 == v { found = 1 } END { exit !found }'
}

# install_go_tool NAME MODULE PACKAGE VERSION : go-installs PACKAGE@VERSION into .cache/bin
# unless .cache/bin/NAME already is that version.
install_go_tool() {
    local name="$1" module="$2" package="$3" version="$4"
    local binary="${bin_dir}/${name}"
    if go_binary_has_module "$binary" "$module" "$version"; then
        log "${name} ${version} already installed (${binary})"
        return 0
    fi
    command -v go >/dev/null 2>&1 ||
        die "go is not installed: ${name} is built with 'go install ${package}@${version}'"
    mkdir -p "$bin_dir"
    log "building ${name} ${version} with $(go version | cut -d' ' -f3) (go install ${package}@${version})"
    local start=$SECONDS
    # CGO off: static binaries, no C toolchain needed. GOFLAGS emptied: a -mod=vendor from
    # the environment would make `go install pkg@version` fail.
    GOBIN="$bin_dir" CGO_ENABLED=0 GOFLAGS='' go install "${package}@${version}"
    go_binary_has_module "$binary" "$module" "$version" ||
        die "${binary} is not ${module} ${version} after go install"
    log "built ${name} ${version} in $((SECONDS - start))s"
}

install_helm() {
    install_go_tool helm "$helm_module" "${helm_module}/cmd/helm" "$helm_version"
}

install_grpcurl() {
    install_go_tool grpcurl "$grpcurl_module" "${grpcurl_module}/cmd/grpcurl" "$grpcurl_version"
}

install_kubernetes_validate() {
    # ensure_venv wants a requirements file; it lives beside the venv (both git-ignored), so
    # the pin stays in this script.
    local requirements="${BLUETICK_ROOT}/.cache/py-k8s.requirements.txt"
    mkdir -p "$(dirname "$requirements")"
    local wanted="kubernetes-validate==${kubernetes_validate_version}"
    if [[ ! -f "$requirements" || "$(cat "$requirements")" != "$wanted" ]]; then
        printf '%s\n' "$wanted" >"$requirements"
    fi
    local start=$SECONDS
    ensure_venv "$k8s_venv" "$requirements"
    [[ -x "${k8s_venv}/bin/kubernetes-validate" ]] ||
        die "${k8s_venv}/bin/kubernetes-validate is missing after installing ${wanted}"
    log "kubernetes-validate ${kubernetes_validate_version} ready in ${k8s_venv} ($((SECONDS - start))s)"
}

tools=("$@")
((${#tools[@]} > 0)) || tools=(helm grpcurl kubernetes-validate)
for tool in "${tools[@]}"; do
    case "$tool" in
    helm) install_helm ;;
    grpcurl) install_grpcurl ;;
    kubernetes-validate) install_kubernetes_validate ;;
    *) die "unknown tool '${tool}' (known: helm, grpcurl, kubernetes-validate)" ;;
    esac
done
