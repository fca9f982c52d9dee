//! Real sandbox spawns. They need root (as in CI) and fail loudly without it.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::{fstatat, Mode};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use sandrun_ipc::{BundleEntry, BundlePath, GrantedLimits};

use super::seccomp::SeccompProgram;
use super::*;

const JOB_UID: u32 = 2_000_123;
const JOB_GID: u32 = 2_000_124;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the sandbox spawn tests must run as root (they create namespaces and mounts)"
    );
}

fn limits() -> GrantedLimits {
    GrantedLimits {
        wall_ms: 60_000,
        memory_bytes: 512 << 20,
        cpu_ms: 60_000,
        pids: 64,
        output_bytes: 1 << 20,
        tmpfs_bytes: 64 << 20,
        file_count: 1000,
    }
}

fn cstrings(items: &[&str]) -> Vec<CString> {
    items
        .iter()
        .map(|s| CString::new(*s).expect("test strings have no NUL"))
        .collect()
}

/// One test's sandbox inputs; `run` spawns it.
struct Job {
    argv: Vec<CString>,
    limits: GrantedLimits,
    bundle: Vec<BundleEntry>,
    data: Vec<u8>,
    stdin: Vec<u8>,
    workdir: String,
    template: Option<String>,
    template_dir: PathBuf,
}

impl Job {
    fn new(argv: &[&str]) -> Job {
        Job {
            argv: cstrings(argv),
            limits: limits(),
            bundle: Vec::new(),
            data: Vec::new(),
            stdin: Vec::new(),
            workdir: String::new(),
            template: None,
            template_dir: PathBuf::from("/nonexistent"),
        }
    }

    fn shell(script: &str) -> Job {
        Job::new(&["/bin/sh", "-c", script])
    }

    fn spawn(&self) -> Result<Spawned, SetupError> {
        self.spawn_joining(CgroupJoin::None)
    }

    fn spawn_joining(&self, cgroup: CgroupJoin<'_>) -> Result<Spawned, SetupError> {
        require_root();
        let root = tempfile::tempdir().expect("temp dir for the mount point");
        let settings = SandboxSettings {
            mount_point: root.path().to_owned(),
            template_dir: self.template_dir.clone(),
            wheelhouse_dir: PathBuf::from("/nonexistent"),
            start_timeout: std::time::Duration::from_secs(60),
            // SAFETY: packaging/test.sh runs this crate's tests on one test thread, whose
            // other thread (libtest's main) only waits for the test meanwhile.
            one_thread: unsafe { crate::sys::SingleThreaded::assume() },
        };
        let plan = JobPlan {
            argv: self.argv.clone(),
            env: cstrings(&[
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "HOME=/work",
                "LANG=C.UTF-8",
            ]),
            workdir: self.workdir.clone(),
            uid: UserId(JOB_UID),
            gid: GroupId(JOB_GID),
            limits: &self.limits,
            bundle: &self.bundle,
            bundle_data: &self.data,
            stdin: &self.stdin,
            template: self.template.clone(),
            wheelhouse: false,
        };
        let filter = SeccompProgram::job();
        spawn(&settings, &plan, &filter, cgroup)
    }

    fn run(&self) -> Finished {
        finish(self.spawn().expect("the sandbox starts"))
    }
}

struct Finished {
    status: i32,
    stdout: String,
    stderr: String,
    workdir: OwnedFd,
}

impl Finished {
    fn exit_code(&self) -> i32 {
        assert!(libc::WIFEXITED(self.status), "job was killed: {self:?}");
        libc::WEXITSTATUS(self.status)
    }
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {:#x}, stdout {:?}, stderr {:?}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Reads J's status, reaps C, then drains both pipes (every writer is gone by then).
fn finish(spawned: Spawned) -> Finished {
    let mut status = [0u8; 4];
    let n = sys::read_full(spawned.status.as_raw_fd(), &mut status).expect("read status pipe");
    assert_eq!(n, 4, "C exited without reporting J's status");
    waitpid(Pid::from_raw(spawned.pid.0), None).expect("reap C");
    Finished {
        status: i32::from_ne_bytes(status),
        stdout: drain(&spawned.stdout),
        stderr: drain(&spawned.stderr),
        workdir: spawned.workdir,
    }
}

/// Reads to end of file. `EAGAIN` can happen while a sandbox that another test thread is
/// cloning at the same moment still holds a copy of our write end (its C closes it at once;
/// the real helper is single-threaded, so it has no such window): wait for it.
fn drain(fd: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => wait_readable(fd),
            Err(e) => panic!("read output pipe: {e}"),
        }
    }
}

