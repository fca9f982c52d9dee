//! Findings of the gateway fuzz targets (`sandrun-gateway/fuzz`), kept as tests.

use std::io::Write;

use bytes::Bytes;
use sandrun_gateway::bundle::{BundleBuilder, BundleCaps};
use sandrun_gateway::upload::archive::{self, ArchiveKind};
use sandrun_gateway::upload::UploadLimits;
use zip::write::SimpleFileOptions;

/// A stored zip of `a.txt` (content "1") and `b.txt` (content "2") with the second renamed to
/// `a.txt` in its local header and central directory record: two entries, one name.
fn zip_with_duplicate_name() -> Vec<u8> {
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut zip = sandrun_test_support::archive::zip_with(|w| {
        for (name, data) in [("a.txt", b"1"), ("b.txt", b"2")] {
            w.start_file(name, stored).unwrap();
            w.write_all(data).unwrap();
        }
    });
    let mut renamed = 0;
    let mut at = 0;
    while let Some(pos) = zip[at..].windows(5).position(|w| w == b"b.txt") {
        zip[at + pos..at + pos + 5].copy_from_slice(b"a.txt");
        at += pos + 5;
        renamed += 1;
    }
    assert_eq!(renamed, 2, "local header and central directory record");
    zip
}

/// Finding 2 (fuzzing, issue 5): the zip reader keys entries by name, so the second `a.txt`
/// silently replaced the first. Another tool that lists the archive shows content "1"; sandrun
/// ran "2". A tar.gz with a duplicate path was already refused; a zip now is too.
#[test]
fn given_a_zip_with_two_entries_of_the_same_name_then_it_is_refused() {
    let limits = UploadLimits::default();
    let mut builder = BundleBuilder::new(BundleCaps {
        max_entries: 10,
        max_bytes: 1 << 20,
    });
    let data = Bytes::from(zip_with_duplicate_name());
    let err = archive::extract(ArchiveKind::Zip, "dup.zip", &data, &mut builder, &limits)
        .expect_err("a zip with a duplicate name was accepted");
    assert_eq!(err.status(), 400);
    assert!(err.message().contains("same name"), "{}", err.message());
    assert!(builder.file_data("a.txt").is_none(), "an entry was written");
}
