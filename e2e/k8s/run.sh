#!/usr/bin/env bash
# End-to-end on a real cluster (kind, k3d, ...): build the gateway, operator and site images,
# helm install, apply a GatewayFleet and the example eroutes, wait for the fleet to be Ready,
# then connect a strongSwan site pod (e2e/k8s/site.yaml) through the fleet's front Service to
# the static eroute hq-backup, check that a gateway lists the tunnel and that ping crosses it,
# and uninstall. Skips (exit 0) when KUBECONFIG is not set. On a cluster without nodes (such as
# e2e/k8s/cluster.sh's control plane) it runs the tier-1 test e2e/k8s/control-plane.sh instead;
# on e2e/k8s/cluster.sh's cluster with its node (K8S_NODE_NETNS set by `cluster.sh env`), the
# tier-2 test e2e/k8s/pods.sh (images imported into the node's containerd, the site outside the
# cluster in a network namespace).
#
#   KUBECONFIG=~/.kube/config IMAGE_PREFIX=localhost:5000/ e2e/k8s/run.sh
#
# With kind, set KIND_CLUSTER=<name> to load the images instead of pushing them. Needs kubectl
# >= 1.27 (`kubectl debug --profile=netadmin`: the gateway image has no shell, so the script
# gets an address onto a gateway pod's lo through an ephemeral container) and pod/service
# CIDRs outside the tunnel's subnets 10.0.0.0/16 and 172.16.0.0/24 (kind's and k3d's are).
# On failure the cluster state, pod logs, SAs and gateway metrics are printed before cleanup.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -z "${KUBECONFIG:-}" ]; then
    echo "SKIP: e2e/k8s/run.sh needs KUBECONFIG pointing at a real cluster"
    exit 0
fi
# Tier 1: a cluster without nodes (e2e/k8s/cluster.sh) runs no pod: test the chart, the CRDs
# and the operator against its API server instead (TIER=control-plane forces it; TIER=nodes
# forces this script's pod story).
if [ "${TIER:-}" = control-plane ] || { [ "${TIER:-}" != nodes ] \
    && [ -z "$(kubectl get nodes -o name 2>/dev/null)" ]; }; then
    exec e2e/k8s/control-plane.sh
fi
# Tier 2 on e2e/k8s/cluster.sh's own node.
if [ -n "${K8S_NODE_NETNS:-}" ]; then
    exec e2e/k8s/pods.sh
fi
for tool in docker kubectl helm timeout; do
    command -v "$tool" >/dev/null || { echo "e2e/k8s: $tool is required" >&2; exit 1; }
done
if [ -n "${KIND_CLUSTER:-}" ]; then
    command -v kind >/dev/null || { echo "e2e/k8s: kind is required with KIND_CLUSTER" >&2; exit 1; }
fi
debug_help=$(kubectl debug --help 2>/dev/null || true)
if [[ $debug_help != *netadmin* ]]; then
    echo "e2e/k8s: kubectl >= 1.27 is required (kubectl debug --profile=netadmin)" >&2
    exit 1
fi

ns="concentrator-e2e-$$"
prefix="${IMAGE_PREFIX:-}"
tag="e2e-$(git rev-parse --short HEAD)"
site_image="${prefix}concentrator-e2e-site:$tag"
fleet=edge
gw_selector="app.kubernetes.io/name=concentrator-gateway,app.kubernetes.io/instance=$fleet"
# The static eroute hq-backup (examples/static-peer.yaml) and its ends.
peer_id=backup.example.com
site_subnet=172.16.0.0/24
site_host=172.16.0.1
gw_subnet=10.0.0.0/16
gw_host=10.0.0.1
tun_dev=concentrator0 # the gateway's --tun-name default
debug_container=e2e-net
ns_created=no

