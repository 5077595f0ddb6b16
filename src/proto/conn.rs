//! The WebSocket connection state machine (RFC 6455 §5, §7), for both roles.
//!
//! # Call order
//!
//! ```text
//!   handle_bytes(bytes read)  ─┐
//!   poll_event() until Ok(None) ◄┘   events: Text, Binary, Ping, Pong, Close
//!     (or poll_event_ref())          the same events, payloads borrowed
//!   send_* / ping / close            enqueue outgoing frames
//!   poll_transmit() until None       bytes to write, in order (one writev)
//!   is_closed()                      the close handshake is over: close the transport
//! ```
//!
//! Input is parsed lazily by [`Connection::poll_event`]: feed what was read, then poll
//! until `Ok(None)`.
//!
//! Two ways to take events, one decoder behind both: [`Connection::poll_event`] hands
//! out owned payloads (`Bytes` sharing the input buffer), to keep or pass on;
//! [`Connection::poll_event_ref`] hands out [`EventRef`]s whose payloads borrow the
//! connection's buffers until the next call, which costs no reference counting and
//! lets the input buffer be reused as is. Both apply exactly the same rules and may be
//! mixed on one connection. After that the connection holds at most one partial frame header
//! or one partial control frame (under 140 bytes) of input; data frame payloads are
//! moved into the message as they arrive, so a text message is validated as it
//! streams in and fails at its first invalid byte (RFC 6455 §8.1).
//!
//! A [`ProtocolError`] fails the connection (RFC 6455 §7.1.7): a close frame with the
//! error's code is queued for the peer, the state becomes
//! [`CloseState::Closed`], and all later input is ignored.
//!
//! Replies the protocol requires are queued automatically: a Pong for every Ping, and
//! a Close echoing the peer's status code when the peer starts the close handshake.

use std::collections::VecDeque;
use std::fmt;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::close::{CloseCode, CloseFrame, truncate_utf8};
use super::deflate::{InflateError, PerMessageDeflate, RSV1};
use super::error::ProtocolError;
use super::frame::{FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode};
use super::limits::Limits;
use super::mask::apply_mask;
use super::utf8::{Utf8Bytes, Utf8Validator};

/// The largest data frame this end sends: longer messages go out in fragments (RFC
/// 6455 §5.4), so that the rest of a frame in flight always fits the output queue's
/// bookkeeping.
pub const MAX_OUT_FRAME: usize = 1 << 30;

/// `n`, or `u32::MAX` if it is larger (never for frames of at most [`MAX_OUT_FRAME`]).
fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Which end of the connection this is. It decides masking (RFC 6455 §5.1, §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts connections; receives masked frames, sends unmasked ones.
    Server,
    /// Opens connections; sends masked frames, receives unmasked ones.
    Client,
}

/// Where the closing handshake stands (RFC 6455 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseState {
    /// Data flows both ways.
    Open,
    /// We sent a Close frame and wait for the peer's. Incoming frames are still read.
    CloseSent,
    /// Close frames went both ways, or the connection failed. Nothing more is read or
    /// sent; the transport should be closed once the output is written.
    Closed,
}

/// A complete data message, received or to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message, valid UTF-8.
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
}

/// What the peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A complete text message, valid UTF-8 (RFC 6455 §5.6).
    Text(Utf8Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A Ping; its Pong has already been queued (RFC 6455 §5.5.2).
    Ping(Bytes),
    /// A Pong (RFC 6455 §5.5.3).
    Pong(Bytes),
    /// The peer's Close frame; `None` when it carried no status code (reported as 1005).
    /// The reply, if one was due, has already been queued (RFC 6455 §5.5.1).
    Close(Option<CloseFrame>),
}

/// What the peer sent, borrowed from the connection: the events of
/// [`Connection::poll_event`], with payloads that point into the connection's input
/// buffer (unmasked in place) or into its reassembly buffer for a message that arrived
/// in pieces. Valid until the next call on the connection, which the borrow enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventRef<'a> {
    /// A complete text message, valid UTF-8 (RFC 6455 §5.6).
    Text(&'a str),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A Ping; its Pong has already been queued (RFC 6455 §5.5.2).
    Ping(&'a [u8]),
    /// A Pong (RFC 6455 §5.5.3).
    Pong(&'a [u8]),
    /// The peer's Close frame; `None` when it carried no status code (reported as 1005).
    /// The reply, if one was due, has already been queued (RFC 6455 §5.5.1).
    Close(Option<CloseFrame>),
}

impl EventRef<'_> {
    /// The owned event, with the payload copied: for keeping it past the next call.
    pub fn to_event(&self) -> Event {
        match self {
            Self::Text(text) => Event::Text(Utf8Bytes::from(*text)),
            Self::Binary(bytes) => Event::Binary(Bytes::copy_from_slice(bytes)),
            Self::Ping(bytes) => Event::Ping(Bytes::copy_from_slice(bytes)),
            Self::Pong(bytes) => Event::Pong(Bytes::copy_from_slice(bytes)),
            Self::Close(frame) => Event::Close(frame.clone()),
        }
    }
}

/// Why a message could not be queued for sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// A Close frame was already sent or the connection failed: no frame may follow
    /// (RFC 6455 §5.5.1).
    Closed,
    /// A control frame payload over 125 bytes (RFC 6455 §5.5).
    ControlPayloadTooLong(usize),
    /// A close code that may not be sent on the wire, such as 1005 or 1006 (§7.4.1).
    UnsendableCloseCode(u16),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("the connection is closing or closed"),
            Self::ControlPayloadTooLong(n) => {
                write!(f, "control frame payload of {n} bytes exceeds 125")
            }
            Self::UnsendableCloseCode(c) => write!(f, "close code {c} may not be sent"),
        }
    }
}

impl std::error::Error for SendError {}

