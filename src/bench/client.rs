//! One client connection: TCP from tokio (with TLS from tokio-rustls over it for
//! `wss://`), the opening handshake and the frames from the client role of
//! [`crate::proto`] ([`ClientRequest`], [`Connection::client`]), with permessage-deflate
//! when `--deflate` offers it ([`deflate::client_offer`], [`PerMessageDeflate`]).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use super::target::Target;
use super::tls::Tls;
use crate::proto::deflate;
use crate::proto::{
    Accepted, ClientHandshake, ClientHandshakeError, ClientRequest, CloseCode, Connection, Event,
    HandshakeLimits, Limits, PerMessageDeflate, Role,
};

/// The zlib level the load generator compresses with (`--deflate`): the fastest, so
/// that its CPU goes to the load and the server's compression is what is measured.
pub(crate) const DEFLATE_LEVEL: u32 = 1;

/// With `--deflate`, messages shorter than this go out uncompressed: 0, every message
/// is tried, as browsers do; one that does not shrink goes out plain.
pub(crate) const DEFLATE_MIN_BYTES: usize = 0;

/// An open WebSocket connection in the client role.
#[derive(Debug)]
pub(crate) struct Client {
    pub stream: BenchStream,
    pub conn: Connection,
}

/// A client's byte stream: plain TCP, or TLS over TCP. Both read and write through
/// tokio's traits, so the scenarios need not know which; `bench broadcast`, which
/// takes the socket out of tokio, needs [`BenchStream::into_plain`].
#[derive(Debug)]
pub(crate) enum BenchStream {
    Plain(TcpStream),
    /// Boxed: a TLS session holds its state and buffers, a `TcpStream` a few words.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BenchStream {
    /// The TCP stream of a plain connection; an error for a TLS one, whose bytes on
    /// the socket are records that only the TLS session can read.
    pub fn into_plain(self) -> io::Result<TcpStream> {
        match self {
            Self::Plain(stream) => Ok(stream),
            Self::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a TLS connection has no plain TCP stream to hand over",
            )),
        }
    }
}

impl AsyncRead for BenchStream {
    /// Reads plaintext. A TLS peer that closes TCP without a close_notify alert ends
    /// the stream (a read of 0), as a plain one would, rather than failing the read:
    /// servers commonly do so right after the WebSocket Close, and the scenarios tell
    /// a close without a Close frame (1006) from a failed read.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(stream) => match Pin::new(&mut **stream).poll_read(cx, buf) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    Poll::Ready(Ok(()))
                }
                other => other,
            },
        }
    }
}

impl AsyncWrite for BenchStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(stream) => Pin::new(&mut **stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Self::Tls(stream) => Pin::new(&mut **stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_write_vectored(),
            Self::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls(stream) => Pin::new(&mut **stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(stream) => Pin::new(&mut **stream).poll_shutdown(cx),
        }
    }
}

