//! The legacy upload format of existing Sandrun clients (see `docs/manifest.md`):
//!
//! ```text
//! ----Tar\n
//! Path: NAME\n
//! Size: N\n
//! \n
//! <the record's bytes>
//! ```
//!
//! One or more records follow each other; newlines between records and at the end are ignored.
//! `N` is decimal digits only. Each record is then treated like a `files` part named `NAME`: an
//! archive name is expanded, any other name is one file.
//!
//! `Size` is a hint, as it was for the original server (which ignored it): the original MCP
//! server counts it in characters, not bytes, so non-ASCII code disagrees with it. `N` is taken
//! when it ends the record where a record may end (the end of the body, or newlines and the next
//! `----Tar`); otherwise the record runs to the next `\n----Tar\nPath: ` or to the end of the
//! body. Every bound still holds: the body itself is within the upload's size cap and memory
//! charge, and the number of records within the entry cap.

use bytes::Bytes;

use super::{UploadError, UploadLimits};

/// The first bytes of every record.
pub const MAGIC: &[u8] = b"----Tar\n";

/// Whether `data` starts like a legacy body.
pub fn is_legacy(data: &[u8]) -> bool {
    data.starts_with(MAGIC)
}

/// Splits a legacy body into (name, bytes) records. The bytes share `data`'s buffer.
pub fn parse(
    upload: &str,
    data: &Bytes,
    limits: &UploadLimits,
) -> Result<Vec<(String, Bytes)>, UploadError> {
    let mut records = Vec::new();
    let mut pos = 0;
    loop {
        while data.get(pos) == Some(&b'\n') {
            pos += 1;
        }
        if pos == data.len() {
            return Ok(records);
        }
        if records.len() >= limits.max_files {
            return Err(UploadError::Malformed(format!(
                "{upload}: more than {} legacy records",
                limits.max_files
            )));
        }
        let (name, size, body_start) = parse_header(upload, data, pos, limits)?;
        let end = record_end(data, body_start, size);
        records.push((name, data.slice(body_start..end)));
        pos = end;
    }
}

/// Where the record whose bytes start at `start` ends: after its declared `size` if a record
/// may end there, else before the next record separator or at the end of `data`.
fn record_end(data: &[u8], start: usize, size: usize) -> usize {
    let declared = start.checked_add(size).filter(|end| *end <= data.len());
    if let Some(end) = declared {
        let after = &data[end..];
        let skipped = after.iter().take_while(|&&b| b == b'\n').count();
        if after.is_empty() || after[skipped..].starts_with(MAGIC) {
            return end;
        }
    }
    let rest = &data[start..];
    rest.windows(SEPARATOR.len())
        .position(|w| w == SEPARATOR)
        .map_or(data.len(), |at| start + at)
}

/// What separates a record from the next one when `Size` is not believed.
const SEPARATOR: &[u8] = b"\n----Tar\nPath: ";

/// Parses `----Tar\nPath: NAME\nSize: N\n\n` at `pos`; returns the name, size and body offset.
fn parse_header(
    upload: &str,
    data: &[u8],
    pos: usize,
    limits: &UploadLimits,
) -> Result<(String, usize, usize), UploadError> {
    let malformed = |what: &str| UploadError::Malformed(format!("{upload}: legacy record {what}"));
    let rest = data[pos..]
        .strip_prefix(MAGIC)
        .ok_or_else(|| malformed("does not start with ----Tar"))?;
    let max_line = limits.max_path_bytes + 16;
    let (path_line, rest) =
        split_line(rest, max_line).ok_or_else(|| malformed("has no Path line"))?;
    let name = path_line
        .strip_prefix(b"Path: ")
        .and_then(|n| std::str::from_utf8(n).ok())
        .ok_or_else(|| malformed("has a bad Path line (expected \"Path: NAME\" in UTF-8)"))?;
    let (size_line, rest) = split_line(rest, 32).ok_or_else(|| malformed("has no Size line"))?;
    let size = size_line
        .strip_prefix(b"Size: ")
        .filter(|d| !d.is_empty() && d.len() <= 19 && d.iter().all(u8::is_ascii_digit))
        .and_then(|d| std::str::from_utf8(d).ok()?.parse::<usize>().ok())
        .ok_or_else(|| malformed("has a bad Size line (expected \"Size: DIGITS\")"))?;
    let rest = rest
        .strip_prefix(b"\n")
        .ok_or_else(|| malformed("lacks the blank line"))?;
    Ok((name.to_owned(), size, data.len() - rest.len()))
}

