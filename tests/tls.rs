//! TLS on the server itself, with real clients: tokio-tungstenite over rustls (wss://),
//! tokio-rustls and `curl --cacert` (https://), against certificates made by `rcgen`
//! for each test. Echo, rooms and publish over TLS; plain HTTP and garbage on the TLS
//! port; a stalled handshake; reload (the library call and SIGHUP to the binary);
//! files that do not load; the plain listener beside the TLS one.
#![allow(clippy::unwrap_used)]

mod common;
use common::tls::{TestCa, https_exchange, tls_connect, wss_connect};
use common::{PATIENCE, http_exchange, next_data, start};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use ringsocket::app::App;
use ringsocket::config::Config;
use ringsocket::runtime::{RunningServer, ServeError, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn tls_server(ca: &TestCa, tweak: impl FnOnce(&mut Config)) -> RunningServer {
    let cert = ca.server_cert("server", "first");
    start(App::standard(), |c| {
        c.tls_cert = cert.cert.display().to_string();
        c.tls_key = cert.key.display().to_string();
        tweak(c);
    })
}

async fn metrics(addr: SocketAddr, ca: &TestCa) -> String {
    https_exchange(
        addr,
        ca.client_config(),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
}

/// The value of the counter line starting with `name` (0 when absent).
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

async fn eventually_metric(addr: SocketAddr, ca: &TestCa, name: &str, at_least: u64) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = metrics(addr, ca).await;
        if counter(&text, name) >= at_least {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {at_least}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// wss:// echo from tokio-tungstenite over rustls: small and large messages (a 300 KiB
/// one spans many TLS records and writes that wait for room), text and binary, in
/// order, then a clean close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_echo_small_and_large_messages() {
    let ca = TestCa::new("echo");
    let server = tls_server(&ca, |_| {});
    let addr = server.local_addr();
    let mut client = wss_connect(addr, "/echo", ca.client_config()).await;
    for i in 0..50 {
        client
            .send(WsMessage::text(format!("hello {i}")))
            .await
            .unwrap();
    }
    for i in 0..50 {
        assert_eq!(
            next_data(&mut client).await,
            WsMessage::text(format!("hello {i}"))
        );
    }
    let big: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
    client.send(WsMessage::binary(big.clone())).await.unwrap();
    assert_eq!(next_data(&mut client).await, WsMessage::binary(big));
    client.close(None).await.unwrap();
    let text = metrics(addr, &ca).await;
    assert!(
        counter(&text, "ringsocket_tls_handshakes_total") >= 2,
        "{text}"
    );
}

/// Rooms over TLS: subscribers on both workers get each message published over
/// https:// (POST /publish) and from a wss:// publisher, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_and_publish_over_tls() {
    let ca = TestCa::new("rooms");
    let app = App::standard();
    let hub = app.hub().clone();
    let cert = ca.server_cert("server", "rooms");
    let server = start(app, |c| {
        c.tls_cert = cert.cert.display().to_string();
        c.tls_key = cert.key.display().to_string();
    });
    let addr = server.local_addr();
    let mut subs = Vec::new();
    for _ in 0..4 {
        subs.push(wss_connect(addr, "/ws/news", ca.client_config()).await);
    }
    let mut publisher = wss_connect(addr, "/ws/news", ca.client_config()).await;
    let deadline = Instant::now() + PATIENCE;
    while hub.subscribers("news") < 5 {
        assert!(Instant::now() < deadline, "subscribers never registered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..20 {
        let body = format!("https {i}");
        let request = format!(
            "POST /publish/news HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let response = https_exchange(addr, ca.client_config(), request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    }
    for i in 0..20 {
        publisher
            .send(WsMessage::text(format!("wss {i}")))
            .await
            .unwrap();
    }
    // Each publisher's messages arrive once and in its order; the two publishers may
    // sit on different cores, so their messages may interleave.
    for sub in &mut subs {
        let mut got = Vec::new();
        for _ in 0..40 {
            got.push(next_data(sub).await.into_text().unwrap().to_string());
        }
        for source in ["https", "wss"] {
            let mine: Vec<&String> = got.iter().filter(|m| m.starts_with(source)).collect();
            let want: Vec<String> = (0..20).map(|i| format!("{source} {i}")).collect();
            assert_eq!(mine, want.iter().collect::<Vec<_>>(), "{got:?}");
        }
    }
}

/// curl (an independent client, OpenSSL or GnuTLS underneath) fetches /healthz and
/// publishes over https:// with the test CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_the_test_ca() {
    let ca = TestCa::new("curl");
    let server = tls_server(&ca, |_| {});
    let port = server.local_addr().port();
    let ca_file = ca.ca_file();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&ca_file)
            .arg(format!("https://localhost:{port}/healthz"))
            .output()
            .expect("curl is installed")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{out:?}"
    );
    // Without the CA, curl refuses the certificate: it is really checked.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("https://localhost:{port}/healthz"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "curl accepted an unknown CA");
}

/// Plain HTTP and garbage on the TLS port: each connection is closed (after an alert),
/// counted by reason, and an open wss:// connection is not harmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_garbage_on_the_tls_port_are_refused() {
    let ca = TestCa::new("garbage");
    let server = tls_server(&ca, |_| {});
    let addr = server.local_addr();
    let mut bystander = wss_connect(addr, "/echo", ca.client_config()).await;

    let response = http_exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        !response.contains("200"),
        "plain HTTP was served: {response:?}"
    );
    // What came back, if anything, is a TLS alert record (content type 21).
    if let Some(first) = response.as_bytes().first() {
        assert_eq!(*first, 21, "{response:?}");
    }
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, garbage.read_to_end(&mut out))
        .await
        .expect("the server did not close")
        .ok();
    let text = eventually_metric(
        addr,
        &ca,
        "ringsocket_tls_handshake_failures_total{reason=\"not_tls\"}",
        1,
    )
    .await;
    assert!(
        counter(
            &text,
            "ringsocket_tls_handshake_failures_total{reason=\"protocol\"}"
        ) >= 1,
        "{text}"
    );
    bystander.send(WsMessage::text("still here")).await.unwrap();
    assert_eq!(
        next_data(&mut bystander).await,
        WsMessage::text("still here")
    );
}

