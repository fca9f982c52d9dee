//! WebSocket `/ws/{id}` and `/stream/{id}`: live output while the job runs, backlog for late
//! subscribers, ping/pong, close after exit.

mod support;

use futures_util::{SinkExt, StreamExt};
use hyper::StatusCode;
use support::{read_events, websocket, TestGateway};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn given_line_before_two_second_sleep_then_it_reaches_the_socket_while_job_still_runs() {
    let gw = TestGateway::start().await;
    let id = gw
        .submit_script("out before sleep\nsleep 2000\nout after sleep")
        .await;
    let mut ws = websocket(&gw, &format!("/ws/{id}")).await;
    loop {
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("socket ended early")
        };
        let event: serde_json::Value = serde_json::from_str(&text).unwrap();
        if event["type"] == "stdout" {
            assert_eq!(event["data"], "before sleep\n");
            break;
        }
        assert_eq!(event["type"], "status", "{event}");
    }
    // The job is still sleeping inside the helper: the line arrived live, not after exit.
    let status = gw.get(&format!("/status/{id}")).await.json();
    assert_eq!(status["status"], "running");
    let rest = read_events(&mut ws).await;
    let kinds: Vec<&str> = rest.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["stdout", "exit"]);
    assert_eq!(rest[0]["data"], "after sleep\n");
    assert_eq!(rest[1]["status"], "completed");
    assert_eq!(rest[1]["exit_code"], 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn given_finished_job_when_late_subscriber_connects_then_it_gets_the_whole_backlog() {
    let gw = TestGateway::start().await;
    let id = gw
        .submit_script("out one\nerr two\nout three\nexit 1")
        .await;
    gw.wait_finished(&id).await;
    let mut ws = websocket(&gw, &format!("/stream/{id}")).await;
    let events = read_events(&mut ws).await;
    let summary: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["type"].as_str().unwrap(),
                e["data"].as_str().or(e["status"].as_str()).unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            "status:queued",
            "status:running",
            "stdout:one\n",
            "stderr:two\n",
            "stdout:three\n",
            "exit:failed"
        ]
    );
    assert_eq!(events.last().unwrap()["exit_code"], 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn given_ping_then_pong_is_answered_with_the_same_payload() {
    let gw = TestGateway::start().await;
    let id = gw.submit_script("sleep 1500\nout done").await;
    let mut ws = websocket(&gw, &format!("/ws/{id}")).await;
    ws.send(Message::Ping(b"are you there".to_vec()))
        .await
        .unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Pong(payload))) => {
                assert_eq!(payload, b"are you there");
                break;
            }
            Some(Ok(Message::Text(_))) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    let events = read_events(&mut ws).await;
    assert_eq!(events.last().unwrap()["type"], "exit");
    gw.shutdown().await;
}

#[tokio::test]
async fn given_unknown_job_then_websocket_path_is_404_json() {
    let gw = TestGateway::start().await;
    let reply = gw.get("/ws/0123456789abcdef0123456789abcdef").await;
    reply.assert_error(StatusCode::NOT_FOUND);
    let id = gw.submit_script("out x").await;
    let reply = gw.get(&format!("/ws/{id}")).await;
    let message = reply.assert_error(StatusCode::BAD_REQUEST);
    assert!(message.contains("WebSocket"), "{message}");
    gw.shutdown().await;
}

/// The stdout events' `data` and `data_base64` fields, in order.
fn stdout_fields(events: &[serde_json::Value]) -> Vec<(String, Vec<u8>)> {
    use base64::Engine;
    events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| {
            let text = e["data"].as_str().unwrap().to_owned();
            let b64 = e["data_base64"].as_str().unwrap();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            (text, bytes)
        })
        .collect()
}

#[tokio::test]
async fn given_a_char_split_between_chunks_then_text_carries_it_whole_and_base64_has_the_exact_bytes(
) {
    let gw = TestGateway::start().await;
    // "a" + the first two bytes of U+1F600, then its last two bytes + "b" + an invalid byte,
    // then a stderr line, then a truncated U+20AC that never completes.
    let id = gw
        .submit_script("outhex 61f09f\nouthex 988062ff\nerr e\nouthex e282")
        .await;
    gw.wait_finished(&id).await;
    let mut ws = websocket(&gw, &format!("/ws/{id}")).await;
    let events = read_events(&mut ws).await;
    let expected: Vec<(String, Vec<u8>)> = vec![
        ("a".into(), b"a\xf0\x9f".to_vec()),
        ("\u{1F600}b\u{FFFD}".into(), b"\x98\x80b\xff".to_vec()),
        (String::new(), b"\xe2\x82".to_vec()),
        // Flushed before `exit`: the text of the incomplete sequence, no new bytes.
        ("\u{FFFD}".into(), Vec::new()),
    ];
    assert_eq!(stdout_fields(&events), expected, "{events:?}");
    let stderr: Vec<&serde_json::Value> = events.iter().filter(|e| e["type"] == "stderr").collect();
    assert_eq!(stderr.len(), 1);
    assert_eq!(stderr[0]["data"], "e\n");
    assert_eq!(stderr[0]["data_base64"], "ZQo=");
    assert_eq!(events.last().unwrap()["type"], "exit");
    gw.shutdown().await;
}

#[tokio::test]
async fn given_a_finished_job_then_the_socket_closes_with_code_1000() {
    let gw = TestGateway::start().await;
    let id = gw.submit_script("out done").await;
    gw.wait_finished(&id).await;
    let mut ws = websocket(&gw, &format!("/ws/{id}")).await;
    let mut close = None;
    while let Some(msg) = ws.next().await {
        if let Message::Close(frame) = msg.unwrap() {
            close = Some(frame);
            break;
        }
    }
    let frame = close
        .expect("a close frame")
        .expect("with a code, not 1005");
    assert_eq!(u16::from(frame.code), 1000, "{frame:?}");
    gw.shutdown().await;
}
