#!/bin/bash
# Entrypoint of the e2e site (site.Dockerfile): puts the site's inner address on lo, renders
# the swanctl.conf template for GATEWAY_ADDR and the PSK file, starts charon and loads the
# connection without initiating it (run.sh runs `swanctl --initiate`). Touches
# $SITE_RUN_DIR/ready (the readiness probe) once the connection is loaded; runs until charon
# ends.
#
#   GATEWAY_ADDR      the gateway's address (required; run.sh passes the front Service's IP)
#   SITE_ADDR         inner address put on lo, inside the child's local_ts (172.16.0.1)
#   SITE_CONF_DIR     strongswan.conf and the swanctl.conf template (/etc/site)
#   SITE_PSK_FILE     the pre-shared key, as the Secret mounts it (/etc/site-psk/psk)
#   SITE_RUN_DIR      rendered swanctl.conf and the ready marker (/run/site)
#   STRONGSWAN_CONF   read by charon and swanctl ($SITE_CONF_DIR/strongswan.conf)
set -euo pipefail

conf_dir=${SITE_CONF_DIR:-/etc/site}
psk_file=${SITE_PSK_FILE:-/etc/site-psk/psk}
run_dir=${SITE_RUN_DIR:-/run/site}
site_addr=${SITE_ADDR:-172.16.0.1}
: "${GATEWAY_ADDR:?GATEWAY_ADDR (the gateway address to initiate to) must be set}"
export STRONGSWAN_CONF=${STRONGSWAN_CONF:-$conf_dir/strongswan.conf}

mkdir -p "$run_dir"
rm -f "$run_dir/ready"
# Before charon starts: charon sources the child's route from an address inside local_ts.
ip addr replace "$site_addr/32" dev lo

# The key as hex (any bytes survive), minus one trailing newline or CRLF: the gateway reads
# Secret files the same way (gateway-pod/src/config/secrets.rs).
hex=$(od -An -v -tx1 "$psk_file" | tr -d ' \n')
case $hex in
    *0d0a) hex=${hex%0d0a} ;;
    *0a) hex=${hex%0a} ;;
esac
if [ -z "$hex" ]; then
    echo "site: $psk_file is empty" >&2
    exit 1
fi
umask 077
sed -e "s|@GATEWAY_ADDR@|$GATEWAY_ADDR|g" -e "s|@PSK_HEX@|0x$hex|g" \
    "$conf_dir/swanctl.conf" >"$run_dir/swanctl.conf"

/usr/lib/ipsec/charon &
charon=$!
trap 'kill -TERM "$charon" 2>/dev/null || true' TERM INT

up=no
for _ in $(seq 150); do
    if ! kill -0 "$charon" 2>/dev/null; then
        echo "site: charon exited during start" >&2
        wait "$charon" || true
        exit 1
    fi
    if swanctl --stats >/dev/null 2>&1; then
        up=yes
        break
    fi
    sleep 0.1
done
if [ "$up" != yes ]; then
    echo "site: charon does not answer on VICI after 15 s" >&2
    kill -TERM "$charon" 2>/dev/null || true
    exit 1
fi
swanctl --load-all --file "$run_dir/swanctl.conf"
touch "$run_dir/ready"
echo "site: charon up, connection hq loaded for gateway $GATEWAY_ADDR"

status=0
wait "$charon" || status=$?
# A TERM interrupts the first wait; charon is stopping, wait for it to finish.
if kill -0 "$charon" 2>/dev/null; then
    wait "$charon" || status=$?
fi
exit "$status"
