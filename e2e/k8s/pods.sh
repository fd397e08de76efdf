#!/usr/bin/env bash
# Tier 2 of the cluster tests: the chart, the operator and the gateway pods on a node that runs
# pods (e2e/k8s/cluster.sh up --node: containerd, CNI bridge, kubelet, kube-proxy nftables), and
# a strongSwan site outside the cluster.
#
#   e2e/k8s/cluster.sh up --node && eval "$(e2e/k8s/cluster.sh env)" && e2e/k8s/pods.sh
#
# What it does, and fails on:
# - images built here (e2e/k8s/image.sh: our binaries and their libraries, no registry) and
#   imported into the node's containerd: the gateway, the operator, etcd for the fleet;
# - `helm install` of charts/concentrator with a fleet (fleet.create): the operator Deployment's
#   pods run (as the chart's ServiceAccount, in-cluster config through the kubernetes Service)
#   and become Ready; the fleet's StatefulSet of gateway pods becomes Ready: each pod has
#   NET_ADMIN and its TUN device, joined the fleet in etcd (a pod of the namespace, through its
#   Service) and answers its readiness probe;
# - the front Service, type LoadBalancer, gets its address the way a cloud's controller (or
#   MetalLB) gives it: written into its status; kube-proxy (nftables) serves it on the node;
# - a strongSwan site in a network namespace outside the cluster, linked to the node, connects
#   to that address on UDP 500 with default settings (IKE from port 500, its NAT-T float to
#   4500, which lands on another Service port and so maybe on another pod), and pings an
#   address on the gateway pods' side (10.0.0.1 on their lo, inside eroute hq-backup's
#   localSubnet) through the tunnel; exactly one pod holds the tunnel;
# - `kubectl concentrator` (the plugin, through the API server's port-forward to the pods'
#   mutual-TLS admin API, not --direct) lists the tunnel and the fleet's pods;
# - the operator sees the tunnel (status.tunnels, from the pods' load reports over mutual TLS);
# - scaling: `helm upgrade` to three pods, the third Ready, status follows; `kubectl
#   concentrator drain` of the two others hands the tunnel to the third (the site's packets
#   still reach the pod the node's conntrack picked, which forwards them to the owner); back to
#   two: the operator drains the leaving pod, which holds the tunnel, before the StatefulSet
#   shrinks (and says so in an Event); through both hand-overs the site keeps its IKE and child
#   SAs, its pings are answered, and the new owner's own IKE requests (liveness checks, every
#   10 s here) reach the site from the front address, through the pod the site's flow enters
#   by. A wrong return path is recorded and the site starts over, so that the rest still runs;
#   the run fails at the end;
# - teardown: the site deletes its SA, the fleet is deleted while the operator runs (its drain
#   finalizer lifted), `helm uninstall`, the namespace terminates.
#
# Needs: KUBECONFIG (admin) of e2e/k8s/cluster.sh with a node (K8S_NODE_NETNS and
# CONTAINERD_ADDRESS from `cluster.sh env`), kubectl, helm (HELM=path), ctr, the binaries
# (GATEWAY, OPERATOR, PLUGIN paths; default: ${CARGO_TARGET_DIR:-target}/debug/...), charon and
# swanctl (strongswan-charon, strongswan-swanctl, libcharon-extra-plugins), conntrack,
# busybox-static, root. E2E_KEEP=1 leaves everything in place after a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${KUBECONFIG:?e2e/k8s/pods.sh needs KUBECONFIG (eval \"\$(e2e/k8s/cluster.sh env)\")}"
: "${K8S_NODE_NETNS:?e2e/k8s/pods.sh needs the node of e2e/k8s/cluster.sh up --node (eval \"\$(e2e/k8s/cluster.sh env)\")}"
: "${CONTAINERD_ADDRESS:?e2e/k8s/pods.sh needs the containerd of the node (CONTAINERD_ADDRESS from e2e/k8s/cluster.sh env)}"
export CONTAINERD_NAMESPACE="${CONTAINERD_NAMESPACE:-k8s.io}"
HELM="${HELM:-helm}"
target="${CARGO_TARGET_DIR:-target}/debug"
GATEWAY="${GATEWAY:-$target/concentrator-gateway}"
OPERATOR="${OPERATOR:-$target/concentrator-operator}"
PLUGIN="${PLUGIN:-$target/kubectl-concentrator}"
for tool in kubectl "$HELM" ctr nsenter ip conntrack openssl curl /usr/lib/ipsec/charon swanctl /bin/busybox; do
    command -v "$tool" >/dev/null || { echo "e2e/k8s/pods: $tool is required" >&2; exit 1; }
done
for bin in "$GATEWAY" "$OPERATOR" "$PLUGIN"; do
    [ -x "$bin" ] || { echo "e2e/k8s/pods: $bin is missing (cargo build -p concentrator-gateway -p concentrator-operator -p kubectl-concentrator)" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "e2e/k8s/pods: needs root (network namespaces)" >&2; exit 1; }