k() { kubectl -n "$ns" "$@"; }
# Commands inside pods, bounded: a wedged exec must not hang the run.
kx() { timeout "${KX_TIMEOUT:-60}" kubectl -n "$ns" exec "$@"; }
log() { echo "==> e2e/k8s: $*"; }
fail() {
    echo "e2e/k8s: FAIL: $*" >&2
    exit 1
}
gateway_pods() { k get pods -l "$gw_selector" -o jsonpath='{.items[*].metadata.name}'; }

# Whether IPv4 address $1 lies in CIDR $2.
ip4_int() {
    local IFS=. a b c d
    read -r a b c d <<<"$1"
    echo $(((a << 24) | (b << 16) | (c << 8) | d))
}
in_cidr() {
    local len=${2#*/} mask
    mask=$(((0xffffffff << (32 - len)) & 0xffffffff))
    ((($(ip4_int "$1") & mask) == ($(ip4_int "${2%/*}") & mask)))
}
# Cluster addresses inside the tunnel's subnets would be routed into the tunnel.
check_outside_tunnel() { # what address
    [[ $2 =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || fail "$1 has no IPv4 address (got '$2')"
    local net
    for net in "$gw_subnet" "$site_subnet"; do
        if in_cidr "$2" "$net"; then
            fail "$1 address $2 lies in the tunnel subnet $net: use a cluster whose pod and service CIDRs avoid $gw_subnet and $site_subnet"
        fi
    done
}

diagnostics() {
    echo "==> e2e/k8s: diagnostics, namespace $ns"
    k get gatewayfleet,eroute,egroup,statefulset,pods,svc,endpointslices -o wide
    k describe pod site | tail -n 25
    echo "--- site log"
    k logs site --tail=150
    echo "--- site SAs"
    kx site -- swanctl --list-sas
    kx site -- ip route show table 220
    local pod
    for pod in $(gateway_pods); do
        echo "--- gateway $pod log"
        k logs "$pod" -c gateway --tail=100
        echo "--- gateway $pod tunnels"
        kx "$pod" -c gateway -- /usr/local/bin/concentrator-gateway tunnels
        if kx "$pod" -c "$debug_container" -- true 2>/dev/null; then
            echo "--- gateway $pod addresses, routes, IKE/ESP metrics"
            kx "$pod" -c "$debug_container" -- ip -br addr
            kx "$pod" -c "$debug_container" -- ip route
            kx "$pod" -c "$debug_container" -- sh -c \
                "curl -sf http://127.0.0.1:9090/metrics | grep -E '^(ike|esp|dataplane|tunnels)' | grep -v ' 0$'"
        fi
    done
    echo "--- events"
    k get events --sort-by=.lastTimestamp | tail -n 40
}

cleanup() {
    local status=$? clean=yes
    trap - EXIT
    if [ "$ns_created" = yes ]; then
        if [ "$status" -ne 0 ]; then
            diagnostics >&2 2>&1 || true
        fi
        log "cleanup"
        # The site deletes its SAs (the gateway pods then hold no tunnel and drain at once),
        # then the fleet goes while the operator still runs to lift its drain finalizer.
        KX_TIMEOUT=20 kx site -- swanctl --terminate --ike hq --timeout 10 >/dev/null 2>&1 || true
        k delete pod site --ignore-not-found --wait=false >/dev/null 2>&1 || true
        if k get gatewayfleet "$fleet" >/dev/null 2>&1 \
            && ! k delete gatewayfleet "$fleet" --timeout=180s >/dev/null; then
            echo "e2e/k8s: gatewayfleet/$fleet was not deleted within 180 s (drain finalizer); removing the finalizer" >&2
            k get gatewayfleet "$fleet" -o jsonpath='{.status}' >&2 || true
            k patch gatewayfleet "$fleet" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
            clean=no
        fi
        helm uninstall concentrator -n "$ns" --wait --timeout 2m >/dev/null 2>&1 || true
        kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
    fi
    if [ "$status" -eq 0 ] && [ "$clean" = no ]; then
        echo "e2e/k8s: FAIL: the fleet did not uninstall cleanly" >&2
        status=1
    fi
    exit "$status"
}
trap cleanup EXIT

publish() {
    if [ -n "${KIND_CLUSTER:-}" ]; then
        kind load docker-image --name "$KIND_CLUSTER" "$1"
    elif [ -n "$prefix" ]; then
        docker push "$1"
    fi
}
for target in gateway operator; do
    docker build --target "$target" -t "${prefix}concentrator-$target:$tag" .
    publish "${prefix}concentrator-$target:$tag"
done
docker build -f e2e/k8s/site.Dockerfile -t "$site_image" e2e/k8s
publish "$site_image"

kubectl create namespace "$ns"
ns_created=yes
helm install concentrator charts/concentrator -n "$ns" --wait --timeout 5m \
    --set operator.image.repository="${prefix}concentrator-operator" --set operator.image.tag="$tag"
k create secret generic hq-backup --from-file=psk=examples/secrets/hq-backup/psk
k create secret generic fleet --from-literal=key="$(head -c 32 /dev/urandom | base64)"
k apply -f examples/branches.yaml -f examples/static-peer.yaml
k apply -f - <<YAML
apiVersion: vpn.concentrator.io/v1alpha1
kind: GatewayFleet
metadata: {name: $fleet}
spec:
  image: ${prefix}concentrator-gateway:$tag
  scaling: {minReplicas: 2, maxReplicas: 4, targetTunnelsPerPod: 1000, targetCpuPercent: 70, stabilizationWindow: 1m}
  front: {mode: Slb, serviceType: NodePort}
  etcd: {endpoints: ["http://etcd:2379"]}
  fleetKeySecretRef: {name: fleet, key: key}
YAML

k wait --for=condition=Ready eroute/branches eroute/hq-backup egroup/branches --timeout=120s
k wait --for=condition=Ready "gatewayfleet/$fleet" --timeout=180s
k rollout status "statefulset/$fleet" --timeout=300s
front_policy=$(k get svc "$fleet" -o jsonpath='{.spec.sessionAffinity} {.spec.externalTrafficPolicy}')
[ "$front_policy" = "ClientIP Local" ] \
    || fail "service/$fleet has sessionAffinity/externalTrafficPolicy '$front_policy', want 'ClientIP Local'"
log "fleet ready in namespace $ns"

# --- A strongSwan site through the front Service (its cluster IP: the site runs in-cluster).
front=$(k get svc "$fleet" -o jsonpath='{.spec.clusterIP}')
check_outside_tunnel "service/$fleet" "$front"
ports=$(k get svc "$fleet" -o jsonpath='{range .spec.ports[*]}{.protocol}/{.port}/{.targetPort} {end}')
for want in UDP/500/500 UDP/4500/4500; do
    [[ " $ports " == *" $want "* ]] || fail "service/$fleet does not forward $want (ports: $ports)"
done
read -r -a gw_pods <<<"$(gateway_pods)"
[ "${#gw_pods[@]}" -ge 1 ] || fail "no gateway pods with labels $gw_selector"
for pod in "${gw_pods[@]}"; do
    check_outside_tunnel "pod/$pod" "$(k get pod "$pod" -o jsonpath='{.status.podIP}')"
done

sed -e "s|__SITE_IMAGE__|$site_image|" -e "s|__GATEWAY_ADDR__|$front|" e2e/k8s/site.yaml | k apply -f -
k wait --for=condition=Ready pod/site --timeout=180s || fail "the site pod did not become Ready"
check_outside_tunnel "pod/site" "$(k get pod site -o jsonpath='{.status.podIP}')"

# Something to ping on the gateway side: an address of hq-backup's localSubnet on each gateway
# pod's lo (whichever pod the Service picks holds the tunnel). The gateway image is distroless
# (no shell, no ip), so an ephemeral container of the site image does it: it shares the pod's
# network namespace and, with the netadmin profile, has NET_ADMIN.
for pod in "${gw_pods[@]}"; do
    k debug "pod/$pod" --container="$debug_container" --image="$site_image" \
        --image-pull-policy=IfNotPresent --profile=netadmin -- sleep 3600 >/dev/null
done
for pod in "${gw_pods[@]}"; do
    state=
    for _ in $(seq 60); do
        state=$(k get pod "$pod" -o jsonpath="{.status.ephemeralContainerStatuses[?(@.name==\"$debug_container\")].state}")
        [[ $state == *running* || $state == *terminated* ]] && break
        sleep 2
    done
    [[ $state == *running* ]] || fail "ephemeral container $debug_container in pod/$pod is not running: ${state:-no status}"
    kx "$pod" -c "$debug_container" -- ip addr replace "$gw_host/32" dev lo
done

log "site initiates to $front (service/$fleet)"
kx site -- swanctl --initiate --ike hq --child hq --timeout 30 \
    || fail "swanctl --initiate of hq failed"
sa_up() { grep -q ESTABLISHED <<<"$1" && grep -q INSTALLED <<<"$1"; }
sas=
for _ in $(seq 30); do
    sas=$(KX_TIMEOUT=20 kx site -- swanctl --list-sas --ike hq 2>&1 || true)
    sa_up "$sas" && break
    sleep 2
done
sa_up "$sas" || fail "IKE SA hq not ESTABLISHED with child hq INSTALLED within 60 s; swanctl --list-sas:
$sas"
echo "$sas"

# Exactly one gateway pod holds the tunnel: the site's IKE SA and ESP reached one pod.
holders=()
for _ in $(seq 15); do
    holders=()
    for pod in "${gw_pods[@]}"; do
        table=$(KX_TIMEOUT=20 kx "$pod" -c gateway -- /usr/local/bin/concentrator-gateway tunnels --peer-id "$peer_id" 2>&1 || true)
        if grep -Eq "^${peer_id//./\\.} +hq-backup +- +[^ ]+ +${site_subnet//./\\.} " <<<"$table"; then
            holders+=("$pod")
            echo "$table"
        fi
    done
    [ "${#holders[@]}" -ge 1 ] && break
    sleep 2
done
[ "${#holders[@]}" -eq 1 ] \
    || fail "expected one gateway pod to list the tunnel of $peer_id (eroute hq-backup, $site_subnet), found ${#holders[@]}: ${holders[*]:-none}"
holder=${holders[0]}
log "gateway pod $holder holds the tunnel"

# The gateway routes the site's subnet into its TUN device (over netlink, control/routes.rs).
route=$(kx "$holder" -c "$debug_container" -- ip route show "$site_subnet" 2>&1 || true)
if [[ $route != *"dev $tun_dev"* ]]; then
    k logs "$holder" -c gateway | grep -E 'route change failed|route installer' | tail -n 5 >&2 || true
    if [ "${E2E_ADD_MISSING_ROUTE:-}" = 1 ]; then
        echo "e2e/k8s: WARNING: pod/$holder has no route $site_subnet dev $tun_dev ('$route'); adding it (E2E_ADD_MISSING_ROUTE=1)" >&2
        kx "$holder" -c "$debug_container" -- ip route replace "$site_subnet" dev "$tun_dev"
    else
        fail "pod/$holder has no route $site_subnet dev $tun_dev (got '$route'): the gateway installs it over netlink and logs 'route change failed' when it cannot (set E2E_ADD_MISSING_ROUTE=1 to add it by hand and test the rest)"
    fi
fi

log "ping $gw_host from $site_host through the tunnel"
kx site -- ping -c 3 -w 20 -I "$site_host" "$gw_host" \
    || fail "ping $gw_host from the site ($site_host) through the tunnel failed"
sas=$(kx site -- swanctl --list-sas --ike hq)
echo "$sas"
grep -Eq 'in +[0-9a-f]+[^,]*, +[1-9][0-9]* bytes, +[1-9][0-9]* packets' <<<"$sas" \
    || fail "the site's child SA counted no inbound packets after the ping"
log "tunnel through service/$fleet carries traffic ($peer_id <-> pod/$holder)"
