//! `sandrun-probe`: runs inside a sandbox and reports what it can see and do, one JSON line per
//! check on stdout. The integration tests send this binary as an input file and assert on its
//! report, so every isolation claim is checked from the inside, against the real kernel.
//!
//! Usage: `sandrun-probe <check> [args]`. Attacks use raw syscalls so that libc fallbacks cannot
//! hide what the kernel (and seccomp) answered.

use std::ffi::CString;
use std::io::Write;

use serde_json::{json, Value};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(check) = args.first() else {
        eprintln!("usage: sandrun-probe <check> [args]");
        std::process::exit(2);
    };
    let arg = args.get(1).map(String::as_str);
    refuse_attacks_as_root(check);
    let report = match (check.as_str(), arg) {
        ("pids", _) => pids(),
        ("hostname", _) => hostname(),
        ("ifaces", _) => ifaces(),
        ("tcp", Some(port)) => tcp(port),
        ("ids", _) => ids(),
        ("write", Some(path)) => write_file(path),
        ("read", Some(path)) => read_file(path),
        ("env", _) => env(),
        ("fds", _) => fds(),
        ("syscalls", _) => syscalls(),
        ("forkbomb", _) => forkbomb(),
        ("membomb", Some(mb)) => membomb(mb),
        ("spin", _) => spin(),
        ("daemon", _) => daemon(),
        ("flood", Some(n)) => flood(n),
        ("fill", _) => fill(),
        ("inotify", Some(dir)) => inotify(dir, args.get(2), args.get(3)),
        ("open", Some(path)) => open_file(path),
        ("flock", Some(path)) => flock(path, args.get(2)),
        ("ofdlock", Some(path)) => ofd_lock(path, args.get(2)),
        ("proc", _) => proc_masks(),
        _ => {
            eprintln!("sandrun-probe: unknown check or missing argument: {args:?}");
            std::process::exit(2);
        }
    };
    println!("{}", json!({ "check": check, "result": report }));
}

/// The attack checks are meant for an unprivileged sandbox. Run by accident as root on the host,
/// a fork bomb or a successful mount would hurt the host, so they refuse.
fn refuse_attacks_as_root(check: &str) {
    let attacks = [
        "syscalls", "forkbomb", "membomb", "spin", "daemon", "fill", "flood",
    ];
    // SAFETY: getuid has no preconditions.
    if attacks.contains(&check) && unsafe { libc::getuid() } == 0 {
        eprintln!("sandrun-probe: refusing attack check {check:?} as root");
        std::process::exit(2);
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The errno of a raw syscall result: 0 if it succeeded.
fn errno_of(ret: libc::c_long) -> i32 {
    if ret < 0 {
        errno()
    } else {
        0
    }
}

fn pids() -> Value {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    json!({ "pids": pids, "self": std::process::id() })
}

fn hostname() -> Value {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    json!({ "hostname": name.trim() })
}

fn ifaces() -> Value {
    let mut sysfs: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    sysfs.sort();
    json!({ "sysfs": sysfs, "proc_net_dev": proc_net_dev(), "ioctl": ioctl_names() })
}

/// Interface names from /proc/net/dev, which shows the reader's network namespace.
fn proc_net_dev() -> Value {
    match std::fs::read_to_string("/proc/net/dev") {
        Ok(text) => {
            let names: Vec<&str> = text
                .lines()
                .skip(2)
                .filter_map(|l| Some(l.split_once(':')?.0.trim()))
                .collect();
            json!(names)
        }
        Err(e) => json!({ "errno": e.raw_os_error() }),
    }
}

/// Interface names from the kernel by index (SIOCGIFNAME), independent of /sys and /proc.
fn ioctl_names() -> Value {
    // SAFETY: socket has no memory preconditions.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return json!({ "errno": errno() });
    }
    let mut names = Vec::new();
    for index in 1..256 {
        // SAFETY: ifreq is plain data for which all-zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_ifru.ifru_ifindex = index;
        // SAFETY: SIOCGIFNAME reads the index and writes a NUL-terminated name into `req`,
        // which lives for the call.
        if unsafe { libc::ioctl(sock, libc::SIOCGIFNAME, &mut req) } == 0 {
            // SAFETY: the kernel wrote a NUL-terminated name of at most IFNAMSIZ bytes.
            let name = unsafe { std::ffi::CStr::from_ptr(req.ifr_name.as_ptr()) };
            names.push(name.to_string_lossy().into_owned());
        }
    }
    // SAFETY: `sock` is our open descriptor.
    unsafe { libc::close(sock) };
    json!(names)
}

fn tcp(port: &str) -> Value {
    let addr = format!("127.0.0.1:{port}");
    match std::net::TcpStream::connect(&addr) {
        Ok(_) => json!({ "connected": true, "errno": 0 }),
        Err(e) => json!({ "connected": false, "errno": e.raw_os_error().unwrap_or(0) }),
    }
}

fn ids() -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut out = serde_json::Map::new();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let keep = [
            "Uid",
            "Gid",
            "Groups",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Seccomp",
        ];
        if keep.contains(&key) {
            out.insert(key.to_owned(), json!(value.trim()));
        }
    }
    // SAFETY: getuid/geteuid have no preconditions.
    let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    out.insert("uid".into(), json!(uid));
    out.insert("euid".into(), json!(euid));
    Value::Object(out)
}

