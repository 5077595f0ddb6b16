//! The real client address and the per-IP limits, over loopback with real clients:
//! PROXY protocol v1/v2 headers written by hand on a `TcpStream` before an HTTP
//! request or a tokio-tungstenite handshake (also before TLS), `X-Forwarded-For` /
//! `Forwarded` from trusted and untrusted peers, and `max_connections_per_ip` /
//! `max_handshakes_per_ip_per_sec` from distinct loopback addresses (127.0.0.2, …).
//!
//! Every refusal is checked for its answer, its counter
//! (`ringsocket_rejections_total{reason}`) and a control client on the same server
//! whose echo keeps working.
#![allow(clippy::unwrap_used)]

mod common;
use common::{PATIENCE, start};

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;
use ringsocket::proto::proxy::{self, ProxyAddresses};
use ringsocket::runtime::{Response, RunningServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};

type Ws = WebSocketStream<TcpStream>;

/// `/echo`, `GET /peer` (the request's client address) and `/peer` over WebSocket
/// (the session's, sent as the first message).
fn app() -> App {
    App::echo()
        .get("/peer", |req| async move {
            Response::text(200, req.peer().to_string())
        })
        .websocket("/ws-peer", |ws| async move {
            ws.accept();
            let _ = ws.send_text(ws.peer().to_string());
            while ws.recv().await.is_ok() {}
        })
}

fn rejections(server: &RunningServer, reason: &str) -> u64 {
    let series = format!("ringsocket_rejections_total{{reason=\"{reason}\"}}");
    let text = server.metrics().render();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series.as_str())?
                .strip_prefix(' ')?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// A TCP connection to `server` from the loopback address `from` (e.g. 127.0.0.2).
async fn tcp_from(server: &RunningServer, from: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    tokio::time::timeout(PATIENCE, socket.connect(server.local_addr()))
        .await
        .unwrap()
        .unwrap()
}

/// A WebSocket handshake over `stream` (after whatever the test wrote on it).
async fn ws_over(stream: TcpStream, path: &str) -> Result<Ws, tungstenite::Error> {
    tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::client_async(format!("ws://localhost{path}"), stream),
    )
    .await
    .expect("handshake timed out")
    .map(|(ws, _)| ws)
}