/// Why a connection could not be opened, worded as a cause to count.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// `socket`, `bind` or `connect` failed.
    Connect(SocketAddr, io::Error),
    /// The TLS handshake failed: the certificate was refused, no common version or
    /// suite, or the connection broke during it.
    Tls(io::Error),
    /// The server refused or botched the handshake.
    Handshake(ClientHandshakeError),
    /// The server closed the connection before its handshake response was complete.
    ClosedInHandshake,
    /// Reading or writing the handshake failed.
    Io(io::Error),
    /// Connect and handshake together took longer than the timeout.
    Timeout(Duration),
    /// The OS random source failed.
    Random(getrandom::Error),
    /// `--deflate` offered permessage-deflate and the server at this URL answered
    /// without it.
    DeflateRefused(String),
    /// A subprotocol was required (`bench broadcast --v1`: `ringsocket.v1`) and the
    /// server at this URL (the first field) answered without it.
    ProtocolRefused(String, &'static str),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(addr, e) => {
                write!(f, "cannot connect to {addr}: {e}")?;
                match e.raw_os_error() {
                    Some(libc::EMFILE) | Some(libc::ENFILE) => {
                        f.write_str(" (raise the open-file limit: ulimit -n 100000)")
                    }
                    Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => {
                        f.write_str(" (out of ephemeral ports: spread sources with --source-addrs)")
                    }
                    _ => Ok(()),
                }
            }
            Self::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Self::Handshake(ClientHandshakeError::Status(status, reason)) => {
                write!(f, "handshake refused: HTTP {status} {reason}")
            }
            Self::Handshake(e) => write!(f, "handshake failed: {e}"),
            Self::ClosedInHandshake => {
                f.write_str("connection closed by the server during the handshake")
            }
            Self::Io(e) => write!(f, "handshake I/O error: {e}"),
            Self::Timeout(t) => write!(
                f,
                "connect and handshake timed out after {:.1} s",
                t.as_secs_f64()
            ),
            Self::Random(e) => write!(f, "the OS random source failed: {e}"),
            Self::DeflateRefused(url) => write!(
                f,
                "{url}: server did not accept permessage-deflate (offered by --deflate; its \
                 101 response has no Sec-WebSocket-Extensions for it)"
            ),
            Self::ProtocolRefused(url, protocol) => write!(
                f,
                "{url}: server did not choose the subprotocol {protocol} (its 101 response \
                 has no Sec-WebSocket-Protocol: {protocol})"
            ),
        }
    }
}

/// Connects to `target` (from `source` if given), performs the TLS handshake when `tls`
/// is given, then the opening handshake with a random key (offering permessage-deflate
/// when `deflate`, which the server must then accept), and returns the connection, with
/// any frames that followed the response already handed to it.
pub(crate) async fn open(
    target: &Target,
    tls: Option<&Tls>,
    deflate: bool,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<Client, OpenError> {
    open_with_protocol(target, tls, deflate, None, source, timeout).await
}

/// [`open`], offering the subprotocol `protocol` when given, which the server must then
/// choose ([`OpenError::ProtocolRefused`] otherwise).
pub(crate) async fn open_with_protocol(
    target: &Target,
    tls: Option<&Tls>,
    deflate: bool,
    protocol: Option<&'static str>,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<Client, OpenError> {
    let opening = open_inner(target, tls, deflate, protocol, source);
    match tokio::time::timeout(timeout, opening).await {
        Ok(result) => result,
        Err(_) => Err(OpenError::Timeout(timeout)),
    }
}

/// Writes the opening handshake's request for `target` into `out`; with `deflate`, it
/// offers permessage-deflate, with `protocol`, that subprotocol.
pub(crate) fn request(
    target: &Target,
    deflate: bool,
    protocol: Option<&str>,
    key: [u8; 16],
    out: &mut BytesMut,
) -> ClientHandshake {
    let offer = [("Sec-WebSocket-Extensions", deflate::client_offer())];
    let protocols: &[&str] = match &protocol {
        Some(p) => std::slice::from_ref(p),
        None => &[],
    };
    ClientRequest {
        host: &target.host,
        target: &target.path,
        protocols,
        headers: if deflate { &offer } else { &[] },
    }
    .encode(key, out)
}

/// The connection that a response the client accepted opens: with permessage-deflate
/// when the server accepted it; an error when `deflate` asked for it and the server
/// did not.
pub(crate) fn connection(
    target: &Target,
    response: &Accepted,
    deflate: bool,
    mask_seed: [u8; 32],
) -> Result<Connection, OpenError> {
    let mut conn = Connection::client(Limits::default(), mask_seed);
    match (&response.deflate, deflate) {
        (Some(params), _) => conn.set_deflate(PerMessageDeflate::new(
            params,
            Role::Client,
            DEFLATE_LEVEL,
            DEFLATE_MIN_BYTES,
        )),
        (None, true) => return Err(OpenError::DeflateRefused(target.url.clone())),
        (None, false) => {}
    }
    Ok(conn)
}

async fn open_inner(
    target: &Target,
    tls: Option<&Tls>,
    deflate: bool,
    protocol: Option<&'static str>,
    source: Option<IpAddr>,
) -> Result<Client, OpenError> {
    let addr = target.addr;
    let connect_err = |e| OpenError::Connect(addr, e);
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(connect_err)?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).map_err(connect_err)?;
    }
    let tcp = socket.connect(addr).await.map_err(connect_err)?;
    tcp.set_nodelay(true).map_err(connect_err)?;
    let mut stream = match tls {
        None => BenchStream::Plain(tcp),
        Some(tls) => {
            let session = tls
                .connector
                .connect(tls.server_name.clone(), tcp)
                .await
                .map_err(OpenError::Tls)?;
            BenchStream::Tls(Box::new(session))
        }
    };

    let mut key = [0u8; 16];
    let mut mask_seed = [0u8; 32];
    getrandom::fill(&mut key).map_err(OpenError::Random)?;
    getrandom::fill(&mut mask_seed).map_err(OpenError::Random)?;
    let mut out = BytesMut::new();
    let handshake = request(target, deflate, protocol, key, &mut out);
    stream.write_all(&out).await.map_err(OpenError::Io)?;
    stream.flush().await.map_err(OpenError::Io)?;

    let limits = HandshakeLimits::default();
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if stream.read_buf(&mut buf).await.map_err(OpenError::Io)? == 0 {
            return Err(OpenError::ClosedInHandshake);
        }
        if let Some((response, head_len)) = handshake
            .parse_response(&buf, &limits)
            .map_err(OpenError::Handshake)?
        {
            if let Some(protocol) = protocol {
                if response.protocol.as_deref() != Some(protocol) {
                    return Err(OpenError::ProtocolRefused(target.url.clone(), protocol));
                }
            }
            let mut conn = connection(target, &response, deflate, mask_seed)?;
            conn.handle_bytes(&buf[head_len..]);
            return Ok(Client { stream, conn });
        }
    }
}

