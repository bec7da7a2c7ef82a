#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each, or until it
# ran RUNS inputs if that comes first, and prints how many inputs each ran:
# `make fuzz SECONDS=1800 RUNS_FUZZ=5000000`. The test command runs
# each for a few seconds so none rots. Seeds are in fuzz/corpus/TARGET (see
# fuzz/seeds.py); what a run learns goes to fuzz/target/corpus/TARGET, and
# a crash to fuzz/artifacts/TARGET — the run then fails and names the file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
seconds=${1:-60}
runs=${2:-0}
ensure_packages build-essential libseccomp-dev
fuzz_version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$fuzz_version"; then
    log "installing cargo-fuzz $fuzz_version (crates.io)"
    cargo install --quiet --locked cargo-fuzz --version "$fuzz_version"
fi
cd fuzz
# The installed stable toolchain, with the nightly-only flags libFuzzer's
# instrumentation needs. No sanitizer: the code is Rust, and the checks we
# want (overflow, debug assertions, our own asserts) stay on.
export RUSTC_BOOTSTRAP=1
cargo fuzz build --release --debug-assertions --sanitizer none
summary=()
for target in $(cargo fuzz list); do
    work=target/corpus/$target
    mkdir -p "$work" "artifacts/$target"
    log "==> fuzz $target for ${seconds} s"
    output=$(cargo fuzz run --release --debug-assertions --sanitizer none "$target" "$work" "corpus/$target" -- \
        -max_total_time="$seconds" -runs="${runs/#0/-1}" -max_len=65536 -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 2>&1) || {
        printf '%s\n' "$output" | tail -n 40 >&2
        die "fuzz target $target failed (its crashing input is in fuzz/artifacts/$target)"
    }
    done_runs=$(printf '%s\n' "$output" | awk '/stat::number_of_executed_units/ {print $NF}')
    rate=$(printf '%s\n' "$output" | awk '/stat::average_exec_per_sec/ {print $NF}')
    took=$(printf '%s\n' "$output" | awk '/^Done [0-9]+ runs in/ {print $5}')
    summary+=("$(printf '%-16s %12s inputs in %6s s (%s/s), no crash' "$target" "${done_runs:-?}" "${took:-?}" "${rate:-?}")")
done
log "==> fuzzing done:"
printf '    %s\n' "${summary[@]}" >&2
