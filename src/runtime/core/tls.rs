//! A TLS session without I/O: ciphertext in, plaintext and ciphertext out, on rustls's
//! unbuffered API (`UnbufferedServerConnection`), so that the buffers are ours and an
//! idle connection holds none of them.
//!
//! ```text
//!   socket ── ciphertext ──▶ handle_input ──▶ plaintext (appended to the caller's buffer)
//!                                │
//!                                └──▶ output(): handshake flights, alerts ──▶ socket
//!   core ── plaintext ──▶ encrypt ──▶ ciphertext (the caller's buffer) ──▶ socket
//! ```
//!
//! Call order: [`TlsSession::handle_input`] with every ciphertext read; after each call,
//! send [`TlsSession::output`] (then [`TlsSession::advance_output`] by what was sent)
//! before any ciphertext [`TlsSession::encrypt`] produces, so that the stream stays in
//! order. [`TlsSession::is_handshaking`] says whether the handshake is over; once
//! [`TlsSession::error`] is set, the session takes nothing more and its output is the
//! alert that tells the peer why.
//!
//! What it holds between reads: the start of a record not yet complete (only then) and
//! ciphertext the socket did not take (only then); both are freed once empty.

use bytes::BytesMut;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use rustls::{Error, ServerConfig};
use std::sync::Arc;

use crate::metrics::TlsFailure;

/// Plaintext per TLS record (RFC 8446 §5.1: at most 2^14 bytes).
pub(crate) const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;

/// Ciphertext added to each record at most: the 5-byte header, the content type and
/// the AEAD tag (TLS 1.3), or the explicit nonce and tag (TLS 1.2), with room to spare.
pub(crate) const RECORD_OVERHEAD: usize = 64;

/// The reason for an error rustls reported; `first_byte` is the first byte the peer
/// sent (a TLS record of the handshake starts with 22).
fn failure_of(error: &Error, first_byte: Option<u8>) -> TlsFailure {
    match error {
        _ if first_byte.is_some_and(|b| b != 22) => TlsFailure::NotTls,
        Error::NoApplicationProtocol => TlsFailure::Alpn,
        Error::PeerIncompatible(_) => TlsFailure::Incompatible,
        Error::AlertReceived(_) => TlsFailure::AlertReceived,
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. }
        | Error::PeerMisbehaved(_)
        | Error::DecryptError => TlsFailure::Protocol,
        _ => TlsFailure::Other,
    }
}

/// What [`TlsSession::handle_input`] leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    /// More ciphertext is needed (or plaintext was appended; the caller's buffer says).
    More,
    /// The peer sent close_notify: no more data will come.
    PeerClosed,
}