/// One side of a WebSocket connection, without I/O. See the module docs for the call
/// order.
pub struct Connection {
    role: Role,
    limits: Limits,
    state: CloseState,
    /// Why the connection failed, if it did.
    /// Boxed: only a failed connection has one.
    error: Option<Box<ProtocolError>>,
    /// Bytes handed in and not yet parsed.
    input: BytesMut,
    /// Bytes at the front of `input` already decoded: those the last [`EventRef`]
    /// borrowed, and before them those of earlier events that took the whole-frame fast
    /// path ([`Connection::decode_whole_frame`]), which reads on from here without
    /// dropping them. Dropped at the next [`Connection::settle`].
    lent: usize,
    /// The reassembled message the last [`EventRef`] borrowed, dropped at the next call.
    lent_message: Option<Box<InMessage>>,
    /// The data frame whose payload is being moved into `message`.
    frame: Option<InFrame>,
    /// The data message being received, possibly over several frames. Boxed: only a
    /// message that arrives in pieces needs it.
    message: Option<Box<InMessage>>,
    /// Frames queued for the transport, in order; `out_tail` follows them.
    output: VecDeque<Bytes>,
    /// Small frames written back to back, so that many go out as one buffer.
    out_tail: BytesMut,
    /// Bytes in `output` and `out_tail`.
    output_len: usize,
    /// Bytes at the front of the queue that finish what the transport took in part (a
    /// frame, or raw bytes queued first such as the 101): nothing goes before them.
    /// (u32: data frames are at most [`MAX_OUT_FRAME`] bytes.)
    front_rest: u32,
    /// Pings and Pongs queued ahead of the data, one chunk each, in `output` right
    /// after the `front_rest` bytes.
    controls: u16,
    /// What only some connections have: the client role's masking keys, the
    /// permessage-deflate codec. Boxed together: a plain server connection pays one
    /// pointer for both.
    rare: Option<Box<Rare>>,
}

#[derive(Clone, Default)]
struct Rare {
    /// Masking keys for the client role (RFC 6455 §5.3: unpredictable per frame).
    /// Boxed again: a server connection with deflate does not pay for its ~330 bytes.
    mask_rng: Option<Box<ChaCha8Rng>>,
    /// permessage-deflate, when negotiated (RFC 7692).
    deflate: Option<PerMessageDeflate>,
}

#[derive(Debug, Clone, Copy)]
struct InFrame {
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Payload bytes of this frame not received yet.
    remaining: u64,
    /// Payload bytes of this frame received so far (the masking phase).
    offset: usize,
}

#[derive(Debug)]
struct InMessage {
    text: bool,
    /// The payload so far; for a compressed message (RSV1 on its first frame), the
    /// compressed bytes, inflated into `inflated` when the last frame is in.
    payload: BytesMut,
    utf8: Utf8Validator,
    compressed: bool,
    inflated: Vec<u8>,
}

impl InMessage {
    fn new(text: bool, compressed: bool) -> Box<Self> {
        Box::new(Self {
            text,
            payload: BytesMut::new(),
            utf8: Utf8Validator::default(),
            compressed,
            inflated: Vec::new(),
        })
    }

    /// The complete message's payload.
    fn bytes(&self) -> &[u8] {
        if self.compressed {
            &self.inflated
        } else {
            &self.payload
        }
    }

    /// The complete message's payload, owned.
    fn into_bytes(self) -> Bytes {
        if self.compressed {
            Bytes::from(self.inflated)
        } else {
            self.payload.freeze()
        }
    }
}

/// Payloads up to this size are copied next to their header into one buffer; larger
/// ones are queued as their own `Bytes`, without a copy, in the server role.
const COPY_THRESHOLD: usize = 1024;

/// How far the reassembly buffer is reserved beyond the bytes that have arrived, toward
/// the length the frame header announces: a frame in pieces is then copied into one
/// allocation instead of one growing by doubling, while a peer that announces a large
/// frame and sends little makes it reserve at most this much more than it sent. The
/// buffer itself is capped by [`Limits::max_message_size`], checked on every header.
const RESERVE_AHEAD: usize = 64 * 1024;

