//! The job's seccomp policy, as data: which syscalls are allowed, which are refused with which
//! errno, which are decided by their arguments, and what every other syscall and a foreign
//! architecture get. The crate's compiler (`lib.rs`) turns each into a BPF program when sandrund
//! and the output collector are built; nothing here runs code. A reviewer reads [`JOB`] and the
//! lists it names (docs/sandrund.md "Seccomp policy" says the same in a table), and
//! [`COLLECTOR`], the output collector's much shorter one (docs/sandrund.md "Output
//! collection").
//!
//! Syscalls are named the libseccomp way, so the syscall numbers (and the architecture check)
//! are libseccomp's business. The filters are native-arch only (x86_64).

use Check::{Always, Flags, Low32};
use IfUnknown::{Fail, Skip};

/// What a filter does with a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    /// Fail the syscall with this errno; the kernel never sees it.
    Errno(i32),
    /// Kill the whole process (`SIGSYS`).
    KillProcess,
}

pub const ALLOW: Action = Action::Allow;
pub const KILL: Action = Action::KillProcess;
/// `EPERM`: refused, and libc does not fall back.
pub const EPERM: Action = Action::Errno(libc::EPERM);
/// `ENOSYS`: "not implemented", so libc falls back (e.g. `clone3` to `clone`).
pub const ENOSYS: Action = Action::Errno(libc::ENOSYS);

/// How the syscalls of a [`Rule`] are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Whatever the arguments.
    Always(Action),
    /// By the bits `bits` of argument `arg`: `clear` when none is set, `set` when any is.
    Flags {
        arg: u32,
        bits: &'static [u64],
        clear: Action,
        set: Action,
    },
    /// By the **low 32 bits** of argument `arg` (the kernel reads an `int` or truncates):
    /// `listed` when they equal one of `values`, `others` for every other value.
    Low32 {
        arg: u32,
        values: &'static [u32],
        listed: Action,
        others: Action,
    },
}

/// What the compiler does when the build's libseccomp does not know a name of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfUnknown {
    /// The build fails (libseccomp too old for the allow-list?).
    Fail,
    /// The rule skips the name: for refusals, the policy's default refuses it anyway.
    Skip,
}

/// One line of a policy: these syscalls, decided this way.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub syscalls: &'static [&'static str],
    pub check: Check,
    pub if_unknown: IfUnknown,
}

/// A whole filter. No syscall may appear in two rules: libseccomp lets an unconditional rule
/// absorb a conditional one for the same syscall (see `lib.rs`), so the compiler refuses it.
/// It is compiled as a binary tree over the syscall numbers (libseccomp's optimization level
/// 2): each syscall is decided in a few comparisons, which matters twice: at run time, and when
/// the kernel installs the filter, since it then evaluates the filter for every syscall number
/// to build its cache of always-allowed calls (that took 0.6 ms per job with a linear list).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub rules: &'static [Rule],
    /// For every syscall no rule names.
    pub otherwise: Action,
    /// For a foreign architecture (e.g. i386 `int 0x80`) or an x32 syscall (`nr | 0x40000000`).
    pub foreign_arch: Action,
}

/// The job's filter, installed in each job process right before `execve`.
///
/// | Case | Action |
/// |------|--------|
/// | syscall in [`ALLOWED`] | allow |
/// | syscall in [`REFUSED`] (namespaces, mount family, tracing, BPF, io_uring, keys, kexec, modules, clock/time setting, ...) | `EPERM` |
/// | any other syscall, including `clone3` and syscalls newer than the list | `ENOSYS` (libc falls back, e.g. `clone3` to `clone`) |
/// | `clone` with any of [`NAMESPACE_FLAGS`] in `flags` | `EPERM`, otherwise allow |
/// | `ioctl` whose request's **low 32 bits** are `TIOCSTI` or `TIOCLINUX` | `EPERM`, otherwise allow |
/// | `socket` whose domain's low 32 bits are not `AF_UNIX`, `AF_INET` or `AF_INET6` | `EPERM`, otherwise allow |
/// | `personality` other than `0` (`PER_LINUX`) or `0xffffffff` (query) | `EPERM`, otherwise allow |
/// | a foreign architecture or an x32 syscall | kill the process (`SIGSYS`) |
///
/// `prctl` is allowed without argument checks: every option that could loosen the sandbox is
/// either one-way (`PR_SET_NO_NEW_PRIVS`, `PR_CAPBSET_DROP`, `PR_SET_SECCOMP`, which can only
/// stack a further filter) or needs a capability the job does not hold (`PR_SET_MM`).
#[rustfmt::skip]
pub const JOB: Policy = Policy {
    rules: &[
        Rule { syscalls: ALLOWED, check: Always(ALLOW), if_unknown: Fail },
        Rule { syscalls: REFUSED, check: Always(EPERM), if_unknown: Skip },
        Rule { syscalls: &["clone"], if_unknown: Fail,
               check: Flags { arg: 0, bits: &NAMESPACE_FLAGS, clear: ALLOW, set: EPERM } },
        Rule { syscalls: &["ioctl"], if_unknown: Fail,
               check: Low32 { arg: 1, values: &REFUSED_IOCTLS, listed: EPERM, others: ALLOW } },
        Rule { syscalls: &["socket"], if_unknown: Fail,
               check: Low32 { arg: 0, values: &SOCKET_DOMAINS, listed: ALLOW, others: EPERM } },
        Rule { syscalls: &["personality"], if_unknown: Fail,
               check: Low32 { arg: 0, values: &PERSONALITIES, listed: ALLOW, others: EPERM } },
    ],
    otherwise: ENOSYS,
    foreign_arch: KILL,
};

