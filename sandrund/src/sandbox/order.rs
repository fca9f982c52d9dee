//! The job order: what a prepared (warm) sandbox init C learns about its job only when the job
//! arrives, since C was cloned before the job existed. The helper writes it into a sealed memfd
//! and passes the fd with the `Go` control message; C maps it read-only.
//!
//! Layout of the memfd: header length (u64, little endian), the header (bincode 2, standard
//! configuration: argv, env, work dir, uid, gid, limits, bundle entries, template name, stdin
//! length), then the bundle's file contents, concatenated, then the job's stdin bytes. The seals (`F_SEAL_WRITE | F_SEAL_SHRINK |
//! F_SEAL_GROW | F_SEAL_SEAL`) make the contents immutable before C sees them, so C's mapping
//! can be read as a plain byte slice.

#![forbid(unsafe_code)]

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use serde::{Deserialize, Serialize};

use sandrun_ipc::{BundleEntry, GrantedLimits};

use nix::errno::Errno;

use super::{fail, JobPlan, SetupError, SetupStep};
use crate::sys;

/// Largest header C accepts: argv, env and bundle entries are bounded far below this by the
/// helper's request validation; the bound keeps a corrupt length from allocating without limit.
const MAX_HEADER_BYTES: usize = 64 << 20;
const LEN_BYTES: usize = 8;

/// The header as the helper writes it (borrowed from the plan).
#[derive(Serialize)]
struct HeaderRef<'a> {
    argv: &'a [CString],
    env: &'a [CString],
    workdir: &'a str,
    uid: u32,
    gid: u32,
    limits: &'a GrantedLimits,
    bundle: &'a [BundleEntry],
    template: Option<&'a str>,
    stdin_bytes: u64,
    wheelhouse: bool,
}

/// The header as C reads it. Field order matches [`HeaderRef`].
#[derive(Debug, Deserialize)]
pub(super) struct Order {
    pub(super) argv: Vec<CString>,
    pub(super) env: Vec<CString>,
    pub(super) workdir: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) limits: GrantedLimits,
    pub(super) bundle: Vec<BundleEntry>,
    pub(super) template: Option<String>,
    /// Length of the job's stdin, the last bytes of the data.
    pub(super) stdin_bytes: u64,
    /// The wheelhouse's mount comes with the order (after the template's, if any).
    pub(super) wheelhouse: bool,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_HEADER_BYTES>()
}

/// The helper's side: writes `plan` into a new sealed memfd.
pub(super) fn write(plan: &JobPlan<'_>) -> Result<OwnedFd, SetupError> {
    let step = SetupStep::Protocol;
    let header = HeaderRef {
        argv: &plan.argv,
        env: &plan.env,
        workdir: &plan.workdir,
        uid: plan.uid.0,
        gid: plan.gid.0,
        limits: plan.limits,
        bundle: plan.bundle,
        template: plan.template.as_deref(),
        stdin_bytes: u64::try_from(plan.stdin.len())
            .map_err(|_| fail(step, Errno::EFBIG, "job stdin"))?,
        wheelhouse: plan.wheelhouse,
    };
    let bytes = bincode::serde::encode_to_vec(&header, config())
        .map_err(|e| fail(step, Errno::EINVAL, format!("job order: {e}")))?;
    let name = c"sandrun-job-order";
    let flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
    let fd = memfd_create(name, flags).map_err(|e| fail(step, e, "memfd_create"))?;
    let mut file = std::fs::File::from(fd);
    let len = u64::try_from(bytes.len()).map_err(|_| fail(step, Errno::EFBIG, "job order"))?;
    let io = |e: std::io::Error| {
        fail(
            step,
            Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            "job order",
        )
    };
    file.write_all(&len.to_le_bytes()).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.write_all(plan.bundle_data).map_err(io)?;
    file.write_all(plan.stdin).map_err(io)?;
    let fd = OwnedFd::from(file);
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SEAL;
    fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))
        .map_err(|e| fail(step, e, "seal the job order"))?;
    Ok(fd)
}

/// Maps C's sealed order memfd read-only after checking its seals; unmapped on drop, so the
/// bundle's pages are freed once it is written (C lives as long as the job).
pub(super) fn map(fd: &OwnedFd) -> Result<sys::SealedMap, SetupError> {
    sys::SealedMap::new(fd).map_err(|(e, what)| fail(SetupStep::Protocol, e, what))
}

/// What C reads from the mapped order: the header, the bundle's file contents and the stdin.
pub(super) struct Read<'a> {
    pub(super) order: Order,
    pub(super) files: &'a [u8],
    pub(super) stdin: &'a [u8],
}

