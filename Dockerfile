# Images for both binaries (one multi-target build):
#   docker build --target gateway  -t concentrator-gateway:dev .
#   docker build --target operator -t concentrator-operator:dev .
# No Docker engine runs on the project's build machines; e2e/k8s/run.sh builds these when
# KUBECONFIG points at a real cluster.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p concentrator-gateway -p concentrator-operator \
 && mkdir -p /out && cp target/release/concentrator-gateway target/release/concentrator-operator /out/

# The gateway binds UDP 500 and drives a TUN device: it runs as root inside the pod with only
# NET_ADMIN and NET_BIND_SERVICE (the operator's StatefulSet drops every other capability).
# It installs the route to each site's subnet over netlink itself; iproute2 (hence a Debian
# base rather than distroless) is still needed by `concentrator-gateway esp-static`, which
# routes its one tunnel with `ip route`.
FROM debian:12-slim AS gateway
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/concentrator-gateway /usr/local/bin/concentrator-gateway
ENTRYPOINT ["/usr/local/bin/concentrator-gateway"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/concentrator-operator /usr/local/bin/concentrator-operator
ENTRYPOINT ["/usr/local/bin/concentrator-operator"]
