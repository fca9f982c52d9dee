//! sandrun's seccomp policies ([`policy`], data only: the job's and the output collector's) and
//! their compiler, which turns each into a classic-BPF program. It runs **at build time**: the
//! build scripts of sandrund and of the collector call [`build_script`], which compiles a policy
//! and writes it as a `static` array of instructions for the crate to `include!` (as
//! Firecracker keeps its filters), so neither links libseccomp or compiles anything when it
//! starts; the array's length is checked when the crate is compiled, and the program is installed
//! in each job process right before `execve`. sandrund's tests run the embedded program against
//! real syscalls, and check that it is what this crate compiles now (so a libseccomp upgrade
//! that would change it, without a rebuild, fails them).
//!
//! # How the argument checks are built
//!
//! libseccomp cannot express "allow unless": when a syscall has an unconditional rule, it
//! silently drops every conditional rule for that syscall, whatever the order they were added in
//! (checked with libseccomp 2.5.4 and `export_pfc`: `allow ioctl` plus `EPERM ioctl if
//! a1 == TIOCSTI` exports as a bare `allow ioctl`). So every argument-checked syscall here gets
//! **only conditional rules, whose conditions are disjoint and together cover every value**: the
//! result depends neither on rule order nor on precedence, and [`compile`] refuses a policy that
//! names a syscall in two rules.
//!
//! A [`Check::Low32`] ("allow unless the low 32 bits equal X or Y", or "allow only X, Y") is
//! written as one rule per listed value (`MaskedEqual(0xffff_ffff, X)`) plus one rule per prefix
//! block of the other 32-bit values (`MaskedEqual(mask, prefix)`, with the mask's upper 32 bits
//! clear, so the upper bits of the register never matter). See [`complement_blocks`]. A
//! [`Check::Flags`] (the namespace check on `clone`) is one rule for "no bit set"
//! (`flags & mask == 0`) and one rule per bit.
//!
//! Foreign architectures hit libseccomp's architecture check, whose action is the policy's
//! `foreign_arch`; libseccomp's x86_64 filter sends x32 numbers (`nr >= 0x40000000`) to the same
//! action. Both are proved by sandrund's tests (i386 `int 0x80` and x32 `getpid` die of
//! `SIGSYS`). The program is for the architecture the compiler runs on: sandrund's build script
//! refuses to cross-compile.
//!
//! # The same program on every build host
//!
//! libseccomp decides some encodings by probing the running kernel (its "API level"): whether
//! `SECCOMP_RET_KILL_PROCESS` exists, for one. [`build_script`] calls [`pin_api_level`] before
//! [`compile`]: level 4 (Linux 4.17; the lowest at which the libseccomp crate allows the
//! binary-tree optimization), so the program does not depend on the kernel of the machine that
//! built sandrund (sandrund's tests compile again at the level the kernel gives, and compare).
//! The program uses nothing newer than `SECCOMP_RET_KILL_PROCESS` (Linux 4.14); sandrund needs
//! Landlock anyway (Linux 5.13).
//!
//! The compiled job program (about 820 instructions, a binary tree over the syscall numbers) is
//! checked against [`MAX_INSTRUCTIONS`] (the kernel's `BPF_MAXINSNS`). sandrund's tests run `sh`,
//! `bash` with coreutils, `python3` (threads, `subprocess`) and `node` under the filter; with the
//! default action switched to `LOG`, such workloads (including `multiprocessing`, `asyncio`,
//! sockets, `sqlite3`, worker threads) hit no unlisted syscall but `clone3`.

#![forbid(unsafe_code)]

pub mod policy;

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;

use libseccomp::error::SeccompError as LibError;
use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};

pub use policy::*;

/// Size of one classic-BPF instruction (`struct sock_filter`), as libseccomp exports them.
const INSTRUCTION_BYTES: usize = std::mem::size_of::<libc::sock_filter>();

/// The libseccomp API level [`pin_api_level`] sets (see the module docs).
const API_LEVEL: u32 = 4;

