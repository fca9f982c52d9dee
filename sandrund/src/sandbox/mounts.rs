//! The job's root file system, built by C inside its private mount namespace: a size-capped
//! tmpfs with private read-only overlays of the system directories, a generated `/etc`, a fresh
//! `/proc` with the host-wide files masked, a minimal `/dev`, `/tmp`, `/work` and the optional
//! template at `/env`; then `pivot_root` into it.
//!
//! Nothing the job can open is an inode it shares with another job or the host, wherever that
//! could be a channel: an inotify watch or a `flock` lives on an inode, so the system directories
//! are overlays (each mount its own superblock, so its own inodes, over the host's read-only
//! files), the `/etc` files are copies, and `/proc`'s host-wide files are masked.

#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{lchown, symlink, OpenOptionsExt};
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, mkdir, pivot_root};
use sandrun_ipc::GrantedLimits;

use nix::errno::Errno;

use super::{at, etc, fail, SetupError, SetupStep};
use crate::ids::{GroupId, UserId};
use crate::sys;

/// Host directories that are recreated as the same symlink, or mounted as a private read-only
/// overlay, when present.
pub(super) const SYSTEM_DIRS: [&str; 6] = ["bin", "sbin", "lib", "lib64", "lib32", "libx32"];

/// Devices bound from the host's `/dev`.
pub(super) const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// Inodes the skeleton itself uses (directories, `/etc` files, mount points), added to the
/// job's `file_count` so the job gets its whole allowance.
pub(super) const SKELETON_INODES: u64 = 64;
/// Bytes added to the job's tmpfs size for the skeleton (generated /etc files, /dev entries),
/// rounded up generously: a few pages are used.
pub(super) const SKELETON_BYTES: u64 = 1 << 20;

const NONE: Option<&str> = None;

/// How a host path was mirrored into the new root.
#[derive(Debug, PartialEq, Eq)]
enum Mirrored {
    Absent,
    Symlink,
    Dir,
    File,
}

/// The root's job-independent part, built while the sandbox is prepared (before its job is
/// known), and what the job's part needs from the host afterwards.
pub(super) struct Prepared {
    /// `SYSTEM_DIRS` entries bound as directories.
    pub(super) bound_dirs: Vec<&'static str>,
    /// `O_PATH` fd of `/work`.
    pub(super) work: OwnedFd,
}

/// Builds every part of the root on `root` that is the same for every job and switches into
/// it, while the sandbox is prepared (before its job is known). The caller's umask must be 0.
pub(super) fn prepare_root(root: &Path) -> Result<Prepared, SetupError> {
    // 1. Nothing we mount may propagate back to the host.
    make_root_private()?;
    // 2. The tmpfs that becomes `/`, sized for the skeleton only until the job is known.
    mount_tmpfs_root(root)?;
    // 3. `/usr` and the `/bin`, `/sbin`, `/lib*` links or directories, as private read-only
    //    overlays.
    let bound_dirs = overlay_system_dirs(root)?;
    // 4. A minimal `/etc` (the user and group files come with the job).
    write_etc(root)?;
    // 5. A fresh `/proc` for the job's pid namespace, its host-wide files masked.
    mount_proc(root)?;
    mask_proc(root)?;
    // 6. A minimal `/dev`.
    make_dev(root)?;
    // 7. `/tmp` and `/work` (owned by root until the job is known).
    make_work_dirs(root)?;
    let work = open_dir_path(&root.join("work"), SetupStep::MakeWorkDirs)?;
    // 8. Switch to the new root and detach the host's.
    pivot_into(root)?;
    Ok(Prepared { bound_dirs, work })
}

