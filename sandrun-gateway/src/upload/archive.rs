//! Archive expansion: `.tar.gz`/`.tgz` and `.zip`, normalized into the bundle.
//!
//! Only regular files and directories are accepted. Paths go through [`super::entry_path`];
//! setuid, setgid and sticky bits are stripped. The decompressed bytes of one archive pass
//! through a [`Meter`] that fails once they exceed
//! `min(max_uncompressed_bytes, max(max_ratio * compressed size, RATIO_FLOOR_BYTES))`, so a bomb
//! costs at most that much work. A `.tar.gz` part is expanded while it is still arriving
//! ([`extract_tar_gz_streaming`]): its meter's cap is then computed from the compressed bytes
//! received so far, and a reader at that cap waits for more of them instead of failing, so the
//! work done is never more than the cap of what has arrived, and the archives accepted are
//! exactly those accepted when the whole part is in memory. For zip the central directory (entry count, names, types,
//! declared sizes and ratio) is checked before anything is decompressed; the declared sizes are
//! then enforced while decompressing, because they can lie. Archives inside archives stay files.

use std::cell::{Cell, RefCell};
use std::io::{BufRead, Cursor, Read};

use bytes::Bytes;
use flate2::bufread::GzDecoder;

use super::feed::{Feed, PartReader};
use super::{entry_path, UploadError, UploadLimits};
use crate::bundle::{BundleBuilder, DEFAULT_DIR_MODE, DEFAULT_FILE_MODE};

/// An archive may always expand to this many bytes, whatever its ratio (a small tar.gz is mostly
/// compressed padding).
pub const RATIO_FLOOR_BYTES: u64 = 1024 * 1024;

/// The archive formats expanded on upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    TarGz,
    Zip,
}

/// The archive kind a filename announces (case-insensitive `.tar.gz`, `.tgz`, `.zip`).
pub fn kind_by_name(name: &str) -> Option<ArchiveKind> {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
        Some(ArchiveKind::TarGz)
    } else if lower.ends_with(".zip") {
        Some(ArchiveKind::Zip)
    } else {
        None
    }
}

/// Whether `data` starts with the magic bytes of `kind`.
pub fn has_magic(kind: ArchiveKind, data: &[u8]) -> bool {
    match kind {
        ArchiveKind::TarGz => data.starts_with(&[0x1f, 0x8b]),
        // A local file header, or the end-of-central-directory record of an empty zip.
        ArchiveKind::Zip => data.starts_with(b"PK\x03\x04") || data.starts_with(b"PK\x05\x06"),
    }
}

/// Expands the archive `data` (uploaded as `upload`) into `builder`.
pub fn extract(
    kind: ArchiveKind,
    upload: &str,
    data: &Bytes,
    builder: &mut BundleBuilder,
    limits: &UploadLimits,
) -> Result<(), UploadError> {
    if !has_magic(kind, data) {
        let what = match kind {
            ArchiveKind::TarGz => "gzip",
            ArchiveKind::Zip => "zip",
        };
        return Err(UploadError::Malformed(format!(
            "{upload}: named like an archive but is not {what} data"
        )));
    }
    let meter = Meter::new(expansion_cap(data.len() as u64, limits));
    match kind {
        ArchiveKind::TarGz => extract_tar_gz(upload, &data[..], None, builder, limits, &meter),
        ArchiveKind::Zip => extract_zip(upload, data, builder, limits, &meter),
    }
}

/// Expands the `.tar.gz` part that `reader` is reading while the rest of it arrives through
/// `feed`. The caller has checked the gzip magic.
pub(crate) fn extract_tar_gz_streaming(
    upload: &str,
    reader: PartReader<'_>,
    feed: &RefCell<Feed>,
    builder: &mut BundleBuilder,
    limits: &UploadLimits,
) -> Result<(), UploadError> {
    let meter = Meter::provisional(limits);
    extract_tar_gz(upload, reader, Some(feed), builder, limits, &meter)
}

/// The most decompressed bytes one archive of `compressed` bytes may produce.
pub fn expansion_cap(compressed: u64, limits: &UploadLimits) -> u64 {
    let by_ratio = compressed
        .saturating_mul(limits.max_ratio)
        .max(RATIO_FLOOR_BYTES);
    by_ratio.min(limits.max_uncompressed_bytes)
}