/// Failure to build the filter (when sandrund is built): a policy or build-host problem.
#[derive(Debug)]
#[non_exhaustive]
pub enum SeccompError {
    /// libseccomp does not know a syscall name of the allow-list (libseccomp too old?).
    UnknownSyscall {
        name: &'static str,
        source: LibError,
    },
    /// A libseccomp call failed; `step` names it.
    Libseccomp {
        step: &'static str,
        source: LibError,
    },
    /// Creating, rewinding or reading the memfd the BPF is exported into failed.
    Export {
        step: &'static str,
        source: std::io::Error,
    },
    /// The exported program is not a whole number of `sock_filter` instructions.
    Malformed { bytes: usize },
    /// The program is empty or longer than the kernel accepts.
    BadLength { instructions: usize },
    /// A syscall is named in two policy rules (an unconditional rule would absorb its
    /// argument checks, or allow and refuse would clash).
    PolicyConflict { name: &'static str },
    /// A `Flags` check of this syscall lists a value that is not exactly one bit.
    NotOneBit { name: &'static str, bits: u64 },
}

impl std::fmt::Display for SeccompError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownSyscall { name, source } => {
                write!(
                    f,
                    "seccomp: libseccomp does not know syscall {name:?}: {source}"
                )
            }
            Self::Libseccomp { step, source } => write!(f, "seccomp: {step}: {source}"),
            Self::Export { step, source } => write!(f, "seccomp: export BPF: {step}: {source}"),
            Self::Malformed { bytes } => {
                write!(
                    f,
                    "seccomp: exported BPF has {bytes} bytes, not whole instructions"
                )
            }
            Self::PolicyConflict { name } => {
                write!(f, "seccomp: syscall {name:?} is named in two policy lists")
            }
            Self::NotOneBit { name, bits } => {
                write!(
                    f,
                    "seccomp: the flags check of {name:?} lists {bits:#x}, not one bit"
                )
            }
            Self::BadLength { instructions } => write!(
                f,
                "seccomp: program has {instructions} instructions (must be 1..={MAX_INSTRUCTIONS})"
            ),
        }
    }
}

impl std::error::Error for SeccompError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::UnknownSyscall { source, .. } | Self::Libseccomp { source, .. } => Some(source),
            Self::Export { source, .. } => Some(source),
            Self::Malformed { .. }
            | Self::BadLength { .. }
            | Self::PolicyConflict { .. }
            | Self::NotOneBit { .. } => None,
        }
    }
}

/// Pins libseccomp's API level for this process (see the module docs), so [`compile`] does not
/// depend on the running kernel. The level is process-global: call it only in a process that
/// loads no filter of its own (sandrund's build script), never in a test binary.
pub fn pin_api_level() -> Result<(), SeccompError> {
    libseccomp::set_api(API_LEVEL).map_err(lib("pin the API level"))
}

/// One classic-BPF instruction, as `struct sock_filter` holds it: `(code, jt, jf, k)`.
pub type Instruction = (u16, u8, u8, u32);