/// The job's part of the root (now `/`), once the job is known: the tmpfs gets the job's size
/// and inode caps, `/etc` its user and group, `/env` its template, `/work` its owner. Returns
/// whether a template is bound.
pub(super) fn finish_root(
    limits: &GrantedLimits,
    uid: UserId,
    gid: GroupId,
    template: Option<OwnedFd>,
    wheelhouse: Option<OwnedFd>,
) -> Result<bool, SetupError> {
    let root = Path::new("/");
    // 9. The job's size and inode caps.
    resize_tmpfs_root(root, limits)?;
    // 10. `/etc/passwd` and `/etc/group` naming the job's user.
    write_identity(root, uid, gid)?;
    // 11. The environment template at `/env`.
    let has_env = match template {
        Some(tree) => {
            attach_readonly(tree, "env", SetupStep::BindTemplate)?;
            true
        }
        None => false,
    };
    // 11b. The operator's wheelhouse at `/wheelhouse`, for a job with requirements.
    if let Some(tree) = wheelhouse {
        attach_readonly(tree, "wheelhouse", SetupStep::BindWheelhouse)?;
    }
    // 12. `/work` belongs to the job's user.
    own_work_dir(root, uid, gid)?;
    Ok(has_env)
}

fn make_root_private() -> Result<(), SetupError> {
    let flags = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
    mount(NONE, "/", NONE, flags, NONE).map_err(at(SetupStep::MakeRootPrivate, "/"))
}

/// `size=` and `nr_inodes=` of 0 would mean "unlimited" to tmpfs: refuse them.
pub(super) fn tmpfs_options(limits: &GrantedLimits) -> Result<String, SetupError> {
    if limits.tmpfs_bytes == 0 {
        return Err(fail(
            SetupStep::MountTmpfsRoot,
            Errno::EINVAL,
            "tmpfs size 0 would be unlimited",
        ));
    }
    let inodes = u64::from(limits.file_count) + SKELETON_INODES;
    // The skeleton's own files (/etc, /dev entries) must not eat the job's allowance.
    let size = limits.tmpfs_bytes.saturating_add(SKELETON_BYTES);
    Ok(format!("size={size},nr_inodes={inodes}"))
}

/// Mounts the root tmpfs with room for the skeleton only; [`resize_tmpfs_root`] gives it the
/// job's caps.
fn mount_tmpfs_root(root: &Path) -> Result<(), SetupError> {
    let step = SetupStep::MountTmpfsRoot;
    let options = format!("size={SKELETON_BYTES},nr_inodes={SKELETON_INODES},mode=0755");
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let detail = root.display().to_string();
    mount(
        Some("sandrun"),
        root,
        Some("tmpfs"),
        flags,
        Some(options.as_str()),
    )
    .map_err(at(step, &detail))
}

/// Remounts the root tmpfs with the job's size and inode caps (same per-mount flags).
fn resize_tmpfs_root(root: &Path, limits: &GrantedLimits) -> Result<(), SetupError> {
    let options = tmpfs_options(limits)?;
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(NONE, root, NONE, flags, Some(options.as_str()))
        .map_err(at(SetupStep::MountTmpfsRoot, "resize to the job's limits"))
}

fn overlay_system_dirs(root: &Path) -> Result<Vec<&'static str>, SetupError> {
    let step = SetupStep::OverlaySystemDirs;
    let empty = EmptyLayer::create(root, step)?;
    if mirror(Path::new("/usr"), &root.join("usr"), &empty, step)? != Mirrored::Dir {
        return Err(fail(step, Errno::ENOTDIR, "/usr"));
    }
    let mut bound = Vec::new();
    for name in SYSTEM_DIRS {
        let host = Path::new("/").join(name);
        match mirror(&host, &root.join(name), &empty, step)? {
            Mirrored::Dir => bound.push(name),
            Mirrored::File => return Err(fail(step, Errno::ENOTDIR, host.display().to_string())),
            Mirrored::Absent | Mirrored::Symlink => {}
        }
    }
    empty.remove()?;
    Ok(bound)
}

/// The empty directory that is every overlay's second lower layer (overlayfs needs two lower
/// layers when it has no upper one): a tiny read-only tmpfs of its own, lazily detached once the
/// overlays are mounted (each holds its own reference, and the job never sees it).
///
/// It must not be a plain directory that is then removed: overlayfs lists a merged directory
/// (the overlay's root, present in both layers) by reading every layer, and a removed directory
/// reads as empty, so `ls /usr` and `ls /env` were empty, and Python, whose import system finds
/// modules through directory listings, could import nothing from the top of a template.
struct EmptyLayer {
    path: std::path::PathBuf,
    step: SetupStep,
}