async fn next_text(ws: &mut Ws) -> String {
    match tokio::time::timeout(PATIENCE, ws.next()).await.unwrap() {
        Some(Ok(Message::Text(text))) => text.as_str().to_owned(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// The control client's echo still works.
async fn assert_echoes(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_text(ws).await, text);
}

/// Writes `bytes` then reads until the server closes: the whole answer.
async fn exchange(mut stream: TcpStream, bytes: &[u8]) -> String {
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    // A reset instead of a FIN (the server closed with bytes unread) is a close too.
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("the server did not close");
    String::from_utf8_lossy(&out).into_owned()
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

const GET_PEER: &[u8] = b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

fn addrs(source: &str, destination: &str) -> ProxyAddresses {
    ProxyAddresses {
        source: source.parse().unwrap(),
        destination: destination.parse().unwrap(),
    }
}

/// A control client behind a PROXY v1 header.
async fn proxied_control(server: &RunningServer) -> Ws {
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let header = proxy::encode_v1(Some(&addrs("192.0.2.200:1000", "192.0.2.1:80")));
    stream.write_all(&header).await.unwrap();
    ws_over(stream, "/echo").await.unwrap()
}

// ---- PROXY protocol ---------------------------------------------------------------------

/// A v1 header's source is the HTTP handler's `req.peer()`, also when the header comes
/// in pieces (read no further than the header: the request behind it is intact).
#[tokio::test]
async fn proxy_v1_header_names_the_client_of_an_http_request() {
    let server = start(app(), |c| c.proxy_protocol = true);
    let header = proxy::encode_v1(Some(&addrs("203.0.113.7:5555", "192.0.2.1:80")));
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let response = exchange(stream, &[&header[..], GET_PEER].concat()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(body(&response), "203.0.113.7:5555");

    // In three pieces, the last one with the request right behind the header.
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    for piece in [&header[..3], &header[3..20]] {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = exchange(stream, &[&header[20..], GET_PEER].concat()).await;
    assert_eq!(body(&response), "203.0.113.7:5555", "{response}");

    // UNKNOWN: the socket's peer stands.
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let response = exchange(stream, &[&b"PROXY UNKNOWN\r\n"[..], GET_PEER].concat()).await;
    assert!(body(&response).starts_with("127.0.0.1:"), "{response}");
    assert_eq!(rejections(&server, "proxy_protocol"), 0);
}

/// A v2 header (IPv6, with a TLV) names the WebSocket session's peer; LOCAL keeps the
/// socket's.
#[tokio::test]
async fn proxy_v2_header_names_the_client_of_a_websocket() {
    let server = start(app(), |c| c.proxy_protocol = true);
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let a = addrs("[2001:db8::42]:4711", "[2001:db8::1]:443");
    stream
        .write_all(&proxy::encode_v2(Some(&a), &[0x04, 0x00, 0x02, b'i', b'd']))
        .await
        .unwrap();
    let mut ws = ws_over(stream, "/ws-peer").await.unwrap();
    assert_eq!(next_text(&mut ws).await, "[2001:db8::42]:4711");
    assert_echoes(&mut proxied_control(&server).await, "v2").await;

    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    stream
        .write_all(&proxy::encode_v2(None, &[]))
        .await
        .unwrap();
    let mut ws = ws_over(stream, "/ws-peer").await.unwrap();
    assert!(next_text(&mut ws).await.starts_with("127.0.0.1:"));
}

/// No header, a garbage one, an over-long v1 line, a bad v2 version: the connection is
/// closed without an answer and counted; a header cut short by the handshake timeout
/// too. The control client's echo is unaffected.
#[tokio::test]
async fn missing_or_invalid_proxy_header_closes_and_counts() {
    let server = start(app(), |c| {
        c.proxy_protocol = true;
        c.handshake_timeout_secs = 1.0;
    });
    let mut control = proxied_control(&server).await;
    let mut bad_version = proxy::encode_v2(Some(&addrs("1.2.3.4:1", "5.6.7.8:2")), &[]);
    bad_version[12] = 0x31;
    let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(120));
    let cases: [&[u8]; 4] = [
        GET_PEER,
        b"\x16\x03\x01\x00\x05hello",
        long.as_bytes(),
        &bad_version,
    ];
    for (i, bytes) in cases.into_iter().enumerate() {
        let stream = TcpStream::connect(server.local_addr()).await.unwrap();
        let response = exchange(stream, bytes).await;
        assert_eq!(response, "", "case {i}: no answer");
        assert_eq!(rejections(&server, "proxy_protocol"), i as u64 + 1);
        assert_echoes(&mut control, &format!("still here {i}")).await;
    }
    // Half a header, then silence: closed at the handshake timeout.
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(exchange(stream, b"PROXY TCP4 1.2.").await, "");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(rejections(&server, "proxy_protocol"), 5);
    assert_echoes(&mut control, "after the timeout").await;
}

/// One handshake timeout bounds the PROXY header and the request head together: a
/// request head still incomplete a second after the connect gets 408 then.
#[tokio::test]
async fn the_handshake_timeout_bounds_the_proxy_header_and_the_head_together() {
    let server = start(app(), |c| {
        c.proxy_protocol = true;
        c.handshake_timeout_secs = 1.0;
    });
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    stream.write_all(&proxy::encode_v1(None)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let response = exchange(stream, b"GET /peer HTTP/1.1\r\nHost").await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

/// The header comes before the TLS ClientHello; the TLS session and the WebSocket
/// behind it see the header's address. The `plain_bind` listener beside it (inside
/// the cluster, not behind the load balancer) takes connections without a header.
#[tokio::test]
async fn proxy_header_before_tls() {
    use common::tls::TestCa;
    let ca = TestCa::new("client-addr");
    let cert = ca.server_cert("server", "client-addr");
    let server = start(app(), |c| {
        c.proxy_protocol = true;
        c.tls_cert = cert.cert.to_string_lossy().into_owned();
        c.tls_key = cert.key.to_string_lossy().into_owned();
        c.plain_bind = "127.0.0.1:0".into();
    });
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let header = proxy::encode_v2(Some(&addrs("198.51.100.23:6000", "192.0.2.1:443")), &[]);
    stream.write_all(&header).await.unwrap();
    let connector = tokio_tungstenite::Connector::Rustls(ca.client_config());
    let (mut ws, _) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::client_async_tls_with_config(
            "wss://localhost/ws-peer",
            stream,
            None,
            Some(connector),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    match tokio::time::timeout(PATIENCE, ws.next()).await.unwrap() {
        Some(Ok(Message::Text(text))) => assert_eq!(text.as_str(), "198.51.100.23:6000"),
        other => panic!("{other:?}"),
    }
    let plain = server.plain_addr().expect("a plain listener");
    let response = exchange(TcpStream::connect(plain).await.unwrap(), GET_PEER).await;
    assert!(body(&response).starts_with("127.0.0.1:"), "{response}");
    assert_eq!(rejections(&server, "proxy_protocol"), 0);
}

// ---- trusted_proxies ---------------------------------------------------------------------

/// From a trusted peer, `X-Forwarded-For` and `Forwarded` name the client.
#[tokio::test]
async fn forwarded_headers_from_a_trusted_proxy_name_the_client() {
    let server = start(app(), |c| {
        c.trusted_proxies = vec!["127.0.0.1/32".to_owned()]
    });
    let get = |header: &str| {
        format!("GET /peer HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n")
    };
    let cases = [
        ("X-Forwarded-For: 1.1.1.1, 198.51.100.9", "198.51.100.9:0"),
        (
            "Forwarded: for=\"[2001:db8:cafe::17]:4711\";proto=https",
            "[2001:db8:cafe::17]:4711",
        ),
    ];
    for (header, client) in cases {
        let stream = TcpStream::connect(server.local_addr()).await.unwrap();
        let response = exchange(stream, get(header).as_bytes()).await;
        assert_eq!(body(&response), client, "{header}: {response}");
    }
    // On a WebSocket too.
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let request =
        tungstenite::client::IntoClientRequest::into_client_request("ws://localhost/ws-peer");
    let mut request = request.unwrap();
    request
        .headers_mut()
        .insert("X-Forwarded-For", "203.0.113.50".parse().unwrap());
    stream.set_nodelay(true).unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    assert_eq!(next_text(&mut ws).await, "203.0.113.50:0");
}

/// From a peer that is not a trusted proxy, a spoofed `X-Forwarded-For` or `Forwarded`
/// changes nothing.
#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_ignored() {
    let server = start(app(), |c| c.trusted_proxies = vec!["10.0.0.0/8".to_owned()]);
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let local = stream.local_addr().unwrap();
    let request = "GET /peer HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.9\r\n\
                   Forwarded: for=198.51.100.9\r\nConnection: close\r\n\r\n";
    let response = exchange(stream, request.as_bytes()).await;
    assert_eq!(body(&response), local.to_string(), "{response}");
}

// ---- per-IP limits -----------------------------------------------------------------------

/// The third WebSocket from 127.0.0.2 gets 429 with Retry-After, counted; 127.0.0.3's
/// echo is unaffected; once one of the two closes, 127.0.0.2 may connect again.
#[tokio::test]
async fn connections_over_max_connections_per_ip_get_429() {
    let server = start(app(), |c| {
        c.ip_limits_exempt = Vec::new();
        c.max_connections_per_ip = 2;
        c.max_handshakes_per_ip_per_sec = 0;
    });
    let mut control = ws_over(tcp_from(&server, "127.0.0.3").await, "/echo")
        .await
        .unwrap();
    let first = ws_over(tcp_from(&server, "127.0.0.2").await, "/echo")
        .await
        .unwrap();
    let mut second = ws_over(tcp_from(&server, "127.0.0.2").await, "/echo")
        .await
        .unwrap();
    match ws_over(tcp_from(&server, "127.0.0.2").await, "/echo").await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            assert_eq!(response.headers()["retry-after"], "1");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // Plain HTTP counts the same way.
    let response = exchange(tcp_from(&server, "127.0.0.2").await, GET_PEER).await;
    assert!(response.starts_with("HTTP/1.1 429"), "{response}");
    assert_eq!(rejections(&server, "connections_per_ip"), 2);
    assert_echoes(&mut control, "unaffected").await;
    assert_echoes(&mut second, "the two admitted still work").await;

    // A closed connection gives its place back.
    drop(first);
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut third = loop {
        match ws_over(tcp_from(&server, "127.0.0.2").await, "/echo").await {
            Ok(ws) => break ws,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the place was not released: {e}"),
        }
    };
    assert_echoes(&mut third, "admitted again").await;
    assert_eq!(rejections(&server, "handshakes_per_ip"), 0);
}

/// Handshakes beyond the rate (burst = rate) from one address get 429, counted; the
/// control client's echo is unaffected; a second later the bucket has refilled.
#[tokio::test]
async fn handshakes_over_max_handshakes_per_ip_per_sec_get_429() {
    let server = start(app(), |c| {
        c.ip_limits_exempt = Vec::new();
        c.max_connections_per_ip = 0;
        c.max_handshakes_per_ip_per_sec = 3;
    });
    let mut control = ws_over(tcp_from(&server, "127.0.0.3").await, "/echo")
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = exchange(tcp_from(&server, "127.0.0.2").await, GET_PEER).await;
        statuses.push(response.get(9..12).unwrap_or("").to_owned());
    }
    assert_eq!(statuses[..3], ["200", "200", "200"], "{statuses:?}");
    let refused = statuses.iter().filter(|s| *s == "429").count();
    assert!(refused >= 2, "{statuses:?}");
    assert_eq!(rejections(&server, "handshakes_per_ip"), refused as u64);
    match ws_over(tcp_from(&server, "127.0.0.2").await, "/echo").await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        // Refilled in between: only on a very slow machine.
        Ok(_) => {}
        Err(e) => panic!("{e}"),
    }
    assert_echoes(&mut control, "unaffected").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = exchange(tcp_from(&server, "127.0.0.2").await, GET_PEER).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(rejections(&server, "connections_per_ip"), 0);
}

/// Behind a trusted proxy, the limit counts the forwarded client, not the proxy.
#[tokio::test]
async fn per_ip_limits_count_the_forwarded_client() {
    let server = start(app(), |c| {
        c.ip_limits_exempt = Vec::new();
        c.trusted_proxies = vec!["127.0.0.1/32".to_owned()];
        c.max_connections_per_ip = 1;
        c.max_handshakes_per_ip_per_sec = 0;
    });
    let addr = server.local_addr();
    let open = move |client: &'static str| async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut request =
            tungstenite::client::IntoClientRequest::into_client_request("ws://localhost/echo")
                .unwrap();
        request
            .headers_mut()
            .insert("X-Forwarded-For", client.parse().unwrap());
        tokio_tungstenite::client_async(request, stream)
            .await
            .map(|(ws, _)| ws)
    };
    let mut a = open("198.51.100.1").await.unwrap();
    let mut b = open("198.51.100.2").await.unwrap();
    match open("198.51.100.1").await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("expected 429, got {other:?}"),
    }
    assert_eq!(rejections(&server, "connections_per_ip"), 1);
    assert_echoes(&mut a, "a").await;
    assert_echoes(&mut b, "b").await;
}
