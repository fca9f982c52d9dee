//! Findings of the `output_pattern` fuzz target, kept as tests, and a replay of its checked-in
//! seed corpus (`ipc/fuzz/corpus/output_pattern`) through the same property checks the fuzzer
//! runs, so the harness and its seeds cannot go stale.

use std::path::{Path, PathBuf};

use sandrun_ipc::{OutputPattern, MAX_DEPTH};

#[path = "../fuzz/src/output_pattern.rs"]
mod output_pattern;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/output_pattern")
}

/// Finding 1 (fuzzing, issue 5): `**` was matched by backtracking, exponential in the number of
/// `**` components. A manifest output `**/**/…/**/x` (legal: 31 components) against a job's
/// 32-deep directory tree kept the single-threaded root helper busy for hours while it
/// collected outputs. This test does not finish without the fix.
#[test]
fn given_many_double_star_components_and_a_deep_path_then_matching_terminates_correctly() {
    let stars = vec!["**"; MAX_DEPTH - 1].join("/");
    let deep = vec!["a"; MAX_DEPTH].join("/");
    let file = OutputPattern::new(format!("{stars}/x")).expect("31 components are allowed");
    assert!(!file.matches(&deep));
    assert!(file.matches(&format!("{deep}/x")));
    let dir = OutputPattern::new(format!("{stars}/x/")).expect("a directory pattern");
    assert!(!dir.matches(&deep));
    assert!(dir.matches(&format!("{deep}/x/out.txt")));
    assert!(!dir.matches(&format!("{deep}/x")), "the directory itself");
}

/// Finding 3 (fuzzing, issue 5): the component glob compared the pattern's `*` with the name's
/// byte before treating it as a wildcard, so `*` did not select a file named `**` and `*.txt`
/// did not select `*a.txt`: outputs a job wrote were silently not returned.
#[test]
fn given_names_containing_glob_characters_then_stars_still_match_them() {
    let star = OutputPattern::new("*").expect("valid pattern");
    assert!(star.matches("**"));
    assert!(star.matches("d/*a"));
    let txt = OutputPattern::new("out/*.txt").expect("valid pattern");
    assert!(txt.matches("out/*a.txt"));
    assert!(!txt.matches("out/*a.txt.bak"));
    let q = OutputPattern::new("?").expect("valid pattern");
    assert!(q.matches("*"));
}

#[test]
fn given_the_output_pattern_seeds_then_every_property_holds() {
    let dir = corpus_dir();
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading corpus directory {}: {e}", dir.display()));
    let (mut seeds, mut matches) = (0, 0);
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
            .path();
        let data =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        matches += output_pattern::check(&data);
        seeds += 1;
    }
    assert!(
        seeds >= 10,
        "output_pattern seeds missing from {}",
        dir.display()
    );
    assert!(
        matches >= 10,
        "the seeds no longer reach the matching paths: {matches}"
    );
}
