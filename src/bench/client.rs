//! One client connection: TCP from tokio (with TLS from tokio-rustls over it for
//! `wss://`), the opening handshake and the frames from the client role of
//! [`crate::proto`] ([`ClientRequest`], [`Connection::client`]).

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
use crate::proto::{
    ClientHandshakeError, ClientRequest, CloseCode, Connection, Event, HandshakeLimits, Limits,
};

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
        }
    }
}

/// Connects to `target` (from `source` if given), performs the TLS handshake when `tls`
/// is given, then the opening handshake with a random key, and returns the
/// connection, with any frames that followed the response already handed to it.
pub(crate) async fn open(
    target: &Target,
    tls: Option<&Tls>,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<Client, OpenError> {
    match tokio::time::timeout(timeout, open_inner(target, tls, source)).await {
        Ok(result) => result,
        Err(_) => Err(OpenError::Timeout(timeout)),
    }
}

async fn open_inner(
    target: &Target,
    tls: Option<&Tls>,
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
    let handshake = ClientRequest {
        host: &target.host,
        target: &target.path,
        protocols: &[],
        headers: &[],
    }
    .encode(key, &mut out);
    stream.write_all(&out).await.map_err(OpenError::Io)?;
    stream.flush().await.map_err(OpenError::Io)?;

    let limits = HandshakeLimits::default();
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if stream.read_buf(&mut buf).await.map_err(OpenError::Io)? == 0 {
            return Err(OpenError::ClosedInHandshake);
        }
        if let Some((_response, head_len)) = handshake
            .parse_response(&buf, &limits)
            .map_err(OpenError::Handshake)?
        {
            let mut conn = Connection::client(Limits::default(), mask_seed);
            conn.handle_bytes(&buf[head_len..]);
            return Ok(Client { stream, conn });
        }
    }
}

impl Client {
    /// Writes everything the connection has queued, and pushes it onto the socket:
    /// TLS may keep records back until flushed (for plain TCP the flush does nothing).
    pub async fn flush(&mut self) -> io::Result<()> {
        while let Some(chunk) = self.conn.poll_transmit() {
            self.stream.write_all(&chunk).await?;
        }
        self.stream.flush().await
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
