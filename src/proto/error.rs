//! Protocol errors: small `Copy` values, each mapping to the close code that fails the
//! connection (RFC 6455 §7.1.7, §7.4.1).

use std::fmt;

use super::close::CloseCode;

/// A violation of RFC 6455 by the peer, or a limit it went past. Each one fails the
/// connection with [`ProtocolError::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// RSV1..3 set without a negotiated extension that defines them (§5.2).
    ReservedBits(u8),
    /// Opcode 0x3..=0x7 or 0xB..=0xF (§5.2).
    ReservedOpcode(u8),
    /// A control frame with more than 125 bytes of payload (§5.5).
    ControlFrameTooLong(u64),
    /// A control frame without FIN (§5.5).
    FragmentedControlFrame,
    /// A client frame without a mask, received by a server (§5.1).
    UnmaskedClientFrame,
    /// A server frame with a mask, received by a client (§5.1).
    MaskedServerFrame,
    /// A 64-bit payload length with its most significant bit set (§5.2).
    LengthTopBitSet,
    /// A continuation frame with no fragmented message in progress (§5.4).
    ContinuationWithoutStart,
    /// A text or binary frame while a fragmented message is in progress (§5.4).
    DataFrameInsideFragmentedMessage,
    /// A text message, or a close reason, that is not valid UTF-8 (§5.6, §8.1).
    InvalidUtf8,
    /// A frame whose payload exceeds the frame limit (`Limits::max_frame_size`).
    FrameTooLarge { len: u64, limit: usize },
    /// A message whose fragments together exceed the message limit.
    MessageTooLarge { len: u64, limit: usize },
    /// A close frame with a 1-byte payload (§5.5.1).
    CloseLengthOne,
    /// A close frame whose status code may not be sent on the wire (§7.4).
    InvalidCloseCode(u16),
    /// A close reason that is not valid UTF-8 (§5.5.1).
    InvalidCloseReason,
    /// A permessage-deflate message that does not inflate (RFC 7692 §7.2.2).
    BadCompressedData,
}

impl ProtocolError {
    /// The close code that fails the connection for this error.
    pub fn close_code(self) -> CloseCode {
        match self {
            Self::InvalidUtf8 | Self::InvalidCloseReason | Self::BadCompressedData => {
                CloseCode::Invalid
            }
            Self::FrameTooLarge { .. } | Self::MessageTooLarge { .. } => CloseCode::Size,
            _ => CloseCode::Protocol,
        }
    }

    /// A short reason for the close frame, at most 123 bytes.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ReservedBits(_) => "reserved bits set without a negotiated extension",
            Self::ReservedOpcode(_) => "reserved opcode",
            Self::ControlFrameTooLong(_) => "control frame payload over 125 bytes",
            Self::FragmentedControlFrame => "fragmented control frame",
            Self::UnmaskedClientFrame => "client frame not masked",
            Self::MaskedServerFrame => "server frame masked",
            Self::LengthTopBitSet => "64-bit payload length with the top bit set",
            Self::ContinuationWithoutStart => "continuation frame without a message to continue",
            Self::DataFrameInsideFragmentedMessage => "new data frame inside a fragmented message",
            Self::InvalidUtf8 => "invalid UTF-8 in text message",
            Self::FrameTooLarge { .. } => "frame too large",
            Self::MessageTooLarge { .. } => "message too large",
            Self::CloseLengthOne => "close frame payload of 1 byte",
            Self::InvalidCloseCode(_) => "invalid close code",
            Self::InvalidCloseReason => "invalid UTF-8 in close reason",
            Self::BadCompressedData => "compressed message does not inflate",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ReservedBits(bits) => write!(f, "{} (rsv {bits:#05b})", self.reason()),
            Self::ReservedOpcode(op) => write!(f, "{} {op:#x}", self.reason()),
            Self::ControlFrameTooLong(len) => write!(f, "{} ({len} bytes)", self.reason()),
            Self::FrameTooLarge { len, limit } | Self::MessageTooLarge { len, limit } => {
                write!(f, "{} ({len} bytes, limit {limit})", self.reason())
            }
            Self::InvalidCloseCode(code) => write!(f, "{} {code}", self.reason()),
            _ => f.write_str(self.reason()),
        }?;
        write!(f, " [close {}]", self.close_code())
    }
}

impl std::error::Error for ProtocolError {}