fn path(s: &str) -> BundlePath {
    BundlePath::new(s).expect("valid test path")
}

#[test]
fn given_true_when_spawned_then_it_exits_zero_with_no_output() {
    let done = Job::new(&["/usr/bin/true"]).run();
    assert_eq!(done.exit_code(), 0, "{done:?}");
    assert_eq!(done.stdout, "");
    assert_eq!(done.stderr, "");
}

#[test]
fn given_shell_that_echoes_and_exits_3_when_spawned_then_stdout_and_status_are_reported() {
    let done = Job::shell("echo hi; echo err >&2; exit 3").run();
    assert_eq!(done.exit_code(), 3, "{done:?}");
    assert_eq!(done.stdout, "hi\n");
    assert_eq!(done.stderr, "err\n");
}

#[test]
fn given_stdin_bytes_when_the_job_reads_fd_0_then_it_gets_exactly_them_from_a_read_only_nameless_file(
) {
    let mut job = Job::shell(
        "cat; echo; ls -A /tmp | wc -l; readlink /proc/self/fd/0; \
         (printf x >&0) 2>/dev/null && echo writable || echo read-only",
    );
    job.stdin = b"line 1\nline \x002".to_vec();
    let done = job.run();
    assert_eq!(done.exit_code(), 0, "{done:?}");
    let mut lines = done.stdout.split('\n');
    assert_eq!(lines.next(), Some("line 1"));
    assert_eq!(lines.next(), Some("line \u{0}2"));
    assert_eq!(
        lines.next(),
        Some("0"),
        "the stdin file has no name left: {done:?}"
    );
    let target = lines.next().unwrap_or_default();
    assert!(
        target.starts_with("/tmp/.sandrun-stdin") && target.ends_with("(deleted)"),
        "{done:?}"
    );
    assert_eq!(lines.next(), Some("read-only"), "{done:?}");
}

#[test]
fn given_no_stdin_when_the_job_reads_fd_0_then_it_is_dev_null() {
    let done = Job::shell("readlink /proc/self/fd/0; cat; echo eof").run();
    assert_eq!(done.exit_code(), 0, "{done:?}");
    assert_eq!(done.stdout, "/dev/null\neof\n");
}

#[test]
fn given_job_that_writes_a_file_when_it_has_ended_then_the_workdir_fd_still_reads_it() {
    let done = Job::shell("echo result > /work/out.txt").run();
    assert_eq!(done.exit_code(), 0, "{done:?}");
    // C is reaped, so the job's mount namespace is gone; the fd keeps the tmpfs.
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let file = sys::openat(done.workdir.as_raw_fd(), "out.txt", flags, Mode::empty())
        .expect("out.txt is in the work dir");
    assert_eq!(drain(&file), "result\n");
}

