//! Isolation seen from inside: the probe runs in a real sandbox and reports what it can see.
//! Each test starts its own helper with its own slot uid range (`config(..)`, from the allocator).

use std::net::TcpListener;

use sandrun_tests::client::PROBE_READY;
use sandrun_tests::helper::SECRET_ENV;
use sandrun_tests::{config, Helper, Job};

fn probe(args: &[&str]) -> serde_json::Value {
    let helper = Helper::start(&config(""));
    let outcome = helper.run(&Job::probe(args));
    assert_eq!(
        outcome.report().exit_code,
        Some(0),
        "{}",
        outcome.describe()
    );
    outcome.probe()
}

#[test]
fn given_job_when_listing_proc_then_only_its_own_processes_are_visible() {
    let r = probe(&["pids"]);
    let pids: Vec<u64> = serde_json::from_value(r["pids"].clone()).expect("pid list");
    let me = r["self"].as_u64().expect("own pid");
    assert!(pids.contains(&me), "own pid {me} missing from {pids:?}");
    // A fresh pid namespace: the probe (and at most an init process) only.
    assert!(pids.len() <= 2, "host processes are visible: {pids:?}");
    assert!(
        pids.iter().all(|p| *p <= 2),
        "pids outside a fresh namespace: {pids:?}"
    );
}

#[test]
fn given_job_when_reading_hostname_then_it_differs_from_the_host() {
    let r = probe(&["hostname"]);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("host hostname");
    assert_ne!(r["hostname"].as_str(), Some(host.trim()), "{r}");
    assert_eq!(r["hostname"], "sandrun");
}

#[test]
fn given_job_when_listing_interfaces_then_only_loopback_exists() {
    let r = probe(&["ifaces"]);
    assert_eq!(r["ioctl"], serde_json::json!(["lo"]), "{r}");
    assert_eq!(r["proc_net_dev"], serde_json::json!(["lo"]), "{r}");
    let sysfs = r["sysfs"].as_array().expect("sysfs list");
    assert!(sysfs.iter().all(|n| n == "lo"), "interfaces in /sys: {r}");
}

#[test]
fn given_listener_on_host_loopback_when_job_connects_then_it_is_unreachable() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind host listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port().to_string();
    let r = probe(&["tcp", &port]);
    assert_eq!(r["connected"], false, "{r}");
    assert_eq!(
        r["errno"],
        libc::ECONNREFUSED,
        "the job's loopback is its own: {r}"
    );
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a connection reached the host listener: {accepted:?}"
    );
}

#[test]
fn given_job_then_it_runs_unprivileged_with_no_capabilities_no_new_privs_and_seccomp() {
    let helper = Helper::start(&config(""));
    let outcome = helper.run(&Job::probe(&["ids"]));
    let r = outcome.probe();
    let uid = u32::try_from(r["uid"].as_u64().expect("uid")).expect("uid fits");
    assert_ne!(uid, 0, "{r}");
    assert!(
        helper.slot_uids().contains(&uid),
        "uid {uid} is not a slot uid: {r}"
    );
    assert_eq!(r["euid"], r["uid"]);
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(r[set], "0000000000000000", "{set} is not empty: {r}");
    }
    assert_eq!(r["NoNewPrivs"], "1", "{r}");
    assert_eq!(r["Seccomp"], "2", "seccomp filter mode expected: {r}");
    assert_eq!(r["Groups"], "", "supplementary groups kept: {r}");
}

#[test]
fn given_job_when_writing_usr_then_it_is_refused() {
    let name = format!("sandrun-probe-{}", std::process::id());
    let target = format!("/usr/{name}");
    let r = probe(&["write", &target]);
    assert_eq!(r["ok"], false, "{r}");
    let errno = r["errno"].as_i64().expect("errno");
    assert!(
        errno == i64::from(libc::EROFS) || errno == i64::from(libc::EACCES),
        "{r}"
    );
    assert!(
        !std::path::Path::new(&target).exists(),
        "the write reached the host"
    );
}

