# The strongSwan site of e2e/k8s/run.sh: charon with the kernel-libipsec userspace data plane
# (ESP in UDP through a TUN device, so the node kernel needs no ESP/XFRM), swanctl, ping, and
# iproute2 and curl for the diagnostics run.sh takes from inside the gateway pods (whose
# distroless image has neither). Configured at start from /etc/site (see site.yaml).
#
#   docker build -f e2e/k8s/site.Dockerfile -t concentrator-e2e-site:dev e2e/k8s
FROM debian:12-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        strongswan-charon strongswan-swanctl libcharon-extra-plugins \
        libstrongswan-standard-plugins iproute2 iputils-ping curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && test -x /usr/lib/ipsec/charon \
 && test -f /usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so \
 && test -f /usr/lib/ipsec/plugins/libstrongswan-gcm.so \
 && test -f /usr/lib/ipsec/plugins/libstrongswan-openssl.so
COPY site-entrypoint.sh /usr/local/bin/site-entrypoint
RUN chmod 0755 /usr/local/bin/site-entrypoint
ENTRYPOINT ["/usr/local/bin/site-entrypoint"]