#[test]
fn given_bundle_with_dir_and_setuid_file_when_spawned_then_they_belong_to_the_job_without_setuid() {
    let mut job = Job::shell("cat data/run.sh; test -u data/run.sh && echo SETUID; exit 0");
    job.bundle = vec![
        BundleEntry::Dir {
            path: path("data"),
            mode: 0o2750,
        },
        BundleEntry::File {
            path: path("data/run.sh"),
            mode: 0o4755,
            size: 6,
        },
        BundleEntry::File {
            path: path("empty"),
            mode: 0o600,
            size: 0,
        },
    ];
    job.data = b"hello\n".to_vec();
    let done = job.run();
    assert_eq!(done.exit_code(), 0, "{done:?}");
    assert_eq!(done.stdout, "hello\n");
    let work = Some(done.workdir.as_raw_fd());
    let nofollow = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
    let file = fstatat(work, "data/run.sh", nofollow).expect("stat data/run.sh");
    assert_eq!((file.st_uid, file.st_gid), (JOB_UID, JOB_GID));
    assert_eq!(file.st_mode & 0o7777, 0o755, "setuid bit stripped");
    assert_eq!(file.st_size, 6);
    let dir = fstatat(work, "data", nofollow).expect("stat data");
    assert_eq!(dir.st_mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!((dir.st_uid, dir.st_mode & 0o7777), (JOB_UID, 0o750));
    let empty = fstatat(work, "empty", nofollow).expect("stat empty");
    assert_eq!((empty.st_size, empty.st_mode & 0o7777), (0, 0o600));
}

#[test]
fn given_bundle_larger_than_the_tmpfs_when_spawned_then_write_bundle_fails_with_enospc() {
    let mut job = Job::new(&["/usr/bin/true"]);
    // Larger than the job's allowance plus the skeleton's (mounts::SKELETON_BYTES).
    job.limits.tmpfs_bytes = 256 << 10;
    job.data = vec![b'x'; 2 << 20];
    job.bundle = vec![BundleEntry::File {
        path: path("big"),
        mode: 0o644,
        size: 2 << 20,
    }];
    let err = job.spawn().expect_err("the bundle cannot fit");
    assert_eq!(
        (err.step, err.errno),
        (SetupStep::WriteBundle, Errno::ENOSPC),
        "{err}"
    );
    assert!(
        !err.detail.contains("big"),
        "detail names no job data: {err}"
    );
}

#[test]
fn given_missing_program_when_spawned_then_an_exec_error_is_returned() {
    let err = Job::new(&["/usr/bin/sandrun-does-not-exist"])
        .spawn()
        .expect_err("nothing to execute");
    assert_eq!(
        (err.step, err.errno),
        (SetupStep::Exec, Errno::ENOENT),
        "{err}"
    );
}

#[test]
fn given_workdir_in_the_bundle_when_spawned_then_the_job_starts_there() {
    let mut job = Job::shell("pwd");
    job.bundle = vec![BundleEntry::Dir {
        path: path("src"),
        mode: 0o755,
    }];
    job.workdir = "src".to_owned();
    let done = job.run();
    assert_eq!(done.stdout, "/work/src\n", "{done:?}");
}

#[test]
fn given_workdir_that_escapes_when_spawned_then_it_is_refused() {
    let mut job = Job::shell("pwd");
    job.workdir = "../etc".to_owned();
    let err = job.spawn().expect_err("workdir must stay under /work");
    assert_eq!(
        (err.step, err.errno),
        (SetupStep::WorkDir, Errno::EINVAL),
        "{err}"
    );
}

#[test]
fn given_job_when_it_inspects_its_credentials_then_it_has_the_job_ids_and_no_privilege() {
    let done = Job::shell(
        "id -u; id -g; id -G; \
         grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status",
    )
    .run();
    let expected = format!(
        "{JOB_UID}\n{JOB_GID}\n{JOB_GID}\n\
         CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
         CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n"
    );
    assert_eq!(done.stdout, expected, "{done:?}");
}

#[test]
fn given_job_when_it_probes_its_namespaces_then_it_sees_only_its_own_world() {
    let done = Job::shell(
        "echo pid=$$; hostname; echo /proc/[0-9]*; \
         grep -o 'lo:' /proc/net/dev; \
         touch /usr/probe 2>/dev/null || echo usr-readonly; \
         echo x >> /etc/passwd 2>/dev/null || echo etc-readonly; \
         touch /probe 2>/dev/null || echo root-not-writable; \
         touch /tmp/probe /dev/shm/probe && echo tmp-writable; \
         grep sandbox /etc/passwd",
    )
    .run();
    let expected = format!(
        "pid=2\nsandrun\n/proc/1 /proc/2\nlo:\nusr-readonly\netc-readonly\n\
         root-not-writable\ntmp-writable\nsandbox:x:{JOB_UID}:{JOB_GID}:sandbox:/work:/bin/sh\n"
    );
    assert_eq!(done.stdout, expected, "{done:?}");
}

#[test]
fn given_job_when_it_reads_its_namespace_ids_then_none_is_the_helpers() {
    let kinds = ["pid", "mnt", "net", "ipc", "uts", "cgroup"];
    let script: String = kinds
        .iter()
        .map(|k| format!("readlink /proc/self/ns/{k}; "))
        .collect();
    let done = Job::shell(&script).run();
    let inside: Vec<&str> = done.stdout.lines().collect();
    assert_eq!(inside.len(), kinds.len(), "{done:?}");
    for (kind, inside) in kinds.iter().zip(inside) {
        let host = std::fs::read_link(format!("/proc/self/ns/{kind}")).expect("host ns");
        assert!(inside.starts_with(&format!("{kind}:[")), "{inside}");
        assert_ne!(
            Path::new(inside),
            host,
            "the job shares the helper's {kind} namespace"
        );
    }
}

#[test]
fn given_template_when_spawned_then_it_is_readable_at_env_and_read_only() {
    let templates = tempfile::tempdir().expect("template dir");
    std::fs::create_dir(templates.path().join("py")).expect("mkdir");
    std::fs::create_dir(templates.path().join("other")).expect("mkdir");
    std::fs::write(templates.path().join("py/hello.txt"), "from template\n").expect("write");
    std::fs::write(templates.path().join("py/sandrun-lock.json"), "{}\n").expect("write");
    std::fs::write(templates.path().join("other/secret.txt"), "other\n").expect("write");
    // Only the job's template is there: not the others, not the tree it was bound from.
    let mut job = Job::shell(
        "cat /env/hello.txt; touch /env/x 2>/dev/null || echo env-readonly; \
         ls -a / | grep -c sandrun-templates; grep -rs other / --include=secret.txt | wc -l; \
         ls /env | tr '\\n' ' '; ls /usr | grep -qx bin && echo usr-listed",
    );
    job.template = Some("py".to_owned());
    job.template_dir = templates.path().to_owned();
    let done = job.run();
    assert_eq!(
        done.stdout, "from template\nenv-readonly\n0\n0\nhello.txt sandrun-lock.json usr-listed\n",
        "{done:?}"
    );
}

#[test]
fn given_a_template_that_is_a_symlink_when_spawned_then_it_is_refused() {
    let templates = tempfile::tempdir().expect("template dir");
    std::os::unix::fs::symlink("/etc", templates.path().join("evil")).expect("symlink");
    let mut job = Job::shell("ls /env");
    job.template = Some("evil".to_owned());
    job.template_dir = templates.path().to_owned();
    let err = job.spawn().expect_err("refused");
    assert_eq!(
        (err.step, err.errno),
        (SetupStep::BindTemplate, Errno::ENOTDIR)
    );
}

#[test]
fn given_a_template_when_spawned_then_the_lock_hash_is_that_of_its_lock_and_none_without_a_lock() {
    let templates = tempfile::tempdir().expect("template dir");
    std::fs::create_dir(templates.path().join("py")).expect("mkdir");
    std::fs::create_dir(templates.path().join("bare")).expect("mkdir");
    std::fs::write(templates.path().join("py/sandrun-lock.json"), "{\"v\":1}\n").expect("write");
    let mut job = Job::shell("true");
    job.template = Some("py".to_owned());
    job.template_dir = templates.path().to_owned();
    let spawned = job.spawn().expect("spawned");
    use sha2::Digest;
    let want: [u8; 32] = sha2::Sha256::digest(b"{\"v\":1}\n").into();
    assert_eq!(spawned.template_lock, Some(want));
    assert_eq!(finish(spawned).exit_code(), 0);
    let mut job = Job::shell("true");
    job.template = Some("bare".to_owned());
    job.template_dir = templates.path().to_owned();
    let err = job
        .spawn()
        .expect_err("a template without a lock is refused");
    assert_eq!(
        (err.step, err.errno),
        (SetupStep::BindTemplate, Errno::ENOENT)
    );
}

#[test]
fn given_no_template_when_spawned_then_neither_env_nor_any_template_is_mounted() {
    let templates = tempfile::tempdir().expect("template dir");
    std::fs::create_dir(templates.path().join("py")).expect("mkdir");
    let mut job = Job::shell("ls -a / | tr '\\n' ' '; echo; cat /proc/self/mountinfo");
    job.template_dir = templates.path().to_owned();
    let done = job.run();
    assert_eq!(done.exit_code(), 0, "{done:?}");
    let (root, mounts) = done.stdout.split_once('\n').expect("two parts");
    assert!(!root.split_whitespace().any(|e| e == "env"), "{root}");
    let dir = templates.path().display().to_string();
    assert!(
        !mounts.contains(&dir),
        "the template directory is mounted: {mounts}"
    );
    assert!(!mounts.contains(" /env "), "{mounts}");
}

#[test]
fn given_a_template_when_spawned_then_its_mount_is_read_only_nosuid_nodev_and_it_is_the_only_one() {
    let templates = tempfile::tempdir().expect("template dir");
    std::fs::create_dir(templates.path().join("py")).expect("mkdir");
    std::fs::write(templates.path().join("py/sandrun-lock.json"), "{}\n").expect("write");
    let mut job = Job::shell("grep ' /env ' /proc/self/mountinfo");
    job.template = Some("py".to_owned());
    job.template_dir = templates.path().to_owned();
    let done = job.run();
    let line = done.stdout.trim();
    assert_eq!(done.stdout.lines().count(), 1, "{done:?}");
    let options = line.split_whitespace().nth(5).unwrap_or_default();
    for flag in ["ro", "nosuid", "nodev"] {
        assert!(
            options.split(',').any(|o| o == flag),
            "{flag} missing: {line}"
        );
    }
}

#[test]
fn given_job_with_a_background_child_when_the_job_ends_then_no_process_of_it_is_left() {
    let tag = format!("1000.{}", std::process::id());
    // "started" only once the background child has become `sleep` (not the forked shell).
    let script = format!(
        "sleep {tag} & until grep -q '^sleep' /proc/$!/cmdline; do :; done; echo started; wait"
    );
    let spawned = Job::shell(&script).spawn().expect("the sandbox starts");
    wait_readable(&spawned.stdout);
    // The host's /proc may lag the job's own view briefly: look again for a while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let sleeper = loop {
        if let Some(pid) = find_process(&["sleep", &tag]) {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the background sleep never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let job = parent_of(sleeper).expect("the sleep's parent is J");
    // pidfds, not pids: once reaped, a pid may already belong to another test's process.
    let sleeper_fd = pidfd_of(sleeper);
    let job_fd = pidfd_of(job);
    // End the job itself (J), not its child: the sandbox must clean up the rest.
    nix::sys::signal::kill(Pid::from_raw(job), nix::sys::signal::SIGKILL).expect("kill J");
    let done = finish(spawned);
    assert!(libc::WIFSIGNALED(done.status), "{done:?}");
    assert_eq!(libc::WTERMSIG(done.status), libc::SIGKILL);
    drop(done.workdir);
    // C is reaped (by `finish`), and with it every process of the job's pid namespace: the
    // kernel reaps the namespace before its init's exit completes.
    assert!(has_exited(&sleeper_fd), "the background sleep is left");
    assert!(has_exited(&job_fd), "J is left");
}

/// A pidfd of `pid` (which must be alive now).
fn pidfd_of(pid: i32) -> OwnedFd {
    sys::pidfd_open(pid).unwrap_or_else(|e| panic!("pidfd_open({pid}): {e}"))
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable).
fn has_exited(pidfd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).expect("poll pidfd") == 1
}

/// Blocks (poll, no timeout: the job prints a line or the test hangs visibly) until the
/// non-blocking pipe has data or end of file.
fn wait_readable(fd: &OwnedFd) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::NONE).expect("poll stdout");
}