/// Counts decompressed bytes against a cap shared by all readers of one archive.
#[derive(Debug)]
pub struct Meter {
    cap: Cell<u64>,
    /// Whether `cap` is final: all the compressed bytes have arrived.
    settled: Cell<bool>,
    /// `max_ratio` and `max_uncompressed_bytes`, to recompute a provisional cap.
    ratio_and_max: (u64, u64),
    used: Cell<u64>,
    exceeded: Cell<bool>,
}

impl Meter {
    /// A meter with a final cap.
    pub fn new(cap: u64) -> Self {
        Meter {
            cap: Cell::new(cap),
            settled: Cell::new(true),
            ratio_and_max: (0, cap),
            used: Cell::new(0),
            exceeded: Cell::new(false),
        }
    }

    /// A meter for an archive still arriving: its cap follows [`Meter::set_input`].
    fn provisional(limits: &UploadLimits) -> Self {
        Meter {
            cap: Cell::new(expansion_cap(0, limits)),
            settled: Cell::new(false),
            ratio_and_max: (limits.max_ratio, limits.max_uncompressed_bytes),
            used: Cell::new(0),
            exceeded: Cell::new(false),
        }
    }

    /// `received` compressed bytes have arrived; `complete` once that is all of them.
    fn set_input(&self, received: u64, complete: bool) {
        if self.settled.get() {
            return;
        }
        let (max_ratio, max_bytes) = self.ratio_and_max;
        let by_ratio = received.saturating_mul(max_ratio).max(RATIO_FLOOR_BYTES);
        self.cap.set(by_ratio.min(max_bytes));
        self.settled.set(complete);
    }

    /// Whether a reader went past the cap (its read then failed).
    pub fn exceeded(&self) -> bool {
        self.exceeded.get()
    }

    fn problem(&self) -> String {
        format!(
            "expands past {} bytes (size or compression ratio limit)",
            self.cap.get()
        )
    }
}

/// A reader that fails once its [`Meter`] is past the cap. With a `feed`, the archive is still
/// arriving: at a provisional cap it waits for more compressed bytes rather than failing.
struct Metered<'m, R> {
    inner: R,
    meter: &'m Meter,
    feed: Option<&'m RefCell<Feed>>,
}

impl<R> Metered<'_, R> {
    /// Bytes that may still be produced, once the cap is final or leaves room; waits for more
    /// input while a provisional cap is reached.
    fn room(&self) -> u64 {
        loop {
            if let Some(feed) = self.feed {
                let (received, complete) = feed.borrow().progress();
                self.meter.set_input(received, complete);
            }
            let left = self.meter.cap.get().saturating_sub(self.meter.used.get());
            if left > 0 || self.meter.settled.get() {
                return left;
            }
            match self.feed {
                Some(feed) => {
                    feed.borrow_mut().pull();
                }
                // Only provisional meters have a feed; without one, treat the cap as final.
                None => return left,
            }
        }
    }
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let left = self.room();
        // One byte past a final cap is enough to know it is exceeded; a provisional cap is
        // never read past.
        let allowed = if self.meter.settled.get() {
            left.saturating_add(1)
        } else {
            left
        };
        let want = usize::try_from(allowed)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > left {
            self.meter.exceeded.set(true);
            return Err(std::io::Error::other("archive expansion limit exceeded"));
        }
        self.meter.used.set(self.meter.used.get() + n as u64);
        Ok(n)
    }
}

fn extract_tar_gz<'m, R: BufRead>(
    upload: &str,
    compressed: R,
    feed: Option<&'m RefCell<Feed>>,
    builder: &mut BundleBuilder,
    limits: &UploadLimits,
    meter: &'m Meter,
) -> Result<(), UploadError> {
    let reader = Metered {
        inner: GzDecoder::new(compressed),
        meter,
        feed,
    };
    let mut archive = tar::Archive::new(reader);
    let mut last = String::from("<start of archive>");
    let fail = |entry: &str, e: std::io::Error| {
        if meter.exceeded() {
            UploadError::entry_too_large(upload, entry, meter.problem())
        } else {
            UploadError::entry(upload, entry, format!("unreadable: {e}"))
        }
    };
    let entries = archive.entries().map_err(|e| fail(&last, e))?;
    for (count, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| fail(&format!("after {last}"), e))?;
        let raw = entry.path_bytes();
        let name = std::str::from_utf8(&raw)
            .map_err(|_| UploadError::entry(upload, &String::from_utf8_lossy(&raw), "not UTF-8"))?
            .to_owned();
        if count >= limits.max_files {
            return Err(UploadError::entry(
                upload,
                &name,
                format!("archive has more than {} entries", limits.max_files),
            ));
        }
        add_tar_entry(upload, &name, &mut entry, builder, limits).map_err(|e| match e {
            TarEntryError::Io(io) => fail(&name, io),
            TarEntryError::Upload(u) => u,
        })?;
        last = name;
    }
    Ok(())
}