impl EmptyLayer {
    fn create(root: &Path, step: SetupStep) -> Result<EmptyLayer, SetupError> {
        let path = root.join(".sandrun-empty");
        make_dir(&path, 0o555, step)?;
        let flags =
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(
            Some("sandrun-empty"),
            &path,
            Some("tmpfs"),
            flags,
            Some("size=4k,nr_inodes=1,mode=0555"),
        )
        .map_err(at(step, "the overlays' empty layer"))?;
        Ok(EmptyLayer { path, step })
    }

    fn remove(self) -> Result<(), SetupError> {
        umount2(&self.path, MntFlags::MNT_DETACH)
            .map_err(at(self.step, "detach the empty layer"))?;
        std::fs::remove_dir(&self.path).map_err(io_at(self.step, &self.path))
    }
}

/// Mounts a read-only overlay of the host directory `host` on `dst`: the same files, but the
/// overlay's own inodes, so inotify watches and locks on them reach no other job or the host.
/// Redirects and metacopy (which would follow xattrs of the host's tree) are off.
fn overlay_readonly(
    host: &Path,
    dst: &Path,
    empty: &EmptyLayer,
    step: SetupStep,
) -> Result<(), SetupError> {
    let detail = host.display().to_string();
    let options =
        overlay_options(host, &empty.path).ok_or_else(|| fail(step, Errno::EINVAL, &*detail))?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some("sandrun"),
        dst,
        Some("overlay"),
        flags,
        Some(options.as_str()),
    )
    .map_err(at(step, &detail))
}

/// The overlay's mount options, or `None` if a layer's path cannot be written in them (overlayfs
/// splits the options on `,` and the layers on `:`, and `\` escapes).
pub(super) fn overlay_options(lower: &Path, empty: &Path) -> Option<String> {
    let (lower, empty) = (lower.to_str()?, empty.to_str()?);
    let plain = |p: &str| !p.contains([',', ':', '\\']);
    if !plain(lower) || !plain(empty) {
        return None;
    }
    Some(format!(
        "lowerdir={lower}:{empty},redirect_dir=nofollow,metacopy=off,index=off,xino=off"
    ))
}

fn write_etc(root: &Path) -> Result<(), SetupError> {
    let step = SetupStep::WriteEtc;
    let dir = root.join("etc");
    make_dir(&dir, 0o755, step)?;
    for (name, text) in etc::fixed() {
        write_new_file(&dir.join(name), text.as_bytes(), step)?;
    }
    let empty = EmptyLayer::create(root, step)?;
    for name in etc::MIRRORED {
        mirror(&Path::new("/etc").join(name), &dir.join(name), &empty, step)?;
    }
    empty.remove()
}

fn write_identity(root: &Path, uid: UserId, gid: GroupId) -> Result<(), SetupError> {
    let dir = root.join("etc");
    for (name, text) in etc::identity(uid, gid) {
        write_new_file(&dir.join(name), text.as_bytes(), SetupStep::WriteEtc)?;
    }
    Ok(())
}

fn mount_proc(root: &Path) -> Result<(), SetupError> {
    let step = SetupStep::MountProc;
    let target = root.join("proc");
    make_dir(&target, 0o555, step)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let detail = target.display().to_string();
    mount(Some("proc"), &target, Some("proc"), flags, NONE).map_err(at(step, &detail))
}

/// How one `/proc` entry is masked (the list runc and Docker mask, and a few more host-wide ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProcMask {
    /// `/dev/null` bound over a file: it reads as empty, writes vanish.
    Null,
    /// An empty read-only tmpfs over a directory.
    Empty,
    /// The entry bound read-only over itself.
    ReadOnly,
}