impl Connection {
    /// A server-side connection, after a successful handshake.
    pub fn server(limits: Limits) -> Self {
        Self::new(Role::Server, limits, None)
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    fn mask_key(&mut self) -> Option<[u8; 4]> {
        // The generator is boxed on its own: see `Rare::mask_rng`.
        let rng = self.rare.as_mut()?.mask_rng.as_mut()?;
        Some(rng.next_u32().to_ne_bytes())
    }

    /// A client-side connection, after a successful handshake. `mask_seed` seeds the
    /// generator of the per-frame masking keys; take it from the OS's random source
    /// (RFC 6455 §10.3: keys must not be predictable by the application).
    pub fn client(limits: Limits, mask_seed: [u8; 32]) -> Self {
        Self::new(
            Role::Client,
            limits,
            Some(Box::new(Rare {
                mask_rng: Some(Box::new(ChaCha8Rng::from_seed(mask_seed))),
                deflate: None,
            })),
        )
    }

    fn new(role: Role, limits: Limits, rare: Option<Box<Rare>>) -> Self {
        Self {
            role,
            limits,
            state: CloseState::Open,
            error: None,
            input: BytesMut::new(),
            lent: 0,
            lent_message: None,
            frame: None,
            message: None,
            output: VecDeque::new(),
            out_tail: BytesMut::new(),
            output_len: 0,
            front_rest: 0,
            controls: 0,
            rare,
        }
    }

    /// Turns on permessage-deflate as negotiated in the handshake (RFC 7692), before any
    /// frame is handed in or queued: RSV1 is then accepted on the first frame of a data
    /// message, which is inflated, and messages sent are compressed when that pays.
    pub fn set_deflate(&mut self, deflate: PerMessageDeflate) {
        self.rare().deflate = Some(deflate);
    }

    /// permessage-deflate's state, when negotiated.
    pub fn deflate(&self) -> Option<&PerMessageDeflate> {
        self.rare.as_ref()?.deflate.as_ref()
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Where the closing handshake stands.
    pub fn close_state(&self) -> CloseState {
        self.state
    }

    /// Whether the close handshake is over (or the connection failed): write what
    /// [`Connection::poll_transmit`] still returns, then close the transport. In the
    /// server role the server closes TCP first (RFC 6455 §7.1.1).
    pub fn is_closed(&self) -> bool {
        self.state == CloseState::Closed
    }

    /// The protocol error that failed the connection, if one did.
    pub fn error(&self) -> Option<ProtocolError> {
        self.error.as_deref().copied()
    }

    // ---- input ------------------------------------------------------------------

    /// Hands in bytes read from the transport. They are parsed by
    /// [`Connection::poll_event`]. Ignored once the connection is closed.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.settle();
        if self.state != CloseState::Closed {
            self.input.extend_from_slice(bytes);
        }
    }

    /// Hands in a buffer read from the transport, taking it over without a copy when
    /// no earlier input is pending. Received payloads may then share its memory.
    pub fn handle_buf(&mut self, buf: BytesMut) {
        self.settle();
        if self.state == CloseState::Closed {
            return;
        }
        if self.input.is_empty() {
            self.input = buf;
        } else {
            self.input.extend_from_slice(&buf);
        }
    }

    /// Bytes handed in and not parsed yet.
    pub fn pending_input(&self) -> usize {
        self.input.len() - self.lent
    }

    /// Payload bytes of the data message being received and not complete yet: the
    /// fragments so far and what has arrived of a frame still coming in (its buffer may
    /// reserve up to 64 KiB more). 0 between messages, and for a message that arrives
    /// whole in one read (it is handed out where it lies in the input). A server that
    /// budgets the memory its peers make it hold across connections asks this after
    /// each [`Connection::poll_event`] pass; it drops back to 0 when the message is
    /// handed out, when the connection fails and after [`Connection::abort`].
    pub fn buffered_message_bytes(&self) -> usize {
        self.message.as_ref().map_or(0, |m| m.payload.len())
    }

    /// Drops the input buffer's memory when it holds nothing, so an idle connection
    /// keeps no read buffer. Received payloads that share it stay valid.
    pub fn release_input_buffer(&mut self) {
        self.settle();
        if self.input.is_empty() {
            self.input = BytesMut::new();
        }
    }

    /// The next event parsed from the input: `Ok(None)` when more input is needed (or
    /// the connection is closed). A `ProtocolError` fails the connection: its close
    /// frame is queued and later calls return `Ok(None)`.
    ///
    /// Payloads are owned `Bytes`; a payload that arrived in one piece shares the input
    /// buffer's memory. [`Connection::poll_event_ref`] is the cheaper, borrowed twin.
    pub fn poll_event(&mut self) -> Result<Option<Event>, ProtocolError> {
        self.lent_message = None;
        if let Some(frame) = self.decode_whole_frame() {
            let (kind, start, end) = frame?;
            self.input.advance(start);
            self.lent = 0;
            let payload = self.input.split_to(end - start).freeze();
            return Ok(Some(match kind {
                // SAFETY: `decode_whole_frame` validated text payloads as UTF-8.
                Kind::Text => Event::Text(unsafe { Utf8Bytes::from_bytes_unchecked(payload) }),
                _ => Event::Binary(payload),
            }));
        }
        self.settle();
        let event = match self.decode()? {
            None => return Ok(None),
            Some(Decoded::InInput { kind, start, end }) => {
                self.input.advance(start);
                let payload = self.input.split_to(end - start).freeze();
                match kind {
                    // SAFETY: `decode` validated text payloads as UTF-8.
                    Kind::Text => Event::Text(unsafe { Utf8Bytes::from_bytes_unchecked(payload) }),
                    Kind::Binary => Event::Binary(payload),
                    Kind::Ping => Event::Ping(payload),
                    Kind::Pong => Event::Pong(payload),
                }
            }
            Some(Decoded::Reassembled) => {
                let Some(message) = self.message.take() else {
                    return Ok(None); // unreachable: `decode` left the message there
                };
                let text = message.text;
                let payload = message.into_bytes();
                if text {
                    // SAFETY: `decode` checked the whole message as UTF-8.
                    Event::Text(unsafe { Utf8Bytes::from_bytes_unchecked(payload) })
                } else {
                    Event::Binary(payload)
                }
            }
            Some(Decoded::Close(frame)) => Event::Close(frame),
        };
        Ok(Some(event))
    }

    /// The next event, like [`Connection::poll_event`] (same rules, same errors, same
    /// replies queued), but with payloads borrowed from the connection instead of
    /// owned: no allocation or reference counting per event, and the input buffer is
    /// reused for the next read. The event is valid until the next call on the
    /// connection; to keep a payload or to reply with it, copy it first
    /// ([`EventRef::to_event`]) or use `poll_event`.
    ///
    /// ```
    /// use ringsocket::proto::{Connection, EventRef, Limits};
    ///
    /// let mut conn = Connection::server(Limits::default());
    /// // A masked text frame "Hi" (RFC 6455 §5.7, key 37 fa 21 3d).
    /// conn.handle_bytes(&[0x81, 0x82, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x93]);
    /// let mut seen = Vec::new();
    /// while let Some(event) = conn.poll_event_ref()? {
    ///     if let EventRef::Text(text) = event {
    ///         seen.push(text.to_owned());
    ///     }
    /// }
    /// assert_eq!(seen, ["Hi"]);
    /// # Ok::<(), ringsocket::proto::ProtocolError>(())
    /// ```
    pub fn poll_event_ref(&mut self) -> Result<Option<EventRef<'_>>, ProtocolError> {
        self.lent_message = None;
        if let Some(frame) = self.decode_whole_frame() {
            let (kind, start, end) = frame?;
            self.lent = end;
            let payload = &self.input[start..end];
            return Ok(Some(match kind {
                // SAFETY: `decode_whole_frame` validated text payloads as UTF-8.
                Kind::Text => EventRef::Text(unsafe { std::str::from_utf8_unchecked(payload) }),
                _ => EventRef::Binary(payload),
            }));
        }
        self.settle();
        let event = match self.decode()? {
            None => return Ok(None),
            Some(Decoded::InInput { kind, start, end }) => {
                self.lent = end;
                let payload = &self.input[start..end];
                match kind {
                    // SAFETY: `decode` validated text payloads as UTF-8.
                    Kind::Text => EventRef::Text(unsafe { std::str::from_utf8_unchecked(payload) }),
                    Kind::Binary => EventRef::Binary(payload),
                    Kind::Ping => EventRef::Ping(payload),
                    Kind::Pong => EventRef::Pong(payload),
                }
            }
            Some(Decoded::Reassembled) => {
                self.lent_message = self.message.take();
                let Some(message) = self.lent_message.as_deref() else {
                    return Ok(None); // unreachable: `decode` left the message there
                };
                if message.text {
                    // SAFETY: `decode` checked the whole message as UTF-8.
                    EventRef::Text(unsafe { std::str::from_utf8_unchecked(message.bytes()) })
                } else {
                    EventRef::Binary(message.bytes())
                }
            }
            Some(Decoded::Close(frame)) => EventRef::Close(frame),
        };
        Ok(Some(event))
    }

