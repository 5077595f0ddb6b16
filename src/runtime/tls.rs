//! TLS on the server's listeners: the certificate (loaded, checked, reloaded without a
//! restart), the rustls configuration every handshake uses ([`TlsAcceptor`]), and the
//! socket of a TLS connection (`TlsStream`), which the transport seam
//! (`core::transport::Stream::Tls`) puts in front of a plain socket of either backend.
//!
//! ```text
//!   driver ── read ──▶ TlsStream::read ── ciphertext ◀── inner socket (uring | epoll)
//!                         └─ core::tls::TlsSession: decrypt, handshake flights ──▶ inner
//!   outbox ── try_write(plaintext) ──▶ encrypt ──▶ send(MSG_DONTWAIT) ──▶ inner's fd
//!                                                  └─ what the socket did not take:
//!                                                     the session's output, sent first
//! ```
//!
//! Crypto: rustls on the *aws-lc-rs* provider, rustls's default: the hybrid
//! post-quantum key exchange browsers offer first (X25519MLKEM768), and AWS-LC's
//! assembly for AES-GCM, ChaCha20-Poly1305 and P-256. It builds with the C compiler
//! alone (no cmake, Go or bindgen on x86_64 and aarch64 Linux: measured, 46 s from
//! scratch), so `cargo run --release -- serve` works on a clean machine. *ring* was the
//! other candidate; rustls 0.23.48 deprecates its provider for want of post-quantum
//! key exchange.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, RwLock};

use bytes::{Bytes, BytesMut};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, version};
use socket2::SockRef;

use super::buf::consume_written;
use super::core::tls::{MAX_RECORD_PLAINTEXT, TlsSession};
use super::core::transport::Stream;
pub use crate::config::CertFiles;
use crate::metrics::{TlsFailure, WorkerMetrics};

/// Plaintext one non-blocking write encrypts at most: what the socket does not take of
/// it waits as ciphertext (the session's output), so a connection holds at most about
/// this much more than the outbox counts.
const TRY_WRITE_PLAINTEXT: usize = 4 * MAX_RECORD_PLAINTEXT;

/// Room for a read while the handshake runs.
const HANDSHAKE_READ: usize = 4096;

/// Plaintext one waiting write encrypts before it sends.
const WAIT_WRITE_PLAINTEXT: usize = 4 * MAX_RECORD_PLAINTEXT;

// ---- the certificate --------------------------------------------------------------

/// A certificate and key that were read and checked: the chain parses, the key is one
/// rustls can sign with, they match, and the certificate is valid now.
struct Loaded {
    key: Arc<CertifiedKey>,
    /// Seconds since the epoch when the certificate expires.
    not_after: i64,
}

fn load(files: &CertFiles, provider: &CryptoProvider) -> Result<Loaded, String> {
    let cert_name = files.cert.display();
    let key_name = files.key.display();
    let read = |path: &Path, setting: &str| {
        std::fs::read(path).map_err(|e| format!("{setting} {}: cannot read: {e}", path.display()))
    };
    let cert_pem = read(&files.cert, "tls_cert")?;
    let key_pem = read(&files.key, "tls_key")?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls_cert {cert_name}: not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "tls_cert {cert_name}: no certificate in it (expected -----BEGIN CERTIFICATE-----)"
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("tls_key {key_name}: no PKCS#8, RSA or EC private key in it: {e}"))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("tls_key {key_name}: unusable private key: {e}"))?;
    let end_entity = chain[0].clone();
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!("tls_key {key_name} does not match the certificate in tls_cert {cert_name}: {e}")
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&end_entity)
        .map_err(|e| format!("tls_cert {cert_name}: cannot parse the certificate: {e}"))?;
    let validity = parsed.validity();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if validity.not_after.timestamp() < now {
        return Err(format!(
            "tls_cert {cert_name}: the certificate expired on {}",
            validity.not_after
        ));
    }
    if validity.not_before.timestamp() > now {
        return Err(format!(
            "tls_cert {cert_name}: the certificate is not valid before {}",
            validity.not_before
        ));
    }
    Ok(Loaded {
        key: Arc::new(certified),
        not_after: validity.not_after.timestamp(),
    })
}

/// The certificate new handshakes use; replaced whole by a reload.
struct CertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertSlot")
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        Some(current.clone())
    }
}

