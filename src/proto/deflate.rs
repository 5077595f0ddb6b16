//! permessage-deflate (RFC 7692): the negotiation of its parameters and the per-message
//! codec, sans-IO.
//!
//! # Negotiation
//!
//! ```text
//!   server: Request::extensions() ─▶ negotiate(offers, allow_client_takeover)
//!             ─▶ Some(Agreed { params, response }) ─▶ 101 with
//!                Sec-WebSocket-Extensions: response; PerMessageDeflate::new(params, Server, …)
//!   client: client_offer() in the request ─▶ Accepted::deflate (checked by
//!             ClientHandshake::parse_response) ─▶ PerMessageDeflate::new(params, Client, …)
//! ```
//!
//! A server answers the first offer it can honour (RFC 7692 §5.1: an offer with an
//! unknown, repeated or out-of-range parameter is declined, and the next one tried).
//! Its answer always carries `server_no_context_takeover`, which §7.1.1.1 lets a server
//! add to any offer: this end compresses every message on its own, so one compressed
//! frame can go to every subscriber of a broadcast, and no connection keeps a
//! compressor. `client_no_context_takeover` is added when the caller does not allow the
//! client to keep its context (its memory budget is spent) or the client offered it.
//!
//! # The codec
//!
//! [`PerMessageDeflate`] is a connection's state: its negotiated parameters and, only
//! when the peer keeps its LZ77 context between messages, the last bytes the peer sent
//! (at most 2^window bits). Compressing and inflating run on a compressor and an
//! inflater kept per thread (one per core in the server) and reset for each message, so
//! an idle connection holds no zlib state at all: with context takeover, a message is
//! inflated with the peer's saved window as the preset dictionary (RFC 7692 §7.2.2: the
//! window is what the peer's compressor may point back into).
//!
//! Outgoing: a message of at least `min_bytes` is compressed with a sync flush and the
//! final `00 00 ff ff` removed (§7.2.1); if that is not shorter, it goes out plain (RSV1
//! is per message, so a sender may always do so), unless `min_bytes` is 0, which means
//! every message is compressed. Incoming: the payloads of a message's
//! frames, with `00 00 ff ff` appended, are inflated into at most the message limit
//! (§7.2.2); past it, inflating stops.

use std::cell::RefCell;
use std::fmt;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::conn::Role;
use super::frame::OpCode;
use super::handshake::ExtensionOffer;

/// The extension's token in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// The bytes a sync flush ends with, removed from each compressed message (§7.2.1) and
/// appended before inflating it (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The largest LZ77 window, 2^15 bytes, and the default of both `*_max_window_bits`.
pub const MAX_WINDOW_BITS: u8 = 15;
/// The smallest window a peer may ask for (§7.1.2).
pub const MIN_WINDOW_BITS: u8 = 8;
/// The smallest window zlib compresses raw deflate with. An end limited to 8 bits sends
/// every message uncompressed, which RFC 7692 allows (RSV1 is per message).
const MIN_COMPRESS_WINDOW_BITS: u8 = 9;

/// The parameters of a negotiated permessage-deflate (RFC 7692 §7.1), from the
/// response's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server compresses each message with a fresh context.
    pub server_no_context_takeover: bool,
    /// The client compresses each message with a fresh context.
    pub client_no_context_takeover: bool,
    /// The largest window the server's compressor uses, 8..=15.
    pub server_max_window_bits: u8,
    /// The largest window the client's compressor uses, 8..=15.
    pub client_max_window_bits: u8,
}

impl Default for DeflateParams {
    fn default() -> Self {
        Self {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: MAX_WINDOW_BITS,
            client_max_window_bits: MAX_WINDOW_BITS,
        }
    }
}

/// Why an offer or a response's parameters are not valid (RFC 7692 §5.1, §5.2, §7.1).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParamError {
    /// A parameter this extension does not define.
    Unknown(String),
    /// A parameter given twice.
    Repeated(&'static str),
    /// A parameter with a value it may not have, or without one it needs.
    BadValue(&'static str),
    /// A parameter a response may only carry if the offer asked for it.
    NotOffered(&'static str),
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(name) => write!(f, "unknown permessage-deflate parameter {name:?}"),
            Self::Repeated(name) => write!(f, "permessage-deflate parameter {name} given twice"),
            Self::BadValue(name) => write!(f, "invalid value for permessage-deflate {name}"),
            Self::NotOffered(name) => write!(f, "{name} in the response was not offered"),
        }
    }
}

impl std::error::Error for ParamError {}

/// One offer's parameters, as the client sent them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: the parameter without a value (the client accepts any limit).
    client_max_window_bits: Option<Option<u8>>,
}

