//! `POST /submit` bodies: hostile bytes in, a validated [`Submission`] out.
//!
//! 1. The body is read as a stream, counted as it arrives (413 past
//!    [`UploadLimits::max_body_bytes`]), and split into parts ([`multipart`]) or read as the
//!    legacy `----Tar` format ([`legacy`]).
//! 2. Each `files` part becomes bundle entries: a `.tar.gz`/`.tgz` or `.zip` is expanded with
//!    every cap checked before the bytes are produced ([`archive`]); any other part is one file
//!    whose filename may carry a relative path.
//! 3. An upload whose root holds exactly one directory and nothing else has that directory as
//!    its root. The manifest (the `manifest` part, else `job.json` in the upload, else `{}` with
//!    an auto-detected entry point) is validated against the policy and the files.
//! 4. The job hash is computed over the canonical manifest and every input file.
//!
//! Steps 2 to 4 are CPU-bound and run on tokio's blocking pool, at the same time as step 1: the
//! body reader hands each part over as it arrives ([`feed`]), and a `.tar.gz` part is expanded
//! while its bytes are still coming in. Any other part is gathered whole, then expanded. Since an
//! upload holds a blocking thread while its body arrives, uploads in progress at once are bounded
//! ([`slots`]).

pub mod archive;
mod feed;
pub mod legacy;
pub mod multipart;
pub mod slots;

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use sandrun_ipc::BundlePath;

use crate::budget::{BudgetFull, SharedReservation};
use crate::bundle::{Bundle, BundleBuilder, BundleCaps, BundleError, DEFAULT_FILE_MODE};
use crate::manifest::{Manifest, ManifestError, ManifestPolicy, RawManifest};
use crate::signing::job_hash;

/// Caps on one upload. See `docs/manifest.md` for what each one means to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadLimits {
    /// Bytes of request body, counted as they arrive (HTTP status 413 past it).
    pub max_body_bytes: u64,
    /// Parts of a multipart body.
    pub max_parts: usize,
    /// Bytes of one part's header block (and of the preamble before the first part).
    pub max_part_header_bytes: usize,
    /// Files plus directories in the resulting bundle.
    pub max_files: usize,
    /// Bytes after decompression: the bundle's files in total, and each archive's stream.
    pub max_uncompressed_bytes: u64,
    /// An archive may expand to at most `max_ratio` times its compressed size (but always to
    /// [`archive::RATIO_FLOOR_BYTES`], so tiny archives of padding-heavy tar work).
    pub max_ratio: u64,
    /// Longest path of an uploaded entry, in bytes.
    pub max_path_bytes: usize,
    /// Bytes of the job's standard input (the `stdin` part or the manifest's `stdin`); 413
    /// past it.
    pub max_stdin_bytes: u64,
}

/// Default [`UploadLimits::max_stdin_bytes`]: 1 MiB.
pub const DEFAULT_MAX_STDIN_BYTES: u64 = 1 << 20;

impl Default for UploadLimits {
    fn default() -> Self {
        UploadLimits {
            max_body_bytes: 100 * 1024 * 1024,
            max_parts: 10_000,
            max_part_header_bytes: 8 * 1024,
            max_files: 10_000,
            max_uncompressed_bytes: 256 * 1024 * 1024,
            max_ratio: 100,
            max_path_bytes: sandrun_ipc::MAX_PATH_BYTES,
            max_stdin_bytes: DEFAULT_MAX_STDIN_BYTES,
        }
    }
}

/// A validated job submission, ready to be sent to the helper.
#[derive(Debug, Clone)]
pub struct Submission {
    pub manifest: Manifest,
    pub bundle: Bundle,
    /// The job's standard input (empty: `/dev/null`), from the `stdin` part or the manifest.
    pub stdin: Bytes,
    /// See [`crate::signing::job_hash`].
    pub job_hash: [u8; 32],
}