/// A server-side TLS session (see the module docs).
pub(crate) struct TlsSession {
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not yet processed (the start of a record).
    incoming: Vec<u8>,
    /// Ciphertext to send before anything else.
    outgoing: Vec<u8>,
    /// Sent bytes at the front of `outgoing`.
    sent: usize,
    handshaking: bool,
    peer_closed: bool,
    /// The first byte the peer sent, until the handshake is over (for the reason).
    first_byte: Option<u8>,
    error: Option<Error>,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.handshaking)
            .field("incoming", &self.incoming.len())
            .field("outgoing", &self.output().len())
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl TlsSession {
    /// A session that will answer a client's handshake with `config`.
    pub(crate) fn new(config: Arc<ServerConfig>) -> Result<Self, Error> {
        Ok(Self {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
            handshaking: true,
            peer_closed: false,
            first_byte: None,
            error: None,
        })
    }

    /// The handshake is not over yet.
    pub(crate) fn is_handshaking(&self) -> bool {
        self.handshaking
    }

    /// Why the handshake failed, for an error of this session.
    pub(crate) fn failure(&self, error: &Error) -> TlsFailure {
        failure_of(error, self.first_byte)
    }

    /// The ciphertext to send now, before anything [`TlsSession::encrypt`] produces.
    pub(crate) fn output(&self) -> &[u8] {
        &self.outgoing[self.sent..]
    }

    /// The peer sent close_notify: nothing more will come.
    pub(crate) fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Takes [`TlsSession::output`] whole, to send it with a write that waits.
    pub(crate) fn take_output(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.outgoing);
        out.drain(..std::mem::take(&mut self.sent));
        out
    }

    /// Ciphertext the caller encrypted and could not send: it goes out first, before
    /// anything encrypted later.
    pub(crate) fn push_output(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.outgoing.extend_from_slice(data);
        }
    }

    /// The socket took `n` bytes of [`TlsSession::output`].
    pub(crate) fn advance_output(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.outgoing.len());
        if self.sent == self.outgoing.len() {
            // Freed, not kept: an idle connection holds no buffer.
            self.outgoing = Vec::new();
            self.sent = 0;
        }
    }

    /// Takes the ciphertext read from the socket, `buf[start..]`, and leaves in its
    /// place the plaintext it completes (`buf` is truncated to `start`, then the
    /// plaintext appended). What must be sent in answer (a handshake flight, an alert)
    /// is in [`TlsSession::output`] afterwards. An error ends the session (its alert is
    /// in the output).
    pub(crate) fn handle_input(
        &mut self,
        buf: &mut BytesMut,
        start: usize,
    ) -> Result<Input, Error> {
        let start = start.min(buf.len());
        if let Some(error) = &self.error {
            buf.truncate(start);
            return Err(error.clone());
        }
        if self.handshaking && self.first_byte.is_none() {
            self.first_byte = buf.get(start).copied();
        }
        self.incoming.extend_from_slice(&buf[start..]);
        buf.truncate(start);
        let result = self.process(buf);
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        if let Err(error) = &result {
            self.error = Some(error.clone());
            // The alert rustls queued for the peer.
            self.take_alert();
        }
        result
    }

    /// Runs rustls over `incoming` until it needs more bytes.
    fn process(&mut self, plain: &mut BytesMut) -> Result<Input, Error> {
        loop {
            let (discard, next) = {
                let status = self.conn.process_tls_records(&mut self.incoming);
                let mut discard = status.discard;
                let next = match status.state {
                    Err(error) => Err(error),
                    Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                        let mut read = Ok(None);
                        while let Some(record) = traffic.next_record() {
                            match record {
                                Ok(record) => {
                                    discard += record.discard;
                                    plain.extend_from_slice(record.payload);
                                }
                                Err(error) => {
                                    read = Err(error);
                                    break;
                                }
                            }
                        }
                        read
                    }
                    Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                        encode_into(&mut self.outgoing, |out| encode.encode(out));
                        Ok(None)
                    }
                    Ok(ConnectionState::TransmitTlsData(transmit)) => {
                        // `outgoing` is sent before anything encrypted later: done as
                        // far as rustls is concerned.
                        transmit.done();
                        Ok(None)
                    }
                    Ok(ConnectionState::BlockedHandshake) => Ok(Some(Input::More)),
                    Ok(ConnectionState::WriteTraffic(_)) => {
                        self.handshaking = false;
                        Ok(Some(if self.peer_closed {
                            Input::PeerClosed
                        } else {
                            Input::More
                        }))
                    }
                    Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                        self.peer_closed = true;
                        Ok(None)
                    }
                    // Early data is not enabled; anything else is a state of a later
                    // rustls this code does not know.
                    Ok(_) => Ok(Some(Input::More)),
                };
                (discard, next)
            };
            // Before rustls is called again, whatever `next` was (its positions refer
            // to what is left of `incoming`).
            self.discard(discard);
            if let Some(input) = next? {
                return Ok(input);
            }
        }
    }

    /// Drops the first `n` bytes of `incoming`, which rustls is done with.
    fn discard(&mut self, n: usize) {
        self.incoming.drain(..n.min(self.incoming.len()));
    }

    /// Moves the alert rustls queued after an error into `outgoing`. rustls queues one
    /// fatal alert, which it hands out before it looks at any input; a second call
    /// would parse the bad input again. So: one call, and the session is over (input
    /// is dropped, `handle_input` and `encrypt` return the error from now on).
    fn take_alert(&mut self) {
        let discard = {
            let status = self.conn.process_tls_records(&mut self.incoming);
            if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
                encode_into(&mut self.outgoing, |out| encode.encode(out));
            }
            status.discard
        };
        self.discard(discard);
        self.incoming = Vec::new();
    }

    /// Encrypts `data` (at most [`MAX_RECORD_PLAINTEXT`] bytes make one record) and
    /// appends the ciphertext to `out`. Errors when the handshake is not over or the
    /// session has failed.
    pub(crate) fn encrypt(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        loop {
            let (discard, done) = {
                let status = self.conn.process_tls_records(&mut self.incoming);
                let done = match status.state {
                    Err(error) => Some(Err(error)),
                    Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                        Some(encrypt_record(&mut traffic, data, out))
                    }
                    // Records rustls wants out first (a key update): they go into
                    // `outgoing`, which the caller sends before `out`.
                    Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                        encode_into(&mut self.outgoing, |buf| encode.encode(buf));
                        None
                    }
                    Ok(ConnectionState::TransmitTlsData(transmit)) => {
                        transmit.done();
                        None
                    }
                    // Plaintext left from a read (not reached: `handle_input` takes all
                    // of it); reading it here would lose it.
                    Ok(ConnectionState::ReadTraffic(_)) => {
                        Some(Err(Error::General("unread TLS plaintext".into())))
                    }
                    Ok(_) => Some(Err(Error::HandshakeNotComplete)),
                };
                (status.discard, done)
            };
            self.discard(discard);
            if let Some(done) = done {
                return done;
            }
        }
    }
}

/// Encrypts `data` into `out`, growing it to the size the records need.
fn encrypt_record<Data>(
    traffic: &mut rustls::unbuffered::WriteTraffic<'_, Data>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let records = data.len().div_ceil(MAX_RECORD_PLAINTEXT).max(1);
    let mut room = data.len() + records * RECORD_OVERHEAD;
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match traffic.encrypt(data, &mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(e)) if e.required_size > room => {
                room = e.required_size;
            }
            Err(e) => {
                out.truncate(start);
                return Err(Error::General(e.to_string()));
            }
        }
    }
}

/// Appends what `encode` writes to `out`, growing it to the size the record needs.
fn encode_into(out: &mut Vec<u8>, mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>) {
    let start = out.len();
    let mut room = 4096;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(e)) if e.required_size > room => {
                room = e.required_size;
            }
            Err(_) => {
                out.truncate(start);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
