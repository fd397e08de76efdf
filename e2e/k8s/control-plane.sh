#!/usr/bin/env bash
# Tier 1 of the cluster tests: the chart, the CRDs and the operator against a real Kubernetes
# control plane (e2e/k8s/cluster.sh: etcd, kube-apiserver with RBAC and PodSecurity admission,
# controller-manager, scheduler; no kubelet, so no pod ever runs).
#
#   e2e/k8s/cluster.sh up && eval "$(e2e/k8s/cluster.sh env)" && e2e/k8s/control-plane.sh
#
# What it does, and fails on:
# - `helm install` of charts/concentrator (CRDs Established, RBAC, the operator Deployment whose
#   pods the PodSecurity `restricted` level admits);
# - the operator binary runs outside the cluster as the chart's ServiceAccount (a token from
#   `kubectl create token`, never the admin credentials) and takes the chart's leader Lease;
# - examples/*.yaml applied: Eroutes and Egroups Ready, printer columns; a GatewayFleet with a
#   partial `scaling:` block (the API server fills in the rest) becomes a StatefulSet, front and
#   headless Services, a PodDisruptionBudget and a ConfigMap owned by the fleet; status counts
#   follow the StatefulSet; examples/kubernetes/fleet.yaml as shipped; a user's server-side apply of the spec does not fight the operator;
#   scaling the fleet changes the StatefulSet;
# - invalid objects: refused by the API server naming the field, or Ready=False with the field;
# - watches, not polling: a missing Secret on one Eroute makes it Ready=False (and an Event),
#   holds back the fleet's config while the fleet still scales; creating the Secret is picked
#   up in seconds by Eroute, fleet and config;
# - no reconcile loop: over a quiet period (QUIET_SECONDS, default 65: two of the fleet's 30 s
#   requeues) no watched object is written more than once, and `lastTransitionTime` stays put
#   until the status really changes;
# - the gateway pods need a `privileged` namespace: a `baseline` one refuses them (FailedCreate);
# - a namespace-scoped install (watchNamespaces): Roles only, its operator (with only those)
#   reconciles a fleet in its namespace and leaves another namespace's alone;
# - teardown: fleets deleted while the operator runs (finalizer lifted), owned objects collected,
#   namespaces terminate, `helm uninstall` leaves no chart object behind, CRDs deleted.
#
# Needs: KUBECONFIG (admin), kubectl, helm (HELM=path, or on PATH), the operator binary
# (OPERATOR=path, default: cargo build -p concentrator-operator), curl.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${KUBECONFIG:?e2e/k8s/control-plane.sh needs KUBECONFIG (eval \"\$(e2e/k8s/cluster.sh env)\")}"
HELM="${HELM:-helm}"
for tool in kubectl "$HELM" curl; do
    command -v "$tool" >/dev/null || { echo "e2e/k8s/control-plane: $tool is required" >&2; exit 1; }
done
if [ -z "${OPERATOR:-}" ]; then
    cargo build --locked -q -p concentrator-operator
    OPERATOR="${CARGO_TARGET_DIR:-target}/debug/concentrator-operator"
fi

run_id="$$"
rel_ns="concentrator-system-$run_id" # the Helm release
ns="vpn-$run_id"                      # the fleet and the examples: privileged
bad_ns="vpn-invalid-$run_id"          # invalid objects, apart so they do not block the fleet
base_ns="vpn-baseline-$run_id"        # a fleet in a namespace whose Pod Security is baseline
scoped_rel="concentrator-scoped-$run_id" # a second, namespace-scoped Helm release
scoped_ns="vpn-scoped-$run_id"          # the one namespace it watches
other_ns="vpn-other-$run_id"            # one it must leave alone
release=concentrator
sa="$release-operator"
fleet=edge
quiet="${QUIET_SECONDS:-65}"
work=$(mktemp -d)
op_pid=
metrics_port="${OPERATOR_METRICS_PORT:-29190}"
crds=(eroutes.vpn.concentrator.io egroups.vpn.concentrator.io gatewayfleets.vpn.concentrator.io)
checks=0

log() { echo "==> e2e/k8s/control-plane: $*"; }
fail() {
    echo "e2e/k8s/control-plane: FAIL: $*" >&2
    exit 1
}
ok() {
    checks=$((checks + 1))
    echo "ok $checks - $*"
}

# Polls `command` until it succeeds or `timeout` seconds pass.
poll() { # timeout description command...
    local timeout=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for $what"
        if [ -n "$op_pid" ] && ! kill -0 "$op_pid" 2>/dev/null; then
            fail "the operator exited while waiting for $what"
        fi
        sleep 0.5
    done
}
# A kubectl command (`get ... -o jsonpath=...`) prints exactly `want`.
is() { # want kubectl-args...
    local want=$1
    shift
    [ "$(kubectl "$@" 2>/dev/null)" = "$want" ]
}
absent() { # kubectl-get-args... : NotFound
    ! kubectl get "$@" >/dev/null 2>&1
}
none_left() { # kubectl-get-args... : lists nothing
    [ -z "$(kubectl get "$@" -o name 2>/dev/null)" ]
}
ready() { # ns kind/name -> True/False/"" of the Ready condition
    kubectl -n "$1" get "$2" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
}
cond() { # ns kind/name field (reason|message|lastTransitionTime|observedGeneration)
    kubectl -n "$1" get "$2" -o jsonpath="{.status.conditions[?(@.type==\"Ready\")].$3}"
}

