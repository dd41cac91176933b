# syntax=docker/dockerfile:1.7
#
# One image for every bluetick service.
#
#   docker build -t bluetick:0.1.0 .
#
# The image holds the five service binaries and bluetick-dev in /usr/local/bin. There is no
# multiplexer binary and no shell: the Kubernetes manifests (k8s/, helm/bluetick) pick the
# service with `command:` per workload, e.g. ["/usr/local/bin/bluetick-gateway"], and pass
# flags with `args:`. Run without a command, the image starts bluetick-dev, the whole system
# in one process with embedded storage under /data:
#
#   docker run --rm -p 7700:7700 -p 7704:7704 bluetick:0.1.0
#
# `docker run IMAGE ARGS` replaces CMD only; another binary is chosen with --entrypoint:
#
#   docker run --rm --entrypoint /usr/local/bin/bluetick-gateway bluetick:0.1.0 --help

ARG RUST_VERSION=1.95

# ---- build -----------------------------------------------------------------------------
# Debian bookworm, like the runtime image below (glibc of the build <= glibc at runtime).
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# The cargo registry and target/ are BuildKit cache mounts, so a rebuild after a source
# change recompiles only the changed crates. The binaries are copied out of the cache mount
# in the same step. No protoc or system libraries are needed (protox compiles the protos;
# the jemalloc allocator is compiled from source with the image's cc and make).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p bluetick-gateway -p bluetick-messaging -p bluetick-ack \
        -p bluetick-presence -p bluetick-media -p bluetick-dev \
    && mkdir -p /out/bin /out/data \
    && for bin in bluetick-gateway bluetick-messaging bluetick-ack bluetick-presence \
                  bluetick-media bluetick-dev; do \
           cp "target/release/${bin}" /out/bin/; \
       done

# ---- runtime ---------------------------------------------------------------------------
# distroless/cc: glibc, libgcc, CA certificates, tzdata; no shell, no package manager.
# The :nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/bin/ /usr/local/bin/
# Data directory for bluetick-dev's embedded stores (services on Kubernetes use ScyllaDB
# and S3 and run with a read-only root file system).
COPY --from=builder --chown=65532:65532 /out/data /data
USER 65532:65532
# 7700 gateway (public), 7710 gateway (internal), 7701 messaging, 7702 ack, 7703 presence,
# 7704 media (gRPC and HTTP).
EXPOSE 7700 7701 7702 7703 7704 7710
ENTRYPOINT ["/usr/local/bin/bluetick-dev"]
CMD ["--host", "0.0.0.0", "--data-dir", "/data"]