/// A window size value: `8` to `15`, decimal, no leading zero or sign (§7.1.2.1).
fn window_bits(value: &str) -> Option<u8> {
    match value.as_bytes() {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// Reads the parameters of an offer or a response; `response` changes only which may
/// appear without a value.
fn parse_params(params: &[(String, Option<String>)], response: bool) -> Result<Offer, ParamError> {
    let mut offer = Offer::default();
    let mut seen = [false; 4];
    for (name, value) in params {
        let (index, key) = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => (0, "server_no_context_takeover"),
            "client_no_context_takeover" => (1, "client_no_context_takeover"),
            "server_max_window_bits" => (2, "server_max_window_bits"),
            "client_max_window_bits" => (3, "client_max_window_bits"),
            _ => return Err(ParamError::Unknown(name.clone())),
        };
        if std::mem::replace(&mut seen[index], true) {
            return Err(ParamError::Repeated(key));
        }
        let bits = value.as_deref().map(window_bits);
        match (index, bits) {
            (0, None) => offer.server_no_context_takeover = true,
            (1, None) => offer.client_no_context_takeover = true,
            (2, Some(Some(bits))) => offer.server_max_window_bits = Some(bits),
            // A response must give the client its limit; an offer may leave it open.
            (3, None) if !response => offer.client_max_window_bits = Some(None),
            (3, Some(Some(bits))) => offer.client_max_window_bits = Some(Some(bits)),
            _ => return Err(ParamError::BadValue(key)),
        }
    }
    Ok(offer)
}

/// What a server agreed to: the parameters in force and the `Sec-WebSocket-Extensions`
/// value of its 101 response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The parameters both ends now follow.
    pub params: DeflateParams,
    /// The response header's value.
    pub response: String,
}

impl Agreed {
    /// Whether the client keeps its context between messages, so the server keeps the
    /// client's last 2^`client_max_window_bits` bytes (what it budgets for).
    pub fn client_takeover(&self) -> bool {
        !self.params.client_no_context_takeover
    }

    /// The most bytes the server keeps of the client's window: 0 without context
    /// takeover.
    pub fn window_bytes(&self) -> usize {
        if self.client_takeover() {
            1 << self.params.client_max_window_bits
        } else {
            0
        }
    }
}

/// Server side: the answer to a request's extension offers (in the order sent), or
/// `None` when none of its permessage-deflate offers can be honoured (then the 101
/// carries no extension). `allow_client_takeover: false` makes the client compress each
/// message on its own, so that the server keeps no window for it.
pub fn negotiate(offers: &[ExtensionOffer], allow_client_takeover: bool) -> Option<Agreed> {
    offers
        .iter()
        .filter(|o| o.name.eq_ignore_ascii_case(EXTENSION))
        .find_map(|o| parse_params(&o.params, false).ok())
        .map(|offer| {
            let client_no_context_takeover =
                offer.client_no_context_takeover || !allow_client_takeover;
            let params = DeflateParams {
                server_no_context_takeover: true,
                client_no_context_takeover,
                server_max_window_bits: offer.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
                client_max_window_bits: offer
                    .client_max_window_bits
                    .flatten()
                    .unwrap_or(MAX_WINDOW_BITS),
            };
            let mut response = String::from("permessage-deflate; server_no_context_takeover");
            if client_no_context_takeover {
                response.push_str("; client_no_context_takeover");
            }
            if let Some(bits) = offer.server_max_window_bits {
                response.push_str(&format!("; server_max_window_bits={bits}"));
            }
            Agreed { params, response }
        })
}

/// Client side: the offer to put in `Sec-WebSocket-Extensions` (the one browsers send).
pub fn client_offer() -> &'static str {
    "permessage-deflate; client_max_window_bits"
}

/// Client side: the parameters of the server's response to [`client_offer`]
/// (§7.1: every parameter checked; `client_max_window_bits` is allowed since offered).
pub fn accept_response(response: &ExtensionOffer) -> Result<DeflateParams, ParamError> {
    let answer = parse_params(&response.params, true)?;
    Ok(DeflateParams {
        server_no_context_takeover: answer.server_no_context_takeover,
        client_no_context_takeover: answer.client_no_context_takeover,
        server_max_window_bits: answer.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
        client_max_window_bits: answer
            .client_max_window_bits
            .flatten()
            .unwrap_or(MAX_WINDOW_BITS),
    })
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// The inflated message would be larger than the limit: inflating stopped there.
    TooLarge { limit: usize },
    /// The data is not a valid deflate stream (or refers back past the window).
    Corrupt,
}