/// Why an upload was refused. Every message names the field, part or entry at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UploadError {
    /// The Content-Type is neither multipart/form-data nor the legacy format (415).
    UnsupportedMediaType(String),
    /// The body is larger than [`UploadLimits::max_body_bytes`] (413).
    BodyTooLarge { limit: u64 },
    /// The job's stdin is larger than [`UploadLimits::max_stdin_bytes`] (413).
    StdinTooLarge { limit: u64 },
    /// The body is not well-formed multipart or legacy data (400).
    Malformed(String),
    /// More parts than [`UploadLimits::max_parts`] (400).
    TooManyParts { limit: usize },
    /// A part header block or the preamble is larger than allowed (400).
    PartHeadersTooLarge { limit: usize },
    /// A part other than `files` and `manifest` (400).
    UnexpectedPart(String),
    /// An uploaded file or archive entry is refused (400); names the upload and the entry.
    Entry {
        upload: String,
        entry: String,
        problem: String,
    },
    /// An archive entry would take the upload past its expansion cap
    /// ([`UploadLimits::max_uncompressed_bytes`] or the compression-ratio cap) (413); names the
    /// upload and the entry.
    EntryTooLarge {
        upload: String,
        entry: String,
        problem: String,
    },
    /// Duplicate path, file/directory conflict or count cap (400); the size cap (413).
    Bundle(BundleError),
    /// The manifest is invalid (400); names the field.
    Manifest(ManifestError),
    /// Reading the request body failed (400: the peer went away or sent garbage).
    BodyRead(String),
    /// A bug or resource failure in the gateway (500).
    Internal(String),
}

impl UploadError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            UploadError::UnsupportedMediaType(_) => 415,
            UploadError::BodyTooLarge { .. }
            | UploadError::StdinTooLarge { .. }
            | UploadError::EntryTooLarge { .. }
            | UploadError::Bundle(BundleError::TooLarge { .. }) => 413,
            UploadError::Bundle(BundleError::Memory(full)) => match full {
                BudgetFull::Global => 503,
                BudgetFull::ClientShare => 429,
                BudgetFull::LargerThanShare => 413,
            },
            UploadError::Internal(_) => 500,
            _ => 400,
        }
    }

    /// A message for the client, naming the field, part or entry at fault.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// Like [`UploadError::entry`], for an entry refused because of the expansion cap (413).
    pub(crate) fn entry_too_large(upload: &str, entry: &str, problem: impl Into<String>) -> Self {
        UploadError::EntryTooLarge {
            upload: upload.to_owned(),
            entry: entry.to_owned(),
            problem: problem.into(),
        }
    }

    pub(crate) fn entry(upload: &str, entry: &str, problem: impl Into<String>) -> Self {
        UploadError::Entry {
            upload: upload.to_owned(),
            entry: entry.to_owned(),
            problem: problem.into(),
        }
    }
}

impl std::fmt::Display for UploadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UploadError::UnsupportedMediaType(ct) => write!(
                f,
                "unsupported Content-Type {ct:?}: send multipart/form-data (or the legacy ----Tar body)"
            ),
            UploadError::BodyTooLarge { limit } => {
                write!(f, "request body is larger than {limit} bytes")
            }
            UploadError::StdinTooLarge { limit } => {
                write!(f, "stdin is larger than {limit} bytes (max_stdin_bytes)")
            }
            UploadError::Malformed(m) => write!(f, "malformed upload: {m}"),
            UploadError::TooManyParts { limit } => {
                write!(f, "multipart body has more than {limit} parts")
            }
            UploadError::PartHeadersTooLarge { limit } => {
                write!(f, "multipart part headers or preamble longer than {limit} bytes")
            }
            UploadError::UnexpectedPart(name) => {
                write!(
                    f,
                    "unexpected multipart part {name:?}: only \"files\", \"manifest\" and \"stdin\""
                )
            }
            UploadError::Entry { upload, entry, problem }
            | UploadError::EntryTooLarge { upload, entry, problem } => {
                write!(f, "{upload}: entry {entry:?}: {problem}")
            }
            UploadError::Bundle(e) => write!(f, "upload refused: {e}"),
            UploadError::Manifest(e) => write!(f, "{e}"),
            UploadError::BodyRead(m) => write!(f, "reading the request body failed: {m}"),
            UploadError::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for UploadError {}

impl From<BundleError> for UploadError {
    fn from(e: BundleError) -> Self {
        UploadError::Bundle(e)
    }
}

impl From<ManifestError> for UploadError {
    fn from(e: ManifestError) -> Self {
        UploadError::Manifest(e)
    }
}

/// One `files` part (or one legacy record) before expansion.
#[derive(Debug, Clone)]
pub(crate) struct FilePart {
    /// The filename the client sent, if any.
    pub filename: Option<String>,
    pub data: Bytes,
}

/// How the body reader ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// The body was read to its end and handed over.
    Complete,
    /// The assembler stopped (it refused the upload): its error is the answer.
    AssemblerStopped,
}