/// Compiles `policy` into classic BPF for this machine's architecture: between 1 and
/// [`MAX_INSTRUCTIONS`] instructions. After [`pin_api_level`], the same policy gives the same
/// program on every build host (see the module docs).
pub fn compile(policy: &Policy) -> Result<Vec<Instruction>, SeccompError> {
    let bytes = export(&build(policy)?)?;
    let chunks = bytes.chunks_exact(INSTRUCTION_BYTES);
    if !chunks.remainder().is_empty() {
        return Err(SeccompError::Malformed { bytes: bytes.len() });
    }
    let program: Vec<Instruction> = chunks
        .map(|c| {
            let code = u16::from_ne_bytes([c[0], c[1]]);
            (
                code,
                c[2],
                c[3],
                u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    if program.is_empty() || program.len() > MAX_INSTRUCTIONS {
        return Err(SeccompError::BadLength {
            instructions: program.len(),
        });
    }
    Ok(program)
}

/// What a build script calls: compiles `policy` (API level pinned) and writes
/// `$OUT_DIR/<file>`, Rust source that defines `static <name>: [libc::sock_filter; N]`, for the
/// crate to `include!`. Panics (failing the build) with the reason when the target is not the
/// build host's architecture (the program would be for the wrong syscall table), the policy
/// does not compile, or the file cannot be written.
pub fn build_script(policy: &Policy, name: &str, file: &str) {
    let target_arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let target_width = std::env::var("CARGO_CFG_TARGET_POINTER_WIDTH").unwrap_or_default();
    let host_width = (8 * std::mem::size_of::<usize>()).to_string();
    if target_arch != std::env::consts::ARCH || target_width != host_width {
        panic!(
            "the seccomp filter is compiled for the build host ({} {host_width}-bit); building \
             for {target_arch} {target_width}-bit (cross-compiling) is not supported",
            std::env::consts::ARCH
        );
    }
    let program = pin_api_level().and_then(|()| compile(policy));
    let program = program.unwrap_or_else(|e| panic!("the seccomp policy does not compile: {e}"));
    let mut source = format!(
        "// Generated by sandrun-seccomp's build_script from its policy; do not edit.\n\
         static {name}: [libc::sock_filter; {}] = [\n",
        program.len()
    );
    for (code, jt, jf, k) in program {
        source.push_str(&format!(
            "    libc::sock_filter {{ code: {code:#06x}, jt: {jt}, jf: {jf}, k: {k:#x} }},\n"
        ));
    }
    source.push_str("];\n");
    let out = std::env::var_os("OUT_DIR").unwrap_or_else(|| panic!("cargo sets OUT_DIR"));
    let path = std::path::Path::new(&out).join(file);
    if let Err(e) = std::fs::write(&path, source) {
        panic!("write {}: {e}", path.display());
    }
}

/// Builds the libseccomp filter context for `policy`, its rules in order.
fn build(policy: &Policy) -> Result<ScmpFilterContext, SeccompError> {
    let names: Vec<&[&'static str]> = policy.rules.iter().map(|r| r.syscalls).collect();
    check_no_conflicts(&names)?;
    check_single_bits(policy)?;
    let mut ctx =
        ScmpFilterContext::new_filter(action(policy.otherwise)).map_err(lib("create filter"))?;
    ctx.set_act_badarch(action(policy.foreign_arch))
        .map_err(lib("set bad-arch action"))?;
    ctx.set_ctl_optimize(2)
        .map_err(lib("set binary-tree optimization"))?;
    for rule in policy.rules {
        for &name in rule.syscalls {
            let syscall = match (ScmpSyscall::from_name(name), rule.if_unknown) {
                (Ok(syscall), _) => syscall,
                (Err(_), IfUnknown::Skip) => continue,
                (Err(source), IfUnknown::Fail) => {
                    return Err(SeccompError::UnknownSyscall { name, source })
                }
            };
            add_rules(&mut ctx, syscall, rule.check, policy.otherwise)?;
        }
    }
    Ok(ctx)
}

fn lib(step: &'static str) -> impl Fn(LibError) -> SeccompError {
    move |source| SeccompError::Libseccomp { step, source }
}

fn action(action: Action) -> ScmpAction {
    match action {
        Action::Allow => ScmpAction::Allow,
        Action::Errno(errno) => ScmpAction::Errno(errno),
        Action::KillProcess => ScmpAction::KillProcess,
    }
}

/// Every bit of a [`Check::Flags`] is one non-zero bit: the rules it becomes ("no bit set", then
/// one per bit) then cover every value, and overlap only where they agree.
fn check_single_bits(policy: &Policy) -> Result<(), SeccompError> {
    for rule in policy.rules {
        if let Check::Flags { bits, .. } = rule.check {
            if let Some(&bits) = bits.iter().find(|b| b.count_ones() != 1) {
                let name = rule.syscalls.first().copied().unwrap_or("");
                return Err(SeccompError::NotOneBit { name, bits });
            }
        }
    }
    Ok(())
}

/// Each syscall name appears at most once across `lists`.
fn check_no_conflicts(lists: &[&[&'static str]]) -> Result<(), SeccompError> {
    let mut seen = std::collections::HashSet::new();
    match lists
        .iter()
        .flat_map(|l| l.iter())
        .find(|&&name| !seen.insert(name))
    {
        Some(&name) => Err(SeccompError::PolicyConflict { name }),
        None => Ok(()),
    }
}

/// The rules of one syscall: one unconditional rule, or disjoint conditional ones covering
/// every value (see the module docs).
///
/// A rule whose action is the policy's default (`otherwise`) is left out: libseccomp refuses
/// it, and what it covers gets that action anyway, since no other rule of the syscall matches
/// there (a syscall has one unconditional rule or only conditional ones, and these are disjoint
/// but for a `Flags` check's per-bit rules, which agree).
fn add_rules(
    ctx: &mut ScmpFilterContext,
    syscall: ScmpSyscall,
    check: Check,
    otherwise: Action,
) -> Result<(), SeccompError> {
    let mut conditional = |act: Action, arg: u32, mask: u64, value: u64| {
        if act == otherwise {
            return Ok(());
        }
        let cmp = ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(mask), value);
        ctx.add_rule_conditional_exact(action(act), syscall, &[cmp])
            .map_err(lib("add argument rule"))
    };
    match check {
        Check::Always(act) if act == otherwise => {}
        Check::Always(act) => {
            return ctx
                .add_rule_exact(action(act), syscall)
                .map_err(lib("add rule"))
        }
        Check::Flags {
            arg,
            bits,
            clear,
            set,
        } => {
            conditional(clear, arg, bits.iter().fold(0, |acc, b| acc | b), 0)?;
            for &bit in bits {
                conditional(set, arg, bit, bit)?;
            }
        }
        Check::Low32 {
            arg,
            values,
            listed,
            others,
        } => {
            for &value in values {
                conditional(listed, arg, LOW_32_BITS, value.into())?;
            }
            for (mask, prefix) in complement_blocks(values) {
                conditional(others, arg, mask.into(), prefix.into())?;
            }
        }
    }
    Ok(())
}

const LOW_32_BITS: u64 = 0xffff_ffff;

/// The prefix blocks `(mask, prefix)` that together hold exactly the 32-bit values not in
/// `excluded`: `v` is in a block when `v & mask == prefix`. Blocks are disjoint; there are at
/// most `32 * excluded.len()` of them (one for all values when `excluded` is empty).
pub(crate) fn complement_blocks(excluded: &[u32]) -> Vec<(u32, u32)> {
    let mut blocks = Vec::new();
    cover(0, 0, excluded, &mut blocks);
    blocks
}

/// Pushes the blocks of the values under `prefix` (its top `fixed` bits) not in `excluded`.
fn cover(prefix: u32, fixed: u32, excluded: &[u32], out: &mut Vec<(u32, u32)>) {
    let mask = prefix_mask(fixed);
    if !excluded.iter().any(|&v| v & mask == prefix) {
        out.push((mask, prefix));
    } else if fixed < 32 {
        let next_bit = 1u32 << (31 - fixed);
        cover(prefix, fixed + 1, excluded, out);
        cover(prefix | next_bit, fixed + 1, excluded, out);
    }
    // `fixed == 32` and an excluded value matches: the block is that value alone; skip it.
}

fn prefix_mask(fixed: u32) -> u32 {
    match fixed {
        0 => 0,
        n => u32::MAX << (32 - n),
    }
}

/// Exports the compiled BPF into a memfd and reads its bytes back.
fn export(ctx: &ScmpFilterContext) -> Result<Vec<u8>, SeccompError> {
    let io = |step| move |source| SeccompError::Export { step, source };
    let fd: OwnedFd = nix::sys::memfd::memfd_create(
        c"sandrun-seccomp",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(|e| SeccompError::Export {
        step: "memfd_create",
        source: e.into(),
    })?;
    let mut file = std::fs::File::from(fd);
    ctx.export_bpf(&mut file).map_err(lib("export BPF"))?;
    file.seek(SeekFrom::Start(0)).map_err(io("rewind memfd"))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io("read memfd"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Check::{Always, Flags, Low32};

    #[test]
    fn given_policy_when_compiled_twice_then_programs_are_identical_and_small() {
        for policy in [JOB, COLLECTOR] {
            let (a, b) = (compile(&policy).unwrap(), compile(&policy).unwrap());
            eprintln!("seccomp program: {} instructions", a.len());
            assert_eq!(a, b);
            assert!(a.len() < MAX_INSTRUCTIONS, "{} instructions", a.len());
        }
    }

    #[test]
    fn given_a_syscall_in_two_policy_lists_when_checked_then_it_is_a_conflict() {
        let err = check_no_conflicts(&[&["read", "ioctl"], &["ioctl"]]);
        assert!(matches!(
            err,
            Err(SeccompError::PolicyConflict { name: "ioctl" })
        ));
        for policy in [JOB, COLLECTOR] {
            let lists: Vec<&[&str]> = policy.rules.iter().map(|r| r.syscalls).collect();
            assert!(check_no_conflicts(&lists).is_ok());
        }
    }

    #[test]
    fn given_excluded_values_when_blocks_are_built_then_each_other_value_is_in_exactly_one() {
        let excluded = [0x5412, 0x541c, 0, u32::MAX];
        let blocks = complement_blocks(&excluded);
        assert!(blocks.len() <= 32 * excluded.len());
        let probes = [
            0,
            1,
            2,
            0x5411,
            0x5412,
            0x5413,
            0x541c,
            0x541d,
            0x8000_0000,
            u32::MAX - 1,
        ];
        for v in probes.into_iter().chain(excluded) {
            let hits = blocks.iter().filter(|&&(m, p)| v & m == p).count();
            let expected = usize::from(!excluded.contains(&v));
            assert_eq!(hits, expected, "value {v:#x} is in {hits} blocks");
        }
        assert_eq!(complement_blocks(&[]), vec![(0, 0)]);
    }

    /// A made-up policy whose checks decide some values by the default: those rules are left
    /// out (libseccomp would refuse them), and the program decides every value as written.
    #[test]
    fn given_rules_with_the_default_action_then_they_are_left_out_and_the_program_compiles() {
        const ODD: Policy = Policy {
            rules: &[
                Rule {
                    syscalls: &["getpid"],
                    check: Always(KILL),
                    if_unknown: IfUnknown::Fail,
                },
                Rule {
                    syscalls: &["prctl"],
                    check: Low32 {
                        arg: 0,
                        values: &[15],
                        listed: ALLOW,
                        others: KILL,
                    },
                    if_unknown: IfUnknown::Fail,
                },
                Rule {
                    syscalls: &["clone"],
                    check: Flags {
                        arg: 0,
                        bits: &[0x100, 0x200],
                        clear: KILL,
                        set: ALLOW,
                    },
                    if_unknown: IfUnknown::Fail,
                },
            ],
            otherwise: KILL,
            foreign_arch: KILL,
        };
        let program = compile(&ODD).expect("compiles");
        assert!(!program.is_empty());
        // Every syscall but getpid's and the argument-checked ones is decided by `otherwise`,
        // so no rule of getpid's (the same action) is in the program: the same program as with
        // getpid left out of the policy.
        const WITHOUT_GETPID: Policy = Policy {
            rules: ODD.rules.split_at(1).1,
            ..ODD
        };
        assert_eq!(program, compile(&WITHOUT_GETPID).expect("compiles"));
    }

    #[test]
    fn given_a_flags_check_with_a_value_that_is_not_one_bit_then_it_is_refused() {
        for bad in [0, 0x3] {
            let bits: &'static [u64] = Box::leak(vec![0x100, bad].into_boxed_slice());
            let rules: &'static [Rule] = Box::leak(
                vec![Rule {
                    syscalls: &["clone"],
                    check: Flags {
                        arg: 0,
                        bits,
                        clear: ALLOW,
                        set: EPERM,
                    },
                    if_unknown: IfUnknown::Fail,
                }]
                .into_boxed_slice(),
            );
            let policy = Policy {
                rules,
                otherwise: ENOSYS,
                foreign_arch: KILL,
            };
            let err = compile(&policy).err();
            assert!(
                matches!(err, Some(SeccompError::NotOneBit { name: "clone", bits }) if bits == bad),
                "{bad:#x}: {err:?}"
            );
        }
    }
}
