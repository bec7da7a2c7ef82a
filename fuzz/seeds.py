#!/usr/bin/env python3
"""Writes the seed corpora of capsid's fuzz targets into fuzz/corpus/<target>/.

Each seed is a well-formed input (or a classic hostile one) the fuzzer
mutates from: a valid virtio-blk request, a vsock connection's packets, a
driver's register sequence, API lines, protocol frames, and layer tars with
`..`, absolute paths, links out and whiteouts. Run it after changing a wire
format:  python3 fuzz/seeds.py
"""

import io
import json
import os
import struct
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


# virtio-blk: descriptor table at 0x0, available ring at 0x100, used ring
# at 0x200, buffers from 0x400 (fuzz/fuzz_targets/virtio_blk.rs).
NEXT, WRITE, INDIRECT = 1, 2, 4


def blk_request(kind, sector, descriptors, heads):
    memory = bytearray(0x2000)
    for i, (addr, length, flags, nxt) in enumerate(descriptors):
        struct.pack_into("<QIHH", memory, i * 16, addr, length, flags, nxt)
    struct.pack_into("<HH", memory, 0x100, 0, len(heads))
    for i, head in enumerate(heads):
        struct.pack_into("<H", memory, 0x104 + 2 * i, head)
    struct.pack_into("<IIQ", memory, 0x400, kind, 0, sector)
    return bytes(memory)


three = [(0x400, 16, NEXT, 1), (0x800, 512, NEXT | WRITE, 2), (0x600, 1, WRITE, 0)]
write("virtio_blk", "read", blk_request(0, 1, three, [0]))
write("virtio_blk", "write", blk_request(1, 7, [(0x400, 16, NEXT, 1), (0x800, 512, NEXT, 2), (0x600, 1, WRITE, 0)], [0]))
write("virtio_blk", "flush", blk_request(4, 0, [(0x400, 16, NEXT, 1), (0x600, 1, WRITE, 0)], [0]))
write("virtio_blk", "get-id", blk_request(8, 0, [(0x400, 16, NEXT, 1), (0x800, 20, NEXT | WRITE, 2), (0x600, 1, WRITE, 0)], [0]))
write("virtio_blk", "past-end", blk_request(0, 8, three, [0]))
write("virtio_blk", "loop", blk_request(0, 0, [(0x400, 16, NEXT, 1), (0x800, 512, NEXT | WRITE, 0)], [0, 0]))
write("virtio_blk", "indirect", blk_request(0, 0, [(0x1000, 48, INDIRECT, 0)], [0]))

# vsock: a TX chain description (9 bytes per buffer) in the first half, then
# packets (44-byte header, an RX capacity byte, the payload).
GUEST, HOST = 3, 2
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7


def vsock_header(op, length=0, src_port=5000, dst_port=1234, flags=0, buf_alloc=65536, fwd_cnt=0):
    return struct.pack("<QQIIIHHIII", GUEST, HOST, src_port, dst_port, length, 1, op, flags, buf_alloc, fwd_cnt)


def packet(op, payload=b"", capacity=64, **fields):
    return vsock_header(op, len(payload), **fields) + bytes([capacity]) + payload


chain = struct.pack("<IIB", 0x100, 44 + 5, 0) + struct.pack("<IIB", 0x200, 4096, 1)
chain = chain.ljust(0x100, b"\0") + vsock_header(RW, 5) + b"hello"
packets = (
    packet(REQUEST)
    + packet(RW, b"data for the host")
    + packet(CREDIT_UPDATE, fwd_cnt=17)
    + packet(CREDIT_REQUEST)
    + packet(SHUTDOWN, flags=3)
    + packet(RST)
    + packet(RW, b"no such connection", dst_port=9)
)
half = max(len(chain), len(packets))
write("vsock_packets", "connection", chain.ljust(half, b"\0") + packets.ljust(half, b"\0"))

# MMIO: 9-byte operations (kind: bit 0 write, high nibble width; offset;
# value): a driver negotiating, setting up queue 0 and starting the device.
def op(write_, offset, value, width=4):
    return bytes([(width << 4) | int(write_)]) + struct.pack("<II", offset, value)