enum TarEntryError {
    Io(std::io::Error),
    Upload(UploadError),
}

impl From<UploadError> for TarEntryError {
    fn from(e: UploadError) -> Self {
        TarEntryError::Upload(e)
    }
}

fn add_tar_entry<R: Read>(
    upload: &str,
    name: &str,
    entry: &mut tar::Entry<R>,
    builder: &mut BundleBuilder,
    limits: &UploadLimits,
) -> Result<(), TarEntryError> {
    use tar::EntryType as T;
    let refuse = |problem: &str| TarEntryError::Upload(UploadError::entry(upload, name, problem));
    let header = entry.header();
    let mode = header.mode().map_err(TarEntryError::Io)?;
    match header.entry_type() {
        T::Regular | T::Continuous => {}
        T::Directory => {
            let trimmed = name.strip_prefix("./").unwrap_or(name);
            let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
            if trimmed.is_empty() || trimmed == "." {
                return Ok(()); // The archive's own root.
            }
            let path = entry_path(upload, trimmed, limits)?;
            builder.add_dir(path, mode).map_err(UploadError::from)?;
            return Ok(());
        }
        // git archive writes one; it describes the archive, not a file.
        T::XGlobalHeader => return Ok(()),
        T::Symlink => return Err(refuse("symbolic links are not allowed")),
        T::Link => return Err(refuse("hard links are not allowed")),
        T::Char | T::Block => return Err(refuse("device files are not allowed")),
        T::Fifo => return Err(refuse("FIFOs are not allowed")),
        other => return Err(refuse(&format!("entry type {other:?} is not allowed"))),
    }
    let path = entry_path(upload, name, limits)?;
    let size = entry.size();
    if size > builder.remaining_bytes() {
        return Err(TarEntryError::Upload(UploadError::entry_too_large(
            upload,
            name,
            format!(
                "{size} bytes would take the upload past {} bytes",
                limits.max_uncompressed_bytes
            ),
        )));
    }
    // Charged before the bytes are expanded (and preallocated).
    builder.charge(size).map_err(UploadError::from)?;
    let data = read_exact_size(entry, size).map_err(TarEntryError::Io)?;
    builder
        .add_file(path, mode, data)
        .map_err(UploadError::from)?;
    Ok(())
}

/// Reads exactly `size` bytes (no more, fewer is an error); `size` was checked against the
/// bundle budget, so preallocating it is bounded.
fn read_exact_size(reader: &mut impl Read, size: u64) -> std::io::Result<Bytes> {
    let capacity = usize::try_from(size).map_err(std::io::Error::other)?;
    let mut data = Vec::with_capacity(capacity);
    reader.take(size.saturating_add(1)).read_to_end(&mut data)?;
    if data.len() as u64 != size {
        return Err(std::io::Error::other(format!(
            "holds {} bytes, its header declares {size}",
            data.len()
        )));
    }
    Ok(Bytes::from(data))
}

/// What the central directory says about one zip entry.
struct ZipItem {
    index: usize,
    name: String,
    dir: bool,
    mode: u32,
    size: u64,
}

fn extract_zip(
    upload: &str,
    data: &Bytes,
    builder: &mut BundleBuilder,
    limits: &UploadLimits,
    meter: &Meter,
) -> Result<(), UploadError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(&data[..]))
        .map_err(|e| UploadError::Malformed(format!("{upload}: not a readable zip: {e}")))?;
    if central_directory_records(data, zip.central_directory_start(), zip.len()) > zip.len() {
        return Err(UploadError::entry(
            upload,
            "<central directory>",
            "two entries have the same name",
        ));
    }
    if zip.len() > builder.remaining_entries().min(limits.max_files) {
        return Err(UploadError::entry(
            upload,
            "<central directory>",
            format!(
                "{} entries, more than the {} allowed",
                zip.len(),
                builder.remaining_entries()
            ),
        ));
    }
    let items = plan_zip(upload, &mut zip, builder, limits, meter)?;
    for item in items {
        let refuse = |problem: String| UploadError::entry(upload, &item.name, problem);
        let path = entry_path(upload, &item.name, limits)?;
        if item.dir {
            builder.add_dir(path, item.mode)?;
            continue;
        }
        let file = zip
            .by_index(item.index)
            .map_err(|e| refuse(format!("unreadable: {e}")))?;
        builder.charge(item.size)?;
        let mut reader = Metered {
            inner: file,
            meter,
            feed: None,
        };
        let bytes = read_exact_size(&mut reader, item.size).map_err(|e| {
            if meter.exceeded() {
                UploadError::entry_too_large(upload, &item.name, meter.problem())
            } else {
                refuse(format!("unreadable: {e}"))
            }
        })?;
        builder.add_file(path, item.mode, bytes)?;
    }
    Ok(())
}

