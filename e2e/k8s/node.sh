# shellcheck shell=bash disable=SC2153
# The node of the cluster tests' tier 2: a kubelet that runs pods, sourced by cluster.sh (its
# variables and helpers: STATE_DIR, BIN_DIR, pki, start, wait_component, ...).
#
# Everything runs in the network namespace $NODE_NETNS (made by `cluster.sh up`, reached from the
# control plane over a veth pair) and keeps its state under $STATE_DIR/node:
#   containerd (Debian 1.6) with its own config, socket, root and state directories, runc;
#   CNI: Debian's bridge and host-local plugins, bridge ck8s0, pods in $POD_CIDR;
#   kubelet (cgroupfs driver, cgroup v1, pods' cgroups under /$CGROUP_ROOT in each hierarchy);
#   kube-proxy in nftables mode (its tables are in the node's namespace only);
#   CoreDNS (the cluster's DNS: Services and the pods of headless Services, such as the gateway
#   pods the operator dials by name) on the node's address, as the kubelet's clusterDNS.
# The pause image is built here (Kubernetes' own pause.c, compiled static) and imported; the
# other images come from e2e/k8s/image.sh and `ctr images import` (eval "$(cluster.sh env)" sets
# CONTAINERD_ADDRESS and CONTAINERD_NAMESPACE for ctr). Nothing is pulled: no registry is
# reachable from the node.
#
# What the kubelet needs on this machine (cgroup v1, PID 1 not systemd, no swap, a disk more
# than 85% full) is in node_config below, each setting with its reason.

NODE_NAME=concentrator-e2e-node
NODE_DIR="$STATE_DIR/node"
POD_CIDR=192.168.231.0/24
POD_GW=192.168.231.1
POD_BRIDGE=ck8s0
CGROUP_ROOT=concentrator-k8s
CONTAINERD_SOCK="$NODE_DIR/containerd/containerd.sock"
CNI_BIN_DIR=/usr/lib/cni
PAUSE_IMAGE=localhost/concentrator-e2e/pause:3.10.1
NODE_PACKAGES=(containerd runc containernetworking-plugins nftables iproute2 util-linux busybox-static gcc libc6-dev)
# What the kubelet sets at start without asking (protectKernelDefaults: false): restored once the
# node is up, and again by node_down.
KERNEL_TUNABLES=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops)

in_node() { nsenter --net="/run/netns/$NODE_NETNS" "$@"; }
ctr_() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }
node_kubectl() { "$BIN_DIR/kubectl" --kubeconfig "$STATE_DIR/admin.kubeconfig" "$@"; }

node_check() {
    local p missing=()
    for p in "${NODE_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] || die "the node needs the Debian packages: ${missing[*]} (scripts/test-all.sh installs them)"
    if [ ! -f "$STATE_DIR/admin.kubeconfig" ] || ! pid_alive kube-apiserver; then
        die "no control plane in $STATE_DIR (run: $0 up)"
    fi
    [ -e "/run/netns/$NODE_NETNS" ] || die "no network namespace $NODE_NETNS (run: $0 down; $0 up)"
    local c
    for c in "${NODE_COMPONENTS[@]}"; do
        [ -x "$BIN_DIR/$c" ] || die "$BIN_DIR/$c is missing (run: $0 build --node)"
    done
    for c in containerd kubelet kube-proxy; do
        if pid_alive "$c"; then die "$c is already running from $STATE_DIR (run: $0 node down)"; fi
    done
}

# The pause image: Kubernetes' build/pause/linux/pause.c from the k8s.io/kubernetes module,
# compiled static (as upstream does), cached beside the binaries.
pause_image() {
    local tar="$BIN_DIR/images/pause.tar" src
    if [ ! -f "$tar" ]; then
        if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
            export PATH="/usr/local/go/bin:$PATH"
        fi
        src="$(cd "$BUILD_DIR" && go mod download -json k8s.io/kubernetes | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')/build/pause/linux/pause.c"
        [ -f "$src" ] || die "pause.c not found at $src"
        mkdir -p "$BIN_DIR/images"
        gcc -Os -Wall -Werror -static -DVERSION=v3.10.1-concentrator-e2e -o "$NODE_DIR/pause" "$src"
        strip "$NODE_DIR/pause"
        "$HERE/image.sh" -o "$tar" -n "$PAUSE_IMAGE" "$NODE_DIR/pause=/pause"
    fi
    echo "$tar"
}

