# bluetick developer entry points. CI runs `bash .ci/run`, which runs `make test`.
#
#   make build        compile every crate and target
#   make fmt          check formatting (no changes made)
#   make lint         clippy, warnings are errors
#   make test-fast    the in-process Rust suites only
#   make test         everything CI runs, phase by phase with wall times
#   make test-engines the suites on Cassandra and SeaweedFS (installed and started here)
#   make test-multinode  2 replicas of every service on 3 Cassandra nodes, SIGKILLs under traffic
#   make test-minio   the S3 suites on MinIO (built with go install; not part of make test)
#   make run          start the dev cluster on loopback (make run ARGS="--help")
#   make clean-data   delete the dev cluster's ./data
#   make bench        release build, benchmark scenarios against a fresh dev cluster, table
#   make bench-idle-100k  19,000 idle devices on one gateway, then 100,000 across gateways

CARGO ?= cargo
ARGS ?=
STORE ?=
MEDIA ?=
export CARGO

# The phases of `make test`, in order; each is a target below. Later suites (storage
# engines, S3, manifests) are appended here.
TEST_PHASES ?= fmt lint test-fast test-python grpcurl-walkthrough k8s-validate test-engines test-multinode

.PHONY: build fmt lint test-fast test-python grpcurl-walkthrough k8s-validate test-engines test-multinode test-minio tools test run clean-data bench bench-idle-100k

build:
	$(CARGO) build --workspace --all-targets

fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

test-fast:
	$(CARGO) test --workspace

# The cross-language client test: Python stubs generated from proto/ drive a real
# bluetick-dev cluster on ephemeral loopback ports.
test-python:
	bash scripts/python-client-test.sh

# The README's grpcurl walk-through, run with a real grpcurl against a real cluster.
grpcurl-walkthrough: tools
	bash scripts/grpcurl-walkthrough.sh

# helm lint, helm template (default and non-default values), and offline validation of
# every rendered object and of k8s/ against the Kubernetes schemas.
k8s-validate: tools
	bash scripts/k8s-validate.sh

# helm, grpcurl and kubernetes-validate into .cache/ (idempotent).
tools:
	bash scripts/tools.sh

# Cassandra (the CQL engine) and SeaweedFS (S3), installed and started by the project's
# scripts: the storage suites, media on S3, the end-to-end suite on the engines, an outage.
test-engines:
	bash scripts/test-engines.sh

# Scale-out on one machine: a 3-node Cassandra cluster, SeaweedFS, every service as its
# own process (1, then 2 replicas); throughput of each, then a replica of every service and
# a Cassandra node SIGKILLed under traffic: nothing acknowledged lost, shown twice or reordered.
test-multinode:
	bash scripts/multinode.sh

# The blob and media S3 suites on MinIO, the second S3 engine. Not in TEST_PHASES: a cold
# MinIO build (go install) takes ~16 minutes of CI's budget.
test-minio:
	bash scripts/test-minio.sh

test:
	MAKE="$(MAKE)" bash scripts/run-phases.sh $(TEST_PHASES)

# STORE and MEDIA point the services at engines, e.g.
#   make run STORE=scylla://127.0.0.1:9042/bluetick MEDIA='s3://bluetick-media?endpoint=http://127.0.0.1:8333'
run:
	BLUETICK_STORE="$(STORE)" BLUETICK_MEDIA="$(MEDIA)" $(CARGO) run -p bluetick-dev --bin bluetick-dev -- --data-dir ./data $(ARGS)

clean-data:
	rm -rf ./data

# Benchmarks (see BENCHMARKS.md): release binaries against a fresh bluetick-dev on
# ephemeral ports; STORE and MEDIA as for `make run`, BENCH_RUNS=3 for medians.
bench:
	STORE="$(STORE)" MEDIA="$(MEDIA)" bash scripts/bench.sh default

bench-idle-100k:
	STORE="$(STORE)" MEDIA="$(MEDIA)" bash scripts/bench.sh idle-100k