/// How a connection compresses what it sends and inflates what it receives. See the
/// module docs.
#[derive(Clone)]
pub struct PerMessageDeflate {
    /// The window this end compresses with (it never keeps its context).
    own_window_bits: u8,
    /// zlib level, 0-9.
    level: u8,
    /// Messages shorter than this go out uncompressed.
    min_bytes: u32,
    /// The peer keeps its context: `window` holds its last bytes.
    peer_takeover: bool,
    /// The peer's window, 2^`peer_window_bits` bytes at most.
    peer_window_bits: u8,
    /// The last bytes the peer sent (inflated), when `peer_takeover`; empty otherwise.
    window: Vec<u8>,
}

impl fmt::Debug for PerMessageDeflate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerMessageDeflate")
            .field("own_window_bits", &self.own_window_bits)
            .field("level", &self.level)
            .field("min_bytes", &self.min_bytes)
            .field("peer_takeover", &self.peer_takeover)
            .field("window", &self.window.len())
            .finish()
    }
}

impl PerMessageDeflate {
    /// The codec for `role`'s end of a connection that agreed on `params`. `level` is
    /// zlib's (0-9, clamped), and messages under `min_bytes` go out uncompressed.
    pub fn new(params: &DeflateParams, role: Role, level: u32, min_bytes: usize) -> Self {
        let (own, peer_takeover, peer) = match role {
            Role::Server => (
                params.server_max_window_bits,
                !params.client_no_context_takeover,
                params.client_max_window_bits,
            ),
            Role::Client => (
                params.client_max_window_bits,
                !params.server_no_context_takeover,
                params.server_max_window_bits,
            ),
        };
        Self {
            own_window_bits: own.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS),
            level: level.min(9) as u8,
            min_bytes: u32::try_from(min_bytes).unwrap_or(u32::MAX),
            peer_takeover,
            peer_window_bits: peer.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS),
            window: Vec::new(),
        }
    }

    /// Whether this end's broadcasts may be the frames [`encode_deflated_frame`] makes
    /// (window 15, no context): true unless the peer asked for a smaller window.
    pub fn takes_shared_frames(&self) -> bool {
        self.own_window_bits == MAX_WINDOW_BITS
    }

    /// Whether the peer keeps its context between messages (this end keeps its window).
    pub fn peer_keeps_context(&self) -> bool {
        self.peer_takeover
    }

    /// Messages shorter than this go out uncompressed.
    pub fn min_bytes(&self) -> usize {
        self.min_bytes as usize
    }

    /// The zlib level this end compresses with.
    pub fn level(&self) -> u32 {
        u32::from(self.level)
    }

    /// Bytes held for the peer's window now (0 without context takeover).
    pub fn window_bytes(&self) -> usize {
        self.window.capacity()
    }

    /// `payload` compressed into `out` (cleared first) as one message's data with the
    /// final `00 00 ff ff` removed; `false` when it should go out plain: shorter than
    /// `min_bytes`, not made smaller (unless `min_bytes` is 0: then every message is
    /// compressed), or a window of 8 bits that zlib cannot honour.
    pub fn compress(&self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        if payload.len() < self.min_bytes as usize
            || self.own_window_bits < MIN_COMPRESS_WINDOW_BITS
        {
            return false;
        }
        deflate_message(self.level, self.own_window_bits, payload, out)
            && worth_it(payload.len(), out.len(), self.min_bytes as usize)
    }

    /// Inflates one message, whose frames' payloads are `compressed` (joined), into at
    /// most `limit` bytes, and keeps the peer's window if it takes its context over.
    pub fn inflate(&mut self, compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
        let dictionary = if self.peer_takeover {
            &self.window[..]
        } else {
            &[]
        };
        let out = inflate_message(compressed, dictionary, limit)?;
        if self.peer_takeover {
            let keep = 1usize << self.peer_window_bits;
            if out.len() >= keep {
                self.window.clear();
                self.window.extend_from_slice(&out[out.len() - keep..]);
            } else {
                let excess = (self.window.len() + out.len()).saturating_sub(keep);
                self.window.drain(..excess);
                self.window.extend_from_slice(&out);
            }
        }
        Ok(out)
    }
}

