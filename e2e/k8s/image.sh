#!/usr/bin/env bash
# Builds a container image without a registry or a Docker engine: a root filesystem with the
# given executables, the shared libraries each needs (as ldd lists them: the dynamic loader,
# libc, libgcc_s, ...), minimal /etc/passwd and /etc/group, written as one layer in a
# `docker save` archive, which `ctr images import` takes. No base image, no package manager, no
# shell unless one is asked for (busybox).
#
#   e2e/k8s/image.sh -o OUT.tar -n NAME [-e ENTRYPOINT] [-u UID] [-s] [-b] SRC[=DEST]...
#
#   -o OUT.tar     the archive to write
#   -n NAME        the image reference, e.g. docker.io/library/concentrator-gateway:e2e (what a
#                  pod's `image: concentrator-gateway:e2e` means to the container runtime)
#   -e PATH        the entrypoint (default: the first file's DEST)
#   -u UID         the user it runs as (numeric; default 0)
#   -s             strip the executables' debug information (debug builds are ~300 MB)
#   -b             add busybox (Debian busybox-static) and its applets in /bin: sh, ip, ping,
#                  nc, sleep, ...
#   SRC[=DEST]     a file; DEST defaults to /usr/local/bin/<name of SRC>
set -euo pipefail

out='' name='' entrypoint='' user=0 strip=no busybox=no
usage() { sed -n '2,20p' "$0" >&2; exit 2; }
while getopts o:n:e:u:sbh opt; do
    case $opt in
        o) out=$OPTARG ;;
        n) name=$OPTARG ;;
        e) entrypoint=$OPTARG ;;
        u) user=$OPTARG ;;
        s) strip=yes ;;
        b) busybox=yes ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
if [ -z "$out" ] || [ -z "$name" ] || { [ $# -eq 0 ] && [ "$busybox" = no ]; }; then usage; fi
[[ $user =~ ^[0-9]+$ ]] || { echo "image.sh: -u takes a numeric user ID" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{etc,tmp,bin,usr/local/bin} "$root/var/tmp"
chmod 1777 "$root/tmp" "$root/var/tmp"

# The libraries an ELF file loads, at their paths on this machine (the image has the same ones).
libs() {
    ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' || true
}

add() { # src dest
    local src=$1 dest=$2 lib
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$src" "$root$dest"
    if file -L "$src" | grep -q ELF; then
        if [ "$strip" = yes ]; then strip --strip-debug "$root$dest"; fi
        for lib in $(libs "$src"); do
            if [ ! -e "$root$lib" ]; then
                mkdir -p "$root$(dirname "$lib")"
                cp -L "$lib" "$root$lib"
            fi
        done
    fi
}

first=
for arg in "$@"; do
    src=${arg%%=*}
    dest=/usr/local/bin/$(basename "$src")
    [[ $arg == *=* ]] && dest=${arg#*=}
    [ -e "$src" ] || { echo "image.sh: $src does not exist" >&2; exit 1; }
    add "$src" "$dest"
    [ -n "$first" ] || first=$dest
done
if [ "$busybox" = yes ]; then
    [ -x /bin/busybox ] || { echo "image.sh: -b needs /bin/busybox (apt-get install busybox-static)" >&2; exit 1; }
    file -L /bin/busybox | grep -q 'statically linked' || { echo "image.sh: /bin/busybox is not static (install busybox-static)" >&2; exit 1; }
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
    [ -n "$first" ] || first=/bin/sh
fi
entrypoint=${entrypoint:-$first}
# Root and the distroless `nonroot` user (65532), which the chart's operator pods run as.
printf 'root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"

# One layer; owners 0:0 and a fixed mtime, so the same files give the same digest.
tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$root" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
mkdir -p "$work/image"
mv "$work/layer.tar" "$work/image/$diff_id.tar"
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed 's/[\\"]/\\&/g')"; }
cat >"$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z",
 "config":{"Entrypoint":[$(json_str "$entrypoint")],"User":"$user",
           "Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
           "WorkingDir":"/"},
 "rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]},
 "history":[{"created":"1970-01-01T00:00:00Z","created_by":"e2e/k8s/image.sh"}]}
JSON
config_id=$(sha256sum "$work/config.json" | cut -d' ' -f1)
mv "$work/config.json" "$work/image/$config_id.json"
cat >"$work/image/manifest.json" <<JSON
[{"Config":"$config_id.json","RepoTags":[$(json_str "$name")],"Layers":["$diff_id.tar"]}]
JSON
mkdir -p "$(dirname "$out")"
tar --numeric-owner --owner=0 --group=0 -C "$work/image" -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "image.sh: $name -> $out ($(du -h "$out" | cut -f1))" >&2
