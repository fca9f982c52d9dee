//! Turns an input directory into a bundle: a list of [`BundleEntry`]s and the host files whose
//! contents follow, streamed in chunks of at most [`MAX_CHUNK_BYTES`].
//!
//! Symlinks are never followed: one in the input is an error naming it, as is anything that is
//! neither a regular file nor a directory. Modes are kept without setuid, setgid and sticky bits.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sandrun_ipc::{sanitize_mode, BundleEntry, BundlePath, MAX_CHUNK_BYTES};

use crate::error::CtlError;

/// The walked input: entries in order and, for each file entry, its host path and size.
#[derive(Debug, Default)]
pub(crate) struct Bundle {
    pub(crate) entries: Vec<BundleEntry>,
    pub(crate) files: Vec<(PathBuf, u64)>,
}

/// Walks `root` (which itself may be reached through a symlink: the caller named it).
pub(crate) fn walk(root: &Path) -> Result<Bundle, CtlError> {
    let meta = fs::metadata(root).map_err(|source| io_err(root, source))?;
    if !meta.is_dir() {
        return Err(CtlError::Input {
            path: root.to_owned(),
            reason: "is not a directory".into(),
        });
    }
    let mut bundle = Bundle::default();
    walk_dir(root, "", &mut bundle)?;
    Ok(bundle)
}

fn walk_dir(dir: &Path, rel: &str, bundle: &mut Bundle) -> Result<(), CtlError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|source| io_err(dir, source))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|source| io_err(dir, source))?;
    names.sort();
    for name in names {
        let host = dir.join(&name);
        let Some(name) = name.to_str() else {
            return Err(input_err(&host, "name is not valid UTF-8"));
        };
        let rel = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        add_entry(&host, &rel, bundle)?;
    }
    Ok(())
}

fn add_entry(host: &Path, rel: &str, bundle: &mut Bundle) -> Result<(), CtlError> {
    let meta = fs::symlink_metadata(host).map_err(|source| io_err(host, source))?;
    let path = BundlePath::new(rel).map_err(|e| input_err(host, &e.to_string()))?;
    let mode = sanitize_mode(meta.mode());
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(input_err(host, "is a symlink; symlinks are not sent"));
    }
    if kind.is_dir() {
        bundle.entries.push(BundleEntry::Dir { path, mode });
        return walk_dir(host, rel, bundle);
    }
    if !kind.is_file() {
        return Err(input_err(host, "is neither a regular file nor a directory"));
    }
    bundle.entries.push(BundleEntry::File {
        path,
        mode,
        size: meta.len(),
    });
    bundle.files.push((host.to_owned(), meta.len()));
    Ok(())
}

/// Streams the contents of `files` in chunks, calling `send` for each chunk. A file whose size
/// changed since the walk is an error: the helper expects exactly the declared bytes.
pub(crate) fn stream_files(
    files: &[(PathBuf, u64)],
    mut send: impl FnMut(Vec<u8>) -> Result<(), CtlError>,
) -> Result<(), CtlError> {
    for (path, size) in files {
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| io_err(path, source))?;
        stream_one(file, path, *size, &mut send)?;
    }
    Ok(())
}

fn stream_one(
    file: File,
    path: &Path,
    size: u64,
    send: &mut impl FnMut(Vec<u8>) -> Result<(), CtlError>,
) -> Result<(), CtlError> {
    // Read one byte more than declared so that a file that grew is detected.
    let mut limited = file.take(size + 1);
    let mut sent = 0u64;
    loop {
        let mut chunk = Vec::with_capacity(MAX_CHUNK_BYTES);
        let n = (&mut limited)
            .take(MAX_CHUNK_BYTES as u64)
            .read_to_end(&mut chunk)
            .map_err(|source| io_err(path, source))?;
        if n == 0 {
            break;
        }
        sent += n as u64;
        if sent > size {
            return Err(input_err(path, "grew while it was being sent"));
        }
        send(chunk)?;
    }
    if sent != size {
        return Err(input_err(path, "shrank while it was being sent"));
    }
    Ok(())
}

fn io_err(path: &Path, source: std::io::Error) -> CtlError {
    CtlError::InputIo {
        path: path.to_owned(),
        source,
    }
}

fn input_err(path: &Path, reason: &str) -> CtlError {
    CtlError::Input {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn given_tree_then_entries_are_sorted_and_modes_lose_setuid() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/b.txt"), b"hello").unwrap();
        fs::write(dir.path().join("a"), b"").unwrap();
        fs::set_permissions(dir.path().join("a"), fs::Permissions::from_mode(0o4755)).unwrap();
        let b = walk(dir.path()).unwrap();
        let names: Vec<String> = b
            .entries
            .iter()
            .map(|e| match e {
                BundleEntry::Dir { path, .. } => format!("d:{path}"),
                BundleEntry::File { path, mode, size } => format!("f:{path}:{mode:o}:{size}"),
            })
            .collect();
        assert_eq!(names, ["f:a:755:0", "d:sub", "f:sub/b.txt:644:5"]);
    }

    #[test]
    fn given_symlink_in_input_then_walk_fails_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let err = walk(dir.path()).unwrap_err().to_string();
        assert!(err.contains("link") && err.contains("symlink"), "{err}");
    }

    #[test]
    fn given_large_file_then_chunks_are_bounded_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..MAX_CHUNK_BYTES * 2 + 7)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        fs::write(dir.path().join("big"), &data).unwrap();
        let b = walk(dir.path()).unwrap();
        let mut got = Vec::new();
        stream_files(&b.files, |c| {
            assert!(c.len() <= MAX_CHUNK_BYTES);
            got.extend_from_slice(&c);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, data);
    }
}