/// Syscalls allowed without argument checks: what python3, node, bash and coreutils need for
/// files, memory, time, signals, processes, sockets and IPC inside their own namespaces.
#[rustfmt::skip]
pub const ALLOWED: &[&str] = &[
    // Files and descriptors.
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
    "pwritev2", "open", "openat", "openat2", "creat", "close", "close_range", "lseek", "dup",
    "dup2", "dup3", "fcntl", "flock", "fsync", "fdatasync", "sync", "syncfs", "sync_file_range",
    "truncate", "ftruncate", "fallocate", "fadvise64", "readahead", "stat", "fstat", "lstat",
    "newfstatat", "statx", "statfs", "fstatfs", "access", "faccessat", "faccessat2", "getdents",
    "getdents64", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "rename", "renameat",
    "renameat2", "link", "linkat", "unlink", "unlinkat", "symlink", "symlinkat", "readlink",
    "readlinkat", "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown", "fchownat", "umask",
    "utime", "utimes", "utimensat", "futimesat", "mknod", "mknodat", "getxattr", "lgetxattr",
    "fgetxattr", "listxattr", "llistxattr", "flistxattr", "setxattr", "lsetxattr", "fsetxattr",
    "removexattr", "lremovexattr", "fremovexattr", "copy_file_range", "sendfile", "splice", "tee",
    "vmsplice", "pipe", "pipe2", "memfd_create", "inotify_init", "inotify_init1",
    "inotify_add_watch", "inotify_rm_watch",
    // Polling and event descriptors.
    "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "signalfd", "signalfd4",
    "timerfd_create", "timerfd_settime", "timerfd_gettime",
    // Memory.
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync", "mincore", "mlock",
    "mlock2", "munlock", "mlockall", "munlockall", "membarrier", "get_mempolicy", "set_mempolicy",
    "mbind", "pkey_alloc", "pkey_free", "pkey_mprotect", "remap_file_pages",
    // Processes and threads (`clone` is argument-checked below).
    "fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid", "kill",
    "tkill", "tgkill", "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid",
    "getgroups", "getresuid", "getresgid", "setuid", "setgid", "setreuid", "setregid", "setresuid",
    "setresgid", "setfsuid", "setfsgid", "setgroups", "capget", "capset", "getpgid", "setpgid",
    "getpgrp", "getsid", "setsid", "getpriority", "setpriority", "sched_yield",
    "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_setparam",
    "sched_getscheduler", "sched_setscheduler", "sched_get_priority_max", "sched_get_priority_min",
    "sched_rr_get_interval", "sched_getattr", "sched_setattr", "getrlimit", "setrlimit",
    "prlimit64", "getrusage", "times", "sysinfo", "uname", "prctl", "arch_prctl",
    "set_tid_address", "set_robust_list", "get_robust_list", "rseq", "futex", "restart_syscall",
    "pidfd_open", "pidfd_send_signal", "ioprio_get", "ioprio_set", "getcpu", "getrandom",
    "seccomp", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    // Signals and timers.
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "rt_sigpending",
    "rt_sigtimedwait", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "sigaltstack", "pause", "alarm",
    "getitimer", "setitimer", "timer_create", "timer_settime", "timer_gettime", "timer_getoverrun",
    "timer_delete",
    // Time (reading and sleeping only).
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    // Sockets (`socket` is argument-checked below; the job's net namespace is private).
    "socketpair", "bind", "listen", "accept", "accept4", "connect", "getsockname", "getpeername",
    "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown", "setsockopt",
    "getsockopt",
    // System V and POSIX IPC (the job's IPC namespace is private).
    "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl", "msgget",
    "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive",
    "mq_notify", "mq_getsetattr",
];

