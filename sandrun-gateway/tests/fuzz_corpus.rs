//! The gateway fuzz seed corpora (`sandrun-gateway/fuzz/corpus/<target>`, written by
//! `sandrun-gateway/fuzz/src/bin/gen_corpus.rs`) replayed through the fuzzers' own property
//! checks. `seed-ok-*` must be accepted and `seed-bad-*` refused, so a parser change that makes
//! the seeds stop reaching deep code (or breaks a property) fails here, not silently in CI fuzzing.

use std::path::{Path, PathBuf};

#[path = "../fuzz/src/checks.rs"]
mod checks;

type Check = fn(&[u8]) -> Result<(), String>;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading corpus directory {}: {e}", dir.display()));
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|entry| {
            let path: PathBuf = entry
                .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let data =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (name, data)
        })
        .collect();
    out.sort();
    out
}

/// Replays every seed of `target`; checks the ok/bad naming and that both kinds exist.
fn replay(target: &str, check: Check) {
    let seeds = seeds(target);
    let (mut ok, mut bad) = (0, 0);
    for (name, data) in &seeds {
        let outcome = check(data);
        if name.starts_with("seed-ok-") {
            assert!(outcome.is_ok(), "{target}/{name} refused: {outcome:?}");
            ok += 1;
        } else if name.starts_with("seed-bad-") {
            assert!(outcome.is_err(), "{target}/{name} accepted");
            bad += 1;
        }
    }
    assert!(
        ok >= 3 && bad >= 3,
        "{target}: expected at least 3 ok and 3 bad seeds, found {ok} and {bad}"
    );
}

#[test]
fn given_the_multipart_seeds_then_each_is_accepted_or_refused_as_named() {
    replay("multipart", checks::multipart);
}

#[test]
fn given_the_multipart_any_type_seeds_then_each_is_accepted_or_refused_as_named() {
    replay("multipart_any_type", checks::multipart_any_type);
}

#[test]
fn given_the_tar_gz_seeds_then_each_is_accepted_or_refused_as_named() {
    replay("archive_targz", checks::archive_targz);
}

#[test]
fn given_the_zip_seeds_then_each_is_accepted_or_refused_as_named() {
    replay("archive_zip", checks::archive_zip);
}

#[test]
fn given_the_legacy_seeds_then_each_is_accepted_or_refused_as_named() {
    replay("legacy", checks::legacy);
}

#[test]
fn given_the_manifest_seeds_then_each_is_accepted_or_refused_as_named() {
    replay("manifest", checks::manifest);
}
