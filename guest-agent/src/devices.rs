//! `linux.resources.devices` on cgroup v2, where the device controller is a
//! BPF program (`BPF_PROG_TYPE_CGROUP_DEVICE`) attached to the container's
//! cgroup: the kernel runs it on every open and mknod of a device node by a
//! process in the cgroup, and refuses what it returns 0 for.
//!
//! The rules are the spec's, after an implicit "deny all", followed by the
//! devices the agent itself puts in every container's /dev (null, zero,
//! full, random, urandom, tty, console, ptmx, the pty slaves); a later rule
//! wins over an earlier one, as runc orders them. The program checks them
//! from the last to the first and answers with the first that matches:
//!
//! ```text
//!  r2 = type (1 block, 2 char)   r3 = access (1 mknod, 2 read, 4 write)
//!  r4 = major                    r5 = minor
//!  for each rule, last first:
//!      type matches? requested access within the rule's? major? minor?
//!          → r0 = allow; exit
//!  r0 = 0; exit                  (nothing matched: denied)
//! ```
//!
//! The guest kernel is built with `CONFIG_BPF_SYSCALL` and
//! `CONFIG_CGROUP_BPF` for this, and unprivileged BPF stays off.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

/// `access_type` bits of `struct bpf_cgroup_dev_ctx`.
const ACCESS_MKNOD: u32 = 1;
const ACCESS_READ: u32 = 2;
const ACCESS_WRITE: u32 = 4;
const ACCESS_ALL: u32 = ACCESS_MKNOD | ACCESS_READ | ACCESS_WRITE;
/// Device types of `struct bpf_cgroup_dev_ctx`.
const TYPE_BLOCK: u32 = 1;
const TYPE_CHAR: u32 = 2;

/// One rule, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRule {
    pub(crate) allow: bool,
    /// `None`: any type.
    pub kind: Option<u32>,
    pub(crate) major: Option<u32>,
    pub(crate) minor: Option<u32>,
    pub(crate) access: u32,
}

/// The character devices every container's /dev holds (`rootfs.rs`), with
/// the pty slaves (major 136).
const DEFAULT_ALLOWED: [(u32, Option<u32>); 9] = [
    (1, Some(3)), // null
    (1, Some(5)), // zero
    (1, Some(7)), // full
    (1, Some(8)), // random
    (1, Some(9)), // urandom
    (5, Some(0)), // tty
    (5, Some(1)), // console
    (5, Some(2)), // ptmx
    (136, None),  // pts/*
];

/// The rules to enforce for `spec`'s device list: deny all, the spec's,
/// then the defaults.
pub fn rules(spec: &[LinuxDeviceCgroup]) -> Result<Vec<DeviceRule>, String> {
    let mut rules = vec![DeviceRule {
        allow: false,
        kind: None,
        major: None,
        minor: None,
        access: ACCESS_ALL,
    }];
    for rule in spec {
        let kind = match rule.typ().unwrap_or(LinuxDeviceType::A) {
            LinuxDeviceType::A => None,
            LinuxDeviceType::C | LinuxDeviceType::U => Some(TYPE_CHAR),
            LinuxDeviceType::B => Some(TYPE_BLOCK),
            LinuxDeviceType::P => {
                return Err("device rule of type p: FIFOs have no device cgroup rule".into());
            }
        };
        let number = |n: Option<i64>, what: &str| -> Result<Option<u32>, String> {
            match n {
                None | Some(-1) => Ok(None),
                Some(n) => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| format!("device rule: {what} {n} is out of range")),
            }
        };
        let mut access = 0;
        for c in rule.access().as_deref().unwrap_or("rwm").chars() {
            access |= match c {
                'r' => ACCESS_READ,
                'w' => ACCESS_WRITE,
                'm' => ACCESS_MKNOD,
                other => return Err(format!("device rule: access {other:?} is not r, w or m")),
            };
        }
        rules.push(DeviceRule {
            allow: rule.allow(),
            kind,
            major: number(rule.major(), "major")?,
            minor: number(rule.minor(), "minor")?,
            access,
        });
    }
    for (major, minor) in DEFAULT_ALLOWED {
        rules.push(DeviceRule {
            allow: true,
            kind: Some(TYPE_CHAR),
            major: Some(major),
            minor,
            access: ACCESS_ALL,
        });
    }
    Ok(rules)
}

/// One eBPF instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub(crate) code: u8,
    pub(crate) dst: u8,
    pub(crate) src: u8,
    pub(crate) off: i16,
    pub(crate) imm: i32,
}