/// What every TLS listener of the process shares: the rustls configuration and the
/// certificate it serves.
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
    slot: Arc<CertSlot>,
    files: CertFiles,
    provider: Arc<CryptoProvider>,
    not_after: std::sync::atomic::AtomicI64,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Reads and checks the certificate and key; the error is one line naming the file
    /// and the cause. TLS 1.2 and 1.3, ALPN `http/1.1`, stateless session tickets (one
    /// per handshake, keys rotated by rustls), no client certificates.
    pub fn new(files: CertFiles) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let loaded = load(&files, &provider)?;
        let slot = Arc::new(CertSlot {
            current: RwLock::new(loaded.key),
        });
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| format!("TLS session tickets: {e}"))?;
        config.send_tls13_tickets = 1;
        // Tickets carry the session: no cache shared (and locked) by all the cores.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Self {
            config: Arc::new(config),
            slot,
            files,
            provider,
            not_after: loaded.not_after.into(),
        })
    }

    /// Reads the files again: new handshakes use the new certificate, connections open
    /// keep theirs. A file that does not load keeps the old certificate; the error says
    /// why.
    pub fn reload(&self) -> Result<(), String> {
        let loaded = load(&self.files, &self.provider)?;
        *self.slot.current.write().unwrap_or_else(|e| e.into_inner()) = loaded.key;
        self.not_after
            .store(loaded.not_after, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Seconds since the epoch when the certificate served now expires.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The files it loads.
    pub fn files(&self) -> &CertFiles {
        &self.files
    }

    /// A session for a new connection.
    pub(crate) fn session(&self) -> Result<TlsSession, rustls::Error> {
        TlsSession::new(self.config.clone())
    }
}

// ---- the socket ---------------------------------------------------------------------

/// A TLS connection's socket: a plain socket of the worker's backend and the session
/// that encrypts what goes through it (see the module docs).
pub(crate) struct TlsStream {
    inner: Stream,
    session: RefCell<TlsSession>,
    /// A write that waits for room is in flight (the driver's, or the handshake's):
    /// nothing else may send, or bytes would overtake it.
    flushing: Cell<bool>,
    metrics: Arc<WorkerMetrics>,
}

/// Clears `flushing` when the write that set it ends or is dropped.
struct Flushing<'a>(&'a Cell<bool>);