thread_local! {
    /// This thread's compressors, one per (level, window bits) in use: reset per message.
    static COMPRESSORS: RefCell<Vec<(u8, u8, Compress)>> = const { RefCell::new(Vec::new()) };
    /// This thread's inflater (raw, 15-bit window): reset per message.
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Compresses `payload` as one message (fresh context, sync flush, tail removed) into
/// `out`; `false` if zlib refused (never with the levels and windows used here).
fn deflate_message(level: u8, bits: u8, payload: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    out.reserve(payload.len() / 2 + 64);
    COMPRESSORS.with_borrow_mut(|cache| {
        let at = match cache.iter().position(|(l, b, _)| (*l, *b) == (level, bits)) {
            Some(at) => at,
            None => {
                let c = Compress::new_with_window_bits(Compression::new(level.into()), false, bits);
                cache.push((level, bits, c));
                cache.len() - 1
            }
        };
        let compressor = &mut cache[at].2;
        compressor.reset();
        loop {
            let taken = compressor.total_in() as usize;
            let Some(rest) = payload.get(taken..) else {
                return false;
            };
            if compressor
                .compress_vec(rest, out, FlushCompress::Sync)
                .is_err()
            {
                return false;
            }
            let done = compressor.total_in() as usize == payload.len();
            // The flush is complete once all input is in and output room was left over.
            if done && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        true
    })
}

/// Inflates `compressed` + `00 00 ff ff` with `dictionary` as the window before it, into
/// at most `limit` bytes.
fn inflate_message(
    compressed: &[u8],
    dictionary: &[u8],
    limit: usize,
) -> Result<Vec<u8>, InflateError> {
    INFLATER.with_borrow_mut(|slot| {
        let inflater = slot.get_or_insert_with(|| Decompress::new_with_window_bits(false, 15));
        inflater.reset(false);
        if !dictionary.is_empty() && inflater.set_dictionary(dictionary).is_err() {
            return Err(InflateError::Corrupt);
        }
        // Room for one byte past the limit tells "exactly the limit" from "more".
        let cap = limit.saturating_add(1);
        let mut out: Vec<u8> =
            Vec::with_capacity(cap.min(compressed.len().saturating_mul(4) + 256));
        for part in [compressed, &TAIL[..]] {
            let start = inflater.total_in();
            loop {
                let used = (inflater.total_in() - start) as usize;
                let rest = part.get(used..).unwrap_or_default();
                if out.len() == out.capacity() {
                    if out.len() >= cap {
                        return Err(InflateError::TooLarge { limit });
                    }
                    out.reserve_exact(out.len().max(4096).min(cap - out.len()));
                }
                let status = inflater
                    .decompress_vec(rest, &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                if out.len() > limit {
                    return Err(InflateError::TooLarge { limit });
                }
                match status {
                    // A final block (BFINAL) ends the message; what follows is ignored.
                    Status::StreamEnd => return Ok(out),
                    Status::Ok | Status::BufError => {}
                }
                let consumed = (inflater.total_in() - start) as usize == part.len();
                if consumed && out.len() < out.capacity() {
                    break;
                }
                if !consumed && status == Status::BufError && out.len() < out.capacity() {
                    // No progress with room to write and input left: cannot happen with
                    // a sync flush; refuse rather than spin.
                    return Err(InflateError::Corrupt);
                }
            }
        }
        Ok(out)
    })
}

/// Whether a message of `plain` bytes goes out as its `compressed` bytes: when that is
/// smaller, or always with `min_bytes` 0 ("compress every message", which conformance
/// suites expect).
fn worth_it(plain: usize, compressed: usize, min_bytes: usize) -> bool {
    min_bytes == 0 || compressed < plain
}

/// Encodes one unmasked, unfragmented, compressed server frame (RSV1 set) for every
/// subscriber that [`PerMessageDeflate::takes_shared_frames`]: compressed once per
/// publish (window 15, no context), or `None` when the message should go out plain
/// (shorter than `min_bytes`, or not made smaller unless `min_bytes` is 0).
pub fn encode_deflated_frame(
    opcode: OpCode,
    payload: &[u8],
    level: u32,
    min_bytes: usize,
) -> Option<Bytes> {
    if payload.len() < min_bytes {
        return None;
    }
    let mut compressed = Vec::new();
    if !deflate_message(
        level.min(9) as u8,
        MAX_WINDOW_BITS,
        payload,
        &mut compressed,
    ) || !worth_it(payload.len(), compressed.len(), min_bytes)
    {
        return None;
    }
    Some(deflated_frame(opcode, &compressed))
}

/// The unmasked frame of an already compressed message: RSV1 set, FIN set.
pub fn deflated_frame(opcode: OpCode, compressed: &[u8]) -> Bytes {
    super::conn::encode_unmasked_frame(opcode, RSV1, compressed)
}

/// The RSV1 bit in [`FrameHeader::rsv`](super::frame::FrameHeader::rsv): "Per-Message Compressed" (§6).
pub const RSV1: u8 = 0b100;

#[cfg(test)]
mod tests;
