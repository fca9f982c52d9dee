//! Writes the seed corpora of the gateway fuzz targets.
//!
//! `cargo run --bin gen_corpus` (from `sandrun-gateway/fuzz`) rewrites `corpus/<target>/seed-*`.
//! Seeds named `seed-ok-*` must be accepted and `seed-bad-*` refused by the target's check;
//! `sandrun-gateway/tests/fuzz_corpus.rs` asserts both, so the seeds keep reaching deep code.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use sandrun_gateway_fuzz::checks::{gzip, BOUNDARY};

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn main() -> ExitCode {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets: [(&str, Seeds); 6] = [
        ("multipart", multipart_seeds()),
        ("multipart_any_type", any_type_seeds()),
        ("archive_targz", targz_seeds()),
        ("archive_zip", zip_seeds()),
        ("legacy", legacy_seeds()),
        ("manifest", manifest_seeds()),
    ];
    for (target, seeds) in targets {
        let dir = root.join(target);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("gen_corpus: creating {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        for (name, bytes) in &seeds {
            let path = dir.join(format!("seed-{name}"));
            if let Err(e) = std::fs::write(&path, bytes) {
                eprintln!("gen_corpus: writing {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        println!("{target}: {} seeds", seeds.len());
    }
    ExitCode::SUCCESS
}

/// A part: (name, filename, content).
type Part<'a> = (&'a str, Option<&'a str>, &'a [u8]);

fn body(parts: &[Part]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, data) in parts {
        out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{name}\"");
        if let Some(f) = filename {
            disposition.push_str(&format!("; filename=\"{f}\""));
        }
        out.extend_from_slice(disposition.as_bytes());
        out.extend_from_slice(b"\r\nContent-Type: application/octet-stream\r\n\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

const MANIFEST: &[u8] =
    br#"{"entrypoint":"main.py","args":["-v"],"env":{"MODE":"fast"},"outputs":["out/","*.png"],"timeout":30}"#;

fn multipart_seeds() -> Seeds {
    let py: &[u8] = b"print('hi')\n";
    vec![
        ("ok-one-file", body(&[("files", Some("main.py"), py)])),
        (
            "ok-manifest-and-files",
            body(&[
                ("manifest", None, MANIFEST),
                ("files", Some("main.py"), py),
                ("files", Some("lib/util.py"), b"x = 1\n"),
            ]),
        ),
        (
            "ok-targz-part",
            body(&[("files", Some("job.tar.gz"), &gzip(&tar_job()))]),
        ),
        ("ok-zip-part", body(&[("files", Some("job.zip"), &zip_job())])),
        (
            "ok-stdin-part",
            body(&[("files", Some("main.py"), py), ("stdin", None, b"1 2\n\x00\xff")]),
        ),
        (
            "ok-legacy-part",
            body(&[("files", Some("up"), &legacy_job())]),
        ),
        (
            "ok-preamble-epilogue",
            [
                b"preamble\r\n".as_slice(),
                &body(&[("files", Some("run.sh"), b"echo hi\r\n--X\r\n")]),
                b"epilogue",
            ]
            .concat(),
        ),
        (
            "bad-traversal-filename",
            body(&[("files", Some("../main.py"), py)]),
        ),
        ("bad-unexpected-part", body(&[("other", None, b"x")])),
        (
            "bad-stdin-over-cap",
            body(&[("files", Some("main.py"), py), ("stdin", None, &[b'x'; 4097])]),
        ),
        (
            "bad-two-manifests",
            body(&[("manifest", None, b"{}"), ("manifest", None, b"{}")]),
        ),
        (
            "bad-endless-header",
            format!("--{BOUNDARY}\r\nX-A: {}", "a".repeat(600)).into_bytes(),
        ),
        (
            "bad-unterminated",
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"main.py\"\r\n\r\nprint(1)").into_bytes(),
        ),
        ("bad-no-entrypoint", body(&[("files", Some("x.txt"), b"x")])),
    ]
}

fn any_type_seeds() -> Seeds {
    let ct = format!("multipart/form-data; boundary={BOUNDARY}\n");
    let one = body(&[("files", Some("main.py"), b"print(1)\n")]);
    vec![
        ("ok-multipart", [ct.as_bytes(), &one].concat()),
        (
            "ok-quoted-boundary",
            [
                format!("Multipart/Form-Data; charset=utf-8; boundary=\"{BOUNDARY}\"\n").as_bytes(),
                &one,
            ]
            .concat(),
        ),
        (
            "ok-legacy-no-type",
            [b"\n".as_slice(), &legacy_job()].concat(),
        ),
        (
            "ok-legacy-octet-stream",
            [b"application/octet-stream\n".as_slice(), &legacy_job()].concat(),
        ),
        (
            "bad-no-boundary",
            [b"multipart/form-data\n".as_slice(), &one].concat(),
        ),
        ("bad-json", b"application/json\n{}".to_vec()),
        (
            "bad-wrong-boundary",
            [b"multipart/form-data; boundary=other\n".as_slice(), &one].concat(),
        ),
    ]
}

fn targz_seeds() -> Seeds {
    // First byte odd: the rest is tar bytes the harness gzips; even: the rest is gzip already.
    let raw = |tar: Vec<u8>| [vec![1u8], tar].concat();
    let mut setuid = tar_header(b"tool.sh", tar::EntryType::Regular, 0o4755, 3);
    setuid.extend_from_slice(&pad(b"ls\n"));
    vec![
        ("ok-job", raw(tar_job())),
        ("ok-gzipped-job", [vec![0u8], gzip(&tar_job())].concat()),
        ("ok-setuid-stripped", raw(finish_tar(setuid))),
        ("ok-empty", raw(finish_tar(Vec::new()))),
        (
            "bad-dotdot",
            raw(one_entry(b"../evil", tar::EntryType::Regular)),
        ),
        (
            "bad-absolute",
            raw(one_entry(b"/etc/evil", tar::EntryType::Regular)),
        ),
        (
            "bad-symlink",
            raw(one_entry(b"link", tar::EntryType::Symlink)),
        ),
        (
            "bad-hardlink",
            raw(one_entry(b"hard", tar::EntryType::Link)),
        ),
        ("bad-device", raw(one_entry(b"dev", tar::EntryType::Char))),
        ("bad-fifo", raw(one_entry(b"fifo", tar::EntryType::Fifo))),
        ("bad-not-gzip", vec![0u8, b'P', b'K', 3, 4]),
        ("bad-truncated", raw(tar_job()[..700].to_vec())),
    ]
}

fn tar_job() -> Vec<u8> {
    let mut out = tar_header(b"./", tar::EntryType::Directory, 0o755, 0);
    for (name, data) in [
        (&b"main.py"[..], &b"print('hi')\n"[..]),
        (b"job.json", br#"{"entrypoint":"main.py"}"#),
        (b"src/lib/a.py", b"A = 1\n"),
    ] {
        out.extend(tar_header(name, tar::EntryType::Regular, 0o644, data.len()));
        out.extend(pad(data));
    }
    finish_tar(out)
}

/// One raw 512-byte header: any name, type and mode (the `tar` builder refuses hostile names).
fn tar_header(name: &[u8], kind: tar::EntryType, mode: u32, size: usize) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size as u64);
    if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
        // A fixed, valid target: the entry type alone must be refused.
        let _ = h.set_link_name_literal("/etc/passwd");
    }
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn one_entry(name: &[u8], kind: tar::EntryType) -> Vec<u8> {
    let mut out = tar_header(name, kind, 0o644, 1);
    out.extend(pad(b"x"));
    finish_tar(out)
}

fn pad(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out.resize(data.len().div_ceil(512) * 512, 0);
    out
}

fn finish_tar(mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn zip_seeds() -> Seeds {
    use zip::write::SimpleFileOptions;
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let setuid = stored.unix_permissions(0o4755);
    vec![
        ("ok-job", zip_job()),
        (
            "ok-setuid-stripped",
            zip_of(&[("tool.sh", setuid, b"ls\n")]),
        ),
        ("ok-empty", zip_of(&[])),
        ("bad-zip-slip", zip_of(&[("../evil.py", stored, b"x")])),
        ("bad-absolute", zip_of(&[("/etc/evil", stored, b"x")])),
        ("bad-backslash", zip_of(&[("a\\..\\evil", stored, b"x")])),
        ("bad-symlink", zip_symlink()),
        (
            "bad-duplicate",
            duplicate_second(zip_of(&[("a.txt", stored, b"1"), ("b.txt", stored, b"2")])),
        ),
        ("bad-not-zip", b"PK\x03\x04garbage".to_vec()),
    ]
}

/// Renames `b.txt` to `a.txt` (same length) in the local header and the central directory,
/// giving a zip with a duplicate path.
fn duplicate_second(mut zip: Vec<u8>) -> Vec<u8> {
    let from: &[u8] = b"b.txt";
    let mut at = 0;
    while let Some(pos) = zip[at..].windows(from.len()).position(|w| w == from) {
        zip[at + pos..at + pos + from.len()].copy_from_slice(b"a.txt");
        at += pos + from.len();
    }
    zip
}

fn zip_job() -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let deflated =
        SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip_of(&[
        (
            "main.py",
            deflated,
            b"print('hi')\nprint('hi')\nprint('hi')\n",
        ),
        ("job.json", stored, br#"{"entrypoint":"main.py"}"#),
        ("data/in.csv", stored, b"a,b\n1,2\n"),
    ])
}

fn zip_of(entries: &[(&str, zip::write::SimpleFileOptions, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, options, data) in entries {
        // Invariant: writing into memory with fixed options only fails on a zip crate bug.
        w.start_file(*name, *options).expect("zip entry");
        w.write_all(data).expect("zip data");
    }
    w.finish().expect("zip finish").into_inner()
}

fn zip_symlink() -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    // Invariant: as in `zip_of`.
    w.add_symlink("link", "/etc/passwd", options)
        .expect("zip symlink");
    w.finish().expect("zip finish").into_inner()
}

fn legacy_job() -> Vec<u8> {
    b"----Tar\nPath: main.py\nSize: 12\n\nprint('hi')\n\n----Tar\nPath: lib/a.py\nSize: 6\n\nA = 1\n\n".to_vec()
}

fn legacy_seeds() -> Seeds {
    let zip = zip_job();
    let mut with_zip = format!("----Tar\nPath: job.zip\nSize: {}\n\n", zip.len()).into_bytes();
    with_zip.extend_from_slice(&zip);
    vec![
        ("ok-two-records", legacy_job()),
        ("ok-zip-inside", with_zip),
        (
            "ok-empty-file",
            b"----Tar\nPath: main.py\nSize: 0\n\n\n\n".to_vec(),
        ),
        (
            // The original MCP server counts Size in characters (here 11 for 13 bytes).
            "ok-size-in-characters",
            "----Tar\nPath: main.py\nSize: 11\n\nprint('éé')".as_bytes().to_vec(),
        ),
        (
            "bad-no-blank-line",
            b"----Tar\nPath: main.py\nSize: 1\nA".to_vec(),
        ),
        (
            "bad-size",
            b"----Tar\nPath: main.py\nSize: 1x\n\nA".to_vec(),
        ),
        (
            "bad-traversal",
            b"----Tar\nPath: ../main.py\nSize: 1\n\nA".to_vec(),
        ),
        ("bad-no-magic", b"---Tar\nPath: a\nSize: 1\n\nA".to_vec()),
    ]
}

fn manifest_seeds() -> Seeds {
    let seeds: [(&'static str, &str); 15] = [
        ("ok-empty", "{}"),
        ("ok-minimal", r#"{"entrypoint":"main.py"}"#),
        (
            "ok-full",
            r#"{"entrypoint":"./src/tool.rb","interpreter":"bash","environment":"python-data","args":["a","b c"],"env":{"A_1":"x","B":""},"outputs":["out/","*.png","res/**/*.csv"],"timeout":600,"memory_mb":1,"cpu_seconds":30,"requirements":[]}"#,
        ),
        ("ok-node", r#"{"entrypoint":"index.js","outputs":["**"]}"#),
        (
            "bad-ld-preload",
            r#"{"entrypoint":"main.py","env":{"LD_PRELOAD":"/x.so"}}"#,
        ),
        (
            "bad-path-env",
            r#"{"entrypoint":"main.py","env":{"PATH":"/tmp"}}"#,
        ),
        (
            "bad-huge-limit",
            r#"{"entrypoint":"main.py","memory_mb":18446744073709551615}"#,
        ),
        (
            "bad-negative-limit",
            r#"{"entrypoint":"main.py","timeout":-1}"#,
        ),
        (
            "bad-outside-entrypoint",
            r#"{"entrypoint":"../etc/passwd"}"#,
        ),
        (
            "bad-outside-output",
            r#"{"entrypoint":"main.py","outputs":["../x"]}"#,
        ),
        (
            "bad-interpreter",
            r#"{"entrypoint":"main.py","interpreter":"perl"}"#,
        ),
        (
            "bad-unknown-field",
            r#"{"entrypoint":"main.py","memory":5}"#,
        ),
        (
            "bad-requirements",
            r#"{"entrypoint":"main.py","requirements":["numpy @ https://evil/numpy.whl"]}"#,
        ),
        (
            "ok-requirements",
            r#"{"entrypoint":"main.py","requirements":["six==1.17.0","alpha>=1,<2"]}"#,
        ),
        ("bad-trailing", r#"{"entrypoint":"main.py"} x"#),
    ];
    seeds
        .into_iter()
        .map(|(name, json)| (name, json.as_bytes().to_vec()))
        .collect()
}