node_pki() {
    (
        cd "$STATE_DIR/pki" || exit 1
        umask 077
        printf 'extendedKeyUsage = clientAuth\n' >client.ext
        sign kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" client.ext
        sign kube-proxy "/CN=system:kube-proxy" client.ext
        sign coredns "/CN=system:coredns" client.ext
    )
    kubeconfig kubelet
    kubeconfig kube-proxy
    kubeconfig coredns
}

# What CoreDNS's kubernetes plugin reads (kubeadm's system:coredns role).
coredns_rbac() { # apply|delete
    node_kubectl "$1" -f - >/dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "concentrator-e2e:coredns"}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "concentrator-e2e:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "concentrator-e2e:coredns"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}]
YAML
}

node_config() {
    local d=$NODE_DIR
    mkdir -p "$d/containerd" "$d/cni/net.d" "$d/kubelet" "$d/pod-logs" "$d/cni-ipam"
    cat >"$d/containerd/config.toml" <<TOML
# containerd 1.6 for the e2e node: everything private (socket, root, state, CNI, netns mounts).
version = 2
root = "$d/containerd/root"
state = "$d/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$d/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$PAUSE_IMAGE"
    # The pods' network namespaces under our state directory, not /run/netns.
    netns_mounts_under_state_dir = true
    # No AppArmor profiles are loaded on these machines.
    disable_apparmor = true
    stream_server_address = "127.0.0.1"
    # Root here lacks CAP_SYS_RESOURCE (the machine's bounding set): no process may lower its
    # oom_score_adj, and runc fails every sandbox (the kubelet asks -998) with "failed to update
    # /proc/self/oom_score_adj: Permission denied". Clamp to containerd's own, as rootless does.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "$CNI_BIN_DIR"
      conf_dir = "$d/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          # cgroup v1 and no systemd as PID 1: cgroupfs, as the kubelet.
          SystemdCgroup = false
          BinaryName = "/usr/sbin/runc"
          # runc's state (default /run/containerd/runc/<namespace>), ours only.
          Root = "$d/containerd/runc"
TOML
    # The pods' network: one bridge in the node's namespace, addresses from host-local (its
    # state under ours). No masquerading (no pod needs to leave the machine; the CNI plugin
    # would do it with iptables), hairpin so that a pod reaches itself through a Service.
    cat >"$d/cni/net.d/10-concentrator-e2e.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "concentrator-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$POD_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$d/cni-ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
JSON
    cat >"$d/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_ADDR
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $STATE_DIR/pki/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
# cgroup v1 and a PID 1 that is not systemd: the cgroupfs driver; kubelet 1.34 still runs on
# cgroup v1 when told not to fail (the default flips in later releases).
cgroupDriver: cgroupfs
failCgroupV1: false
# The pods' cgroups (kubepods, its QoS classes) under one root of ours in every hierarchy,
# removed by \`node down\`.
cgroupRoot: /$CGROUP_ROOT
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
# Where the kubelet keeps pod logs (default /var/log/pods).
podLogsDir: $d/pod-logs
# CoreDNS on the node's address (coredns.Corefile); names outside the cluster are refused.
clusterDNS: [$NODE_ADDR]
clusterDomain: cluster.local
resolvConf: ""
# The build machines' disk is often more than 85% full: the default thresholds (nodefs 10%,
# imagefs 15% free) would put the node under DiskPressure and evict the test's pods.
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 50
# ConfigMap and Secret volumes are refreshed on this period (default 1m): the gateways'
# config, which the operator renders into a ConfigMap, reaches them sooner.
syncFrequency: 10s
registerNode: true
serializeImagePulls: false
YAML
    cat >"$d/Corefile" <<COREFILE
cluster.local:53 in-addr.arpa:53 {
    bind $NODE_ADDR
    errors
    ready 127.0.0.1:8181
    kubernetes cluster.local in-addr.arpa {
        kubeconfig $STATE_DIR/coredns.kubeconfig
        pods insecure
    }
    cache 5
}
COREFILE
    cat >"$d/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: $STATE_DIR/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# In a network namespace other than the first, nf_conntrack_max is read-only: leave the
# conntrack table's size and timeouts as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
}

