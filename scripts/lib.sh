# Shared shell helpers for capsid's build and test scripts. Sourced, not run.

log() { printf '%s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Where built artefacts that outlive a checkout are cached (kernel builds,
# extracted packages). Override with CAPSID_CACHE.
capsid_cache() {
    local dir=${CAPSID_CACHE:-/var/cache/capsid}
    mkdir -p "$dir"
    echo "$dir"
}

# Installs the named Debian packages that are missing; does nothing (and needs
# no network) when all are present.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (run as root, or: apt-get install ${missing[*]})"
    log "installing Debian packages: ${missing[*]}"
    apt_lists_fresh || apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# True when apt's package lists were refreshed within the last day.
apt_lists_fresh() {
    [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -n1)" ]
}
