//! The async channel (feature `tokio`) over a tokio Unix socket pair. `cargo test --workspace`
//! enables the feature through `sandrun-gateway`; alone, run `cargo test -p sandrun-ipc
//! --features tokio`.
#![cfg(feature = "tokio")]

use sandrun_ipc::tokio_adapter::{AsyncChannel, AsyncClientChannel};
use sandrun_ipc::{
    ChannelError, CodecError, Hello, JobId, Request, Response, Role, MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

type AsyncHelperChannel<S> = AsyncChannel<Response, Request, S>;

fn pair() -> (
    AsyncClientChannel<UnixStream>,
    AsyncHelperChannel<UnixStream>,
) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    (AsyncChannel::new(a), AsyncChannel::new(b))
}

fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Submitter,
    }
}

#[tokio::test]
async fn given_a_tokio_socket_pair_when_both_sides_exchange_messages_then_each_receives_them() {
    let (mut client, mut helper) = pair();
    let chunk = Request::BundleChunk(vec![3; MAX_CHUNK_BYTES]);
    let sent = vec![Request::Hello(hello()), chunk, Request::BundleEnd];
    let to_send = sent.clone();
    // A maximum chunk exceeds the socket buffer, so sending and receiving run concurrently.
    let sender = tokio::spawn(async move {
        for msg in &to_send {
            client.send(msg).await.expect("client sends");
        }
        client
    });
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        got.push(helper.recv().await.expect("helper receives"));
    }
    assert_eq!(got, sent);
    let mut client = sender.await.expect("sender task");
    let accepted = Response::Accepted {
        job_id: JobId(1),
        limits: sandrun_ipc::GrantedLimits {
            wall_ms: 1,
            memory_bytes: 2,
            cpu_ms: 3,
            pids: 4,
            output_bytes: 5,
            tmpfs_bytes: 6,
            file_count: 7,
        },
    };
    helper.send(&accepted).await.expect("helper sends");
    assert_eq!(client.recv().await.expect("client receives"), accepted);
}

#[tokio::test]
async fn given_the_peer_closes_between_frames_then_async_recv_reports_closed() {
    let (mut client, mut helper) = pair();
    helper.send(&Response::Done).await.expect("helper sends");
    drop(helper);
    assert_eq!(
        client.recv().await.expect("the last frame arrives"),
        Response::Done
    );
    assert!(matches!(client.recv().await, Err(ChannelError::Closed)));
}

#[tokio::test]
async fn given_the_peer_closes_mid_frame_then_async_recv_is_an_eof_error() {
    let (mut client, helper) = pair();
    let mut raw = helper.into_inner();
    let frame = sandrun_ipc::encode(&Response::Stderr(b"oops".to_vec())).expect("encodes");
    raw.write_all(&frame[..frame.len() - 1])
        .await
        .expect("write a truncated frame");
    drop(raw);
    match client.recv().await {
        Err(ChannelError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("expected an EOF error, got {other:?}"),
    }
}

#[tokio::test]
async fn given_a_peer_announcing_a_4_gib_frame_then_async_recv_refuses_it_from_the_header() {
    let (client, mut helper) = pair();
    let mut raw = client.into_inner();
    raw.write_all(&u32::MAX.to_le_bytes())
        .await
        .expect("write header");
    match helper.recv().await {
        Err(ChannelError::Codec(CodecError::FrameTooLarge(n))) => {
            assert_eq!(n, u64::from(u32::MAX));
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
}