#[test]
fn given_marker_files_in_host_tmp_and_root_then_the_job_cannot_see_them() {
    let helper = Helper::start(&config(""));
    let name = format!("sandrun-marker-{}", std::process::id());
    for dir in ["/tmp", "/root"] {
        let path = format!("{dir}/{name}");
        std::fs::write(&path, b"host secret").expect("write marker");
        let outcome = helper.run(&Job::probe(&["read", &path]));
        let _ = std::fs::remove_file(&path);
        let r = outcome.probe();
        assert_eq!(r["ok"], false, "{path} is visible in the sandbox: {r}");
        let errno = r["errno"].as_i64().expect("errno");
        assert!(
            errno == i64::from(libc::ENOENT) || errno == i64::from(libc::EACCES),
            "{r}"
        );
    }
}

#[test]
fn given_secret_in_helper_environment_then_the_job_does_not_see_it() {
    let helper = Helper::start(&config(""));
    let outcome = helper.run(&Job::probe(&["env"]).env("SANDRUN_JOB_VAR", "visible"));
    let r = outcome.probe();
    assert!(r.get(SECRET_ENV.0).is_none(), "helper env leaked: {r}");
    assert_eq!(
        r["SANDRUN_JOB_VAR"], "visible",
        "requested env missing: {r}"
    );
    assert_eq!(r["HOME"], "/work", "{r}");
    let leaked: Vec<&String> = r
        .as_object()
        .expect("env object")
        .keys()
        .filter(|k| {
            ![
                "HOME",
                "PATH",
                "TMPDIR",
                "LANG",
                "SANDRUN_JOB_VAR",
                "USER",
                "LOGNAME",
                "PWD",
                "HOSTNAME",
                "SHELL",
                "TERM",
            ]
            .contains(&k.as_str())
        })
        .collect();
    assert!(leaked.is_empty(), "unexpected variables: {leaked:?} in {r}");
}

#[test]
fn given_job_then_only_stdio_descriptors_are_open() {
    let r = probe(&["fds"]);
    assert_eq!(r["fds"], serde_json::json!([0, 1, 2]), "{r}");
}

/// Starts `first` on `helper`, waits until its probe says its watch or lock is in place, then
/// runs `second` to its end while `first` still runs (panics if `first` ended first: the test
/// would prove nothing), then waits for `first`. Returns both probe reports.
fn concurrently(
    helper: &Helper,
    first: &Job,
    second: &Job,
) -> (serde_json::Value, serde_json::Value) {
    let mut running = helper.submit(first);
    // Until the first job's watch or lock is in place, the second would prove nothing.
    assert!(
        running.wait_stderr(PROBE_READY),
        "the first job never got its watch or lock in place: {}",
        running.outcome.describe()
    );
    let other = helper.run(second);
    assert_eq!(other.report().exit_code, Some(0), "{}", other.describe());
    assert!(
        running.outcome.exit.is_none(),
        "the first job ended before the second ran: inconclusive"
    );
    let first = running.finish();
    assert_eq!(first.report().exit_code, Some(0), "{}", first.describe());
    (first.probe(), other.probe())
}

#[test]
fn given_job_watching_a_system_dir_when_another_job_opens_a_file_there_then_no_event_reaches_it() {
    let helper = Helper::start(&config(""));
    let watch = Job::probe(&["inotify", "/usr/bin", "env", "4000"]);
    let open = Job::probe(&["open", "/usr/bin/env"]);
    let (watcher, opener) = concurrently(&helper, &watch, &open);
    assert_eq!(opener["ok"], true, "{opener}");
    assert_eq!(watcher["ok"], true, "{watcher}");
    // The watch itself works: the watcher sees its own open.
    assert_eq!(watcher["control_seen"], true, "{watcher}");
    assert_eq!(
        watcher["foreign"],
        serde_json::json!([]),
        "another job's (or the host's) accesses to /usr/bin reached the watcher: {watcher}"
    );
}

