#!/usr/bin/env bash
# Builds the test container images locally (there is no registry access):
#
#   <out>/rootfs/            busybox (Debian's busybox-static) with every applet,
#                            /usr/bin/capsid-check, users root, capsid (1000)
#                            and group extra (2000)
#   <out>/busybox.oci.tar    an OCI image layout of it, runs as root
#   <out>/busybox-user.oci.tar  the same layer, runs as capsid (1000:1000)
#   <out>/pause.oci.tar      the same layer as a pod's pause image
#                            (docker.io/capsid/pause:latest): a shell that
#                            sleeps until SIGTERM or SIGINT, then exits 0
#
# Reproducible: sorted tar entries, fixed times and owners, gzip -n.
#   images/test-images.sh OUT_DIR CHECKER_BINARY
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/../scripts/lib.sh"
[ $# -eq 2 ] || die "usage: $0 OUT_DIR CHECKER_BINARY"
out=$1 checker=$2
ensure_packages busybox-static

stage=$(mktemp -d "${out%/}.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/rootfs
mkdir -p "$root"/{bin,usr/bin,etc,proc,sys,dev,run,var,root,home/capsid,tmp}
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
install -m 0755 "$checker" "$root/usr/bin/capsid-check"
cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
capsid:x:1000:1000:capsid:/home/capsid:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
capsid:x:1000:
extra:x:2000:capsid
nogroup:x:65534:
GROUP
chown 1000:1000 "$root/home/capsid"
find "$root" -exec touch -h -d @0 {} +

# One layer, two image configs.
blobs=$stage/blobs/sha256
mkdir -p "$blobs"
tar --sort=name --numeric-owner --mtime=@0 --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$root" -cf "$stage/layer.tar" .
diff_id=$(sha256sum "$stage/layer.tar" | cut -d' ' -f1)
gzip -n -9 < "$stage/layer.tar" > "$stage/layer.tar.gz"
layer=$(sha256sum "$stage/layer.tar.gz" | cut -d' ' -f1)
mv "$stage/layer.tar.gz" "$blobs/$layer"
layer_size=$(stat -c %s "$blobs/$layer")

blob() { # FILE -> prints "digest size", moves FILE into blobs
    local digest size
    digest=$(sha256sum "$1" | cut -d' ' -f1)
    size=$(stat -c %s "$1")
    mv "$1" "$blobs/$digest"
    echo "$digest $size"
}

image() { # NAME USER [CMD as a JSON array]
    local name=$1 user=$2 cmd=${3:-'["/bin/sh"]'} layout=$stage/$1 config manifest
    printf '{"architecture":"amd64","os":"linux","config":{"User":"%s","Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
        "$user" "$cmd" "$diff_id" > "$stage/config.json"
    read -r config config_size < <(blob "$stage/config.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
        "$config" "$config_size" "$layer" "$layer_size" > "$stage/manifest.json"
    read -r manifest manifest_size < <(blob "$stage/manifest.json")
    mkdir -p "$layout/blobs/sha256"
    for d in "$config" "$manifest" "$layer"; do cp "$blobs/$d" "$layout/blobs/sha256/$d"; done
    printf '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"latest","io.containerd.image.name":"docker.io/capsid/%s:latest"}}]}' \
        "$manifest" "$manifest_size" "$name" > "$layout/index.json"
    find "$layout" -exec touch -h -d @0 {} +
    tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$layout" -cf "$stage/$name.oci.tar" .
}
image busybox ""
image busybox-user "1000:1000"
# As PID 1 of its namespace the shell gets only the signals it handles.
image pause "" '["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]'

mkdir -p "$out"
rm -rf "$out/rootfs"
mv "$root" "$out/rootfs"
mv "$stage/busybox.oci.tar" "$stage/busybox-user.oci.tar" "$stage/pause.oci.tar" "$out/"
log "test images: $out (rootfs $(du -sh "$out/rootfs" | cut -f1), busybox.oci.tar, busybox-user.oci.tar, pause.oci.tar)"
