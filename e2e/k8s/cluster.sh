#!/usr/bin/env bash
# A single-machine Kubernetes cluster for the cluster tests. Tier 1 (envtest-grade): etcd,
# kube-apiserver (RBAC, PodSecurity admission), kube-controller-manager and kube-scheduler, in a
# private state directory; no node, so no pod runs. The API server also enforces
# OwnerReferencesPermissionEnforcement (as OpenShift does), so an operator that sets
# blockOwnerDeletion without the RBAC for it fails here too. Tier 2 adds a node that runs pods
# (e2e/k8s/node.sh: containerd, runc, CNI bridge, kubelet, kube-proxy in nftables mode, CoreDNS)
# in a network namespace of its own.
#
#   e2e/k8s/cluster.sh build [--node]  build (once) the binaries from Go modules; prints their directory
#   e2e/k8s/cluster.sh up [--node]     build if needed, start, wait until ready, write the admin kubeconfig;
#                                      with --node also the node (as `node up`)
#   e2e/k8s/cluster.sh node up|down    start (Ready, kube-proxy serving) or stop the node of a running cluster
#   e2e/k8s/cluster.sh env             print `export KUBECONFIG=... PATH=...` for a shell (eval it)
#   e2e/k8s/cluster.sh down            stop everything started by `up` and `node up`, remove the state
#
# The binaries come from the k8s.io/kubernetes module (e2e/k8s/build/go.mod pins every k8s.io
# staging module) and etcd from go.etcd.io/etcd/server/v3 at the release Kubernetes requires. They
# are kept by version under $K8S_CACHE (default /var/cache/concentrator/k8s/<version>), outside
# the clone, so a second run (and CI on the same machine) reuses them; kubelet, kube-proxy and
# CoreDNS (build/coredns, a module of its own) are built the first time a node is asked for.
#
# Network: the control plane listens on $HOST_ADDR (192.168.230.1), the root namespace's end of a
# veth pair whose other end, $NODE_ADDR (192.168.230.2), is in the network namespace
# $NODE_NETNS where the node (tier 2) runs: its pods, bridge, routes and kube-proxy's nftables
# table live there and nowhere else, and go with the namespace.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD_DIR="$HERE/build"
K8S_VERSION="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$BUILD_DIR/go.mod")"
ETCD_VERSION="$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ {print $2}' "$BUILD_DIR/go.mod")"
K8S_CACHE="${K8S_CACHE:-/var/cache/concentrator/k8s}"
BIN_DIR="$K8S_CACHE/$K8S_VERSION-etcd$ETCD_VERSION"
STATE_DIR="${K8S_STATE_DIR:-/tmp/concentrator-k8s}"
export GOCACHE="${GOCACHE:-/var/cache/concentrator/go-build}"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"

# Private loopback ports (not the well-known 2379/6443/10257/10259, so a machine that already
# runs a cluster or an etcd for other tests is left alone).
ETCD_CLIENT_PORT="${ETCD_CLIENT_PORT:-23790}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-23800}"
APISERVER_PORT="${APISERVER_PORT:-26443}"
KCM_PORT="${KCM_PORT:-20257}"
SCHEDULER_PORT="${SCHEDULER_PORT:-20259}"
SERVICE_CIDR="10.96.0.0/16"
# The link between the root namespace (control plane) and the node's namespace. Outside every
# range the other e2e suites and the tunnels of the tests use (10.0.0.0/16, 172.16.0.0/24,
# 10.1-10.3.x, 10.128.0.0/9, 10.244.0.0/24 and 192.0.2.0/24 in their namespaces).
NODE_NETNS="${NODE_NETNS:-concentrator-k8s}"
HOST_ADDR=192.168.230.1
NODE_ADDR=192.168.230.2
LINK_PREFIX=24
HOST_LINK=ck8s-host # the root namespace's end of the veth pair (the node's end: eth0)

COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
# CoreDNS has a module of its own (build/coredns/go.mod): its version is in its file name.
COREDNS_VERSION="$(awk '$1 == "require" {$1 = ""; $0 = $0} $1 == "github.com/coredns/coredns" && $2 ~ /^v/ {print $2}' "$BUILD_DIR/coredns/go.mod")"
if [ -z "$K8S_VERSION" ] || [ -z "$ETCD_VERSION" ] || [ -z "$COREDNS_VERSION" ]; then
    echo "cluster: no version of k8s.io/kubernetes, etcd or CoreDNS in $BUILD_DIR/**/go.mod" >&2
    exit 1