/// The masked `/proc` entries. An entry the kernel does not have is skipped (nothing to hide);
/// any other failure fails the job.
pub(super) const PROC_MASKS: [(&str, ProcMask); 18] = [
    ("kcore", ProcMask::Null),
    ("keys", ProcMask::Null),
    ("key-users", ProcMask::Null),
    ("latency_stats", ProcMask::Null),
    ("timer_list", ProcMask::Null),
    ("timer_stats", ProcMask::Null),
    ("sched_debug", ProcMask::Null),
    ("locks", ProcMask::Null),
    ("kallsyms", ProcMask::Null),
    ("sysrq-trigger", ProcMask::Null),
    ("kmsg", ProcMask::Null),
    ("acpi", ProcMask::Empty),
    ("asound", ProcMask::Empty),
    ("scsi", ProcMask::Empty),
    ("sys", ProcMask::ReadOnly),
    ("bus", ProcMask::ReadOnly),
    ("fs", ProcMask::ReadOnly),
    ("irq", ProcMask::ReadOnly),
];

/// Masks [`PROC_MASKS`] on the fresh `/proc` under `root` (before the host's `/dev/null` is out
/// of reach).
fn mask_proc(root: &Path) -> Result<(), SetupError> {
    let step = SetupStep::MaskProc;
    let proc = root.join("proc");
    for (name, mask) in PROC_MASKS {
        let target = proc.join(name);
        match std::fs::symlink_metadata(&target) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_at(step, &target)(e)),
        }
        match mask {
            // Not nodev: the bound node is a device.
            ProcMask::Null => bind(
                Path::new("/dev/null"),
                &target,
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                step,
            )?,
            ProcMask::Empty => {
                let flags = MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC;
                let detail = target.display().to_string();
                mount(
                    Some("sandrun"),
                    &target,
                    Some("tmpfs"),
                    flags,
                    Some("size=4k,nr_inodes=1,mode=0555"),
                )
                .map_err(at(step, &detail))?;
            }
            ProcMask::ReadOnly => bind(
                &target,
                &target,
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                step,
            )?,
        }
    }
    Ok(())
}

fn make_dev(root: &Path) -> Result<(), SetupError> {
    let step = SetupStep::MakeDev;
    let dev = root.join("dev");
    make_dir(&dev, 0o755, step)?;
    let nodes = DeviceNodes::create(root)?;
    for name in DEVICES {
        let target = dev.join(name);
        write_new_file(&target, b"", step)?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        bind(&nodes.dir.join(name), &target, flags, step)?;
    }
    nodes.remove()?;
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (name, target) in links {
        let link = dev.join(name);
        symlink(target, &link).map_err(io_at(step, &link))?;
    }
    make_dir(&dev.join("shm"), 0o1777, step)
}

/// The job's own device nodes: a small tmpfs (the root one is nodev) with fresh nodes of the
/// host's devices, each then bound into `/dev`. Fresh nodes, not the host's `/dev` entries, so
/// an inotify watch on `/dev/null` sees no other job's (or the host's) opens. Detached once the
/// nodes are bound (the binds keep it alive).
struct DeviceNodes {
    dir: std::path::PathBuf,
}

impl DeviceNodes {
    fn create(root: &Path) -> Result<DeviceNodes, SetupError> {
        let step = SetupStep::MakeDev;
        let dir = root.join(".sandrun-dev");
        make_dir(&dir, 0o755, step)?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        let options = format!("size=4k,nr_inodes={},mode=0755", DEVICES.len() + 1);
        let detail = dir.display().to_string();
        mount(
            Some("sandrun"),
            &dir,
            Some("tmpfs"),
            flags,
            Some(options.as_str()),
        )
        .map_err(at(step, &detail))?;
        for name in DEVICES {
            let host = Path::new("/dev").join(name);
            let meta = std::fs::metadata(&host).map_err(io_at(step, &host))?;
            if !std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type()) {
                return Err(fail(step, Errno::ENODEV, host.display().to_string()));
            }
            let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
            let node = dir.join(name);
            let mode = Mode::from_bits_truncate(0o666);
            nix::sys::stat::mknod(&node, nix::sys::stat::SFlag::S_IFCHR, mode, rdev)
                .map_err(at(step, &node.display().to_string()))?;
        }
        Ok(DeviceNodes { dir })
    }

    fn remove(self) -> Result<(), SetupError> {
        let step = SetupStep::MakeDev;
        let detail = self.dir.display().to_string();
        umount2(&self.dir, MntFlags::MNT_DETACH).map_err(at(step, &detail))?;
        std::fs::remove_dir(&self.dir).map_err(io_at(step, &self.dir))
    }
}

