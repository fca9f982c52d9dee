//! Helpers shared by the `upload_*` integration tests: body builders, lazy streams that count
//! what the parser pulled, and archive builders that can write hostile entries.
#![allow(dead_code)]

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};
use futures_util::stream::{self, Stream};
use sandrun_gateway::manifest::ManifestPolicy;
use sandrun_gateway::upload::{parse_submission, Submission, UploadError, UploadLimits};

pub const BOUNDARY: &str = "----sandrunTestBoundary7MA4YWxk";

pub fn multipart_ct() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

/// A part: (name, filename, content).
pub type Part<'a> = (&'a str, Option<&'a str>, &'a [u8]);

pub fn multipart_body(parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        write!(
            body,
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\""
        )
        .unwrap();
        if let Some(f) = filename {
            write!(body, "; filename=\"{f}\"").unwrap();
        }
        body.extend_from_slice(b"\r\nContent-Type: application/octet-stream\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{BOUNDARY}--\r\n").unwrap();
    body
}

/// The body as a stream of 7000-byte chunks, so every parser sees chunk boundaries.
pub fn chunked(body: Vec<u8>) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin {
    let body = Bytes::from(body);
    let chunks: Vec<_> = (0..body.len())
        .step_by(7000)
        .map(|i| Ok(body.slice(i..body.len().min(i + 7000))))
        .collect();
    stream::iter(chunks)
}

/// A stream of `chunk`-byte pieces produced on demand by `next(index)`, counting bytes pulled.
pub fn lazy(
    pulled: Arc<AtomicU64>,
    mut next: impl FnMut(u64) -> Option<Vec<u8>> + Send + 'static,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin {
    let mut index = 0u64;
    stream::iter(std::iter::from_fn(move || {
        let chunk = next(index)?;
        index += 1;
        pulled.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        Some(Ok(Bytes::from(chunk)))
    }))
}

pub fn policy() -> ManifestPolicy {
    ManifestPolicy {
        environments: vec!["python-data".into()],
        ..ManifestPolicy::default()
    }
}

pub async fn submit_with(
    limits: &UploadLimits,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<Submission, UploadError> {
    parse_stream(limits, content_type, chunked(body)).await
}

/// Parses any body stream with the test policy and no memory budget.
pub async fn parse_stream<S, E>(
    limits: &UploadLimits,
    content_type: Option<&str>,
    body: S,
) -> Result<Submission, UploadError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    parse_submission(
        content_type,
        body,
        limits,
        &policy(),
        &sandrun_gateway::budget::SharedReservation::unlimited(),
    )
    .await
}

pub async fn submit(parts: &[Part<'_>]) -> Result<Submission, UploadError> {
    submit_with(
        &UploadLimits::default(),
        Some(&multipart_ct()),
        multipart_body(parts),
    )
    .await
}

/// Submits one archive as the only `files` part.
pub async fn submit_archive(
    limits: &UploadLimits,
    filename: &str,
    archive: &[u8],
) -> Result<Submission, UploadError> {
    let body = multipart_body(&[("files", Some(filename), archive)]);
    submit_with(limits, Some(&multipart_ct()), body).await
}

pub fn file_names(s: &Submission) -> Vec<&str> {
    s.bundle.files().iter().map(|f| f.path.as_str()).collect()
}

/// Archive builders that can write hostile entries, shared with the integration tests.
// Not every test binary that includes this module uses all of them.
#[allow(unused_imports)]
pub use sandrun_test_support::archive::{
    gzip, tar_gz_raw, tar_header, tar_raw, zip_modes, TarEntry,
};

/// Builds a gzip stream holding huge runs of zeros cheaply: one MiB of zeros is compressed once
/// with a full window of zeros, and that deflate segment is repeated. Each repetition decodes to
/// another MiB of zeros. The gzip trailer is omitted: a parser that reaches it has already lost.
pub struct ZeroGz {
    comp: Compress,
    out: Vec<u8>,
}

impl ZeroGz {
    pub fn new() -> Self {
        let header = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        ZeroGz {
            comp: Compress::new(Compression::best(), false),
            out: header,
        }
    }

    fn segment(&mut self, data: &[u8]) -> Vec<u8> {
        let mut seg = Vec::with_capacity(data.len() / 100 + 1024);
        let start = self.comp.total_in();
        while self.comp.total_in() - start < data.len() as u64 {
            let done = usize::try_from(self.comp.total_in() - start).unwrap();
            seg.reserve(64 * 1024);
            self.comp
                .compress_vec(&data[done..], &mut seg, FlushCompress::None)
                .unwrap();
        }
        loop {
            seg.reserve(64 * 1024);
            let before = seg.len();
            self.comp
                .compress_vec(&[], &mut seg, FlushCompress::Sync)
                .unwrap();
            if seg.len() == before || seg.len() < seg.capacity() {
                break;
            }
        }
        seg
    }

    /// Appends literal bytes (a tar header, say).
    pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
        let seg = self.segment(data);
        self.out.extend_from_slice(&seg);
        self
    }

    /// Appends `mib` MiB of zeros (at least 2).
    pub fn zeros_mib(&mut self, mib: u64) -> &mut Self {
        assert!(mib >= 2);
        let zeros = vec![0u8; 1 << 20];
        let first = self.segment(&zeros);
        self.out.extend_from_slice(&first);
        let steady = self.segment(&zeros);
        for _ in 1..mib {
            self.out.extend_from_slice(&steady);
        }
        self
    }

    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

impl Default for ZeroGz {
    fn default() -> Self {
        Self::new()
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn put_le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_le16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