/// A client that starts a TLS handshake and stalls is cut by the handshake timeout,
/// and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_cut_by_the_handshake_timeout() {
    let ca = TestCa::new("stall");
    let server = tls_server(&ca, |c| c.handshake_timeout_secs = 0.5);
    let addr = server.local_addr();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    // The first bytes of a ClientHello record, and then nothing.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut out))
        .await
        .expect("the stalled handshake was not cut")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(400));
    eventually_metric(
        addr,
        &ca,
        "ringsocket_tls_handshake_failures_total{reason=\"timeout\"}",
        1,
    )
    .await;
}

/// Reload: new handshakes get the new certificate, a connection opened before keeps
/// working; a bad file keeps the old certificate and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_the_new_certificate_to_new_handshakes() {
    let ca = TestCa::new("reload");
    let first = ca.server_cert("server", "first");
    let server = start(App::standard(), |c| {
        c.tls_cert = first.cert.display().to_string();
        c.tls_key = first.key.display().to_string();
    });
    let addr = server.local_addr();
    let mut old = wss_connect(addr, "/echo", ca.client_config()).await;
    let presented = |stream: &tokio_rustls::client::TlsStream<TcpStream>| {
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let before = tls_connect(addr, ca.client_config()).await.unwrap();
    assert_eq!(presented(&before), first.der);

    // The same paths, new contents.
    let second = ca.server_cert("server", "second");
    server.reload_tls().unwrap();
    let after = tls_connect(addr, ca.client_config()).await.unwrap();
    assert_eq!(presented(&after), second.der);
    assert_ne!(second.der, first.der);
    old.send(WsMessage::text("opened before the reload"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut old).await,
        WsMessage::text("opened before the reload")
    );

    // A broken key: refused, the second certificate stays.
    std::fs::write(&second.key, "not a key").unwrap();
    let err = server.reload_tls().unwrap_err();
    assert!(
        err.starts_with("tls_key ") && err.contains("server.key"),
        "{err}"
    );
    let still = tls_connect(addr, ca.client_config()).await.unwrap();
    assert_eq!(presented(&still), second.der);
}