# A fleet key Secret and a one-pod GatewayFleet $fleet in namespace $1.
minimal_fleet() { # namespace
    kubectl -n "$1" create secret generic fleet --from-literal=key="$(head -c 32 /dev/urandom | base64)" >/dev/null
    kubectl -n "$1" apply -f - >/dev/null <<YAML
apiVersion: vpn.concentrator.io/v1alpha1
kind: GatewayFleet
metadata: {name: $fleet}
spec:
  scaling: {minReplicas: 1}
  front: {serviceType: NodePort}
  etcd: {endpoints: ["http://etcd:2379"]}
  fleetKeySecretRef: {name: fleet, key: key}
YAML
}

diagnostics() {
    echo "==> diagnostics"
    kubectl get gatewayfleets,eroutes,egroups,statefulsets,services,pdb,configmaps -A -o wide 2>&1 | grep -v kube-root-ca || true
    kubectl get namespaces 2>&1 || true
    kubectl get events -A --sort-by=.lastTimestamp 2>&1 | tail -n 30 || true
    echo "--- operator log (last 60 lines)"
    tail -n 60 "$work/operator.log" 2>/dev/null || true
    if [ -f "$work/scoped.log" ]; then
        echo "--- namespace-scoped operator log (last 30 lines)"
        tail -n 30 "$work/scoped.log" || true
    fi
}

stop_operator() {
    if [ -n "$op_pid" ] && kill -0 "$op_pid" 2>/dev/null; then
        kill -TERM "$op_pid" 2>/dev/null || true
        local deadline=$((SECONDS + 20))
        while kill -0 "$op_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        kill -KILL "$op_pid" 2>/dev/null || true
        wait "$op_pid" 2>/dev/null || true
    fi
    op_pid=
}

cleanup() {
    local status=$?
    trap - EXIT
    if [ "$status" -ne 0 ]; then
        diagnostics >&2 || true
        # Best effort, so a failed run leaves no object that would trip the next one.
        kubectl delete gatewayfleets --all -n "$ns" --timeout=30s >/dev/null 2>&1 || true
        kubectl delete gatewayfleets --all -n "$base_ns" --timeout=30s >/dev/null 2>&1 || true
        stop_operator
        "$HELM" uninstall scoped -n "$scoped_rel" >/dev/null 2>&1 || true
        for n in "$ns" "$bad_ns" "$base_ns" "$scoped_ns" "$other_ns" "$scoped_rel"; do
            for f in $(kubectl get gatewayfleets -n "$n" -o name 2>/dev/null); do
                kubectl patch "$f" -n "$n" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
            done
            kubectl delete namespace "$n" --wait=false >/dev/null 2>&1 || true
        done
        "$HELM" uninstall "$release" -n "$rel_ns" >/dev/null 2>&1 || true
        kubectl delete namespace "$rel_ns" --wait=false >/dev/null 2>&1 || true
        kubectl delete crd "${crds[@]}" --wait=false >/dev/null 2>&1 || true
    fi
    stop_operator
    rm -rf "$work"
    if [ "$status" -eq 0 ]; then
        echo "$checks passed, 0 failed"
    else
        echo "$checks passed, 1 failed"
    fi
    exit "$status"
}
trap cleanup EXIT

kubectl version >/dev/null || fail "no API server at KUBECONFIG=$KUBECONFIG"
for n in "${crds[@]}"; do
    absent crd "$n" || fail "CRD $n exists already: this test installs the chart itself (delete the CRDs first)"
done

# --- The chart, for real. The release namespace enforces `restricted`: the operator's pods
# must pass it.
log "helm install $release into $rel_ns"
kubectl create namespace "$rel_ns" >/dev/null
kubectl label namespace "$rel_ns" pod-security.kubernetes.io/enforce=restricted >/dev/null
"$HELM" install "$release" charts/concentrator -n "$rel_ns" --timeout 2m >/dev/null
for n in "${crds[@]}"; do
    kubectl wait --for=condition=Established "crd/$n" --timeout=60s >/dev/null
done
ok "helm install: CRDs Established"
# The Deployment's ReplicaSet creates the operator pods (Pending: no node); a pod that the
# restricted level refused would leave a FailedCreate and no pod.
poll 60 "the operator Deployment's pods" \
    is "$(kubectl get deploy "$sa" -n "$rel_ns" -o jsonpath='{.spec.replicas}')" \
    get deploy "$sa" -n "$rel_ns" -o jsonpath='{.status.replicas}'
[ -z "$(kubectl get events -n "$rel_ns" --field-selector reason=FailedCreate -o name)" ] \
    || fail "the operator's pods were refused: $(kubectl get events -n "$rel_ns" --field-selector reason=FailedCreate -o jsonpath='{.items[*].message}')"
ok "the operator's pods pass Pod Security 'restricted' (created, Pending without a node)"