fn write_file(path: &str) -> Value {
    match std::fs::write(path, b"probe") {
        Ok(()) => json!({ "ok": true, "errno": 0 }),
        Err(e) => json!({ "ok": false, "errno": e.raw_os_error().unwrap_or(0) }),
    }
}

fn read_file(path: &str) -> Value {
    match std::fs::read(path) {
        Ok(data) => json!({ "ok": true, "errno": 0, "content": String::from_utf8_lossy(&data) }),
        Err(e) => json!({ "ok": false, "errno": e.raw_os_error().unwrap_or(0) }),
    }
}

fn env() -> Value {
    let vars: serde_json::Map<String, Value> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into(), json!(v.to_string_lossy())))
        .collect();
    Value::Object(vars)
}

/// Open descriptors, excluding the one used to list them.
fn fds() -> Value {
    let mut fds = Vec::new();
    let path = CString::from(c"/proc/self/fd");
    // SAFETY: `path` is a valid C string; the DIR stream is read until NULL and closed once; the
    // entry pointers are only used before the next readdir call.
    unsafe {
        let dir = libc::opendir(path.as_ptr());
        if dir.is_null() {
            return json!({ "error": errno() });
        }
        let own = libc::dirfd(dir);
        loop {
            let ent = libc::readdir(dir);
            if ent.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_string_lossy();
            if let Ok(fd) = name.parse::<i32>() {
                if fd != own {
                    fds.push(fd);
                }
            }
        }
        libc::closedir(dir);
    }
    fds.sort_unstable();
    let targets: Vec<String> = fds
        .iter()
        .map(|fd| {
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
        .collect();
    json!({ "fds": fds, "targets": targets })
}

/// Tries each forbidden syscall and reports its errno (0 means it succeeded).
fn syscalls() -> Value {
    let mut out = serde_json::Map::new();
    let mut record = |name: &str, e: i32| {
        out.insert(name.to_owned(), json!(e));
    };
    // SAFETY: raw syscalls with constant, valid arguments or pointers to live locals; none of
    // them can affect this process's memory safety whether they succeed or fail.
    unsafe {
        record(
            "unshare",
            errno_of(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER)),
        );
        record(
            "unshare_ns",
            errno_of(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS)),
        );
        let none = c"none".as_ptr();
        let tmp = c"/tmp".as_ptr();
        let tmpfs = c"tmpfs".as_ptr();
        record(
            "mount",
            errno_of(libc::syscall(libc::SYS_mount, none, tmp, tmpfs, 0, 0)),
        );
        record(
            "ptrace",
            errno_of(libc::syscall(
                libc::SYS_ptrace,
                libc::PTRACE_TRACEME,
                0,
                0,
                0,
            )),
        );
        record("bpf", errno_of(libc::syscall(libc::SYS_bpf, 0, 0, 0)));
        let mut attr = [0u8; 128];
        record("perf_event_open", perf_event_open(&mut attr));
        let mut params = [0u8; 120];
        let ret = libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr());
        close_if_fd(ret);
        record("io_uring_setup", errno_of(ret));
        // KEYCTL_GET_KEYRING_ID (0) of KEY_SPEC_SESSION_KEYRING (-3), without creating it.
        record(
            "keyctl",
            errno_of(libc::syscall(libc::SYS_keyctl, 0, -3, 0)),
        );
        record(
            "add_key",
            errno_of(libc::syscall(
                libc::SYS_add_key,
                c"user".as_ptr(),
                c"k".as_ptr(),
                0,
                0,
                -3,
            )),
        );
        let ret = libc::syscall(libc::SYS_userfaultfd, 0);
        close_if_fd(ret);
        record("userfaultfd", errno_of(ret));
        let c: u8 = b'x';
        let ret = libc::syscall(libc::SYS_ioctl, 0, libc::TIOCSTI, &c as *const u8);
        record("tiocsti", errno_of(ret));
        let high = 0x1_0000_0000u64 | libc::TIOCSTI;
        record(
            "tiocsti_high_bits",
            errno_of(libc::syscall(libc::SYS_ioctl, 0, high, &c as *const u8)),
        );
        record(
            "setns",
            errno_of(libc::syscall(libc::SYS_setns, 0, libc::CLONE_NEWNET)),
        );
        record("clone_newuser", clone_with(libc::CLONE_NEWUSER));
        record("clone3", errno_of(libc::syscall(libc::SYS_clone3, 0, 0)));
        let ret = libc::syscall(libc::SYS_socket, libc::AF_NETLINK, libc::SOCK_RAW, 0);
        close_if_fd(ret);
        record("socket_netlink", errno_of(ret));
        let ret = libc::syscall(libc::SYS_socket, libc::AF_PACKET, libc::SOCK_RAW, 0);
        close_if_fd(ret);
        record("socket_packet", errno_of(ret));
    }
    Value::Object(out)
}