/// Attaches the job's template at `/env`: a detached mount (`open_tree(OPEN_TREE_CLONE)`) the
/// helper made of `<template_dir>/<name>` for this job, already read-only, nosuid and nodev.
/// The job gets a private read-only overlay of it, like the system directories: jobs with the
/// same template see the same files but not the same inodes. The tree is attached at a
/// temporary point, overlaid, then detached (the overlay keeps its own reference); a mount
/// nested inside the template is not part of the overlay (overlayfs does not cross mounts).
/// The wheelhouse is attached the same way at `/wheelhouse`.
fn attach_readonly(tree: OwnedFd, name: &str, step: SetupStep) -> Result<(), SetupError> {
    let root = Path::new("/");
    let target = root.join(name);
    make_dir(&target, 0o755, step)?;
    let lower = root.join(format!(".sandrun-lower-{name}"));
    make_dir(&lower, 0o700, step)?;
    sys::move_mount_here(&tree, &lower).map_err(|e| fail(step, e, "attach the tree"))?;
    drop(tree);
    let empty = EmptyLayer::create(root, step)?;
    overlay_readonly(&lower, &target, &empty, step)?;
    empty.remove()?;
    umount2(&lower, MntFlags::MNT_DETACH).map_err(at(step, "detach the tree"))?;
    std::fs::remove_dir(&lower).map_err(io_at(step, &lower))
}

fn open_dir_path(path: &Path, step: SetupStep) -> Result<OwnedFd, SetupError> {
    use nix::fcntl::OFlag;
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let detail = path.display().to_string();
    sys::open(path, flags, Mode::empty()).map_err(at(step, &detail))
}

fn make_work_dirs(root: &Path) -> Result<(), SetupError> {
    let step = SetupStep::MakeWorkDirs;
    make_dir(&root.join("tmp"), 0o1777, step)?;
    make_dir(&root.join("work"), 0o755, step)
}

fn own_work_dir(root: &Path, uid: UserId, gid: GroupId) -> Result<(), SetupError> {
    let work = root.join("work");
    lchown(&work, Some(uid.0), Some(gid.0)).map_err(io_at(SetupStep::MakeWorkDirs, &work))
}

fn pivot_into(root: &Path) -> Result<(), SetupError> {
    let step = SetupStep::PivotRoot;
    let detail = root.display().to_string();
    chdir(root).map_err(at(step, &detail))?;
    // With new_root == put_old the old root ends up stacked on the new one, at ".", so no
    // directory for it is needed (pivot_root(2), "NOTES").
    pivot_root(".", ".").map_err(at(step, &detail))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(at(step, "old root"))?;
    chdir("/").map_err(at(step, "/"))
}

/// Recreates `host` at `dst`: a symlink as the same symlink, a directory as a private
/// read-only overlay, a regular file as a copy (at most [`MAX_COPIED_BYTES`]). Anything else,
/// or nothing, is skipped.
fn mirror(
    host: &Path,
    dst: &Path,
    empty: &EmptyLayer,
    step: SetupStep,
) -> Result<Mirrored, SetupError> {
    let meta = match std::fs::symlink_metadata(host) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Mirrored::Absent),
        Err(e) => return Err(io_at(step, host)(e)),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(host).map_err(io_at(step, host))?;
        symlink(target, dst).map_err(io_at(step, dst))?;
        Ok(Mirrored::Symlink)
    } else if kind.is_dir() {
        make_dir(dst, 0o755, step)?;
        overlay_readonly(host, dst, empty, step)?;
        Ok(Mirrored::Dir)
    } else if kind.is_file() {
        copy_file(host, dst, step)?;
        Ok(Mirrored::File)
    } else {
        Ok(Mirrored::Absent)
    }
}

/// Largest host file copied into the root (`/etc/ld.so.cache` is the largest, tens of KiB): the
/// skeleton's room on the tmpfs is [`SKELETON_BYTES`].
const MAX_COPIED_BYTES: u64 = 256 << 10;

