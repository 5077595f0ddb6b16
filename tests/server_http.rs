//! The server over loopback, before any WebSocket frame: HTTP routes, keep-alive, body
//! limits, the built-in routes, every refusal of an opening handshake with its status,
//! the handshake deadline and `max_connections`.
//!
//! Each test starts its own server on port 0 and talks to it with a plain blocking
//! `TcpStream` that writes request bytes by hand, so malformed requests are easy to
//! send and nothing of ours parses the answers. Every read is bounded by a 5 s socket
//! timeout; waits on the server's counters poll with a deadline.
// Tests unwrap values they built themselves (as `src/lib.rs` allows for unit tests).
#![allow(clippy::unwrap_used)]

mod common;
use common::start;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringsocket::app::App;
use ringsocket::config::Config;

use ringsocket::runtime::{Response, RunningServer};

/// The longest any single read or wait may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(5);

/// The sample key of RFC 6455 §1.3.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

// ---- opening handshake refusals ---------------------------------------------------------

/// RFC 6455 §4.2.1 item 3: no `Upgrade: websocket` is a bad request.
#[test]
fn handshake_without_upgrade_header_is_refused_with_400() {
    let server = start(App::echo(), |_| {});
    let response = refusal(&server, &handshake("GET", "/echo", &[("Upgrade", None)]));
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(metric(&server, "ringsocket_websocket_upgrades_total"), 0);
}

/// RFC 6455 §4.2.1 item 5: a key that is not base64 of 16 bytes is a bad request.
#[test]
fn handshake_with_bad_websocket_key_is_refused_with_400() {
    let server = start(App::echo(), |_| {});
    for key in ["c2hvcnQ=", "not base64!", ""] {
        let head = handshake("GET", "/echo", &[("Sec-WebSocket-Key", Some(key))]);
        let response = refusal(&server, &head);
        assert_eq!(response.status, 400, "key {key:?}: {response:?}");
    }
}

/// RFC 6455 §4.4: an unsupported version gets 426 and the versions we speak.
#[test]
fn handshake_with_version_8_is_refused_with_426_naming_version_13() {
    let server = start(App::echo(), |_| {});
    let head = handshake("GET", "/echo", &[("Sec-WebSocket-Version", Some("8"))]);
    let response = refusal(&server, &head);
    assert_eq!(response.status, 426, "{response:?}");
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
}

/// RFC 6455 §4.1: the handshake is a GET; anything else is 405.
#[test]
fn handshake_with_post_is_refused_with_405() {
    let server = start(App::echo(), |_| {});
    let response = refusal(&server, &handshake("POST", "/echo", &[]));
    assert_eq!(response.status, 405, "{response:?}");
    assert_eq!(response.header("allow"), Some("GET"));
}

/// A request head over `max_head_bytes` is refused with 431 and counted as a limit hit.
#[test]
fn request_head_over_max_head_bytes_is_refused_with_431() {
    let server = start(App::echo(), |c| c.max_head_bytes = 1024);
    let padding = "a".repeat(2000);
    let head = handshake("GET", "/echo", &[("X-Padding", Some(&padding))]);
    let response = refusal(&server, &head);
    assert_eq!(response.status, 431, "{response:?}");
    assert_eq!(
        metric(
            &server,
            "ringsocket_limit_hits_total{limit=\"max_head_bytes\"}"
        ),
        1
    );
}

/// A handshake for a path no route matches is 404.
#[test]
fn handshake_for_unknown_path_is_refused_with_404() {
    let server = start(App::echo(), |_| {});
    let response = exchange(&server, &handshake("GET", "/nowhere", &[]));
    assert_eq!(response.status, 404, "{response:?}");
}

/// A typed path parameter that does not parse is answered with 400 by the router,
/// before the upgrade and before the handler runs; one that parses is upgraded.
#[test]
fn typed_path_param_that_does_not_parse_is_refused_with_400_before_the_handler_runs() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let app = App::new().websocket("/ws/{id:u64}", move |ws| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            ws.accept();
            while ws.recv().await.is_ok() {}
        }
    });
    let server = start(app, |_| {});
    let response = exchange(&server, &handshake("GET", "/ws/abc", &[]));
    assert_eq!(response.status, 400, "{response:?}");
    let body = String::from_utf8_lossy(&response.body);
    assert!(body.contains("id") && body.contains("u64"), "{body}");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler ran");

    let mut ok = HttpClient::connect(server.local_addr());
    ok.send(handshake("GET", "/ws/42", &[]));
    assert_eq!(ok.response().status, 101);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A handler that calls `reject(403, ..)` sends 403 with its reason, and no upgrade.