run_id="$$"
ns="vpn-pods-$run_id" # the Helm release, its fleet, etcd: Pod Security `privileged`
release=concentrator
fleet=edge
tag=e2e
gateway_image="concentrator-gateway:$tag"
operator_image="concentrator-operator"
etcd_image="concentrator-e2e-etcd:$tag"
gw_selector="app.kubernetes.io/name=concentrator-gateway,app.kubernetes.io/instance=$fleet"
# The site: its own namespace, linked to the node like a WAN; the front's load-balancer address
# is routed to the node.
site_netns="ck8s-site-$run_id"
site_wan=192.168.232.2
node_wan=192.168.232.1
wan_prefix=24
lb_addr=192.168.233.10
lb_net=192.168.233.0/24
# The static eroute hq-backup (examples/static-peer.yaml) and its ends.
peer_id=backup.example.com
site_subnet=172.16.0.0/24
site_host=172.16.0.1
gw_subnet=10.0.0.0/16
gw_host=10.0.0.1
tun_dev=concentrator0 # the gateway's --tun-name default
work=$(mktemp -d)
charon_pid=
checks=0
failures=() # checks that failed without stopping the test

log() { echo "==> e2e/k8s/pods: $*"; }
fail() {
    echo "e2e/k8s/pods: FAIL: $*" >&2
    exit 1
}
ok() {
    checks=$((checks + 1))
    echo "ok $checks - $*"
}
k() { kubectl -n "$ns" "$@"; }
# Commands inside pods, bounded: a wedged exec must not hang the run.
kx() { timeout "${KX_TIMEOUT:-60}" kubectl -n "$ns" exec "$@"; }
in_site() { ip netns exec "$site_netns" "$@"; }
in_node() { nsenter --net="/run/netns/$K8S_NODE_NETNS" "$@"; }
# The node's conntrack entries of the site's flows. kube-proxy clears a UDP Service's stale
# entries only when its endpoints change, not when a new Service takes over the same
# load-balancer address: a flow of an earlier run (same addresses and ports, kept alive by the
# NAT-T keepalives of a site that ran until just before) would still lead to a pod that no
# longer exists.
forget_site_flows() { in_node conntrack -D -s "$site_wan" >/dev/null 2>&1 || true; }
swan() { STRONGSWAN_CONF="$work/site/strongswan.conf" timeout 60 swanctl "$@"; }
plugin() { PATH="$work/bin:$PATH" timeout 60 kubectl concentrator -n "$ns" "$@"; }

# Polls `command` until it succeeds or `timeout` seconds pass.
poll() { # timeout description command...
    local timeout=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for $what"
        if [ -n "$charon_pid" ] && ! kill -0 "$charon_pid" 2>/dev/null; then
            fail "the site's charon exited while waiting for $what"
        fi
        sleep 1
    done
}
# As poll, but returns 1 on timeout instead of failing.
poll_quietly() { # timeout command...
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 1
    done
}
is() { # want kubectl-args...
    local want=$1
    shift
    [ "$(kubectl "$@" 2>/dev/null)" = "$want" ]
}
gateway_pods() { k get pods -l "$gw_selector" -o jsonpath='{.items[*].metadata.name}'; }
# The gateway in pod $1 has loaded $2 base eroutes (the rendered config reaches the pods through
# a ConfigMap volume, which the kubelet refreshes on its sync period).
eroutes_loaded() { # pod n (grep -c: see gateway_request_seen)
    KX_TIMEOUT=15 kx "$1" -c gateway -- wget -qO- http://127.0.0.1:9090/metrics 2>/dev/null \
        | grep -cx "concentrator_gateway_eroutes $2" >/dev/null
}
cond() { # kind/name type field
    k get "$1" -o jsonpath="{.status.conditions[?(@.type==\"$2\")].$3}"
}

diagnostics() {
    echo "==> e2e/k8s/pods: diagnostics, namespace $ns"
    kubectl get nodes -o wide 2>&1 || true
    k get gatewayfleet,eroute,statefulset,deployment,pods,svc,endpointslices -o wide 2>&1 || true
    k get gatewayfleet "$fleet" -o jsonpath='{.status}' 2>&1 || true
    echo
    local pod
    for pod in $(k get pods -l app.kubernetes.io/component=operator -o name 2>/dev/null); do
        echo "--- $pod log"
        k logs "$pod" --tail=60 2>&1 || true
    done
    for pod in $(gateway_pods 2>/dev/null); do
        echo "--- gateway $pod"
        k describe pod "$pod" 2>&1 | sed -n '/^Events:/,$p' | tail -n 15 || true
        k logs "$pod" -c gateway --tail=60 2>&1 || true
        KX_TIMEOUT=15 kx "$pod" -c gateway -- /usr/local/bin/concentrator-gateway tunnels 2>&1 || true
        KX_TIMEOUT=15 kx "$pod" -c gateway -- ip -br addr 2>&1 || true
        KX_TIMEOUT=15 kx "$pod" -c gateway -- ip route 2>&1 || true
    done
    if [ -n "$charon_pid" ]; then
        echo "--- site"
        swan --list-sas 2>&1 || true
        in_site ip route show table 220 2>&1 || true
        tail -n 60 "$work/site/charon.log" 2>/dev/null || true
    fi
    echo "--- kube-proxy's services on the node"
    in_node nft list map ip kube-proxy service-ips 2>&1 | tail -n 20 || true
    echo "--- events"
    k get events --sort-by=.lastTimestamp 2>&1 | tail -n 40 || true
}