/// Counts central directory records from `start`, stopping after `limit + 1`. The zip crate
/// keys entries by name, so a later entry with the same name silently replaced an earlier one
/// (found by fuzzing): more records than entries means a duplicate name.
fn central_directory_records(data: &[u8], start: u64, limit: usize) -> usize {
    const HEADER: usize = 46;
    let field = |h: &[u8], at: usize| usize::from(u16::from_le_bytes([h[at], h[at + 1]]));
    let mut pos = usize::try_from(start).unwrap_or(usize::MAX);
    let mut count = 0;
    while count <= limit {
        let Some(h) = data.get(pos..pos.saturating_add(HEADER)) else {
            break;
        };
        if !h.starts_with(b"PK\x01\x02") {
            break;
        }
        // Name, extra field and comment lengths follow the fixed part.
        pos = pos.saturating_add(HEADER + field(h, 28) + field(h, 30) + field(h, 32));
        count += 1;
    }
    count
}

/// Checks the whole central directory before anything is decompressed.
fn plan_zip<R: Read + std::io::Seek>(
    upload: &str,
    zip: &mut zip::ZipArchive<R>,
    builder: &BundleBuilder,
    limits: &UploadLimits,
    meter: &Meter,
) -> Result<Vec<ZipItem>, UploadError> {
    let budget = meter.cap.get().min(builder.remaining_bytes());
    let mut declared = 0u64;
    let mut items = Vec::with_capacity(zip.len());
    for index in 0..zip.len() {
        let file = zip
            .by_index_raw(index)
            .map_err(|e| UploadError::entry(upload, &format!("#{index}"), format!("{e}")))?;
        let name = file.name().to_owned();
        let refuse = |problem: &str| UploadError::entry(upload, &name, problem);
        if file.encrypted() {
            return Err(refuse("encrypted entries are not supported"));
        }
        let dir = zip_entry_is_dir(&name, file.unix_mode()).map_err(&refuse)?;
        let default_mode = if dir {
            DEFAULT_DIR_MODE
        } else {
            DEFAULT_FILE_MODE
        };
        let mode = file.unix_mode().map_or(default_mode, |m| m & 0o7777);
        declared = declared.saturating_add(file.size());
        if declared > budget {
            return Err(UploadError::entry_too_large(
                upload,
                &name,
                format!(
                    "declared sizes add up past {budget} bytes (size or compression ratio limit)"
                ),
            ));
        }
        let name = if dir {
            name.strip_suffix('/').unwrap_or(&name).to_owned()
        } else {
            name
        };
        // Checked now so a bad name is refused before any decompression.
        entry_path(upload, &name, limits)?;
        items.push(ZipItem {
            index,
            name,
            dir,
            mode,
            size: file.size(),
        });
    }
    Ok(items)
}

