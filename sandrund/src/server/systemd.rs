//! The two pieces of systemd integration the helper needs, written out instead of linking
//! libsystemd into a root process: socket activation (`LISTEN_FDS`) and readiness
//! (`sd_notify`).

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};

use nix::sys::socket::{getsockopt, sockopt};

/// The first descriptor systemd passes.
const SD_LISTEN_FDS_START: i32 = 3;

/// Whether this process was started by systemd socket activation (`LISTEN_PID` is this
/// process, `LISTEN_FDS` is set): one rule for [`crate::daemon`]'s descriptor clean-up, which
/// keeps fd 3 only then, and for [`take_activated_listener`]. Fails unless exactly one socket
/// was passed.
pub fn activation_requested() -> Result<bool, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(false);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(false);
    }
    let n: i32 = fds
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds:?} is not a number"))?;
    if n != 1 {
        return Err(format!("expected exactly one socket from systemd, got {n}"));
    }
    Ok(true)
}

/// Turns the descriptor the start-up kept for socket activation (fd 3, see
/// [`activation_requested`]) into the listening socket, and removes systemd's variables so
/// children never see them. Fails if it is not a listening Unix stream socket.
pub fn take_activated_listener(fd: Option<OwnedFd>) -> Result<Option<UnixListener>, String> {
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let Some(fd) = fd else {
        return Ok(None);
    };
    check_listener(&fd)?;
    let listener = UnixListener::from(fd);
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&listener),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("cannot set FD_CLOEXEC on the activated socket: {e}"))?;
    Ok(Some(listener))
}

fn check_listener(fd: &OwnedFd) -> Result<(), String> {
    let raw = SD_LISTEN_FDS_START;
    let listening = getsockopt(fd, sockopt::AcceptConn)
        .map_err(|e| format!("fd {raw} from systemd is not a socket: {e}"))?;
    let ty =
        getsockopt(fd, sockopt::SockType).map_err(|e| format!("fd {raw} from systemd: {e}"))?;
    if !listening || ty != nix::sys::socket::SockType::Stream {
        return Err(format!(
            "fd {raw} from systemd is not a listening stream socket"
        ));
    }
    Ok(())
}

/// Sends a state string (`READY=1`, `STOPPING=1`, `STATUS=...`) to systemd if `NOTIFY_SOCKET` is
/// set. Errors are returned for logging; they never stop the helper.
pub fn notify(state: &str) -> Result<(), String> {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let sock = UnixDatagram::unbound().map_err(|e| e.to_string())?;
    let sent = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| e.to_string())?;
        sock.send_to_addr(state.as_bytes(), &addr)
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    sent.map(|_| ())
        .map_err(|e| format!("sd_notify to {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_notify_socket_then_ready_is_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify("READY=1").unwrap();
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