# --- The operator as the chart's ServiceAccount.
# A kubeconfig that authenticates as ServiceAccount $1 of namespace $2 (a token, never the
# admin credentials), written to $3.
sa_kubeconfig() { # sa namespace file
    local token server ca
    token=$(kubectl create token "$1" -n "$2" --duration=2h)
    server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
    ca=$(kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority}')
    cat >"$3" <<KC
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "$server", certificate-authority: "$ca"}
users:
- name: $1
  user: {token: "$token"}
contexts:
- name: operator
  context: {cluster: e2e, user: $1}
current-context: operator
KC
}
sa_kubeconfig "$sa" "$rel_ns" "$work/operator.kubeconfig"
as_operator() { kubectl --kubeconfig "$work/operator.kubeconfig" "$@"; }
[ "$(as_operator auth whoami -o jsonpath='{.status.userInfo.username}')" = "system:serviceaccount:$rel_ns:$sa" ] \
    || fail "the operator's kubeconfig does not authenticate as the ServiceAccount $sa"
# Least privilege holds on the real server: Secrets are watched (metadata) and read, never
# deleted; its own objects are never deleted but for what it cleans up.
[ "$(as_operator auth can-i watch secrets -n default 2>/dev/null)" = yes ] || fail "the chart does not let the operator watch Secrets"
[ "$(as_operator auth can-i delete secrets -n default 2>/dev/null)" = no ] || fail "the chart lets the operator delete Secrets"
[ "$(as_operator auth can-i delete statefulsets -n default 2>/dev/null)" = no ] || fail "the chart lets the operator delete StatefulSets"
ok "operator kubeconfig: ServiceAccount token of $rel_ns/$sa, least privilege"

log "starting the operator ($OPERATOR) as $rel_ns/$sa"
KUBECONFIG="$work/operator.kubeconfig" POD_NAME=e2e-operator POD_NAMESPACE="$rel_ns" \
    RUST_LOG="${OPERATOR_LOG:-info,kube=warn}" \
    "$OPERATOR" --metrics-listen "127.0.0.1:$metrics_port" --log-format json >"$work/operator.log" 2>&1 &
op_pid=$!
poll 60 "the operator to take the Lease" \
    is e2e-operator get lease "$sa" -n "$rel_ns" -o jsonpath='{.spec.holderIdentity}'
ok "the operator holds the leader Lease $rel_ns/$sa"

# --- Examples: Eroutes, Egroups, Secrets. The gateway pods need a privileged namespace.
kubectl create namespace "$ns" >/dev/null
kubectl label namespace "$ns" pod-security.kubernetes.io/enforce=privileged >/dev/null
kubectl -n "$ns" create secret generic hq-backup --from-file=psk=examples/secrets/hq-backup/psk >/dev/null
kubectl -n "$ns" create secret generic fleet --from-literal=key="$(head -c 32 /dev/urandom | base64)" >/dev/null
kubectl -n "$ns" apply -f examples/branches.yaml -f examples/static-peer.yaml >/dev/null
kubectl -n "$ns" wait --for=condition=Ready eroute/branches eroute/hq-backup egroup/branches --timeout=60s >/dev/null
ok "examples applied: Eroutes and Egroup Ready"
header=$(kubectl -n "$ns" get eroute hq-backup)
header=${header%%$'\n'*}
for col in ROLE LOCAL REMOTE "PEER ID" READY DYNAMIC AGE; do
    [[ $header == *"$col"* ]] || fail "kubectl get eroute has no column $col: $header"
done
row=$(kubectl -n "$ns" get eroute hq-backup --no-headers)
[[ $row =~ ^hq-backup\ +Both\ +10\.0\.0\.0/16\ +172\.16\.0\.0/24\ +backup\.example\.com\ +True\  ]] \
    || fail "kubectl get eroute hq-backup: unexpected row '$row'"
row=$(kubectl -n "$ns" get egroup branches --no-headers)
[[ $row == *True* ]] || fail "kubectl get egroup branches: not Ready in '$row'"
ok "printer columns of Eroute and Egroup"

# --- A GatewayFleet with a partial scaling block: the documented per-field defaults apply.
kubectl -n "$ns" apply --server-side --field-manager=e2e-user -f - >/dev/null <<YAML || fail "the API server refused a GatewayFleet with a partial scaling block"
apiVersion: vpn.concentrator.io/v1alpha1
kind: GatewayFleet
metadata: {name: $fleet}
spec:
  image: concentrator-gateway:e2e
  scaling: {maxReplicas: 3}
  front: {serviceType: NodePort}
  etcd: {endpoints: ["http://etcd:2379"]}
  fleetKeySecretRef: {name: fleet, key: key}
YAML
scaling=$(kubectl -n "$ns" get gwf "$fleet" -o jsonpath='{.spec.scaling.minReplicas} {.spec.scaling.maxReplicas} {.spec.scaling.targetTunnelsPerPod} {.spec.scaling.targetCpuPercent} {.spec.scaling.stabilizationWindow} {.spec.front.mode}')
[ "$scaling" = "2 3 5000 70 5m Slb" ] || fail "GatewayFleet defaults: got '$scaling', want '2 3 5000 70 5m Slb'"
ok "partial scaling block accepted; the API server filled in the defaults"