fi
COREDNS="coredns-$COREDNS_VERSION"
NODE_COMPONENTS=(kubelet kube-proxy "$COREDNS")

log() { echo "==> cluster: $*" >&2; }
die() { echo "cluster: $*" >&2; exit 1; }

build() { # [--node]
    local wanted=("${COMPONENTS[@]}" etcd) missing=() c pkgs=()
    [ "${1:-}" = --node ] && wanted+=("${NODE_COMPONENTS[@]}")
    for c in "${wanted[@]}"; do [ -x "$BIN_DIR/$c" ] || missing+=("$c"); done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "binaries of Kubernetes $K8S_VERSION and etcd $ETCD_VERSION reused from $BIN_DIR"
        return
    fi
    if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
        export PATH="/usr/local/go/bin:$PATH"
    fi
    command -v go >/dev/null 2>&1 || die "Go is needed to build Kubernetes (apt-get install golang-go, or /usr/local/go)"
    log "building ${missing[*]} (Kubernetes $K8S_VERSION, etcd $ETCD_VERSION) into $BIN_DIR (first run: long, see README)"
    local start=$SECONDS tmp="$BIN_DIR.tmp.$$"
    mkdir -p "$tmp"
    local coredns=no
    for c in "${missing[@]}"; do
        case $c in
            etcd) pkgs+=(./etcd) ;;
            coredns-*) coredns=yes ;; # a module of its own
            *) pkgs+=("k8s.io/kubernetes/cmd/$c") ;;
        esac
    done
    local ver="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
    ver+=" -X k8s.io/component-base/version.gitMajor=$(echo "${K8S_VERSION#v}" | cut -d. -f1)"
    ver+=" -X k8s.io/component-base/version.gitMinor=$(echo "${K8S_VERSION#v}" | cut -d. -f2)"
    ver+=" -X k8s.io/component-base/version.gitTreeState=clean"
    ver+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
    (
        cd "$BUILD_DIR"
        # One `go build` for all: shared packages compile once. -p 2 keeps a 2-core machine usable.
        if [ "${#pkgs[@]}" -gt 0 ]; then
            nice go build -p "${GO_BUILD_JOBS:-2}" -trimpath -ldflags "-s -w $ver" -o "$tmp/" "${pkgs[@]}"
        fi
        if [ "$coredns" = yes ]; then
            cd coredns
            nice go build -p "${GO_BUILD_JOBS:-2}" -trimpath -ldflags "-s -w" -o "$tmp/$COREDNS" .
        fi
    )
    # Only what was missing is added: binaries already there stay (one directory per version).
    mkdir -p "$BIN_DIR"
    for c in "${missing[@]}"; do mv "$tmp/$c" "$BIN_DIR/$c"; done
    rm -rf "$tmp"
    log "built in $((SECONDS - start)) s"
}

# --- waits: poll a condition until it holds or the timeout passes (never a blind sleep).
wait_for() { # description timeout-seconds command...
    local what=$1 timeout=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "cluster: timed out after ${timeout}s waiting for $what" >&2
            return 1
        fi
        sleep 0.5
    done
}

pid_alive() { [ -f "$STATE_DIR/run/$1.pid" ] && kill -0 "$(cat "$STATE_DIR/run/$1.pid")" 2>/dev/null; }

# Starts a component in its own session (so `down` can stop it and its children by pid), logging
# to $STATE_DIR/logs/<name>.log.
start() { # name binary args...
    local name=$1
    shift
    setsid "$@" >"$STATE_DIR/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/run/$name.pid"
}

# A component that exits while we wait for it is a failure at once, with its log.
alive_or_die() { # name
    if ! pid_alive "$1"; then
        echo "cluster: $1 exited; last lines of $STATE_DIR/logs/$1.log:" >&2
        tail -n 30 "$STATE_DIR/logs/$1.log" >&2 || true
        return 1
    fi
}

wait_component() { # name description timeout command...
    local name=$1 what=$2 timeout=$3 deadline
    shift 3
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        alive_or_die "$name" || return 1
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "cluster: timed out after ${timeout}s waiting for $what; last lines of its log:" >&2
            tail -n 30 "$STATE_DIR/logs/$name.log" >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

port_free() { ! ss -Hltn "sport = :$1" | grep -q .; }

pki() {
    local d="$STATE_DIR/pki"
    mkdir -p "$d"
    (
        cd "$d"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=concentrator-e2e-ca" \
            -keyout ca.key -out ca.crt 2>/dev/null
        # Serving certificate of the API server: loopback, and the in-cluster names and address.
        cat >apiserver.ext <<EXT
subjectAltName = IP:127.0.0.1, IP:$HOST_ADDR, IP:10.96.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage = serverAuth
EXT
        sign apiserver "/CN=kube-apiserver" apiserver.ext
        printf 'extendedKeyUsage = clientAuth\n' >client.ext
        sign admin "/O=system:masters/CN=kubernetes-admin" client.ext
        sign controller-manager "/CN=system:kube-controller-manager" client.ext
        sign scheduler "/CN=system:kube-scheduler" client.ext
        # The API server's client certificate towards kubelets (logs, exec, port-forward).
        sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client.ext
        # Service-account token signing keys.
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    )
}

sign() { # name subject extfile (in the pki directory)
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
        -extfile "$3" -out "$1.crt" 2>/dev/null
}

kubeconfig() { # name (client certificate pki/<name>.{crt,key})
    local p="$STATE_DIR/pki"
    cat >"$STATE_DIR/$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: concentrator-e2e
  cluster:
    server: https://$HOST_ADDR:$APISERVER_PORT
    certificate-authority: $p/ca.crt
users:
- name: $1
  user:
    client-certificate: $p/$1.crt
    client-key: $p/$1.key
contexts:
- name: $1
  context: {cluster: concentrator-e2e, user: $1}
current-context: $1
KC
}

# The link to the node's namespace: the API server's address lives on its root end. Made by
# `up` whether or not a node follows, so that `node up` can join a running control plane.
link_up() {
    # Recorded first: `down` removes the namespace and link only when this state directory
    # made them.
    echo "$NODE_NETNS $HOST_LINK" >"$STATE_DIR/run/link"
    ip netns add "$NODE_NETNS"
    ip link add "$HOST_LINK" type veth peer name eth0 netns "$NODE_NETNS"
    ip addr add "$HOST_ADDR/$LINK_PREFIX" dev "$HOST_LINK"
    ip link set "$HOST_LINK" up
    ip -n "$NODE_NETNS" addr add "$NODE_ADDR/$LINK_PREFIX" dev eth0
    ip -n "$NODE_NETNS" link set eth0 up
    ip -n "$NODE_NETNS" link set lo up
    ip -n "$NODE_NETNS" route add default via "$HOST_ADDR"
}

link_down() {
    [ -f "$STATE_DIR/run/link" ] || return 0
    ip link del "$HOST_LINK" 2>/dev/null || true
    ip netns del "$NODE_NETNS" 2>/dev/null || true
    rm -f "$STATE_DIR/run/link"
}

healthz() { # port path (TLS, self-signed CA: the health paths are open to anyone)
    [ "$(curl -sk --max-time 2 "https://127.0.0.1:$1$2")" = ok ]
}

up_failed() { # status
    if [ "$1" -ne 0 ]; then
        log "up failed; stopping what was started"
        down
    fi
    exit "$1"
}

up() { # [--node]
    local with_node=${1:-}
    [ -z "$with_node" ] || [ "$with_node" = --node ] || die "usage: $0 up [--node]"
    build "$with_node"
    local c
    for c in etcd kube-apiserver kube-controller-manager kube-scheduler; do
        if pid_alive "$c"; then die "$c is already running from $STATE_DIR (run: $0 down)"; fi
    done
    if ip netns list | grep -qw "$NODE_NETNS" || ip link show "$HOST_LINK" >/dev/null 2>&1; then
        die "network namespace $NODE_NETNS or link $HOST_LINK exists (run: $0 down)"
    fi
    if ip -4 addr show | grep -q "inet ${HOST_ADDR%.*}\."; then
        die "an address of ${HOST_ADDR%.*}.0/$LINK_PREFIX is already in use on this machine"
    fi
    for port in "$ETCD_CLIENT_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$KCM_PORT" "$SCHEDULER_PORT"; do
        port_free "$port" || die "port $port is taken (set ETCD_CLIENT_PORT, ETCD_PEER_PORT, APISERVER_PORT, KCM_PORT, SCHEDULER_PORT)"
    done
    command -v openssl >/dev/null || die "openssl is needed"
    # A failed start stops whatever it started (the waits print the component's log first).
    trap 'up_failed $?' EXIT
    local start=$SECONDS
    rm -rf "$STATE_DIR"
    mkdir -p "$STATE_DIR/logs" "$STATE_DIR/run"
    link_up
    pki
    kubeconfig admin
    kubeconfig controller-manager
    kubeconfig scheduler
    local p="$STATE_DIR/pki"

    log "starting etcd $ETCD_VERSION on 127.0.0.1:$ETCD_CLIENT_PORT"
    start etcd "$BIN_DIR/etcd" --name e2e --data-dir "$STATE_DIR/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
        --unsafe-no-fsync --quota-backend-bytes 1073741824
    wait_component etcd "etcd health" 60 \
        sh -c "curl -s --max-time 2 http://127.0.0.1:$ETCD_CLIENT_PORT/health | grep -q '\"health\":\"true\"'"

    log "starting kube-apiserver $K8S_VERSION on https://$HOST_ADDR:$APISERVER_PORT"
    start kube-apiserver "$BIN_DIR/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --bind-address "$HOST_ADDR" --advertise-address "$HOST_ADDR" --secure-port "$APISERVER_PORT" \
        --kubelet-client-certificate "$p/apiserver-kubelet-client.crt" \
        --kubelet-client-key "$p/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types InternalIP \
        --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
        --client-ca-file "$p/ca.crt" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
        --authorization-mode Node,RBAC \
        --enable-admission-plugins NodeRestriction,PodSecurity,OwnerReferencesPermissionEnforcement \
        --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true \
        --profiling=false
    wait_component kube-apiserver "kube-apiserver /readyz" 180 \
        "$BIN_DIR/kubectl" --kubeconfig "$STATE_DIR/admin.kubeconfig" get --raw /readyz

    log "starting kube-controller-manager and kube-scheduler"
    start kube-controller-manager "$BIN_DIR/kube-controller-manager" \
        --kubeconfig "$STATE_DIR/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$STATE_DIR/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$STATE_DIR/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
        --use-service-account-credentials=true \
        --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
        --cluster-signing-cert-file "$p/ca.crt" --cluster-signing-key-file "$p/ca.key" \
        --service-cluster-ip-range "$SERVICE_CIDR" --controllers '*'
    start kube-scheduler "$BIN_DIR/kube-scheduler" \
        --kubeconfig "$STATE_DIR/scheduler.kubeconfig" \
        --authentication-kubeconfig "$STATE_DIR/scheduler.kubeconfig" \
        --authorization-kubeconfig "$STATE_DIR/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --leader-elect=false
    wait_component kube-controller-manager "kube-controller-manager /healthz" 120 healthz "$KCM_PORT" /healthz
    wait_component kube-scheduler "kube-scheduler /healthz" 120 healthz "$SCHEDULER_PORT" /healthz
    # The service-account controller works: every namespace gets its `default` ServiceAccount.
    wait_component kube-controller-manager "the ServiceAccount default/default" 120 \
        "$BIN_DIR/kubectl" --kubeconfig "$STATE_DIR/admin.kubeconfig" -n default get serviceaccount default
    if [ "$with_node" = --node ]; then
        node_up
    fi
    trap - EXIT
    log "up in $((SECONDS - start)) s; use it with: eval \"\$($0 env)\""
}

down() {
    local c pid deadline
    node_down
    for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do
        [ -f "$STATE_DIR/run/$c.pid" ] || continue
        pid=$(cat "$STATE_DIR/run/$c.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 30))
            while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
            if kill -0 "$pid" 2>/dev/null; then
                log "$c (pid $pid) ignored SIGTERM for 30 s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
    done
    link_down
    rm -rf "$STATE_DIR"
    log "down"
}

env_() {
    [ -f "$STATE_DIR/admin.kubeconfig" ] || die "no cluster in $STATE_DIR (run: $0 up)"
    echo "export KUBECONFIG=$STATE_DIR/admin.kubeconfig"
    echo "export PATH=$BIN_DIR:\$PATH"
    echo "export K8S_STATE_DIR=$STATE_DIR"
    echo "export K8S_NODE_NETNS=$NODE_NETNS"
    if pid_alive containerd; then
        # For `ctr images import` into the node's containerd (the namespace the kubelet uses).
        echo "export CONTAINERD_ADDRESS=$CONTAINERD_SOCK CONTAINERD_NAMESPACE=k8s.io"
    fi
}

# The node (tier 2): node_up, node_down.
# shellcheck source-path=SCRIPTDIR source=node.sh
. "$HERE/node.sh"

case "${1:-}" in
    build) build "${2:-}"; echo "$BIN_DIR" ;;
    up) up "${2:-}" ;;
    node)
        case "${2:-}" in
            up) node_up_alone ;;
            down) node_down ;;
            *) echo "usage: $0 node up|down" >&2; exit 2 ;;
        esac
        ;;
    down) down ;;
    env) env_ ;;
    *) echo "usage: $0 build [--node]|up [--node]|node up|node down|down|env" >&2; exit 2 ;;
esac
