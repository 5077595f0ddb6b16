//! The TLS session against rustls's own client, in memory: no socket, no runtime.

use std::io::{Read, Write};
use std::sync::Arc;

use bytes::BytesMut;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

use super::{Input, MAX_RECORD_PLAINTEXT, TlsSession};
use crate::metrics::TlsFailure;

fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let der: CertificateDer<'static> = cert.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (Arc::new(server), Arc::new(client))
}

fn client(config: Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap()
}

/// Moves everything the client has to send into the server session, `chunk` bytes at
/// a time (1: every record arrives in pieces), and returns the plaintext it gave.
fn client_to_server(
    client: &mut ClientConnection,
    server: &mut TlsSession,
    chunk: usize,
) -> Vec<u8> {
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    let mut plain = Vec::new();
    for piece in wire.chunks(chunk) {
        let mut buf = BytesMut::from(&b"kept"[..]);
        buf.extend_from_slice(piece);
        server.handle_input(&mut buf, 4).unwrap();
        assert_eq!(&buf[..4], b"kept", "bytes before `start` are the caller's");
        plain.extend_from_slice(&buf[4..]);
    }
    plain
}

/// Moves the server's output into the client and returns the plaintext it read.
fn server_to_client(
    server: &mut TlsSession,
    extra: &[u8],
    client: &mut ClientConnection,
) -> Vec<u8> {
    let mut wire = server.take_output();
    wire.extend_from_slice(extra);
    let mut reader = &wire[..];
    let mut plain = Vec::new();
    while !reader.is_empty() {
        client.read_tls(&mut reader).unwrap();
        client.process_new_packets().unwrap();
        match client.reader().read_to_end(&mut plain) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    plain
}

fn handshake(chunk: usize) -> (TlsSession, ClientConnection) {
    let (server_config, client_config) = configs();
    let mut server = TlsSession::new(server_config).unwrap();
    let mut client = client(client_config);
    for _ in 0..4 {
        client_to_server(&mut client, &mut server, chunk);
        server_to_client(&mut server, &[], &mut client);
        if !server.is_handshaking() && !client.is_handshaking() {
            break;
        }
    }
    assert!(!server.is_handshaking() && !client.is_handshaking());
    (server, client)
}

#[test]
fn handshake_then_data_both_ways() {
    let (mut server, mut client) = handshake(usize::MAX);
    assert_eq!(client.alpn_protocol(), Some(&b"http/1.1"[..]));
    client
        .writer()
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(
        client_to_server(&mut client, &mut server, usize::MAX),
        b"GET / HTTP/1.1\r\n\r\n"
    );
    let mut out = Vec::new();
    server
        .encrypt(b"HTTP/1.1 200 OK\r\n\r\n", &mut out)
        .unwrap();
    assert_eq!(
        server_to_client(&mut server, &out, &mut client),
        b"HTTP/1.1 200 OK\r\n\r\n"
    );
}

/// Records split across reads down to single bytes: the start of a record waits in
/// the session until the rest comes.
#[test]
fn records_in_one_byte_pieces() {
    let (mut server, mut client) = handshake(1);
    let message: Vec<u8> = (0..40_000).map(|i| (i % 253) as u8).collect();
    client.writer().write_all(&message).unwrap();
    assert_eq!(client_to_server(&mut client, &mut server, 1), message);
}

/// Plaintext larger than a record is cut into records; the client reads it whole.
#[test]
fn large_plaintext_spans_records() {
    let (mut server, mut client) = handshake(usize::MAX);
    let message: Vec<u8> = (0..3 * MAX_RECORD_PLAINTEXT + 5).map(|i| i as u8).collect();
    let mut out = Vec::new();
    server.encrypt(&message, &mut out).unwrap();
    // Four records, each with its header.
    assert!(out.len() > message.len() + 4 * 5);
    assert_eq!(server_to_client(&mut server, &out, &mut client), message);
}

/// An idle session holds no buffer: nothing incoming, nothing outgoing.
#[test]
fn an_idle_session_holds_no_buffer() {
    let (mut server, mut client) = handshake(7);
    client.writer().write_all(b"ping").unwrap();
    client_to_server(&mut client, &mut server, usize::MAX);
    assert_eq!(server.incoming.capacity(), 0);
    assert_eq!(server.outgoing.capacity(), 0);
    assert!(server.output().is_empty());
}

/// Output the socket took in part: the rest comes first, then what is pushed after.
#[test]
fn output_advances_and_pushes_in_order() {
    let (mut server, mut client) = handshake(usize::MAX);
    let mut first = Vec::new();
    server.encrypt(b"first ", &mut first).unwrap();
    let mut second = Vec::new();
    server.encrypt(b"second", &mut second).unwrap();
    server.push_output(&first);
    server.advance_output(3);
    let mut wire = first[..3].to_vec();
    wire.extend_from_slice(server.output());
    server.advance_output(server.output().len());
    assert_eq!(server.outgoing.capacity(), 0);
    wire.extend_from_slice(&second);
    assert_eq!(
        server_to_client(&mut server, &wire, &mut client),
        b"first second"
    );
}

/// Plain HTTP on the TLS port: an error naming it, an alert to send, and nothing more
/// is taken.
#[test]
fn plain_http_is_refused_with_an_alert() {
    let (server_config, _) = configs();
    let mut server = TlsSession::new(server_config).unwrap();
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
    let error = server.handle_input(&mut buf, 0).unwrap_err();
    assert_eq!(server.failure(&error), TlsFailure::NotTls);
    assert!(buf.is_empty(), "no plaintext from garbage");
    assert_eq!(server.output().first(), Some(&21), "an alert record");
    let mut more = BytesMut::from(&b"more"[..]);
    assert!(server.handle_input(&mut more, 0).is_err());
    assert!(server.encrypt(b"x", &mut Vec::new()).is_err());
}

/// A handshake record that is not a ClientHello: a protocol failure.
#[test]
fn a_broken_handshake_is_a_protocol_failure() {
    let (server_config, _) = configs();
    let mut server = TlsSession::new(server_config).unwrap();
    let mut buf = BytesMut::from(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5][..]);
    let error = server.handle_input(&mut buf, 0).unwrap_err();
    assert_eq!(server.failure(&error), TlsFailure::Protocol, "{error}");
}

/// Nothing is encrypted before the handshake is over.
#[test]
fn no_data_before_the_handshake() {
    let (server_config, _) = configs();
    let mut server = TlsSession::new(server_config).unwrap();
    assert!(server.encrypt(b"early", &mut Vec::new()).is_err());
}

/// close_notify from the client: the session says the peer closed.
#[test]
fn close_notify_is_seen() {
    let (mut server, mut client) = handshake(usize::MAX);
    client.send_close_notify();
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    let mut buf = BytesMut::from(&wire[..]);
    assert_eq!(server.handle_input(&mut buf, 0).unwrap(), Input::PeerClosed);
    assert!(server.peer_closed());
}
