//! Archive builders: tar, gzip and zip, honest ones for uploads and raw ones for hostile
//! entries (names with `..`, links, devices, set-id modes) that the `tar` crate's checked API
//! refuses to write.

use std::io::{Cursor, Read, Write};

use flate2::write::GzEncoder;
use flate2::Compression;

/// A tar.gz of regular files (mode 0644), in order. Paths go through the `tar` crate's checks
/// (long names get GNU long-name entries); for hostile names use [`tar_gz_raw`].
pub fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder
            .append_data(&mut header, path, *data)
            .unwrap_or_else(|e| panic!("append tar entry {path:?}: {e}"));
    }
    builder
        .into_inner()
        .and_then(GzEncoder::finish)
        .expect("finish tar.gz in memory")
}

/// A tar entry with any name, type, mode and link target, written raw so a test can build
/// hostile archives.
#[derive(Debug, Clone)]
pub struct TarEntry<'a> {
    /// Written as is into the header's 100-byte name field (no checks, no long names).
    pub name: &'a [u8],
    pub kind: tar::EntryType,
    pub mode: u32,
    pub data: &'a [u8],
    /// The link target of a symlink or hard link entry, written as is.
    pub link: Option<&'a str>,
}

impl<'a> TarEntry<'a> {
    /// A regular file, mode 0644.
    pub fn file(name: &'a str, data: &'a [u8]) -> Self {
        TarEntry {
            name: name.as_bytes(),
            kind: tar::EntryType::Regular,
            mode: 0o644,
            data,
            link: None,
        }
    }

    /// An entry of `kind` without data, mode 0644.
    pub fn of(name: &'a str, kind: tar::EntryType) -> Self {
        TarEntry {
            name: name.as_bytes(),
            kind,
            mode: 0o644,
            data: b"",
            link: None,
        }
    }

    /// The same entry with `mode`.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    /// The same entry pointing at `target`.
    pub fn link(mut self, target: &'a str) -> Self {
        self.link = Some(target);
        self
    }
}

/// An uncompressed tar of raw entries (GNU headers; see [`TarEntry`]).
pub fn tar_raw(entries: &[TarEntry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let name = &mut h.as_old_mut().name;
        assert!(e.name.len() <= name.len(), "raw tar name over 100 bytes");
        name[..e.name.len()].copy_from_slice(e.name);
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_size(e.data.len() as u64);
        if let Some(link) = e.link {
            h.set_link_name_literal(link)
                .unwrap_or_else(|err| panic!("raw tar link {link:?}: {err}"));
        }
        h.set_cksum();
        builder.append(&h, e.data).expect("append raw tar entry");
    }
    builder.into_inner().expect("finish tar in memory")
}

/// A tar.gz of raw entries: [`gzip`] of [`tar_raw`].
pub fn tar_gz_raw(entries: &[TarEntry]) -> Vec<u8> {
    gzip(&tar_raw(entries))
}

/// `data` gzip'd at the default level.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data).expect("gzip in memory");
    enc.finish().expect("finish gzip in memory")
}

/// A 512-byte GNU tar header for a regular file of `size` bytes (base-256 size when huge), for
/// archives whose data is written some other way (zeros streamed past a cap, say).
pub fn tar_header(name: &str, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path(name)
        .unwrap_or_else(|e| panic!("tar header name {name:?}: {e}"));
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// The regular files of a tar.gz, as (path, contents), sorted by path; directories left out.
pub fn untar_gz(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(data));
    let mut out = Vec::new();
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        if entry.header().entry_type().is_dir() {
            continue;
        }
        let path = entry
            .path()
            .expect("tar entry path")
            .to_string_lossy()
            .into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).expect("read tar entry");
        out.push((path, content));
    }
    out.sort();
    out
}

/// A zip of regular files (deflated, mode 0644), in order.
pub fn zip(files: &[(&str, &[u8])]) -> Vec<u8> {
    let entries: Vec<(&str, u32, &[u8])> = files.iter().map(|(p, d)| (*p, 0o644, *d)).collect();
    zip_modes(&entries)
}

/// A zip of (name, unix mode, data), deflated; a name ending in `/` is a directory.
pub fn zip_modes(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    zip_with(|w| {
        for (name, mode, data) in entries {
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .unix_permissions(*mode);
            if name.ends_with('/') {
                w.add_directory(name.trim_end_matches('/'), opts)
                    .unwrap_or_else(|e| panic!("zip directory {name:?}: {e}"));
            } else {
                w.start_file(*name, opts)
                    .unwrap_or_else(|e| panic!("zip entry {name:?}: {e}"));
                w.write_all(data).expect("zip data in memory");
            }
        }
    })
}

/// A zip written by `build` (symlinks, duplicate names, any options the `zip` crate allows).
pub fn zip_with(build: impl FnOnce(&mut zip::ZipWriter<Cursor<Vec<u8>>>)) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    build(&mut w);
    w.finish().expect("finish zip in memory").into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_files_then_tar_gz_and_untar_gz_round_trip_them() {
        let files: [(&str, &[u8]); 2] = [("b/x.txt", b"2"), ("a.py", b"1")];
        let got = untar_gz(&tar_gz(&files));
        assert_eq!(
            got,
            vec![
                ("a.py".into(), b"1".to_vec()),
                ("b/x.txt".into(), b"2".to_vec())
            ]
        );
    }

    #[test]
    fn given_a_raw_name_then_it_is_written_unchecked() {
        let tar = tar_raw(&[TarEntry::file("../evil", b"x")]);
        assert_eq!(&tar[..8], b"../evil\0");
    }

    #[test]
    fn given_files_and_modes_then_zip_modes_records_them() {
        let data = zip_modes(&[("d/", 0o755, b""), ("d/run.sh", 0o755, b"echo\n")]);
        let mut z = ::zip::ZipArchive::new(Cursor::new(data)).expect("zip");
        let f = z.by_name("d/run.sh").expect("entry");
        assert_eq!(f.unix_mode().map(|m| m & 0o777), Some(0o755));
    }
}