#[test]
fn handler_reject_403_refuses_the_handshake() {
    let app = App::new().websocket("/private", |ws| async move {
        ws.reject(403, "members only");
    });
    let server = start(app, |_| {});
    let response = refusal(&server, &handshake("GET", "/private", &[]));
    assert_eq!(response.status, 403, "{response:?}");
    assert_eq!(response.body, b"members only\n");
    assert_eq!(metric(&server, "ringsocket_websocket_upgrades_total"), 0);
    assert_eq!(
        metric(&server, "ringsocket_rejections_total{status=\"403\"}"),
        1
    );
}

/// A handler that calls `recv()` before `accept()` gets `Disconnect::NotAccepted` at
/// once instead of waiting for a message that cannot come; when it then returns
/// without deciding, the client gets 403 at once, not 503 at the handshake timeout.
#[test]
fn recv_before_accept_is_an_immediate_error_and_the_client_gets_403() {
    let (tx, rx) = std::sync::mpsc::channel();
    let app = App::new().websocket("/forgot", move |ws| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ws.recv().await.map(|_| ()));
        }
    });
    let server = start(app, |_| {});
    let started = Instant::now();
    let response = refusal(&server, &handshake("GET", "/forgot", &[]));
    assert_eq!(response.status, 403, "{response:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered after the handshake timeout"
    );
    assert_eq!(
        rx.recv_timeout(PATIENCE).unwrap(),
        Err(ringsocket::runtime::Disconnect::NotAccepted)
    );
}

/// A route pattern with an unsupported parameter type is not a panic: the server
/// refuses to start with an error that lists the supported types.
#[test]
fn an_unsupported_route_parameter_type_stops_the_start_listing_the_supported_ones() {
    let app = App::new().websocket("/users/{id:usize}", |ws| async move { ws.accept() });
    let err = app.check().unwrap_err();
    assert_eq!(err.pattern, "/users/{id:usize}");
    let mut config = Config::default();
    config.bind = "127.0.0.1:0".parse().unwrap();
    let err = ringsocket::runtime::Server::start(config, Arc::new(app)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: route pattern \"/users/{id:usize}\": unknown parameter \
         type \"usize\" for {id} (supported: str, u64, i64, u32, i32, f64, bool)"
    );
}

// ---- HTTP routes ------------------------------------------------------------------------

