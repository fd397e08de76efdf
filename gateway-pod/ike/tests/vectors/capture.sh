#!/bin/bash
# Regenerates the strongswan-*.hex test vectors in OUT_DIR (default: .): runs one strongSwan-to-
# strongSwan IKE_SA_INIT + IKE_AUTH (PSK) in two throwaway network namespaces, sniffs the UDP
# payloads (port 4500's zero marker stripped) and takes the plaintext of the SK payloads from
# charon's "enc = 4" log (*-plain.hex: the inner payload chain, without padding). Needs root,
# charon, swanctl and python3. Not run by the tests; the vectors are checked in. The vectors in
# the repository came from Debian 12's strongswan 5.9.8.
set -euo pipefail
OUT=${1:-.}
CHARON=${CHARON:-/usr/lib/ipsec/charon}
W=$(mktemp -d)
A=ikecap-a-$$ B=ikecap-b-$$
cleanup() {
    for ns in $A $B; do
        for p in $(ip netns pids $ns 2>/dev/null); do kill $p 2>/dev/null || true; done
    done
    sleep 0.5
    ip netns del $A 2>/dev/null || true
    ip netns del $B 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
ip netns add $A
ip netns add $B
ip link add vA netns $A type veth peer name vB netns $B
ip -n $A addr add 192.0.2.1/24 dev vA
ip -n $B addr add 192.0.2.2/24 dev vB
for ns in $A $B; do ip -n $ns link set lo up; done
ip -n $A link set vA up
ip -n $B link set vB up

conf() { # side local remote local_id remote_id local_ts remote_ts
    mkdir -p "$W/$1/swanctl"
    cat >"$W/$1/strongswan.conf" <<CONF
charon {
  load_modular = no
  load = random nonce aes sha1 sha2 hmac gcm openssl pem pkcs1 x509 pubkey kdf kernel-libipsec kernel-netlink socket-default vici
  plugins {
    vici {
      socket = unix://$W/$1/vici
    }
  }
  filelog {
    charon {
      path = $W/$1/charon.log
      enc = 4
    }
  }
}
swanctl {
  load = random nonce pem pkcs1 pkcs8 x509 pubkey openssl
  socket = unix://$W/$1/vici
}
CONF
    cat >"$W/$1/swanctl/swanctl.conf" <<CONF
connections {
  site {
    version = 2
    local_addrs = $2
    remote_addrs = $3
    proposals = aes128gcm16-prfsha256-x25519, aes256-sha256-modp2048
    fragmentation = yes
    local {
      auth = psk
      id = $4
    }
    remote {
      auth = psk
      id = $5
    }
    children {
      site {
        local_ts = $6
        remote_ts = $7
        esp_proposals = aes128gcm16
      }
    }
  }
}
secrets {
  ike-site {
    id-a = $4
    id-b = $5
    secret = 0x73656372657421
  }
}
CONF
}
conf a 192.0.2.1 192.0.2.2 site-a.example.com gw@example.com 10.1.0.0/24 10.2.0.0/24
conf b 192.0.2.2 192.0.2.1 gw@example.com site-a.example.com 10.2.0.0/24 10.1.0.0/24

ip netns exec $B python3 - "$W/capture.txt" <<'PY' &
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("vB", 0))
s.settimeout(0.5)
end = time.time() + 12
with open(sys.argv[1], "w") as out:
    while time.time() < end:
        try:
            frame = s.recv(65535)
        except socket.timeout:
            continue
        if frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ihl = (frame[14] & 15) * 4
        udp = frame[14 + ihl:]
        sport, dport, ulen = struct.unpack("!HHH", udp[:6])
        if 500 in (sport, dport) or 4500 in (sport, dport):
            out.write(f"{sport}->{dport} {udp[8:ulen].hex()}\n")
            out.flush()
PY
SNIFF=$!
sleep 0.5
for side in a b; do
    ns=$A; [ $side = b ] && ns=$B
    ip netns exec $ns env STRONGSWAN_CONF="$W/$side/strongswan.conf" unshare -m -- \
        sh -c 'mount -t tmpfs none /run && exec "$0"' "$CHARON" >"$W/$side/out" 2>&1 &
done
for side in a b; do
    for _ in $(seq 50); do [ -S "$W/$side/vici" ] && break; sleep 0.1; done
    ns=$A; [ $side = b ] && ns=$B
    (cd "$W/$side/swanctl" && ip netns exec $ns env STRONGSWAN_CONF="$W/$side/strongswan.conf" \
        swanctl --load-all --file "$W/$side/swanctl/swanctl.conf" >/dev/null)
done
ip netns exec $A env STRONGSWAN_CONF="$W/a/strongswan.conf" swanctl --initiate --child site --timeout 10 || true
wait $SNIFF || true
python3 - "$W/capture.txt" "$W/a/charon.log" "$OUT" <<'PY'
import re, sys
cap, log, out = sys.argv[1:]
names = ["ike-sa-init-request", "ike-sa-init-response", "ike-auth-request", "ike-auth-response",
         "informational-request"]
for line, name in zip(open(cap).read().splitlines(), names):
    ports, data = line.split()
    if ports.startswith("4500"):
        data = data[8:]
    open(f"{out}/strongswan-{name}.hex", "w").write(data + "\n")
lines = open(log).read().splitlines()
plains = []
for i, l in enumerate(lines):
    m = re.search(r"\[ENC\] plain => (\d+) bytes", l)
    if not m:
        continue
    n, data, j = int(m.group(1)), b"", i + 1
    while len(data) < n:
        data += bytes.fromhex(re.match(r"\d+\[ENC\]\s+\d+: ((?:[0-9A-F]{2} ?)+)", lines[j]).group(1).replace(" ", ""))
        j += 1
    plains.append(data[:n])
for plain, name in zip(plains, ["ike-auth-request-plain", "ike-auth-response-plain"]):
    open(f"{out}/strongswan-{name}.hex", "w").write(plain.hex() + "\n")
PY
grep -h "IKE_SA_INIT\|IKE_AUTH\|ESTABLISHED" "$W/a/charon.log" | head -20 || true