/// C's side: splits the mapped order into its header, the bundle data and the stdin.
pub(super) fn read(bytes: &[u8]) -> Result<Read<'_>, SetupError> {
    let bad = |detail: &str| {
        fail(
            SetupStep::Protocol,
            Errno::EPROTO,
            format!("job order: {detail}"),
        )
    };
    let (len, rest) = bytes
        .split_first_chunk::<LEN_BYTES>()
        .ok_or_else(|| bad("too short"))?;
    let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| bad("header length"))?;
    if len > MAX_HEADER_BYTES || len > rest.len() {
        return Err(bad("header length"));
    }
    let (header, data) = rest.split_at(len);
    let (order, used): (Order, usize) =
        bincode::serde::decode_from_slice(header, config()).map_err(|e| bad(&e.to_string()))?;
    if used != len {
        return Err(bad("trailing header bytes"));
    }
    let stdin_len = usize::try_from(order.stdin_bytes).map_err(|_| bad("stdin length"))?;
    let split = data
        .len()
        .checked_sub(stdin_len)
        .ok_or_else(|| bad("stdin longer than the data"))?;
    let (files, stdin) = data.split_at(split);
    Ok(Read {
        order,
        files,
        stdin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{GroupId, UserId};
    use sandrun_ipc::BundlePath;

    fn limits() -> GrantedLimits {
        GrantedLimits {
            wall_ms: 1,
            memory_bytes: 2,
            cpu_ms: 3,
            pids: 4,
            output_bytes: 5,
            tmpfs_bytes: 6,
            file_count: 7,
        }
    }

    #[test]
    fn given_a_plan_when_written_and_mapped_then_c_reads_the_same_order_and_data() {
        let limits = limits();
        let path = |p: &str| BundlePath::new(p).expect("valid path");
        let bundle = vec![
            BundleEntry::Dir {
                path: path("d"),
                mode: 0o755,
            },
            BundleEntry::File {
                path: path("d/f"),
                mode: 0o644,
                size: 5,
            },
        ];
        let plan = JobPlan {
            argv: vec![CString::new("/bin/true").expect("no NUL")],
            env: vec![CString::new("A=b").expect("no NUL")],
            workdir: "d".into(),
            uid: UserId(200_001),
            gid: GroupId(200_002),
            limits: &limits,
            bundle: &bundle,
            bundle_data: b"hello",
            stdin: b"in\n",
            template: Some("python".to_owned()),
            wheelhouse: true,
        };
        let fd = write(&plan).expect("written");
        let mapped = map(&fd).expect("mapped");
        let Read {
            order,
            files: data,
            stdin,
        } = read(mapped.bytes()).expect("read");
        assert_eq!(order.argv, plan.argv);
        assert_eq!(order.env, plan.env);
        assert_eq!(order.workdir, "d");
        assert_eq!((order.uid, order.gid), (200_001, 200_002));
        assert_eq!(order.limits, limits);
        assert_eq!(order.bundle, bundle);
        assert_eq!(order.template, plan.template);
        assert_eq!(data, b"hello");
        assert_eq!(stdin, b"in\n");
    }

    #[test]
    fn given_a_sealed_order_when_someone_writes_to_it_then_the_kernel_refuses() {
        let limits = limits();
        let plan = JobPlan {
            argv: vec![CString::new("/bin/true").expect("no NUL")],
            env: Vec::new(),
            workdir: String::new(),
            uid: UserId(1),
            gid: GroupId(1),
            limits: &limits,
            bundle: &[],
            bundle_data: &[],
            stdin: &[],
            template: None,
            wheelhouse: false,
        };
        let fd = write(&plan).expect("written");
        let mut file = std::fs::File::from(fd);
        let err = file.write_all(b"x").expect_err("sealed");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn given_an_unsealed_memfd_when_mapped_then_c_refuses_it() {
        let fd = memfd_create(c"t", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
        let mut file = std::fs::File::from(fd);
        file.write_all(&[0u8; 16]).expect("write");
        let fd = OwnedFd::from(file);
        let err = map(&fd).err().expect("refused");
        assert_eq!((err.step, err.errno), (SetupStep::Protocol, Errno::EPERM));
    }

    #[test]
    fn given_truncated_or_lying_orders_when_read_then_each_is_a_protocol_error() {
        let mut long = 1000u64.to_le_bytes().to_vec();
        long.extend_from_slice(&[0u8; 10]);
        let mut trailing = 1u64.to_le_bytes().to_vec();
        trailing.push(0);
        for bytes in [&[1u8, 2, 3][..], &long, &trailing] {
            let err = read(bytes).err().unwrap_or_else(|| panic!("refused"));
            assert_eq!(err.step, SetupStep::Protocol);
        }
    }
}
