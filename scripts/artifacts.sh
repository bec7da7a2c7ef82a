# Builds (or reuses) everything the end-to-end tests need and exports its
# location in COCOON_* variables. Sourced by test.sh and demo.sh.

ensure_packages build-essential qemu-system-x86 busybox-static jq erofs-utils e2fsprogs libseccomp-dev containerd runc

log "==> guest kernel"
COCOON_KERNEL=$(kernel-config/build.sh)
export COCOON_KERNEL

log "==> guest programs (static): cocoon-agent, test init, cocoon-check"
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release -p cocoon-agent -p cocoon-test-init --target x86_64-unknown-linux-gnu
static_dir=$PWD/target/x86_64-unknown-linux-gnu/release
for program in cocoon-agent cocoon-test-init cocoon-check; do
    ldd "$static_dir/$program" 2>&1 | grep -qE 'not a dynamic|statically linked' \
        || die "$static_dir/$program is not statically linked"
done
COCOON_TEST_INIT=$static_dir/cocoon-test-init
export COCOON_TEST_INIT

log "==> images: agent initramfs, test images, test rootfs (erofs)"
cargo build --quiet --release -p cocoon-images
mkdir -p target/images
COCOON_AGENT_INITRAMFS=$PWD/target/images/cocoon-initramfs.cpio
initramfs_bytes=$(target/release/cocoon-image initramfs --agent "$static_dir/cocoon-agent" --out "$COCOON_AGENT_INITRAMFS")
log "    guest initramfs: $((initramfs_bytes / 1024)) KiB (agent $(( $(stat -c %s "$static_dir/cocoon-agent") / 1024)) KiB)"
images/test-images.sh target/images/test "$static_dir/cocoon-check"
COCOON_TEST_ROOTFS_IMAGE=$(target/release/cocoon-image rootfs target/images/test/rootfs)
# A small writable data disk (ext4) for the extra-disk mount test.
mkdir -p target/images/data
echo "seed from the host" > target/images/data/seed.txt
COCOON_TEST_DATA_IMAGE=$(target/release/cocoon-image rootfs --format ext4 target/images/data)
export COCOON_AGENT_INITRAMFS COCOON_TEST_ROOTFS_IMAGE COCOON_TEST_DATA_IMAGE

log "==> cocoon-vmm and containerd shim (release, as deployed), cocoon CLI"
cargo build --quiet --release -p cocoon-vmm -p cocoon-shim -p cocoon-cli
COCOON_VMM=$PWD/target/release/cocoon-vmm
COCOON_SHIM=$PWD/target/release/containerd-shim-cocoon-v2
COCOON_CLI=$PWD/target/release/cocoon
COCOON_TEST_ROOTFS_DIR=$PWD/target/images/test/rootfs
COCOON_TEST_IMAGES_DIR=$PWD/target/images/test
# An OCI layout directory (what `cocoon run --image` takes), from the tar.
rm -rf "$COCOON_TEST_IMAGES_DIR/busybox-user.oci"
mkdir -p "$COCOON_TEST_IMAGES_DIR/busybox-user.oci"
tar -xf "$COCOON_TEST_IMAGES_DIR/busybox-user.oci.tar" -C "$COCOON_TEST_IMAGES_DIR/busybox-user.oci"
export COCOON_VMM COCOON_CLI COCOON_SHIM COCOON_TEST_ROOTFS_DIR COCOON_TEST_IMAGES_DIR

log "==> nested test host kernel (Debian cloud kernel)"
COCOON_TESTHOST_KERNEL_DIR=$(tests/testhost/fetch-kernel.sh)
COCOON_CLOUD_KERNEL=$(ls "$COCOON_TESTHOST_KERNEL_DIR"/boot/vmlinuz-*)
export COCOON_TESTHOST_KERNEL_DIR COCOON_CLOUD_KERNEL

# Builds the e2e test binary and prints its path.
e2e_test_binary() {
    cargo test --quiet -p cocoon-e2e --no-run --message-format=json 2>/dev/null \
        | jq -r 'select(.reason == "compiler-artifact" and .profile.test == true and .target.kind == ["test"]) | .executable' \
        | tail -n 1
}

# Runs a command where real guests boot: directly on a native KVM host, or
# inside the nested test host. Usage: run_with_kvm [--with PATH]... -- CMD...
# The artefacts above are always available to the command.
run_with_kvm() {
    cargo build --quiet -p cocoon-testbed
    COCOON_E2E_REQUIRED=1 target/debug/cocoon-testbed run \
        --with /usr/bin/qemu-system-x86_64 --with /usr/share/qemu --with /usr/share/seabios \
        --with "$COCOON_KERNEL" --with "$COCOON_TEST_INIT" --with "$COCOON_CLOUD_KERNEL" \
        --with "$COCOON_VMM" --with "$COCOON_AGENT_INITRAMFS" --with "$COCOON_TEST_ROOTFS_IMAGE" --with "$COCOON_TEST_DATA_IMAGE" \
        --with "$COCOON_CLI" --with "$COCOON_TEST_ROOTFS_DIR" --with /usr/bin/mkfs.erofs \
        --with "$COCOON_SHIM" --with "$COCOON_TEST_IMAGES_DIR/busybox.oci.tar" --with "$COCOON_TEST_IMAGES_DIR/busybox-user.oci.tar" --with "$COCOON_TEST_IMAGES_DIR/busybox-user.oci" --with /usr/bin/containerd --with /usr/bin/ctr \
        "$@"
}

# Runs the e2e test binary with the given arguments where real guests boot.
run_e2e() {
    local binary
    binary=$(e2e_test_binary)
    [ -x "$binary" ] || die "could not build the e2e tests"
    run_with_kvm -- "$binary" "$@"
}

# Builds the benchmark harness and prints its path.
bench_binary() {
    cargo build --quiet -p cocoon-e2e --bin cocoon-bench
    echo "$PWD/target/debug/cocoon-bench"
}

# The benchmark's peers, as run_with_kvm options: runc itself and
# containerd's runc shim (Debian's runc and containerd, installed above).
bench_peers() {
    echo --with /usr/sbin/runc --with /usr/bin/containerd-shim-runc-v2
}