/// The host pid of a process whose command line is exactly `argv`.
fn find_process(argv: &[&str]) -> Option<i32> {
    find_processes(argv).first().copied()
}

fn parent_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("PPid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn given_debian_interpreters_when_run_in_the_sandbox_then_they_work() {
    for program in ["/usr/bin/python3", "/usr/bin/node", "/usr/bin/bash"] {
        assert!(
            Path::new(program).exists(),
            "{program} must be installed on the host for this test (python3, nodejs, bash)"
        );
    }
    let python = Job::new(&["/usr/bin/python3", "-c", PYTHON_LOOPBACK]).run();
    assert_eq!(python.stdout, "ping over lo\n", "{python:?}");
    let node = Job::new(&["/usr/bin/node", "-e", "console.log(6 * 7)"]).run();
    assert_eq!(node.stdout, "42\n", "{node:?}");
    let bash = Job::new(&["/usr/bin/bash", "-c", "echo $((6 * 7))"]).run();
    assert_eq!(bash.stdout, "42\n", "{bash:?}");
}

/// A TCP round trip over the sandbox's loopback, which only works if `lo` is up.
const PYTHON_LOOPBACK: &str = "
import socket
server = socket.socket()
server.bind(('127.0.0.1', 0))
server.listen(1)
client = socket.create_connection(server.getsockname())
conn, _ = server.accept()
client.sendall(b'ping over lo')
print(conn.recv(100).decode())
";

