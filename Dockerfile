# waft: one image with the binary and the example kv guest.
#   docker build -t waft .
#   docker run --rm -p 7001:7001 waft dev --base-port 7001    # a 3-node dev cluster in one container
# (Not built on the project's CI machine, which has no Docker; kept deliberately plain.)

FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip2
COPY . .
RUN cargo build --release --locked -p waft \
 && cargo build --release --locked --target wasm32-wasip2 --manifest-path examples/guests/Cargo.toml

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /data waft && mkdir -p /data /opt/waft \
 && chown waft /data
COPY --from=build /src/target/release/waft /usr/local/bin/waft
COPY --from=build /src/examples/guests/target/wasm32-wasip2/release/kv.wasm /opt/waft/kv.wasm
COPY --from=build /src/examples/guests/target/wasm32-wasip2/release/counter.wasm /opt/waft/counter.wasm
COPY deploy/k8s/start-node.sh /usr/local/bin/start-node.sh
USER waft
VOLUME /data
# 7001: gRPC (clients and peers); 9101: Prometheus metrics.
EXPOSE 7001 9101
ENTRYPOINT ["waft"]
CMD ["--help"]
