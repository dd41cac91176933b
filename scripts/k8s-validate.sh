#!/usr/bin/env bash
# Checks the deployment artifacts offline (no cluster, no network once the tools exist):
#
#   1. helm lint helm/bluetick, with the default values and with every helm/bluetick/ci/*.yaml
#   2. helm template (and NOTES.txt) with the default values and with every ci values file; every rendered
#      object is validated by kubernetes-validate against the Kubernetes $BLUETICK_KUBE_VERSION
#      (default 1.30.0) OpenAPI schemas, strictly (unknown fields are errors)
#   3. the same validation for k8s/*.yaml and k8s/examples/*.yaml; every file a
#      kustomization.yaml lists exists
#   4. k8s/ is exactly what the chart renders (scripts/helm.sh check-k8s)
#   5. values.schema.json refuses bad values (each case below must fail to render)
#   6. the invariants the design asks for, on every rendered workload: gRPC health probes,
#      requests and limits, non-root with a read-only root file system, a PDB per workload,
#      presence at one replica, a node id for every messaging and ack pod
#
# Tools come from scripts/tools.sh (helm in .cache/bin, kubernetes-validate in .cache/py-k8s).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$BLUETICK_ROOT"

kube_version="${BLUETICK_KUBE_VERSION:-1.30.0}"
export BLUETICK_KUBE_VERSION="$kube_version"
chart_dir="helm/bluetick"

bash scripts/tools.sh helm kubernetes-validate
helm_bin=".cache/bin/helm"
validate_bin=".cache/py-k8s/bin/kubernetes-validate"
python_bin=".cache/py-k8s/bin/python"

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

mapfile -t ci_values < <(find "${chart_dir}/ci" -name '*.yaml' | sort)

# validate_objects FILE... : kubernetes-validate, strict, errors only.
validate_objects() {
    "$validate_bin" -k "$kube_version" --strict --quiet "$@" ||
        die "kubernetes-validate found invalid objects in: $*"
}

# 1. Lint.
log "helm lint ${chart_dir} (default values and ${#ci_values[@]} ci values files)"
"$helm_bin" lint --strict --kube-version "$kube_version" "$chart_dir" >"${work_dir}/lint.log" ||
    { cat "${work_dir}/lint.log" >&2; die "helm lint failed with the default values"; }
for values in "${ci_values[@]}"; do
    "$helm_bin" lint --strict --kube-version "$kube_version" "$chart_dir" -f "$values" \
        >"${work_dir}/lint.log" ||
        { cat "${work_dir}/lint.log" >&2; die "helm lint failed with ${values}"; }
done

# 2. Render and validate.
render() {
    "$helm_bin" template bluetick "$chart_dir" --kube-version "$kube_version" "$@"
}
render >"${work_dir}/default.yaml"
rendered=("${work_dir}/default.yaml")
for values in "${ci_values[@]}"; do
    out="${work_dir}/$(basename "$values")"
    render -f "$values" >"$out"
    rendered+=("$out")
done
log "validating ${#rendered[@]} renderings against Kubernetes ${kube_version} (strict)"
validate_objects "${rendered[@]}"

# NOTES.txt renders with every values file (helm template skips NOTES.txt, and helm install
# --dry-run wants a cluster: render it as a string through tpl in a copy of the chart).
notes_chart="${work_dir}/notes-chart"
cp -r "$chart_dir" "$notes_chart"
mv "${notes_chart}/templates/NOTES.txt" "${notes_chart}/notes.txt"
printf '%s\n' 'notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}' >"${notes_chart}/templates/notes.yaml"
for values in "" "${ci_values[@]}"; do
    "$helm_bin" template bluetick "$notes_chart" --kube-version "$kube_version" \
        --show-only templates/notes.yaml ${values:+-f "$values"} >"${work_dir}/notes.yaml" ||
        die "NOTES.txt does not render${values:+ with ${values}}"
    grep -q 'port-forward\|loadBalancer' "${work_dir}/notes.yaml" ||
        die "NOTES.txt${values:+ with ${values}} does not say how to reach the gateway"
done

# 3. The plain manifests and the examples.
mapfile -t manifests < <(find k8s k8s/examples -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort)
log "validating ${#manifests[@]} files in k8s/ and k8s/examples/ (strict)"
validate_objects "${manifests[@]}"
"$python_bin" - k8s/kustomization.yaml k8s/examples/kustomization.yaml <<'PY'
import os
import sys