#[test]
fn given_job_watching_dev_null_when_another_job_opens_it_then_no_event_reaches_it() {
    let helper = Helper::start(&config(""));
    let watch = Job::probe(&["inotify", "/dev/null", ".", "4000"]);
    // Every job's stdin is /dev/null; the probe opens it once more.
    let open = Job::probe(&["open", "/dev/null"]);
    let (watcher, opener) = concurrently(&helper, &watch, &open);
    assert_eq!(opener["ok"], true, "{opener}");
    assert_eq!(watcher["control_seen"], true, "{watcher}");
    assert_eq!(
        watcher["foreign"],
        serde_json::json!([]),
        "another job's (or the host's) opens of /dev/null reached the watcher: {watcher}"
    );
}

#[test]
fn given_job_holding_flock_on_a_system_file_then_another_jobs_flock_still_succeeds() {
    let helper = Helper::start(&config(""));
    let hold = Job::probe(&["flock", "/usr/bin/env", "4000"]);
    let try_lock = Job::probe(&["flock", "/usr/bin/env", "0"]);
    let (holder, other) = concurrently(&helper, &hold, &try_lock);
    // Both jobs took the lock, and in each a second descriptor conflicts (locks do work).
    for r in [&holder, &other] {
        assert_eq!(r["first"], 0, "flock(LOCK_EX|LOCK_NB) failed: {r}");
        assert_eq!(r["second"], libc::EWOULDBLOCK, "{r}");
    }
}

#[test]
fn given_job_holding_an_ofd_read_lock_on_a_system_file_then_another_job_cannot_see_it() {
    let helper = Helper::start(&config(""));
    let hold = Job::probe(&["ofdlock", "/usr/bin/env", "4000"]);
    let look = Job::probe(&["ofdlock", "/usr/bin/env", "0"]);
    let (holder, other) = concurrently(&helper, &hold, &look);
    // Each job took a read lock and sees its own (the check works)...
    for r in [&holder, &other] {
        assert_eq!(r["taken"], true, "{r}");
        assert_eq!(r["conflict"], true, "{r}");
    }
    // ...but the second saw no lock before taking its own: not the first job's.
    assert_eq!(
        other["foreign"], false,
        "another job's lock on /usr/bin/env is visible: {other}"
    );
}

#[test]
fn given_job_when_reading_host_wide_proc_files_then_they_are_masked() {
    // A host lock that /proc/locks would show (an OFD lock is shown whatever the pid namespace).
    let file = tempfile::tempfile().expect("temp file");
    let lock = libc::flock {
        l_type: libc::c_short::try_from(libc::F_WRLCK).expect("fits"),
        l_whence: libc::c_short::try_from(libc::SEEK_SET).expect("fits"),
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK on our own descriptor with a valid `struct flock`.
    let ret = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_OFD_SETLK,
            &lock,
        )
    };
    assert_eq!(ret, 0, "host OFD lock: {}", std::io::Error::last_os_error());
    let host_locks = std::fs::read_to_string("/proc/locks").expect("host /proc/locks");
    assert!(host_locks.contains("OFDLCK"), "{host_locks}");
    let r = probe(&["proc"]);
    for (name, report) in r["files"].as_object().expect("files") {
        if report["exists"] == true {
            let empty = report["bytes"] == 0 || report["errno"].is_number();
            assert!(empty, "/proc/{name} is readable: {r}");
        }
    }
    assert_eq!(r["locks"], "", "/proc/locks shows locks: {r}");
    for (name, report) in r["dirs"].as_object().expect("dirs") {
        if report["exists"] == true {
            assert_eq!(report["entries"], 0, "/proc/{name} is not empty: {r}");
        }
    }
    for (name, read_only) in r["read_only"].as_object().expect("read_only") {
        assert!(
            read_only == true || read_only["errno"] == libc::ENOENT,
            "/proc/{name} is writable: {r}"
        );
    }
    drop(file);
}