impl Client {
    /// Writes everything the connection has queued, and pushes it onto the socket:
    /// TLS may keep records back until flushed (for plain TCP the flush does nothing).
    /// Returns the bytes written (WebSocket frames, before TLS).
    pub async fn flush(&mut self) -> io::Result<u64> {
        let mut written = 0;
        while let Some(chunk) = self.conn.poll_transmit() {
            self.stream.write_all(&chunk).await?;
            written += chunk.len() as u64;
        }
        self.stream.flush().await?;
        Ok(written)
    }

    /// Starts the closing handshake with 1000 and waits up to `timeout` for the
    /// server's Close. Returns whether it came.
    pub async fn close(&mut self, timeout: Duration) -> bool {
        if self.conn.close(CloseCode::Normal, "").is_err() {
            return self.conn.is_closed();
        }
        let exchange = async {
            self.flush().await?;
            let mut buf = [0u8; 512];
            loop {
                while let Ok(Some(event)) = self.conn.poll_event() {
                    if matches!(event, Event::Close(_)) {
                        return Ok(true);
                    }
                }
                if self.conn.is_closed() {
                    return Ok(false);
                }
                let n = self.stream.read(&mut buf).await?;
                if n == 0 {
                    return Ok(false);
                }
                self.conn.handle_bytes(&buf[..n]);
            }
        };
        matches!(
            tokio::time::timeout(timeout, exchange).await,
            Ok(Ok::<bool, io::Error>(true))
        )
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;
    use crate::proto::{AcceptKey, DeflateParams};

    const KEY: [u8; 16] = [7; 16];

    fn target() -> Target {
        Target::resolve("ws://127.0.0.1:9/echo").unwrap()
    }

    /// A 101 for `KEY`, with `extensions` if given.
    fn response(extensions: Option<&str>) -> Vec<u8> {
        let key = base64::engine::general_purpose::STANDARD.encode(KEY);
        let accept = AcceptKey::from_key(key.as_bytes());
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n",
            accept.as_str()
        );
        if let Some(value) = extensions {
            out.push_str(&format!("Sec-WebSocket-Extensions: {value}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    /// The request, and the response parsed by its handshake.
    fn exchange(deflate: bool, extensions: Option<&str>) -> (String, Accepted) {
        let mut out = BytesMut::new();
        let handshake = request(&target(), deflate, None, KEY, &mut out);
        let (accepted, _) = handshake
            .parse_response(&response(extensions), &HandshakeLimits::default())
            .unwrap()
            .unwrap();
        (String::from_utf8(out.to_vec()).unwrap(), accepted)
    }

    #[test]
    fn deflate_is_offered_only_when_asked() {
        let (with, _) = exchange(true, None);
        assert!(
            with.contains(
                "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            ),
            "{with}"
        );
        let (without, _) = exchange(false, None);
        assert!(!without.contains("Sec-WebSocket-Extensions"), "{without}");
    }

    #[test]
    fn a_server_that_does_not_accept_deflate_fails_the_connection_by_name() {
        let (_, accepted) = exchange(true, None);
        let err = connection(&target(), &accepted, true, [0; 32]).unwrap_err();
        assert!(matches!(err, OpenError::DeflateRefused(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with("ws://127.0.0.1:9/echo: server did not accept permessage-deflate"),
            "{text}"
        );
        // Without --deflate, the same response opens a plain connection.
        let conn = connection(&target(), &accepted, false, [0; 32]).unwrap();
        assert!(conn.deflate().is_none());
    }

    /// The server accepts: the client compresses what it sends (RSV1, fewer bytes) and
    /// inflates what the server compresses, through the client role of `proto` against
    /// its server role.
    #[test]
    fn an_accepted_offer_compresses_both_ways() {
        let answer = "permessage-deflate; server_no_context_takeover; client_max_window_bits=12";
        let (_, accepted) = exchange(true, Some(answer));
        let params = accepted.deflate.unwrap();
        assert_eq!(
            params,
            DeflateParams {
                server_no_context_takeover: true,
                client_max_window_bits: 12,
                ..DeflateParams::default()
            }
        );
        let mut client = connection(&target(), &accepted, true, [3; 32]).unwrap();
        let codec = client.deflate().unwrap();
        assert_eq!(
            (codec.level(), codec.min_bytes()),
            (DEFLATE_LEVEL, DEFLATE_MIN_BYTES)
        );
        let mut server = Connection::server(Limits::default());
        server.set_deflate(PerMessageDeflate::new(&params, Role::Server, 6, 0));

        let text = "{\"sym\":\"BTC-USD\",\"side\":\"buy\"},".repeat(40);
        client.send_text(text.clone()).unwrap();
        let mut wire = Vec::new();
        while let Some(chunk) = client.poll_transmit() {
            wire.extend_from_slice(&chunk);
        }
        assert_eq!(wire[0] & 0x40, 0x40, "RSV1: a compressed message");
        assert!(
            wire.len() * 4 < text.len(),
            "{} bytes on the wire",
            wire.len()
        );
        server.handle_bytes(&wire);
        match server.poll_event() {
            Ok(Some(Event::Text(got))) => assert_eq!(got.as_str(), text),
            other => panic!("{other:?}"),
        }

        server.send_text(text.clone()).unwrap();
        let mut wire = Vec::new();
        while let Some(chunk) = server.poll_transmit() {
            wire.extend_from_slice(&chunk);
        }
        assert_eq!(wire[0] & 0x40, 0x40);
        client.handle_bytes(&wire);
        match client.poll_event() {
            Ok(Some(Event::Text(got))) => assert_eq!(got.as_str(), text),
            other => panic!("{other:?}"),
        }
    }
}
