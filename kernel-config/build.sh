#!/usr/bin/env bash
# Builds the capsid guest kernel (an uncompressed x86_64 `vmlinux` with a PVH
# entry point) from Debian's linux-source package and the fragments beside this
# script, merged over `make tinyconfig`.
#
# The result is cached under $CAPSID_CACHE/kernel/<key>/, where <key> hashes the
# fragments, this script, the source package version and the compiler version,
# so a second run with nothing changed returns at once. Progress goes to stderr;
# the path of the vmlinux is the only thing printed on stdout.
#
#   kernel-config/build.sh            build (or reuse) and print the vmlinux path
#   kernel-config/build.sh --key      print the cache key only
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../scripts/lib.sh
. "$here/../scripts/lib.sh"

source_pkg=linux-source-6.12
cache=$(capsid_cache)

ensure_packages "$source_pkg" build-essential flex bison bc libelf-dev cpio xz-utils
source_version=$(dpkg-query -W -f='${Version}' "$source_pkg")
compiler=$(gcc --version | head -n1)

key=$( {
    echo "$source_pkg $source_version"
    echo "$compiler"
    cat "$here/build.sh"
    for f in "$here"/fragments/*.config; do echo "== $(basename "$f")"; cat "$f"; done
} | sha256sum | cut -c1-16)

if [ "${1:-}" = "--key" ]; then echo "$key"; exit 0; fi

out="$cache/kernel/$key"
if [ -f "$out/vmlinux" ]; then
    log "guest kernel: cached ($out/vmlinux)"
    echo "$out/vmlinux"
    exit 0
fi

src="$cache/src/$source_pkg-$source_version"
if [ ! -f "$src/.extracted" ]; then
    log "guest kernel: extracting $source_pkg $source_version"
    rm -rf "$src" && mkdir -p "$src"
    tar -xJf "/usr/src/$source_pkg.tar.xz" -C "$src" --strip-components=1
    touch "$src/.extracted"
fi

# Build in a scratch directory next to the result, then move it into place, so
# an interrupted build never leaves a half-made cache entry.
work="$cache/kernel/.build-$key"
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

log "guest kernel: configuring (tinyconfig + $(ls "$here"/fragments/*.config | wc -l) fragments)"
make -s -C "$src" O="$work" tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$work" "$work/.config" "$here"/fragments/*.config >/dev/null
make -s -C "$src" O="$work" olddefconfig >/dev/null

# Every option the fragments ask for must survive olddefconfig; a silently
# dropped option (an unmet dependency) is a bug in the fragments.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=n) opt=${line%%=*}
            if grep -q "^$opt=" "$work/.config"; then
                log "  wanted off but set: $(grep "^$opt=" "$work/.config")"; missing=1
            fi ;;
        CONFIG_*=*)
            if ! grep -qxF "$line" "$work/.config"; then
                log "  wanted $line, got: $(grep "^${line%%=*}=" "$work/.config" || echo 'not set')"; missing=1
            fi ;;
    esac
done < <(cat "$here"/fragments/*.config)
[ "$missing" = 0 ] || die "guest kernel: the fragments ask for options the kernel did not accept (see above)"

jobs=$(nproc)
log "guest kernel: compiling vmlinux with $jobs jobs (about 5-10 minutes on 2 cores the first time)"
start=$(date +%s)
# Progress: one line every 20 s with the number of files compiled so far.
make -C "$src" O="$work" -j"$jobs" vmlinux 2>&1 | tee "$work/build.log" | awk -v start="$start" '
    / (CC|AS|LD|AR)  / { n++ }
    { now = systime(); if (now - last >= 20) { last = now; printf "  ... %d files compiled, %d s\n", n, now - start > "/dev/stderr"; fflush("/dev/stderr") } }
' || true
[ -f "$work/vmlinux" ] || { tail -n 40 "$work/build.log" >&2; die "guest kernel: build failed (log above)"; }

mkdir -p "$out.tmp"
cp "$work/vmlinux" "$out.tmp/vmlinux"
cp "$work/.config" "$out.tmp/config"
echo "$source_pkg $source_version" > "$out.tmp/source"
rm -rf "$out" && mv "$out.tmp" "$out"
log "guest kernel: built in $(( $(date +%s) - start )) s, $(du -h "$out/vmlinux" | cut -f1): $out/vmlinux"
echo "$out/vmlinux"
