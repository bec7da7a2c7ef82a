# Builds (or reuses) everything the end-to-end tests need and exports its
# location in CAPSID_* variables. Sourced by test.sh and demo.sh.

ensure_packages build-essential qemu-system-x86 busybox-static jq erofs-utils e2fsprogs libseccomp-dev containerd runc nftables \
    containernetworking-plugins protobuf-compiler runsc

log "==> guest kernel"
CAPSID_KERNEL=$(kernel-config/build.sh)
export CAPSID_KERNEL

log "==> guest programs (static): capsid-agent, test init, capsid-check"
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release -p capsid-agent -p capsid-test-init --target x86_64-unknown-linux-gnu
static_dir=$PWD/target/x86_64-unknown-linux-gnu/release
for program in capsid-agent capsid-test-init capsid-check; do
    ldd "$static_dir/$program" 2>&1 | grep -qE 'not a dynamic|statically linked' \
        || die "$static_dir/$program is not statically linked"
done
CAPSID_TEST_INIT=$static_dir/capsid-test-init
export CAPSID_TEST_INIT

log "==> images: agent initramfs, test images, test rootfs (erofs)"
cargo build --quiet --release -p capsid-images
mkdir -p target/images
CAPSID_AGENT_INITRAMFS=$PWD/target/images/capsid-initramfs.cpio
initramfs_bytes=$(target/release/capsid-image initramfs --agent "$static_dir/capsid-agent" --out "$CAPSID_AGENT_INITRAMFS")
log "    guest initramfs: $((initramfs_bytes / 1024)) KiB (agent $(( $(stat -c %s "$static_dir/capsid-agent") / 1024)) KiB)"
images/test-images.sh target/images/test "$static_dir/capsid-check"
CAPSID_TEST_ROOTFS_IMAGE=$(target/release/capsid-image rootfs target/images/test/rootfs)
# A small writable data disk (ext4) for the extra-disk mount test.
mkdir -p target/images/data
echo "seed from the host" > target/images/data/seed.txt
CAPSID_TEST_DATA_IMAGE=$(target/release/capsid-image rootfs --format ext4 target/images/data)
export CAPSID_AGENT_INITRAMFS CAPSID_TEST_ROOTFS_IMAGE CAPSID_TEST_DATA_IMAGE

log "==> capsid-vmm and containerd shim (release, as deployed), capsid CLI"
cargo build --quiet --release -p capsid-vmm -p capsid-shim -p capsid-cli
CAPSID_VMM=$PWD/target/release/capsid-vmm
CAPSID_SHIM=$PWD/target/release/containerd-shim-capsid-v2
CAPSID_CLI=$PWD/target/release/capsid
CAPSID_TEST_ROOTFS_DIR=$PWD/target/images/test/rootfs
CAPSID_TEST_IMAGES_DIR=$PWD/target/images/test
# An OCI layout directory (what `capsid run --image` takes), from the tar.
rm -rf "$CAPSID_TEST_IMAGES_DIR/busybox-user.oci"
mkdir -p "$CAPSID_TEST_IMAGES_DIR/busybox-user.oci"
tar -xf "$CAPSID_TEST_IMAGES_DIR/busybox-user.oci.tar" -C "$CAPSID_TEST_IMAGES_DIR/busybox-user.oci"
export CAPSID_VMM CAPSID_CLI CAPSID_SHIM CAPSID_TEST_ROOTFS_DIR CAPSID_TEST_IMAGES_DIR

log "==> nested test host kernel (Debian cloud kernel)"
CAPSID_TESTHOST_KERNEL_DIR=$(tests/testhost/fetch-kernel.sh)
CAPSID_CLOUD_KERNEL=$(ls "$CAPSID_TESTHOST_KERNEL_DIR"/boot/vmlinuz-*)
export CAPSID_TESTHOST_KERNEL_DIR CAPSID_CLOUD_KERNEL

# Builds the e2e test binary and prints its path.
e2e_test_binary() {
    cargo test --quiet -p capsid-e2e --no-run --message-format=json 2>/dev/null \
        | jq -r 'select(.reason == "compiler-artifact" and .profile.test == true and .target.kind == ["test"]) | .executable' \
        | tail -n 1
}

# Runs a command where real guests boot: directly on a native KVM host, or
# inside the nested test host. Usage: run_with_kvm [--with PATH]... -- CMD...
# The artefacts above are always available to the command.
run_with_kvm() {
    cargo build --quiet -p capsid-testbed
    CAPSID_E2E_REQUIRED=1 target/debug/capsid-testbed run \
        --with /usr/bin/qemu-system-x86_64 --with /usr/share/qemu --with /usr/share/seabios \
        --with "$CAPSID_KERNEL" --with "$CAPSID_TEST_INIT" --with "$CAPSID_CLOUD_KERNEL" \
        --with "$CAPSID_VMM" --with "$CAPSID_AGENT_INITRAMFS" --with "$CAPSID_TEST_ROOTFS_IMAGE" --with "$CAPSID_TEST_DATA_IMAGE" \
        --with "$CAPSID_CLI" --with "$CAPSID_TEST_ROOTFS_DIR" --with /usr/bin/mkfs.erofs --with /usr/sbin/mke2fs --with /usr/sbin/mkfs.ext4 \
        --with "$CAPSID_SHIM" --with "$CAPSID_TEST_IMAGES_DIR/busybox.oci.tar" --with "$CAPSID_TEST_IMAGES_DIR/busybox-user.oci.tar" --with "$CAPSID_TEST_IMAGES_DIR/busybox-user.oci" --with /usr/bin/containerd --with /usr/bin/ctr --with /usr/sbin/nft \
        --with "$CAPSID_TEST_IMAGES_DIR/pause.oci.tar" \
        --with /usr/lib/cni/bridge --with /usr/lib/cni/host-local --with /usr/lib/cni/loopback \
        --with /usr/sbin/runc --with /usr/bin/containerd-shim-runc-v2 --with /usr/bin/runsc \
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
    cargo build --quiet -p capsid-bench
    echo "$PWD/target/debug/capsid-bench"
}

# Builds the soak and prints its path.
soak_binary() {
    cargo build --quiet -p capsid-e2e --bin capsid-soak
    echo "$PWD/target/debug/capsid-soak"
}