/// Hands `msg` to the assembler; `false` if it has stopped.
pub(crate) async fn hand_over(
    tx: &tokio::sync::mpsc::Sender<feed::PartMsg>,
    msg: feed::PartMsg,
) -> bool {
    tx.send(msg).await.is_ok()
}

/// Parses a `POST /submit` body. `content_type` is the request's Content-Type header. Every
/// byte of a `files` part is charged to `charge` as it is read, and every expanded file before
/// it is expanded; an archive's own bytes are released once it is expanded. On success `charge`
/// holds exactly the bundle's bytes.
pub async fn parse_submission<S, E>(
    content_type: Option<&str>,
    body: S,
    limits: &UploadLimits,
    policy: &ManifestPolicy,
    charge: &SharedReservation,
) -> Result<Submission, UploadError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    let kind = body_kind(content_type)?;
    let (tx, feed) = feed::channel();
    let (limits_owned, policy, charged) = (limits.clone(), policy.clone(), charge.clone());
    let assembler =
        tokio::task::spawn_blocking(move || assemble(feed, &limits_owned, &policy, charged));
    let read = async move {
        let read = match kind {
            BodyKind::Multipart(boundary) => {
                multipart::collect(&boundary, body, limits, &tx, charge).await
            }
            BodyKind::Legacy => collect_legacy(content_type, body, limits, &tx, charge).await,
        };
        // The assembler sees the channel close: after `BodyEnd` it finishes, otherwise it stops.
        drop(tx);
        read
    };
    tokio::pin!(read);
    let mut assembler = assembler;
    let worker_failed =
        |e: tokio::task::JoinError| UploadError::Internal(format!("upload worker failed: {e}"));
    tokio::select! {
        read = &mut read => {
            let assembled = assembler.await.map_err(worker_failed)?;
            match read {
                Err(e) => Err(e),
                Ok(Flow::Complete | Flow::AssemblerStopped) => assembled,
            }
        }
        // The assembler refused the upload while the body reader waits for more of it (a
        // client withholding the rest): answer now, do not wait for bytes that may never come.
        assembled = &mut assembler => match assembled.map_err(worker_failed)? {
            Err(e) => Err(e),
            Ok(submission) => read.await.map(|_| submission),
        },
    }
}

enum BodyKind {
    Multipart(String),
    Legacy,
}

/// multipart/form-data with a boundary; no type, application/octet-stream, application/x-tar or
/// text/plain mean the legacy format; anything else is 415.
fn body_kind(content_type: Option<&str>) -> Result<BodyKind, UploadError> {
    let Some(ct) = content_type else {
        return Ok(BodyKind::Legacy);
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "multipart/form-data" => multer::parse_boundary(ct)
            .map(BodyKind::Multipart)
            .map_err(|e| UploadError::Malformed(format!("Content-Type multipart/form-data: {e}"))),
        "" | "application/octet-stream" | "application/x-tar" | "text/plain" => {
            Ok(BodyKind::Legacy)
        }
        _ => Err(UploadError::UnsupportedMediaType(ct.to_owned())),
    }
}

/// Reads a legacy body, counting bytes and checking the magic as soon as it has arrived, and
/// hands it over as one `files` part without a name.
async fn collect_legacy<S, E>(
    content_type: Option<&str>,
    mut body: S,
    limits: &UploadLimits,
    tx: &tokio::sync::mpsc::Sender<feed::PartMsg>,
    charge: &SharedReservation,
) -> Result<Flow, UploadError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    use feed::PartMsg;
    let unsupported = || UploadError::UnsupportedMediaType(content_type.unwrap_or("").to_owned());
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| UploadError::BodyRead(e.to_string()))?;
        if (buf.len() + chunk.len()) as u64 > limits.max_body_bytes {
            return Err(UploadError::BodyTooLarge {
                limit: limits.max_body_bytes,
            });
        }
        charge.try_grow(chunk.len() as u64).map_err(memory_error)?;
        buf.extend_from_slice(&chunk);
        let n = buf.len().min(legacy::MAGIC.len());
        if buf[..n] != legacy::MAGIC[..n] {
            return Err(unsupported());
        }
    }
    if !legacy::is_legacy(&buf) {
        return Err(unsupported());
    }
    let messages = [
        PartMsg::FileStart { filename: None },
        PartMsg::Data(buf.freeze()),
        PartMsg::FileEnd,
        PartMsg::BodyEnd,
    ];
    for msg in messages {
        if !hand_over(tx, msg).await {
            return Ok(Flow::AssemblerStopped);
        }
    }
    Ok(Flow::Complete)
}

