//! The fuzz seed corpus (`ipc/fuzz/corpus/decode_frame`, written by `ipc/fuzz/src/gen_corpus.rs`)
//! stays in step with the protocol: request seeds decode as requests, response seeds as
//! responses, and edge seeds are refused or incomplete. If a message shape changes, this fails
//! until the corpus is regenerated.

use std::path::{Path, PathBuf};

use sandrun_ipc::{decode, Request, Response};
use serde::de::DeserializeOwned;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode_frame")
}

fn seeds(prefix: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir();
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading corpus directory {}: {e}", dir.display()));
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("seed-{prefix}")) {
            let bytes = std::fs::read(entry.path())
                .unwrap_or_else(|e| panic!("reading {}: {e}", entry.path().display()));
            out.push((name, bytes));
        }
    }
    out.sort();
    out
}

/// Decodes every frame of `bytes`; panics unless all of them decode and every byte is used.
fn decode_all<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> usize {
    let mut rest = bytes;
    let mut count = 0;
    while !rest.is_empty() {
        match decode::<T>(rest) {
            Ok(Some((_, used))) => rest = &rest[used..],
            other => panic!("{name}: frame {count} does not decode: {:?}", other.err()),
        }
        count += 1;
    }
    count
}

#[test]
fn given_the_request_seeds_then_each_decodes_as_requests() {
    let seeds = seeds("req-");
    assert!(
        seeds.len() >= 10,
        "request seeds missing from {}",
        corpus_dir().display()
    );
    for (name, bytes) in &seeds {
        assert!(decode_all::<Request>(name, bytes) >= 1);
    }
}

#[test]
fn given_the_response_seeds_then_each_decodes_as_responses() {
    let seeds = seeds("resp-");
    assert!(
        seeds.len() >= 12,
        "response seeds missing from {}",
        corpus_dir().display()
    );
    for (name, bytes) in &seeds {
        assert!(decode_all::<Response>(name, bytes) >= 1);
    }
}

#[test]
fn given_the_edge_seeds_then_none_decodes_as_a_complete_request() {
    let seeds = seeds("edge-");
    assert!(
        seeds.len() >= 3,
        "edge seeds missing from {}",
        corpus_dir().display()
    );
    for (name, bytes) in &seeds {
        assert!(
            !matches!(decode::<Request>(bytes), Ok(Some(_))),
            "{name} decoded"
        );
    }
}