/// perf_event_open of a software clock counter on this process.
unsafe fn perf_event_open(attr: &mut [u8; 128]) -> i32 {
    // struct perf_event_attr: u32 type (1 = PERF_TYPE_SOFTWARE), u32 size, u64 config (0 =
    // cpu-clock); the rest zero.
    attr[0..4].copy_from_slice(&1u32.to_ne_bytes());
    attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
    // SAFETY: `attr` is a live 128-byte buffer whose declared size matches.
    let ret = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_mut_ptr(), 0, -1, -1, 0) };
    close_if_fd(ret);
    errno_of(ret)
}

/// Raw clone with namespace flags; a child that does get created exits at once.
unsafe fn clone_with(flags: libc::c_int) -> i32 {
    // SAFETY: a clone without CLONE_VM gives the child its own copy of memory; it only calls
    // _exit, which is async-signal-safe.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags | libc::SIGCHLD, 0, 0, 0, 0) };
    if ret == 0 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) };
    }
    let e = errno_of(ret);
    if ret > 0 {
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        unsafe { libc::waitpid(i32::try_from(ret).unwrap_or(-1), &mut status, 0) };
    }
    e
}

fn close_if_fd(ret: libc::c_long) {
    if let Ok(fd) = i32::try_from(ret) {
        if fd >= 0 {
            // SAFETY: `fd` was just returned by the kernel to us and is not owned elsewhere.
            unsafe { libc::close(fd) };
        }
    }
}

/// Forks forever in every process; only the pids limit or the timeout ends it.
fn forkbomb() -> Value {
    loop {
        // SAFETY: the children run the same loop; no locks are held across fork.
        unsafe { libc::fork() };
    }
}

