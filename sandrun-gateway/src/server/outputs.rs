//! `GET /outputs/{id}`, `GET /download/{id}/{path}` and `GET /download/{id}` (a tar.gz of the
//! outputs only, never the inputs; the job is deleted once the archive is built).

use std::io::Write as _;

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_DISPOSITION};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::jobs::{JobStatus, OutputFile};
use crate::server::params::job_id;
use crate::server::refusals::budget_refusal;
use crate::server::response::{bytes_response, json, ApiError, ApiResult, Body};
use crate::state::AppState;

#[derive(Serialize)]
pub(super) struct Listed {
    name: String,
    size: u64,
    size_formatted: String,
    #[serde(rename = "type")]
    kind: &'static str,
    mime_type: &'static str,
    sha256: String,
    download_url: String,
}

#[derive(Serialize)]
struct Listing<'a> {
    job_id: String,
    status: JobStatus,
    total_files: usize,
    files: Vec<Listed>,
    skipped: &'a [crate::jobs::SkippedOutput],
}

pub fn list(state: &AppState, id: &str) -> ApiResult {
    let id = job_id(id)?;
    state
        .jobs
        .with_job(id, |job, _| {
            let files: Vec<Listed> = job.outputs.iter().map(|o| listed(&job.id, o)).collect();
            let body = Listing {
                job_id: job.id.to_string(),
                status: job.status,
                total_files: files.len(),
                files,
                skipped: &job.skipped,
            };
            json(StatusCode::OK, &body)
        })
        .ok_or_else(|| ApiError::not_found("job"))
}

pub(super) fn listed(id: &crate::jobs::JobId, o: &OutputFile) -> Listed {
    let size = o.data.len() as u64;
    Listed {
        name: o.path.clone(),
        size,
        size_formatted: format_size(size),
        kind: file_kind(&o.path),
        mime_type: mime_type(&o.path),
        sha256: hex::encode(o.sha256),
        download_url: format!("/download/{id}/{}", percent_encode_path(&o.path)),
    }
}

/// One output file, as an attachment (never rendered inline on the gateway's origin).
pub fn file(state: &AppState, id: &str, raw_path: &str) -> ApiResult {
    let id = job_id(id)?;
    let path = percent_decode(raw_path).ok_or_else(|| ApiError::bad_request("bad file path"))?;
    let found = state
        .jobs
        .with_job(id, |job, _| {
            let output = job.outputs.iter().find(|o| o.path == path).cloned();
            output.map(|o| (o, job.held()))
        })
        .ok_or_else(|| ApiError::not_found("job"))?;
    let (output, held) = found.ok_or_else(|| ApiError::not_found("output file"))?;
    let mut response = bytes_response(StatusCode::OK, mime_type(&output.path), output.data);
    // The job may be deleted while this is sent: its charge lasts until the body is done.
    response.body_mut().hold(held);
    attach(&mut response, basename(&output.path));
    Ok(response)
}

/// The outputs as a tar.gz; afterwards the job and all its data are deleted.
pub async fn tarball(state: &AppState, id: &str) -> ApiResult {
    let id = job_id(id)?;
    let (status, held, bound) = state
        .jobs
        .with_job(id, |job, _| {
            (job.status, job.held(), tarball_bound(&job.outputs))
        })
        .ok_or_else(|| ApiError::not_found("job"))?;
    if !status.is_finished() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the job has not finished yet",
        ));
    }
    // The archive is charged before it is built (its largest possible size, the buffer it is
    // built in), on top of the job's charge and never instead of it: that charge is shared
    // with every `/outputs` body and WebSocket round still holding the job's data, and
    // shrinking it would leave their bytes uncounted. Both are released when the last holder
    // is done. The archive may take the job's client past its share (it replaces outputs that
    // are already charged and freed once it is sent) but never the budget past its limit.
    held.try_grow_past_share(bound)
        .map_err(|full| budget_refusal(state, full))?;
    let Some(job) = state.jobs.remove(id) else {
        held.shrink(bound);
        return Err(ApiError::not_found("job"));
    };
    let outputs = job.outputs.clone();
    // Entries carry the job's end time (a finished job always has one).
    let mtime = job.completed_at_unix.unwrap_or(0);
    drop(job);
    let capacity = usize::try_from(bound).unwrap_or(usize::MAX);
    let archive = tokio::task::spawn_blocking(move || build_tarball(&outputs, mtime, capacity))
        .await
        .map_err(|_| ApiError::internal("tarball task"))?
        .map_err(|_| ApiError::internal("building the tarball"))?;
    if archive.capacity() > capacity {
        // The bound was wrong: count what is really held (never expected).
        held.charge_held((archive.capacity() - capacity) as u64);
    }
    tracing::info!(job = %id, "outputs downloaded; job deleted");
    let mut response = bytes_response(StatusCode::OK, "application/gzip", Bytes::from(archive));
    response.body_mut().hold(held);
    attach(&mut response, &format!("{id}-outputs.tar.gz"));
    Ok(response)
}

