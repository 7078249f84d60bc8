# waft: one image with the binary (which carries the example guests it deploys in `waft dev`)
# and the example guests as files in /opt/waft, to deploy elsewhere.
#   docker build -t waft --build-arg WAFT_COMMIT=$(git rev-parse --short=12 HEAD) .
#   docker run --rm -p 7001:7001 waft dev --listen-host 0.0.0.0    # a 3-node cluster in one container
#   waft submit --service kv 'put a 1'                               # from the host
# tests/all/docs.rs checks that every file copied here is one the build makes, and builds the
# image where Docker is installed (the project's CI machine has none).

FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip2
COPY . .
# .git stays out of the image: name the commit for `waft --version` with
# `docker build --build-arg WAFT_COMMIT=$(git rev-parse --short=12 HEAD) .`
ARG WAFT_COMMIT=unknown
ENV WAFT_COMMIT=${WAFT_COMMIT}
# host/build.rs builds the example guests into target/guests on the way.
RUN cargo build --release --locked -p waft

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /data waft && mkdir -p /data /opt/waft \
 && chown waft /data
COPY --from=build /src/target/release/waft /usr/local/bin/waft
COPY --from=build /src/target/guests/wasm32-wasip2/release/kv.wasm /opt/waft/kv.wasm
COPY --from=build /src/target/guests/wasm32-wasip2/release/counter.wasm /opt/waft/counter.wasm
COPY --from=build /src/target/guests/wasm32-wasip2/release/etcd_kv.wasm /opt/waft/etcd_kv.wasm
COPY deploy/k8s/start-node.sh /usr/local/bin/start-node.sh
USER waft
VOLUME /data
# 7001: gRPC (clients and peers); 9101: Prometheus metrics.
EXPOSE 7001 9101
ENTRYPOINT ["waft"]
CMD ["--help"]
