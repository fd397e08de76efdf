#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit and integration tests, and the e2e tests
# (strongSwan sites in network namespaces, private MariaDB and etcd instances: run as root).
# Installs whatever is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages build-essential pkg-config ca-certificates \
    strongswan-charon strongswan-swanctl libcharon-extra-plugins \
    mariadb-server etcd-server nftables conntrack iproute2 iperf3 iputils-ping procps python3 curl tcpdump \
    protobuf-compiler libprotobuf-dev libstrongswan-standard-plugins
ensure_rust
# Debian's mariadb-server and etcd-server packages start system services; the tests start
# their own private instances and never rely on these.

if [ "$(id -u)" -ne 0 ]; then
    echo "NOTE: not root: the e2e tests will be skipped (they need network namespaces)."
fi

start=$(date +%s)
step() { echo; echo "==> $* ($(( $(date +%s) - start ))s)"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --locked --workspace --no-fail-fast

step "crdgen leaves crds/ unchanged"
cargo run --locked -q -p concentrator-crds --bin crdgen >/dev/null
if [ -n "$(git status --porcelain -- crds charts/concentrator/crds)" ]; then
    git status --short -- crds charts/concentrator/crds
    echo "crds/ is stale: commit the output of 'cargo run -p concentrator-crds --bin crdgen'" >&2
    exit 1
fi

step "fuzz the IKEv2 codec (${FUZZ_SECONDS:-20}s per target)"
# Own target dir: sanitizer flags would otherwise invalidate the main build cache.
CARGO_TARGET_DIR="$CARGO_TARGET_DIR-fuzz" gateway-pod/ike/fuzz/run.sh "${FUZZ_SECONDS:-20}"

step "helm lint --strict, helm template, schema checks, snapshot"
ensure_helm
ensure_kubernetes_validate
rendered_dir=$(mktemp -d)
trap 'rm -rf "$rendered_dir"' EXIT
for values in "" charts/concentrator/ci/*-values.yaml; do
    args=(); [ -n "$values" ] && args=(-f "$values")
    "$HELM" lint --strict charts/concentrator "${args[@]}"
    out="$rendered_dir/chart-$(basename "${values:-default}" .yaml).yaml"
    "$HELM" template concentrator charts/concentrator --namespace concentrator --include-crds "${args[@]}" >"$out"
done
for kind in CustomResourceDefinition Deployment ServiceAccount ClusterRole ClusterRoleBinding Role RoleBinding; do
    grep -q "^kind: $kind\$" "$rendered_dir/chart-default.yaml" || { echo "helm template renders no $kind" >&2; exit 1; }
done
# watchNamespaces: a Role and RoleBinding in each listed namespace, with the ClusterRole's rules,
# the operator told which namespaces, and nothing cluster-wide.
"$(dirname "$KVALIDATE")/python" - "$rendered_dir/chart-default.yaml" "$rendered_dir/chart-namespaced-values.yaml" \
    charts/concentrator/ci/namespaced-values.yaml <<'PY'
import sys, yaml
default, namespaced, values = sys.argv[1:]
wanted = yaml.safe_load(open(values))["watchNamespaces"]
assert wanted, "ci/namespaced-values.yaml lists no namespace"
docs = [d for d in yaml.safe_load_all(open(namespaced)) if d]
rules = next(d["rules"] for d in yaml.safe_load_all(open(default)) if d and d["kind"] == "ClusterRole")
for kind in ("ClusterRole", "ClusterRoleBinding"):
    assert not any(d["kind"] == kind for d in docs), f"watchNamespaces renders a {kind}"
for ns in wanted:
    for kind in ("Role", "RoleBinding"):
        found = [d for d in docs if d["kind"] == kind and d["metadata"].get("namespace") == ns
                 and d["metadata"]["name"] == "concentrator-operator"]
        assert found, f"watchNamespaces renders no {kind} in {ns}"
        if kind == "Role":
            assert found[0]["rules"] == rules, f"the Role in {ns} has other rules than the ClusterRole"
env = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
assert {"name": "WATCH_NAMESPACES", "value": ",".join(wanted)} in env, env
PY
# values.schema.json must refuse bad values.
if "$HELM" template concentrator charts/concentrator --set operator.logFormat=xml >/dev/null 2>&1; then
    echo "values.schema.json accepted operator.logFormat=xml" >&2
    exit 1
fi
# The chart's own fleet outside the watched namespaces would never be reconciled: refused.
if out=$("$HELM" template concentrator charts/concentrator --namespace rel --set fleet.create=true \
    --set 'fleet.etcd.endpoints={http://etcd:2379}' --set 'watchNamespaces={vpn-a}' 2>&1); then
    echo "the chart accepted fleet.create in a namespace watchNamespaces does not list" >&2
    exit 1
fi
[[ $out == *"watchNamespaces does not list"* ]] || { echo "unexpected refusal: $out" >&2; exit 1; }
# GatewayFleets the chart creates must pass our own validation (the CRD's rules in Rust).
fleet_dir="$rendered_dir/fleets"
mkdir -p "$fleet_dir"
"$(dirname "$KVALIDATE")/python" - "$rendered_dir" "$fleet_dir" <<'PY'
import glob, os, sys, yaml
src, dst = sys.argv[1], sys.argv[2]
n = 0
for f in glob.glob(os.path.join(src, "chart-*.yaml")):
    for doc in yaml.safe_load_all(open(f)):
        if doc and doc.get("kind") == "GatewayFleet":
            n += 1
            yaml.safe_dump(doc, open(os.path.join(dst, f"fleet-{n}.yaml"), "w"))
if n == 0:
    sys.exit("no GatewayFleet rendered by any values file")
PY
cargo run --locked -q -p concentrator-gateway -- --config-dir "$fleet_dir" --check
# What the operator builds for a fleet, checked against the same Kubernetes schemas.
cargo run --locked -q -p concentrator-operator -- render \
    --fleet examples/kubernetes/fleet.yaml --config-dir examples >"$rendered_dir/fleet.yaml"
"$KVALIDATE" -k 1.33.0 --strict --quiet "$rendered_dir"/*.yaml
# Any change to the rendered chart must be deliberate: UPDATE_SNAPSHOTS=1 rewrites the snapshot.
snapshot=charts/concentrator/tests/snapshot-default.yaml
if [ "${UPDATE_SNAPSHOTS:-}" = 1 ]; then
    cp "$rendered_dir/chart-default.yaml" "$snapshot"
fi
diff -u "$snapshot" "$rendered_dir/chart-default.yaml" || {
    echo "helm template output changed; if intended, run UPDATE_SNAPSHOTS=1 scripts/test-all.sh and commit $snapshot" >&2
    exit 1
}

step "e2e on a real Kubernetes cluster (e2e/k8s/cluster.sh: control plane, then a node; root only)"
if [ "$(id -u)" -eq 0 ]; then
    # Builds Kubernetes from its Go modules on the first run (cached by version under
    # /var/cache/concentrator/k8s), starts etcd, kube-apiserver, controller-manager and
    # scheduler (tier 1: e2e/k8s/control-plane.sh), then a node in a network namespace of its own
    # (containerd, runc, CNI bridge, kubelet, kube-proxy nftables, CoreDNS; tier 2:
    # e2e/k8s/pods.sh); always torn down.
    ensure_packages openssl containerd runc containernetworking-plugins busybox-static util-linux gcc libc6-dev
    cargo build --locked -q -p concentrator-operator -p concentrator-gateway -p kubectl-concentrator
    trap 'e2e/k8s/cluster.sh down; rm -rf "$rendered_dir"' EXIT
    e2e/k8s/cluster.sh up
    (
        eval "$(e2e/k8s/cluster.sh env)"
        HELM="$HELM" OPERATOR="$CARGO_TARGET_DIR/debug/concentrator-operator" e2e/k8s/run.sh
    )
    e2e/k8s/cluster.sh node up
    (
        eval "$(e2e/k8s/cluster.sh env)"
        HELM="$HELM" GATEWAY="$CARGO_TARGET_DIR/debug/concentrator-gateway" \
            OPERATOR="$CARGO_TARGET_DIR/debug/concentrator-operator" \
            PLUGIN="$CARGO_TARGET_DIR/debug/kubectl-concentrator" e2e/k8s/run.sh
    )
    e2e/k8s/cluster.sh down
    trap 'rm -rf "$rendered_dir"' EXIT
else
    echo "SKIP: e2e/k8s/cluster.sh needs root"
    e2e/k8s/run.sh
fi

step "done"
