//! Defensive parsers for the text files the kernel exposes: single numbers (`memory.current`),
//! flat keyed files (`memory.events`, `cpu.stat`, `memory.oom_control`), `cgroup.procs`,
//! `/proc/self/cgroup`, `/proc/self/mountinfo` and `/proc/swaps`. Every failure is a typed
//! [`CgroupError::Parse`] naming the file; nothing here panics on unexpected contents.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use super::CgroupError;

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controller-list:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcCgroupEntry {
    pub hierarchy_id: u32,
    /// Empty for the unified (v2) hierarchy; `name=systemd` style entries are kept as written.
    pub controllers: Vec<String>,
    /// Absolute path of the process's cgroup inside that hierarchy.
    pub path: String,
}

/// The fields of one `/proc/<pid>/mountinfo` line that cgroup detection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    /// The directory of the mounted filesystem that is visible at the mount point.
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub super_options: Vec<String>,
}

/// Parses a file that holds one unsigned decimal number (trailing newline allowed).
pub(crate) fn parse_u64(text: &str, path: &Path) -> Result<u64, CgroupError> {
    number(text.trim(), path)
}

/// Looks up `key` in a flat keyed file (`key value` per line). `Ok(None)` if the key is absent;
/// a present key with a malformed value is an error.
pub(crate) fn keyed_u64(text: &str, key: &str, path: &Path) -> Result<Option<u64>, CgroupError> {
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() != Some(key) {
            continue;
        }
        let value = fields
            .next()
            .ok_or_else(|| parse_error(path, format!("key {key} has no value")))?;
        if fields.next().is_some() {
            return Err(parse_error(
                path,
                format!("key {key} has more than one value"),
            ));
        }
        return number(value, path).map(Some);
    }
    Ok(None)
}

/// Parses `cgroup.procs`: one positive pid per line.
pub(crate) fn parse_pids(text: &str, path: &Path) -> Result<Vec<i32>, CgroupError> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| match line.parse::<i32>() {
            Ok(pid) if pid > 0 => Ok(pid),
            _ => Err(parse_error(path, format!("{line:?} is not a pid"))),
        })
        .collect()
}

/// Parses `/proc/<pid>/cgroup`.
pub(crate) fn parse_proc_cgroup(text: &str) -> Result<Vec<ProcCgroupEntry>, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let mut entries = Vec::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(cgroup_path)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(parse_error(
                path,
                format!("line {line:?} has fewer than 3 fields"),
            ));
        };
        let hierarchy_id = id
            .parse::<u32>()
            .map_err(|_| parse_error(path, format!("hierarchy id {id:?} is not a number")))?;
        if !cgroup_path.starts_with('/') {
            return Err(parse_error(
                path,
                format!("cgroup path {cgroup_path:?} is not absolute"),
            ));
        }
        entries.push(ProcCgroupEntry {
            hierarchy_id,
            controllers: controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect(),
            path: cgroup_path.to_owned(),
        });
    }
    Ok(entries)
}

/// Parses `/proc/<pid>/mountinfo` (see proc(5)): fields 4 and 5 are the root and the mount
/// point, then optional fields up to a lone `-`, then fstype, source and super options.
pub(crate) fn parse_mountinfo(text: &str) -> Result<Vec<MountEntry>, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let mut entries = Vec::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields
            .iter()
            .skip(6)
            .position(|field| *field == "-")
            .map(|index| index + 6)
            .ok_or_else(|| parse_error(path, format!("line {line:?} has no separator")))?;
        let (Some(root), Some(mount_point), Some(fstype), Some(super_options)) = (
            fields.get(3),
            fields.get(4),
            fields.get(separator + 1),
            fields.get(separator + 3),
        ) else {
            return Err(parse_error(path, format!("line {line:?} is too short")));
        };
        entries.push(MountEntry {
            root: unescape_octal(root),
            mount_point: PathBuf::from(unescape_octal(mount_point)),
            fstype: (*fstype).to_owned(),
            super_options: super_options.split(',').map(str::to_owned).collect(),
        });
    }
    Ok(entries)
}

/// Whether `/proc/swaps` lists at least one swap area (the first line is a header).
pub(crate) fn swaps_present(text: &str) -> bool {
    text.lines().skip(1).any(|line| !line.trim().is_empty())
}

/// Whether the space-separated controller list (`cgroup.controllers`,
/// `cgroup.subtree_control`) names every one of `wanted`.
pub(crate) fn has_controllers(list: &str, wanted: &[&str]) -> bool {
    wanted
        .iter()
        .all(|controller| list.split_whitespace().any(|c| c == *controller))
}

fn number(text: &str, path: &Path) -> Result<u64, CgroupError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(parse_error(
            path,
            format!("{text:?} is not an unsigned number"),
        ));
    }
    text.parse::<u64>()
        .map_err(|e| parse_error(path, format!("{text:?}: {e}")))
}

fn parse_error(path: &Path, detail: String) -> CgroupError {
    CgroupError::Parse {
        path: path.to_owned(),
        detail,
    }
}