/// Whether an entry is a directory; refuses symlinks, devices, FIFOs and sockets, which zip
/// records in the Unix file-type bits of the external attributes.
fn zip_entry_is_dir(name: &str, unix_mode: Option<u32>) -> Result<bool, &'static str> {
    const S_IFMT: u32 = 0o170_000;
    match unix_mode.map_or(0, |m| m & S_IFMT) {
        0 => Ok(name.ends_with('/')),
        0o100_000 => Ok(false),
        0o040_000 => Ok(true),
        0o120_000 => Err("symbolic links are not allowed"),
        0o020_000 | 0o060_000 => Err("device files are not allowed"),
        0o010_000 => Err("FIFOs are not allowed"),
        0o140_000 => Err("sockets are not allowed"),
        _ => Err("unknown file type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_names_then_archive_kinds_are_detected_case_insensitively() {
        assert_eq!(kind_by_name("a.TAR.GZ"), Some(ArchiveKind::TarGz));
        assert_eq!(kind_by_name("dir/a.tgz"), Some(ArchiveKind::TarGz));
        assert_eq!(kind_by_name("a.Zip"), Some(ArchiveKind::Zip));
        assert_eq!(kind_by_name("a.gz"), None);
        assert_eq!(kind_by_name("a.tar"), None);
    }

    #[test]
    fn given_a_meter_then_reads_fail_one_byte_past_the_cap_and_not_before() {
        let meter = Meter::new(10);
        let mut ok = Metered {
            inner: &[7u8; 10][..],
            meter: &meter,
            feed: None,
        };
        let mut out = Vec::new();
        assert_eq!(ok.read_to_end(&mut out).unwrap(), 10);
        assert!(!meter.exceeded());
        let meter = Meter::new(10);
        let mut over = Metered {
            inner: &[7u8; 11][..],
            meter: &meter,
            feed: None,
        };
        assert!(over.read_to_end(&mut Vec::new()).is_err());
        assert!(meter.exceeded());
    }

    /// A "decompressed" stream that checks, at every read, that the output never runs ahead
    /// of the provisional cap of the compressed bytes received so far.
    struct AheadCheck<'f> {
        out: &'f [u8],
        pos: usize,
        feed: &'f RefCell<Feed>,
    }

    impl Read for AheadCheck<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.out.len() - self.pos);
            self.pos += n;
            let (received, complete) = self.feed.borrow().progress();
            // Ratio 1 in these tests: the cap is max(received, floor).
            assert!(
                complete || self.pos as u64 <= received.max(RATIO_FLOOR_BYTES),
                "produced {} with {received} received",
                self.pos
            );
            Ok(n)
        }
    }

    fn arriving(compressed_chunks: usize) -> RefCell<Feed> {
        let (tx, feed) = super::super::feed::channel();
        use super::super::feed::PartMsg;
        tx.try_send(PartMsg::FileStart { filename: None }).unwrap();
        for _ in 0..compressed_chunks {
            tx.try_send(PartMsg::Data(Bytes::from(vec![0u8; 512 << 10])))
                .unwrap();
        }
        tx.try_send(PartMsg::FileEnd).unwrap();
        let feed = RefCell::new(feed);
        feed.borrow_mut().next_message();
        feed
    }

    fn read_arriving(feed: &RefCell<Feed>, out: &[u8], meter: &Meter) -> std::io::Result<usize> {
        let mut reader = Metered {
            inner: AheadCheck { out, pos: 0, feed },
            meter,
            feed: Some(feed),
        };
        reader.read_to_end(&mut Vec::new())
    }

    #[test]
    fn given_an_archive_still_arriving_then_output_waits_for_input_and_the_final_cap_decides() {
        let limits = UploadLimits {
            max_ratio: 1,
            ..UploadLimits::default()
        };
        let out = vec![1u8; 3 << 20];
        // 3 MiB of input allow 3 MiB of output at ratio 1, however early it is produced.
        let feed = arriving(6);
        let meter = Meter::provisional(&limits);
        assert_eq!(read_arriving(&feed, &out, &meter).unwrap(), 3 << 20);
        assert!(!meter.exceeded());
        // 2 MiB of input do not: refused once the input is complete, as if it were in memory.
        let feed = arriving(4);
        let meter = Meter::provisional(&limits);
        assert!(read_arriving(&feed, &out, &meter).is_err());
        assert!(meter.exceeded());
        assert!(meter.problem().contains(&(2u64 << 20).to_string()));
    }

    #[test]
    fn given_zip_unix_file_types_then_only_files_and_dirs_pass() {
        assert_eq!(zip_entry_is_dir("a", Some(0o100_644)), Ok(false));
        assert_eq!(zip_entry_is_dir("a/", None), Ok(true));
        assert_eq!(zip_entry_is_dir("a", Some(0o040_755)), Ok(true));
        for bad in [0o120_777, 0o020_644, 0o060_644, 0o010_644, 0o140_777] {
            assert!(zip_entry_is_dir("a", Some(bad)).is_err(), "{bad:o}");
        }
    }

    #[test]
    fn given_tiny_and_huge_archives_then_the_expansion_cap_is_floor_ratio_or_total() {
        let limits = UploadLimits::default();
        assert_eq!(expansion_cap(100, &limits), RATIO_FLOOR_BYTES);
        assert_eq!(expansion_cap(1 << 20, &limits), 100 << 20);
        assert_eq!(
            expansion_cap(50 << 20, &limits),
            limits.max_uncompressed_bytes
        );
    }
}