/// The bytes before the next `\n` (at most `max` of them) and the bytes after it.
fn split_line(data: &[u8], max: usize) -> Option<(&[u8], &[u8])> {
    let window = &data[..data.len().min(max + 1)];
    let nl = window.iter().position(|&b| b == b'\n')?;
    Some((&data[..nl], &data[nl + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Vec<(String, Bytes)>, UploadError> {
        parse("body", &Bytes::from(s.to_owned()), &UploadLimits::default())
    }

    #[test]
    fn given_a_legacy_record_then_name_and_exact_bytes_are_returned() {
        let r = parse_str("----Tar\nPath: main.py\nSize: 14\n\nprint('hi')\n\n\n").unwrap();
        assert_eq!(
            r,
            [(
                "main.py".to_owned(),
                Bytes::from_static(b"print('hi')\n\n\n")
            )]
        );
    }

    #[test]
    fn given_two_records_then_both_are_returned_in_order() {
        let r =
            parse_str("----Tar\nPath: a\nSize: 1\n\nA\n----Tar\nPath: d/b\nSize: 0\n\n\n").unwrap();
        let names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "d/b"]);
    }

    #[test]
    fn given_a_size_in_characters_then_the_record_is_the_whole_body_as_the_original_read_it() {
        // The original MCP server: `Size: {len(code)}`, characters, for UTF-8 code.
        let code = "print('héllo wörld ✓')\nprint(2)";
        let body = format!(
            "----Tar\nPath: main.py\nSize: {}\n\n{code}",
            code.chars().count()
        );
        let r = parse_str(&body).unwrap();
        assert_eq!(r, [("main.py".to_owned(), Bytes::from(code.to_owned()))]);
        // A size larger than the body is a hint too.
        let r = parse_str("----Tar\nPath: x.py\nSize: 99\n\nshort").unwrap();
        assert_eq!(r[0].1, Bytes::from_static(b"short"));
    }

    #[test]
    fn given_wrong_sizes_in_two_records_then_each_ends_at_the_next_record() {
        let r =
            parse_str("----Tar\nPath: a\nSize: 1\n\né1\n----Tar\nPath: b\nSize: 1\n\nü2").unwrap();
        assert_eq!(r[0], ("a".to_owned(), Bytes::from("é1".to_owned())));
        assert_eq!(r[1], ("b".to_owned(), Bytes::from("ü2".to_owned())));
    }

    #[test]
    fn given_an_exact_size_then_a_record_may_hold_a_separator() {
        let inner = "x\n----Tar\nPath: y\n";
        let body = format!("----Tar\nPath: a\nSize: {}\n\n{inner}", inner.len());
        let r = parse_str(&body).unwrap();
        assert_eq!(r, [("a".to_owned(), Bytes::from(inner.to_owned()))]);
    }

    #[test]
    fn given_more_records_than_the_entry_cap_then_they_are_refused() {
        let limits = UploadLimits {
            max_files: 2,
            ..UploadLimits::default()
        };
        let body = "----Tar\nPath: a\nSize: 9\n\nA\n".repeat(3);
        assert!(parse("body", &Bytes::from(body), &limits).is_err());
    }

    #[test]
    fn given_bad_headers_then_the_record_is_refused() {
        for bad in [
            "----Tar\nPath: a\nSize: -1\n\n",
            "----Tar\nPath: a\nSize: 1x\n\nA",
            "----Tar\nName: a\nSize: 1\n\nA",
            "----Tar\nPath: a\nSize: 1\nA",
            "----Tar\nPath: a\nSize: 99999999999999999999999\n\nA",
        ] {
            assert!(parse_str(bad).is_err(), "{bad:?} accepted");
        }
    }
}
