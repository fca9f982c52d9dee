//! The job's seccomp filter, as the helper holds it: the classic-BPF program that sandrund's
//! build script compiled from the policy (crate `sandrun-seccomp`, `seccomp/src/policy.rs`;
//! docs/sandrund.md, "Seccomp policy"), a `static` in the binary. It is installed in each job
//! process right before `execve`. The root helper links no libseccomp and compiles nothing.
//!
//! The tests below run the embedded program against real syscalls in forked probes, and check
//! that it is what the policy compiles to now.

// Unsafe code only in the tests' module (raw probes under the filter).
#![cfg_attr(not(test), forbid(unsafe_code))]

// `static JOB_FILTER: [libc::sock_filter; N]`.
include!(concat!(env!("OUT_DIR"), "/job_filter.rs"));
// What `sock_fprog::len` and the kernel (`BPF_MAXINSNS`) take, checked when this is compiled.
const _: () = assert!(!JOB_FILTER.is_empty() && JOB_FILTER.len() <= 4096);

/// A classic-BPF seccomp program of 1 to 4,096 instructions (so its length fits
/// `sock_fprog::len`).
#[derive(Clone, Copy)]
pub struct SeccompProgram {
    filter: &'static [libc::sock_filter],
}

impl SeccompProgram {
    /// The job's filter, as the build compiled it.
    pub fn job() -> Self {
        Self {
            filter: &JOB_FILTER,
        }
    }

    /// Installs the filter on the calling thread. `NO_NEW_PRIVS` must already be set. Returns
    /// the kernel's errno on failure. Allocation-free.
    pub fn install(&self) -> Result<(), nix::errno::Errno> {
        crate::sys::install_seccomp_filter(self.filter)
    }
}

