# payment-service container image.
#   docker build -t payment-service .
#   docker run --rm -p 9090:9090 -e IDENTITY_KEYS=publickeyv1_... payment-service
# It binds 0.0.0.0, so it refuses to start without the Restate server's public
# key (scripts/identity-public-key.sh), or ALLOW_UNSIGNED=true on a network
# only Restate can reach.
# Then register http://<host>:9090 with a Restate server (docker-compose.yml
# does all of this for you). With DEPLOYMENT_VERSION=<v> (one per build) it
# serves only under /<v>/: register http://<host>:9090/<v>, a new deployment.

# Same toolchain as development and CI (Cargo.toml's rust-version is the floor).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build

# 1. Dependencies only, against placeholder sources: this layer is rebuilt
#    only when the manifests or Cargo.lock change, not on every source edit.
#    The workspace's other member, testkit (the test harness), must be there for
#    the manifest to load; an empty library stands in for it (the image never
#    builds it).
COPY Cargo.toml Cargo.lock ./
COPY testkit/Cargo.toml testkit/
RUN mkdir -p src testkit/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs testkit/src/lib.rs \
    && cargo build --release --locked --bin payment-service \
    && rm -rf src

# 2. The real sources. COPY keeps the files' mtimes, which may be older than
#    the placeholder build above, so touch them to make cargo rebuild the crate.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin payment-service

FROM debian:bookworm-slim AS runtime
# A fixed, unprivileged uid; /var/lib/payment-service is a writable place for
# an optional GATEWAY_LEDGER file (mount a volume there to keep it).
RUN groupadd --system --gid 10001 payment \
    && useradd --system --uid 10001 --gid payment --no-create-home \
        --home-dir /var/lib/payment-service --shell /usr/sbin/nologin payment \
    && install -d -o payment -g payment /var/lib/payment-service
COPY --from=builder /build/target/release/payment-service /usr/local/bin/payment-service

USER payment:payment
WORKDIR /var/lib/payment-service
ENV BIND_ADDR=0.0.0.0:9090
EXPOSE 9090
# Exec form: the service is PID 1 and gets SIGTERM from `docker stop` directly
# (it shuts down gracefully on SIGTERM/SIGINT).
ENTRYPOINT ["/usr/local/bin/payment-service"]