impl Insn {
    fn encode(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = (self.src << 4) | (self.dst & 0x0f);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

// Opcodes (linux/bpf.h): class | op | source.
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU32_AND_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const ALU32_RSH_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const ALU32_MOV_X: u8 = 0xbc; // BPF_ALU | BPF_MOV | BPF_X
const ALU64_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JMP32_JNE_K: u8 = 0x56; // BPF_JMP32 | BPF_JNE | BPF_K
const JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

/// A 32-bit immediate as the instruction holds it (bit pattern kept).
fn imm(value: u32) -> i32 {
    i32::from_ne_bytes(value.to_ne_bytes())
}

/// The program for `rules` (see the module documentation).
pub fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut code = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 0, 0),
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        let mut block = Vec::new();
        // Jumps to the end of the block, patched once its length is known.
        let mut jumps = Vec::new();
        if let Some(kind) = rule.kind {
            jumps.push(block.len());
            block.push(insn(JMP32_JNE_K, 2, 0, 0, imm(kind)));
        }
        if rule.access != ACCESS_ALL {
            // Requested access outside the rule's: not this rule.
            block.push(insn(ALU32_MOV_X, 1, 3, 0, 0));
            block.push(insn(ALU32_AND_K, 1, 0, 0, imm(!rule.access)));
            jumps.push(block.len());
            block.push(insn(JMP32_JNE_K, 1, 0, 0, 0));
        }
        if let Some(major) = rule.major {
            jumps.push(block.len());
            block.push(insn(JMP32_JNE_K, 4, 0, 0, imm(major)));
        }
        if let Some(minor) = rule.minor {
            jumps.push(block.len());
            block.push(insn(JMP32_JNE_K, 5, 0, 0, imm(minor)));
        }
        block.push(insn(ALU64_MOV_K, 0, 0, 0, i32::from(rule.allow)));
        block.push(insn(JMP_EXIT, 0, 0, 0, 0));
        let end = block.len();
        let always = jumps.is_empty();
        for at in jumps {
            block[at].off = i16::try_from(end - at - 1).unwrap_or(i16::MAX);
        }
        code.extend(block);
        if always {
            // A rule that matches everything answers for all that is left;
            // the verifier refuses code that cannot be reached.
            return code;
        }
    }
    code.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    code.push(insn(JMP_EXIT, 0, 0, 0, 0));
    code
}

/// `union bpf_attr` for BPF_PROG_LOAD, as far as we fill it; the rest of
/// the kernel's union must be zero, which the padding is.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    _rest: [u8; 80],
}

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    _rest: [u8; 48],
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

