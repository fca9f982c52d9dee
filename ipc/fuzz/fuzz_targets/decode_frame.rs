//! Fuzz target: arbitrary bytes from a peer, decoded as a stream of frames by [`FrameDecoder`],
//! as both [`Request`] (what the helper reads) and [`Response`] (what the gateway reads).
//!
//! Properties: decoding never panics, and every message that decodes re-encodes to a frame that
//! decodes to an equal message.
//!
//! Under `cargo fuzz run decode_frame` this is a libFuzzer target. Built with plain `cargo build`
//! it is a replay tool: `decode_frame FILE_OR_DIR...` (or bytes on stdin) runs every input
//! through the same check.
#![cfg_attr(fuzzing, no_main)]

use std::fmt::Debug;

use sandrun_ipc::{decode, encode, FrameDecoder, Request, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check(data);
});

/// Runs one input through both message types; returns how many messages decoded.
fn check(data: &[u8]) -> usize {
    check_as::<Request>(data) + check_as::<Response>(data)
}

fn check_as<T>(data: &[u8]) -> usize
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    // The first byte picks where the stream is cut, so incremental decoding is exercised too.
    let split = data
        .first()
        .map_or(0, |b| usize::from(*b) % (data.len() + 1));
    let mut dec = FrameDecoder::new();
    let mut count = 0;
    for piece in [&data[..split], &data[split..]] {
        dec.push(piece);
        loop {
            match dec.next_message::<T>() {
                Ok(Some(msg)) => {
                    assert_reencodes(&msg);
                    count += 1;
                }
                Ok(None) => break,
                // After an error the stream is unusable; a real peer would be disconnected.
                Err(_) => return count,
            }
        }
    }
    count
}

fn assert_reencodes<T>(msg: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    // A message that decoded from at most MAX_FRAME_BYTES re-encodes canonically, never larger.
    let frame = match encode(msg) {
        Ok(f) => f,
        Err(e) => panic!("decoded message does not re-encode: {e}: {msg:?}"),
    };
    match decode::<T>(&frame) {
        Ok(Some((again, used))) => {
            assert_eq!(used, frame.len(), "re-encoded frame not fully used");
            assert_eq!(&again, msg, "re-encoded message differs");
        }
        other => panic!("re-encoded frame does not decode: {other:?}"),
    }
}

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    replay::run(check)
}

#[cfg(not(fuzzing))]
mod replay {
    use std::io::Read;
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;

    /// Feeds every file named on the command line (directories: every file inside) to `check`,
    /// or stdin when there are no arguments.
    pub fn run(check: fn(&[u8]) -> usize) -> ExitCode {
        let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
        if args.is_empty() {
            let mut data = Vec::new();
            if let Err(e) = std::io::stdin().read_to_end(&mut data) {
                eprintln!("decode_frame: reading stdin: {e}");
                return ExitCode::FAILURE;
            }
            println!("stdin: {} message(s)", check(&data));
            return ExitCode::SUCCESS;
        }
        let (mut inputs, mut messages) = (0usize, 0usize);
        for arg in &args {
            match files_of(arg) {
                Ok(files) => {
                    for file in files {
                        match std::fs::read(&file) {
                            Ok(data) => {
                                messages += check(&data);
                                inputs += 1;
                            }
                            Err(e) => eprintln!("decode_frame: reading {}: {e}", file.display()),
                        }
                    }
                }
                Err(e) => {
                    eprintln!("decode_frame: listing {}: {e}", arg.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        println!("replayed {inputs} input(s), {messages} message(s) decoded and re-encoded");
        ExitCode::SUCCESS
    }

    fn files_of(path: &Path) -> std::io::Result<Vec<PathBuf>> {
        if !path.is_dir() {
            return Ok(vec![path.to_path_buf()]);
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                files.push(entry.path());
            }
        }
        files.sort();
        Ok(files)
    }
}