# The pods' cgroup root in every v1 hierarchy (the kubelet refuses a cgroupRoot that does not
# exist); cpuset needs its cpus and mems copied from the parent before anything joins it.
cgroup_root_up() {
    local h
    for h in /sys/fs/cgroup/*/; do
        [ -d "$h" ] || continue
        mkdir -p "$h$CGROUP_ROOT"
        if [ -f "$h/cpuset.cpus" ]; then
            cat "$h/cpuset.cpus" >"$h$CGROUP_ROOT/cpuset.cpus"
            cat "$h/cpuset.mems" >"$h$CGROUP_ROOT/cpuset.mems"
        fi
    done
}

cgroup_root_down() {
    local h
    for h in /sys/fs/cgroup/*/; do
        [ -d "$h$CGROUP_ROOT" ] || continue
        # Deepest first; a cgroup with a process left in it stays (and is reported).
        find "$h$CGROUP_ROOT" -depth -type d -exec rmdir {} \; 2>/dev/null || true
        [ ! -d "$h$CGROUP_ROOT" ] || log "cgroup $h$CGROUP_ROOT could not be removed (processes left?)"
    done
}

node_up_failed() { # status
    if [ "$1" -ne 0 ]; then
        log "node up failed; stopping the node"
        node_down
    fi
    exit "$1"
}

node_up_alone() {
    trap 'node_up_failed $?' EXIT
    build --node
    node_up
    trap - EXIT
}

node_up() {
    node_check
    local start=$SECONDS t
    rm -rf "$NODE_DIR"
    mkdir -p "$NODE_DIR"
    node_pki
    node_config
    cgroup_root_up
    for t in "${KERNEL_TUNABLES[@]}"; do
        echo "$t=$(sysctl -n "$t")"
    done >"$NODE_DIR/kernel-tunables"
    # Routing in the node's namespace only: between the pods, the control plane's link and any
    # sites linked to it by the tests.
    in_node sysctl -qw net.ipv4.ip_forward=1
    # The control plane reaches the pods (the kubernetes Service's endpoint is its own address).
    ip route replace "$POD_CIDR" via "$NODE_ADDR" dev "$HOST_LINK"

    log "starting containerd $(containerd --version | awk '{print $3}') in netns $NODE_NETNS"
    start containerd nsenter --net="/run/netns/$NODE_NETNS" containerd --config "$NODE_DIR/containerd/config.toml"
    wait_component containerd "containerd's socket" 60 ctr --address "$CONTAINERD_SOCK" version
    ctr_ images import "$(pause_image)" >/dev/null

    log "starting kubelet $K8S_VERSION (node $NODE_NAME, $NODE_ADDR)"
    start kubelet nsenter --net="/run/netns/$NODE_NETNS" "$BIN_DIR/kubelet" \
        --config "$NODE_DIR/kubelet/config.yaml" \
        --kubeconfig "$STATE_DIR/kubelet.kubeconfig" \
        --root-dir "$NODE_DIR/kubelet" --cert-dir "$NODE_DIR/kubelet/pki" \
        --hostname-override "$NODE_NAME" --node-ip "$NODE_ADDR" \
        --v "${KUBELET_VERBOSITY:-1}"
    log "starting kube-proxy $K8S_VERSION (nftables)"
    start kube-proxy nsenter --net="/run/netns/$NODE_NETNS" "$BIN_DIR/kube-proxy" \
        --config "$NODE_DIR/kube-proxy.yaml" --v "${KUBE_PROXY_VERBOSITY:-1}"
    log "starting CoreDNS $COREDNS_VERSION on $NODE_ADDR:53"
    coredns_rbac apply
    start coredns nsenter --net="/run/netns/$NODE_NETNS" "$BIN_DIR/$COREDNS" -conf "$NODE_DIR/Corefile"
    wait_component kubelet "node $NODE_NAME Ready" 180 node_ready
    restore_kernel_tunables
    wait_component kube-proxy "kube-proxy /healthz" 60 in_node curl -sf --max-time 2 http://127.0.0.1:10256/healthz
    wait_component kube-proxy "kube-proxy's nftables table" 60 in_node nft list table ip kube-proxy
    wait_component coredns "CoreDNS ready (its Kubernetes watches synced)" 60 \
        in_node curl -sf --max-time 2 http://127.0.0.1:8181/ready
    log "node $NODE_NAME Ready in $((SECONDS - start)) s (pods $POD_CIDR on $POD_BRIDGE in netns $NODE_NETNS)"
}

