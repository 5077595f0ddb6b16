//! The server over loopback, after the upgrade: echo, fragmentation, ping, every close
//! code the server sends, path parameters, heartbeats, the idle timeout, slow
//! consumers, graceful shutdown and the accounting of connections that vanish.
//!
//! Each test starts its own server on port 0. The client is tokio-tungstenite, an
//! independent implementation, except where a test must break the protocol or stay
//! silent: there a raw TCP client writes frames by hand (masked with a fixed key) and
//! decodes the server's frames with our client-role codec. Every await on the server
//! is bounded by a timeout; waits on counters poll with a deadline.
// Tests unwrap values they built themselves (as `src/lib.rs` allows for unit tests).
#![allow(clippy::unwrap_used)]

mod common;
use common::{masked_frame, start};

use std::future::Future;
use std::net::SocketAddr;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;

use ringsocket::proto::{ClientRequest, Connection, Event, HandshakeLimits, Limits, Message};
use ringsocket::runtime::RunningServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as WsCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{
    CloseCode as WsCloseCode, Data, OpCode,
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any single await on the server may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(5);

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---- echo -------------------------------------------------------------------------------

/// RFC 6455 §5.6: text and binary messages, empty ones, and 64 KiB ones (16-bit and
/// 64-bit payload lengths) come back as they were sent.
#[tokio::test]
async fn echo_returns_text_binary_empty_and_64_kib_messages() {
    let server = start(App::echo(), |_| {});
    let mut client = connect(&server, "/echo").await;
    let big_text: String = "0123456789abcdef".repeat(4096);
    let big_binary: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let messages = [
        WsMessage::text("hello"),
        WsMessage::binary(vec![0u8, 1, 2, 0xff]),
        WsMessage::text(""),
        WsMessage::binary(Vec::new()),
        WsMessage::text("Grüße, κόσμε 𝄞"),
        WsMessage::text(big_text),
        WsMessage::binary(big_binary),
        WsMessage::binary(vec![7u8; 200]),
    ];
    for message in messages {
        client.send(message.clone()).await.unwrap();
        assert_eq!(next(&mut client).await, message);
    }
    close_cleanly(&mut client).await;
}

/// Bursts sent in one write each, growing from one small message past the largest read
/// buffer a connection keeps (16 KiB) and shrinking back, come back whole and in order:
/// the read buffer grows, reads into a pooled buffer while bytes wait, and shrinks
/// without losing or reordering bytes.
#[tokio::test]
async fn echo_keeps_bursts_of_growing_and_shrinking_size_whole_and_in_order() {
    let server = start(App::echo(), |_| {});
    let mut client = connect(&server, "/echo").await;
    let bursts: [(usize, usize); 8] = [
        (1, 10),
        (16, 64),
        (16, 64),
        (40, 300),
        (100, 1_000),
        (16, 64),
        (2, 20),
        (1, 5),
    ];
    let mut sequence = 0u32;
    for (count, size) in bursts {
        let mut sent = Vec::with_capacity(count);
        for _ in 0..count {
            let mut payload = vec![(sequence % 251) as u8; size];
            payload[..4].copy_from_slice(&sequence.to_be_bytes());
            sequence += 1;
            let message = WsMessage::binary(payload);
            client.feed(message.clone()).await.unwrap();
            sent.push(message);
        }
        client.flush().await.unwrap();
        for message in sent {
            assert_eq!(next(&mut client).await, message);
        }
    }
    close_cleanly(&mut client).await;
}

/// RFC 6455 §5.4: a text message in three fragments, with a UTF-8 character split
/// across the first two and a Ping between fragments, comes back whole; the Ping is
/// answered at once, before the message completes (§5.5.2).
#[tokio::test]
async fn echo_reassembles_a_fragmented_text_message_with_a_ping_between_fragments() {
    let server = start(App::echo(), |_| {});
    let mut client = connect(&server, "/echo").await;
    let text = "Grüße, κόσμε 𝄞!";
    let bytes = text.as_bytes();
    // Byte 3 is inside 'ü' (bytes 2..4).
    let (a, b, c) = (&bytes[..3], &bytes[3..11], &bytes[11..]);
    let frames = [
        Frame::message(Bytes::copy_from_slice(a), OpCode::Data(Data::Text), false),
        Frame::ping(Bytes::from_static(b"between")),
        Frame::message(
            Bytes::copy_from_slice(b),
            OpCode::Data(Data::Continue),
            false,
        ),
        Frame::message(
            Bytes::copy_from_slice(c),
            OpCode::Data(Data::Continue),
            true,
        ),
    ];
    for frame in frames {
        client.send(WsMessage::Frame(frame)).await.unwrap();
    }
    assert_eq!(
        next(&mut client).await,
        WsMessage::Pong(Bytes::from_static(b"between"))
    );
    assert_eq!(next(&mut client).await, WsMessage::text(text));
    close_cleanly(&mut client).await;
}

/// A 10,000-byte binary message sent by our own client codec as ten masked fragments
/// of 1,000 bytes over a raw socket comes back whole.
#[tokio::test]
async fn echo_reassembles_a_fragmented_binary_message_from_a_raw_client() {
    let server = start(App::echo(), |_| {});
    let mut raw = RawWs::connect(server.local_addr(), "/echo").await;
    raw.conn = Connection::client(Limits::default().with_fragment_size(Some(1000)), [3; 32]);
    let payload: Vec<u8> = (0..10_000).map(|i| (i % 253) as u8).collect();
    raw.conn.send_binary(payload.clone()).unwrap();
    raw.flush().await;
    match raw.event().await {
        Some(Event::Binary(bytes)) => assert_eq!(bytes, payload),
        other => panic!("expected the binary message back, got {other:?}"),
    }
}

/// RFC 6455 §5.5.2: a Ping is answered with a Pong carrying the same payload.
#[tokio::test]
async fn ping_is_answered_with_a_pong_carrying_its_payload() {
    let server = start(App::echo(), |_| {});
    let mut client = connect(&server, "/echo").await;
    client
        .send(WsMessage::Ping(Bytes::from_static(b"are you there?")))
        .await
        .unwrap();
    assert_eq!(
        next(&mut client).await,
        WsMessage::Pong(Bytes::from_static(b"are you there?"))
    );
    close_cleanly(&mut client).await;
}

// ---- close codes ------------------------------------------------------------------------

/// RFC 6455 §5.5.1: the server answers a client's Close 1000 with Close 1000, and the
/// connection ends cleanly.
#[tokio::test]
async fn client_close_1000_is_echoed_with_1000() {
    let server = start(App::echo(), |_| {});
    let mut client = connect(&server, "/echo").await;
    client
        .close(Some(WsCloseFrame {
            code: WsCloseCode::Normal,
            reason: "done".into(),
        }))
        .await
        .unwrap();
    let frame = close_frame(&mut client).await.expect("a close code");
    assert_eq!(u16::from(frame.code), 1000);
    wait_for_no_connections(&server).await;
    assert_eq!(
        metric(
            &server,
            "ringsocket_connections_closed_total{reason=\"normal\"}"
        ),
        1
    );
}

/// RFC 6455 §5.1: an unmasked frame from a client fails the connection with 1002.
#[tokio::test]
async fn unmasked_frame_is_closed_with_1002() {
    let server = start(App::echo(), |_| {});
    let mut raw = RawWs::connect(server.local_addr(), "/echo").await;
    raw.write(&[0x81, 0x02, b'h', b'i']).await;
    assert_eq!(raw.close_code().await, 1002);
    raw.expect_eof().await;
    wait_for_no_connections(&server).await;
    assert_eq!(
        metric(
            &server,
            "ringsocket_connections_closed_total{reason=\"protocol_error\"}"
        ),
        1
    );
}

/// RFC 6455 §5.2: a reserved opcode (0x3) fails the connection with 1002.
#[tokio::test]
async fn reserved_opcode_is_closed_with_1002() {
    let server = start(App::echo(), |_| {});
    let mut raw = RawWs::connect(server.local_addr(), "/echo").await;
    raw.write(&masked_frame(0x83, b"?")).await;
    assert_eq!(raw.close_code().await, 1002);
    raw.expect_eof().await;
}

/// RFC 6455 §8.1: a text message that is not UTF-8 fails the connection with 1007.
#[tokio::test]
async fn invalid_utf8_text_is_closed_with_1007() {
    let server = start(App::echo(), |_| {});
    let mut raw = RawWs::connect(server.local_addr(), "/echo").await;
    raw.write(&masked_frame(0x81, &[b'o', b'k', 0xff, 0xfe]))
        .await;
    assert_eq!(raw.close_code().await, 1007);
    raw.expect_eof().await;
}

/// A message over `max_message_size`, whether in one frame or in fragments that only
/// together pass the limit, fails the connection with 1009, counted as a limit hit.
#[tokio::test]
async fn message_over_max_message_size_is_closed_with_1009() {
    let server = start(App::echo(), |c| c.max_message_size = 1024);
    let mut whole = connect(&server, "/echo").await;
    whole
        .send(WsMessage::binary(vec![1u8; 1024]))
        .await
        .unwrap();
    assert_eq!(next(&mut whole).await, WsMessage::binary(vec![1u8; 1024]));
    whole
        .send(WsMessage::binary(vec![1u8; 2000]))
        .await
        .unwrap();
    let frame = close_frame(&mut whole).await.expect("a close code");
    assert_eq!(u16::from(frame.code), 1009);

    let mut fragmented = connect(&server, "/echo").await;
    for (fin, opcode) in [(false, Data::Binary), (true, Data::Continue)] {
        let frame = Frame::message(vec![2u8; 600], OpCode::Data(opcode), fin);
        fragmented.send(WsMessage::Frame(frame)).await.unwrap();
    }
    let frame = close_frame(&mut fragmented).await.expect("a close code");
    assert_eq!(u16::from(frame.code), 1009);
    wait_for_no_connections(&server).await;
    assert_eq!(
        metric(
            &server,
            "ringsocket_limit_hits_total{limit=\"max_message_size\"}"
        ),
        2
    );
}

/// A handler that returns ends the session with Close 1000, after what it sent. Both
/// a handler that returns right after accepting (before it ever waits) and one that
/// returns after receiving a message.
#[tokio::test]
async fn handler_returning_closes_with_1000() {
    let app = App::new()
        .websocket("/bye-at-once", |ws| async move {
            ws.accept();
            let _ = ws.send_text("bye");
        })
        .websocket("/bye-after-one", |ws| async move {
            ws.accept();
            if let Ok(Message::Text(text)) = ws.recv().await {
                let _ = ws.send_text(format!("bye {}", text.as_str()));
            }
        });
    let server = start(app, |_| {});
    let mut after_one = connect(&server, "/bye-after-one").await;
    after_one.send(WsMessage::text("now")).await.unwrap();
    assert_eq!(next(&mut after_one).await, WsMessage::text("bye now"));
    let frame = close_frame(&mut after_one).await.expect("a close code");
    assert_eq!(u16::from(frame.code), 1000);

    let mut at_once = connect(&server, "/bye-at-once").await;
    assert_eq!(next(&mut at_once).await, WsMessage::text("bye"));
    let frame = close_frame(&mut at_once).await.expect("a close code");
    assert_eq!(u16::from(frame.code), 1000);
}

// ---- routing ----------------------------------------------------------------------------

/// Path parameters, percent-decoded, and the query string reach the handler.
#[tokio::test]
async fn path_parameters_and_query_reach_the_handler() {
    let app = App::new()
        .websocket("/ws/{room}", |ws| async move {
            let room: String = ws.param("room").unwrap_or_default();
            let query = ws.query().unwrap_or("-").to_owned();
            ws.accept();
            let _ = ws.send_text(format!("room={room} query={query}"));
            while ws.recv().await.is_ok() {}
        })
        .websocket("/n/{id:u64}", |ws| async move {
            let id: u64 = ws.param("id").unwrap();
            ws.accept();
            let _ = ws.send_text((id + 1).to_string());
            while ws.recv().await.is_ok() {}
        });
    let server = start(app, |_| {});
    for (target, expected) in [
        ("/ws/lobby?token=abc&x=1", "room=lobby query=token=abc&x=1"),
        ("/ws/caf%C3%A9", "room=café query=-"),
        ("/n/41", "42"),
    ] {
        let mut client = connect(&server, target).await;
        assert_eq!(
            next(&mut client).await,
            WsMessage::text(expected),
            "{target}"
        );
        close_cleanly(&mut client).await;
    }
}

// ---- heartbeats -------------------------------------------------------------------------

/// A client that completes the handshake and then never answers (it reads, to see
/// what it is sent, but writes nothing) is pinged after `ping_interval_secs` and its
/// TCP connection closed once `pong_timeout_secs` has passed too.
#[tokio::test]
async fn unanswered_heartbeat_pings_close_the_tcp_connection() {
    let server = start(App::echo(), |c| {
        c.ping_interval_secs = 0.3;
        c.pong_timeout_secs = 0.3;
    });
    let mut raw = RawWs::connect(server.local_addr(), "/echo").await;
    let started = Instant::now();
    let mut pings = 0;
    // Our codec queues a Pong for each Ping; it is never flushed.
    while let Some(event) = raw.event().await {
        match event {
            Event::Ping(_) => pings += 1,
            Event::Close(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(pings >= 1, "no ping before the connection ended");
    assert!(
        elapsed >= Duration::from_millis(550) && elapsed < Duration::from_secs(2),
        "closed after {elapsed:?}"
    );
    wait_for_no_connections(&server).await;
    assert!(metric(&server, "ringsocket_pings_sent_total") >= 1);
    assert_eq!(
        metric(
            &server,
            "ringsocket_connections_closed_total{reason=\"pong_timeout\"}"
        ),
        1
    );
}

/// A client that keeps reading (tungstenite answers each Ping with a Pong) stays
/// connected across several ping intervals, and its messages are still echoed.
#[tokio::test]
async fn client_answering_pings_stays_connected_across_ping_intervals() {
    let server = start(App::echo(), |c| {
        c.ping_interval_secs = 0.3;
        c.pong_timeout_secs = 0.3;
    });
    let mut client = connect(&server, "/echo").await;
    let watch = Duration::from_millis(1500);
    let started = Instant::now();
    let mut pings = 0;
    while let Some(left) = watch.checked_sub(started.elapsed()) {
        match tokio::time::timeout(left, client.next()).await {
            Err(_) => break,
            Ok(Some(Ok(WsMessage::Ping(_)))) => pings += 1,
            Ok(other) => panic!("unexpected {other:?} after {:?}", started.elapsed()),
        }
    }
    assert!(pings >= 2, "only {pings} pings in {watch:?}");
    client.send(WsMessage::text("still here")).await.unwrap();
    assert_eq!(next(&mut client).await, WsMessage::text("still here"));
    assert_eq!(server.metrics().open_connections(), 1);
    assert_eq!(
        metric(
            &server,
            "ringsocket_connections_closed_total{reason=\"pong_timeout\"}"
        ),
        0
    );
    close_cleanly(&mut client).await;
}

/// A client that sends no data message for `idle_timeout_secs` is closed with 1001
/// "idle timeout", counted as `idle_timeout`. The idle clock runs from the upgrade: the
/// Close comes after the idle timeout, not at the first (much later) heartbeat.
#[tokio::test]
async fn idle_client_is_closed_with_1001_after_idle_timeout() {
    let server = start(App::echo(), |c| {
        c.ping_interval_secs = 20.0;
        c.idle_timeout_secs = 0.3;
    });
    let mut client = connect(&server, "/echo").await;
    let started = Instant::now();
    let frame = close_frame(&mut client).await.expect("a close code");
    let elapsed = started.elapsed();
    assert_eq!(u16::from(frame.code), 1001);
    assert_eq!(frame.reason.as_str(), "idle timeout");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2),
        "closed after {elapsed:?}"
    );
    wait_for_no_connections(&server).await;
    assert_eq!(
        metric(
            &server,
            "ringsocket_connections_closed_total{reason=\"idle_timeout\"}"
        ),
        1
    );
}

// ---- slow consumers ---------------------------------------------------------------------

/// A client that never reads while its route streams messages at it fills the socket
/// buffers, then goes past `max_outbound_bytes` and is closed as a slow consumer
/// (1013 if it reads later, or its TCP connection ends), counted in the metrics;
/// meanwhile another client on the same core (one worker) gets its echoes promptly,
/// during the flood and after.
#[tokio::test]
async fn slow_consumer_is_closed_without_stalling_other_clients() {
    let app = App::echo().websocket("/flood", |ws| async move {
        ws.accept();
        let chunk = Bytes::from(vec![0x5a; 4 * 1024]);
        // 16 KiB per millisecond, in bursts well under the limit, so that only a peer
        // that stops reading can reach it. A timer rather than `yield_now`, so that the
        // writes reach the kernel (see `handler_that_keeps_yielding_does_not_stall_io`).
        'flood: loop {
            for _ in 0..4 {
                if ws.send_binary(chunk.clone()).is_err() {
                    break 'flood;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let server = start(app, |c| {
        c.workers = 1;
        c.max_outbound_bytes = 64 * 1024;
        // How long the closing handshake may take before the TCP connection is cut.
        c.pong_timeout_secs = 1.0;
    });
    let mut bystander = connect(&server, "/echo").await;
    let mut flooded = connect(&server, "/flood").await;
    let series = "ringsocket_limit_hits_total{limit=\"max_outbound_bytes\"}";
    let deadline = Instant::now() + PATIENCE;
    let mut round = 0;
    while metric(&server, series) == 0 {
        assert!(Instant::now() < deadline, "no slow consumer detected");
        round += 1;
        let rtt = echo_round_trip(&mut bystander, round).await;
        assert!(
            rtt < Duration::from_secs(1),
            "echo took {rtt:?} during flood"
        );
    }
    assert_eq!(metric(&server, series), 1);
    // Closed only once the socket buffers were full: far more than the limit was written.
    let written = metric(&server, "ringsocket_bytes_out_total");
    assert!(
        written > 64 * 1024,
        "closed after writing only {written} bytes"
    );
    let rtt = echo_round_trip(&mut bystander, 0).await;
    assert!(
        rtt < Duration::from_secs(1),
        "echo took {rtt:?} after flood"
    );

    // Now read everything: what was in flight, then a Close 1013 or the end of TCP.
    let mut messages = 0u64;
    let ending = within(Duration::from_secs(10), async {
        loop {
            match flooded.next().await {
                Some(Ok(WsMessage::Binary(_))) => messages += 1,
                Some(Ok(WsMessage::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                Some(Err(_)) | None => break None,
            }
        }
    })
    .await;
    assert!(messages > 0);
    if let Some(code) = ending {
        assert_eq!(code, 1013, "the slow consumer's close code");
    }
    wait_until(&server, "the slow consumer to be closed", |s| {
        s.metrics().open_connections() == 1
    })
    .await;
    assert_eq!(
        metric(
            &server,
            "ringsocket_connections_closed_total{reason=\"slow_consumer\"}"
        ),
        1
    );
    let rtt = echo_round_trip(&mut bystander, 1).await;
    assert!(rtt < Duration::from_secs(1), "echo took {rtt:?} at the end");
    close_cleanly(&mut bystander).await;
}

/// A handler that keeps yielding (`yield_now`, or a busy tokio channel running out of
/// its coop budget) must not hold back I/O: what it sent before is written at once,
/// and another connection on the same core (one worker) is still echoed promptly.
///
/// The core's ring submits every turn of the core (its driver task runs behind the
/// tasks that queued operations), not only when the thread parks, which a core with
/// a yielding task never does.
#[tokio::test]
async fn handler_that_keeps_yielding_does_not_stall_io() {
    let app = App::echo().websocket("/busy", |ws| async move {
        ws.accept();
        let _ = ws.send_text("before the busy loop");
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            tokio::task::yield_now().await;
        }
        while ws.recv().await.is_ok() {}
    });
    let server = start(app, |c| c.workers = 1);
    let mut bystander = connect(&server, "/echo").await;
    let started = Instant::now();
    let addr = server.local_addr();
    let busy = tokio::spawn(async move {
        let mut busy = connect_to(addr, "/busy").await;
        let message = next(&mut busy).await;
        (busy, message, started.elapsed())
    });
    // Upgraded: the busy handler has accepted and is in its loop.
    wait_until(&server, "the busy connection to be upgraded", |s| {
        metric(s, "ringsocket_websocket_upgrades_total") == 2
    })
    .await;
    let rtt = echo_round_trip(&mut bystander, 1).await;
    let (mut busy, message, first) = within(PATIENCE, busy).await.unwrap();
    assert_eq!(message, WsMessage::text("before the busy loop"));
    assert!(
        first < Duration::from_millis(500) && rtt < Duration::from_millis(500),
        "the busy handler's message took {first:?}, an echo beside it {rtt:?}"
    );
    close_cleanly(&mut busy).await;
    close_cleanly(&mut bystander).await;
}

// ---- shutdown ---------------------------------------------------------------------------

/// `shutdown()` sends Close 1001 to a connected client; once it answers, `join()`
/// returns well within `shutdown_timeout_secs`.
#[tokio::test]
async fn shutdown_sends_1001_and_join_returns_within_shutdown_timeout() {
    let server = start(App::echo(), |c| c.shutdown_timeout_secs = 2.0);
    let mut client = connect(&server, "/echo").await;
    // The session is live on the server before the shutdown starts.
    echo_round_trip(&mut client, 1).await;
    let started = Instant::now();
    server.shutdown();
    let frame = close_frame(&mut client).await.expect("a close code");
    assert_eq!(u16::from(frame.code), 1001);
    let joined = within(PATIENCE, tokio::task::spawn_blocking(move || server.join())).await;
    joined.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "join took {elapsed:?}");
}

/// A client that never answers the 1001 is cut off after `shutdown_timeout_secs`, and
/// `join()` returns soon after.
#[tokio::test]
async fn shutdown_cuts_off_a_client_that_does_not_answer_1001() {
    let server = start(App::echo(), |c| c.shutdown_timeout_secs = 0.5);
    let mut raw = RawWs::connect(server.local_addr(), "/echo").await;
    let started = Instant::now();
    server.shutdown();
    let joined = within(PATIENCE, tokio::task::spawn_blocking(move || server.join())).await;
    joined.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_millis(1500),
        "join took {elapsed:?}"
    );
    assert_eq!(raw.close_code().await, 1001);
    raw.expect_eof().await;
}

/// A connection whose handler sent Close before the shutdown, to a peer that never
/// answers, is cut off at `shutdown_timeout_secs` once the shutdown starts, not at the
/// later close deadline (`pong_timeout_secs`) armed when the Close went out.
#[tokio::test]
async fn shutdown_shortens_the_deadline_of_a_close_already_sent() {
    let app = App::new().websocket("/closing", |ws| async move {
        ws.accept();
        ws.close(ringsocket::proto::CloseCode::Normal, "bye");
        // Wait for the peer's answer (which never comes).
        while ws.recv().await.is_ok() {}
    });
    let server = start(app, |c| {
        c.pong_timeout_secs = 30.0;
        c.shutdown_timeout_secs = 0.5;
    });
    let mut raw = RawWs::connect(server.local_addr(), "/closing").await;
    assert_eq!(raw.close_code().await, 1000);
    let metrics = server.metrics().clone();
    server.shutdown();
    let joined = within(PATIENCE, tokio::task::spawn_blocking(move || server.join())).await;
    joined.unwrap().unwrap();
    // Ended by its close timeout (counted as the handler's close), not dropped when
    // the worker gave up waiting (shutdown_timeout + 1 s, counted as an I/O error).
    let text = metrics.render();
    let closed = |reason: &str| {
        let series = format!("ringsocket_connections_closed_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!((closed("normal"), closed("io_error")), (1, 0), "{text}");
    raw.expect_eof().await;
}

// ---- accounting -------------------------------------------------------------------------

/// 1,000 clients complete the handshake, then drop their TCP connections without a
/// Close: every one is counted closed (as `peer_gone`) within a few seconds.
#[tokio::test]
async fn thousand_clients_dropping_tcp_without_close_leave_no_open_connections() {
    const CLIENTS: u64 = 1000;
    let server = start(App::echo(), |_| {});
    let addr = server.local_addr();
    let mut tasks = JoinSet::new();
    for _ in 0..CLIENTS {
        tasks.spawn(open_websocket(addr));
    }
    let mut streams = Vec::new();
    while let Some(stream) = within(PATIENCE, tasks.join_next()).await {
        streams.push(stream.unwrap());
    }
    wait_until(&server, "every client to be connected", |s| {
        s.metrics().open_connections() == CLIENTS
    })
    .await;
    assert_eq!(
        metric(&server, "ringsocket_websocket_upgrades_total"),
        CLIENTS
    );
    drop(streams);
    wait_for_no_connections(&server).await;
    assert_eq!(
        metric(
            &server,
            "ringsocket_connections_closed_total{reason=\"peer_gone\"}"
        ),
        CLIENTS
    );
}

// ---- helpers ----------------------------------------------------------------------------

/// Awaits `future`, failing the test after `limit`.
async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("no result within {limit:?}"))
}

async fn connect(server: &RunningServer, target: &str) -> Client {
    connect_to(server.local_addr(), target).await
}

async fn connect_to(addr: SocketAddr, target: &str) -> Client {
    let url = format!("ws://{addr}{target}");
    within(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .0
}

/// The next message, which must come within [`PATIENCE`].
async fn next(client: &mut Client) -> WsMessage {
    within(PATIENCE, client.next())
        .await
        .expect("the connection ended")
        .unwrap()
}

/// Reads until the server's Close frame, then on to the end of the connection (which
/// sends tungstenite's reply). Data messages before the Close are an error.
async fn close_frame(client: &mut Client) -> Option<WsCloseFrame> {
    let frame = match next(client).await {
        WsMessage::Close(frame) => frame,
        other => panic!("expected a close frame, got {other:?}"),
    };
    within(PATIENCE, async {
        if let Some(Ok(message)) = client.next().await {
            panic!("{message:?} after the close frame");
        }
    })
    .await;
    frame
}

/// Closes with 1000 and checks that the server echoes it.
async fn close_cleanly(client: &mut Client) {
    let normal = WsCloseFrame {
        code: WsCloseCode::Normal,
        reason: "".into(),
    };
    within(PATIENCE, client.close(Some(normal))).await.unwrap();
    let frame = close_frame(client).await.expect("a close code");
    assert_eq!(u16::from(frame.code), 1000);
}

/// Sends a text and times its echo.
async fn echo_round_trip(client: &mut Client, round: u32) -> Duration {
    let started = Instant::now();
    let text = format!("round {round}");
    client.send(WsMessage::text(text.clone())).await.unwrap();
    assert_eq!(next(client).await, WsMessage::text(text));
    started.elapsed()
}

/// Polls `done` every 10 ms until it holds, failing after [`PATIENCE`].
async fn wait_until(
    server: &RunningServer,
    what: &str,
    mut done: impl FnMut(&RunningServer) -> bool,
) {
    let deadline = Instant::now() + PATIENCE;
    while !done(server) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            server.metrics().render()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for_no_connections(server: &RunningServer) {
    wait_until(server, "every connection to be closed", |s| {
        s.metrics().open_connections() == 0
    })
    .await;
}

/// The value of one series in the server's Prometheus text.
fn metric(server: &RunningServer, series: &str) -> u64 {
    let text = server.metrics().render();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// The cheapest WebSocket client: one write of a handshake, one read of the 101.
async fn open_websocket(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut chunk = [0u8; 256];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed during the handshake");
        head.extend_from_slice(&chunk[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// A raw WebSocket client: the handshake and frames go through our client-role codec
/// (or are written by hand), and nothing is sent unless the test says so: Pongs and
/// Close replies the codec queues stay queued until [`RawWs::flush`].
struct RawWs {
    stream: TcpStream,
    conn: Connection,
}

impl RawWs {
    async fn connect(addr: SocketAddr, target: &str) -> Self {
        let mut stream = within(PATIENCE, TcpStream::connect(addr)).await.unwrap();
        let mut request = BytesMut::new();
        let handshake = ClientRequest {
            host: "localhost",
            target,
            protocols: &[],
            headers: &[],
        }
        .encode([7; 16], &mut request);
        stream.write_all(&request).await.unwrap();
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = within(PATIENCE, stream.read(&mut chunk)).await.unwrap();
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            let parsed = handshake
                .parse_response(&buf, &HandshakeLimits::default())
                .unwrap();
            if let Some((_, head_len)) = parsed {
                let mut conn = Connection::client(Limits::default(), [9; 32]);
                conn.handle_bytes(&buf[head_len..]);
                return Self { stream, conn };
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Writes whatever the codec has queued.
    async fn flush(&mut self) {
        while let Some(chunk) = self.conn.poll_transmit() {
            self.stream.write_all(&chunk).await.unwrap();
        }
    }

    /// The next thing the server sent; `None` once the connection ended.
    async fn event(&mut self) -> Option<Event> {
        loop {
            match self.conn.poll_event() {
                Ok(Some(event)) => return Some(event),
                Ok(None) => {}
                Err(e) => panic!("the server broke the protocol: {e}"),
            }
            if self.conn.is_closed() {
                return None;
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match within(PATIENCE, self.stream.read(&mut chunk)).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.conn.handle_bytes(&chunk[..n]),
            }
        }
    }

    /// The code of the server's Close frame (1005 when it had none); no data message
    /// may come before it.
    async fn close_code(&mut self) -> u16 {
        loop {
            match self.event().await {
                Some(Event::Close(frame)) => return frame.map_or(1005, |f| u16::from(f.code)),
                Some(Event::Ping(_) | Event::Pong(_)) => {}
                Some(other) => panic!("expected a close frame, got {other:?}"),
                None => panic!("the connection ended without a close frame"),
            }
        }
    }

    /// The server closes the TCP connection without sending anything more.
    async fn expect_eof(&mut self) {
        let mut chunk = [0u8; 1024];
        match within(PATIENCE, self.stream.read(&mut chunk)).await {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("unexpected bytes {:?}", &chunk[..n]),
        }
    }
}
