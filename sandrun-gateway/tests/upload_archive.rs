//! Archive uploads: normal tar.gz and zip expansion, and every hostile entry refused with a 400
//! that names it (413 when it is the expansion cap that refuses it), before (or while) costing
//! almost nothing.

mod upload_support;

use std::io::Write;

use sandrun_gateway::upload::UploadLimits;
use sandrun_ipc::BundleEntry;
use tar::EntryType;
use upload_support::*;

fn limits() -> UploadLimits {
    UploadLimits::default()
}

async fn refused_tar(entries: &[TarEntry<'_>]) -> String {
    let err = submit_archive(&limits(), "job.tar.gz", &tar_gz_raw(entries))
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400, "{}", err.message());
    err.message()
}

#[tokio::test]
async fn given_a_tar_gz_with_dirs_and_dot_slash_names_then_the_bundle_is_normalized() {
    let mut main = TarEntry::file("./main.py", b"print(1)\n");
    main.mode = 0o755;
    let archive = tar_gz_raw(&[
        TarEntry::of("./", EntryType::Directory),
        TarEntry::of("./data/", EntryType::Directory),
        main,
        TarEntry::file("./data/in.csv", b"a,b\n"),
        TarEntry::file("src/util/helpers.py", b"x = 1\n"),
    ]);
    let s = submit_archive(&limits(), "job.tar.gz", &archive)
        .await
        .unwrap();
    assert_eq!(
        file_names(&s),
        ["data/in.csv", "main.py", "src/util/helpers.py"]
    );
    assert_eq!(s.bundle.file("main.py").unwrap().mode, 0o755);
    assert_eq!(s.manifest.argv(), ["python3", "main.py"]);
    let dirs: Vec<String> = s
        .bundle
        .entries()
        .into_iter()
        .filter_map(|e| match e {
            BundleEntry::Dir { path, .. } => Some(path.to_string()),
            BundleEntry::File { .. } => None,
        })
        .collect();
    assert_eq!(dirs, ["data", "src", "src/util"]);
}

#[tokio::test]
async fn given_setuid_and_setgid_entries_then_the_bits_are_stripped() {
    let mut suid = TarEntry::file("run.sh", b"echo hi\n");
    suid.mode = 0o6755;
    let mut sticky = TarEntry::of("shared/", EntryType::Directory);
    sticky.mode = 0o1777;
    let s = submit_archive(&limits(), "a.tgz", &tar_gz_raw(&[sticky, suid]))
        .await
        .unwrap();
    assert_eq!(s.bundle.file("run.sh").unwrap().mode, 0o755);
    assert!(s.bundle.entries().iter().all(|e| match e {
        BundleEntry::Dir { mode, .. } | BundleEntry::File { mode, .. } => mode & !0o777 == 0,
    }));
}

#[tokio::test]
async fn given_a_tar_symlink_entry_then_it_is_refused_naming_it() {
    let mut link = TarEntry::of("evil", EntryType::Symlink);
    link.link = Some("/etc/shadow");
    let msg = refused_tar(&[TarEntry::file("main.py", b""), link]).await;
    assert!(
        msg.contains("\"evil\"") && msg.contains("symbolic link"),
        "{msg}"
    );
}

#[tokio::test]
async fn given_a_tar_hardlink_entry_then_it_is_refused_naming_it() {
    let mut link = TarEntry::of("hard", EntryType::Link);
    link.link = Some("main.py");
    let msg = refused_tar(&[TarEntry::file("main.py", b""), link]).await;
    assert!(
        msg.contains("\"hard\"") && msg.contains("hard link"),
        "{msg}"
    );
}