/// A refused memory reservation as an upload error.
pub(crate) fn memory_error(full: BudgetFull) -> UploadError {
    UploadError::Bundle(BundleError::Memory(full))
}

/// Expands the parts as they arrive, then validates the manifest and hashes the job.
fn assemble(
    feed: feed::Feed,
    limits: &UploadLimits,
    policy: &ManifestPolicy,
    charge: SharedReservation,
) -> Result<Submission, UploadError> {
    use feed::PartMsg;
    let caps = BundleCaps {
        max_entries: limits.max_files,
        max_bytes: limits.max_uncompressed_bytes,
    };
    let mut builder = BundleBuilder::with_charge(caps, charge);
    let feed = RefCell::new(feed);
    let mut manifest = None;
    let mut stdin = None;
    let mut index = 0;
    loop {
        let msg = feed.borrow_mut().next_message();
        match msg {
            Some(PartMsg::FileStart { filename }) => {
                add_arriving_part(&mut builder, index, filename, &feed, limits)?;
                index += 1;
            }
            Some(PartMsg::Manifest(json)) => manifest = Some(json),
            Some(PartMsg::Stdin(bytes)) => stdin = Some(bytes),
            Some(PartMsg::BodyEnd) => break,
            // The body reader failed; its error is the answer.
            None => return Err(UploadError::BodyRead("the request body ended early".into())),
            Some(PartMsg::Data(_) | PartMsg::FileEnd) => {
                return Err(UploadError::Internal("part data outside a part".into()))
            }
        }
    }
    finish(manifest, stdin, builder, policy, limits)
}

/// Adds one `files` part while it arrives: a `.tar.gz` is expanded from the stream, anything
/// else is gathered whole first.
fn add_arriving_part(
    builder: &mut BundleBuilder,
    index: usize,
    filename: Option<String>,
    feed: &RefCell<feed::Feed>,
    limits: &UploadLimits,
) -> Result<(), UploadError> {
    let mut reader = feed::PartReader::new(feed);
    let body_ended = |e: std::io::Error| UploadError::BodyRead(e.to_string());
    let streamable = match filename.as_deref() {
        Some(name) if archive::kind_by_name(name) == Some(archive::ArchiveKind::TarGz) => {
            let start = reader.peek(2).map_err(body_ended)?;
            archive::has_magic(archive::ArchiveKind::TarGz, start).then_some(name)
        }
        _ => None,
    };
    // The body reader charged the part's bytes as they arrived.
    let Some(name) = streamable else {
        let data = reader.into_rest().map_err(body_ended)?;
        let raw = data.len() as u64;
        let plain = !legacy::is_legacy(&data)
            && filename
                .as_deref()
                .and_then(archive::kind_by_name)
                .is_none();
        if plain {
            // The part's bytes become the file: their charge is the file's.
            builder.already_charged(raw);
            return add_part(builder, index, FilePart { filename, data }, limits);
        }
        add_part(builder, index, FilePart { filename, data }, limits)?;
        builder.release(raw);
        return Ok(());
    };
    archive::extract_tar_gz_streaming(name, reader, feed, builder, limits)?;
    // What follows the archive's end (gzip trailer, padding) is not expanded.
    feed.borrow_mut().skip_part();
    if feed.borrow().truncated() {
        return Err(UploadError::BodyRead("the request body ended early".into()));
    }
    builder.release(feed.borrow().progress().0);
    Ok(())
}

/// Validates the manifest against the bundle, settles the stdin and hashes the job.
fn finish(
    manifest: Option<Bytes>,
    stdin_part: Option<Bytes>,
    builder: BundleBuilder,
    policy: &ManifestPolicy,
    limits: &UploadLimits,
) -> Result<Submission, UploadError> {
    let mut builder = builder;
    let from_part = manifest.as_deref().map(RawManifest::parse).transpose()?;
    // A project in one top-level folder is that folder, unless the manifest names its entry
    // point by the full path (`project/main.py`).
    let named_in_place = from_part
        .as_ref()
        .and_then(RawManifest::entrypoint)
        .is_some_and(|e| builder.has_file(e));
    if !named_in_place {
        builder.lift_single_root_dir();
    }
    let mut raw = match (from_part, builder.file_data("job.json")) {
        (Some(raw), _) => raw,
        (None, Some(json)) => RawManifest::parse(json)?,
        (None, None) => RawManifest::default(),
    };
    let stdin = match (stdin_part, raw.take_stdin()) {
        (Some(_), Some(_)) => {
            return Err(UploadError::Malformed(
                "stdin is given twice: as a stdin part and as manifest.stdin".to_owned(),
            ))
        }
        (Some(bytes), None) => bytes,
        (None, Some(text)) => Bytes::from(text),
        (None, None) => Bytes::new(),
    };
    // The part was capped while it arrived; the manifest's text is checked here.
    if stdin.len() as u64 > limits.max_stdin_bytes {
        return Err(UploadError::StdinTooLarge {
            limit: limits.max_stdin_bytes,
        });
    }
    let manifest = Manifest::from_raw(raw, policy, &builder)?;
    let bundle = builder.build();
    let job_hash = job_hash(&manifest, &bundle, &stdin);
    Ok(Submission {
        manifest,
        bundle,
        stdin,
        job_hash,
    })
}