impl<'a> Flushing<'a> {
    fn start(flag: &'a Cell<bool>) -> Self {
        debug_assert!(!flag.get(), "two waiting TLS writes at once");
        flag.set(true);
        Self(flag)
    }
}

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl TlsStream {
    pub(crate) fn new(inner: Stream, session: TlsSession, metrics: Arc<WorkerMetrics>) -> Self {
        debug_assert!(!matches!(inner, Stream::Tls(_)));
        Self {
            inner,
            session: RefCell::new(session),
            flushing: Cell::new(false),
            metrics,
        }
    }

    /// The handshake is not over yet.
    pub(crate) fn is_handshaking(&self) -> bool {
        self.session.borrow().is_handshaking()
    }

    /// Counts a handshake cut by the handshake timeout.
    pub(crate) fn handshake_timed_out(&self) {
        if self.is_handshaking() {
            self.metrics.tls_handshake_failed(TlsFailure::Timeout);
        }
    }

    /// Ciphertext waiting to be sent before anything else.
    pub(crate) fn backlog(&self) -> usize {
        self.session.borrow().output().len()
    }

    /// Reads plaintext into `buf` after its length, as [`Stream::read_boxed`] does:
    /// reads ciphertext with `read_plain` (the inner socket's own read), decrypts it,
    /// and answers the handshake on the way. Returns the plaintext bytes appended (0:
    /// the peer closed, or sent close_notify).
    ///
    /// What an idle connection holds is this future, waiting in `read_plain`: so the
    /// handshake's path (its flights' waiting writes) is a future of its own, boxed
    /// only while the handshake runs, and `read_plain` is the backend's read alone, not
    /// a future as large as the larger of the two backends' (measured: 640 B a
    /// connection for both together, on io_uring).
    pub(crate) async fn read<F>(
        &self,
        mut buf: BytesMut,
        read_plain: F,
    ) -> (io::Result<usize>, BytesMut)
    where
        F: AsyncFn(BytesMut) -> (io::Result<usize>, BytesMut),
    {
        if self.is_handshaking() {
            return Box::pin(self.read_handshaking(buf)).await;
        }
        let start = buf.len();
        loop {
            if self.session.borrow().peer_closed() {
                return (Ok(0), buf);
            }
            // The buffer is the one the caller's tiers chose (small while idle: what
            // a waiting io_uring read holds), grown only when it has no room at all.
            if buf.capacity() == buf.len() {
                buf.reserve(super::buf::SMALL_READ);
            }
            let (read, back) = read_plain(buf).await;
            buf = back;
            if let Some(done) = self.take_read(read, &mut buf, start, false) {
                return (done, buf);
            }
            // A key update's answer, say: now if the socket takes it, otherwise
            // before the next write (the outbox sees the backlog).
            self.send_output_now();
            if let Some(done) = self.plaintext_or_close(&buf, start) {
                return (done, buf);
            }
        }
    }

    /// The socket below TLS.
    pub(crate) fn inner(&self) -> &Stream {
        &self.inner
    }

    /// [`TlsStream::read`] while the handshake runs; it goes on to the first plaintext.
    async fn read_handshaking(&self, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        let start = buf.len();
        loop {
            let handshaking = self.is_handshaking();
            if self.session.borrow().peer_closed() {
                return (Ok(0), buf);
            }
            // The handshake's flights are a few KiB (more with post-quantum key
            // shares): room for them in one read.
            if handshaking && buf.capacity() - buf.len() < HANDSHAKE_READ {
                buf.reserve(HANDSHAKE_READ);
            } else if buf.capacity() == buf.len() {
                buf.reserve(super::buf::SMALL_READ);
            }
            // While the handshake runs the client's flight is usually there already
            // (deferred accepts; the answer to our flight): take it without waiting.
            let (read, back) = match handshaking.then(|| self.inner.recv_now(&mut buf)) {
                Some(Some(read)) => (read, buf),
                _ => self.inner.read_plain(buf).await,
            };
            buf = back;
            if let Some(done) = self.take_read(read, &mut buf, start, handshaking) {
                return (done, buf);
            }
            if handshaking {
                // Nothing else writes before the handshake is over (the HTTP phase
                // writes after a request, which comes after it).
                if let Err(e) = self.flush_output().await {
                    if self.is_handshaking() {
                        self.metrics.tls_handshake_failed(TlsFailure::Io);
                    }
                    return (Err(e), buf);
                }
            } else {
                self.send_output_now();
            }
            if let Some(done) = self.plaintext_or_close(&buf, start) {
                return (done, buf);
            }
        }
    }

    /// Takes what a read of the socket gave (`read`, ciphertext after `buf[start..]`)
    /// into the session, leaving the plaintext in its place: `Some` when the read is
    /// over (the peer closed, an error; counted while `handshaking`), `None` to go on
    /// (send the session's output, then see [`TlsStream::plaintext_or_close`]).
    fn take_read(
        &self,
        read: io::Result<usize>,
        buf: &mut BytesMut,
        start: usize,
        handshaking: bool,
    ) -> Option<io::Result<usize>> {
        match read {
            Ok(0) => {
                buf.truncate(start);
                if handshaking {
                    self.metrics.tls_handshake_failed(TlsFailure::Eof);
                }
                return Some(Ok(0));
            }
            Ok(_) => {}
            Err(e) => {
                buf.truncate(start);
                if handshaking {
                    self.metrics.tls_handshake_failed(TlsFailure::Io);
                }
                return Some(Err(e));
            }
        }
        let input = self.session.borrow_mut().handle_input(buf, start);
        match input {
            Err(error) => {
                let reason = self.session.borrow().failure(&error);
                if handshaking {
                    self.metrics.tls_handshake_failed(reason);
                }
                tracing::debug!(reason = reason.label(), %error, "TLS failed: closing after an alert");
                // The alert, if the socket takes it now; the connection ends anyway.
                self.send_output_now();
                Some(Err(io::Error::new(io::ErrorKind::InvalidData, error)))
            }
            Ok(_) => {
                if handshaking && !self.is_handshaking() {
                    self.metrics.tls_handshake();
                }
                None
            }
        }
    }

    /// After a read was taken: the plaintext it gave, or the end of the stream when
    /// the peer sent close_notify; `None` when more ciphertext is needed.
    fn plaintext_or_close(&self, buf: &BytesMut, start: usize) -> Option<io::Result<usize>> {
        if buf.len() > start {
            Some(Ok(buf.len() - start))
        } else if self.session.borrow().peer_closed() {
            Some(Ok(0))
        } else {
            None
        }
    }

    /// Sends what the session has to send, as far as the socket takes it without
    /// waiting, unless a waiting write is in flight (it sends it after its own).
    fn send_output_now(&self) {
        if self.flushing.get() {
            return;
        }
        let mut session = self.session.borrow_mut();
        while !session.output().is_empty() {
            match send_now(&self.inner, &[IoSlice::new(session.output())]) {
                Ok(n) => session.advance_output(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Sends all of the session's output, waiting for room.
    async fn flush_output(&self) -> io::Result<()> {
        let _flushing = Flushing::start(&self.flushing);
        loop {
            let out = self.session.borrow_mut().take_output();
            if out.is_empty() {
                return Ok(());
            }
            self.inner.write_plain(vec![Bytes::from(out)]).await.0?;
        }
    }

    /// Writes all of `chunks`, in order, waiting for room: the output waiting first,
    /// then `chunks` encrypted a few records at a time.
    pub(crate) async fn writev(&self, mut chunks: Vec<Bytes>) -> (io::Result<()>, Vec<Bytes>) {
        let _flushing = Flushing::start(&self.flushing);
        loop {
            let mut out = self.session.borrow_mut().take_output();
            if !chunks.is_empty() {
                let slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
                let encrypted = encrypt_slices(
                    &mut self.session.borrow_mut(),
                    &slices,
                    WAIT_WRITE_PLAINTEXT,
                    &mut out,
                );
                drop(slices);
                match encrypted {
                    Ok(n) => consume_written(&mut chunks, n),
                    Err(e) => return (Err(tls_io_error(e)), chunks),
                }
            }
            if out.is_empty() {
                return (Ok(()), chunks);
            }
            let (written, _) = self.inner.write_plain(vec![Bytes::from(out)]).await;
            if let Err(e) = written {
                return (Err(e), chunks);
            }
        }
    }

    /// Encrypts as much of `slices` as one non-blocking write takes and sends it
    /// without waiting; ciphertext the socket does not take waits in the session's
    /// output, sent before anything else. Returns the plaintext bytes taken
    /// (`WouldBlock` when none: ciphertext is still waiting, or a write waits for room).
    pub(crate) fn try_write(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.flushing.get() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut session = self.session.borrow_mut();
        while !session.output().is_empty() {
            match send_now(&self.inner, &[IoSlice::new(session.output())]) {
                Ok(n) => session.advance_output(n),
                Err(e) => return Err(e),
            }
        }
        SCRATCH.with(|scratch| {
            let mut out = scratch.borrow_mut();
            out.clear();
            let taken = encrypt_slices(&mut session, slices, TRY_WRITE_PLAINTEXT, &mut out)
                .map_err(tls_io_error)?;
            let sent = match send_now(&self.inner, &[IoSlice::new(&out)]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            session.push_output(&out[sent..]);
            if out.capacity() > 2 * TRY_WRITE_PLAINTEXT {
                *out = Vec::new();
            }
            Ok(taken)
        })
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }
}

impl AsRawFd for TlsStream {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

thread_local! {
    /// The ciphertext of a core's non-blocking writes, reused.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Small slices gathered into one record.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encrypts up to `limit` bytes of `slices`, in order, into `out`: small slices are
/// gathered into records of up to [`MAX_RECORD_PLAINTEXT`] (one record, not one per
/// frame, for a batch of small broadcasts). Returns the plaintext bytes taken.
fn encrypt_slices(
    session: &mut TlsSession,
    slices: &[IoSlice<'_>],
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<usize, rustls::Error> {
    GATHER.with(|gather| {
        let mut gather = gather.borrow_mut();
        gather.clear();
        let mut taken = 0;
        'slices: for slice in slices {
            let mut rest: &[u8] = slice;
            while !rest.is_empty() {
                if taken == limit {
                    break 'slices;
                }
                let n = rest
                    .len()
                    .min(limit - taken)
                    .min(MAX_RECORD_PLAINTEXT - gather.len());
                if gather.is_empty() && n == MAX_RECORD_PLAINTEXT {
                    // A whole record from this slice: no copy.
                    session.encrypt(&rest[..n], out)?;
                } else {
                    gather.extend_from_slice(&rest[..n]);
                    if gather.len() == MAX_RECORD_PLAINTEXT {
                        session.encrypt(&gather, out)?;
                        gather.clear();
                    }
                }
                rest = &rest[n..];
                taken += n;
            }
        }
        if !gather.is_empty() {
            session.encrypt(&gather, out)?;
            gather.clear();
        }
        Ok(taken)
    })
}

fn tls_io_error(e: rustls::Error) -> io::Error {
    io::Error::other(e)
}

/// One `send`/`sendmsg` of `slices` on `stream` that does not wait and raises no
/// `SIGPIPE`.
fn send_now(stream: &Stream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: the descriptor is `stream`'s, which is borrowed for this whole call and
    // closes only once dropped; the borrowed descriptor does not outlive the call.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let socket = SockRef::from(&fd);
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    match slices {
        [one] => socket.send_with_flags(one, flags),
        many => socket.send_vectored_with_flags(many, flags),
    }
}