/// Files that do not load stop `Server::start` with one line naming the file and the
/// cause: missing, not PEM, a key of another certificate, expired.
#[test]
fn bad_certificate_files_refuse_to_start() {
    let ca = TestCa::new("bad");
    let good = ca.server_cert("good", "good");
    let other = ca.server_cert("other", "other");
    let expired = ca.server_cert_valid("expired", "expired", Some((2001, 2002)));
    let garbage = ca.dir.join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let missing = ca.dir.join("missing.pem");
    let cases = [
        (&missing, &good.key, "tls_cert", "cannot read"),
        (&garbage, &good.key, "tls_cert", "no certificate"),
        (
            &good.cert,
            &garbage,
            "tls_key",
            "no PKCS#8, RSA or EC private key",
        ),
        (
            &good.cert,
            &other.key,
            "tls_key",
            "does not match the certificate",
        ),
        (&expired.cert, &expired.key, "tls_cert", "expired on"),
    ];
    for (cert, key, setting, cause) in cases {
        let mut config = common::config();
        config.bind = "127.0.0.1:0".parse().unwrap();
        config.tls_cert = cert.display().to_string();
        config.tls_key = key.display().to_string();
        let err = Server::start(config, Arc::new(App::standard())).unwrap_err();
        let ServeError::Tls(text) = &err else {
            panic!("not a TLS error: {err}");
        };
        assert!(text.starts_with(setting), "{text}");
        assert!(text.contains(cause), "{cause}: {text}");
        assert!(!text.contains('\n'), "{text}");
    }
}

