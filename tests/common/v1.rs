//! A `ringsocket.v1` client for the tests: tokio-tungstenite with the subprotocol,
//! JSON frames, requests matched to their replies by id.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{Client, PATIENCE};

/// Opens `ws://{addr}/v1{query}` offering `ringsocket.v1`, and checks it was chosen.
pub async fn v1(addr: SocketAddr, query: &str) -> Client {
    let mut request = format!("ws://{addr}/v1{query}")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "ringsocket.v1".parse().unwrap());
    let (client, response) =
        tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect timed out")
            .expect("handshake failed");
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "ringsocket.v1"
    );
    client
}

pub async fn send(client: &mut Client, frame: Value) {
    client
        .send(WsMessage::text(frame.to_string()))
        .await
        .unwrap();
}

/// The next frame as JSON, failing on timeout or close.
pub async fn next(client: &mut Client) -> Value {
    loop {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("stream ended")
            .expect("read failed");
        if let WsMessage::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
        assert!(!message.is_binary(), "a binary frame on ringsocket.v1");
    }
}

/// Sends a request and returns its reply (the next frame with its id).
pub async fn request(client: &mut Client, frame: Value) -> Value {
    let id = frame["id"].clone();
    send(client, frame).await;
    loop {
        let reply = next(client).await;
        if reply["id"] == id {
            return reply;
        }
        assert_eq!(reply["type"], "pub", "unexpected frame {reply}");
    }
}

pub async fn subscribe(
    client: &mut Client,
    id: u64,
    topic: &str,
    since: Option<(u64, &str)>,
) -> Value {
    let mut frame = json!({"id": id, "type": "subscribe", "topic": topic});
    if let Some((offset, epoch)) = since {
        frame["since"] = json!({"offset": offset, "epoch": epoch});
    }
    let reply = request(client, frame).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

/// `POST /publish/{topic}` with `body`, answered 202.
pub async fn publish_http(addr: SocketAddr, topic: &str, body: &str) {
    let response = super::http_exchange(
        addr,
        format!(
            "POST /publish/{topic} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
}

/// The offsets and data of the next `n` publications.
pub async fn publications(client: &mut Client, n: usize) -> Vec<(u64, String, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        let frame = next(client).await;
        assert_eq!(frame["type"], "pub", "{frame}");
        out.push((
            frame["offset"].as_u64().unwrap(),
            frame["epoch"].as_str().unwrap().to_owned(),
            frame["data"].clone(),
        ));
    }
    out
}