#[test]
fn given_job_when_reading_init_cmdline_then_it_is_not_the_helpers() {
    let helper = Helper::start(&config(""));
    let r = helper.run(&Job::probe(&["proc"])).probe();
    let helper_cmdline =
        std::fs::read_to_string(format!("/proc/{}/cmdline", helper.pid())).expect("cmdline");
    assert_ne!(r["init_cmdline"], helper_cmdline.as_str(), "{r}");
    assert_eq!(r["init_cmdline"], "sandrun-init\0", "{r}");
    assert_eq!(r["init_comm"], "sandrun-init\n", "{r}");
}

#[test]
fn given_two_jobs_with_the_same_template_when_one_holds_flock_on_its_file_then_the_others_succeeds()
{
    let templates = tempfile::tempdir().expect("template dir");
    std::fs::create_dir(templates.path().join("py")).expect("mkdir");
    std::fs::write(templates.path().join("py/lib.py"), "x = 1\n").expect("write");
    // A template has a lock file (without one, no job may use it).
    std::fs::write(templates.path().join("py/sandrun-lock.json"), "{}\n").expect("write");
    let extra = format!("template_dir = \"{}\"", templates.path().display());
    let helper = Helper::start(&config(&extra));
    let with_template = |args: &[&str]| {
        let mut job = Job::probe(args);
        job.spec.template = Some("py".to_owned());
        job
    };
    let hold = with_template(&["flock", "/env/lib.py", "4000"]);
    let try_lock = with_template(&["flock", "/env/lib.py", "0"]);
    let (holder, other) = concurrently(&helper, &hold, &try_lock);
    for r in [&holder, &other] {
        assert_eq!(r["first"], 0, "flock(LOCK_EX|LOCK_NB) failed: {r}");
        assert_eq!(r["second"], libc::EWOULDBLOCK, "{r}");
    }
}

/// `ls /` works (the original's jobs could list the root), and listing is all that was added:
/// the helper's own directories stay closed, nothing can be created in `/`, and no file outside
/// the granted trees can be read.
#[test]
fn given_job_when_listing_the_root_then_it_sees_names_and_nothing_more_opens() {
    let helper = Helper::start(&config(""));
    let code = r#"
import json, os
def attempt(f):
    try:
        return ["ok", f()]
    except OSError as e:
        return ["errno", e.errno]
r = {
    "root": attempt(lambda: sorted(os.listdir("/"))),
    "dev": attempt(lambda: sorted(os.listdir("/dev"))),
    "template": attempt(lambda: os.listdir("/.sandrun-template")),
    "create": attempt(lambda: open("/new-file", "w").close()),
    "mkdir": attempt(lambda: os.mkdir("/new-dir")),
    "read_empty": attempt(lambda: os.listdir("/.sandrun-empty")),
}
print(json.dumps({"result": r}))
"#;
    let outcome = helper.run(&Job::new(&["/usr/bin/python3", "-c", code]));
    let r = outcome.probe();
    assert_eq!(r["root"][0], "ok", "ls / is refused: {r}");
    let names: Vec<&str> = r["root"][1]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for expected in ["usr", "etc", "proc", "dev", "tmp", "work"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert_eq!(r["dev"][0], "ok", "{r}");
    // The helper's own set-up directories are gone (or closed by their 0700 mode).
    assert!(
        names.iter().all(|n| !n.starts_with(".sandrun")),
        "helper internals listed: {names:?}"
    );
    let closed = [libc::ENOENT, libc::EACCES].map(|e| serde_json::json!(["errno", e]));
    assert!(closed.contains(&r["template"]), "{r}");
    for write in ["create", "mkdir"] {
        assert_eq!(r[write][0], "errno", "{write} in / succeeded: {r}");
    }
}