    /// Ends the loan of the last [`EventRef`]: consumes the input it borrowed and drops
    /// the message it borrowed. Every method that reads or changes the input calls it
    /// first, so a loan never outlives the borrow that the type system enforces.
    #[inline]
    fn settle(&mut self) {
        if self.lent > 0 {
            self.input.advance(self.lent);
            self.lent = 0;
        }
        self.lent_message = None;
    }

    /// The fast path of both `poll_event` and `poll_event_ref`, for the commonest input:
    /// a whole single-frame Text or Binary message (FIN set, RSV bits clear), masked as
    /// the role requires, with a 7- or 16-bit length within both limits, while no
    /// fragmented message is in progress, already in `input[lent..]`. Such a frame
    /// passes every rule of [`Connection::check_header`]; it is unmasked and, for text,
    /// validated in place, and its payload's range in `input` is returned. The input
    /// before it is not dropped, so a run of small frames costs no buffer bookkeeping.
    ///
    /// `None`, with nothing consumed or changed, for any other next frame (a partial
    /// one, a control frame, a fragment, a 64-bit length, a rule broken...): the
    /// general decoder then settles and decodes it, applying every rule.
    #[inline(always)]
    fn decode_whole_frame(&mut self) -> Option<Result<(Kind, usize, usize), ProtocolError>> {
        if self.message.is_some() || self.frame.is_some() || self.state == CloseState::Closed {
            return None;
        }
        let buf = self.input.get(self.lent..)?;
        let (&[b0, b1], rest) = buf.split_first_chunk::<2>()?;
        let kind = match b0 {
            0x81 => Kind::Text,
            0x82 => Kind::Binary,
            _ => return None,
        };
        // RFC 6455 §5.1: clients mask, servers do not.
        let masked = self.role == Role::Server;
        if (b1 & 0x80 != 0) != masked {
            return None;
        }
        let (len, rest) = match b1 & 0x7F {
            126 => {
                let (&len, rest) = rest.split_first_chunk::<2>()?;
                (usize::from(u16::from_be_bytes(len)), rest)
            }
            127 => return None,
            short => (usize::from(short), rest),
        };
        // Within both the frame and the message limit (RFC 6455 §10.4); not a field,
        // so that an idle connection does not carry it.
        if len > self.limits.max_frame_size.min(self.limits.max_message_size) {
            return None;
        }
        let key = if masked {
            Some(*rest.first_chunk::<4>()?)
        } else {
            None
        };
        let start = self.input.len() - rest.len() + if masked { 4 } else { 0 };
        let end = start + len;
        let payload = self.input.get_mut(start..end)?;
        if let Some(key) = key {
            apply_mask(payload, key, 0);
        }
        if matches!(kind, Kind::Text) && simdutf8::basic::from_utf8(payload).is_err() {
            self.fail(ProtocolError::InvalidUtf8);
            return Some(Err(ProtocolError::InvalidUtf8));
        }
        Some(Ok((kind, start, end)))
    }

    /// The decoder behind both `poll_event` and `poll_event_ref`: parses the next event
    /// and fails the connection on a protocol error.
    #[inline]
    fn decode(&mut self) -> Result<Option<Decoded>, ProtocolError> {
        if self.state == CloseState::Closed {
            return Ok(None);
        }
        match self.read_event() {
            Ok(event) => Ok(event),
            Err(error) => {
                self.fail(error);
                Err(error)
            }
        }
    }

    #[inline]
    fn read_event(&mut self) -> Result<Option<Decoded>, ProtocolError> {
        loop {
            if let Some(frame) = self.frame {
                match self.read_payload(frame)? {
                    Progress::Complete => return Ok(Some(Decoded::Reassembled)),
                    Progress::NeedMore => return Ok(None),
                    Progress::Continue => continue,
                }
            }
            let Some((header, header_len)) = FrameHeader::parse(&self.input)? else {
                return Ok(None);
            };
            self.check_header(&header)?;
            let len = header.payload_len as usize;
            let end = header_len + len;
            if header.opcode.is_control() {
                // Control payloads are at most 125 bytes: wait for the whole frame.
                if self.input.len() < end {
                    return Ok(None);
                }
                if let Some(key) = header.mask {
                    apply_mask(&mut self.input[header_len..end], key, 0);
                }
                match self.control_frame(header.opcode, header_len, end)? {
                    Some(event) => return Ok(Some(event)),
                    None => continue,
                }
            }
            // The fast path: a whole single-frame message already in the input, unmasked
            // and validated where it lies.
            if header.fin
                && header.rsv == 0
                && header.opcode != OpCode::Continuation
                && self.input.len() >= end
            {
                let payload = &mut self.input[header_len..end];
                if let Some(key) = header.mask {
                    apply_mask(payload, key, 0);
                }
                let kind = if header.opcode == OpCode::Text {
                    if simdutf8::basic::from_utf8(payload).is_err() {
                        return Err(ProtocolError::InvalidUtf8);
                    }
                    Kind::Text
                } else {
                    Kind::Binary
                };
                return Ok(Some(Decoded::InInput {
                    kind,
                    start: header_len,
                    end,
                }));
            }
            // The general path: stream the payload into the message as it arrives.
            self.input.advance(header_len);
            if header.opcode != OpCode::Continuation {
                self.message = Some(InMessage::new(
                    header.opcode == OpCode::Text,
                    header.rsv & RSV1 != 0,
                ));
            }
            self.frame = Some(InFrame {
                fin: header.fin,
                mask: header.mask,
                remaining: header.payload_len,
                offset: 0,
            });
        }
    }