/// Allocates and touches `mb` MiB.
fn membomb(mb: &str) -> Value {
    let mb: usize = mb.parse().unwrap_or(0);
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    for _ in 0..mb {
        // Non-zero fill so that every page is really touched.
        blocks.push(vec![1u8; 1 << 20]);
    }
    json!({ "allocated_mb": blocks.len() })
}

fn spin() -> Value {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// Double-forks a sleeper that ignores polite signals and writes its pid to /work/daemon.pid;
/// the main process exits once the file exists.
fn daemon() -> Value {
    // SAFETY: this program is single-threaded, so fork is safe; the children only call
    // async-signal-safe functions before the grandchild, which then runs ordinary code.
    let first = unsafe { libc::fork() };
    if first == 0 {
        // SAFETY: setsid and fork have no preconditions here.
        unsafe {
            libc::setsid();
            if libc::fork() != 0 {
                libc::_exit(0);
            }
        }
        sleeper();
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    unsafe { libc::waitpid(first, &mut status, 0) };
    while !std::path::Path::new("/work/daemon.pid").exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    json!({ "daemonized": true })
}

fn sleeper() -> ! {
    // SAFETY: setting signal dispositions to SIG_IGN has no preconditions.
    unsafe {
        for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let pid = std::process::id();
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let _ = std::fs::write("/work/daemon.tmp", format!("{pid} {uid}\n"));
    let _ = std::fs::rename("/work/daemon.tmp", "/work/daemon.pid");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Writes `n` bytes to stdout, then exits with status 3 so the test can see the status survived.
fn flood(n: &str) -> Value {
    let n: u64 = n.parse().unwrap_or(0);
    let block = vec![b'A'; 64 * 1024];
    let mut left = n;
    let mut out = std::io::stdout().lock();
    while left > 0 {
        let len = usize::try_from(left.min(block.len() as u64)).unwrap_or(block.len());
        if out.write_all(&block[..len]).is_err() {
            break;
        }
        left -= len as u64;
    }
    let _ = out.flush();
    std::process::exit(3);
}

/// Writes to /work until the filesystem refuses, and reports the errno of the refusal.
fn fill() -> Value {
    // SAFETY: ignoring SIGXFSZ has no preconditions; it turns the file-size rlimit into EFBIG.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let block = vec![0x5au8; 1 << 20];
    let mut total: u64 = 0;
    for i in 0.. {
        let path = format!("/work/fill-{i}");
        let mut file = match std::fs::File::create(&path) {
            Ok(f) => f,
            Err(e) => return fill_report(total, e.raw_os_error(), "create"),
        };
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::EFBIG) => break,
                Err(e) => return fill_report(total, e.raw_os_error(), "write"),
            }
        }
    }
    fill_report(total, None, "unreachable")
}

fn fill_report(bytes: u64, errno: Option<i32>, step: &str) -> Value {
    let fs_type = nix_free_statfs_type("/work");
    json!({ "bytes": bytes, "errno": errno.unwrap_or(0), "step": step, "fs_type": fs_type })
}

/// `f_type` of the filesystem holding `path` (0x01021994 is tmpfs).
fn nix_free_statfs_type(path: &str) -> i64 {
    let Ok(c) = CString::new(path) else { return -1 };
    // SAFETY: statfs is plain data for which all-zero is valid.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `buf` a live statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return -1;
    }
    buf.f_type
}

/// Milliseconds from an optional argument (default 0).
fn millis(arg: Option<&String>) -> std::time::Duration {
    std::time::Duration::from_millis(arg.and_then(|a| a.parse().ok()).unwrap_or(0))
}