node_ready() {
    [ "$(node_kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

restore_kernel_tunables() {
    [ -f "$NODE_DIR/kernel-tunables" ] || return 0
    local line
    while read -r line; do
        sysctl -qw "$line" || true
    done <"$NODE_DIR/kernel-tunables"
}

stop_pid() { # name
    local pid deadline
    [ -f "$STATE_DIR/run/$1.pid" ] || return 0
    pid=$(cat "$STATE_DIR/run/$1.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$1 (pid $pid) ignored SIGTERM for 30 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$STATE_DIR/run/$1.pid"
}

# Stops the node and removes what it left: containers (their shims and cgroups), mounts under
# $NODE_DIR, the Node object, the kernel tunables the kubelet changed. Safe to run twice, or
# without a node.
node_down() {
    [ -d "$NODE_DIR" ] || return 0
    local id m
    stop_pid coredns
    stop_pid kube-proxy
    stop_pid kubelet
    if pid_alive containerd; then
        # Every container and sandbox, killed: the shims exit with them.
        for id in $(ctr_ tasks list -q 2>/dev/null); do
            ctr_ tasks kill --signal SIGKILL "$id" >/dev/null 2>&1 || true
        done
        for id in $(ctr_ tasks list -q 2>/dev/null); do
            ctr_ tasks delete --force "$id" >/dev/null 2>&1 || true
        done
        for id in $(ctr_ containers list -q 2>/dev/null); do
            ctr_ containers delete "$id" >/dev/null 2>&1 || true
            # libcni's cached results of the sandbox's networks (ours and containerd's
            # cni-loopback), at a fixed path.
            rm -f /var/lib/cni/results/*-"$id"-* 2>/dev/null || true
        done
    fi
    stop_pid containerd
    # Shims left behind by a containerd that died first.
    for m in $(pgrep -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" || true); do
        kill -KILL "$m" 2>/dev/null || true
    done
    # Mounts under the node's directory (volumes, rootfs, network namespaces), deepest first.
    awk -v d="$NODE_DIR/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r \
        | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    restore_kernel_tunables
    cgroup_root_down
    ip route del "$POD_CIDR" via "$NODE_ADDR" 2>/dev/null || true
    # What the kubelet, containerd and libcni keep at fixed paths: the links to the pods' logs,
    # the CNI result cache of our network, the shims' socket and fifo directories (removed when
    # empty only: a system containerd may use them).
    find /var/log/containers -maxdepth 1 -lname "$NODE_DIR/*" -delete 2>/dev/null || true
    rm -f /var/lib/cni/results/concentrator-e2e-* 2>/dev/null || true
    rmdir /var/log/containers /var/lib/cni/results /var/lib/cni /run/containerd/s \
        /run/containerd/fifo /run/containerd 2>/dev/null || true
    if pid_alive kube-apiserver; then
        node_kubectl delete node "$NODE_NAME" --ignore-not-found --wait=false >/dev/null 2>&1 || true
        coredns_rbac delete 2>/dev/null || true
    fi
    if [ -e "/run/netns/$NODE_NETNS" ]; then
        in_node nft delete table ip kube-proxy 2>/dev/null || true
        in_node nft delete table ip6 kube-proxy 2>/dev/null || true
        in_node ip link del "$POD_BRIDGE" 2>/dev/null || true
    fi
    rm -rf --one-file-system "$NODE_DIR"
    log "node down"
}