#[test]
fn given_every_setup_step_then_its_wire_index_round_trips() {
    for (i, step) in SetupStep::ALL.iter().enumerate() {
        assert_eq!(usize::from(step.index()), i, "{step:?}");
        assert_eq!(SetupStep::from_index(step.index()), Some(*step));
    }
    let past_end = u8::try_from(SetupStep::ALL.len()).expect("fewer than 256 steps");
    assert_eq!(SetupStep::from_index(past_end), None);
}

#[test]
fn given_failure_message_when_encoded_and_decoded_then_it_is_unchanged() {
    let err = super::fail(
        SetupStep::BindTemplate,
        Errno::ENOENT,
        "/var/lib/sandrun/t/py",
    );
    let bytes = channel::encode(&channel::Message::Failed(err.clone()));
    assert_eq!(channel::decode(&bytes), Ok(channel::Message::Failed(err)));
}

#[test]
fn given_overlong_multibyte_detail_when_encoded_then_it_is_cut_at_a_char_boundary() {
    let detail = "é".repeat(200);
    let bytes = channel::encode_failure(SetupStep::Exec, Errno::ENOENT, &detail);
    let Ok(channel::Message::Failed(err)) = channel::decode(&bytes) else {
        panic!("decodes");
    };
    assert!(err.detail.len() <= channel::DETAIL_MAX);
    assert!(err.detail.chars().all(|c| c == 'é'));
    assert_eq!(
        err.detail.len(),
        channel::DETAIL_MAX - channel::DETAIL_MAX % 2
    );
}