stop_site() {
    if [ -n "$charon_pid" ] && kill -0 "$charon_pid" 2>/dev/null; then
        swan --terminate --ike hq --timeout 10 >/dev/null 2>&1 || true
        kill -TERM "$charon_pid" 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while kill -0 "$charon_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        kill -KILL "$charon_pid" 2>/dev/null || true
        wait "$charon_pid" 2>/dev/null || true
    fi
    charon_pid=
    ip netns del "$site_netns" 2>/dev/null || true
    forget_site_flows
}

cleanup() {
    local status=$? f
    trap - EXIT
    if [ "${#failures[@]}" -gt 0 ]; then
        for f in "${failures[@]}"; do echo "e2e/k8s/pods: FAIL: $f" >&2; done
        status=1
    fi
    if [ "$status" -ne 0 ]; then
        diagnostics >&2 || true
        if [ "${E2E_KEEP:-}" = 1 ]; then
            echo "e2e/k8s/pods: E2E_KEEP=1: left namespace $ns, netns $site_netns (charon pid ${charon_pid:-none}) and $work" >&2
            exit "$status"
        fi
    fi
    stop_site
    if [ "$status" -ne 0 ] && kubectl get namespace "$ns" >/dev/null 2>&1; then
        # Best effort, so a failed run leaves no object that would trip the next one.
        k delete gatewayfleet --all --timeout=60s >/dev/null 2>&1 || true
        for f in $(k get gatewayfleets -o name 2>/dev/null); do
            k patch "$f" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
        done
        "$HELM" uninstall "$release" -n "$ns" >/dev/null 2>&1 || true
        kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
        kubectl delete crd eroutes.vpn.concentrator.io egroups.vpn.concentrator.io \
            gatewayfleets.vpn.concentrator.io --wait=false >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
    if [ "$status" -eq 0 ]; then
        echo "$checks passed, 0 failed"
    else
        echo "$checks passed, $(( ${#failures[@]} > 0 ? ${#failures[@]} : 1 )) failed"
    fi
    exit "$status"
}
trap cleanup EXIT

kubectl version >/dev/null || fail "no API server at KUBECONFIG=$KUBECONFIG"
node=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')
if [ -z "$node" ] || ! is True get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'; then
    fail "no Ready node (run: e2e/k8s/cluster.sh node up)"
fi
if kubectl get crd gatewayfleets.vpn.concentrator.io >/dev/null 2>&1; then
    fail "CRD gatewayfleets.vpn.concentrator.io exists already: this test installs the chart itself"
fi

# --- Images: our binaries (debug symbols stripped) and their libraries; the gateway's with
# busybox for `ip` (the Dockerfile's has iproute2 and a shell too).
log "building and importing the images"
e2e/k8s/image.sh -s -b -o "$work/gateway.tar" -n "docker.io/library/$gateway_image" "$GATEWAY"
e2e/k8s/image.sh -s -u 65532 -o "$work/operator.tar" -n "docker.io/library/$operator_image:$tag" "$OPERATOR"
e2e/k8s/image.sh -o "$work/etcd.tar" -n "docker.io/library/$etcd_image" "$(dirname "$(command -v kubectl)")/etcd"
for image in gateway operator etcd; do
    ctr images import "$work/$image.tar" >/dev/null
    rm -f "$work/$image.tar"
done
mkdir -p "$work/bin"
ln -s "$(realpath "$PLUGIN")" "$work/bin/kubectl-concentrator"
ok "images of the gateway, the operator and etcd imported into the node's containerd"

# --- The namespace, etcd, the Secrets.
kubectl create namespace "$ns" >/dev/null
kubectl label namespace "$ns" pod-security.kubernetes.io/enforce=privileged >/dev/null
k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Service
metadata: {name: etcd}
spec:
  selector: {app: etcd}
  ports: [{name: client, port: 2379, targetPort: 2379}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: etcd}