negotiate = b"".join(
    [
        op(False, 0x000, 0),
        op(False, 0x008, 0),
        op(True, 0x070, 1),
        op(True, 0x070, 3),
        op(True, 0x024, 1),
        op(True, 0x020, 1),
        op(True, 0x070, 11),
        op(True, 0x030, 0),
        op(False, 0x034, 0),
        op(True, 0x038, 16),
        op(True, 0x080, 0x1000),
        op(True, 0x090, 0x2000),
        op(True, 0x0A0, 0x3000),
        op(True, 0x044, 1),
        op(True, 0x070, 15),
        op(True, 0x050, 0),
        op(False, 0x060, 0),
        op(True, 0x064, 1),
        op(False, 0x100, 0, 2),
        op(True, 0x070, 0),
    ]
)
write("mmio_registers", "negotiate", negotiate)

# The VMM's API lines.
for name, line in {
    "attach": {"op": "attach", "id": "c1"},
    "detach": {"op": "detach", "id": "c1"},
}.items():
    write("vmm_api", name, (json.dumps(line) + "\n").encode())
write("vmm_api", "unknown-field", b'{"op":"attach","id":"c1","path":"/etc/shadow"}\n')


def frame(message):
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


# Agent requests (a hello, then requests; the spec is runc's default).
spec = {
    "ociVersion": "1.0.2",
    "process": {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh"],
        "env": ["PATH=/usr/bin:/bin"],
        "cwd": "/",
        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "c",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        {"destination": "/etc/hosts", "type": "bind", "source": "file:0", "options": ["rbind", "ro"]},
        {"destination": "/data", "type": "bind", "source": "disk:data", "options": ["rbind"]},
    ],
    "linux": {
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
        "resources": {"devices": [{"allow": False, "access": "rwm"}, {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}]},
        "sysctl": {"net.ipv4.ip_forward": "1", "kernel.core_pattern": "|/x"},
        "maskedPaths": ["/proc/kcore"],
        "readonlyPaths": ["/proc/sys"],
        "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]},
    },
}
process = {"container_id": "c1", "exec_id": None}
requests = [
    {"type": "control", "version": 3},
    {
        "type": "create_container",
        "id": "c1",
        "rootfs": {"disk_id": "rootfs", "filesystem": "erofs", "overlay": True},
        "spec": spec,
        "stdio": {"stdin": True, "stdout": True, "stderr": True},
        "files": [[49, 50, 55]],
    },
    {"type": "exec_process", "process": {"container_id": "c1", "exec_id": "e1"}, "spec": spec["process"], "stdio": {"stdin": False, "stdout": True, "stderr": True}},
    {"type": "start_process", **process},
    {"type": "signal_process", "process": process, "signal": 9, "all": False},
    {"type": "resize_tty", "process": process, "rows": 24, "cols": 80},
    {"type": "stats", "container_id": "c1"},
    {"type": "remove_container", "container_id": "../x"},
]
write("agent_requests", "session", b"".join(frame(r) for r in requests))

# Replies from a (possibly hostile) agent, in the order the fuzz target
# calls: create, exec, start, stats, list, signal, remove.
replies = [
    {"type": "pid", "pid": 42},
    {"type": "pid", "pid": 43},
    {"type": "ok"},
    {"type": "stats", "stats": {
        "memory_current_bytes": 1, "memory_limit_bytes": 268435456, "memory_peak_bytes": 2, "swap_current_bytes": 0,
        "memory": {"anon": 4096, "file": 8192, "pgfault": 9},
        "memory_events": {"low": 0, "high": 0, "max": 1, "oom": 1, "oom_kill": 1, "oom_group_kill": 0},
        "pids_current": 1, "pids_limit": 64,
        "cpu": {"usage_usec": 3, "user_usec": 2, "system_usec": 1},
    }},
    {"type": "processes", "pids": [1, 2, 3]},
    {"type": "ok"},
    {"type": "error", "code": "not_found", "message": "é" * 300},
]
write("client_replies", "answers", b"".join(frame(r) for r in replies))
write("client_replies", "lies", frame({"type": "pid", "pid": 0}) + frame({"type": "exited", "status": {"signal": 99}}))
write("client_replies", "oversized", struct.pack(">I", 0xFFFFFFFF))


