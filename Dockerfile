# rowsmith: one image holding every binary (rowsmith, rowsmith-ingest, rowsmith-submitter,
# rowsmith-poller, rowsmith-merger, rowsmith-provider-sim); docker-compose.yml and deploy/
# choose the command per service.
#
#   docker build -t rowsmith .
#   docker run --rm rowsmith rowsmith --help
#
# Stages: duckdb (the official prebuilt libduckdb.so, checksum-verified), chef (toolchain +
# cargo-chef), planner (the dependency recipe), builder (dependencies in their own cached
# layer, then the workspace), runtime (debian slim, non-root).

# Must equal `channel` in rust-toolchain.toml (scripts/check_deploy.py checks it).
ARG RUST_VERSION=1.95.0

# --- libduckdb.so ----------------------------------------------------------------------------
# The duckdb crate is built without `bundled` (compiling DuckDB's C++ takes most of an hour);
# it links the official libduckdb.so 1.5.6 that DuckDB ships in its npm package, the same
# file scripts/bootstrap installs into .tools/duckdb. The sha512 values are the npm registry's
# `dist.integrity` of each tarball.
FROM debian:bookworm-slim AS duckdb
ARG TARGETARCH
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN set -eux; \
    version="1.5.6-r.1"; \
    case "${TARGETARCH:-amd64}" in \
      amd64) arch=x64; sha512=21772b64913a904a8cd19e30c1d5671811d7fdface4b7dd53cd0300d743f43e16cf386f4e7c41ef78721ac208870d2651bc6375072145387817824315b998dd5 ;; \
      arm64) arch=arm64; sha512=de39d46838a5d41ac5ffabc067055a227275c6805a5861c1e0f0e2527cc958a0a8f1af132f1f63eff80fc8f97f5064417edad822e4e28516527c5e2658c82d58 ;; \
      *) echo "no libduckdb.so for architecture ${TARGETARCH}" >&2; exit 1 ;; \
    esac; \
    curl -fsSL --retry 3 -o /tmp/duckdb.tgz \
      "https://registry.npmjs.org/@duckdb/node-bindings-linux-${arch}/-/node-bindings-linux-${arch}-${version}.tgz"; \
    echo "${sha512}  /tmp/duckdb.tgz" | sha512sum -c -; \
    mkdir -p /tmp/duckdb /opt/duckdb; \
    tar -xzf /tmp/duckdb.tgz -C /tmp/duckdb; \
    cp "$(find /tmp/duckdb -name libduckdb.so | head -n 1)" /opt/duckdb/libduckdb.so; \
    rm -rf /tmp/duckdb /tmp/duckdb.tgz

# --- toolchain + cargo-chef ------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS chef
ARG RUST_VERSION
# rust-toolchain.toml also asks for rustfmt and clippy, which a release build does not need:
# naming the toolchain here makes rustup use the image's own and download nothing.
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} \
    CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
RUN cargo install cargo-chef --locked --version 0.1.77
WORKDIR /src

# --- the dependency recipe (Cargo.toml files + Cargo.lock) ------------------------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# --- build -----------------------------------------------------------------------------------
FROM chef AS builder
COPY --from=duckdb /opt/duckdb/libduckdb.so /opt/duckdb/libduckdb.so
# .cargo/config.toml points these at .tools/duckdb (not in the build context, see
# .dockerignore); cargo's [env] never overrides a variable that is already set.
ENV DUCKDB_LIB_DIR=/opt/duckdb \
    LD_LIBRARY_PATH=/opt/duckdb
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: this layer is reused until Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --workspace --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --workspace --bins \
    && mkdir -p /out \
    && cp target/release/rowsmith \
          target/release/rowsmith-ingest \
          target/release/rowsmith-submitter \
          target/release/rowsmith-poller \
          target/release/rowsmith-merger \
          target/release/rowsmith-provider-sim \
          /out/

# --- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 rowsmith \
    && useradd --system --uid 10001 --gid rowsmith --home-dir /var/lib/rowsmith \
         --create-home --shell /usr/sbin/nologin rowsmith
COPY --from=duckdb /opt/duckdb/libduckdb.so /usr/local/lib/libduckdb.so
RUN ldconfig
COPY --from=builder /out/ /usr/local/bin/
LABEL org.opencontainers.image.title="rowsmith" \
      org.opencontainers.image.description="Run an LLM over every row of a table through provider Batch APIs" \
      org.opencontainers.image.licenses="Apache-2.0"
# The services keep scratch files (DuckDB spill, rendered shards) under TMPDIR; a
# local-directory store would live under the working directory.
ENV TMPDIR=/tmp
WORKDIR /var/lib/rowsmith
USER 10001:10001
# 9090: /metrics, /healthz, /readyz (ROWSMITH_OPS__LISTEN); 8089: rowsmith-provider-sim.
EXPOSE 9090 8089
CMD ["rowsmith", "--help"]