/// Watches `dir` with inotify (open, access, close) for `ms` milliseconds (or until an event for
/// `file` arrives) and reports the names it saw (`foreign`: not caused by this job). Then, as a
/// control that the watch works, opens `dir/file` itself and reports whether that was seen.
/// `file` `.` watches `dir` as a file itself (a device, say): its events carry the name `.`.
fn inotify(dir: &str, file: Option<&String>, ms: Option<&String>) -> Value {
    let Some(file) = file else {
        return json!({ "error": "inotify <dir> <file> <ms>" });
    };
    // SAFETY: inotify_init1 takes only flags.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return json!({ "ok": false, "errno": errno(), "step": "inotify_init1" });
    }
    let Ok(cdir) = CString::new(dir) else {
        return json!({ "error": "dir" });
    };
    let mask = libc::IN_OPEN | libc::IN_ACCESS | libc::IN_CLOSE_NOWRITE;
    // SAFETY: `fd` is our inotify fd and `cdir` a valid C string.
    if unsafe { libc::inotify_add_watch(fd, cdir.as_ptr(), mask) } < 0 {
        return json!({ "ok": false, "errno": errno(), "step": "inotify_add_watch" });
    }
    ready();
    let deadline = std::time::Instant::now() + millis(ms);
    let mut foreign = Vec::new();
    while std::time::Instant::now() < deadline && !foreign.contains(file) {
        foreign.extend(inotify_names(fd));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    foreign.extend(inotify_names(fd));
    let control_path = match file.as_str() {
        "." => dir.to_owned(),
        name => format!("{dir}/{name}"),
    };
    let control_opened = std::fs::File::open(control_path).is_ok();
    let control = inotify_names(fd);
    json!({
        "ok": true,
        "foreign": foreign,
        "control_opened": control_opened,
        "control_seen": control.contains(file),
    })
}

/// The names of the inotify events waiting on `fd` (non-blocking).
fn inotify_names(fd: i32) -> Vec<String> {
    let mut names = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: `buf` is a live, writable buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else { break };
        if n == 0 {
            break;
        }
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut at = 0;
        while at + header <= n {
            // The kernel writes whole events; `len` is the padded name length after the header.
            let len_at = at + header - 4;
            let len = u32::from_ne_bytes([
                buf[len_at],
                buf[len_at + 1],
                buf[len_at + 2],
                buf[len_at + 3],
            ]);
            let len = usize::try_from(len).unwrap_or(0);
            let name = &buf[at + header..(at + header + len).min(n)];
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            let name = match end {
                // An event on the watched file itself.
                0 => ".".to_owned(),
                _ => String::from_utf8_lossy(&name[..end]).into_owned(),
            };
            names.push(name);
            at += header + len;
        }
    }
    names
}

/// Opens `path` and reads a little of it (what another job would see as an access).
fn open_file(path: &str) -> Value {
    use std::io::Read;
    let mut buf = [0u8; 16];
    match std::fs::File::open(path).and_then(|mut f| f.read(&mut buf)) {
        Ok(n) => json!({ "ok": true, "read": n }),
        Err(e) => json!({ "ok": false, "errno": e.raw_os_error().unwrap_or(0) }),
    }
}

/// Tells a test (on stderr, beside the JSON report on stdout) that this probe's watch or lock
/// is in place: a job run against it from now on is a real test.
fn ready() {
    eprintln!("{}", sandrun_tests::client::PROBE_READY);
}

/// `flock(LOCK_EX | LOCK_NB)` on `path` (errno 0: taken), then, as a control that locks work
/// here, the same on a second descriptor of the file (which must conflict with the first);
/// then holds the lock for `ms` milliseconds.
fn flock(path: &str, ms: Option<&String>) -> Value {
    use std::os::fd::AsRawFd;
    let try_lock = |f: &std::fs::File| {
        // SAFETY: flock on a descriptor we own.
        let ret = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if ret == 0 {
            0
        } else {
            errno()
        }
    };
    let (first, second) = match (std::fs::File::open(path), std::fs::File::open(path)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return json!({ "error": e.raw_os_error() }),
    };
    let first_errno = try_lock(&first);
    let second_errno = try_lock(&second);
    ready();
    std::thread::sleep(millis(ms));
    json!({ "first": first_errno, "second": second_errno })
}

