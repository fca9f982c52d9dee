//! A job's `requirements`: installed offline from the operator's wheelhouse inside the job's
//! own sandbox, before its command; what they came to is relayed to the client unread.
//!
//! The helper runs the job's command through [`INSTALL_PY`] (the script
//! `install_requirements.py` beside this file: `python3 -I -c INSTALL_PY REQS ARGV...`), so the
//! install runs as the job's uid, under its seccomp filter, Landlock ruleset and cgroup, into
//! its tmpfs, with no network: `pip install --isolated --no-index --find-links /wheelhouse
//! --prefix /tmp/.sandrun-req/prefix`. pip sees the template's packages through
//! `PYTHONPATH=/env`, so a requirement the template satisfies is not installed again. A line
//! with `--hash=sha256:` turns on pip's hash-checking mode for the whole file (every
//! requirement must then pin one).
//!
//! The script reports on fd 3, the write end of a pipe the helper made for this job alone
//! (sent with `Go`; C gives it to J only, at fd 3 without close-on-exec, and keeps no copy; the
//! helper closed its own copy once sent). It writes one record there (`installed`, then `name
//! version wheel sha256` per wheel, or `failed <cause>`, then `end`; at most 60,000 bytes, so
//! the write never blocks on the pipe's 64 KiB) and closes it. The SHA-256 of each wheel is
//! read by the script from `/wheelhouse` (the operator's directory, mounted read-only), opened
//! without following links. On failure it exits 1 without running the command; on success it
//! `execve`s the command with the install directory first on `PYTHONPATH`.
//!
//! No code of the job runs while fd 3 is open: the script runs with `-I`, and pip (a
//! `subprocess.run`, which closes fds other than 0-2) runs with a fixed environment (none of
//! the job's variables, `PYTHONPATH=/env` only with a template) and `/tmp/.sandrun-req` as its
//! working directory (so `python -m pip` cannot pick up a `pip` of the job's `/work`); wheels
//! run no code when installed. The job's own code therefore starts with the record written and
//! no way to add to or change it (fd 3 is `EBADF` for it).
//!
//! After the job, [`read_record`] takes what the pipe holds (non-blocking, at most
//! [`MAX_REQUIREMENTS_RECORD_BYTES`]) and the helper relays it in the exit report without
//! parsing it: the gateway, which owns every parser of bytes a job's uid wrote, turns it into
//! the reported (and signed) list, and a missing, cut-short or malformed record into "the
//! requirements install did not finish". The hashing costs the job's CPU time, not the
//! helper's loop.

#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use sandrun_ipc::{RequirementsRecord, MAX_REQUIREMENTS_RECORD_BYTES};

/// The install step, run inside the sandbox as the job's uid (see the module docs). Python, in
/// its own file so that it reads (and is syntax-checked by the tests) as the job code it is.
pub const INSTALL_PY: &str = include_str!("install_requirements.py");

/// The job's argv, run through the install step: `python -I -c INSTALL_PY REQS ARGV...`.
pub fn wrap_argv(python: &str, requirements: &[String], argv: Vec<String>) -> Vec<String> {
    let mut text = requirements.join("\n");
    text.push('\n');
    let mut out = vec![
        python.to_owned(),
        "-I".to_owned(),
        "-c".to_owned(),
        INSTALL_PY.to_owned(),
        text,
    ];
    out.extend(argv);
    out
}

/// What the read end of a job's record pipe holds, without blocking (every write end is closed
/// once the job has ended; one still open only means less to read). A read error ends the
/// record where it stands: the gateway then sees it cut short.
pub fn read_record(fd: BorrowedFd<'_>) -> RequirementsRecord {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let room = MAX_REQUIREMENTS_RECORD_BYTES + 1 - bytes.len();
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[..room.min(8192)]) {
            Ok(0) | Err(nix::errno::Errno::EAGAIN) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::warn!("requirements record cannot be read: {e}");
                break;
            }
        }
        if bytes.len() > MAX_REQUIREMENTS_RECORD_BYTES {
            bytes.truncate(MAX_REQUIREMENTS_RECORD_BYTES);
            return RequirementsRecord {
                bytes,
                overflowed: true,
            };
        }
    }
    RequirementsRecord {
        bytes,
        overflowed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn given_the_install_script_then_python3_compiles_it() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        // Debian 12, where the tests and CI run, has python3: a missing one is a failure here,
        // never a skip. `compile` is py_compile's check, without writing a `__pycache__`.
        let mut child = Command::new("python3")
            .args(["-I", "-c"])
            .arg("import sys; compile(sys.stdin.read(), 'install_requirements.py', 'exec')")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 must be installed to check install_requirements.py");
        let mut stdin = child.stdin.take().expect("stdin piped");
        stdin
            .write_all(INSTALL_PY.as_bytes())
            .expect("write the script");
        drop(stdin);
        let out = child.wait_with_output().expect("wait for python3");
        assert!(
            out.status.success(),
            "install_requirements.py does not compile: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn given_a_record_then_its_bytes_come_back_as_written() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).expect("pipe");
        let text = b"installed\na 1 a-1-py3-none-any.whl 00\nend\n";
        nix::unistd::write(&w, text).expect("write");
        drop(w);
        let got = read_record(r.as_fd());
        assert_eq!((got.bytes.as_slice(), got.overflowed), (&text[..], false));
    }

    #[test]
    fn given_an_oversized_record_or_an_open_writer_then_the_read_never_blocks_nor_grows() {
        // A writer still open and nothing written: EAGAIN, not a hang.
        let (r, _w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).expect("pipe");
        let got = read_record(r.as_fd());
        assert_eq!((got.bytes.len(), got.overflowed), (0, false));
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).expect("pipe");
        nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 18))
            .expect("F_SETPIPE_SZ");
        let big = vec![b'x'; 2 * MAX_REQUIREMENTS_RECORD_BYTES];
        assert_eq!(nix::unistd::write(&w, &big).expect("write"), big.len());
        let got = read_record(r.as_fd());
        assert!(got.overflowed);
        assert_eq!(got.bytes.len(), MAX_REQUIREMENTS_RECORD_BYTES);
    }
}
