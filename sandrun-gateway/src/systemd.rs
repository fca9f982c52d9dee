//! systemd integration, all optional: socket activation of the TCP listener (`LISTEN_FDS`),
//! readiness (`NOTIFY_SOCKET`), and credentials (`$CREDENTIALS_DIRECTORY`).

use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The TCP listener passed by systemd socket activation, if this process was given one.
pub fn activated_listener() -> Option<std::net::TcpListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let count: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || count < 1 {
        return None;
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let stat = nix::sys::stat::fstat(LISTEN_FDS_START).ok()?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        tracing::warn!("LISTEN_FDS is set but descriptor 3 is not a socket; ignoring it");
        return None;
    }
    // SAFETY: LISTEN_PID names this process, so systemd handed us descriptor 3 and nothing else
    // in this process owns it; fstat just confirmed it is an open socket. Ownership moves to the
    // returned listener, which closes it on drop.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(LISTEN_FDS_START) };
    Some(listener)
}

/// Tells systemd the service is ready (`READY=1`), if `NOTIFY_SOCKET` is set.
pub fn notify_ready() {
    notify("READY=1\n");
}

/// Tells systemd the service is stopping.
pub fn notify_stopping() {
    notify("STOPPING=1\n");
}

fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
    } else {
        socket.send_to(message.as_bytes(), PathBuf::from(&path))
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// A credential file passed by systemd (`LoadCredential=`), if present.
pub fn credential(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let path = PathBuf::from(dir).join(name);
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_notify_socket_then_ready_is_sent_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify_ready();
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
    }

    #[test]
    fn given_listen_pid_of_another_process_then_no_listener_is_taken() {
        std::env::set_var("LISTEN_PID", "1");
        std::env::set_var("LISTEN_FDS", "1");
        assert!(activated_listener().is_none());
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
    }
}