spec:
  replicas: 1
  selector: {matchLabels: {app: etcd}}
  template:
    metadata: {labels: {app: etcd}}
    spec:
      automountServiceAccountToken: false
      containers:
        - name: etcd
          image: $etcd_image
          command: [/usr/local/bin/etcd]
          args: [--name=e2e, --data-dir=/var/lib/etcd, --unsafe-no-fsync,
                 --listen-client-urls=http://0.0.0.0:2379, --advertise-client-urls=http://etcd:2379]
          readinessProbe: {tcpSocket: {port: 2379}, periodSeconds: 2}
          volumeMounts: [{name: data, mountPath: /var/lib/etcd}]
      volumes: [{name: data, emptyDir: {}}]
YAML
etcd_ip=$(k get svc etcd -o jsonpath='{.spec.clusterIP}')
k create secret generic hq-backup --from-file=psk=examples/secrets/hq-backup/psk >/dev/null
k create secret generic fleet --from-literal=key="$(head -c 32 /dev/urandom | base64)" >/dev/null
# The admin API's mutual TLS (docs/security.md, "By hand with openssl"): the pods' certificate
# (which the plugin also presents, read from the fleet's Secret) and the operator's.
(
    cd "$work"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj "/CN=e2e admin CA" -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=concentrator-gateway \
        -keyout gw.key -out gw.csr 2>/dev/null
    openssl x509 -req -in gw.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -out gw.crt \
        -extfile <(printf 'subjectAltName=DNS:concentrator-gateway\nextendedKeyUsage=serverAuth,clientAuth\n') 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=concentrator-operator \
        -keyout op.key -out op.csr 2>/dev/null
    openssl x509 -req -in op.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -out op.crt \
        -extfile <(printf 'extendedKeyUsage=clientAuth\n') 2>/dev/null
)
k create secret generic edge-admin-tls --from-file=tls.crt="$work/gw.crt" \
    --from-file=tls.key="$work/gw.key" --from-file=ca.crt="$work/ca.crt" >/dev/null
k create secret generic operator-admin-tls --from-file=tls.crt="$work/op.crt" \
    --from-file=tls.key="$work/op.key" --from-file=ca.crt="$work/ca.crt" >/dev/null
k rollout status deployment/etcd --timeout=120s >/dev/null || fail "etcd's pod did not become Ready"
ok "etcd runs in a pod ($etcd_ip:2379 through its Service)"

# --- The chart with a fleet.
log "helm install $release (with fleet $fleet) into $ns"
helm_args=(
    --set "operator.image.repository=$operator_image" --set "operator.image.tag=$tag"
    --set adminTls.operatorSecretName=operator-admin-tls
    --set fleet.create=true --set "fleet.name=$fleet" --set "fleet.image=$gateway_image"
    --set "fleet.etcd.endpoints={http://$etcd_ip:2379}" --set fleet.fleetKeySecretRef.name=fleet
    --set fleet.adminTlsSecretName=edge-admin-tls
    --set fleet.scaling.minReplicas=2 --set fleet.scaling.maxReplicas=3
    --set fleet.scaling.stabilizationWindow=10s --set fleet.scaling.drainTimeout=60s
    --set fleet.front.serviceType=LoadBalancer
)
"$HELM" install "$release" charts/concentrator -n "$ns" --wait --timeout 3m "${helm_args[@]}" >/dev/null \
    || fail "helm install --wait failed"
# examples/static-peer.yaml, with liveness checks every 10 s (default 30 s): the test waits for
# the gateway's own IKE requests after each hand-over.
sed 's/^spec:$/spec:\n  ike: {dpdInterval: 10s}/' examples/static-peer.yaml | k apply -f - >/dev/null
k wait --for=condition=Ready eroute/hq-backup --timeout=60s >/dev/null || fail "eroute/hq-backup not Ready"
op_sa=$(k get deploy "$release-operator" -o jsonpath='{.spec.template.spec.serviceAccountName}')
[ "$(k get deploy "$release-operator" -o jsonpath='{.status.readyReplicas}')" = "$(k get deploy "$release-operator" -o jsonpath='{.spec.replicas}')" ] \
    || fail "the operator Deployment is not Ready after helm install --wait"
poll 60 "an operator pod to hold the leader Lease" \
    sh -c "kubectl -n $ns get lease $release-operator -o jsonpath='{.spec.holderIdentity}' | grep -q '^$release-operator-'"
ok "helm install: the operator's pods Ready as ServiceAccount $op_sa; $(k get lease "$release-operator" -o jsonpath='{.spec.holderIdentity}') holds the Lease"

k wait --for=condition=Ready "gatewayfleet/$fleet" --timeout=120s >/dev/null || fail "gatewayfleet/$fleet not Ready"
k rollout status "statefulset/$fleet" --timeout=240s >/dev/null || fail "the gateway pods did not become Ready"
read -r -a gw_pods <<<"$(gateway_pods)"
[ "${#gw_pods[@]}" -eq 2 ] || fail "expected 2 gateway pods, found ${#gw_pods[@]}: ${gw_pods[*]}"
for pod in "${gw_pods[@]}"; do
    caps=$(k get pod "$pod" -o jsonpath='{.spec.containers[0].securityContext.capabilities.add}')
    [[ $caps == *NET_ADMIN* ]] || fail "pod/$pod has no NET_ADMIN ($caps)"
    # A TUN device has tun_flags in sysfs (busybox's ip has no -details).
    flags=$(kx "$pod" -c gateway -- cat "/sys/class/net/$tun_dev/tun_flags" 2>&1) \
        || fail "pod/$pod has no TUN device $tun_dev: $flags"
done
poll 60 "gwf/$fleet status.readyReplicas 2" is 2 -n "$ns" get gwf "$fleet" -o jsonpath='{.status.readyReplicas}'
ok "fleet $fleet Ready: pods ${gw_pods[*]} Ready, NET_ADMIN and a TUN device ($tun_dev) each"
for pod in "${gw_pods[@]}"; do
    poll 120 "pod/$pod to load eroute hq-backup (ConfigMap volume refreshed, config reloaded)" eroutes_loaded "$pod" 1
done
ok "the operator's rendered config reached every pod: eroute hq-backup loaded"

# --- The front: a LoadBalancer Service; its address written into its status as a cloud's
# load-balancer controller (or MetalLB) would; kube-proxy serves it on the node.
svc=$(k get svc "$fleet" -o jsonpath='{.spec.type} {.spec.sessionAffinity} {.spec.externalTrafficPolicy} {range .spec.ports[*]}{.protocol}/{.port} {end}')
[ "$svc" = "LoadBalancer ClientIP Local UDP/500 UDP/4500 " ] || fail "service/$fleet: '$svc'"
k patch svc "$fleet" --subresource=status --type=merge \
    -p "{\"status\":{\"loadBalancer\":{\"ingress\":[{\"ip\":\"$lb_addr\"}]}}}" >/dev/null
served() { # kube-proxy's map of service addresses holds the front's, for both ports
    local m
    m=$(in_node nft list map ip kube-proxy service-ips)
    grep -q "$lb_addr . udp . 500 " <<<"$m" && grep -q "$lb_addr . udp . 4500 " <<<"$m"
}
poll 60 "kube-proxy to serve $lb_addr UDP 500 and 4500" served
ok "front service/$fleet: LoadBalancer $lb_addr (ClientIP affinity, externalTrafficPolicy Local) in kube-proxy's nftables"

# --- A strongSwan site outside the cluster: its own network namespace, a veth to the node's
# namespace (a WAN), a route to the load-balancer addresses through the node.
log "site $site_wan in netns $site_netns, linked to the node"
forget_site_flows
ip netns add "$site_netns"
ip link add wan0 netns "$site_netns" type veth peer name site0 netns "$K8S_NODE_NETNS"
in_site ip addr add "$site_wan/$wan_prefix" dev wan0
in_site ip link set wan0 up
in_site ip link set lo up
in_site ip route add "$lb_net" via "$node_wan"
in_node ip addr add "$node_wan/$wan_prefix" dev site0
in_node ip link set site0 up
# charon sources the child's traffic from an address inside local_ts.
in_site ip addr add "$site_host/32" dev lo
# swanctl looks for credentials in these, beside the swanctl.conf it loads.
mkdir -p "$work/site"/{x509,x509ca,x509ocsp,x509aa,x509ac,x509crl,pubkey,private,rsa,ecdsa,bliss,pkcs8,pkcs12}
psk_hex=$(od -An -v -tx1 examples/secrets/hq-backup/psk | tr -d ' \n')
psk_hex=${psk_hex%0a}
# As e2e/src/strongswan.rs: no modular loading, kernel-libipsec (ESP in UDP through a TUN
# device: these kernels have no ESP), a VICI socket of its own. The connection has default
# ports and no `encap`: IKE starts on 500 and floats to 4500 by itself.
cat >"$work/site/strongswan.conf" <<CONF
charon {
  load_modular = no
  load = random nonce aes sha1 sha2 hmac gcm openssl pem pkcs1 x509 pubkey kdf kernel-libipsec kernel-netlink socket-default vici
  plugins {
    vici {
      socket = unix://$work/site/charon.vici
    }
  }
  filelog {
    site {
      path = $work/site/charon.log
      # Line by line: the checks read this log while charon runs (block-buffered, the
      # owner's liveness checks reached the file only a buffer later).
      flush_line = yes
      time_format = %H:%M:%S
      ike_name = yes
      default = 1
      ike = 2
      cfg = 2
      knl = 2
    }
  }
}
swanctl {
  load = random nonce pem pkcs1 pkcs8 x509 pubkey openssl
  socket = unix://$work/site/charon.vici
}
CONF
cat >"$work/site/swanctl.conf" <<CONF
connections {
  hq {
    version = 2
    remote_addrs = $lb_addr
    proposals = aes128gcm16-prfsha256-x25519
    local {
      auth = psk
      id = $peer_id
    }
    remote {
      auth = psk
      id = hq.example.com
    }
    children {
      hq {
        local_ts = $site_subnet
        remote_ts = $gw_subnet
        esp_proposals = aes128gcm16
        start_action = none
      }
    }
  }
}
secrets {
  ike-hq {
    id-local = $peer_id
    id-remote = hq.example.com
    secret = 0x$psk_hex
  }
}
CONF
chmod 600 "$work/site/swanctl.conf"
STRONGSWAN_CONF="$work/site/strongswan.conf" ip netns exec "$site_netns" \
    unshare -m sh -c 'mount -t tmpfs none /run && exec /usr/lib/ipsec/charon' >"$work/site/charon.out" 2>&1 &
charon_pid=$!
poll 30 "the site's charon to answer on VICI" swan --stats
swan --load-all --file "$work/site/swanctl.conf" >/dev/null

# Something to ping on the gateway side: hq-backup's localSubnet address on each pod's lo
# (whichever pod the Service picks holds the tunnel).
for pod in "${gw_pods[@]}"; do
    kx "$pod" -c gateway -- ip addr add "$gw_host/32" dev lo
done

log "site initiates to $lb_addr (service/$fleet), default ports"
swan --initiate --ike hq --child hq --timeout 30 >/dev/null || fail "swanctl --initiate of hq failed"
sa_up() { grep -q ESTABLISHED <<<"$1" && grep -q INSTALLED <<<"$1"; }
sas=$(swan --list-sas --ike hq 2>&1 || true)
sa_up "$sas" || fail "IKE SA hq not ESTABLISHED with child hq INSTALLED; swanctl --list-sas:
$sas"
echo "$sas"
# IKE started on 500 and moved to 4500 (libipsec encapsulates ESP in UDP).
if ! grep -Fq "@ ${lb_addr}[4500]" <<<"$sas" || ! grep -Fq "@ ${site_wan}[4500]" <<<"$sas"; then
    fail "the IKE SA did not float to port 4500 on $lb_addr"
fi
ok "the site's IKE and child SAs are up through $lb_addr (IKE on 500, then 4500)"

# Exactly one pod holds the tunnel.
holders=()
tunnel_rows() { # pod
    KX_TIMEOUT=20 kx "$1" -c gateway -- /usr/local/bin/concentrator-gateway tunnels --peer-id "$peer_id" 2>&1 || true
}
for _ in $(seq 15); do
    holders=()
    for pod in "${gw_pods[@]}"; do
        if grep -Eq "^${peer_id//./\\.} +hq-backup +- +[^ ]+ +${site_subnet//./\\.} " <<<"$(tunnel_rows "$pod")"; then
            holders+=("$pod")
        fi
    done
    [ "${#holders[@]}" -ge 1 ] && break
    sleep 2
done
[ "${#holders[@]}" -eq 1 ] \
    || fail "expected one gateway pod to list the tunnel of $peer_id, found ${#holders[@]}: ${holders[*]:-none}"
holder=${holders[0]}
route=$(kx "$holder" -c gateway -- ip route show "$site_subnet" 2>&1 || true)
[[ $route == *"dev $tun_dev"* ]] || fail "pod/$holder has no route $site_subnet dev $tun_dev (got '$route')"
ok "pod/$holder holds the tunnel of $peer_id and routes $site_subnet into $tun_dev"

ping_through() {
    in_site ping -c 3 -w 20 -I "$site_host" "$gw_host" >"$work/ping.out" 2>&1 \
        || fail "ping $gw_host from the site ($site_host) through the tunnel failed: $(cat "$work/ping.out")"
}
in_packets() { swan --list-sas --ike hq | sed -n 's/.*in  *[0-9a-f]*[^,]*, *\([0-9]*\) bytes, *\([0-9]*\) packets.*/\2/p' | head -n 1; }
before=$(in_packets)
ping_through
after=$(in_packets)
[ "${after:-0}" -ge $((${before:-0} + 3)) ] || fail "the site's child SA counted ${before:-?} -> ${after:-?} inbound packets over 3 pings"
ok "ping $site_host -> $gw_host through the tunnel ($(tail -n 2 "$work/ping.out" | head -n 1))"

# --- The kubectl plugin, through the API server's port-forward to the pods' admin API.
out=$(plugin tunnels 2>&1) || fail "kubectl concentrator tunnels failed: $out"
echo "$out"
grep -Eq "$holder .*${peer_id//./\\.}|${peer_id//./\\.} .*$holder" <<<"$out" \
    || fail "kubectl concentrator tunnels does not list $peer_id on $holder"
out=$(plugin status 2>&1) || fail "kubectl concentrator status failed: $out"
echo "$out"
for pod in "${gw_pods[@]}"; do
    grep -q "$pod" <<<"$out" || fail "kubectl concentrator status does not list $pod"
done
ok "kubectl concentrator tunnels and status through port-forward (mutual TLS with the fleet's certificate)"

# --- The operator sees the tunnel (the pods' load reports over mutual TLS).
poll 90 "gwf/$fleet status.tunnels 1" is 1 -n "$ns" get gwf "$fleet" -o jsonpath='{.status.tunnels}'
ok "the operator reports the tunnel: $(k get gwf "$fleet" --no-headers)"

# --- Scaling: out to three with helm upgrade, back to two (the leaving pod is drained first).
log "helm upgrade: minReplicas 3"
"$HELM" upgrade "$release" charts/concentrator -n "$ns" --reuse-values --set fleet.scaling.minReplicas=3 \
    --timeout 2m >/dev/null || fail "helm upgrade to minReplicas=3 failed"
poll 60 "statefulset/$fleet scaled to 3" is 3 -n "$ns" get sts "$fleet" -o jsonpath='{.spec.replicas}'
k rollout status "statefulset/$fleet" --timeout=180s >/dev/null || fail "the third gateway pod did not become Ready"
poll 60 "gwf/$fleet status: 3 replicas, 3 ready" is "3 3" -n "$ns" get gwf "$fleet" -o jsonpath='{.status.replicas} {.status.readyReplicas}'
ok "scaled out to 3: $(k get gwf "$fleet" --no-headers)"
kx "$fleet-2" -c gateway -- ip addr add "$gw_host/32" dev lo
poll 60 "pod/$fleet-2 to load eroute hq-backup" eroutes_loaded "$fleet-2" 1

# A hand-over: the plugin drains the two first pods, the holder last and waiting, so its
# tunnel can only go to $fleet-2; the site notices nothing (same IKE SA, same child SA), and its
# packets, which the node's conntrack still sends to the pod that first got them, are forwarded
# to the new owner.
# Every IKE message of the fleet must reach the site from the front address: a pod that sends
# from its own address (it owns the SA, but the node's conntrack pins the site's flow to another
# pod) makes the site move its IKE SA there (NAT traversal, RFC 7296 2.23), and the site cannot
# reach pod addresses. After a hand-over the new owner's first own request is its liveness check
# (dpdInterval 10 s without traffic): wait for it, then look at where it came from.
log_mark() { wc -l <"$work/site/charon.log"; }
since_mark() { tail -n +"$(($1 + 1))" "$work/site/charon.log"; }
# grep -c, not -q: -q quits at the first match, and with pipefail the writer's SIGPIPE (once
# the log after the mark outgrows the pipe) would read as "not seen".
gateway_request_seen() { since_mark "$1" | grep -c 'parsed INFORMATIONAL request' >/dev/null; }
return_path_ok() { # mark-before mark-after what: the log lines before the hand-over began and once it was done
    poll 60 "the new owner's first IKE request (liveness check) after $3" gateway_request_seen "$2"
    local moved
    moved=$(since_mark "$1" | grep -m1 'remote endpoint changed' || true)
    if [ -n "$moved" ]; then
        # Recorded, and the test goes on (the site moves back once a request comes through
        # the front again): the steps after it are worth running meanwhile.
        failures+=("after $3 the owner of the tunnel sent an IKE request from its own pod address, not through the pod the site's flow reaches (the front's conntrack), and the site moved its IKE SA: ${moved#* <hq|1> }")
        echo "not ok - ${failures[-1]}" >&2
        return 1
    fi
    grep -Fq "remote 'hq.example.com' @ ${lb_addr}[4500]" <<<"$(swan --list-sas --ike hq)" \
        || fail "after $3 the site's IKE SA is no longer on ${lb_addr}[4500]: $(swan --list-sas --ike hq | sed -n 3p)"
}
# After a failed return_path_ok the site's IKE SA points at a pod address it cannot reach, and
# nothing brings it back (the owner retransmits from the same address until its liveness check
# gives up): the site starts over through the front (INITIAL_CONTACT replaces the old SAs on the
# fleet), so that the steps after it still run.
restart_site_tunnel() {
    swan --terminate --ike hq --force --timeout 5 >/dev/null 2>&1 || true
    swan --initiate --ike hq --child hq --timeout 30 >/dev/null || fail "re-initiating hq through $lb_addr failed"
    sa_up "$(swan --list-sas --ike hq 2>&1 || true)" || fail "hq not up again through $lb_addr"
    # The old IKE SA stays on its pod until that pod's liveness checks give up: the site's
    # INITIAL_CONTACT reached another pod.
    poll 240 "the fleet to list one tunnel of $peer_id (the old SA gone)" one_tunnel
    path="the site started over through the front"
}
sa_ids() { # the IKE SA's SPIs and the child's inbound SPI, as the site sees them
    swan --list-sas --ike hq | awk '/ESTABLISHED/ {print $5, $6} / in  / {print $2}' | tr '\n' ' '
}
is_member() { [ "$(member_of_tunnel)" = "$1" ]; }
# The SAs the site holds now are those of before (unless it had to start over).
same_sas() { [[ $path == "the site started over through the front" ]] || [ "$(sa_ids)" = "$sa_before" ]; }
sas_note() {
    if [[ $path == "the site started over through the front" ]]; then echo "new SAs"; else echo "the site's SAs unchanged"; fi
}
one_tunnel() { [ "$(member_of_tunnel | wc -w)" -eq 1 ]; }
member_of_tunnel() { plugin tunnels 2>/dev/null | awk -v p="$peer_id" '$1 == p {print $NF}'; }
sa_before=$(sa_ids)
mark=$(log_mark)
for pod in "${gw_pods[@]}"; do
    [ "$pod" = "$holder" ] || plugin drain "$pod" >/dev/null || fail "kubectl concentrator drain $pod failed"
done
plugin drain "$holder" --wait --timeout 60s >/dev/null || fail "kubectl concentrator drain $holder --wait failed"
poll 30 "the tunnel to move to $fleet-2" is_member "$fleet-2"
handed=$(log_mark)
for pod in "${gw_pods[@]}"; do
    plugin undrain "$pod" >/dev/null || fail "kubectl concentrator undrain $pod failed"
done
# No traffic from the site before the new owner's first request: it has to know the way back
# from the hand-over, not from the site's next packet.
path="the owner's IKE requests through the front"
return_path_ok "$mark" "$handed" "the hand-over from $holder to $fleet-2" || restart_site_tunnel
ping_through
same_sas || fail "the site's SAs changed with the hand-over: '$sa_before' -> '$(sa_ids)'"
sa_before=$(sa_ids)
ok "kubectl concentrator drain (port-forward): the tunnel handed over from $holder to $fleet-2, $(sas_note), ping through the forwarding pod, $path"

was_on=$(member_of_tunnel)
log "helm upgrade: minReplicas 2 (the leaving pod is $fleet-2; the tunnel is on $was_on)"
mark=$(log_mark)
"$HELM" upgrade "$release" charts/concentrator -n "$ns" --reuse-values --set fleet.scaling.minReplicas=2 \
    --timeout 2m >/dev/null || fail "helm upgrade to minReplicas=2 failed"
# The operator drains the leaving pod (its tunnel goes to another), then shrinks the StatefulSet.
poll 180 "statefulset/$fleet scaled in to 2" is 2 -n "$ns" get sts "$fleet" -o jsonpath='{.spec.replicas}'
poll 120 "pod $fleet-2 to go" sh -c "! kubectl -n $ns get pod $fleet-2"
poll 60 "gwf/$fleet status: 2 replicas, 2 ready" is "2 2" -n "$ns" get gwf "$fleet" -o jsonpath='{.status.replicas} {.status.readyReplicas}'
[ "$(cond "gwf/$fleet" ScaleIn reason)" = Idle ] || fail "ScaleIn condition after the scale-in: $(cond "gwf/$fleet" ScaleIn reason): $(cond "gwf/$fleet" ScaleIn message)"
member=$(member_of_tunnel)
[[ $member == "$fleet-0" || $member == "$fleet-1" ]] || fail "after the scale-in the tunnel is on '${member:-no pod}'"
handed=$(log_mark)
# The operator's Event says what it did ("3 -> 2 pods ... drained"): `kubectl describe gwf`
# is where an administrator looks.
scaled_notes() {
    k get events.events.k8s.io --field-selector "regarding.name=$fleet,reason=Scaled" \
        -o jsonpath='{range .items[*]}{.note} (x{.series.count}){"\n"}{end}' 2>/dev/null
}
if ! poll_quietly 30 sh -c "kubectl -n $ns get events.events.k8s.io --field-selector regarding.name=$fleet,reason=Scaled -o jsonpath='{.items[*].note}' | grep -q '3 -> 2 pods'"; then
    failures+=("no Event of the operator's scale-in (a 'Scaled' note '3 -> 2 pods ...'); its Scaled Events: $(scaled_notes | tr '\n' ';') (kube's Recorder folds Events of one reason on one object into a series and keeps the first note)")
    echo "not ok - ${failures[-1]}" >&2
fi
path="its IKE requests through the front"
return_path_ok "$mark" "$handed" "the scale-in (the tunnel was on $was_on, now on $member)" || restart_site_tunnel
ping_through
same_sas || fail "the site's SAs changed with the scale-in: '$sa_before' -> '$(sa_ids)'"
ok "scaled in to 2: the operator drained $fleet-2 first (the tunnel was on $was_on, now on $member), $(sas_note), ping still answered, $path"

# --- Teardown: the site leaves, the fleet goes while the operator runs, then the chart.
stop_site
log "deleting the fleet while the operator runs"
k delete gwf "$fleet" --timeout=120s >/dev/null || fail "gwf/$fleet was not deleted within 120 s (drain finalizer)"
poll 120 "the fleet's pods and objects to go" \
    sh -c "[ -z \"\$(kubectl -n $ns get statefulsets,services,poddisruptionbudgets,configmaps,pods -l $gw_selector -o name)\" ]"
"$HELM" uninstall "$release" -n "$ns" --wait --timeout 2m >/dev/null || fail "helm uninstall failed"
kubectl delete crd eroutes.vpn.concentrator.io egroups.vpn.concentrator.io gatewayfleets.vpn.concentrator.io \
    --timeout=60s >/dev/null || fail "the CRDs were not deleted within 60 s"
kubectl delete namespace "$ns" --timeout=120s >/dev/null || fail "namespace $ns did not terminate within 120 s"
ok "teardown: fleet deleted (finalizer lifted by the operator's pod), helm uninstall, CRDs and namespace gone"