/// The largest tar.gz [`build_tarball`] can make of `outputs`: each entry's header blocks (a
/// GNU long-name entry for a path over 100 bytes) and data padded to 512 bytes, the end
/// blocks, and deflate's worst-case growth of incompressible data (the fast level codes with
/// the fixed Huffman table: at most 9 bits a byte, 12.5 %) plus block, gzip header and trailer
/// bytes.
fn tarball_bound(outputs: &[OutputFile]) -> u64 {
    let pad = |n: u64| n.div_ceil(512) * 512;
    let tar: u64 = outputs
        .iter()
        .map(|o| 512 + pad(o.data.len() as u64) + 512 + pad(o.path.len() as u64 + 1))
        .sum::<u64>()
        + 1024;
    tar + tar / 8 + tar / 1024 + 1024
}

/// The outputs as a tar.gz whose entries are dated `mtime` (seconds since the epoch), built in
/// a buffer of `capacity` bytes (it grows only if the bound was wrong).
fn build_tarball(outputs: &[OutputFile], mtime: u64, capacity: usize) -> std::io::Result<Vec<u8>> {
    let buffer = Vec::with_capacity(capacity);
    let gz = flate2::write::GzEncoder::new(buffer, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for output in outputs {
        let mut header = tar::Header::new_gnu();
        header.set_size(output.data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, &output.path, output.data.as_ref())?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    gz.finish()
}

fn attach(response: &mut Response<Body>, filename: &str) {
    let safe: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let value = format!("attachment; filename=\"{safe}\"");
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(CONTENT_DISPOSITION, value);
    }
    response.headers_mut().insert(
        "content-security-policy",
        HeaderValue::from_static("sandbox"),
    );
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn extension(path: &str) -> String {
    let name = basename(path);
    name.rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default()
}

/// The MIME type by extension; unknown is `application/octet-stream`.
pub fn mime_type(path: &str) -> &'static str {
    match extension(path).as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "webp" => "image/webp",
        "txt" | "log" | "md" | "py" | "js" | "sh" => "text/plain",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "json" => "application/json",
        "pdf" => "application/pdf",
        "gz" | "tgz" => "application/gzip",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// A coarse kind for listings: `image`, `text`, `data` or `binary`.
pub fn file_kind(path: &str) -> &'static str {
    let mime = mime_type(path);
    if mime.starts_with("image/") {
        "image"
    } else if mime.starts_with("text/") {
        "text"
    } else if mime == "application/json" {
        "data"
    } else {
        "binary"
    }
}

pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    #[allow(clippy::cast_precision_loss)] // a display value
    let mut value = bytes as f64;
    let mut unit = "B";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

/// Encodes a path for a URL, keeping `/` and the unreserved characters.
pub fn percent_encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; `None` for a bad escape or invalid UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_incompressible_and_long_named_outputs_then_the_tarball_fits_its_bound() {
        // xorshift noise: deflate cannot shrink it, so the archive is at its largest.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut noise = |n: usize| -> Bytes {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect::<Vec<u8>>()
                .into()
        };
        let outputs: Vec<OutputFile> = [0, 1, 511, 513, 300_000, 1 << 20]
            .iter()
            .enumerate()
            .map(|(i, &n)| OutputFile {
                path: format!("{}f{i}", "d/".repeat(i * 30)),
                sha256: [0; 32],
                data: noise(n),
            })
            .collect();
        let bound = tarball_bound(&outputs);
        let capacity = usize::try_from(bound).unwrap();
        let archive = build_tarball(&outputs, 0, capacity).unwrap();
        assert!(archive.len() as u64 <= bound, "{} > {bound}", archive.len());
        assert_eq!(archive.capacity(), capacity, "built in the charged buffer");
    }

    #[test]
    fn given_path_with_spaces_then_encode_and_decode_round_trip() {
        let path = "results/my plot (1).png";
        let encoded = percent_encode_path(path);
        assert_eq!(encoded, "results/my%20plot%20%281%29.png");
        assert_eq!(percent_decode(&encoded).as_deref(), Some(path));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
    }

    #[test]
    fn given_sizes_then_they_format_with_units() {
        assert_eq!(format_size(10), "10 B");
        assert_eq!(format_size(1536), "1.5 KB");
        assert_eq!(format_size(5 << 20), "5.0 MB");
    }

    #[test]
    fn given_extensions_then_kinds_and_mime_types_follow() {
        assert_eq!(
            (mime_type("a/b.PNG"), file_kind("a/b.PNG")),
            ("image/png", "image")
        );
        assert_eq!(file_kind("out.csv"), "text");
        assert_eq!(file_kind("blob"), "binary");
    }

    #[test]
    fn given_outputs_then_tarball_holds_exactly_them() {
        let outputs = vec![OutputFile {
            path: "results/a.txt".into(),
            sha256: [0; 32],
            data: Bytes::from_static(b"hello"),
        }];
        let archive = build_tarball(&outputs, 1_700_000_000, 0).unwrap();
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive.as_slice()));
        let names: Vec<String> = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["results/a.txt"]);
    }
}
