//! `sandrun-deny-syscalls`: runs a command under a seccomp filter that answers the named system
//! calls with an errno and allows everything else, the way a restrictive host does (systemd's
//! `RestrictNamespaces=` or an old container profile answering `clone3` with ENOSYS,
//! `ProtectHostname=` answering `sethostname` with EPERM). The tests run the real helper under
//! it to check that the helper copes, or reports the failing step.
//!
//! Usage: `sandrun-deny-syscalls NAME=ERRNO... -- PROGRAM [ARGS...]`, ERRNO one of `ENOSYS`,
//! `EPERM`, `EACCES` or a number. The filter is inherited by everything the command starts.

use std::ffi::CString;

use libseccomp::{ScmpAction, ScmpFilterContext, ScmpSyscall};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(split) = args.iter().position(|a| a == "--") else {
        usage("no `--` before the command");
    };
    let (rules, command) = (&args[..split], &args[split + 1..]);
    if rules.is_empty() || command.is_empty() {
        usage("give at least one NAME=ERRNO and a command");
    }
    let mut filter = ScmpFilterContext::new_filter(ScmpAction::Allow)
        .unwrap_or_else(|e| fatal(&format!("seccomp filter: {e}")));
    // Like systemd for a root service: no NO_NEW_PRIVS, so the command runs as it would there.
    if let Err(e) = filter.set_ctl_nnp(false) {
        fatal(&format!("seccomp NO_NEW_PRIVS attribute: {e}"));
    }
    for rule in rules {
        let Some((name, errno)) = rule.split_once('=') else {
            usage(&format!("{rule:?} is not NAME=ERRNO"));
        };
        let errno = parse_errno(errno).unwrap_or_else(|| usage(&format!("bad errno in {rule:?}")));
        let call = ScmpSyscall::from_name(name)
            .unwrap_or_else(|e| fatal(&format!("unknown system call {name:?}: {e}")));
        if let Err(e) = filter.add_rule(ScmpAction::Errno(errno), call) {
            fatal(&format!("rule {rule:?}: {e}"));
        }
    }
    if let Err(e) = filter.load() {
        fatal(&format!("loading the seccomp filter: {e}"));
    }
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_str()).unwrap_or_else(|_| usage("NUL in the command")))
        .collect();
    let Err(e) = nix::unistd::execvp(&argv[0], &argv);
    fatal(&format!("exec {}: {e}", command[0]));
}

fn parse_errno(text: &str) -> Option<i32> {
    match text {
        "ENOSYS" => Some(libc::ENOSYS),
        "EPERM" => Some(libc::EPERM),
        "EACCES" => Some(libc::EACCES),
        n => n.parse().ok().filter(|&n| n > 0),
    }
}

fn usage(why: &str) -> ! {
    eprintln!("sandrun-deny-syscalls: {why}\nusage: sandrun-deny-syscalls NAME=ERRNO... -- PROGRAM [ARGS...]");
    std::process::exit(2);
}

fn fatal(why: &str) -> ! {
    eprintln!("sandrun-deny-syscalls: {why}");
    std::process::exit(1);
}