fn bpf<T>(command: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a bpf_attr layout of its own size that outlives the
    // call; the kernel reads it (and, for a load, the buffers it points at).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_ref(attr),
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Loads the program for `rules` and attaches it to the cgroup `dir`.
pub fn restrict(dir: &Path, rules: &[DeviceRule]) -> io::Result<()> {
    let code: Vec<u8> = program(rules).into_iter().flat_map(Insn::encode).collect();
    let license = c"Apache-2.0";
    let load = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(code.len() / 8).unwrap_or(u32::MAX),
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        _rest: [0; 80],
    };
    let prog = match bpf(BPF_PROG_LOAD, &load) {
        Ok(fd) => fd,
        Err(e) => {
            // Load again with the verifier's log, to say why.
            let mut log = vec![0u8; 16 << 10];
            let with_log = ProgLoad {
                log_level: 1,
                log_size: u32::try_from(log.len()).unwrap_or(0),
                log_buf: log.as_mut_ptr() as u64,
                ..load
            };
            let _ = bpf(BPF_PROG_LOAD, &with_log);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let why = String::from_utf8_lossy(&log[..end]);
            let why: String = why.chars().take(300).collect();
            return Err(io::Error::new(
                e.kind(),
                format!("load the device program: {e}: {why}"),
            ));
        }
    };
    // SAFETY: BPF_PROG_LOAD returned a new descriptor that we now own.
    let prog = unsafe { OwnedFd::from_raw_fd(i32::try_from(prog).unwrap_or(-1)) };
    let cgroup = std::fs::File::open(dir)?;
    let attach = ProgAttach {
        target_fd: u32::try_from(cgroup.as_raw_fd()).unwrap_or(u32::MAX),
        attach_bpf_fd: u32::try_from(prog.as_raw_fd()).unwrap_or(u32::MAX),
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: 0,
        _rest: [0; 48],
    };
    bpf(BPF_PROG_ATTACH, &attach)?;
    // The cgroup holds the program now; our descriptors may go.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `code` as the kernel would, for the instructions we emit.
    fn run(code: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> u64 {
        let ctx = [(access << 16) | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = code[pc];
            let (d, s) = (usize::from(i.dst), usize::from(i.src));
            let k = u64::from(u32::from_ne_bytes(i.imm.to_ne_bytes()));
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(s, 1, "loads only from the context");
                    r[d] = u64::from(ctx[usize::try_from(i.off).unwrap() / 4]);
                }
                ALU32_AND_K => r[d] = (r[d] & k) & 0xffff_ffff,
                ALU32_RSH_K => r[d] = (r[d] & 0xffff_ffff) >> k,
                ALU32_MOV_X => r[d] = r[s] & 0xffff_ffff,
                ALU64_MOV_K => r[d] = k,
                JMP32_JNE_K => {
                    if (r[d] & 0xffff_ffff) != k {
                        pc += usize::try_from(i.off).unwrap();
                    }
                }
                JMP_EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
        panic!("the program did not end");
    }

    fn spec_rule(json: &str) -> LinuxDeviceCgroup {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_defaults_are_allowed_and_everything_else_denied() {
        // Before the fix linux.resources.devices was never applied: root in
        // a container with CAP_MKNOD could make and open /dev/mem (1:1) or
        // the VM's disks.
        let code = program(&rules(&[spec_rule(r#"{"allow": false, "access": "rwm"}"#)]).unwrap());
        let rw = ACCESS_READ | ACCESS_WRITE;
        assert_eq!(run(&code, TYPE_CHAR, rw, 1, 3), 1, "null");
        assert_eq!(run(&code, TYPE_CHAR, rw, 136, 7), 1, "pts/7");
        assert_eq!(run(&code, TYPE_CHAR, rw, 1, 1), 0, "mem");
        assert_eq!(run(&code, TYPE_CHAR, ACCESS_MKNOD, 1, 1), 0, "mknod mem");
        assert_eq!(run(&code, TYPE_BLOCK, ACCESS_READ, 254, 0), 0, "vda");
        assert_eq!(run(&code, TYPE_BLOCK, ACCESS_READ, 1, 3), 0, "block 1:3");
    }

    #[test]
    fn later_rules_win_and_wildcards_and_access_letters_count() {
        let spec = [
            spec_rule(r#"{"allow": false, "access": "rwm"}"#),
            spec_rule(r#"{"allow": true, "type": "b", "major": 254, "access": "r"}"#),
            spec_rule(r#"{"allow": true, "type": "c", "access": "m"}"#),
            spec_rule(r#"{"allow": false, "type": "b", "major": 254, "minor": 16}"#),
        ];
        let code = program(&rules(&spec).unwrap());
        assert_eq!(run(&code, TYPE_BLOCK, ACCESS_READ, 254, 0), 1, "read vda");
        assert_eq!(run(&code, TYPE_BLOCK, ACCESS_WRITE, 254, 0), 0, "write vda");
        assert_eq!(
            run(&code, TYPE_BLOCK, ACCESS_READ, 254, 16),
            0,
            "vdb denied after"
        );
        assert_eq!(
            run(&code, TYPE_CHAR, ACCESS_MKNOD, 10, 200),
            1,
            "any char mknod"
        );
        assert_eq!(
            run(&code, TYPE_CHAR, ACCESS_READ, 10, 200),
            0,
            "but not its read"
        );
        let all = program(&rules(&[spec_rule(r#"{"allow": true, "access": "rwm"}"#)]).unwrap());
        assert_eq!(run(&all, TYPE_BLOCK, ACCESS_ALL, 8, 0), 1, "privileged");
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for (json, reason) in [
            (r#"{"allow": true, "access": "rx"}"#, "not r, w or m"),
            (r#"{"allow": true, "type": "p"}"#, "FIFOs"),
            (r#"{"allow": true, "major": 5000000000}"#, "out of range"),
        ] {
            let err = rules(&[spec_rule(json)]).unwrap_err();
            assert!(err.contains(reason), "{json}: {err}");
        }
    }

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        let exit = insn(JMP_EXIT, 0, 0, 0, 0).encode();
        assert_eq!(exit, [0x95, 0, 0, 0, 0, 0, 0, 0]);
        let load = insn(LDX_MEM_W, 4, 1, 4, 0).encode();
        assert_eq!(load, [0x61, 0x14, 4, 0, 0, 0, 0, 0]);
    }

    /// A cgroup v2 directory to try programs on, if this host has one.
    fn scratch_cgroup() -> Option<std::path::PathBuf> {
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(std::path::Path::new)
            .find(|p| {
                p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists()
            })?;
        let dir = root.join(format!("capsid-devices-test-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        Some(dir)
    }

    #[test]
    fn the_kernel_verifier_accepts_the_program() {
        let Some(dir) = scratch_cgroup() else {
            eprintln!("SKIPPED: no writable cgroup v2 here (needs root)");
            return;
        };
        let spec = [spec_rule(
            r#"{"allow": true, "type": "b", "major": 254, "access": "r"}"#,
        )];
        let result = restrict(&dir, &rules(&spec).unwrap());
        let _ = std::fs::remove_dir(&dir);
        result.unwrap();
    }
}
