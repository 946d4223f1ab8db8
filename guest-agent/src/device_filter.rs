//! cgroup v2 device control: the spec's `linux.resources.devices` rules,
//! then the devices every container may use (runc's defaults, appended
//! after the spec's as runc does), compiled to a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the container's cgroup.
//!
//! Hand-written: the program is a few instructions per rule, built from
//! data, and loaded with two bpf(2) calls. The eBPF crates on crates.io
//! (aya, libbpf-rs) load compiled ELF objects or need clang/libbpf, far more
//! than this needs and none of it usable in the static agent.
//!
//! Rules are checked last to first and the first that covers the request
//! decides (so, as in cgroup v1, a later rule overrides an earlier one); a
//! request no rule covers is denied. A rule covers a request when type,
//! major and minor match and the requested access is a subset of the rule's.

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// `struct bpf_cgroup_dev_ctx` access bits (high 16 bits of access_type).
const ACCESS_MKNOD: u32 = 1;
const ACCESS_READ: u32 = 2;
const ACCESS_WRITE: u32 = 4;
const ACCESS_ALL: u32 = ACCESS_MKNOD | ACCESS_READ | ACCESS_WRITE;
/// Device types (low 16 bits of access_type).
const TYPE_BLOCK: u32 = 1;
const TYPE_CHAR: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum DeviceFilterError {
    #[error("linux.resources.devices rule {rule:?}: {reason}")]
    BadRule { rule: String, reason: &'static str },
    #[error("cannot {action} the device program for {path}")]
    Bpf {
        action: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// One rule, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub allow: bool,
    /// `None`: every type.
    pub kind: Option<u32>,
    /// `None`: every number.
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

const fn char_rule(major: Option<u32>, minor: Option<u32>, access: u32) -> DeviceRule {
    DeviceRule {
        allow: true,
        kind: Some(TYPE_CHAR),
        major,
        minor,
        access,
    }
}

/// What every container may use whatever its spec says (runc's
/// AllowedDevices): mknod of any node, and the standard character devices.
pub const DEFAULT_ALLOWED: [DeviceRule; 12] = [
    char_rule(None, None, ACCESS_MKNOD),
    DeviceRule {
        allow: true,
        kind: Some(TYPE_BLOCK),
        major: None,
        minor: None,
        access: ACCESS_MKNOD,
    },
    char_rule(Some(1), Some(3), ACCESS_ALL),    // null
    char_rule(Some(1), Some(5), ACCESS_ALL),    // zero
    char_rule(Some(1), Some(7), ACCESS_ALL),    // full
    char_rule(Some(1), Some(8), ACCESS_ALL),    // random
    char_rule(Some(1), Some(9), ACCESS_ALL),    // urandom
    char_rule(Some(5), Some(0), ACCESS_ALL),    // tty
    char_rule(Some(5), Some(1), ACCESS_ALL),    // console
    char_rule(Some(5), Some(2), ACCESS_ALL),    // ptmx
    char_rule(Some(136), None, ACCESS_ALL),     // pts/*
    char_rule(Some(10), Some(200), ACCESS_ALL), // net/tun
];

/// The spec's rules, validated; `None` for a rule that can never match a
/// device request (FIFOs are not device-controlled).
pub fn rules_from_spec(rules: &[LinuxDeviceCgroup]) -> Result<Vec<DeviceRule>, DeviceFilterError> {
    let mut out = Vec::with_capacity(rules.len());
    for rule in rules {
        let bad = |reason| DeviceFilterError::BadRule {
            rule: rule.to_string(),
            reason,
        };
        let kind = match rule.typ().unwrap_or(LinuxDeviceType::A) {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some(TYPE_BLOCK),
            LinuxDeviceType::C | LinuxDeviceType::U => Some(TYPE_CHAR),
            LinuxDeviceType::P => continue,
        };
        let number = |value: Option<i64>| match value {
            None | Some(-1) => Ok(None),
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| i32::try_from(*n).is_ok())
                .map(Some)
                .ok_or_else(|| bad("device numbers are -1 (any) or 0..2^31")),
        };
        let access = match rule.access().as_deref() {
            None | Some("") => ACCESS_ALL,
            Some(text) => text.chars().try_fold(0, |bits, c| match c {
                'r' => Ok(bits | ACCESS_READ),
                'w' => Ok(bits | ACCESS_WRITE),
                'm' => Ok(bits | ACCESS_MKNOD),
                _ => Err(bad("access is made of r, w and m")),
            })?,
        };
        out.push(DeviceRule {
            allow: rule.allow(),
            kind,
            major: number(rule.major())?,
            minor: number(rule.minor())?,
            access,
        });
    }
    Ok(out)
}

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU32_MOV_X: u8 = 0xbc; // BPF_ALU | BPF_MOV | BPF_X
const ALU32_AND_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const ALU32_RSH_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const JMP_JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const ALU64_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Registers: r1 the context; r2 requested access, r3 type, r4 major,
// r5 minor, r6 scratch.
const R_ACCESS: u8 = 2;
const R_TYPE: u8 = 3;
const R_MAJOR: u8 = 4;
const R_MINOR: u8 = 5;
const R_SCRATCH: u8 = 6;

/// The program for `rules` (in spec order).
pub fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut code = vec![
        insn(LDX_MEM_W, R_ACCESS, 1, 0, 0),
        insn(ALU32_MOV_X, R_TYPE, R_ACCESS, 0, 0),
        insn(ALU32_AND_K, R_TYPE, 0, 0, 0xffff),
        insn(ALU32_RSH_K, R_ACCESS, 0, 0, 16),
        insn(LDX_MEM_W, R_MAJOR, 1, 4, 0),
        insn(LDX_MEM_W, R_MINOR, 1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        // Each test jumps past the rest of this rule's block on a mismatch;
        // the offsets are patched once the block's length is known.
        let mut block = Vec::new();
        let mut jumps = Vec::new();
        if let Some(kind) = rule.kind {
            jumps.push(block.len());
            block.push(insn(JMP_JNE_K, R_TYPE, 0, 0, kind as i32));
        }
        if rule.access != ACCESS_ALL {
            // Any requested bit outside the rule's access: not covered.
            block.push(insn(ALU32_MOV_X, R_SCRATCH, R_ACCESS, 0, 0));
            block.push(insn(
                ALU32_AND_K,
                R_SCRATCH,
                0,
                0,
                (!rule.access & ACCESS_ALL) as i32,
            ));
            jumps.push(block.len());
            block.push(insn(JMP_JNE_K, R_SCRATCH, 0, 0, 0));
        }
        for (register, number) in [(R_MAJOR, rule.major), (R_MINOR, rule.minor)] {
            if let Some(number) = number {
                jumps.push(block.len());
                // rules_from_spec keeps numbers below 2^31.
                block.push(insn(JMP_JNE_K, register, 0, 0, number as i32));
            }
        }
        block.push(insn(ALU64_MOV_K, 0, 0, 0, i32::from(rule.allow)));
        block.push(insn(JMP_EXIT, 0, 0, 0, 0));
        let len = block.len();
        let covers_everything = jumps.is_empty();
        for at in jumps {
            // Blocks are at most 9 instructions.
            block[at].off = (len - at - 1) as i16;
        }
        code.extend(block);
        if covers_everything {
            // Nothing after it can run, and the verifier refuses
            // unreachable instructions.
            return code;
        }
    }
    code.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    code.push(insn(JMP_EXIT, 0, 0, 0, 0));
    code
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel
/// takes a shorter attr and zeroes the rest.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// The fields of `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// Loads the program for `rules` and attaches it to the cgroup `dir`,
/// replacing the one attached before (no flags: one program per cgroup).
pub fn attach(dir: &Path, rules: &[DeviceRule]) -> Result<(), DeviceFilterError> {
    let failed = |action, source| DeviceFilterError::Bpf {
        action,
        path: dir.display().to_string(),
        source,
    };
    let code = program(rules);
    let license = c"Apache-2.0";
    let load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: code.len() as u32,
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: `load` points at `code` and `license`, both alive for the
    // call; the size passed is the struct's.
    let prog = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &load as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if prog < 0 {
        return Err(failed("load", io::Error::last_os_error()));
    }
    // SAFETY: a new fd the kernel just returned, owned only here.
    let prog = unsafe { OwnedFd::from_raw_fd(prog as i32) };
    let cgroup = std::fs::File::open(dir).map_err(|err| failed("open the cgroup of", err))?;
    let attach = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: 0,
    };
    // SAFETY: plain data for the call; both fds are open.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attach as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if ret < 0 {
        return Err(failed("attach", io::Error::last_os_error()));
    }
    // The attachment holds the program: both fds may close now.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> LinuxDeviceCgroup {
        serde_json::from_str(json).unwrap()
    }

    /// Runs `code` on one request, for the instructions `program` emits.
    fn run(code: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> u64 {
        let ctx = [(access << 16) | kind, major, minor];
        let mut regs = [0u64; 11];
        let mut pc = 0;
        loop {
            let Insn {
                code: op,
                regs: r,
                off,
                imm,
            } = code[pc];
            let (dst, src) = ((r & 0xf) as usize, (r >> 4) as usize);
            pc += 1;
            match op {
                LDX_MEM_W => regs[dst] = u64::from(ctx[off as usize / 4]),
                ALU32_MOV_X => regs[dst] = regs[src] & 0xffff_ffff,
                ALU32_AND_K => regs[dst] = (regs[dst] & imm as u32 as u64) & 0xffff_ffff,
                ALU32_RSH_K => regs[dst] = (regs[dst] & 0xffff_ffff) >> imm,
                JMP_JNE_K => {
                    if regs[dst] != imm as i64 as u64 {
                        pc += off as usize;
                    }
                }
                ALU64_MOV_K => regs[dst] = imm as i64 as u64,
                JMP_EXIT => return regs[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn the_last_covering_rule_decides_and_nothing_covered_is_denied() {
        let mut rules = rules_from_spec(&[
            rule(r#"{"allow": false, "access": "rwm"}"#),
            rule(r#"{"allow": true, "type": "c", "major": 10, "minor": 237, "access": "r"}"#),
            rule(r#"{"allow": false, "type": "b", "major": 7, "access": "w"}"#),
            rule(r#"{"allow": true, "type": "b", "major": 7, "minor": -1, "access": "rw"}"#),
        ])
        .unwrap();
        let code = program(&rules);
        let r = ACCESS_READ;
        let w = ACCESS_WRITE;
        assert_eq!(run(&code, TYPE_CHAR, r, 10, 237), 1);
        assert_eq!(run(&code, TYPE_CHAR, w, 10, 237), 0, "write is outside r");
        assert_eq!(run(&code, TYPE_CHAR, r | w, 10, 237), 0);
        assert_eq!(run(&code, TYPE_BLOCK, r, 10, 237), 0, "wrong type");
        assert_eq!(run(&code, TYPE_CHAR, r, 10, 236), 0, "wrong minor");
        assert_eq!(run(&code, TYPE_BLOCK, w, 7, 3), 1, "the later allow wins");
        assert_eq!(run(&code, TYPE_CHAR, r, 1, 3), 0, "the default deny");

        rules.extend(DEFAULT_ALLOWED);
        let code = program(&rules);
        assert_eq!(run(&code, TYPE_CHAR, r | w, 1, 3), 1, "/dev/null");
        assert_eq!(run(&code, TYPE_CHAR, r | w, 136, 42), 1, "/dev/pts/42");
        assert_eq!(run(&code, TYPE_BLOCK, ACCESS_MKNOD, 8, 0), 1, "mknod");
        assert_eq!(run(&code, TYPE_BLOCK, r, 8, 0), 0, "a disk");
        assert_eq!(run(&code, TYPE_CHAR, w, 10, 237), 0);
    }

    /// A rule that covers everything ends the program: what follows it
    /// could never run, and the kernel's verifier refuses dead code.
    fn has_no_dead_code(code: &[Insn]) -> bool {
        code.last() == Some(&insn(JMP_EXIT, 0, 0, 0, 0))
            && code
                .windows(2)
                .all(|pair| pair[0].code != JMP_EXIT || pair[1].code == ALU64_MOV_K)
            && code.iter().filter(|i| i.code == JMP_EXIT).count()
                == code.iter().filter(|i| i.code == ALU64_MOV_K).count()
    }

    #[test]
    fn a_rule_covering_everything_ends_the_program() {
        let rules = rules_from_spec(&[
            rule(r#"{"allow": true, "type": "c", "major": 1, "minor": 3}"#),
            rule(r#"{"allow": false, "access": "rwm"}"#),
        ])
        .unwrap();
        let code = program(&rules);
        assert!(has_no_dead_code(&code), "{code:?}");
        // Only the covering rule remains: 6 loads, then r0 = 0; exit.
        assert_eq!(code.len(), 8);
        assert_eq!(run(&code, TYPE_CHAR, ACCESS_READ, 1, 3), 0);
    }

    #[test]
    fn no_rules_deny_everything_and_allow_all_allows_everything() {
        assert_eq!(run(&program(&[]), TYPE_CHAR, ACCESS_READ, 1, 3), 0);
        let all = rules_from_spec(&[rule(r#"{"allow": true}"#)]).unwrap();
        assert_eq!(run(&program(&all), TYPE_BLOCK, ACCESS_ALL, 253, 1), 1);
    }

    #[test]
    fn bad_rules_are_named_and_fifos_are_skipped() {
        let err = rules_from_spec(&[rule(r#"{"allow": true, "access": "rx"}"#)]).unwrap_err();
        assert!(err.to_string().contains("r, w and m"), "{err}");
        let err = rules_from_spec(&[rule(r#"{"allow": true, "major": -5}"#)]).unwrap_err();
        assert!(err.to_string().contains("-1 (any)"), "{err}");
        let err = rules_from_spec(&[rule(r#"{"allow": true, "minor": 4294967296}"#)]).unwrap_err();
        assert!(err.to_string().contains("-1 (any)"), "{err}");
        assert!(rules_from_spec(&[rule(r#"{"allow": true, "type": "p"}"#)])
            .unwrap()
            .is_empty());
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;

    /// Root on a host with a cgroup2 hierarchy: a real program on a real
    /// cgroup denies a process in it.
    #[test]
    fn attached_program_denies_a_process_in_the_cgroup() {
        let Some(root) = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|root| {
                root.join("cgroup.procs").exists() && root.join("cgroup.controllers").exists()
            })
        else {
            eprintln!("skipped: no cgroup2 hierarchy");
            return;
        };
        let dir = root.join(format!("microvm-devfilter-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        // What containerd's specs ask for: deny all, then the defaults.
        let mut rules = vec![DeviceRule {
            allow: false,
            kind: None,
            major: None,
            minor: None,
            access: ACCESS_ALL,
        }];
        rules.extend(DEFAULT_ALLOWED);
        let attached = attach(&dir, &rules);
        if attached.is_err() {
            let _ = std::fs::remove_dir(&dir);
        }
        attached.unwrap();
        let procs = dir.join("cgroup.procs");
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}; head -c 0 /dev/loop-control && echo opened; head -c 1 /dev/zero | wc -c",
                procs.display()
            ))
            .output()
            .unwrap();
        let _ = std::fs::remove_dir(&dir);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stdout, "1\n", "{stderr}");
        assert!(stderr.contains("Operation not permitted"), "{stderr}");
    }
}