#[test]
fn given_garbage_control_messages_then_they_are_protocol_errors() {
    let mut bytes = channel::encode(&channel::Message::Ready);
    bytes[0] = 99;
    let unknown_kind = channel::decode(&bytes).err().map(|e| e.step);
    assert_eq!(unknown_kind, Some(SetupStep::Protocol));
    let mut bytes = channel::encode_failure(SetupStep::Exec, Errno::ENOENT, "");
    bytes[1] = 250;
    let unknown_step = channel::decode(&bytes).err().map(|e| e.step);
    assert_eq!(unknown_step, Some(SetupStep::Protocol));
    let short = channel::decode(&bytes[..10]).err().map(|e| e.step);
    assert_eq!(short, Some(SetupStep::Protocol));
}

/// Every host pid whose command line is exactly `argv`.
fn find_processes(argv: &[&str]) -> Vec<i32> {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            (cmdline == wanted).then_some(pid)
        })
        .collect()
}

/// In a process forked from the (multi-threaded) test: starts `/bin/sleep <tag>` as a child, or
/// as an orphan (a child that forks it and exits, so it is reparented to the init). Raw system
/// calls only.
fn spawn_sleeper(argv: &[*const libc::c_char; 3], orphan: bool) {
    let env: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: the caller is single-threaded (a fresh fork); the child only calls execve/_exit.
    let pid = unsafe { sys::fork_raw(0) }.unwrap_or(-1);
    if pid != 0 {
        return;
    }
    if orphan {
        // SAFETY: as above, in the middle process.
        if unsafe { sys::fork_raw(0) }.unwrap_or(-1) != 0 {
            sys::exit_now(0);
        }
    }
    // SAFETY: argv and env are null-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execve(argv[0], argv.as_ptr(), env.as_ptr()) };
    sys::exit_now(127)
}