/// The `/proc` entries a job must not learn the host from, as the job sees them.
fn proc_masks() -> Value {
    let mut files = serde_json::Map::new();
    for name in [
        "kcore",
        "keys",
        "key-users",
        "latency_stats",
        "timer_list",
        "timer_stats",
        "sched_debug",
        "locks",
        "kallsyms",
        "sysrq-trigger",
        "kmsg",
    ] {
        let path = format!("/proc/{name}");
        let report = match std::fs::metadata(&path) {
            Err(e) => json!({ "exists": false, "errno": e.raw_os_error() }),
            Ok(_) => match std::fs::read(&path) {
                Ok(data) => json!({ "exists": true, "bytes": data.len() }),
                Err(e) => json!({ "exists": true, "errno": e.raw_os_error() }),
            },
        };
        files.insert(name.into(), report);
    }
    let mut dirs = serde_json::Map::new();
    for name in ["acpi", "asound", "scsi"] {
        let entries = std::fs::read_dir(format!("/proc/{name}")).map(|d| d.count());
        let report = match entries {
            Ok(n) => json!({ "exists": true, "entries": n }),
            Err(e) => json!({ "exists": false, "errno": e.raw_os_error() }),
        };
        dirs.insert(name.into(), report);
    }
    let mut read_only = serde_json::Map::new();
    for name in ["sys", "bus", "fs", "irq"] {
        let Ok(c) = CString::new(format!("/proc/{name}")) else {
            continue;
        };
        // SAFETY: statvfs is plain data for which all-zero is valid.
        let mut buf: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `buf` a live statvfs.
        let report = if unsafe { libc::statvfs(c.as_ptr(), &mut buf) } == 0 {
            json!(buf.f_flag & libc::ST_RDONLY != 0)
        } else {
            json!({ "errno": errno() })
        };
        read_only.insert(name.into(), report);
    }
    let text = |p: &str| {
        std::fs::read(p)
            .map(|d| String::from_utf8_lossy(&d).into_owned())
            .ok()
    };
    json!({
        "files": files,
        "dirs": dirs,
        "read_only": read_only,
        "locks": text("/proc/locks"),
        "init_cmdline": text("/proc/1/cmdline"),
        "init_comm": text("/proc/1/comm"),
    })
}

/// An OFD read lock on `path` (a read-only descriptor is enough), then `F_OFD_GETLK` for a write
/// lock on a second descriptor: `conflict` is whether any lock is seen there (this job's own
/// read lock at least, so `true` shows the check works; `foreign` is whether a lock was seen
/// before taking our own). Then holds the lock for `ms` milliseconds.
fn ofd_lock(path: &str, ms: Option<&String>) -> Value {
    use std::os::fd::AsRawFd;
    let query = |f: &std::fs::File, cmd: libc::c_int, kind: libc::c_int| {
        let mut lock = libc::flock {
            l_type: libc::c_short::try_from(kind).unwrap_or(0),
            l_whence: 0,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        // SAFETY: fcntl on a descriptor we own with a valid, writable `struct flock`.
        let ret = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut lock) };
        if ret < 0 {
            Err(errno())
        } else {
            Ok(i32::from(lock.l_type) != libc::F_UNLCK)
        }
    };
    let (mine, probe) = match (std::fs::File::open(path), std::fs::File::open(path)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return json!({ "error": e.raw_os_error() }),
    };
    let foreign = query(&probe, libc::F_OFD_GETLK, libc::F_WRLCK);
    let taken = query(&mine, libc::F_OFD_SETLK, libc::F_RDLCK);
    let conflict = query(&probe, libc::F_OFD_GETLK, libc::F_WRLCK);
    ready();
    std::thread::sleep(millis(ms));
    let show = |r: Result<bool, i32>| match r {
        Ok(seen) => json!(seen),
        Err(e) => json!({ "errno": e }),
    };
    json!({ "foreign": show(foreign), "taken": taken.is_ok(), "conflict": show(conflict) })
}
