//! Property tests of the codec: every message round-trips, framing is bounded, and whatever a peer
//! sends (truncated, oversized, trailing, random, or carrying a bad path) is an error, never a
//! panic and never an allocation beyond [`MAX_FRAME_BYTES`].

mod strategies;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use sandrun_ipc::codec::{decode_payload, payload_len, HEADER_BYTES};
use sandrun_ipc::{
    decode, encode, AdminRequest, BundleEntry, BundlePath, CodecError, ErrorCode, FrameDecoder,
    IpcError, JobSpec, Limits, NetworkPolicy, OutputFileHeader, OutputPattern, Request, Response,
    SkipKind, MAX_CHUNK_BYTES, MAX_FRAME_BYTES,
};
use strategies::{bad_path_string, request, response};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn given_any_request_when_encoded_then_it_decodes_equal_using_every_byte(msg in request()) {
        let frame = encode(&msg).expect("generated requests fit in a frame");
        let decoded = decode::<Request>(&frame).expect("a frame we encoded decodes");
        prop_assert_eq!(decoded, Some((msg, frame.len())));
    }

    #[test]
    fn given_any_response_when_encoded_then_it_decodes_equal_using_every_byte(msg in response()) {
        let frame = encode(&msg).expect("generated responses fit in a frame");
        let decoded = decode::<Response>(&frame).expect("a frame we encoded decodes");
        prop_assert_eq!(decoded, Some((msg, frame.len())));
    }

    #[test]
    fn given_requests_fed_in_random_splits_when_decoded_incrementally_then_all_arrive_in_order(
        msgs in vec(request(), 1..6),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        let got = feed_in_pieces::<Request>(&msgs, &cuts)?;
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn given_responses_fed_in_random_splits_when_decoded_incrementally_then_all_arrive_in_order(
        msgs in vec(response(), 1..6),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        let got = feed_in_pieces::<Response>(&msgs, &cuts)?;
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn given_a_strict_prefix_of_a_frame_then_it_is_incomplete_and_its_payload_is_refused(
        msg in request(),
    ) {
        let frame = encode(&msg).expect("generated requests fit in a frame");
        for k in 0..frame.len() {
            prop_assert_eq!(decode::<Request>(&frame[..k]), Ok(None), "prefix of {} bytes", k);
        }
        let payload = &frame[HEADER_BYTES..];
        for k in 0..payload.len() {
            prop_assert!(decode_payload::<Request>(&payload[..k]).is_err(), "payload prefix {}", k);
        }
    }

    #[test]
    fn given_a_strict_prefix_of_a_response_frame_then_its_payload_is_refused(msg in response()) {
        let frame = encode(&msg).expect("generated responses fit in a frame");
        let payload = &frame[HEADER_BYTES..];
        for k in 0..payload.len() {
            prop_assert!(decode_payload::<Response>(&payload[..k]).is_err(), "payload prefix {}", k);
        }
    }

    #[test]
    fn given_random_bytes_then_decoding_never_panics(bytes in vec(any::<u8>(), 0..512)) {
        let _ = decode::<Request>(&bytes);
        let _ = decode::<Response>(&bytes);
        let _ = decode_payload::<Request>(&bytes);
        let _ = decode_payload::<Response>(&bytes);
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        let _ = dec.next_message::<Request>();
    }

    #[test]
    fn given_random_payload_behind_a_valid_header_then_decoding_never_panics(
        payload in vec(any::<u8>(), 0..512),
    ) {
        let frame = with_header(&payload);
        // A complete frame either fails or decodes using all of it.
        let used = [
            decode::<Request>(&frame).map(|r| r.map(|(_, n)| n)),
            decode::<Response>(&frame).map(|r| r.map(|(_, n)| n)),
        ];
        for used in used.into_iter().flatten() {
            prop_assert_eq!(used, Some(frame.len()));
        }
    }

    #[test]
    fn given_a_header_above_the_maximum_then_it_is_frame_too_large_without_a_payload(
        len in (MAX_FRAME_BYTES as u64 + 1)..=u64::from(u32::MAX),
    ) {
        let len32 = u32::try_from(len).expect("the strategy stays within u32");
        let header = len32.to_le_bytes();
        prop_assert_eq!(payload_len(header), Err(CodecError::FrameTooLarge(len)));
        // Only the 4 header bytes exist: the refusal cannot have waited for (or allocated) the body.
        prop_assert_eq!(decode::<Request>(&header), Err(CodecError::FrameTooLarge(len)));
    }

    #[test]
    fn given_a_submit_whose_bundle_path_is_bad_then_decoding_refuses_it(bad in bad_path_string()) {
        let marker = marker_of_len(bad.len());
        let spec = spec_with(&marker, "out.txt");
        let frame = encode(&Request::Submit(Box::new(spec))).expect("the spec fits");
        prop_assert!(decode::<Request>(&frame).is_ok(), "the unmodified frame must decode");
        let spliced = splice(&frame, &marker, &bad);
        prop_assert!(
            matches!(decode::<Request>(&spliced), Err(CodecError::Malformed(_))),
            "bad bundle path {:?} accepted", bad
        );
    }

    #[test]
    fn given_a_submit_whose_output_pattern_is_bad_then_decoding_refuses_it(
        bad in bad_path_string().prop_filter("patterns may contain globs", |s| {
            OutputPattern::new(s.as_str()).is_err()
        }),
    ) {
        let marker = marker_of_len(bad.len());
        let spec = spec_with("main.py", &marker);
        let frame = encode(&Request::Submit(Box::new(spec))).expect("the spec fits");
        prop_assert!(decode::<Request>(&frame).is_ok(), "the unmodified frame must decode");
        let spliced = splice(&frame, &marker, &bad);
        prop_assert!(
            matches!(decode::<Request>(&spliced), Err(CodecError::Malformed(_))),
            "bad output pattern {:?} accepted", bad
        );
    }
}

#[test]
fn given_a_4_gib_header_then_it_is_frame_too_large() {
    let header = u32::MAX.to_le_bytes();
    let expected = CodecError::FrameTooLarge(u64::from(u32::MAX));
    assert_eq!(decode::<Request>(&header), Err(expected.clone()));
    let mut dec = FrameDecoder::new();
    dec.push(&header);
    assert_eq!(dec.next_message::<Response>(), Err(expected));
}

#[test]
fn given_a_header_of_exactly_the_maximum_then_it_waits_for_the_payload() {
    let len = u32::try_from(MAX_FRAME_BYTES).expect("the maximum fits in the u32 header");
    assert_eq!(payload_len(len.to_le_bytes()), Ok(MAX_FRAME_BYTES));
    assert_eq!(decode::<Request>(&len.to_le_bytes()), Ok(None));
}

#[test]
fn given_a_payload_announcing_a_huge_vector_then_it_is_refused() {
    // Variant 2 is BundleChunk; 253 introduces a u64 varint, here u64::MAX bytes.
    let mut payload = vec![2u8, 253];
    payload.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode::<Request>(&with_header(&payload)),
        Err(CodecError::Malformed(_))
    ));
    // Same, announcing just over the frame limit.
    let mut payload = vec![2u8, 252];
    let over = u32::try_from(MAX_FRAME_BYTES + 1).expect("fits in u32");
    payload.extend_from_slice(&over.to_le_bytes());
    assert!(matches!(
        decode::<Request>(&with_header(&payload)),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn given_trailing_bytes_inside_a_frame_then_they_are_refused() {
    let frame = encode(&Request::Cancel).expect("a unit variant encodes");
    let mut payload = frame[HEADER_BYTES..].to_vec();
    payload.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        decode::<Request>(&with_header(&payload)),
        Err(CodecError::TrailingBytes(3))
    );
    assert_eq!(
        decode_payload::<Request>(&payload),
        Err(CodecError::TrailingBytes(3))
    );
}

#[test]
fn given_two_frames_back_to_back_then_decode_takes_only_the_first() {
    let mut bytes = encode(&Request::BundleEnd).expect("encodes");
    let first_len = bytes.len();
    bytes.extend(encode(&Request::Cancel).expect("encodes"));
    assert_eq!(
        decode::<Request>(&bytes),
        Ok(Some((Request::BundleEnd, first_len)))
    );
}

#[test]
fn given_a_2_mib_chunk_then_encoding_refuses_it() {
    let big = vec![0u8; 2 << 20];
    for result in [
        encode(&Request::BundleChunk(big.clone())),
        encode(&Response::Stdout(big.clone())),
        encode(&Response::OutputChunk(big)),
    ] {
        assert!(
            matches!(
                result,
                Err(CodecError::Encode(_) | CodecError::FrameTooLarge(_))
            ),
            "a 2 MiB message was encoded"
        );
    }
}

#[test]
fn given_a_chunk_of_the_maximum_chunk_size_then_every_chunk_message_round_trips() {
    let chunk = vec![0xa5u8; MAX_CHUNK_BYTES];
    let req = Request::BundleChunk(chunk.clone());
    let frame = encode(&req).expect("a maximum chunk fits in a frame");
    assert_eq!(decode::<Request>(&frame), Ok(Some((req, frame.len()))));
    for resp in [
        Response::Stdout(chunk.clone()),
        Response::Stderr(chunk.clone()),
        Response::OutputChunk(chunk),
    ] {
        let frame = encode(&resp).expect("a maximum chunk fits in a frame");
        assert_eq!(decode::<Response>(&frame), Ok(Some((resp, frame.len()))));
    }
}

#[test]
fn given_a_response_with_a_bad_output_path_then_decoding_refuses_it() {
    let marker = marker_of_len(9);
    let path = BundlePath::new(marker.as_str()).expect("the marker is a valid path");
    let header = OutputFileHeader {
        path: path.clone(),
        size: 1,
        sha256: [7; 32],
    };
    let skipped = Response::OutputSkipped {
        path: (&path).into(),
        kind: SkipKind::Symlink,
    };
    // A skipped entry's path is a printable rendering, not a path: only what no rendering
    // holds (control characters) is refused there.
    let all = [
        "../../etc",
        "/etc/shad",
        "a/\0/bcdef",
        "a/./bcdef",
        "a//bcdefg",
    ];
    let unprintable = ["a/\0/bcdef", "a/\n/bcdef", "\x1b[2Jabcde"];
    for (msg, bads) in [
        (Response::OutputFile(header), &all[..]),
        (skipped, &unprintable[..]),
    ] {
        let frame = encode(&msg).expect("encodes");
        for &bad in bads {
            let spliced = splice(&frame, &marker, bad);
            assert!(
                matches!(decode::<Response>(&spliced), Err(CodecError::Malformed(_))),
                "bad output path {bad:?} accepted in {msg:?}"
            );
        }
    }
}

#[test]
fn given_every_error_code_then_numbers_and_names_are_the_documented_stable_ones() {
    let table = [
        (ErrorCode::VersionMismatch, 1, "version_mismatch"),
        (ErrorCode::NotAuthorized, 2, "not_authorized"),
        (ErrorCode::UnexpectedMessage, 3, "unexpected_message"),
        (ErrorCode::MalformedFrame, 4, "malformed_frame"),
        (ErrorCode::InvalidRequest, 5, "invalid_request"),
        (ErrorCode::Busy, 6, "busy"),
        (ErrorCode::Draining, 7, "draining"),
        (ErrorCode::NotFound, 8, "not_found"),
        (ErrorCode::SandboxSetup, 9, "sandbox_setup"),
        (ErrorCode::ExecFailed, 10, "exec_failed"),
        (ErrorCode::TemplateMissing, 11, "template_missing"),
        (ErrorCode::Internal, 99, "internal"),
    ];
    for (code, number, name) in table {
        assert_eq!((code.code(), code.as_str()), (number, name));
    }
}

#[test]
fn given_an_error_code_when_encoded_then_its_stable_number_travels_on_the_wire() {
    // The wire value is `code()`, not the enum's declaration order, so codes stay stable when
    // variants are added.
    let frame = encode(&ErrorCode::Internal).expect("encodes");
    assert_eq!(&frame[HEADER_BYTES..], &[99]);
    let frame = encode(&ErrorCode::VersionMismatch).expect("encodes");
    assert_eq!(&frame[HEADER_BYTES..], &[1]);
}

#[test]
fn given_an_unknown_error_code_on_the_wire_then_decoding_refuses_it() {
    let msg = Response::Error(IpcError::new(ErrorCode::Internal, "x"));
    let frame = encode(&msg).expect("encodes");
    // Payload: variant 10 (Error), code 99, message length 1, 'x'.
    assert_eq!(&frame[HEADER_BYTES..], &[10, 99, 1, b'x']);
    let unknown = with_header(&[10, 42, 1, b'x']);
    assert!(matches!(
        decode::<Response>(&unknown),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn given_an_admin_request_then_it_round_trips() {
    // A plain smoke test next to the properties, readable as an example of the API.
    let msg = Request::Admin(AdminRequest::Kill(sandrun_ipc::JobId(7)));
    let frame = encode(&msg).expect("encodes");
    assert_eq!(decode::<Request>(&frame), Ok(Some((msg, frame.len()))));
}

/// Encodes `msgs` back to back, cuts the stream at `cuts`, pushes the pieces one by one into a
/// [`FrameDecoder`] and pops every message as soon as it is complete.
fn feed_in_pieces<T>(msgs: &[T], cuts: &[Index]) -> Result<Vec<T>, TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let mut stream = Vec::new();
    for m in msgs {
        stream.extend(encode(m).map_err(|e| TestCaseError::fail(e.to_string()))?);
    }
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
    points.extend([0, stream.len()]);
    points.sort_unstable();
    points.dedup();
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    for w in points.windows(2) {
        dec.push(&stream[w[0]..w[1]]);
        while let Some(m) = dec
            .next_message::<T>()
            .map_err(|e| TestCaseError::fail(e.to_string()))?
        {
            got.push(m);
        }
    }
    prop_assert_eq!(dec.pending(), 0);
    Ok(got)
}

fn with_header(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("test payloads are small");
    let mut frame = len.to_le_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame
}

/// A valid path of exactly `len` bytes whose encoding can be found unambiguously.
fn marker_of_len(len: usize) -> String {
    // A '/' every 100 bytes keeps components under MAX_COMPONENT_BYTES.
    (0..len)
        .map(|i| {
            if i % 100 == 99 && i + 1 != len {
                '/'
            } else {
                'P'
            }
        })
        .collect()
}

/// Replaces the one encoded occurrence of `marker` (with its length prefix) by `replacement`,
/// which has the same byte length, so the frame stays well-formed apart from the string itself.
fn splice(frame: &[u8], marker: &str, replacement: &str) -> Vec<u8> {
    assert_eq!(
        marker.len(),
        replacement.len(),
        "splice keeps lengths equal"
    );
    let mut needle = varint(marker.len());
    needle.extend_from_slice(marker.as_bytes());
    let hits: Vec<usize> = frame
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "marker must occur exactly once");
    let start = hits[0] + needle.len() - marker.len();
    let mut out = frame.to_vec();
    out[start..start + marker.len()].copy_from_slice(replacement.as_bytes());
    out
}

/// bincode 2's variable-length encoding of a length (lengths here stay below 65536).
fn varint(n: usize) -> Vec<u8> {
    match u8::try_from(n) {
        Ok(b) if b < 251 => vec![b],
        _ => {
            let n16 = u16::try_from(n).expect("test strings are shorter than 64 KiB");
            let mut v = vec![251];
            v.extend_from_slice(&n16.to_le_bytes());
            v
        }
    }
}

fn spec_with(path: &str, pattern: &str) -> JobSpec {
    JobSpec {
        argv: vec!["/usr/bin/true".into()],
        env: vec![],
        workdir: String::new(),
        bundle: vec![BundleEntry::File {
            path: BundlePath::new(path).expect("test paths are valid"),
            mode: 0o644,
            size: 0,
        }],
        limits: Limits::default(),
        outputs: vec![OutputPattern::new(pattern).expect("test patterns are valid")],
        template: None,
        network: NetworkPolicy::None,
        label: String::new(),
        stdin_bytes: 0,
        requirements: Vec::new(),
        build: false,
    }
}

#[test]
fn given_the_hello_example_of_docs_protocol_md_then_the_bytes_match() {
    let hello = sandrun_ipc::Hello {
        protocol_version: sandrun_ipc::PROTOCOL_VERSION,
        role: sandrun_ipc::Role::Submitter,
    };
    let frame = encode(&Request::Hello(hello)).expect("encodes");
    assert_eq!(frame, [3, 0, 0, 0, 0, 8, 0]);
}
