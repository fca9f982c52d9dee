//! The blocking channel over a real Unix socket pair: typed send/receive, clean close, truncated
//! frames and oversized headers.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread;

use sandrun_ipc::blocking::{ClientChannel, HelperChannel};
use sandrun_ipc::{
    ChannelError, CodecError, ExitReason, ExitReport, Hello, Request, Response, Role,
    MAX_CHUNK_BYTES, PROTOCOL_VERSION,
};

fn pair() -> (ClientChannel<UnixStream>, HelperChannel<UnixStream>) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    (ClientChannel::new(a), HelperChannel::new(b))
}

fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Submitter,
    }
}

#[test]
fn given_a_socket_pair_when_both_sides_exchange_messages_then_each_receives_the_others_kind() {
    let (mut client, mut helper) = pair();
    // Large chunks exceed the socket buffer, so the helper side runs in its own thread.
    let helper_side = thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(helper.recv().expect("helper receives a request"));
        }
        helper
            .send(&Response::Hello(hello()))
            .expect("helper sends");
        helper
            .send(&Response::Stdout(vec![1; MAX_CHUNK_BYTES]))
            .expect("helper sends");
        got
    });
    let chunk = Request::BundleChunk(vec![9; MAX_CHUNK_BYTES]);
    let sent = vec![Request::Hello(hello()), chunk, Request::BundleEnd];
    for msg in &sent {
        client.send(msg).expect("client sends");
    }
    assert_eq!(
        client.recv().expect("client receives"),
        Response::Hello(hello())
    );
    assert_eq!(
        client.recv().expect("client receives"),
        Response::Stdout(vec![1; MAX_CHUNK_BYTES])
    );
    assert_eq!(helper_side.join().expect("helper thread"), sent);
}

#[test]
fn given_the_peer_closes_between_frames_then_recv_reports_closed() {
    let (mut client, mut helper) = pair();
    let exited = Response::Exited(ExitReport {
        exit_code: Some(0),
        signal: None,
        reason: ExitReason::None,
        cpu_ms: 1,
        wall_ms: 2,
        memory_peak_bytes: 3,
        stdout_truncated: false,
        stderr_truncated: false,
        template_lock: None,
        requirements: None,
    });
    helper.send(&exited).expect("helper sends");
    drop(helper);
    assert_eq!(
        client.recv().expect("the frame before the close arrives"),
        exited
    );
    assert!(matches!(client.recv(), Err(ChannelError::Closed)));
}

#[test]
fn given_the_peer_closes_inside_the_header_then_recv_is_an_eof_error_not_closed() {
    let (mut client, helper) = pair();
    let mut raw = helper.into_inner();
    raw.write_all(&[5, 0]).expect("write half a header");
    drop(raw);
    match client.recv() {
        Err(ChannelError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("expected an EOF error, got {other:?}"),
    }
}

#[test]
fn given_the_peer_closes_inside_the_payload_then_recv_is_an_eof_error_not_closed() {
    let (mut client, helper) = pair();
    let mut raw = helper.into_inner();
    let frame = sandrun_ipc::encode(&Response::Stdout(b"hello".to_vec())).expect("encodes");
    raw.write_all(&frame[..frame.len() - 2])
        .expect("write a truncated frame");
    drop(raw);
    match client.recv() {
        Err(ChannelError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("expected an EOF error, got {other:?}"),
    }
}

#[test]
fn given_a_peer_announcing_a_4_gib_frame_then_recv_refuses_it_from_the_header_alone() {
    let (client, mut helper) = pair();
    let mut raw = client.into_inner();
    // Only the header is sent and the socket stays open: a reader that waited for (or allocated)
    // the announced payload would block here instead of failing.
    raw.write_all(&u32::MAX.to_le_bytes())
        .expect("write header");
    match helper.recv() {
        Err(ChannelError::Codec(CodecError::FrameTooLarge(n))) => {
            assert_eq!(n, u64::from(u32::MAX));
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
}

#[test]
fn given_a_response_sent_to_the_helper_then_it_does_not_decode_as_a_request() {
    // The channel types make this impossible to write by mistake; this checks that a peer
    // which does it anyway (writing raw bytes) is refused rather than misread.
    let (client, mut helper) = pair();
    let mut raw = client.into_inner();
    let frame = sandrun_ipc::encode(&Response::Done).expect("encodes");
    raw.write_all(&frame).expect("write");
    assert!(matches!(
        helper.recv(),
        Err(ChannelError::Codec(CodecError::Malformed(_)))
    ));
}