/// Copies the host's regular file `host` to a new read-only file `dst` (mode 0444).
fn copy_file(host: &Path, dst: &Path, step: SetupStep) -> Result<(), SetupError> {
    use std::io::Read;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(host)
        .map_err(io_at(step, host))?;
    let mut contents = Vec::new();
    file.take(MAX_COPIED_BYTES + 1)
        .read_to_end(&mut contents)
        .map_err(io_at(step, host))?;
    if u64::try_from(contents.len()).map_or(true, |n| n > MAX_COPIED_BYTES) {
        return Err(fail(step, Errno::EFBIG, host.display().to_string()));
    }
    write_new_file(dst, &contents, step)?;
    std::fs::set_permissions(dst, std::os::unix::fs::PermissionsExt::from_mode(0o444))
        .map_err(io_at(step, dst))
}

/// A non-recursive bind of `host` on `dst`, then a remount that sets exactly `flags`.
fn bind(host: &Path, dst: &Path, flags: MsFlags, step: SetupStep) -> Result<(), SetupError> {
    let detail = host.display().to_string();
    mount(Some(host), dst, NONE, MsFlags::MS_BIND, NONE).map_err(at(step, &detail))?;
    let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
    mount(NONE, dst, NONE, remount, NONE).map_err(at(step, &detail))
}

fn make_dir(path: &Path, mode: u32, step: SetupStep) -> Result<(), SetupError> {
    let detail = path.display().to_string();
    mkdir(path, Mode::from_bits_truncate(mode)).map_err(at(step, &detail))
}

fn write_new_file(path: &Path, contents: &[u8], step: SetupStep) -> Result<(), SetupError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_at(step, path))?;
    file.write_all(contents).map_err(io_at(step, path))
}

fn io_at(step: SetupStep, path: &Path) -> impl FnOnce(std::io::Error) -> SetupError + '_ {
    move |e| {
        let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        fail(step, errno, path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(tmpfs_bytes: u64, file_count: u32) -> GrantedLimits {
        GrantedLimits {
            wall_ms: 1000,
            memory_bytes: 1 << 20,
            cpu_ms: 1000,
            pids: 8,
            output_bytes: 1 << 20,
            tmpfs_bytes,
            file_count,
        }
    }

    #[test]
    fn given_limits_when_tmpfs_options_are_built_then_size_and_inodes_are_capped() {
        let options = tmpfs_options(&limits(1 << 20, 100));
        assert_eq!(options, Ok("size=2097152,nr_inodes=164".to_owned()));
    }

    #[test]
    fn given_plain_paths_when_overlay_options_are_built_then_both_layers_and_no_redirects() {
        let options = overlay_options(Path::new("/usr"), Path::new("/run/r/.sandrun-empty"));
        assert_eq!(
            options.as_deref(),
            Some(
                "lowerdir=/usr:/run/r/.sandrun-empty,redirect_dir=nofollow,metacopy=off,\
                 index=off,xino=off"
            )
        );
    }

    #[test]
    fn given_a_layer_path_with_an_option_separator_then_overlay_options_are_refused() {
        for bad in ["/a,b", "/a:b", "/a\\b"] {
            assert_eq!(
                overlay_options(Path::new(bad), Path::new("/e")),
                None,
                "{bad}"
            );
            assert_eq!(
                overlay_options(Path::new("/usr"), Path::new(bad)),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn given_the_proc_masks_then_each_entry_is_one_plain_name_listed_once() {
        let mut names: Vec<&str> = PROC_MASKS.iter().map(|(n, _)| *n).collect();
        assert!(names.iter().all(|n| !n.is_empty() && !n.contains('/')));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PROC_MASKS.len());
    }

    #[test]
    fn given_zero_tmpfs_size_when_tmpfs_options_are_built_then_it_is_refused_not_unlimited() {
        let err = tmpfs_options(&limits(0, 100)).err();
        assert_eq!(
            err.map(|e| (e.step, e.errno)),
            Some((SetupStep::MountTmpfsRoot, Errno::EINVAL))
        );
    }
}