/// Adds one `files` part: legacy records, an archive, or a single file.
fn add_part(
    builder: &mut BundleBuilder,
    index: usize,
    part: FilePart,
    limits: &UploadLimits,
) -> Result<(), UploadError> {
    if legacy::is_legacy(&part.data) {
        let label = part
            .filename
            .clone()
            .unwrap_or_else(|| "legacy body".to_owned());
        for (name, data) in legacy::parse(&label, &part.data, limits)? {
            add_named(builder, &label, &name, data, limits)?;
        }
        return Ok(());
    }
    match part.filename.as_deref() {
        // Browsers send an empty, unnamed part when no file was chosen.
        Some("") | None if part.data.is_empty() => Ok(()),
        Some(name) if !name.is_empty() => add_named(builder, name, name, part.data, limits),
        _ => Err(UploadError::entry(
            &format!("files part #{}", index + 1),
            "",
            "has no filename",
        )),
    }
}

/// Adds a file the client named: an archive is expanded, anything else is stored at `name`.
fn add_named(
    builder: &mut BundleBuilder,
    upload: &str,
    name: &str,
    data: Bytes,
    limits: &UploadLimits,
) -> Result<(), UploadError> {
    if let Some(kind) = archive::kind_by_name(name) {
        return archive::extract(kind, name, &data, builder, limits);
    }
    let path = entry_path(upload, name, limits)?;
    builder.add_file(path, DEFAULT_FILE_MODE, data)?;
    Ok(())
}

/// Validates an uploaded path: at most one leading `./` is dropped, then it must be a
/// [`BundlePath`] no longer than [`UploadLimits::max_path_bytes`].
pub(crate) fn entry_path(
    upload: &str,
    raw: &str,
    limits: &UploadLimits,
) -> Result<BundlePath, UploadError> {
    let path = raw.strip_prefix("./").unwrap_or(raw);
    if path.len() > limits.max_path_bytes {
        return Err(UploadError::entry(
            upload,
            raw,
            format!("path is longer than {} bytes", limits.max_path_bytes),
        ));
    }
    BundlePath::new(path).map_err(|e| UploadError::entry(upload, raw, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_content_types_then_each_is_routed_or_refused_with_the_right_status() {
        assert!(matches!(
            body_kind(Some("multipart/form-data; boundary=abc")),
            Ok(BodyKind::Multipart(b)) if b == "abc"
        ));
        assert!(matches!(body_kind(None), Ok(BodyKind::Legacy)));
        assert!(matches!(
            body_kind(Some("application/octet-stream")),
            Ok(BodyKind::Legacy)
        ));
        assert_eq!(
            body_kind(Some("application/json"))
                .err()
                .map(|e| e.status()),
            Some(415)
        );
        assert_eq!(
            body_kind(Some("multipart/form-data"))
                .err()
                .map(|e| e.status()),
            Some(400)
        );
    }

    #[test]
    fn given_uploaded_names_then_one_leading_dot_slash_is_dropped_and_traversal_refused() {
        let limits = UploadLimits::default();
        assert_eq!(
            entry_path("u", "./src/a.py", &limits).unwrap().as_str(),
            "src/a.py"
        );
        for bad in ["../x", "/etc/passwd", "a\\b", "a\0b", "././x", "a/../b"] {
            let e = entry_path("u", bad, &limits).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.message().contains(&format!("{bad:?}")), "{}", e.message());
        }
        let long = "a/".repeat(600) + "b";
        assert!(entry_path("u", &long, &limits)
            .unwrap_err()
            .message()
            .contains("longer"));
    }
}
