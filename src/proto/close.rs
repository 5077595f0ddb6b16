//! Close codes and close frame payloads (RFC 6455 §5.5.1, §7.4).

use std::fmt;

/// A close status code (RFC 6455 §7.4.1), grouped as the IANA registry groups them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// 1000: the purpose of the connection has been fulfilled.
    Normal,
    /// 1001: the endpoint is going away (server shutdown, page navigation).
    Away,
    /// 1002: the peer broke the protocol.
    Protocol,
    /// 1003: the endpoint received a data type it cannot accept.
    Unsupported,
    /// 1005: no status code was present. Never sent on the wire (§7.4.1).
    Status,
    /// 1006: the connection closed without a close frame. Never sent on the wire.
    Abnormal,
    /// 1007: a text message was not valid UTF-8 (or similar inconsistent data).
    Invalid,
    /// 1008: a message violated the endpoint's policy.
    Policy,
    /// 1009: a message was too big to process.
    Size,
    /// 1010: the client expected an extension the server did not negotiate.
    Extension,
    /// 1011: the server met an unexpected condition.
    Error,
    /// 1012: the service is restarting.
    Restart,
    /// 1013: try again later (overload, slow consumer).
    Again,
    /// 1015: TLS handshake failure. Never sent on the wire.
    Tls,
    /// 1004, 1014 and 1016..=2999: reserved by the RFC or IANA, not to be sent.
    Reserved(u16),
    /// 3000..=3999: registered with IANA for libraries, frameworks and applications.
    Iana(u16),
    /// 4000..=4999: private use by applications.
    Library(u16),
    /// 0..=999 and 5000 and above: not valid close codes.
    Bad(u16),
}

impl CloseCode {
    /// Whether this code may appear in a close frame on the wire (RFC 6455 §7.4.1, §7.4.2).
    /// 1005, 1006 and 1015 are for reporting only; reserved and bad codes are invalid.
    pub fn is_sendable(self) -> bool {
        !matches!(
            self,
            Self::Status | Self::Abnormal | Self::Tls | Self::Reserved(_) | Self::Bad(_)
        )
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        match code {
            1000 => Self::Normal,
            1001 => Self::Away,
            1002 => Self::Protocol,
            1003 => Self::Unsupported,
            1005 => Self::Status,
            1006 => Self::Abnormal,
            1007 => Self::Invalid,
            1008 => Self::Policy,
            1009 => Self::Size,
            1010 => Self::Extension,
            1011 => Self::Error,
            1012 => Self::Restart,
            1013 => Self::Again,
            1015 => Self::Tls,
            1004 | 1014 | 1016..=2999 => Self::Reserved(code),
            3000..=3999 => Self::Iana(code),
            4000..=4999 => Self::Library(code),
            _ => Self::Bad(code),
        }
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        match code {
            CloseCode::Normal => 1000,
            CloseCode::Away => 1001,
            CloseCode::Protocol => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::Status => 1005,
            CloseCode::Abnormal => 1006,
            CloseCode::Invalid => 1007,
            CloseCode::Policy => 1008,
            CloseCode::Size => 1009,
            CloseCode::Extension => 1010,
            CloseCode::Error => 1011,
            CloseCode::Restart => 1012,
            CloseCode::Again => 1013,
            CloseCode::Tls => 1015,
            CloseCode::Reserved(c)
            | CloseCode::Iana(c)
            | CloseCode::Library(c)
            | CloseCode::Bad(c) => c,
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", u16::from(*self))
    }
}

/// The body of a close frame: a status code and a UTF-8 reason (RFC 6455 §5.5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code.
    pub code: CloseCode,
    /// The reason, at most [`CloseFrame::MAX_REASON_BYTES`] bytes of UTF-8.
    pub reason: String,
}

impl CloseFrame {
    /// A control frame's payload is at most 125 bytes; two of them hold the code.
    pub const MAX_REASON_BYTES: usize = 123;

    /// A close frame with `code` and `reason`. A reason longer than
    /// [`CloseFrame::MAX_REASON_BYTES`] is cut at the last character boundary that fits.
    pub fn new(code: CloseCode, reason: &str) -> Self {
        Self {
            code,
            reason: truncate_utf8(reason, Self::MAX_REASON_BYTES).to_owned(),
        }
    }
}

/// Cuts `s` to at most `max` bytes without splitting a character.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6455 §7.4.1 / §7.4.2: which codes may be sent.
    #[test]
    fn sendable_codes_follow_rfc_7_4() {
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 3999, 4000,
            4999,
        ] {
            assert!(
                CloseCode::from(code).is_sendable(),
                "{code} should be sendable"
            );
        }
        for code in [
            0u16, 999, 1004, 1005, 1006, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(
                !CloseCode::from(code).is_sendable(),
                "{code} should not be sendable"
            );
        }
    }

    #[test]
    fn code_round_trips_through_u16() {
        for code in 0..=u16::MAX {
            assert_eq!(u16::from(CloseCode::from(code)), code);
        }
    }

    #[test]
    fn reason_is_cut_on_a_char_boundary() {
        let long = "é".repeat(100); // 200 bytes
        let frame = CloseFrame::new(CloseCode::Normal, &long);
        assert_eq!(frame.reason.len(), 122);
        assert!(frame.reason.chars().all(|c| c == 'é'));
    }
}
