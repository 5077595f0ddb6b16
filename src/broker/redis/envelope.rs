//! The binary envelope a message travels in between processes, on a Redis channel.
//!
//! ```text
//! offset  size  field
//! 0       3     magic  b"rsb" (ringsocket broker)
//! 3       1     version, 1
//! 4       16    origin: random id of the publishing process
//! 20      1     kind: 0 text, 1 binary
//! 21      n     payload (text: UTF-8)
//! ```
//!
//! Pure functions over bytes: no I/O, so every rule is unit-tested on literal bytes.

use crate::broker::Kind;

/// The first bytes of every envelope.
pub const MAGIC: [u8; 3] = *b"rsb";
/// The envelope version this code writes and reads.
pub const VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + ORIGIN_LEN + 1;
/// Length of a process's origin id.
pub const ORIGIN_LEN: usize = 16;

/// A random id per process, so that a process can recognise its own messages.
pub type Origin = [u8; ORIGIN_LEN];

const KIND_TEXT: u8 = 0;
const KIND_BINARY: u8 = 1;

/// A decoded envelope, borrowing the payload from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The process that published it.
    pub origin: Origin,
    /// Text or binary.
    pub kind: Kind,
    /// The payload (valid UTF-8 when `kind` is text).
    pub payload: &'a [u8],
}

/// Why bytes on one of our channels are not an envelope. Named in the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header.
    TooShort(usize),
    /// Does not start with [`MAGIC`].
    BadMagic,
    /// A version this code does not read.
    UnknownVersion(u8),
    /// A kind byte other than text or binary.
    UnknownKind(u8),
    /// A text message whose payload is not UTF-8.
    InvalidUtf8,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooShort(n) => write!(f, "{n} bytes, shorter than the {HEADER_LEN}-byte header"),
            Self::BadMagic => f.write_str("no ringsocket envelope magic"),
            Self::UnknownVersion(v) => write!(f, "unknown envelope version {v}"),
            Self::UnknownKind(k) => write!(f, "unknown message kind {k}"),
            Self::InvalidUtf8 => f.write_str("text message that is not UTF-8"),
        }
    }
}

/// Appends the envelope of a message to `out`.
pub fn encode(origin: &Origin, kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(origin);
    out.push(match kind {
        Kind::Text => KIND_TEXT,
        Kind::Binary => KIND_BINARY,
    });
    out.extend_from_slice(payload);
}

/// Reads an envelope. A text payload is checked to be UTF-8: another process could be
/// anything that can `PUBLISH`, and WebSocket text frames must be UTF-8.
pub fn decode(bytes: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        return Err(DecodeError::TooShort(bytes.len()));
    };
    // Fixed offsets into a fixed-size header: these indexes cannot fail.
    if header[..MAGIC.len()] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if header[MAGIC.len()] != VERSION {
        return Err(DecodeError::UnknownVersion(header[MAGIC.len()]));
    }
    let mut origin = [0; ORIGIN_LEN];
    origin.copy_from_slice(&header[MAGIC.len() + 1..HEADER_LEN - 1]);
    let kind = match header[HEADER_LEN - 1] {
        KIND_TEXT if simdutf8::basic::from_utf8(payload).is_err() => {
            return Err(DecodeError::InvalidUtf8);
        }
        KIND_TEXT => Kind::Text,
        KIND_BINARY => Kind::Binary,
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(Envelope {
        origin,
        kind,
        payload,
    })
}

/// The origin of an envelope, read from its header alone (without checking the
/// payload): to recognise our own messages before anything else is done with them.
pub fn origin(bytes: &[u8]) -> Option<Origin> {
    let (header, _) = bytes.split_first_chunk::<HEADER_LEN>()?;
    if header[..MAGIC.len()] != MAGIC || header[MAGIC.len()] != VERSION {
        return None;
    }
    let mut origin = [0; ORIGIN_LEN];
    origin.copy_from_slice(&header[MAGIC.len() + 1..HEADER_LEN - 1]);
    Some(origin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ORIGIN: Origin = [0xAB; ORIGIN_LEN];

    #[test]
    fn layout_is_magic_version_origin_kind_payload() {
        let mut out = Vec::new();
        encode(&ORIGIN, Kind::Binary, b"\x00\xff", &mut out);
        let mut expected = b"rsb\x01".to_vec();
        expected.extend_from_slice(&[0xAB; 16]);
        expected.extend_from_slice(b"\x01\x00\xff");
        assert_eq!(out, expected);
        let text = decode(&out).unwrap();
        assert_eq!(text.kind, Kind::Binary);
        assert_eq!(text.payload, b"\x00\xff");
        assert_eq!(text.origin, ORIGIN);
        assert_eq!(origin(&out), Some(ORIGIN));
        assert_eq!(origin(&out[..HEADER_LEN - 1]), None);
        assert_eq!(origin(b"hello, this is no envelope at all"), None);
    }

    #[test]
    fn empty_payload_is_valid() {
        let mut out = Vec::new();
        encode(&ORIGIN, Kind::Text, b"", &mut out);
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(decode(&out).unwrap().payload, b"");
    }

    #[test]
    fn foreign_bytes_are_named_errors() {
        assert_eq!(decode(b""), Err(DecodeError::TooShort(0)));
        assert_eq!(decode(b"rs"), Err(DecodeError::TooShort(2)));
        assert_eq!(decode(b"hello"), Err(DecodeError::BadMagic));
        assert_eq!(decode(b"rsb\x01"), Err(DecodeError::TooShort(4)));
        let mut out = Vec::new();
        encode(&ORIGIN, Kind::Text, b"x", &mut out);
        let mut wrong = out.clone();
        wrong[0] = b'R';
        assert_eq!(decode(&wrong), Err(DecodeError::BadMagic));
        let mut wrong = out.clone();
        wrong[3] = 2;
        assert_eq!(decode(&wrong), Err(DecodeError::UnknownVersion(2)));
        let mut wrong = out.clone();
        wrong[20] = 7;
        assert_eq!(decode(&wrong), Err(DecodeError::UnknownKind(7)));
        let mut wrong = out;
        wrong[21] = 0xff;
        assert_eq!(decode(&wrong), Err(DecodeError::InvalidUtf8));
    }

    proptest! {
        #[test]
        fn round_trips(origin in any::<[u8; 16]>(), binary in any::<bool>(),
                       payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let kind = if binary { Kind::Binary } else { Kind::Text };
            let payload = if binary { payload } else { String::from_utf8_lossy(&payload).into_owned().into_bytes() };
            let mut out = Vec::new();
            encode(&origin, kind, &payload, &mut out);
            let envelope = decode(&out).unwrap();
            prop_assert_eq!(envelope, Envelope { origin, kind, payload: &payload });
        }

        #[test]
        fn anything_decodes_or_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match decode(&bytes) {
                Ok(envelope) => prop_assert_eq!(envelope.payload.len(), bytes.len() - HEADER_LEN),
                Err(DecodeError::TooShort(n)) => prop_assert!(n < HEADER_LEN),
                Err(_) => {}
            }
        }
    }
}