import yaml

for path in sys.argv[1:]:
    base = os.path.dirname(path)
    kustomization = yaml.safe_load(open(path))
    for resource in kustomization.get("resources", []):
        target = os.path.join(base, resource)
        if not (os.path.isfile(target) or os.path.isfile(os.path.join(target, "kustomization.yaml"))):
            sys.exit(f"{path}: resource {resource} does not exist")
PY

# 4. k8s/ is the chart's rendering.
bash scripts/helm.sh check-k8s

# 5. The schema refuses what it should.
refuse() {
    local why="$1"
    shift
    if render "$@" >/dev/null 2>"${work_dir}/refused.log"; then
        die "values.schema.json accepted ${why} ($*)"
    fi
    grep -q "schema" "${work_dir}/refused.log" ||
        { cat "${work_dir}/refused.log" >&2; die "rendering with ${why} failed, but not on the schema"; }
}
refuse "no presence replica" --set presence.replicas=0
refuse "presence autoscaling" --set presence.autoscaling.enabled=true
refuse "a heartbeat that is not a number" --set heartbeatMs=fast
refuse "an unknown top-level key" --set replicaCount=3
refuse "a store URL that is not scylla://" --set store.url=./data/gateway
refuse "a missing store URL" --set store.url=null
refuse "an unknown service type" --set gateway.service.type=Ingress
refuse "a resource without limits" --set gateway.resources.limits=null
refuse "a metrics port that is a gRPC port" --set observability.metrics.port=7700
refuse "an OTLP endpoint that is not a URL" --set observability.traces.otlpEndpoint=collector:4317
log "values.schema.json refuses 10 kinds of bad values"

# 6. Invariants.
"$python_bin" - "${rendered[@]}" <<'PY'
import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet"}
for path in sys.argv[1:]:
    objects = [o for o in yaml.safe_load_all(open(path)) if o]
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    pdb_selectors = [p["spec"]["selector"]["matchLabels"] for p in by_kind.get("PodDisruptionBudget", [])]
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", [])}
    errors = []
    for w in (o for o in objects if o["kind"] in WORKLOADS):
        name = w["metadata"]["name"]
        component = w["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        pod = w["spec"]["template"]["spec"]
        if not pod["securityContext"].get("runAsNonRoot"):
            errors.append(f"{name}: pod may run as root")
        if pod.get("automountServiceAccountToken") is not False or pod.get("enableServiceLinks") is not False:
            errors.append(f"{name}: service account token or service links enabled")
        for c in pod["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "grpc" not in c.get(probe, {}):
                    errors.append(f"{name}: {probe} is not a gRPC health probe")
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(c["resources"].get(kind, {})):
                    errors.append(f"{name}: no cpu and memory {kind}")
            sc = c["securityContext"]
            if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{name}: writable root file system or privilege escalation")
            if not c["command"][0].startswith("/usr/local/bin/bluetick-"):
                errors.append(f"{name}: command {c['command']} is not a bluetick binary")
            env = {e["name"]: e for e in c.get("env", [])}
            if component in ("messaging", "ack"):
                ref = env.get("BLUETICK_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {})
                if w["kind"] != "StatefulSet" or "pod-index" not in ref.get("fieldPath", ""):
                    errors.append(f"{name}: pods do not get unique node ids from a StatefulSet ordinal")
            if component == "gateway" and "$(POD_IP)" not in env.get("BLUETICK_GATEWAY_ADVERTISE_URL", {}).get("value", ""):
                errors.append(f"{name}: the gateway does not advertise its pod IP")
        if component == "presence" and name in hpa_targets:
            errors.append(f"{name}: presence is autoscaled (every replica does all the work)")
        if "replicas" in w["spec"] and name in hpa_targets:
            errors.append(f"{name}: both a replica count and an autoscaler")
        # Default values: a PDB per workload (ci values files switch some off on purpose).
        if path == sys.argv[1] and not any(
            all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
            for sel in pdb_selectors
        ):
            errors.append(f"{name}: no PodDisruptionBudget selects its pods")
    if errors:
        sys.exit(f"{path}:\n  " + "\n  ".join(errors))
PY
log "rendered workloads have gRPC probes, limits, non-root read-only pods, PDBs, presence not autoscaled"
log "k8s validation passed"