#[test]
fn get_route_answers_with_its_path_parameter() {
    let server = start(http_app(), |_| {});
    let response = request(&server, "GET /hello/world HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, b"hello world");
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
}

#[test]
fn post_route_receives_the_content_length_body() {
    let server = start(http_app(), |_| {});
    let response = request(
        &server,
        "POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello there",
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, b"hello there");
}

/// A body that arrives in pieces, after the head, is read to its `Content-Length`.
#[test]
fn post_body_sent_after_the_head_is_read_to_its_length() {
    let server = start(http_app(), |_| {});
    let body = "x".repeat(100_000);
    let mut client = HttpClient::connect(server.local_addr());
    client.send(format!(
        "POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ));
    for piece in body.as_bytes().chunks(30_000) {
        client.send(piece);
    }
    let response = client.response();
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, body.as_bytes());
}

/// HTTP/1.1 keeps the connection open: requests one after the other, and pipelined
/// (a POST with its body, then a GET, in one write), are all answered in order.
#[test]
fn keep_alive_answers_several_requests_on_one_connection() {
    let server = start(http_app(), |_| {});
    let mut client = HttpClient::connect(server.local_addr());
    client.send("GET /hello/one HTTP/1.1\r\nHost: x\r\n\r\n");
    let first = client.response();
    assert_eq!((first.status, &first.body[..]), (200, &b"hello one"[..]));
    assert_eq!(first.header("connection"), None, "{first:?}");
    client.send("GET /hello/two HTTP/1.1\r\nHost: x\r\n\r\n");
    let second = client.response();
    assert_eq!((second.status, &second.body[..]), (200, &b"hello two"[..]));

    client.send(
        "POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
         GET /hello/three HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let third = client.response();
    assert_eq!((third.status, &third.body[..]), (200, &b"abc"[..]));
    let fourth = client.response();
    assert_eq!(
        (fourth.status, &fourth.body[..]),
        (200, &b"hello three"[..])
    );
    assert_eq!(metric(&server, "ringsocket_connections_accepted_total"), 1);
}

/// `Connection: close` is answered with `Connection: close`, and then the server
/// closes the connection.
#[test]
fn connection_close_is_honoured() {
    let server = start(http_app(), |_| {});
    let mut client = HttpClient::connect(server.local_addr());
    client.send("GET /hello/bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let response = client.response();
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("connection"), Some("close"));
    client.assert_closed();
}

/// A `Content-Length` over `max_body_bytes` is refused with 413 before the body is read.
#[test]
fn body_over_max_body_bytes_is_refused_with_413() {
    let server = start(http_app(), |c| c.max_body_bytes = 1024);
    let mut client = HttpClient::connect(server.local_addr());
    client.send("POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n");
    let response = client.response();
    assert_eq!(response.status, 413, "{response:?}");
    client.assert_closed();
    assert_eq!(
        metric(
            &server,
            "ringsocket_limit_hits_total{limit=\"max_body_bytes\"}"
        ),
        1
    );
}

/// Chunked request bodies are not supported: 411, send `Content-Length`.
#[test]
fn chunked_body_is_refused_with_411() {
    let server = start(http_app(), |_| {});
    let mut client = HttpClient::connect(server.local_addr());
    client.send("POST /echo-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    let response = client.response();
    assert_eq!(response.status, 411, "{response:?}");
    client.assert_closed();
}

/// A method the route does not have is 405 with `Allow` listing those it has.
#[test]
fn wrong_method_on_existing_route_is_405_with_allow() {
    let server = start(http_app(), |_| {});
    let response = request(&server, "POST /hello/x HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(response.status, 405, "{response:?}");
    assert_eq!(response.header("allow"), Some("GET"));
    let response = request(&server, "DELETE /echo-body HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(response.status, 405, "{response:?}");
    assert_eq!(response.header("allow"), Some("POST"));
}

#[test]
fn unknown_http_path_is_404() {
    let server = start(http_app(), |_| {});
    let response = request(&server, "GET /nothing/here HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(response.status, 404, "{response:?}");
}

#[test]
fn healthz_answers_200() {
    let server = start(http_app(), |_| {});
    let response = request(&server, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, b"ok\n");
}

#[test]
fn metrics_route_exposes_the_counters() {
    let server = start(http_app(), |_| {});
    let response = request(&server, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = String::from_utf8(response.body).unwrap();
    // The scraping connection itself is open while the page is rendered.
    assert!(text.contains("\nringsocket_connections_open 1\n"), "{text}");
    assert!(
        text.contains("ringsocket_connections_accepted_total 1"),
        "{text}"
    );
    // Every family of the page: the workers', the executor's, the hub's, the process's.
    let backend = server.backend().name();
    for line in [
        "# TYPE ringsocket_connections_accepted counter",
        "ringsocket_tasks_queued 0",
        "ringsocket_pubsub_topics 0",
        "ringsocket_handler_panics_total{kind=\"http\"} 0",
        &format!(
            "ringsocket_build_info{{version=\"{}\",io_backend=\"{backend}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        &format!("ringsocket_info{{io_backend=\"{backend}\"}} 1"),
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        let value: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        assert!(value >= 0.0, "{name} {value}");
    }
    // OpenMetrics: the page ends with the end marker, and nothing follows it.
    assert!(text.ends_with("\n# EOF\n"), "{text}");
}

/// Successes are counted as responses, by status, and never as rejections; a refusal
/// is counted in both.
#[test]
fn successes_count_as_responses_and_not_as_rejections() {
    let app = http_app().post(
        "/later",
        |_req| async move { Response::text(202, "queued\n") },
    );
    let server = start(app, |_| {});
    let rejections = |server: &RunningServer| -> u64 {
        let text = server.metrics().render();
        text.lines()
            .filter(|l| l.starts_with("ringsocket_rejections_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum()
    };
    let ok = request(&server, "GET /hello/x HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(ok.status, 200, "{ok:?}");
    let later = request(
        &server,
        "POST /later HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(later.status, 202, "{later:?}");
    assert_eq!(
        metric(&server, "ringsocket_http_responses_total{status=\"200\"}"),
        1
    );
    assert_eq!(
        metric(&server, "ringsocket_http_responses_total{status=\"202\"}"),
        1
    );
    assert_eq!(rejections(&server), 0);
    let text = server.metrics().render();
    assert!(
        !text.contains("ringsocket_rejections_total{status=\"20"),
        "a success has a rejections series:\n{text}"
    );

    let missing = request(&server, "GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(missing.status, 404, "{missing:?}");
    assert_eq!(
        metric(&server, "ringsocket_http_responses_total{status=\"404\"}"),
        1
    );
    assert_eq!(
        metric(&server, "ringsocket_rejections_total{status=\"404\"}"),
        1
    );
    assert_eq!(rejections(&server), 1);
}

// ---- deadlines and limits ---------------------------------------------------------------

/// A client that sends half a request head (or nothing) is cut off with 408 once
/// `handshake_timeout_secs` has passed, not before and not much after (accepts not
/// deferred, so the silent one is accepted at once).
#[test]
fn incomplete_request_head_is_cut_off_at_the_handshake_timeout() {
    let server = start(App::echo(), |c| {
        c.handshake_timeout_secs = 0.5;
        c.defer_accept_secs = 0;
    });
    let mut half = HttpClient::connect(server.local_addr());
    let mut silent = HttpClient::connect(server.local_addr());
    let started = Instant::now();
    half.send("GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n");
    for client in [&mut half, &mut silent] {
        let answer = client.read_to_end();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(2),
            "cut off after {elapsed:?}"
        );
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408 "),
            "{text:?}"
        );
    }
    both_closed_by_the_handshake_timeout(&server);
}

/// With deferred accepts (the default, 1 s), a silent client is held by the kernel,
/// not the server: it is not an open connection until the deferral ends, and is then
/// cut off by the handshake timeout like any other. One that sends half a head is
/// accepted at once and cut off on time.
#[test]
fn silent_client_is_handed_over_after_the_accept_deferral_then_timed_out() {
    let server = start(App::echo(), |c| c.handshake_timeout_secs = 0.5);
    assert_eq!(Config::default().defer_accept_secs, 1);
    let mut silent = HttpClient::connect(server.local_addr());
    let mut half = HttpClient::connect(server.local_addr());
    let started = Instant::now();
    half.send("GET /echo HTTP/1.1\r\nHost: x\r\n");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        server.metrics().open_connections(),
        1,
        "only the client that sent bytes is accepted"
    );
    let answer = half.read_to_end();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_millis(1500),
        "half a head cut off after {elapsed:?}"
    );
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408 "));
    let answer = silent.read_to_end();
    let elapsed = started.elapsed();
    // About 1 s (one SYN-ACK retransmission) of deferral, then the 0.5 s timeout.
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "silent client cut off after {elapsed:?}"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408 "),
        "{text:?}"
    );
    both_closed_by_the_handshake_timeout(&server);
}

/// Waits until no connection is open, then checks that two were closed by the
/// handshake timeout.
fn both_closed_by_the_handshake_timeout(server: &RunningServer) {
    wait_until("both connections counted closed", || {
        server.metrics().open_connections() == 0
    });
    assert_eq!(
        metric(
            server,
            "ringsocket_connections_closed_total{reason=\"handshake_timeout\"}"
        ),
        2
    );
}

/// With `max_connections = 2` and two WebSockets open, a third connection gets 503
/// (with `Retry-After`) instead of an upgrade; once one closes, a new one is accepted.
#[test]
fn connection_over_max_connections_gets_503_before_the_upgrade() {
    let server = start(App::echo(), |c| c.max_connections = 2);
    let mut first = HttpClient::connect(server.local_addr());
    first.send(handshake("GET", "/echo", &[]));
    assert_eq!(first.response().status, 101);
    let mut second = HttpClient::connect(server.local_addr());
    second.send(handshake("GET", "/echo", &[]));
    assert_eq!(second.response().status, 101);

    let refused = refusal(&server, &handshake("GET", "/echo", &[]));
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        metric(
            &server,
            "ringsocket_limit_hits_total{limit=\"max_connections\"}"
        ),
        1
    );
    assert_eq!(metric(&server, "ringsocket_websocket_upgrades_total"), 2);

    drop(first);
    wait_until("the first WebSocket and the refused one to close", || {
        server.metrics().open_connections() == 1
    });
    let mut third = HttpClient::connect(server.local_addr());
    third.send(handshake("GET", "/echo", &[]));
    assert_eq!(third.response().status, 101);
    drop(second);
}

// ---- helpers ----------------------------------------------------------------------------

/// HTTP routes: `GET /hello/{name}` and `POST /echo-body`, which answers with the body.
fn http_app() -> App {
    App::new()
        .get("/hello/{name}", |req| async move {
            let name: String = req.param("name").unwrap_or_default();
            Response::text(200, format!("hello {name}"))
        })
        .post("/echo-body", |req| async move {
            Response {
                status: 200,
                headers: Vec::new(),
                content_type: "application/octet-stream".into(),
                body: Bytes::clone(req.body()),
            }
        })
}

/// An opening handshake request for `target`; `changes` replace a default header's
/// value or, with `None`, remove it; headers not among the defaults are added.
fn handshake(method: &str, target: &str, changes: &[(&str, Option<&str>)]) -> String {
    let mut headers = vec![
        ("Host", Some("localhost")),
        ("Upgrade", Some("websocket")),
        ("Connection", Some("Upgrade")),
        ("Sec-WebSocket-Key", Some(KEY)),
        ("Sec-WebSocket-Version", Some("13")),
    ];
    for (name, value) in changes {
        match headers.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = *value,
            None => headers.push((name, *value)),
        }
    }
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    for (name, value) in headers {
        if let Some(value) = value {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str("\r\n");
    head
}

/// Sends `head` on a new connection and reads the answer. The connection must be left
/// in a sane state: closed right after a response with `Connection: close`, otherwise
/// still able to answer a following request.
fn exchange(server: &RunningServer, head: &str) -> HttpResponse {
    let mut client = HttpClient::connect(server.local_addr());
    client.send(head);
    let response = client.response();
    if response.header("connection") == Some("close") {
        client.assert_closed();
    } else {
        client.send("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let next = client.response();
        assert_eq!(next.status, 200, "after {response:?}: {next:?}");
        client.assert_closed();
    }
    response
}

/// Like [`exchange`], for refusals that must end the connection: those of
/// `validate_upgrade` (RFC 6455 §4.2.1), the handler's and the server's limits.
fn refusal(server: &RunningServer, head: &str) -> HttpResponse {
    let response = exchange(server, head);
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    response
}

/// Sends one request on a new connection and reads its response.
fn request(server: &RunningServer, text: &str) -> HttpResponse {
    let mut client = HttpClient::connect(server.local_addr());
    client.send(text);
    client.response()
}

/// Polls `done` every 10 ms until it holds, failing after [`PATIENCE`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The value of one series in the server's Prometheus text.
fn metric(server: &RunningServer, series: &str) -> u64 {
    let text = server.metrics().render();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    /// Names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A blocking HTTP/1.1 client that parses responses by hand (status line, headers,
/// `Content-Length` body), keeping bytes that follow a response for the next one.
struct HttpClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpClient {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).unwrap();
    }

    /// Reads once more into the buffer; 0 at end of stream.
    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => break n,
                // The io_uring workers in this process can interrupt a blocking read.
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break 0,
                Err(e) => panic!(
                    "no answer within {PATIENCE:?} ({e}); have {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        };
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    fn response(&mut self) -> HttpResponse {
        let head_len = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                self.fill() > 0,
                "connection closed before a complete response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8(self.buf[..head_len - 4].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{head}");
        let status: u16 = parts.next().unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        if status == 101 {
            assert_eq!(length, 0, "{head}");
        }
        while self.buf.len() < head_len + length {
            assert!(self.fill() > 0, "connection closed inside a response body");
        }
        let body = self.buf[head_len..head_len + length].to_vec();
        self.buf.drain(..head_len + length);
        HttpResponse {
            status,
            headers,
            body,
        }
    }

    /// Reads until the server closes the connection and returns what it sent.
    fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill() > 0 {}
        std::mem::take(&mut self.buf)
    }

    /// The server closes the connection with nothing more to say.
    fn assert_closed(&mut self) {
        let rest = self.read_to_end();
        assert!(
            rest.is_empty(),
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}