/// `plain_bind`: a plain listener beside the TLS one serves /healthz without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_bind_serves_without_tls_beside_the_tls_listener() {
    let ca = TestCa::new("plain");
    let server = tls_server(&ca, |c| c.plain_bind = "127.0.0.1:0".into());
    let plain = server.plain_addr().expect("a plain listener");
    let response = http_exchange(
        plain,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let response = https_exchange(
        server.local_addr(),
        ca.client_config(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

/// `ringsocket bench` over wss://: `bench connect` opens 200 connections, each with a
/// full TLS handshake (no resumption), and `bench echo` runs briefly, trusting the test
/// CA (`--ca`) and then any certificate (`--insecure`, to 127.0.0.1), with no failure
/// of any kind. A CA that did not sign the server's certificate makes every connection
/// fail as a TLS handshake failure; with neither option, and for `bench broadcast`, the
/// command refuses to start and says why.
#[test]
fn bench_connect_and_echo_over_wss() {
    let ca = TestCa::new("bench");
    let server = tls_server(&ca, |_| {});
    let port = server.local_addr().port();
    let ca_file = ca.ca_file();
    let ca_file = ca_file.to_str().unwrap();
    let bench = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ringsocket"))
            .arg("bench")
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    let json = |out: &std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let handshakes = || {
        let text = server.metrics().render();
        counter(&text, "ringsocket_tls_handshakes_total")
    };

    let trusts: [(&str, &[&str]); 2] = [
        ("localhost", &["--ca", ca_file]),
        ("127.0.0.1", &["--insecure"]),
    ];
    for (host, trust) in trusts {
        let url = format!("wss://{host}:{port}/echo");
        let before = handshakes();
        let mut args = vec!["connect", url.as_str(), "--conns", "200", "--hold", "0.2"];
        args.extend(["--concurrency", "32", "--json"]);
        args.extend(trust);
        let report = json(&bench(&args));
        assert_eq!(report["tls"], true, "{report}");
        assert_eq!(report["opened"], 200, "{report}");
        assert_eq!(report["failed"], 0, "{report}");
        assert_eq!(report["dropped"], 0, "{report}");
        assert_eq!(report["close_failures"], 0, "{report}");
        assert!(handshakes() >= before + 200, "{}", handshakes() - before);

        let mut args = vec!["echo", url.as_str(), "--conns", "4", "--inflight", "4"];
        args.extend(["--duration", "0.3", "--warmup", "0.1", "--binary", "--json"]);
        args.extend(trust);
        let report = json(&bench(&args));
        assert_eq!(report["tls"], true, "{report}");
        assert!(report["messages"].as_u64().unwrap() > 0, "{report}");
        for field in ["errors", "mismatches", "unanswered", "close_failures"] {
            assert_eq!(report[field], 0, "{field}: {report}");
        }
    }

    // `--tls` on a ws:// URL speaks TLS too.
    let url = format!("ws://localhost:{port}/echo");
    let out = bench(&["connect", &url, "--conns", "4", "--hold", "0", "--tls"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pass --ca FILE") && stderr.contains("--insecure"),
        "{stderr}"
    );
    let report = json(&bench(&[
        "connect", &url, "--conns", "4", "--hold", "0", "--tls", "--ca", ca_file, "--json",
    ]));
    assert_eq!(report["opened"], 4, "{report}");

    // Neither --ca nor --insecure: refused before any connection, for both modes.
    let url = format!("wss://localhost:{port}/echo");
    for mode in ["connect", "echo"] {
        let out = bench(&[mode, &url]);
        assert!(!out.status.success(), "{mode}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("pass --ca FILE") && stderr.contains("--insecure"),
            "{mode}: {stderr}"
        );
    }

    // Another CA: the certificate is really checked, and the failure is named.
    let other = TestCa::new("bench-other");
    let other_file = other.ca_file();
    let out = bench(&[
        "connect",
        &url,
        "--conns",
        "3",
        "--hold",
        "0",
        "--ca",
        other_file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("3 of 3 connections") && stderr.contains("TLS handshake failed"),
        "{stderr}"
    );

    // Broadcast keeps to plain TCP, and says so rather than failing later.
    let room = format!("wss://localhost:{port}/ws/news");
    let out = bench(&["broadcast", &room, "--insecure"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bench broadcast does not speak TLS yet"),
        "{stderr}"
    );
}

/// `ringsocket serve --tls-cert … --tls-key …` as a user runs it: it serves wss:// and
/// https://, and SIGHUP reloads the certificate (new handshakes get the new one; a
/// broken key keeps it and logs why), then SIGTERM stops it.
#[test]
fn sighup_reloads_the_certificate_of_the_binary() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let ca = TestCa::new("sighup");
    let first = ca.server_cert("server", "first");
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringsocket"));
    for (key, _) in std::env::vars() {
        if key.starts_with("RINGSOCKET_") {
            command.env_remove(key);
        }
    }
    let mut child = command
        .current_dir(&ca.dir)
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--tls-cert",
        ])
        .arg(&first.cert)
        .arg("--tls-key")
        .arg(&first.key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("wss://127.0.0.1:") && line.contains("https://"),
        "{line}"
    );
    let port: u16 = line
        .split("wss://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|port| port.parse().ok())
        .expect("a port in the listening line");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines() {
            match line {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        lines
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let presented = |addr| {
        runtime.block_on(async {
            let stream = tls_connect(addr, ca.client_config()).await.unwrap();
            stream.get_ref().1.peer_certificates().unwrap()[0].clone()
        })
    };
    let hup = || {
        // SAFETY: kill(2) on our own child's pid, with a valid signal number.
        let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
        assert_eq!(sent, 0);
    };
    assert_eq!(presented(addr), first.der);

    let second = ca.server_cert("server", "second");
    hup();
    let deadline = Instant::now() + PATIENCE;
    while presented(addr) != second.der {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the certificate"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&second.key, "broken").unwrap();
    hup();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        presented(addr),
        second.der,
        "a broken key replaced the certificate"
    );

    // SAFETY: kill(2) on our own child's pid, with a valid signal number.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let lines = log.join().unwrap();
    assert!(
        lines.iter().any(|l| l.contains("TLS certificate reloaded")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("TLS certificate not reloaded") && l.contains("server.key")),
        "{lines:#?}"
    );
}