kubectl -n "$ns" wait --for=condition=Ready "gwf/$fleet" --timeout=60s >/dev/null
for obj in statefulset/$fleet service/$fleet service/$fleet-pods poddisruptionbudget/$fleet configmap/$fleet-config; do
    owner=$(kubectl -n "$ns" get "$obj" -o jsonpath='{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name} {.metadata.ownerReferences[0].controller}')
    [ "$owner" = "GatewayFleet/$fleet true" ] || fail "$obj: controller owner '$owner', want GatewayFleet/$fleet"
done
ok "StatefulSet, front and headless Services, PDB and ConfigMap exist, owned by the fleet"
[ "$(kubectl -n "$ns" get sts "$fleet" -o jsonpath='{.spec.replicas}')" = 2 ] || fail "statefulset/$fleet does not have minReplicas=2 replicas"
svc=$(kubectl -n "$ns" get svc "$fleet" -o jsonpath='{.spec.type} {.spec.sessionAffinity} {.spec.externalTrafficPolicy} {range .spec.ports[*]}{.protocol}/{.port} {end}')
[ "$svc" = "NodePort ClientIP Local UDP/500 UDP/4500 " ] || fail "service/$fleet: '$svc'"
[ "$(kubectl -n "$ns" get svc "$fleet-pods" -o jsonpath='{.spec.clusterIP}')" = None ] || fail "service/$fleet-pods is not headless"
[ "$(kubectl -n "$ns" get pdb "$fleet" -o jsonpath='{.spec.maxUnavailable}')" = 1 ] || fail "pdb/$fleet: maxUnavailable is not 1"
grep -q 'name: hq-backup' <<<"$(kubectl -n "$ns" get cm "$fleet-config" -o jsonpath='{.data.concentrator\.yaml}')" \
    || fail "configmap/$fleet-config does not hold the rendered Eroutes"
ok "StatefulSet replicas, Service type/affinity/ports, headless Service, PDB, rendered config"
# The StatefulSet controller creates the pods (Pending: no kubelet); the operator, watching the
# StatefulSet it owns, reports them. The printer columns show it.
poll 60 "pods $fleet-0 and $fleet-1" is 2 -n "$ns" get sts "$fleet" -o jsonpath='{.status.replicas}'
poll 60 "status.replicas of gwf/$fleet to follow its StatefulSet" is 2 -n "$ns" get gwf "$fleet" -o jsonpath='{.status.replicas}'
[ "$(kubectl -n "$ns" get sts "$fleet" -o jsonpath='{.status.readyReplicas}')" = "" ] || fail "ready gateway pods without a kubelet?"
header=$(kubectl -n "$ns" get gwf "$fleet")
header=${header%%$'\n'*}
for col in FRONT MIN MAX REPLICAS TUNNELS READY AGE; do
    [[ $header == *"$col"* ]] || fail "kubectl get gatewayfleet has no column $col: $header"
done
row=$(kubectl -n "$ns" get gwf "$fleet" --no-headers)
[[ $row =~ ^$fleet\ +Slb\ +2\ +3\ +2\ +0\ +True\  ]] || fail "kubectl get gatewayfleet $fleet: unexpected row '$row'"
ok "GatewayFleet printer columns: $row"
# The example fleet as shipped (its namespace and name changed): full scaling block,
# LoadBalancer front (no cloud here: the Service exists without an external address).
# Its admin TLS Secret (only checked for its keys here: no pod runs without nodes).
tls_dir=$(mktemp -d)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=concentrator-gateway -addext subjectAltName=DNS:concentrator-gateway \
    -keyout "$tls_dir/tls.key" -out "$tls_dir/tls.crt" 2>/dev/null
kubectl -n "$ns" create secret generic edge-admin-tls --from-file="$tls_dir/tls.crt" \
    --from-file="$tls_dir/tls.key" --from-file=ca.crt="$tls_dir/tls.crt" >/dev/null
rm -rf "$tls_dir"
sed -e "s/^  namespace: concentrator$/  namespace: $ns/" -e 's/^  name: edge$/  name: example/' \
    examples/kubernetes/fleet.yaml | kubectl apply -f - >/dev/null
kubectl -n "$ns" wait --for=condition=Ready gwf/example --timeout=60s >/dev/null
[ "$(kubectl -n "$ns" get sts example -o jsonpath='{.spec.replicas}')" = 2 ] || fail "statefulset/example does not have 2 replicas"
[ "$(kubectl -n "$ns" get svc example -o jsonpath='{.spec.type}')" = LoadBalancer ] || fail "service/example is not a LoadBalancer"
ok "examples/kubernetes/fleet.yaml: Ready, StatefulSet of 2, LoadBalancer front"

# --- Server-side apply: the status belongs to the operator (status subresource), the spec to
# its user; a user's server-side apply of the spec does not conflict with the operator.
managers=$(kubectl -n "$ns" get gwf "$fleet" --show-managed-fields -o jsonpath='{range .metadata.managedFields[*]}{.manager}:{.operation}:{.subresource};{end}')
[[ $managers == *"concentrator-operator:Apply:status;"* ]] || fail "gwf/$fleet status not applied by the operator's field manager: $managers"
kubectl -n "$ns" apply --server-side --field-manager=e2e-user -f - >/dev/null <<YAML || fail "a user's server-side apply of the fleet spec conflicted"
apiVersion: vpn.concentrator.io/v1alpha1
kind: GatewayFleet
metadata: {name: $fleet}
spec:
  image: concentrator-gateway:e2e
  scaling: {minReplicas: 3, maxReplicas: 4}
  front: {serviceType: NodePort}
  etcd: {endpoints: ["http://etcd:2379"]}
  fleetKeySecretRef: {name: fleet, key: key}