/// Syscalls refused with `EPERM`: they reach shared kernel state, other processes or
/// privileged subsystems. Names this libseccomp version does not know are skipped: the default
/// action refuses them anyway (`ENOSYS`).
#[rustfmt::skip]
pub const REFUSED: &[&str] = &[
    // Namespaces and the mount family.
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    // Other processes' memory, tracing, profiling.
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp", "process_madvise",
    "bpf", "perf_event_open", "userfaultfd",
    // io_uring bypasses this filter for the operations it submits.
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    // Kernel keyrings.
    "keyctl", "add_key", "request_key",
    // Kernel images and modules, system state.
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "acct",
    "swapon", "swapoff", "reboot", "syslog", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "quotactl", "quotactl_fd", "name_to_handle_at", "open_by_handle_at",
    "lookup_dcookie", "sethostname", "setdomainname", "vhangup", "iopl", "ioperm", "modify_ldt",
    "uselib", "fanotify_init", "nfsservctl",
];

/// The kernel's limit on a classic-BPF program (`BPF_MAXINSNS`).
pub const MAX_INSTRUCTIONS: usize = 4096;

/// `clone` flags that create namespaces. `CLONE_NEWTIME` shares its bit with the exit-signal
/// byte of `clone`; refusing it only refuses exit signals above 127, which are invalid anyway.
pub const NAMESPACE_FLAGS: [u64; 8] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

/// `ioctl` requests refused (compared on the low 32 bits, as the kernel truncates them).
pub const REFUSED_IOCTLS: [u32; 2] = [TIOCSTI, TIOCLINUX];
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541c;
const _: () = assert!(libc::TIOCSTI == TIOCSTI as u64 && libc::TIOCLINUX == TIOCLINUX as u64);

/// Socket domains allowed (compared on the low 32 bits: the kernel reads an `int`).
pub const SOCKET_DOMAINS: [u32; 3] = [
    libc::AF_UNIX as u32,
    libc::AF_INET as u32,
    libc::AF_INET6 as u32,
];

/// `personality` values allowed: `PER_LINUX` and the query value.
pub const PERSONALITIES: [u32; 2] = [0, 0xffff_ffff];

/// The output collector's filter (`collector/src/confine.rs` installs it, step 4): reading the
/// job's `/work` through descriptors, hashing, allocating, writing frames to its socket, naming
/// itself and exiting. Every other syscall, including every one a job may make that is not in
/// [`COLLECTOR_ALLOWED`], and a foreign architecture kill the collector (`SIGSYS`).
#[rustfmt::skip]
pub const COLLECTOR: Policy = Policy {
    rules: &[
        Rule { syscalls: COLLECTOR_ALLOWED, check: Always(ALLOW), if_unknown: Fail },
        Rule { syscalls: &["prctl"], if_unknown: Fail,
               check: Low32 { arg: 0, values: &[PR_SET_NAME], listed: ALLOW, others: KILL } },
    ],
    otherwise: KILL,
    foreign_arch: KILL,
};

/// The output collector's whole allow-list (and `prctl(PR_SET_NAME)`, [`COLLECTOR`]).
/// `getrandom` is there because the collector's process draws an 8-byte seed (`GRND_NONBLOCK`,
/// from the C library or Rust's runtime; it reads no file and reaches nothing of the job) right
/// after the filter is in place: while libseccomp built the filter at run time that draw came
/// first, now it comes under the filter.
#[rustfmt::skip]
pub const COLLECTOR_ALLOWED: &[&str] = &[
    "read", "write", "sendto", "close", "openat2", "fstat", "newfstatat", "statx", "getdents64",
    "lseek", "fcntl", "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "clock_gettime",
    "sigaltstack", "rt_sigreturn", "rt_sigprocmask", "futex", "sched_yield", "getrandom",
    "exit", "exit_group",
];

/// `prctl`'s `PR_SET_NAME` (compared on the low 32 bits: the kernel reads an `int`).
const PR_SET_NAME: u32 = 15;
const _: () = assert!(libc::PR_SET_NAME == PR_SET_NAME as i32);