/// Decodes the `\ooo` escapes the kernel uses for space, tab, newline and backslash in
/// mountinfo paths. Anything that is not a valid 3-digit octal escape is kept as is.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        match escape.and_then(octal_byte) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn octal_byte(digits: &[u8]) -> Option<u8> {
    digits.iter().try_fold(0u8, |acc, d| match d {
        b'0'..=b'7' => acc.checked_mul(8)?.checked_add(d - b'0'),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/fake/file")
    }

    #[test]
    fn given_a_number_with_newline_when_parsed_then_it_is_the_value() {
        assert_eq!(parse_u64("67108864\n", p()).unwrap(), 67_108_864);
    }

    #[test]
    fn given_garbage_or_negative_or_max_when_parsed_as_number_then_parse_error() {
        for text in [
            "",
            "\n",
            "abc",
            "-1",
            "12 34",
            "max",
            "1.5",
            "99999999999999999999999",
        ] {
            assert!(
                matches!(parse_u64(text, p()), Err(CgroupError::Parse { .. })),
                "{text:?} must not parse"
            );
        }
    }

    #[test]
    fn given_keyed_file_when_key_present_then_its_value_is_returned() {
        let text = "low 0\nhigh 0\nmax 5\noom 4\noom_kill 3\noom_group_kill 0\n";
        assert_eq!(keyed_u64(text, "oom_kill", p()).unwrap(), Some(3));
        assert_eq!(keyed_u64(text, "max", p()).unwrap(), Some(5));
        assert_eq!(keyed_u64(text, "absent", p()).unwrap(), None);
    }

    #[test]
    fn given_keyed_file_with_garbage_value_when_key_read_then_parse_error() {
        for text in [
            "oom_kill x\n",
            "oom_kill\n",
            "oom_kill 1 2\n",
            "oom_kill -3\n",
        ] {
            assert!(matches!(
                keyed_u64(text, "oom_kill", p()),
                Err(CgroupError::Parse { .. })
            ));
        }
    }

    #[test]
    fn given_procs_file_when_parsed_then_pids_in_order_and_garbage_refused() {
        assert_eq!(parse_pids("12\n345\n\n", p()).unwrap(), vec![12, 345]);
        assert!(parse_pids("", p()).unwrap().is_empty());
        for text in ["0\n", "-5\n", "abc\n", "99999999999\n"] {
            assert!(matches!(
                parse_pids(text, p()),
                Err(CgroupError::Parse { .. })
            ));
        }
    }

    #[test]
    fn given_hybrid_proc_cgroup_when_parsed_then_controllers_split_and_paths_kept() {
        let entries = parse_proc_cgroup("4:memory:/a/b\n2:cpu,cpuacct:/\n0::/x:y\n").unwrap();
        assert_eq!(entries[0].controllers, vec!["memory"]);
        assert_eq!(entries[0].path, "/a/b");
        assert_eq!(entries[1].controllers, vec!["cpu", "cpuacct"]);
        assert!(entries[2].controllers.is_empty());
        assert_eq!(entries[2].path, "/x:y");
    }

    #[test]
    fn given_malformed_proc_cgroup_when_parsed_then_parse_error() {
        for text in ["garbage\n", "x:memory:/\n", "4:memory:relative\n"] {
            assert!(matches!(
                parse_proc_cgroup(text),
                Err(CgroupError::Parse { .. })
            ));
        }
    }

    #[test]
    fn given_mountinfo_with_optional_fields_and_escapes_when_parsed_then_fields_found() {
        let text = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 /sub /mnt/with\\040space rw shared:9 master:2 - cgroup2 cgroup2 rw\n";
        let entries = parse_mountinfo(text).unwrap();
        assert_eq!(entries[0].fstype, "cgroup");
        assert_eq!(entries[0].super_options, vec!["rw", "cpu"]);
        assert_eq!(entries[1].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(entries[1].root, "/sub");
        assert_eq!(entries[1].fstype, "cgroup2");
    }

    #[test]
    fn given_mountinfo_line_without_separator_when_parsed_then_parse_error() {
        assert!(matches!(
            parse_mountinfo("32 31 0:29 / /sys/fs/cgroup/cpu rw cgroup cgroup rw,cpu\n"),
            Err(CgroupError::Parse { .. })
        ));
    }

    #[test]
    fn given_proc_swaps_when_only_header_then_no_swap_else_swap() {
        let header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n";
        assert!(!swaps_present(header));
        assert!(swaps_present(&format!(
            "{header}/swapfile file 1048572 0 -2\n"
        )));
    }

    #[test]
    fn given_controller_list_when_checked_then_all_must_be_present() {
        assert!(has_controllers(
            "cpuset cpu io memory pids\n",
            &["memory", "pids", "cpu"]
        ));
        assert!(!has_controllers(
            "cpuset cpu io memory\n",
            &["memory", "pids", "cpu"]
        ));
        assert!(!has_controllers("", &["memory"]));
    }
}