YAML
generation=$(kubectl -n "$ns" get gwf "$fleet" -o jsonpath='{.metadata.generation}')
poll 60 "gwf/$fleet observedGeneration $generation" is "$generation" -n "$ns" get gwf "$fleet" -o jsonpath='{.status.observedGeneration}'
poll 60 "statefulset/$fleet scaled to minReplicas=3" is 3 -n "$ns" get sts "$fleet" -o jsonpath='{.spec.replicas}'
poll 60 "gwf/$fleet status.replicas 3" is 3 -n "$ns" get gwf "$fleet" -o jsonpath='{.status.replicas}'
managers=$(kubectl -n "$ns" get sts "$fleet" --show-managed-fields -o jsonpath='{range .metadata.managedFields[*]}{.manager}:{.operation}:{.subresource};{end}')
[[ $managers == *"concentrator-operator:Apply:;"* ]] || fail "statefulset/$fleet not applied by the operator's field manager: $managers"
ok "server-side apply: user spec and operator status coexist; scaling to 3 reached the StatefulSet"

# --- Invalid objects: the API server refuses what the schema can tell; the operator names
# the field of the rest in status.
kubectl create namespace "$bad_ns" >/dev/null
if out=$(kubectl -n "$bad_ns" apply -f - 2>&1 <<YAML
apiVersion: vpn.concentrator.io/v1alpha1
kind: GatewayFleet
metadata: {name: bad-mode}
spec:
  front: {mode: Anycast}
  etcd: {endpoints: ["http://etcd:2379"]}
  fleetKeySecretRef: {name: fleet, key: key}
YAML
); then
    fail "the API server accepted front.mode: Anycast"
fi
[[ $out == *spec.front.mode* ]] || fail "the refusal of front.mode: Anycast does not name the field: $out"
if out=$(kubectl -n "$bad_ns" apply -f - 2>&1 <<YAML
apiVersion: vpn.concentrator.io/v1alpha1
kind: GatewayFleet
metadata: {name: bad-missing}
spec:
  etcd: {endpoints: ["http://etcd:2379"]}
YAML
); then
    fail "the API server accepted a GatewayFleet without fleetKeySecretRef"
fi
[[ $out == *fleetKeySecretRef* ]] || fail "the refusal of a missing fleetKeySecretRef does not name it: $out"
ok "the API server refuses a bad enum and a missing required field, naming them"
kubectl -n "$bad_ns" apply -f - >/dev/null <<YAML
apiVersion: vpn.concentrator.io/v1alpha1
kind: Eroute
metadata: {name: bad-subnet}
spec: {localSubnet: 10.0.0.0/33, remoteSubnet: 172.16.0.0/24, peerId: x.example.com, localId: hq.example.com}
---
apiVersion: vpn.concentrator.io/v1alpha1
kind: GatewayFleet
metadata: {name: bad-bounds}
spec:
  scaling: {minReplicas: 3, maxReplicas: 1}
  etcd: {endpoints: ["http://etcd:2379"]}
  fleetKeySecretRef: {name: fleet, key: key}
YAML
poll 60 "eroute/bad-subnet Ready=False" is False -n "$bad_ns" get eroute bad-subnet -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
msg="$(cond "$bad_ns" eroute/bad-subnet reason): $(cond "$bad_ns" eroute/bad-subnet message)"
[[ $msg == "Invalid: spec.localSubnet"* ]] || fail "eroute/bad-subnet: '$msg' does not name spec.localSubnet"
poll 60 "gwf/bad-bounds Ready=False" is False -n "$bad_ns" get gwf bad-bounds -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
msg="$(cond "$bad_ns" gwf/bad-bounds reason): $(cond "$bad_ns" gwf/bad-bounds message)"
[[ $msg == "Invalid: spec.scaling.maxReplicas"* ]] || fail "gwf/bad-bounds: '$msg' does not name spec.scaling.maxReplicas"
absent -n "$bad_ns" sts bad-bounds || fail "an invalid fleet got a StatefulSet"
# The operator's Events (events.k8s.io, through the chart's RBAC) reach the API server.
poll 30 "an Invalid Event on gwf/bad-bounds" \
    is GatewayFleet -n "$bad_ns" get events --field-selector reason=Invalid,involvedObject.name=bad-bounds \
    -o jsonpath='{.items[0].involvedObject.kind}'
ok "invalid Eroute and GatewayFleet: Ready=False, reason Invalid, the field named; an Invalid Event"

# --- Pod Security: the gateway pods (NET_ADMIN, hostPath /dev/net/tun) need `privileged`.
# In the fleet's privileged namespace the StatefulSet made its pods; in a baseline one they
# are refused.
[ "$(kubectl -n "$ns" get pods -l "app.kubernetes.io/instance=$fleet" -o name | wc -l)" -ge 2 ] \
    || fail "no gateway pods in the privileged namespace $ns"
