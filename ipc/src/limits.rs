//! A job's resource limits: what a client asks for ([`Limits`]), what the helper grants
//! ([`GrantedLimits`], also the type of the helper's configured `[maxima]` and `[defaults]`),
//! and the one rule from the first to the second ([`Limits::grant`]).

use serde::{Deserialize, Serialize};

/// Resource limits a client asks for. The helper clamps every field to its configured maxima and
/// reports the granted values in [`crate::Response::Accepted`]. `None` means "the helper's
/// default".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock timeout in milliseconds.
    pub wall_ms: Option<u64>,
    /// Memory limit in bytes (swap is always 0).
    pub memory_bytes: Option<u64>,
    /// CPU time in milliseconds, summed over every process of the job.
    pub cpu_ms: Option<u64>,
    /// Maximum number of tasks (processes and threads) alive at once.
    pub pids: Option<u32>,
    /// Bytes kept per output stream (stdout, stderr); the rest is dropped and flagged.
    pub output_bytes: Option<u64>,
    /// Size of the job's tmpfs root in bytes (inputs, outputs, /tmp).
    pub tmpfs_bytes: Option<u64>,
    /// Maximum number of inodes on the job's tmpfs.
    pub file_count: Option<u32>,
}

/// Limits after clamping: every field is set. The helper's configuration file writes its
/// `[maxima]` and `[defaults]` tables with these field names (every one required, no other;
/// `deny_unknown_fields` does not change the protocol's encoding, which names no field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantedLimits {
    pub wall_ms: u64,
    pub memory_bytes: u64,
    pub cpu_ms: u64,
    pub pids: u32,
    pub output_bytes: u64,
    pub tmpfs_bytes: u64,
    pub file_count: u32,
}

/// The least memory a job is granted, whatever it asks for: 8 MiB.
pub const MIN_MEMORY_BYTES: u64 = 8 << 20;
/// The fewest tasks a job is granted: its init and one process.
pub const MIN_PIDS: u32 = 2;
/// The fewest inodes a job's tmpfs is granted.
pub const MIN_FILE_COUNT: u32 = 64;

/// A limit asked for as 0 (the client's fault): `field` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroLimit {
    pub field: &'static str,
}

impl std::fmt::Display for ZeroLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "limits.{} must be positive", self.field)
    }
}

impl std::error::Error for ZeroLimit {}

impl Limits {
    /// What the helper grants: each requested value, or `defaults`' when none is asked for,
    /// never above `maxima`, and never below [`MIN_MEMORY_BYTES`], [`MIN_PIDS`] and
    /// [`MIN_FILE_COUNT`]. A request of 0 is refused (the first such field, in field order).
    pub fn grant(
        &self,
        defaults: &GrantedLimits,
        maxima: &GrantedLimits,
    ) -> Result<GrantedLimits, ZeroLimit> {
        fn pick<T: Ord + Copy + Default>(
            field: &'static str,
            asked: Option<T>,
            default: T,
            max: T,
        ) -> Result<T, ZeroLimit> {
            match asked {
                Some(v) if v == T::default() => Err(ZeroLimit { field }),
                Some(v) => Ok(v.min(max)),
                None => Ok(default.min(max)),
            }
        }
        macro_rules! pick {
            ($field:ident) => {
                pick(
                    stringify!($field),
                    self.$field,
                    defaults.$field,
                    maxima.$field,
                )?
            };
        }
        Ok(GrantedLimits {
            wall_ms: pick!(wall_ms),
            memory_bytes: pick!(memory_bytes).max(MIN_MEMORY_BYTES),
            cpu_ms: pick!(cpu_ms),
            pids: pick!(pids).max(MIN_PIDS),
            output_bytes: pick!(output_bytes),
            tmpfs_bytes: pick!(tmpfs_bytes),
            file_count: pick!(file_count).max(MIN_FILE_COUNT),
        })
    }
}

impl GrantedLimits {
    /// Field-by-field minimum (the helper's defaults are clamped to its maxima so).
    pub fn min(&self, other: &GrantedLimits) -> GrantedLimits {
        GrantedLimits {
            wall_ms: self.wall_ms.min(other.wall_ms),
            memory_bytes: self.memory_bytes.min(other.memory_bytes),
            cpu_ms: self.cpu_ms.min(other.cpu_ms),
            pids: self.pids.min(other.pids),
            output_bytes: self.output_bytes.min(other.output_bytes),
            tmpfs_bytes: self.tmpfs_bytes.min(other.tmpfs_bytes),
            file_count: self.file_count.min(other.file_count),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: u32) -> GrantedLimits {
        GrantedLimits {
            wall_ms: n.into(),
            memory_bytes: u64::from(n) << 20,
            cpu_ms: n.into(),
            pids: n,
            output_bytes: n.into(),
            tmpfs_bytes: n.into(),
            file_count: n * 10,
        }
    }

    #[test]
    fn given_no_request_then_the_defaults_are_granted_within_the_maxima_and_floors() {
        let (defaults, maxima) = (set(100), set(50));
        let got = Limits::default().grant(&defaults, &maxima).unwrap();
        assert_eq!(got, set(50));
        let tiny = Limits::default().grant(&set(1), &set(1)).unwrap();
        assert_eq!(
            (tiny.memory_bytes, tiny.pids, tiny.file_count),
            (MIN_MEMORY_BYTES, MIN_PIDS, MIN_FILE_COUNT)
        );
        assert_eq!((tiny.wall_ms, tiny.cpu_ms, tiny.tmpfs_bytes), (1, 1, 1));
    }

    #[test]
    fn given_requests_then_each_is_clamped_to_its_maximum() {
        let asked = Limits {
            wall_ms: Some(u64::MAX),
            memory_bytes: Some(20 << 20),
            cpu_ms: Some(3),
            pids: Some(u32::MAX),
            output_bytes: Some(u64::MAX),
            tmpfs_bytes: Some(7),
            file_count: Some(u32::MAX),
        };
        let got = asked.grant(&set(10), &set(100)).unwrap();
        assert_eq!(got.wall_ms, 100);
        assert_eq!(got.memory_bytes, 20 << 20);
        assert_eq!(got.cpu_ms, 3);
        assert_eq!(got.pids, 100);
        assert_eq!(got.tmpfs_bytes, 7);
        assert_eq!(got.file_count, 1000);
    }

    #[test]
    fn given_a_zero_request_then_the_first_such_field_is_named() {
        let asked = Limits {
            cpu_ms: Some(0),
            file_count: Some(0),
            ..Limits::default()
        };
        let e = asked.grant(&set(10), &set(10)).unwrap_err();
        assert_eq!(e.to_string(), "limits.cpu_ms must be positive");
    }

    #[test]
    fn given_two_sets_then_min_is_field_by_field() {
        let mut a = set(5);
        a.pids = 99;
        let m = a.min(&set(10));
        assert_eq!(m.pids, 10);
        assert_eq!(m.wall_ms, 5);
    }
}
