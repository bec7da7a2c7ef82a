#!/usr/bin/env bash
# Fetches Debian's cloud kernel package (linux-image-cloud-amd64's current
# dependency), which the nested test host boots, and extracts it into the cache
# without installing it. Prints the extracted directory on stdout.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../scripts/lib.sh
. "$here/../../scripts/lib.sh"

apt_lists_fresh || apt-get update -qq >&2
package=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$package" ] || die "cannot resolve linux-image-cloud-amd64 (is bookworm in the apt sources?)"
version=$(apt-cache policy "$package" | awk '/Candidate:/ {print $2}')
dir="$(capsid_cache)/testhost/$package-$version"
if [ ! -f "$dir/.extracted" ]; then
    log "test host kernel: downloading $package $version"
    rm -rf "$dir" && mkdir -p "$dir/deb"
    (cd "$dir/deb" && apt-get download -q "$package=$version" >&2 2>/dev/null) \
        || die "cannot download $package from the Debian archive"
    dpkg-deb -x "$dir"/deb/*.deb "$dir"
    rm -rf "$dir/deb"
    touch "$dir/.extracted"
fi
log "test host kernel: $dir"
echo "$dir"
