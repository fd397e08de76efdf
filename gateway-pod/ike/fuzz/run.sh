#!/bin/bash
# Runs every cargo-fuzz target of concentrator-ike for SECONDS each (default 60) and exits
# non-zero on the first finding (crash, panic, failed round-trip assertion, timeout or OOM);
# the input is then in artifacts/<target>/ and `cargo fuzz run <target> <file>` replays it.
#
# Seeds are read from seeds/<target>/ (checked in); inputs the fuzzer finds go to corpus/<target>/
# (ignored by git). The machine has only a stable toolchain: RUSTC_BOOTSTRAP=1 lets it accept the
# -Z flags cargo-fuzz passes (sanitizer, coverage instrumentation).
set -euo pipefail
secs=${1:-60}
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target"
    echo "== fuzzing $target for ${secs}s"
    cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
echo "== no findings"