// The tests fork probes and make raw syscalls under the filter: only they may use unsafe code.
#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use std::ffi::CString;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    use nix::sys::signal::Signal;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;

    use super::*;
    use libseccomp::ScmpSyscall;
    use sandrun_seccomp::{NAMESPACE_FLAGS, REFUSED};

    /// Exit code of a probe whose syscall succeeded (errnos are all below it).
    const SUCCESS: i32 = 200;
    /// Exit codes of the harness itself failing in the child.
    const NNP_FAILED: i32 = 201;
    const INSTALL_FAILED: i32 = 202;
    const EXEC_FAILED: i32 = 203;

    fn program() -> SeccompProgram {
        SeccompProgram::job()
    }

    /// Sets `NO_NEW_PRIVS` and installs the filter; `_exit`s on failure. Child-only, no allocation.
    fn enter_filter(program: &SeccompProgram) {
        // SAFETY: prctl with integer arguments reads no memory.
        let nnp = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        if nnp != 0 {
            // SAFETY: `_exit` ends the child without running the parent's destructors.
            unsafe { libc::_exit(NNP_FAILED) };
        }
        if program.install().is_err() {
            // SAFETY: as above.
            unsafe { libc::_exit(INSTALL_FAILED) };
        }
    }

    /// Forks a child that installs the filter, runs `probe` and exits with its result.
    /// `probe` must only make raw syscalls: the test harness is multi-threaded, so the child
    /// may not allocate or take locks.
    fn run_filtered(program: &SeccompProgram, probe: impl FnOnce() -> i32) -> WaitStatus {
        // SAFETY: the child only runs async-signal-safe code (raw syscalls, `_exit`).
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", nix::errno::Errno::last()),
            0 => {
                enter_filter(program);
                let code = probe();
                // SAFETY: ends the child without unwinding into the test harness.
                unsafe { libc::_exit(code) }
            }
            pid => waitpid(Pid::from_raw(pid), None).expect("waitpid on our own child"),
        }
    }

    /// The probe exit code for a raw syscall's return value: `SUCCESS` or the errno.
    fn outcome(rc: libc::c_long) -> i32 {
        if rc >= 0 {
            SUCCESS
        } else {
            nix::errno::Errno::last_raw()
        }
    }

    /// Like `outcome`, for syscalls that fork: a new process exits at once with `SUCCESS`.
    fn fork_outcome(rc: libc::c_long) -> i32 {
        if rc == 0 {
            // SAFETY: we are the new process; it ends without touching any state.
            unsafe { libc::_exit(SUCCESS) };
        }
        if rc > 0 {
            let mut status = 0;
            // SAFETY: reaps the process just created; `status` is a valid out-pointer.
            unsafe { libc::waitpid(i32::try_from(rc).unwrap_or(-1), &mut status, 0) };
        }
        outcome(rc)
    }

    fn assert_exit(status: WaitStatus, expected: i32, what: &str) {
        match status {
            WaitStatus::Exited(_, code) => assert_eq!(
                code, expected,
                "{what}: child exited {code}, expected {expected} (errno or {SUCCESS}=success)"
            ),
            other => panic!("{what}: child did not exit normally: {other:?}"),
        }
    }

    fn syscall6(nr: libc::c_long, args: [libc::c_long; 6]) -> libc::c_long {
        let [a, b, c, d, e, f] = args;
        // SAFETY: the probes only pass integers or pointers the kernel validates; a refused
        // call never reaches the kernel's implementation.
        unsafe { libc::syscall(nr, a, b, c, d, e, f) }
    }

    fn assert_refused(nr: libc::c_long, args: [libc::c_long; 6], errno: i32, what: &str) {
        let status = run_filtered(&program(), || outcome(syscall6(nr, args)));
        assert_exit(status, errno, what);
    }

    #[test]
    fn given_filter_when_unshare_newns_then_eperm() {
        let args = [libc::CLONE_NEWNS.into(), 0, 0, 0, 0, 0];
        assert_refused(libc::SYS_unshare, args, libc::EPERM, "unshare(CLONE_NEWNS)");
    }

    #[test]
    fn given_filter_when_mount_tmpfs_then_eperm() {
        let (src, target) = (
            c"none".as_ptr() as libc::c_long,
            c"/tmp".as_ptr() as libc::c_long,
        );
        let args = [src, target, c"tmpfs".as_ptr() as libc::c_long, 0, 0, 0];
        assert_refused(libc::SYS_mount, args, libc::EPERM, "mount(tmpfs)");
    }

    #[test]
    fn given_filter_when_ptrace_traceme_then_eperm() {
        let args = [libc::PTRACE_TRACEME.into(), 0, 0, 0, 0, 0];
        assert_refused(libc::SYS_ptrace, args, libc::EPERM, "ptrace(TRACEME)");
    }

    #[test]
    fn given_filter_when_bpf_perf_io_uring_keyctl_userfaultfd_then_eperm() {
        let zero = [0; 6];
        assert_refused(libc::SYS_bpf, zero, libc::EPERM, "bpf");
        assert_refused(
            libc::SYS_perf_event_open,
            zero,
            libc::EPERM,
            "perf_event_open",
        );
        assert_refused(
            libc::SYS_io_uring_setup,
            [1, 0, 0, 0, 0, 0],
            libc::EPERM,
            "io_uring",
        );
        assert_refused(libc::SYS_keyctl, zero, libc::EPERM, "keyctl");
        assert_refused(libc::SYS_userfaultfd, zero, libc::EPERM, "userfaultfd");
    }

    #[test]
    fn given_filter_when_every_refused_syscall_is_called_then_each_gets_eperm() {
        let numbers: Vec<(&str, libc::c_long)> = REFUSED
            .iter()
            .filter_map(|&n| Some((n, i32::from(ScmpSyscall::from_name(n).ok()?).into())))
            .collect();
        assert!(
            numbers.len() > 40,
            "libseccomp resolved only {} names",
            numbers.len()
        );
        let status = run_filtered(&program(), || {
            // No controlling terminal, so even an unfiltered vhangup would touch nothing.
            // SAFETY: setsid takes no arguments.
            unsafe { libc::setsid() };
            // All-ones arguments: invalid flags, pointers and lengths for every one of them.
            let bad = [-1; 6];
            for (i, &(_, nr)) in numbers.iter().enumerate() {
                if outcome(syscall6(nr, bad)) != libc::EPERM {
                    return 100 + i32::try_from(i).unwrap_or(99);
                }
            }
            SUCCESS
        });
        if let WaitStatus::Exited(_, code @ 100..=199) = status {
            let idx = usize::try_from(code - 100).unwrap_or(usize::MAX);
            panic!(
                "refused syscall {:?} was not refused with EPERM",
                numbers.get(idx)
            );
        }
        assert_exit(status, SUCCESS, "refused list");
    }

    #[test]
    fn given_filter_when_ioctl_tiocsti_or_tioclinux_then_eperm_even_with_high_bits_set() {
        let byte = b"x".as_ptr() as libc::c_long;
        for request in [
            libc::TIOCSTI as libc::c_long,
            0x1_0000_0000 | libc::TIOCSTI as libc::c_long,
            libc::TIOCLINUX as libc::c_long,
            -0x1_0000_0000 | libc::TIOCLINUX as libc::c_long,
        ] {
            let args = [0, request, byte, 0, 0, 0];
            assert_refused(
                libc::SYS_ioctl,
                args,
                libc::EPERM,
                &format!("ioctl({request:#x})"),
            );
        }
    }

    #[test]
    fn given_filter_when_ordinary_ioctl_then_it_reaches_the_kernel() {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        let mut pending: libc::c_int = -1;
        let out = std::ptr::addr_of_mut!(pending) as libc::c_long;
        for request in [
            libc::FIONREAD as libc::c_long,
            0x7_0000_0000 | libc::FIONREAD as libc::c_long,
        ] {
            let args = [read.as_raw_fd().into(), request, out, 0, 0, 0];
            let status = run_filtered(&program(), || outcome(syscall6(libc::SYS_ioctl, args)));
            assert_exit(status, SUCCESS, &format!("ioctl(pipe, {request:#x})"));
        }
        // TCGETS on a pipe reaches the kernel, which answers ENOTTY (the filter would say EPERM).
        let args = [
            write.as_raw_fd().into(),
            libc::TCGETS as libc::c_long,
            out,
            0,
            0,
            0,
        ];
        let status = run_filtered(&program(), || outcome(syscall6(libc::SYS_ioctl, args)));
        assert_exit(status, libc::ENOTTY, "ioctl(pipe, TCGETS)");
    }

    #[test]
    fn given_filter_when_clone_with_any_namespace_flag_then_eperm() {
        for flag in NAMESPACE_FLAGS {
            let flags = i64::try_from(flag).expect("namespace flags fit in i64") | 0x11;
            let probe = || fork_outcome(syscall6(libc::SYS_clone, [flags, 0, 0, 0, 0, 0]));
            assert_exit(
                run_filtered(&program(), probe),
                libc::EPERM,
                &format!("clone({flag:#x})"),
            );
        }
    }

    #[test]
    fn given_filter_when_clone3_then_enosys() {
        let mut args = [0u64; 11];
        args[4] = libc::SIGCHLD as u64; // exit_signal
        let ptr = args.as_ptr() as libc::c_long;
        let probe = || fork_outcome(syscall6(libc::SYS_clone3, [ptr, 88, 0, 0, 0, 0]));
        assert_exit(run_filtered(&program(), probe), libc::ENOSYS, "clone3");
    }

    #[test]
    fn given_filter_when_plain_fork_then_it_works() {
        // SAFETY: libc::fork is async-signal-safe; the new process `_exit`s at once.
        let probe = || fork_outcome(libc::c_long::from(unsafe { libc::fork() }));
        assert_exit(run_filtered(&program(), probe), SUCCESS, "fork");
    }

    #[test]
    fn given_filter_when_socket_netlink_or_packet_then_eperm() {
        let netlink = libc::c_long::from(libc::AF_NETLINK);
        for domain in [netlink, 0x1_0000_0000 | netlink, libc::AF_PACKET.into()] {
            let args = [domain, libc::SOCK_RAW.into(), 0, 0, 0, 0];
            assert_refused(
                libc::SYS_socket,
                args,
                libc::EPERM,
                &format!("socket({domain:#x})"),
            );
        }
    }

    #[test]
    fn given_filter_when_socket_unix_with_high_bits_then_the_kernel_sees_af_unix() {
        let args = [
            0x1_0000_0000 | libc::c_long::from(libc::AF_UNIX),
            1,
            0,
            0,
            0,
            0,
        ];
        let status = run_filtered(&program(), || outcome(syscall6(libc::SYS_socket, args)));
        assert_exit(status, SUCCESS, "socket(1 << 32 | AF_UNIX, SOCK_STREAM)");
    }

    #[test]
    fn given_filter_when_socket_inet_unix_inet6_then_it_works() {
        for domain in [libc::AF_INET, libc::AF_UNIX, libc::AF_INET6] {
            let args = [domain.into(), libc::SOCK_STREAM.into(), 0, 0, 0, 0];
            let status = run_filtered(&program(), || outcome(syscall6(libc::SYS_socket, args)));
            assert_exit(status, SUCCESS, &format!("socket({domain})"));
        }
    }

    #[test]
    fn given_filter_when_personality_query_then_allowed_and_when_changed_then_eperm() {
        let query = [0xffff_ffff, 0, 0, 0, 0, 0];
        let status = run_filtered(&program(), || {
            outcome(syscall6(libc::SYS_personality, query))
        });
        assert_exit(status, SUCCESS, "personality(query)");
        let no_aslr = [libc::ADDR_NO_RANDOMIZE.into(), 0, 0, 0, 0, 0];
        assert_refused(
            libc::SYS_personality,
            no_aslr,
            libc::EPERM,
            "personality(no ASLR)",
        );
    }

    #[test]
    fn given_filter_when_x32_getpid_then_the_process_is_killed_by_sigsys() {
        let nr = 0x4000_0000 | libc::SYS_getpid;
        let status = run_filtered(&program(), || outcome(syscall6(nr, [0; 6])));
        match status {
            WaitStatus::Signaled(_, Signal::SIGSYS, _) => {}
            other => panic!("x32 getpid: expected SIGSYS kill, got {other:?}"),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn given_filter_when_i386_getpid_via_int80_then_the_process_is_killed_by_sigsys() {
        let status = run_filtered(&program(), || {
            let mut eax: i32 = 20; // getpid in the i386 table
                                   // SAFETY: `int 0x80` runs the i386 getpid, which only returns a number in eax;
                                   // the other argument registers are read but unused by getpid.
            unsafe { std::arch::asm!("int 0x80", inout("eax") eax, options(nostack)) };
            if eax >= 0 {
                SUCCESS
            } else {
                -eax
            }
        });
        match status {
            WaitStatus::Signaled(_, Signal::SIGSYS, _) => {}
            other => panic!("i386 getpid: expected SIGSYS kill, got {other:?}"),
        }
    }

    #[test]
    fn given_filter_when_unknown_or_unlisted_syscall_then_enosys() {
        assert_refused(999, [0; 6], libc::ENOSYS, "syscall 999");
        // io_setup exists (unfiltered it answers EINVAL here) but is not on the list.
        assert_refused(libc::SYS_io_setup, [0; 6], libc::ENOSYS, "io_setup");
    }

    /// Runs `argv` under the filter with stdout on a pipe; returns the exit status and stdout.
    fn exec_filtered(argv: &[&str]) -> (WaitStatus, String) {
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(*a).expect("no NUL"))
            .collect();
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let env = [
            c"PATH=/usr/local/bin:/usr/bin:/bin",
            c"HOME=/tmp",
            c"LANG=C.UTF-8",
        ];
        let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        env_ptrs.push(std::ptr::null());
        let program = program();
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2 for stdout");
        // SAFETY: the child only makes raw syscalls before execve (no allocation, no locks).
        let pid = match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", nix::errno::Errno::last()),
            0 => {
                // SAFETY: dup2 of a valid fd onto stdout; execve with NUL-terminated arrays
                // prepared before the fork; `_exit` if it returns.
                unsafe {
                    libc::dup2(write.as_raw_fd(), 1);
                    enter_filter(&program);
                    libc::execve(argv_ptrs[0], argv_ptrs.as_ptr(), env_ptrs.as_ptr());
                    libc::_exit(EXEC_FAILED)
                }
            }
            pid => Pid::from_raw(pid),
        };
        drop(write);
        let mut out = String::new();
        std::fs::File::from(read)
            .read_to_string(&mut out)
            .expect("read stdout");
        (waitpid(pid, None).expect("waitpid"), out)
    }

    #[test]
    fn given_filter_when_sh_echo_runs_then_it_prints_ok_and_exits_zero() {
        let (status, out) = exec_filtered(&["/bin/sh", "-c", "echo ok"]);
        assert_exit(status, 0, "sh -c 'echo ok'");
        assert_eq!(out, "ok\n");
    }

    #[test]
    fn given_filter_when_bash_runs_coreutils_then_it_exits_zero() {
        let dir = tempfile::tempdir().expect("temp dir");
        let dir = dir.path().to_str().expect("temp dir path is UTF-8");
        let script = "set -e; cd \"$1\"; x=$(echo a | tr a b); [ \"$x\" = b ]; \
            mkdir d; touch d/f; cp -r d e; mv e g; ls g >/dev/null; rm -rf d g; \
            [ \"$(printf '3\\n1\\n2\\n' | sort -n | head -n 1)\" = 1 ]; \
            gzip -c /etc/passwd | gunzip | wc -l >/dev/null; sleep 0.01 & wait; \
            stat . >/dev/null; date >/dev/null; id -u >/dev/null; echo ok";
        let (status, out) = exec_filtered(&["/bin/bash", "-c", script, "bash", dir]);
        assert_exit(status, 0, "bash with coreutils");
        assert_eq!(out, "ok\n");
    }

    #[test]
    fn given_filter_when_python_imports_and_runs_a_subprocess_then_it_exits_zero() {
        let code =
            "import os,sys,json,subprocess,threading; print(subprocess.run(['true']).returncode)";
        let (status, out) = exec_filtered(&["/usr/bin/python3", "-c", code]);
        assert_exit(status, 0, "python3");
        assert_eq!(out, "0\n");
    }

    #[test]
    fn given_filter_when_node_prints_then_it_exits_zero() {
        assert!(
            std::path::Path::new("/usr/bin/node").exists(),
            "/usr/bin/node is missing: packaging/deps.sh installs nodejs, which jobs may use"
        );
        let (status, out) = exec_filtered(&["/usr/bin/node", "-e", "console.log(1)"]);
        assert_exit(status, 0, "node");
        assert_eq!(out, "1\n");
    }

    #[test]
    fn given_the_embedded_program_then_it_is_what_the_policy_compiles_to_now() {
        // Compiled at the API level libseccomp detects on this kernel, not the build's pinned
        // one: an equal program also says the pin changes nothing here.
        let now = sandrun_seccomp::compile(&sandrun_seccomp::JOB).expect("the policy compiles");
        let embedded: Vec<sandrun_seccomp::Instruction> = (JOB_FILTER.iter())
            .map(|i| (i.code, i.jt, i.jf, i.k))
            .collect();
        eprintln!("seccomp program: {} instructions", embedded.len());
        assert_eq!(embedded, now);
        // The first instruction loads `seccomp_data.arch` (offset 4) for the architecture check.
        let load_word = u16::try_from(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS).unwrap();
        assert_eq!((embedded[0].0, embedded[0].3), (load_word, 4));
    }
}
