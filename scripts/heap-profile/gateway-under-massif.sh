#!/bin/sh
# Runs the gateway under valgrind's massif and writes a detailed heap snapshot every 2 s
# (through vgdb) to $MASSIF_DIR/snap.N: the harness that starts the gateway kills it with
# SIGKILL, so massif's own output at exit would never be written. Use it as the gateway binary
# of a load test, then diff two snapshots per allocation site with massif_diff.py:
#
#   GATEWAY_BIN=$CARGO_TARGET_DIR/debug/concentrator-gateway MASSIF_DIR=/tmp/massif \
#   IKE_LOAD_GATEWAY_BIN=$PWD/scripts/heap-profile/gateway-under-massif.sh IKE_LOAD_HOLD_SAS=2000 \
#     cargo test -p concentrator-gateway --test initiator_load ike_establishment_rate_ours_vs -- --nocapture
#   python3 scripts/heap-profile/massif_diff.py /tmp/massif/snap.2 /tmp/massif/snap.8 2000
#
# (Each gateway the test starts numbers its snapshots from 1: the last one started leaves
# the files.)
dir="${MASSIF_DIR:-/tmp/massif}"
mkdir -p "$dir"
valgrind --tool=massif --depth=40 --threshold=0.3 --vgdb=yes \
    --massif-out-file="$dir/massif.%p.out" "${GATEWAY_BIN:?set GATEWAY_BIN}" "$@" &
vpid=$!
n=0
while kill -0 "$vpid" 2>/dev/null; do
    sleep 2
    n=$((n + 1))
    vgdb --pid="$vpid" detailed_snapshot "$dir/snap.$n" >/dev/null 2>&1
done
