//! Limits of the protocol core, with their defaults in one place (STYLE.md §13).
//!
//! Every buffer the core grows on behalf of a peer is bounded by one of these
//! numbers, and each limit has a named outcome when it is reached: an HTTP status
//! during the handshake, a close code afterwards.

/// Limits for parsing the HTTP/1.1 request or response head of the opening handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandshakeLimits {
    /// Largest request head, request line and headers up to and including the empty
    /// line, in bytes. Default 8 KiB. Beyond it: `431 Request Header Fields Too Large`.
    /// Values above [`HandshakeLimits::MAX_HEAD_BYTES_CEILING`] are clamped to it.
    pub max_head_bytes: usize,
    /// Most header fields in one head. Default 64. Beyond it: `431`.
    pub max_headers: usize,
}

impl HandshakeLimits {
    /// Default [`HandshakeLimits::max_head_bytes`]: 8 KiB.
    pub const DEFAULT_MAX_HEAD_BYTES: usize = 8 * 1024;
    /// Default [`HandshakeLimits::max_headers`]: 64.
    pub const DEFAULT_MAX_HEADERS: usize = 64;
    /// The hard ceiling on [`HandshakeLimits::max_headers`], the size of the header
    /// array on the stack while parsing. Larger configured values are clamped to it.
    pub const MAX_HEADERS_CEILING: usize = 256;
    /// The hard ceiling on [`HandshakeLimits::max_head_bytes`]: 64 KiB - 1, so that a
    /// parsed request stores its parts as 16-bit offsets.
    pub const MAX_HEAD_BYTES_CEILING: usize = u16::MAX as usize;

    /// [`HandshakeLimits::max_head_bytes`] after the ceiling.
    pub fn head_limit(&self) -> usize {
        self.max_head_bytes.min(Self::MAX_HEAD_BYTES_CEILING)
    }
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            max_head_bytes: Self::DEFAULT_MAX_HEAD_BYTES,
            max_headers: Self::DEFAULT_MAX_HEADERS,
        }
    }
}

/// Limits of a WebSocket connection once the handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest payload of a single frame, in bytes. Default 1 MiB. A frame header that
    /// announces more fails the connection with 1009 (Message Too Big) before any of its
    /// payload is buffered.
    pub max_frame_size: usize,
    /// Largest message (all fragments together), in bytes. Default 1 MiB. A fragment that
    /// would take the message past it fails the connection with 1009.
    pub max_message_size: usize,
    /// Outgoing messages larger than this are split into frames of at most this payload
    /// size (RFC 6455 §5.4). `None` (the default) sends every message as one frame.
    pub fragment_size: Option<usize>,
}

impl Limits {
    /// Default [`Limits::max_frame_size`]: 1 MiB.
    pub const DEFAULT_MAX_FRAME_SIZE: usize = 1 << 20;
    /// Default [`Limits::max_message_size`]: 1 MiB.
    pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;

    /// Returns these limits with a maximum message size of `bytes`. The frame limit is
    /// lowered with it when it is larger, since one frame can never exceed its message.
    #[must_use]
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self.max_frame_size = self.max_frame_size.min(bytes);
        self
    }

    /// Returns these limits with a maximum frame payload size of `bytes`.
    #[must_use]
    pub fn with_max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// Returns these limits with outgoing messages fragmented at `bytes` of payload
    /// per frame (`None`: never fragment). A value of 0 is treated as 1.
    #[must_use]
    pub fn with_fragment_size(mut self, bytes: Option<usize>) -> Self {
        self.fragment_size = bytes.map(|b| b.max(1));
        self
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_size: Self::DEFAULT_MAX_FRAME_SIZE,
            max_message_size: Self::DEFAULT_MAX_MESSAGE_SIZE,
            fragment_size: None,
        }
    }
}