kubectl create namespace "$base_ns" >/dev/null
kubectl label namespace "$base_ns" pod-security.kubernetes.io/enforce=baseline >/dev/null
minimal_fleet "$base_ns"
refused() {
    local m
    m=$(kubectl -n "$base_ns" get events --field-selector reason=FailedCreate,involvedObject.name="$fleet" \
        -o jsonpath='{.items[*].message}')
    [[ $m == *'violates PodSecurity "baseline'* ]]
}
poll 90 "the baseline namespace to refuse the gateway pods" refused
[ "$(kubectl -n "$base_ns" get pods -o name | wc -l)" -eq 0 ] || fail "gateway pods were admitted under baseline"
ok "Pod Security: gateway pods refused under baseline ($(kubectl -n "$base_ns" get events --field-selector reason=FailedCreate -o jsonpath='{.items[0].message}' | sed 's/.*violates PodSecurity/violates PodSecurity/' | cut -c1-160))"

# --- No reconcile loop. Watch every object the operator writes; over a quiet period none may
# be written more than once (a server-side apply of the same fields is no write: it keeps the
# resourceVersion). Each status write is a watch event that triggers another reconcile: an
# operator that rewrites a timestamp on each reconcile writes at every requeue (30 s for a
# fleet), or every second if the timestamp has sub-second precision.
ltt_before="$(cond "$ns" eroute/hq-backup lastTransitionTime) $(cond "$ns" gwf/"$fleet" lastTransitionTime) $(cond "$bad_ns" eroute/bad-subnet lastTransitionTime) $(cond "$bad_ns" gwf/bad-bounds lastTransitionTime)"
watch_pids=()
for kind in eroutes egroups gatewayfleets statefulsets services poddisruptionbudgets configmaps; do
    kubectl get "$kind" -A --watch-only --output-watch-events \
        -o jsonpath='{.type} {.object.kind}/{.object.metadata.namespace}/{.object.metadata.name} {.object.metadata.resourceVersion}{"\n"}' \
        >"$work/watch-$kind.log" 2>&1 &
    watch_pids+=($!)
done
max_writes=1
writes() { cat "$work"/watch-*.log | grep -E "^MODIFIED .*/($ns|$bad_ns|$base_ns)/" || true; }
log "counting writes for ${quiet}s (at most $max_writes per object)"
deadline=$((SECONDS + quiet))
while [ "$SECONDS" -lt "$deadline" ]; do
    worst=$(writes | awk '{print $2}' | sort | uniq -c | sort -rn | awk 'NR == 1')
    if [ -n "$worst" ] && [ "$(awk '{print $1}' <<<"$worst")" -gt "$max_writes" ]; then
        kill "${watch_pids[@]}" 2>/dev/null || true
        writes | tail -n 20 >&2
        fail "reconcile loop: $(awk '{print $2}' <<<"$worst") was written $(awk '{print $1}' <<<"$worst") times within ${quiet}s"
    fi
    kill -0 "$op_pid" 2>/dev/null || fail "the operator exited during the quiet period"
    sleep 1
done
kill "${watch_pids[@]}" 2>/dev/null || true
wait "${watch_pids[@]}" 2>/dev/null || true
ltt_after="$(cond "$ns" eroute/hq-backup lastTransitionTime) $(cond "$ns" gwf/"$fleet" lastTransitionTime) $(cond "$bad_ns" eroute/bad-subnet lastTransitionTime) $(cond "$bad_ns" gwf/bad-bounds lastTransitionTime)"
[ "$ltt_before" = "$ltt_after" ] || fail "lastTransitionTime changed without a transition: '$ltt_before' -> '$ltt_after'"
ok "no reconcile loop: $(writes | wc -l) writes in ${quiet}s, lastTransitionTime unchanged"

# --- A real transition moves lastTransitionTime, and only then; the fleet follows its config.
ltt0=$(cond "$ns" eroute/branches lastTransitionTime)
kubectl -n "$ns" patch eroute branches --type=merge -p '{"spec":{"remoteSubnet":"10.128.0.0/99"}}' >/dev/null
poll 60 "eroute/branches Ready=False" is False -n "$ns" get eroute branches -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
[[ "$(cond "$ns" eroute/branches message)" == spec.remoteSubnet* ]] || fail "eroute/branches: message does not name spec.remoteSubnet"
ltt1=$(cond "$ns" eroute/branches lastTransitionTime)
[ "$ltt1" != "$ltt0" ] || fail "eroute/branches went Ready=False without a new lastTransitionTime"
poll 60 "gwf/$fleet Ready=False (InvalidConfig)" is "False InvalidConfig" -n "$ns" get gwf "$fleet" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].reason}'
kubectl -n "$ns" patch eroute branches --type=merge -p '{"spec":{"remoteSubnet":"10.128.0.0/9"}}' >/dev/null
poll 60 "eroute/branches Ready=True again" is True -n "$ns" get eroute branches -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
poll 90 "gwf/$fleet Ready=True again" is True -n "$ns" get gwf "$fleet" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
[ "$(cond "$ns" eroute/branches lastTransitionTime)" != "$ltt0" ] || fail "eroute/branches: lastTransitionTime did not move"
ok "a transition to Invalid and back moves lastTransitionTime; the fleet follows (InvalidConfig, then Ready)"