#[test]
fn given_an_init_with_a_child_and_an_orphan_when_it_kills_the_rest_then_both_are_gone_before_it_exits(
) {
    require_root();
    let tag = format!("2000.{}", std::process::id());
    let sleep = CString::new("/bin/sleep").expect("no NUL");
    let arg = CString::new(tag.clone()).expect("no NUL");
    let argv: [*const libc::c_char; 3] = [sleep.as_ptr(), arg.as_ptr(), std::ptr::null()];
    let (go_r, go_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
    let (done_r, done_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
    // SAFETY: the child (pid 1 of a new pid namespace) only makes raw system calls until it is
    // killed; kill(-1) there reaches only that namespace, and it checks that it is pid 1.
    let init = unsafe { sys::fork_raw(libc::CLONE_NEWPID) }.expect("clone a pid namespace");
    if init == 0 {
        // SAFETY: getpid has no preconditions.
        if unsafe { libc::getpid() } != 1 {
            sys::exit_now(2);
        }
        spawn_sleeper(&argv, false);
        spawn_sleeper(&argv, true);
        let mut byte = [0u8; 1];
        let _ = sys::read_full(go_r.as_raw_fd(), &mut byte);
        let answer: &[u8] = if super::child::kill_the_rest().is_ok() {
            b"k"
        } else {
            b"e"
        };
        let _ = sys::write_all(done_w.as_raw_fd(), answer);
        loop {
            // SAFETY: pause has no preconditions; the test kills this process.
            unsafe { libc::pause() };
        }
    }
    drop((go_r, done_w));
    let init_fd = pidfd_of(init);
    let mut sleepers = Vec::new();
    for _ in 0..500 {
        sleepers = find_processes(&["/bin/sleep", &tag]);
        if sleepers.len() == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(sleepers.len(), 2, "the child and the orphan never ran");
    let sleeper_fds: Vec<OwnedFd> = sleepers.iter().map(|&p| pidfd_of(p)).collect();
    sys::write_all(go_w.as_raw_fd(), b"g").expect("tell the init to kill");
    let mut answer = [0u8; 1];
    sys::read_full(done_r.as_raw_fd(), &mut answer).expect("the init's answer");
    // The init still lives (it pauses): only its own kill-and-reap can have ended them.
    let init_alive = !has_exited(&init_fd);
    let all_gone = sleeper_fds.iter().all(has_exited);
    let _ = sys::sigkill(init);
    let _ = waitpid(Pid::from_raw(init), None);
    assert_eq!(&answer, b"k");
    assert!(init_alive, "the init died before the check");
    assert!(
        all_gone,
        "processes of the namespace outlived kill_the_rest"
    );
}

/// This process's cgroup directory in the unified (v2) hierarchy, from `/proc/self/cgroup` and
/// `/proc/self/mountinfo`. This host mounts an (empty) cgroup2 beside the v1 controllers; a
/// v2-only host mounts it at `/sys/fs/cgroup`.
fn own_unified_cgroup() -> PathBuf {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let rel = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a unified hierarchy line in /proc/self/cgroup");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mount = mountinfo
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup2 ")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("a cgroup2 mount (the clone3 test needs one)");
    mount.join(rel.trim_start_matches('/'))
}

#[test]
fn given_a_v2_cgroup_when_a_sandbox_is_cloned_into_it_then_its_init_is_there_without_migrating() {
    require_root();
    let dir = own_unified_cgroup().join(format!("sandrun-clone3-{}", std::process::id()));
    std::fs::create_dir(&dir).expect("create a v2 cgroup");
    let dir_fd: OwnedFd = std::fs::File::open(&dir)
        .expect("open the cgroup dir")
        .into();
    // A job's stdin is /dev/null, so it must not wait for input: it would end at once, its
    // init with it, and the cgroup would be empty by the time it is read (seen as a flaky
    // failure). J sleeps until C is killed below.
    let job = Job::shell("exec sleep 600");
    let spawned = job.spawn_joining(CgroupJoin::Into(dir_fd.as_fd()));
    let spawned = spawned.expect("the sandbox starts");
    // The init runs: where is it?
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let members: Vec<i32> = procs
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let init = spawned.pid.0;
    let in_cgroup = members.contains(&init);
    let _ = sys::sigkill(init);
    let _ = waitpid(Pid::from_raw(init), None);
    drop(spawned);
    for _ in 0..100 {
        if std::fs::remove_dir(&dir).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        in_cgroup,
        "init {init} is not in {}: {members:?}",
        dir.display()
    );
}

/// The cold path's race, on a real socketpair: the helper sends `Go`, C fails before reading it,
/// reports, and exits. Closing with `Go` unread makes the kernel flag ECONNRESET on the helper's
/// end, and recvmsg reports that before the queued report; the report must still be what the
/// helper gets.
#[test]
fn given_peer_reports_and_closes_with_our_message_unread_then_the_report_is_read_not_a_reset() {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (helper, init) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    let order = std::fs::File::open("/dev/null").expect("an fd to send");
    channel::send_go(helper.as_raw_fd(), order.as_raw_fd(), None, None).expect("send Go");
    let report = super::fail(SetupStep::Hostname, Errno::EPERM, "sandbox");
    channel::send_failure(init.as_raw_fd(), &report).expect("send the report");
    drop(init);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let got = channel::wait_for_ready(&helper, deadline).expect_err("C failed");
    assert_eq!(got.error, report, "{}", got.error);
}

/// Without a report, the same close is still a `Protocol` error, not a hang.
#[test]
fn given_peer_closes_with_our_message_unread_and_no_report_then_it_is_a_protocol_error() {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (helper, init) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    let order = std::fs::File::open("/dev/null").expect("an fd to send");
    channel::send_go(helper.as_raw_fd(), order.as_raw_fd(), None, None).expect("send Go");
    drop(init);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let got = channel::wait_for_ready(&helper, deadline).expect_err("C is gone");
    assert_eq!(got.error.step, SetupStep::Protocol, "{}", got.error);
    assert!(got.error.detail.contains("closed"), "{}", got.error);
}

/// Runs `check` in a forked child of this test whose `clone3` answers `errno` (a seccomp
/// filter, as systemd's `RestrictNamespaces=` or an old container profile install), and returns
/// what it reported: `Ok` or the failed expectation. The filter dies with the child.
fn in_child_without_clone3(errno: i32, check: impl FnOnce() -> Result<(), String>) -> String {
    use libseccomp::{ScmpAction, ScmpFilterContext, ScmpSyscall};
    let (report_r, report_w) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the child only runs this test's code and leaves through _exit; the parent reaps
    // it below.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        drop(report_r);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut filter = ScmpFilterContext::new_filter(ScmpAction::Allow)
                .map_err(|e| format!("seccomp: {e}"))?;
            filter.set_ctl_nnp(false).map_err(|e| e.to_string())?;
            let clone3 = ScmpSyscall::from_name("clone3").map_err(|e| e.to_string())?;
            filter
                .add_rule(ScmpAction::Errno(errno), clone3)
                .map_err(|e| e.to_string())?;
            filter.load().map_err(|e| format!("load the filter: {e}"))?;
            check()
        }));
        let text = match outcome {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(why)) => why,
            Err(_) => "the check panicked".to_owned(),
        };
        let _ = sys::write_all(report_w.as_raw_fd(), text.as_bytes());
        sys::exit_now(0);
    }
    drop(report_w);
    let mut report = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(report_r), &mut report)
        .expect("read the child's report");
    let _ = waitpid(Pid::from_raw(pid), None);
    String::from_utf8_lossy(&report).into_owned()
}