    /// Applies every rule that the header shows, before any payload is buffered.
    fn check_header(&self, header: &FrameHeader) -> Result<(), ProtocolError> {
        // RFC 6455 §5.2: RSV bits are 0 unless an extension defines them. RFC 7692 §6:
        // with permessage-deflate, RSV1 marks the first frame of a compressed message;
        // it is never set on a continuation or a control frame (§6.1).
        let allowed = match header.opcode {
            OpCode::Text | OpCode::Binary if self.deflate().is_some() => RSV1,
            _ => 0,
        };
        if header.rsv & !allowed != 0 {
            return Err(ProtocolError::ReservedBits(header.rsv));
        }
        // RFC 6455 §5.1: clients mask, servers do not.
        match (self.role, header.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedClientFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedServerFrame),
            _ => {}
        }
        if header.opcode.is_control() {
            // RFC 6455 §5.5: control frames are short and never fragmented.
            if header.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(ProtocolError::ControlFrameTooLong(header.payload_len));
            }
            if !header.fin {
                return Err(ProtocolError::FragmentedControlFrame);
            }
            return Ok(());
        }
        // RFC 6455 §5.4: continuation frames continue a message, data frames start one.
        match (header.opcode, &self.message) {
            (OpCode::Continuation, None) => return Err(ProtocolError::ContinuationWithoutStart),
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::DataFrameInsideFragmentedMessage);
            }
            _ => {}
        }
        if header.payload_len > self.limits.max_frame_size as u64 {
            return Err(ProtocolError::FrameTooLarge {
                len: header.payload_len,
                limit: self.limits.max_frame_size,
            });
        }
        let so_far = self.message.as_ref().map_or(0, |m| m.payload.len() as u64);
        if so_far + header.payload_len > self.limits.max_message_size as u64 {
            return Err(ProtocolError::MessageTooLarge {
                len: so_far + header.payload_len,
                limit: self.limits.max_message_size,
            });
        }
        Ok(())
    }

    /// Moves what has arrived of the current data frame's payload into the message.
    fn read_payload(&mut self, mut frame: InFrame) -> Result<Progress, ProtocolError> {
        let Some(message) = self.message.as_mut() else {
            // Unreachable by construction: a frame is only streamed into a message.
            self.frame = None;
            return Ok(Progress::Continue);
        };
        let take = frame.remaining.min(self.input.len() as u64) as usize;
        if take == 0 && frame.remaining > 0 {
            return Ok(Progress::NeedMore);
        }
        let start = message.payload.len();
        // Reserve toward the announced frame end, a bounded step past what arrived
        // (RESERVE_AHEAD), so a frame in pieces lands in one allocation.
        let ahead = frame.remaining.min((take + RESERVE_AHEAD) as u64) as usize;
        message.payload.reserve(ahead);
        message.payload.extend_from_slice(&self.input[..take]);
        self.input.advance(take);
        if let Some(key) = frame.mask {
            apply_mask(&mut message.payload[start..], key, frame.offset);
        }
        if message.text && !message.compressed && message.utf8.feed(&message.payload).is_err() {
            return Err(ProtocolError::InvalidUtf8);
        }
        frame.remaining -= take as u64;
        frame.offset += take;
        if frame.remaining > 0 {
            self.frame = Some(frame);
            return Ok(Progress::NeedMore);
        }
        self.frame = None;
        if !frame.fin {
            return Ok(Progress::Continue);
        }
        if message.compressed {
            // RFC 7692 §7.2.2: the frames' payloads, joined, are one compressed message.
            // `max_message_size` bounds what it inflates to, not only what it is.
            let Some(deflate) = self.rare.as_mut().and_then(|r| r.deflate.as_mut()) else {
                return Err(ProtocolError::ReservedBits(RSV1)); // unreachable: checked
            };
            let limit = self.limits.max_message_size;
            message.inflated = deflate
                .inflate(&message.payload, limit)
                .map_err(|e| match e {
                    InflateError::TooLarge { limit } => ProtocolError::MessageTooLarge {
                        len: limit as u64 + 1,
                        limit,
                    },
                    InflateError::Corrupt => ProtocolError::BadCompressedData,
                })?;
            message.payload = BytesMut::new();
            if message.text && simdutf8::basic::from_utf8(&message.inflated).is_err() {
                return Err(ProtocolError::InvalidUtf8);
            }
            return Ok(Progress::Complete);
        }
        // The validator accepted every byte; the message must also end on a character
        // boundary to be valid UTF-8 as a whole. It stays in `self.message` for the
        // caller to take.
        if message.text && !message.utf8.is_complete(&message.payload) {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(Progress::Complete)
    }

    /// Handles the complete, unmasked control frame whose payload is
    /// `input[start..end]`; returns the event to report, if any.
    fn control_frame(
        &mut self,
        opcode: OpCode,
        start: usize,
        end: usize,
    ) -> Result<Option<Decoded>, ProtocolError> {
        match opcode {
            OpCode::Ping => {
                // RFC 6455 §5.5.2: answer with a Pong carrying the same payload, unless
                // a Close was received (then the state is Closed and nothing is read).
                // After our own Close only data frames are forbidden (§5.5.1).
                if self.state != CloseState::Closed {
                    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
                    let payload = &mut payload[..end - start];
                    payload.copy_from_slice(&self.input[start..end]);
                    self.queue_control(OpCode::Pong, payload);
                }
                Ok(Some(Decoded::InInput {
                    kind: Kind::Ping,
                    start,
                    end,
                }))
            }
            OpCode::Pong => Ok(Some(Decoded::InInput {
                kind: Kind::Pong,
                start,
                end,
            })),
            _ => {
                let frame = parse_close_payload(&self.input[start..end])?;
                if self.state == CloseState::Open {
                    // RFC 6455 §5.5.1: reply with a Close, echoing the status code.
                    let code = frame.as_ref().map(|f| u16::from(f.code).to_be_bytes());
                    self.queue_frame(OpCode::Close, true, code.as_ref().map_or(&[], |c| c));
                }
                self.state = CloseState::Closed;
                self.discard_input();
                Ok(Some(Decoded::Close(frame)))
            }
        }
    }

    /// Fails the connection (RFC 6455 §7.1.7): send a Close with the error's code unless
    /// one was sent already, and read nothing more.
    #[cold]
    fn fail(&mut self, error: ProtocolError) {
        if self.state == CloseState::Open {
            self.queue_close(error.close_code(), error.reason());
        }
        self.error = Some(Box::new(error));
        self.state = CloseState::Closed;
        self.discard_input();
    }

    fn discard_input(&mut self) {
        self.input = BytesMut::new();
        self.lent = 0;
        self.frame = None;
        self.message = None;
    }

    // ---- output -----------------------------------------------------------------

    /// Queues a data message, fragmented at [`Limits::fragment_size`] if one is set.
    pub fn send(&mut self, message: Message) -> Result<(), SendError> {
        match message {
            Message::Text(text) => self.send_data(OpCode::Text, text.into_bytes()),
            Message::Binary(bytes) => self.send_data(OpCode::Binary, bytes),
        }
    }

    /// Queues a text message.
    pub fn send_text(&mut self, text: impl Into<Utf8Bytes>) -> Result<(), SendError> {
        self.send_data(OpCode::Text, text.into().into_bytes())
    }

    /// Queues a binary message.
    pub fn send_binary(&mut self, bytes: impl Into<Bytes>) -> Result<(), SendError> {
        self.send_data(OpCode::Binary, bytes.into())
    }

    /// Queues a complete frame encoded elsewhere, e.g. once for every subscriber of a
    /// broadcast by [`encode_server_frame`]: the queue holds a reference-counted clone,
    /// no copy. Server role only (client frames are masked per frame), and only whole,
    /// unfragmented data frames.
    pub fn send_frame(&mut self, frame: Bytes) -> Result<(), SendError> {
        if self.state != CloseState::Open {
            return Err(SendError::Closed);
        }
        debug_assert_eq!(self.role, Role::Server, "a shared frame is unmasked");
        if !self.out_tail.is_empty() {
            self.output.push_back(self.out_tail.split().freeze());
        }
        self.output_len += frame.len();
        self.output.push_back(frame);
        Ok(())
    }

    /// Queues `bytes` ahead of everything queued so far: transport bytes that precede
    /// the WebSocket stream, such as the handshake's 101 response, written by the same
    /// writes as the frames behind them.
    pub fn send_raw_first(&mut self, bytes: Bytes) {
        self.output_len += bytes.len();
        // Ahead of Pings and Pongs too: they follow once these bytes are out.
        self.add_front_rest(bytes.len());
        if self.output.capacity() == 0 {
            // Room for this one (the handshake's answer, say) and no more: a
            // connection that then stays idle keeps 32 bytes here, not the 128 of the
            // deque's first growth.
            self.output.reserve_exact(1);
        }
        self.output.push_front(bytes);
    }

    /// Queues `bytes`, the rest of frames encoded elsewhere (as [`send_frame`]'s) of
    /// which the transport took the first part: their first `frame_rest` bytes finish
    /// a frame already partly written, whole frames follow. Nothing may be queued
    /// ahead of them (the part written was the last thing taken); a Ping or Pong
    /// queued later goes after the `frame_rest` bytes.
    ///
    /// [`send_frame`]: Connection::send_frame
    pub fn send_frame_rest(&mut self, bytes: Bytes, frame_rest: usize) {
        debug_assert_eq!(self.output_len, 0, "the rest of a frame goes first");
        debug_assert_eq!(self.role, Role::Server, "a shared frame is unmasked");
        if !self.out_tail.is_empty() {
            self.output.push_back(self.out_tail.split().freeze());
        }
        self.add_front_rest(frame_rest.min(bytes.len()));
        self.output_len += bytes.len();
        self.output.push_back(bytes);
    }

    /// Queues a Ping with `payload` (at most 125 bytes), ahead of the data frames
    /// queued and not yet begun (see [`Connection::poll_transmit`]).
    pub fn ping(&mut self, payload: &[u8]) -> Result<(), SendError> {
        self.send_control(OpCode::Ping, payload)
    }

    /// Queues an unsolicited Pong with `payload` (RFC 6455 §5.5.3: a heartbeat), ahead
    /// of the data frames queued and not yet begun.
    pub fn pong(&mut self, payload: &[u8]) -> Result<(), SendError> {
        self.send_control(OpCode::Pong, payload)
    }

    /// Starts the closing handshake with `code` and `reason` (the reason is cut to 123
    /// bytes on a character boundary). The peer's Close then arrives as an event.
    pub fn close(&mut self, code: CloseCode, reason: &str) -> Result<(), SendError> {
        if !code.is_sendable() {
            return Err(SendError::UnsendableCloseCode(code.into()));
        }
        if self.state != CloseState::Open {
            return Err(SendError::Closed);
        }
        self.queue_close(code, reason);
        self.state = CloseState::CloseSent;
        Ok(())
    }

    /// Fails the connection for a reason of this end's own, such as a limit it applies
    /// (not a protocol error: [`Connection::error`] stays `None`): queues a Close with
    /// `code` and `reason` unless one was sent already, reads nothing more and drops
    /// whatever was received of a message. The state is then [`CloseState::Closed`]:
    /// write what [`Connection::poll_transmit`] still returns, then close the transport
    /// without waiting for the peer's Close (RFC 6455 §7.1.7).
    pub fn abort(&mut self, code: CloseCode, reason: &str) -> Result<(), SendError> {
        if !code.is_sendable() {
            return Err(SendError::UnsendableCloseCode(code.into()));
        }
        if self.state == CloseState::Open {
            self.queue_close(code, reason);
        }
        self.state = CloseState::Closed;
        self.discard_input();
        Ok(())
    }

    /// The next bytes to write to the transport, in order; `None` when all is written.
    /// Small frames queued back to back come out as one buffer.
    ///
    /// The order: first the rest of whatever the transport took in part (a frame is
    /// never interleaved), then Pings and Pongs (a heartbeat or a Pong is not stuck
    /// behind megabytes of data; RFC 6455 §5.4 lets control frames go between the
    /// frames of a message), then data frames and Close frames in the order they were
    /// queued (a Close never overtakes the data queued before it, §5.5.1).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        let len = match self.output.front() {
            Some(chunk) => chunk.len(),
            None if !self.out_tail.is_empty() => self.out_tail.len(),
            None => return None,
        };
        self.note_taken(len);
        let chunk = match self.output.pop_front() {
            Some(chunk) => chunk,
            None => self.out_tail.split().freeze(),
        };
        self.output_len -= chunk.len();
        Some(chunk)
    }

    /// Moves every queued chunk to `out`, in order, for one vectored write.
    pub fn drain_transmit(&mut self, out: &mut Vec<Bytes>) {
        out.extend(self.output.drain(..));
        if !self.out_tail.is_empty() {
            out.push(self.out_tail.split().freeze());
        }
        self.output_len = 0;
        self.front_rest = 0;
        self.controls = 0;
    }

    /// The queued output as slices, in order, for a vectored write made by the caller
    /// (e.g. a non-blocking `sendmsg`): fills `out` from the front and returns how many
    /// slices it filled. Nothing is taken until [`Connection::advance_transmit`] says how
    /// much was written.
    pub fn transmit_slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let tail = (!self.out_tail.is_empty()).then_some(&self.out_tail[..]);
        let chunks = self.output.iter().map(|chunk| &chunk[..]).chain(tail);
        let mut filled = 0;
        for (slot, chunk) in out.iter_mut().zip(chunks) {
            *slot = IoSlice::new(chunk);
            filled += 1;
        }
        filled
    }

    /// How many slices [`Connection::transmit_slices`] would fill with room for all.
    pub fn transmit_chunks(&self) -> usize {
        self.output.len() + usize::from(!self.out_tail.is_empty())
    }

    /// Drops the first `written` bytes of the queued output, after a write of the
    /// slices [`Connection::transmit_slices`] gave. A chunk written in part keeps its
    /// rest at the front.
    pub fn advance_transmit(&mut self, mut written: usize) {
        written = written.min(self.output_len);
        self.note_taken(written);
        self.output_len -= written;
        while written > 0 {
            let Some(front) = self.output.front_mut() else {
                self.out_tail.advance(written);
                return;
            };
            if written < front.len() {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.output.pop_front();
        }
    }

    /// Bytes queued for the transport and not yet taken.
    pub fn pending_output(&self) -> usize {
        self.output_len
    }

    /// Drops every frame queued and not yet begun, e.g. the backlog of a slow consumer
    /// before closing it. Whole frames only: the rest of a frame the transport took in
    /// part, and the Pings and Pongs queued, stay.
    pub fn discard_output(&mut self) {
        let keep = self.control_slot();
        self.output.truncate(keep);
        self.out_tail.clear();
        self.output_len = self.output.iter().map(Bytes::len).sum();
    }

    /// The chunk at `index` of the queue (`out_tail` after the last of `output`).
    fn queued_chunk(&self, index: usize) -> &[u8] {
        self.output
            .get(index)
            .map_or(&self.out_tail[..], |chunk| &chunk[..])
    }

    /// Accounts for the first `taken` bytes of the queue leaving it (called before
    /// they are dropped): what they finish of `front_rest`, the Pings and Pongs among
    /// them, and, when they end inside a frame, that frame's rest as the new
    /// `front_rest` (its length read from its header, which the queue still holds).
    fn note_taken(&mut self, taken: usize) {
        if taken >= self.output_len {
            self.front_rest = 0;
            self.controls = 0;
            return;
        }
        let step = taken.min(self.front_rest as usize);
        self.front_rest -= step as u32;
        if self.front_rest > 0 {
            return;
        }
        let mut left = taken - step;
        // Where the queue's front is, as (chunk, offset), `step` bytes in.
        let (mut index, mut offset) = (0, step);
        while offset > 0 && offset >= self.queued_chunk(index).len() {
            offset -= self.queued_chunk(index).len();
            index += 1;
        }
        // Pings and Pongs: whole chunks, right here (`control_slot` split the chunk
        // where they were inserted).
        while self.controls > 0 && left > 0 {
            let len = self.queued_chunk(index).len();
            self.controls -= 1;
            if left < len {
                self.front_rest = clamp_u32(len - left);
                return;
            }
            left -= len;
            index += 1;
        }
        // Data frames, from a frame boundary: each header says how far its frame goes.
        while left > 0 {
            let header = FrameHeader::parse(&self.queued_chunk(index)[offset..]);
            let Ok(Some((header, header_len))) = header else {
                // Not a frame we queued (cannot happen): keep everything left in order.
                self.front_rest = clamp_u32(self.output_len - taken);
                return;
            };
            let frame = usize::try_from(header.payload_len)
                .ok()
                .and_then(|payload| payload.checked_add(header_len))
                .unwrap_or(usize::MAX);
            if left < frame {
                self.front_rest = clamp_u32(frame - left);
                return;
            }
            left -= frame;
            let mut skip = frame;
            while skip > 0 {
                let rest_of_chunk = self.queued_chunk(index).len() - offset;
                if skip < rest_of_chunk {
                    offset += skip;
                    break;
                }
                skip -= rest_of_chunk;
                index += 1;
                offset = 0;
            }
        }
    }

    /// The index in `output` where the next Ping or Pong goes: after the `front_rest`
    /// bytes and the Pings and Pongs already queued. Where that place falls inside a
    /// chunk, the chunk is split there (or `out_tail` moved into `output` first).
    fn control_slot(&mut self) -> usize {
        let mut rest = self.front_rest as usize;
        let mut index = 0;
        while rest > 0 {
            if index == self.output.len() {
                if self.out_tail.is_empty() {
                    break;
                }
                self.output.push_back(self.out_tail.split().freeze());
            }
            let len = self.output[index].len();
            if rest < len {
                let head = self.output[index].split_to(rest);
                self.output.insert(index, head);
                index += 1;
                break;
            }
            rest -= len;
            index += 1;
        }
        (index + self.controls as usize).min(self.output.len())
    }

    /// Queues a Ping or Pong ahead of the data not yet begun.
    fn queue_control(&mut self, opcode: OpCode, payload: &[u8]) {
        let mask = self.mask_key();
        let header = FrameHeader {
            fin: true,
            rsv: 0,
            opcode,
            mask,
            payload_len: payload.len() as u64,
        };
        let mut frame = BytesMut::with_capacity(header.len() + payload.len());
        header.encode(&mut frame);
        let start = frame.len();
        frame.extend_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut frame[start..], key, 0);
        }
        if self.controls == u16::MAX {
            // 65,535 Pings and Pongs waiting already: this one waits its turn.
            self.queue_frame(opcode, true, payload);
            return;
        }
        let at = self.control_slot();
        self.output_len += frame.len();
        self.output.insert(at, frame.freeze());
        self.controls += 1;
    }

    fn add_front_rest(&mut self, bytes: usize) {
        self.front_rest = clamp_u32(self.front_rest as usize + bytes);
    }

    fn send_data(&mut self, opcode: OpCode, mut payload: Bytes) -> Result<(), SendError> {
        if self.state != CloseState::Open {
            return Err(SendError::Closed);
        }
        // RFC 7692 §6: RSV1 on the first frame of a compressed message.
        let mut rsv = 0;
        if let Some(deflate) = self.deflate() {
            let mut compressed = Vec::new();
            if deflate.compress(&payload, &mut compressed) {
                payload = Bytes::from(compressed);
                rsv = RSV1;
            }
        }
        let fragment = self
            .limits
            .fragment_size
            .unwrap_or(usize::MAX)
            .clamp(1, MAX_OUT_FRAME);
        if payload.len() <= fragment {
            self.queue_data_frame(opcode, rsv, true, payload);
            return Ok(());
        }
        let mut rest = payload;
        let mut first = true;
        while !rest.is_empty() {
            let piece = rest.split_to(fragment.min(rest.len()));
            let (op, rsv) = if first {
                (opcode, rsv)
            } else {
                (OpCode::Continuation, 0)
            };
            self.queue_data_frame(op, rsv, rest.is_empty(), piece);
            first = false;
        }
        Ok(())
    }

    fn send_control(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), SendError> {
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(SendError::ControlPayloadTooLong(payload.len()));
        }
        if self.state != CloseState::Open {
            return Err(SendError::Closed);
        }
        self.queue_control(opcode, payload);
        Ok(())
    }

    fn queue_close(&mut self, code: CloseCode, reason: &str) {
        let reason = truncate_utf8(reason, CloseFrame::MAX_REASON_BYTES);
        let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
        payload[..2].copy_from_slice(&u16::from(code).to_be_bytes());
        payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
        self.queue_frame(OpCode::Close, true, &payload[..2 + reason.len()]);
    }

    /// Queues a data frame, without copying a large payload in the server role.
    fn queue_data_frame(&mut self, opcode: OpCode, rsv: u8, fin: bool, payload: Bytes) {
        if self.role == Role::Client || payload.len() <= COPY_THRESHOLD {
            self.queue_frame_rsv(opcode, rsv, fin, &payload);
            return;
        }
        let header = FrameHeader {
            fin,
            rsv,
            opcode,
            mask: None,
            payload_len: payload.len() as u64,
        };
        self.out_tail.reserve(MAX_HEADER_LEN);
        header.encode(&mut self.out_tail);
        self.output.push_back(self.out_tail.split().freeze());
        self.output_len += header.len() + payload.len();
        self.output.push_back(payload);
    }

    /// Writes header and payload (masked in the client role) into the output tail.
    fn queue_frame(&mut self, opcode: OpCode, fin: bool, payload: &[u8]) {
        self.queue_frame_rsv(opcode, 0, fin, payload);
    }

    /// [`Connection::queue_frame`] with RSV bits.
    fn queue_frame_rsv(&mut self, opcode: OpCode, rsv: u8, fin: bool, payload: &[u8]) {
        let mask = self.mask_key();
        let header = FrameHeader {
            fin,
            rsv,
            opcode,
            mask,
            payload_len: payload.len() as u64,
        };
        let total = header.len() + payload.len();
        self.out_tail.reserve(total);
        header.encode(&mut self.out_tail);
        let start = self.out_tail.len();
        self.out_tail.extend_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut self.out_tail[start..], key, 0);
        }
        self.output_len += total;
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.role)
            .field("state", &self.state)
            .field("error", &self.error)
            .field("pending_input", &self.pending_input())
            .field("pending_output", &self.output_len)
            .finish_non_exhaustive()
    }
}