# --- Watches, not polling (the requeues are 30 s for a fleet, 300 s for an Eroute): a change
# is reconciled within seconds. A missing Secret on one Eroute makes that Eroute Ready=False
# and holds back the fleet's config only: the fleet goes on scaling.
kubectl -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: vpn.concentrator.io/v1alpha1
kind: Eroute
metadata: {name: lost-key}
spec: {localSubnet: 10.0.0.0/16, remoteSubnet: 172.17.0.0/24, peerId: lost.example.com, localId: hq.example.com, pskSecretRef: {name: lost-key, key: psk}}
YAML
poll 20 "eroute/lost-key Ready=False SecretMissing" is "False SecretMissing" -n "$ns" get eroute lost-key \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].reason}'
[ "$(cond "$ns" eroute/lost-key message)" = "spec.pskSecretRef: Secret 'lost-key' not found" ] \
    || fail "eroute/lost-key: message '$(cond "$ns" eroute/lost-key message)'"
poll 20 "a SecretMissing Event on eroute/lost-key" \
    is Eroute -n "$ns" get events --field-selector reason=SecretMissing,involvedObject.name=lost-key \
    -o jsonpath='{.items[0].involvedObject.kind}'
poll 20 "gwf/$fleet Ready=False SecretMissing" is "False SecretMissing" -n "$ns" get gwf "$fleet" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].reason}'
kubectl -n "$ns" patch gwf "$fleet" --type=merge -p '{"spec":{"scaling":{"minReplicas":4}}}' >/dev/null
poll 20 "statefulset/$fleet scaled to 4 while an Eroute is broken" is 4 -n "$ns" get sts "$fleet" -o jsonpath='{.spec.replicas}'
poll 60 "gwf/$fleet status.replicas 4" is 4 -n "$ns" get gwf "$fleet" -o jsonpath='{.status.replicas}'
! grep -q lost-key <<<"$(kubectl -n "$ns" get cm "$fleet-config" -o jsonpath='{.data.concentrator\.yaml}')" \
    || fail "the config with a broken Eroute reached the pods"
grep -q 'name: hq-backup' <<<"$(kubectl -n "$ns" get cm "$fleet-config" -o jsonpath='{.data.concentrator\.yaml}')" \
    || fail "the last valid config was lost"
kubectl -n "$ns" create secret generic lost-key --from-literal=psk=not-a-real-key-but-long-enough >/dev/null
since=$SECONDS
poll 20 "eroute/lost-key Ready=True once its Secret exists" is True -n "$ns" get eroute lost-key \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
poll 20 "gwf/$fleet Ready=True once the Secret exists" is True -n "$ns" get gwf "$fleet" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
has_lost_key() { grep -q 'name: lost-key' <<<"$(kubectl -n "$ns" get cm "$fleet-config" -o jsonpath='{.data.concentrator\.yaml}')"; }
poll 20 "configmap/$fleet-config to hold eroute lost-key" has_lost_key
ok "a missing Secret on one Eroute: Ready=False (SecretMissing, Event), config held back, the fleet scaled to 4 meanwhile; the Secret's creation reached Eroute, fleet and config in $((SECONDS - since))s (watches)"

# --- Teardown: nothing left behind, nothing stuck.
log "deleting the fleets while the operator runs"
kubectl -n "$ns" delete gwf "$fleet" example --timeout=60s >/dev/null || fail "the fleets in $ns were not deleted within 60 s (finalizer)"
kubectl -n "$base_ns" delete gwf "$fleet" --timeout=60s >/dev/null || fail "gwf/$base_ns/$fleet was not deleted within 60 s (finalizer)"
for n in "$ns" "$base_ns"; do
    poll 90 "the garbage collector to remove the fleet's objects in $n" \
        none_left -n "$n" statefulsets,services,poddisruptionbudgets,configmaps,pods -l "app.kubernetes.io/name=concentrator-gateway"
    absent -n "$n" configmap "$fleet-config" || fail "configmap/$fleet-config left in $n"
done
ok "fleets deleted (drain finalizer lifted); StatefulSet, Services, PDB, ConfigMap and pods collected"
for n in "$ns" "$bad_ns" "$base_ns"; do
    kubectl delete namespace "$n" --wait=false >/dev/null
done
for n in "$ns" "$bad_ns" "$base_ns"; do
    poll 120 "namespace $n to terminate" absent namespace "$n"
done
ok "test namespaces terminated"
stop_operator
# Whatever the operator did, the chart's RBAC allowed it: no request was refused by RBAC
# (its message: 'User "system:serviceaccount:..." cannot VERB resource ...'). Events refused
# in a namespace being deleted are not RBAC's doing.
if grep -Eq 'cannot [a-z]+ resource' "$work/operator.log"; then
    grep -E 'cannot [a-z]+ resource' "$work/operator.log" | tail -n 5 >&2
    fail "the operator was refused a request by RBAC (a rule the chart lacks)"
fi
ok "no request of the operator was refused by RBAC ($(wc -l <"$work/operator.log") log lines)"
# --- A namespace-scoped install (`watchNamespaces`): Roles and RoleBindings only, in the
# release namespace and each watched one; the operator works with them alone and leaves
# every other namespace alone.
for n in "$scoped_rel" "$scoped_ns" "$other_ns"; do
    kubectl create namespace "$n" >/dev/null
