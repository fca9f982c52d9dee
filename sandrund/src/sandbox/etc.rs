//! The generated files of the sandbox's minimal `/etc`. Pure functions, so they are unit-tested.

#![forbid(unsafe_code)]

use crate::ids::{GroupId, UserId};

/// The sandbox's host name (also written to `/etc/hostname`).
pub(super) const HOSTNAME: &str = "sandrun";

/// Name of the job's user and group in `/etc/passwd` and `/etc/group`.
pub(super) const USER_NAME: &str = "sandbox";

/// `/etc/passwd`: root (no login) and the job's user, whose home is `/work`.
pub(super) fn passwd(uid: UserId, gid: GroupId) -> String {
    format!(
        "root:x:0:0:root:/root:/usr/sbin/nologin\n\
         {USER_NAME}:x:{uid}:{gid}:{USER_NAME}:/work:/bin/sh\n"
    )
}

/// `/etc/group`: root and the job's group.
pub(super) fn group(gid: GroupId) -> String {
    format!("root:x:0:\n{USER_NAME}:x:{gid}:\n")
}

/// `/etc/hosts`: loopback names only (the network namespace has nothing else).
pub(super) fn hosts() -> String {
    format!(
        "127.0.0.1\tlocalhost\n\
         127.0.1.1\t{HOSTNAME}\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
}

/// `/etc/hostname`.
pub(super) fn hostname() -> String {
    format!("{HOSTNAME}\n")
}

/// `/etc/nsswitch.conf`: everything from files.
pub(super) fn nsswitch() -> String {
    "passwd: files\ngroup: files\nshadow: files\nhosts: files\n\
     networks: files\nprotocols: files\nservices: files\n"
        .to_owned()
}

/// The generated files that are the same for every job, by name inside `/etc` (written while
/// the sandbox is prepared, before its job is known).
pub(super) fn fixed() -> [(&'static str, String); 3] {
    [
        ("hosts", hosts()),
        ("hostname", hostname()),
        ("nsswitch.conf", nsswitch()),
    ]
}

/// The generated files that name the job's user and group (written once the job is known).
pub(super) fn identity(uid: UserId, gid: GroupId) -> [(&'static str, String); 2] {
    [("passwd", passwd(uid, gid)), ("group", group(gid))]
}

/// Host files and directories mirrored read-only into `/etc` when they exist, so the dynamic
/// loader and Debian's interpreters work.
pub(super) const MIRRORED: [&str; 5] = [
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_job_ids_when_passwd_is_generated_then_sandbox_user_has_them_and_home_work() {
        let text = passwd(UserId(200_007), GroupId(200_008));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "root:x:0:0:root:/root:/usr/sbin/nologin");
        assert_eq!(lines[1], "sandbox:x:200007:200008:sandbox:/work:/bin/sh");
        for line in lines {
            assert_eq!(
                line.split(':').count(),
                7,
                "passwd line has 7 fields: {line}"
            );
        }
    }

    #[test]
    fn given_job_gid_when_group_is_generated_then_it_lists_root_and_sandbox() {
        assert_eq!(group(GroupId(42)), "root:x:0:\nsandbox:x:42:\n");
    }

    #[test]
    fn given_generated_etc_then_hostname_and_hosts_name_the_sandbox_and_lookups_use_files() {
        let files = fixed();
        let get = |name: &str| {
            files
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.clone())
                .unwrap_or_default()
        };
        assert_eq!(get("hostname"), "sandrun\n");
        assert!(get("hosts").contains("127.0.0.1\tlocalhost\n"));
        assert!(get("hosts").contains("\tsandrun\n"));
        assert!(get("nsswitch.conf").contains("passwd: files\n"));
        assert!(get("nsswitch.conf").contains("hosts: files\n"));
    }
}
