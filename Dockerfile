# syntax=docker/dockerfile:1
# One image for every role: `pipeline producer|consumer|mock ...`.
# Build stage: dependencies are compiled in their own layer (cached until Cargo.lock changes).
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY pipeline-core/Cargo.toml pipeline-core/
COPY producer/Cargo.toml producer/
COPY consumer/Cargo.toml consumer/
COPY mocks/Cargo.toml mocks/
COPY kit/Cargo.toml kit/
# Stub sources so `cargo build` compiles (and caches) only the dependencies.
RUN for c in pipeline-core producer consumer mocks kit; do \
      mkdir -p $c/src && echo '' > $c/src/lib.rs && echo 'fn main() {}' > $c/src/main.rs; \
    done \
 && mkdir -p src && echo '' > src/lib.rs && echo 'fn main() {}' > src/main.rs \
 && cargo build --release --locked --bin pipeline \
 && rm -rf src */src
COPY . .
RUN touch src/*.rs */src/*.rs && cargo build --release --locked --bin pipeline

# Runtime stage: slim Debian, non-root, with curl for the health check.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home pipeline
COPY --from=build /src/target/release/pipeline /usr/local/bin/pipeline
USER 10001
ENV LOG_FORMAT=json RUST_LOG=info
EXPOSE 9000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${HEALTH_PORT:-9000}/health" || exit 1
ENTRYPOINT ["pipeline"]
CMD ["--help"]