/// A fresh v2 cgroup below this process's, removed on drop (after its processes are gone).
struct V2Cgroup {
    dir: PathBuf,
    /// The path as `/proc/<pid>/cgroup` shows it (`/...`).
    relative: String,
    fd: OwnedFd,
}

impl V2Cgroup {
    fn create(name: &str) -> V2Cgroup {
        let leaf = format!("sandrun-{name}-{}", std::process::id());
        let dir = own_unified_cgroup().join(&leaf);
        std::fs::create_dir(&dir).expect("create a v2 cgroup");
        let fd = std::fs::File::open(&dir)
            .expect("open the cgroup dir")
            .into();
        let own = unified_cgroup_of(i32::try_from(std::process::id()).expect("pid fits"));
        let own = own.expect("this process is in the unified hierarchy");
        let relative = format!("{}/{leaf}", own.trim_end_matches('/'));
        V2Cgroup { dir, relative, fd }
    }
}

/// Process `pid`'s cgroup in the unified hierarchy (the `0::` line of `/proc/<pid>/cgroup`).
fn unified_cgroup_of(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

impl Drop for V2Cgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[test]
fn given_clone3_answers_enosys_then_the_sandbox_is_cloned_and_joins_its_v2_cgroup_and_is_counted() {
    require_root();
    let cgroup = V2Cgroup::create("no-clone3");
    let report = in_child_without_clone3(libc::ENOSYS, || {
        let before = clone3_fallbacks();
        let script = format!(
            "echo started; while :; do sleep 1; done # {}",
            cgroup.relative
        );
        let job = Job::shell(&script);
        let spawned = job
            .spawn_joining(CgroupJoin::Into(cgroup.fd.as_fd()))
            .map_err(|e| format!("the sandbox did not start: {e}"))?;
        // J runs job code once it printed: by then C and J must be in the cgroup.
        let mut line = [0u8; 8];
        wait_readable(&spawned.stdout);
        let started = nix::unistd::read(spawned.stdout.as_raw_fd(), &mut line)
            .is_ok_and(|n| line[..n].starts_with(b"started"));
        let init = spawned.pid.0;
        let mut pids = vec![init];
        pids.extend(find_processes(&["/bin/sh", "-c", &script]));
        let places: Vec<Option<String>> = pids.iter().map(|&p| unified_cgroup_of(p)).collect();
        let _ = sys::sigkill(init);
        let _ = waitpid(Pid::from_raw(init), None);
        drop(spawned);
        let after = clone3_fallbacks();
        if !started {
            return Err("the job never printed".into());
        }
        let expected = Some(cgroup.relative.clone());
        if pids.len() < 2 || places.iter().any(|p| *p != expected) {
            return Err(format!(
                "init and job {pids:?} are in {places:?}, not {expected:?}"
            ));
        }
        if after != before + 1 {
            return Err(format!("clone3_fallbacks went from {before} to {after}"));
        }
        Ok(())
    });
    assert_eq!(report, "ok");
}

#[test]
fn given_clone3_refused_with_eperm_then_the_failure_names_clone3_and_there_is_no_fallback() {
    require_root();
    let cgroup = V2Cgroup::create("clone3-eperm");
    let report = in_child_without_clone3(libc::EPERM, || {
        let before = clone3_fallbacks();
        let job = Job::shell("echo should-not-run");
        match job.spawn_joining(CgroupJoin::Into(cgroup.fd.as_fd())) {
            Ok(_) => Err("the sandbox started without clone3".into()),
            Err(e)
                if e.step == SetupStep::Clone
                    && e.detail == "clone3"
                    && e.errno == Errno::EPERM =>
            {
                (clone3_fallbacks() == before)
                    .then_some(())
                    .ok_or_else(|| "an EPERM was counted as a fallback".to_owned())
            }
            Err(e) => Err(format!("unexpected failure: {e}")),
        }
    });
    assert_eq!(report, "ok");
}