enum Progress {
    /// The message is complete and valid, in `Connection::message`.
    Complete,
    NeedMore,
    Continue,
}

/// An event found by the decoder, before it is handed out owned or borrowed.
enum Decoded {
    /// A whole frame's payload, unmasked (and, for text, validated) in place at
    /// `input[start..end]`; the input up to `end` belongs to the event.
    InInput {
        kind: Kind,
        start: usize,
        end: usize,
    },
    /// A data message reassembled from pieces, complete and valid, in
    /// `Connection::message`.
    Reassembled,
    /// The peer's Close; the input is already discarded.
    Close(Option<CloseFrame>),
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Binary,
    Ping,
    Pong,
}

/// Parses a close frame body (RFC 6455 §5.5.1, §7.4): empty, or a sendable status code
/// followed by a UTF-8 reason.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<CloseFrame>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::CloseLengthOne),
        [hi, lo, reason @ ..] => {
            let raw = u16::from_be_bytes([*hi, *lo]);
            let code = CloseCode::from(raw);
            if !code.is_sendable() {
                return Err(ProtocolError::InvalidCloseCode(raw));
            }
            let reason = simdutf8::basic::from_utf8(reason)
                .map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok(Some(CloseFrame {
                code,
                reason: reason.to_owned(),
            }))
        }
    }
}

/// Encodes one unmasked, unfragmented server frame: the bytes to share among every
/// subscriber of a broadcast (encode once, send to many).
pub fn encode_server_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    encode_unmasked_frame(opcode, 0, payload)
}

/// One unmasked, unfragmented frame with `rsv` bits (e.g. RSV1 for a compressed
/// message, `deflate::deflated_frame`).
pub(crate) fn encode_unmasked_frame(opcode: OpCode, rsv: u8, payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        fin: true,
        rsv,
        opcode,
        mask: None,
        payload_len: payload.len() as u64,
    };
    let mut out = BytesMut::with_capacity(header.len() + payload.len());
    header.encode(&mut out);
    out.extend_from_slice(payload);
    out.freeze()
}

#[cfg(test)]
mod tests;
