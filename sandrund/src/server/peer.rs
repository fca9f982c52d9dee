//! Who is on the other end of a connection, from the kernel (`SO_PEERCRED`), and what they may do.

#![forbid(unsafe_code)]

use std::os::unix::net::UnixStream;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use sandrun_ipc::Role;

use crate::config::{user_in_group, Config};
use crate::ids::{GroupId, ProcessId, UserId};

/// The credentials the kernel recorded when the peer connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: UserId,
    pub gid: GroupId,
    pub pid: ProcessId,
}

impl Peer {
    /// Reads `SO_PEERCRED`.
    pub fn of(stream: &UnixStream) -> std::io::Result<Peer> {
        let cred = getsockopt(stream, PeerCredentials).map_err(std::io::Error::from)?;
        Ok(Peer {
            uid: UserId(cred.uid()),
            gid: GroupId(cred.gid()),
            pid: ProcessId(cred.pid()),
        })
    }
}

/// Decides whether `peer` may act in `role`. Root may do everything; the gateway user may submit;
/// members of the admin group may administer. Anyone else may do nothing.
pub fn authorize(cfg: &Config, peer: &Peer, role: Role) -> bool {
    authorize_with(cfg, peer, role, &|uid, gid| user_in_group(uid.0, gid))
}

fn authorize_with(
    cfg: &Config,
    peer: &Peer,
    role: Role,
    in_group: &dyn Fn(UserId, GroupId) -> bool,
) -> bool {
    if peer.uid.0 == 0 {
        return true;
    }
    match role {
        Role::Submitter => cfg.gateway_uid == Some(peer.uid),
        Role::Admin => cfg
            .admin_gid
            .is_some_and(|admin| peer.gid == admin || in_group(peer.uid, admin)),
    }
}

/// Whether this peer could ever be authorized for anything (checked at accept time, so strangers
/// are dropped before we read a byte from them).
pub fn may_connect(cfg: &Config, peer: &Peer) -> bool {
    authorize(cfg, peer, Role::Submitter) || authorize(cfg, peer, Role::Admin)
}

/// Whether `peer` may submit a template build job (`JobSpec::build`, more output files): root
/// only, and never the gateway's uid (a gateway misconfigured to run as root stays public).
pub fn may_build(cfg: &Config, peer: &Peer) -> bool {
    peer.uid.0 == 0 && cfg.gateway_uid != Some(peer.uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserDb;

    struct Users;
    impl UserDb for Users {
        fn user(&self, _: &str) -> Option<(UserId, GroupId)> {
            Some((UserId(500), GroupId(500)))
        }
        fn group(&self, name: &str) -> Option<GroupId> {
            (name == "sandrun-admin").then_some(GroupId(700))
        }
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid: UserId(uid),
            gid: GroupId(gid),
            pid: ProcessId(1),
        }
    }

    #[test]
    fn given_roles_then_only_the_right_peers_are_authorized() {
        let cfg = Config::from_text("", &Users).unwrap();
        let never = |_: UserId, _: GroupId| false;
        let member = |u: UserId, g: GroupId| u.0 == 600 && g.0 == 700;
        assert!(authorize_with(&cfg, &peer(0, 0), Role::Admin, &never));
        assert!(authorize_with(&cfg, &peer(0, 0), Role::Submitter, &never));
        assert!(authorize_with(
            &cfg,
            &peer(500, 500),
            Role::Submitter,
            &never
        ));
        assert!(!authorize_with(&cfg, &peer(500, 500), Role::Admin, &never));
        assert!(authorize_with(&cfg, &peer(600, 600), Role::Admin, &member));
        assert!(authorize_with(&cfg, &peer(601, 700), Role::Admin, &never));
        assert!(!authorize_with(
            &cfg,
            &peer(600, 600),
            Role::Submitter,
            &member
        ));
        assert!(!authorize_with(
            &cfg,
            &peer(65534, 65534),
            Role::Submitter,
            &never
        ));
        assert!(!authorize_with(
            &cfg,
            &peer(65534, 65534),
            Role::Admin,
            &never
        ));
    }

    #[test]
    fn given_peers_then_only_root_that_is_not_the_gateway_may_build() {
        let cfg = Config::from_text("", &Users).unwrap();
        assert!(may_build(&cfg, &peer(0, 0)));
        assert!(!may_build(&cfg, &peer(500, 500)), "the gateway");
        assert!(!may_build(&cfg, &peer(600, 700)), "an admin");
        let mut root_gateway = cfg.clone();
        root_gateway.gateway_uid = Some(UserId(0));
        assert!(!may_build(&root_gateway, &peer(0, 0)));
    }
}