#[tokio::test]
async fn given_device_and_fifo_entries_then_each_is_refused_naming_it() {
    for (name, kind, what) in [
        ("null", EntryType::Char, "device"),
        ("sda", EntryType::Block, "device"),
        ("pipe", EntryType::Fifo, "FIFO"),
    ] {
        let msg = refused_tar(&[TarEntry::file("main.py", b""), TarEntry::of(name, kind)]).await;
        assert!(
            msg.contains(&format!("{name:?}")) && msg.contains(what),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn given_traversal_absolute_nul_or_backslash_names_then_each_is_refused_naming_it() {
    for bad in [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a\\..\\b",
        "ok/..",
        "a//b",
    ] {
        let msg = refused_tar(&[TarEntry::file("main.py", b""), TarEntry::file(bad, b"x")]).await;
        assert!(msg.contains(&format!("{bad:?}")), "{bad:?}: {msg}");
    }
}

#[tokio::test]
async fn given_an_overlong_gnu_long_name_then_it_is_refused() {
    let long = "d/".repeat(600) + "f";
    let archive = sandrun_test_support::archive::tar_gz(&[(&long, b"x")]);
    let err = submit_archive(&limits(), "a.tar.gz", &archive)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(
        err.message().contains("longer than 1024 bytes"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn given_a_file_where_a_dir_is_expected_or_a_duplicate_then_it_is_refused() {
    let msg = refused_tar(&[TarEntry::file("a", b"1"), TarEntry::file("a/b", b"2")]).await;
    assert!(msg.contains("\"a\""), "{msg}");
    let msg = refused_tar(&[
        TarEntry::file("main.py", b"1"),
        TarEntry::file("main.py", b"2"),
    ])
    .await;
    assert!(
        msg.contains("duplicate") && msg.contains("main.py"),
        "{msg}"
    );
}

#[tokio::test]
async fn given_a_gzip_of_ten_gib_of_zeros_then_it_is_refused_before_decompressing_it() {
    let archive = ZeroGz::new()
        .bytes(&tar_header("zeros.bin", 10 << 30))
        .zeros_mib(10 << 10)
        .finish();
    assert!(
        archive.len() < 20 << 20,
        "test archive is {} bytes",
        archive.len()
    );
    let err = submit_archive(&limits(), "bomb.tar.gz", &archive)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 413);
    assert!(err.message().contains("zeros.bin"), "{}", err.message());
}

#[tokio::test]
async fn given_a_high_ratio_tar_gz_within_the_size_cap_then_the_ratio_meter_stops_it() {
    // 20 files of 10 MiB of zeros: each entry is within the budget, the ratio (~1000:1) is not.
    let mut gz = ZeroGz::new();
    for i in 0..20 {
        gz.bytes(&tar_header(&format!("z{i:02}.bin"), 10 << 20))
            .zeros_mib(10);
    }
    let archive = gz.finish();
    let cap = archive.len() as u64 * 100;
    let err = submit_archive(&limits(), "ratio.tgz", &archive)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 413);
    let msg = err.message();
    assert!(
        msg.contains("expands past") && msg.contains(&cap.max(1 << 20).to_string()),
        "{msg}"
    );
    assert!(msg.contains(".bin"), "{msg}");
}

#[tokio::test]
async fn given_a_gzip_bomb_under_the_upload_cap_then_memory_and_work_stay_bounded() {
    // One entry declaring 200 MiB (under the 256 MiB budget) of zeros: compressed ~200 KiB, so
    // the ratio cap stops decompression at about 20 MiB.
    let archive = ZeroGz::new()
        .bytes(&tar_header("big.bin", 200 << 20))
        .zeros_mib(200)
        .finish();
    let limits = UploadLimits {
        max_ratio: 100,
        ..limits()
    };
    let err = submit_archive(&limits, "b.tgz", &archive)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 413, "{}", err.message());
    assert!(
        err.message().contains("\"big.bin\": expands past"),
        "{}",
        err.message()
    );
}

/// Bytes that deflate cannot shrink.
fn noise(len: usize) -> Vec<u8> {
    sandrun_test_support::noise(len, 0x2545_f491_4f6c_dd1d)
}

#[tokio::test]
async fn given_a_tar_gz_whose_start_is_far_above_the_ratio_then_the_whole_archive_decides() {
    // 8 MiB of zeros first (about 1000:1), then 300 KiB of noise: the whole archive is about
    // 28:1, under the ratio cap. It arrives in 7000-byte chunks, so the zeros expand faster
    // than the ratio of what has arrived allows: the expansion waits instead of refusing.
    let zeros = vec![0u8; 8 << 20];
    let noisy = noise(300 << 10);
    let archive = tar_gz_raw(&[
        TarEntry::file("zeros.bin", &zeros),
        TarEntry::file("noise.bin", &noisy),
        TarEntry::file("main.py", b"pass\n"),
    ]);
    assert!((archive.len() as u64) * 100 > 9 << 20, "ratio over the cap");
    let s = submit_archive(&limits(), "job.tar.gz", &archive)
        .await
        .unwrap();
    let data = |p: &str| s.bundle.file(p).unwrap().data.clone();
    assert_eq!(data("zeros.bin").as_ref(), &zeros[..]);
    assert_eq!(data("noise.bin").as_ref(), &noisy[..]);
}

#[tokio::test]
async fn given_a_tar_gz_then_streamed_and_in_memory_expansion_give_the_same_bundle_and_hash() {
    let noisy = noise(100 << 10);
    let archive = tar_gz_raw(&[
        TarEntry::file("src/a.py", b"print(1)\n"),
        TarEntry::file("noise.bin", &noisy),
        TarEntry::file("main.py", b"pass\n"),
    ]);
    let streamed = submit_archive(&limits(), "job.tar.gz", &archive)
        .await
        .unwrap();
    // The same archive as a legacy record is gathered whole, then expanded in memory.
    let mut legacy = format!("----Tar\nPath: job.tar.gz\nSize: {}\n\n", archive.len()).into_bytes();
    legacy.extend_from_slice(&archive);
    let whole = submit_with(&limits(), None, legacy).await.unwrap();
    assert_eq!(streamed.bundle, whole.bundle);
    assert_eq!(streamed.job_hash, whole.job_hash);
}

#[tokio::test]
async fn given_ten_thousand_tiny_entries_then_the_entry_cap_decides() {
    let names: Vec<String> = (0..10_000).map(|i| format!("f{i:05}")).collect();
    let mut entries: Vec<TarEntry> = names.iter().map(|n| TarEntry::file(n, b"")).collect();
    entries.push(TarEntry::file("main.py", b""));
    let archive = tar_gz_raw(&entries);
    let exact = UploadLimits {
        max_files: 10_001,
        ..limits()
    };
    let s = submit_archive(&exact, "many.tar.gz", &archive)
        .await
        .unwrap();
    assert_eq!(s.bundle.files().len(), 10_001);
    let err = submit_archive(&limits(), "many.tar.gz", &archive)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(err.message().contains("10000"), "{}", err.message());
}

#[tokio::test]
async fn given_a_misnamed_archive_then_it_is_refused_rather_than_guessed() {
    let err = submit_archive(&limits(), "x.tar.gz", b"PK\x03\x04not gzip")
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(err.message().contains("not gzip"), "{}", err.message());
}

#[tokio::test]
async fn given_a_zip_with_dirs_and_modes_then_the_bundle_is_normalized() {
    let archive = zip_modes(&[
        ("src/", 0o755, b""),
        ("src/app.js", 0o644, b"console.log(1)"),
        ("index.js", 0o4755, b"require('./src/app.js')"),
        ("inner.zip", 0o644, &zip_modes(&[("x", 0o644, b"x")])),
    ]);
    let s = submit_archive(&limits(), "job.zip", &archive)
        .await
        .unwrap();
    assert_eq!(file_names(&s), ["index.js", "inner.zip", "src/app.js"]);
    assert_eq!(s.bundle.file("index.js").unwrap().mode, 0o755);
    assert_eq!(s.manifest.argv(), ["node", "index.js"]);
}

#[tokio::test]
async fn given_a_zip_slip_entry_then_it_is_refused_naming_it() {
    let archive = zip_modes(&[("main.py", 0o644, b""), ("../x", 0o644, b"pwned")]);
    let err = submit_archive(&limits(), "slip.zip", &archive)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(err.message().contains("\"../x\""), "{}", err.message());
}

#[tokio::test]
async fn given_a_zip_symlink_then_it_is_refused_naming_it() {
    let archive = sandrun_test_support::archive::zip_with(|w| {
        let opts = zip::write::SimpleFileOptions::default();
        w.start_file("main.py", opts).unwrap();
        w.add_symlink("link", "/etc/passwd", opts).unwrap();
    });
    let err = submit_archive(&limits(), "s.zip", &archive)
        .await
        .unwrap_err();
    assert!(
        err.message().contains("\"link\": symbolic links"),
        "{}",
        err.message()
    );
}

/// Rewrites a one-entry zip so its central directory lists the same local entry `copies`
/// times under different names: the overlapping-file zip bomb.
fn overlapping_zip(copies: usize) -> Vec<u8> {
    let one = zip_modes(&[("aaaa", 0o644, &vec![0u8; 1 << 20])]);
    let cd_start = find(&one, b"PK\x01\x02").unwrap();
    let eocd = find(&one, b"PK\x05\x06").unwrap();
    let record = one[cd_start..eocd].to_vec();
    let mut out = one[..cd_start].to_vec();
    for i in 0..copies {
        let mut r = record.clone();
        let name_len = usize::from(u16::from_le_bytes([r[28], r[29]]));
        r[46..46 + name_len].copy_from_slice(format!("{i:04}").as_bytes());
        out.extend_from_slice(&r);
    }
    let cd_size = out.len() - cd_start;
    let mut end = one[eocd..].to_vec();
    put_le16(&mut end, 8, u16::try_from(copies).unwrap());
    put_le16(&mut end, 10, u16::try_from(copies).unwrap());
    put_le32(&mut end, 12, u32::try_from(cd_size).unwrap());
    put_le32(&mut end, 16, u32::try_from(cd_start).unwrap());
    out.extend_from_slice(&end);
    out
}

#[tokio::test]
async fn given_an_overlapping_zip_bomb_then_the_central_directory_check_refuses_it() {
    let archive = overlapping_zip(2000);
    assert!(archive.len() < 200 << 10);
    let err = submit_archive(&limits(), "42.zip", &archive)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 413);
    assert!(
        err.message().contains("declared sizes add up past"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn given_a_zip_whose_declared_size_lies_then_decompression_stops_and_refuses_it() {
    let mut archive = zip_modes(&[
        ("main.py", 0o644, b""),
        ("data.bin", 0o644, &vec![0u8; 1 << 20]),
    ]);
    // Declare 10 bytes for data.bin in both its local header and its central record (the
    // name follows the fixed part of each: 30 and 46 bytes).
    let local = find(&archive, b"data.bin").unwrap() - 30;
    let second = local + 31 + find(&archive[local + 31..], b"data.bin").unwrap();
    let central = second - 46;
    assert_eq!(&archive[local..local + 4], b"PK\x03\x04");
    assert_eq!(&archive[central..central + 4], b"PK\x01\x02");
    assert_eq!(le32(&archive, central + 24), 1 << 20);
    put_le32(&mut archive, local + 22, 10);
    put_le32(&mut archive, central + 24, 10);
    let err = submit_archive(&limits(), "lie.zip", &archive)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(err.message().contains("\"data.bin\""), "{}", err.message());
}

#[tokio::test]
async fn given_a_zip_with_too_many_entries_then_it_is_refused_before_decompression() {
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let entries: Vec<(&str, u32, &[u8])> = names
        .iter()
        .map(|n| (n.as_str(), 0o644, &b""[..]))
        .collect();
    let limits = UploadLimits {
        max_files: 10,
        ..limits()
    };
    let err = submit_archive(&limits, "many.zip", &zip_modes(&entries))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("central directory"),
        "{}",
        err.message()
    );
}

#[test]
fn given_the_zero_gzip_helper_then_its_output_really_decodes_to_zeros() {
    // Guards the bomb tests: if ZeroGz produced garbage, they would pass for the wrong reason.
    let archive = ZeroGz::new().bytes(b"head").zeros_mib(3).finish();
    let mut dec = flate2::read::GzDecoder::new(&archive[..]);
    let mut out = Vec::new();
    let _ = std::io::copy(&mut dec, &mut out); // Ends with an error: no trailer.
    assert_eq!(out.len(), 4 + (3 << 20));
    assert_eq!(&out[..4], b"head");
    assert!(out[4..].iter().all(|&b| b == 0));
    let mut sink = std::io::sink();
    sink.write_all(&out).unwrap();
}

/// `tar czf x.tgz project/` and a zip of a folder: the folder is the project root, so its
/// `job.json` and entry point are found.
#[tokio::test]
async fn given_an_archive_of_one_folder_then_its_job_json_and_main_py_are_found() {
    let job = br#"{"entrypoint": "run.py", "args": ["a"]}"#;
    let tgz = tar_gz_raw(&[
        TarEntry::of("project/", EntryType::Directory),
        TarEntry::file("project/job.json", job),
        TarEntry::file("project/run.py", b"print(1)\n"),
        TarEntry::file("project/lib/u.py", b"x = 1\n"),
    ]);
    let zip = zip_modes(&[
        ("project/", 0o755, b""),
        ("project/job.json", 0o644, job),
        ("project/run.py", 0o644, b"print(1)\n"),
        ("project/lib/u.py", 0o644, b"x = 1\n"),
    ]);
    for (name, archive) in [("x.tgz", tgz), ("x.zip", zip)] {
        let s = submit_archive(&limits(), name, &archive).await.unwrap();
        assert_eq!(file_names(&s), ["job.json", "lib/u.py", "run.py"], "{name}");
        assert_eq!(s.manifest.argv(), ["python3", "run.py", "a"], "{name}");
    }
    // Without a job.json the entry point is detected inside the folder.
    let only_main = tar_gz_raw(&[TarEntry::file("p/main.py", b"print(1)\n")]);
    let s = submit_archive(&limits(), "x.tar.gz", &only_main)
        .await
        .unwrap();
    assert_eq!(s.manifest.argv(), ["python3", "main.py"]);
}

#[tokio::test]
async fn given_one_folder_and_a_manifest_naming_the_full_path_then_the_folder_is_kept() {
    let archive = tar_gz_raw(&[TarEntry::file("p/main.py", b"print(1)\n")]);
    let body = multipart_body(&[
        ("files", Some("x.tgz"), &archive),
        ("manifest", None, br#"{"entrypoint": "p/main.py"}"#),
    ]);
    let s = submit_with(&limits(), Some(&multipart_ct()), body)
        .await
        .unwrap();
    assert_eq!(file_names(&s), ["p/main.py"]);
    assert_eq!(s.manifest.argv(), ["python3", "p/main.py"]);
}