done
kubectl label namespace "$scoped_ns" pod-security.kubernetes.io/enforce=privileged >/dev/null
"$HELM" install scoped charts/concentrator -n "$scoped_rel" --skip-crds --set "watchNamespaces={$scoped_ns}" \
    --timeout 2m >/dev/null
none_left clusterroles,clusterrolebindings -l app.kubernetes.io/instance=scoped \
    || fail "the namespace-scoped install made cluster-wide RBAC: $(kubectl get clusterroles,clusterrolebindings -l app.kubernetes.io/instance=scoped -o name)"
[ -n "$(kubectl -n "$scoped_ns" get roles,rolebindings -l app.kubernetes.io/instance=scoped -o name)" ] \
    || fail "the namespace-scoped install made no Role in $scoped_ns"
sa_kubeconfig scoped-operator "$scoped_rel" "$work/scoped.kubeconfig"
as_scoped() { kubectl --kubeconfig "$work/scoped.kubeconfig" "$@"; }
[ "$(as_scoped auth can-i watch secrets -n "$scoped_ns" 2>/dev/null)" = yes ] || fail "scoped operator: cannot watch Secrets in $scoped_ns"
[ "$(as_scoped auth can-i get secrets -n "$other_ns" 2>/dev/null)" = no ] || fail "scoped operator: can read Secrets in $other_ns"
[ "$(as_scoped auth can-i list gatewayfleets.vpn.concentrator.io -A 2>/dev/null)" = no ] || fail "scoped operator: can list fleets cluster-wide"
KUBECONFIG="$work/scoped.kubeconfig" POD_NAME=e2e-scoped POD_NAMESPACE="$scoped_rel" WATCH_NAMESPACES="$scoped_ns" \
    RUST_LOG="${OPERATOR_LOG:-info,kube=warn}" \
    "$OPERATOR" --metrics-listen "127.0.0.1:$((metrics_port + 1))" --log-format json >"$work/scoped.log" 2>&1 &
op_pid=$!
poll 60 "the scoped operator to take its Lease" \
    is e2e-scoped get lease concentrator-operator -n "$scoped_rel" -o jsonpath='{.spec.holderIdentity}'
for n in "$scoped_ns" "$other_ns"; do
    minimal_fleet "$n"
done
kubectl -n "$scoped_ns" wait --for=condition=Ready "gwf/$fleet" --timeout=60s >/dev/null \
    || fail "the scoped operator did not reconcile gwf/$scoped_ns/$fleet"
[ "$(kubectl -n "$scoped_ns" get sts "$fleet" -o jsonpath='{.spec.replicas}')" = 1 ] || fail "no StatefulSet in $scoped_ns"
# The fleet outside its namespaces: untouched (no status, no finalizer, no StatefulSet), by the
# time the one inside was done.
[ -z "$(kubectl -n "$other_ns" get gwf "$fleet" -o jsonpath='{.status}{.metadata.finalizers}')" ] \
    || fail "the scoped operator touched gwf/$other_ns/$fleet"
absent -n "$other_ns" sts "$fleet" || fail "the scoped operator made a StatefulSet in $other_ns"
kubectl -n "$scoped_ns" delete gwf "$fleet" --timeout=60s >/dev/null || fail "gwf/$scoped_ns/$fleet was not deleted (finalizer)"
stop_operator
if grep -Eq 'cannot [a-z]+ resource' "$work/scoped.log"; then
    grep -E 'cannot [a-z]+ resource' "$work/scoped.log" | tail -n 5 >&2
    fail "the scoped operator was refused a request by RBAC"
fi
"$HELM" uninstall scoped -n "$scoped_rel" --wait --timeout 2m >/dev/null
for n in "$scoped_rel" "$scoped_ns" "$other_ns"; do
    kubectl delete namespace "$n" --wait=false >/dev/null
done
ok "namespace-scoped install (watchNamespaces): Roles only; its operator reconciled a fleet in $scoped_ns and left $other_ns alone, refused nothing by RBAC"

"$HELM" uninstall "$release" -n "$rel_ns" --wait --timeout 2m >/dev/null
sel="app.kubernetes.io/instance=$release"
none_left clusterroles,clusterrolebindings -l "$sel" || fail "helm uninstall left: $(kubectl get clusterroles,clusterrolebindings -l "$sel" -o name)"
poll 60 "the chart's namespaced objects to go" none_left -n "$rel_ns" deployments,replicasets,pods,serviceaccounts,roles,rolebindings -l "$sel"
absent -n "$rel_ns" serviceaccount "$sa" || fail "helm uninstall left serviceaccount/$sa"
# Helm keeps CRDs on uninstall by design (crds/ are never deleted); deleting them must not hang.
for n in "${crds[@]}"; do
    kubectl get crd "$n" >/dev/null || fail "CRD $n vanished with helm uninstall (Helm keeps crds/)"
done
kubectl delete crd "${crds[@]}" --timeout=60s >/dev/null || fail "the CRDs were not deleted within 60 s"
kubectl delete namespace "$rel_ns" --wait=false >/dev/null
poll 120 "namespace $rel_ns to terminate" absent namespace "$rel_ns"
ok "helm uninstall left no chart object; CRDs and the release namespace deleted without hanging"