# OCI layers, benign and hostile.
def layer(members):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def entry(name, kind=tarfile.REGTYPE, data=b"", link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


write("oci_layer", "benign", layer([entry("etc", tarfile.DIRTYPE, mode=0o755), entry("etc/hosts", data=b"127.0.0.1 localhost\n"), entry("bin/su", data=b"\x7fELF", mode=0o4755), entry("etc/.wh.gone"), entry("var/.wh..wh..opq")]))
write("oci_layer", "dotdot", layer([entry("../sentinel", data=b"overwritten")]))
write("oci_layer", "absolute", layer([entry("/tmp/capsid-fuzz-escape", data=b"x")]))
write("oci_layer", "symlink-out", layer([entry("out", tarfile.SYMTYPE, link="../"), entry("out/sentinel", data=b"through a link")]))
write("oci_layer", "hardlink-out", layer([entry("passwd", tarfile.LNKTYPE, link="../sentinel")]))
write("oci_layer", "whiteout-out", layer([entry("../.wh.sentinel")]))
write("oci_layer", "device", layer([entry("dev/mem", tarfile.CHRTYPE, mode=0o666)]))
write("output_tar", "benign", layer([entry("dist", tarfile.DIRTYPE, mode=0o755), entry("dist/app", data=b"\x7fELF", mode=0o755), entry("latest", tarfile.SYMTYPE, link="dist/app")]))
write("output_tar", "dotdot", layer([entry("../sentinel", data=b"overwritten")]))
write("output_tar", "symlink-out", layer([entry("out", tarfile.SYMTYPE, link="../"), entry("out/sentinel", data=b"through a link")]))
write("output_tar", "symlink-chain", layer([entry("s", tarfile.SYMTYPE, link="."), entry("t", tarfile.SYMTYPE, link="s/../sentinel")]))
write("output_tar", "hardlink-out", layer([entry("passwd", tarfile.LNKTYPE, link="../sentinel")]))
write("output_tar", "setuid", layer([entry("su", data=b"\x7fELF", mode=0o4755)]))

# virtio-net: the same queue layout as virtio-blk; a transmit chain of a
# header and an Ethernet frame, then (as a receive queue) the same
# descriptors; three frames from the tap; every feature acknowledged.
def net_queue(descriptors, heads, frames=(60, 1500, 9000), features=0x0F):
    memory = bytearray(0x2000)
    for i, (addr, length, flags, nxt) in enumerate(descriptors):
        struct.pack_into("<QIHH", memory, i * 16, addr, length, flags, nxt)
    struct.pack_into("<HH", memory, 0x100, 0, len(heads))
    for i, head in enumerate(heads):
        struct.pack_into("<H", memory, 0x104 + 2 * i, head)
    struct.pack_into("<HHH", memory, 0x3f0, *frames)
    memory[0x3f8] = features
    # A header asking for a checksum at 34+16, then an Ethernet frame.
    struct.pack_into("<BBHHHHH", memory, 0x400, 1, 0, 0, 0, 34, 16, 0)
    return bytes(memory)


write("virtio_net", "frame", net_queue([(0x400, 12, NEXT, 1), (0x800, 60, 0, 0)], [0]))
write("virtio_net", "receive", net_queue([(0x800, 1500, WRITE, 0), (0xc00, 1500, WRITE, 0)], [0, 1]))
write("virtio_net", "tso", net_queue([(0x400, 12, NEXT, 1), (0x800, 3000, 0, 0)], [0], features=0x07))
write("virtio_net", "loop", net_queue([(0x400, 12, NEXT, 1), (0x800, 60, NEXT, 0)], [0, 0]))
