//! The binary envelope a message travels in between processes (on a Redis channel, a
//! NATS subject, in a Redis or JetStream stream).
//!
//! ```text
//! version 2 (written)            version 1 (still read)
//! offset  size  field            offset  size  field
//! 0       3     magic b"rsb"     0       3     magic b"rsb" (ringsocket broker)
//! 3       1     version, 2       3       1     version, 1
//! 4       16    origin           4       16    origin: random id of the publisher
//! 20      8     sequence (BE)    20      1     kind: 0 text, 1 binary
//! 28      1     kind             21      n     payload (text: UTF-8)
//! 29      n     payload
//! ```
//!
//! The sequence number counts the publishing process's messages from 1, in the order
//! it sends them: a receiver that has seen number `n` from an origin drops anything
//! numbered `n` or less as a duplicate (a batch sent again after a broken connection).
//! Version 1 carries no number and is never taken for a duplicate.
//!
//! Pure functions over bytes: no I/O, so every rule is unit-tested on literal bytes.

use crate::broker::{BrokerError, BrokerName, Kind};

/// The first bytes of every envelope.
pub const MAGIC: [u8; 3] = *b"rsb";
/// The envelope version this code writes.
pub const VERSION: u8 = 2;
/// The version before sequence numbers, still read.
pub const VERSION_1: u8 = 1;
/// Bytes before the payload (version 2).
pub const HEADER_LEN: usize = MAGIC.len() + 1 + ORIGIN_LEN + SEQ_LEN + 1;
/// Bytes before the payload in version 1.
pub const HEADER_LEN_1: usize = MAGIC.len() + 1 + ORIGIN_LEN + 1;
/// Length of a process's origin id.
pub const ORIGIN_LEN: usize = 16;
/// Length of the sequence number.
const SEQ_LEN: usize = 8;
/// Where the origin starts.
const ORIGIN_AT: usize = MAGIC.len() + 1;

/// A random id per process, so that a process can recognise its own messages.
pub type Origin = [u8; ORIGIN_LEN];

/// A random origin id for a broker that starts, or why the OS gave none.
pub(crate) fn random_origin(broker: BrokerName) -> Result<Origin, BrokerError> {
    let mut origin: Origin = [0; ORIGIN_LEN];
    getrandom::fill(&mut origin).map_err(|e| {
        BrokerError::Os(
            broker,
            std::io::Error::other(format!("no random origin id: {e}")),
        )
    })?;
    Ok(origin)
}

const KIND_TEXT: u8 = 0;
const KIND_BINARY: u8 = 1;

/// A decoded envelope, borrowing the payload from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The process that published it.
    pub origin: Origin,
    /// Its number among that process's messages; `None` in version 1.
    pub seq: Option<u64>,
    /// Text or binary.
    pub kind: Kind,
    /// The payload (valid UTF-8 when `kind` is text).
    pub payload: &'a [u8],
}

/// Why bytes on one of our channels are not an envelope. Named in the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header of its version.
    TooShort(usize),
    /// Does not start with [`MAGIC`].
    BadMagic,
    /// A version this code does not read.
    UnknownVersion(u8),
    /// A kind byte other than text or binary.
    UnknownKind(u8),
    /// A text message whose payload is not UTF-8.
    InvalidUtf8,
    /// A `rso ` position prefix that is not `rso <offset> <epoch> `.
    BadPosition,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooShort(n) => write!(f, "{n} bytes, shorter than the envelope header"),
            Self::BadMagic => f.write_str("no ringsocket envelope magic"),
            Self::UnknownVersion(v) => write!(f, "unknown envelope version {v}"),
            Self::UnknownKind(k) => write!(f, "unknown message kind {k}"),
            Self::InvalidUtf8 => f.write_str("text message that is not UTF-8"),
            Self::BadPosition => f.write_str("a position prefix that is not rso <offset> <epoch>"),
        }
    }
}

/// Appends the envelope of message number `seq` of `origin` to `out`.
pub fn encode(origin: &Origin, seq: u64, kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(origin);
    out.extend_from_slice(&seq.to_be_bytes());
    out.push(kind_byte(kind));
    out.extend_from_slice(payload);
}

fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Text => KIND_TEXT,
        Kind::Binary => KIND_BINARY,
    }
}

/// The header length of the envelope `bytes` starts with, by its version byte; an
/// error when it is no envelope of ours or shorter than that header.
fn header_len(bytes: &[u8]) -> Result<usize, DecodeError> {
    if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let len = match bytes.get(MAGIC.len()) {
        None => return Err(DecodeError::TooShort(bytes.len())),
        Some(&VERSION) => HEADER_LEN,
        Some(&VERSION_1) => HEADER_LEN_1,
        Some(&other) => return Err(DecodeError::UnknownVersion(other)),
    };
    if bytes.len() < len {
        return Err(DecodeError::TooShort(bytes.len()));
    }
    Ok(len)
}

/// Reads an envelope (version 2, or 1). A text payload is checked to be UTF-8: another
/// process could be anything that can `PUBLISH`, and WebSocket text frames must be
/// UTF-8.
pub fn decode(bytes: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    let len = header_len(bytes)?;
    // `header_len` checked that `len` bytes are there: these indexes cannot fail.
    let (header, payload) = bytes.split_at(len);
    let mut origin = [0; ORIGIN_LEN];
    origin.copy_from_slice(&header[ORIGIN_AT..ORIGIN_AT + ORIGIN_LEN]);
    let seq = (len == HEADER_LEN).then(|| {
        let mut seq = [0; SEQ_LEN];
        seq.copy_from_slice(&header[ORIGIN_AT + ORIGIN_LEN..ORIGIN_AT + ORIGIN_LEN + SEQ_LEN]);
        u64::from_be_bytes(seq)
    });
    let kind = match header[len - 1] {
        KIND_TEXT if simdutf8::basic::from_utf8(payload).is_err() => {
            return Err(DecodeError::InvalidUtf8);
        }
        KIND_TEXT => Kind::Text,
        KIND_BINARY => Kind::Binary,
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(Envelope {
        origin,
        seq,
        kind,
        payload,
    })
}

/// The origin and payload length of an envelope, read from its header alone (without
/// checking the payload): to recognise our own messages, and ones over the size limit,
/// before anything else is done with them.
pub fn peek(bytes: &[u8]) -> Option<(Origin, usize)> {
    let len = header_len(bytes).ok()?;
    let mut origin = [0; ORIGIN_LEN];
    origin.copy_from_slice(&bytes[ORIGIN_AT..ORIGIN_AT + ORIGIN_LEN]);
    Some((origin, bytes.len() - len))
}

/// What the history script puts before the envelope of a publication it numbered:
/// `rso <offset> <epoch> ` (ASCII, the offset in decimal).
pub const POSITION_MAGIC: &[u8] = b"rso ";

/// A numbered publication's offset and epoch, if it has them, and its envelope.
pub type Split<'a> = (Option<(u64, &'a str)>, &'a [u8]);

/// Longest epoch read in a position prefix.
const MAX_EPOCH_LEN: usize = 64;

/// Splits a numbered publication's position prefix off its envelope: the offset and
/// epoch, and the envelope. Bytes without the prefix are an envelope with no position.
pub fn split_position(bytes: &[u8]) -> Result<Split<'_>, DecodeError> {
    let Some(rest) = bytes.strip_prefix(POSITION_MAGIC) else {
        return Ok((None, bytes));
    };
    let mut fields = rest.splitn(3, |&b| b == b' ');
    let (Some(offset), Some(epoch), Some(envelope)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(DecodeError::BadPosition);
    };
    let offset = std::str::from_utf8(offset)
        .ok()
        .filter(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|o| o.parse::<u64>().ok())
        .filter(|&o| o > 0)
        .ok_or(DecodeError::BadPosition)?;
    let epoch = std::str::from_utf8(epoch)
        .ok()
        .filter(|e| !e.is_empty() && e.len() <= MAX_EPOCH_LEN)
        .filter(|e| e.bytes().all(|b| b.is_ascii_alphanumeric()))
        .ok_or(DecodeError::BadPosition)?;
    Ok((Some((offset, epoch)), envelope))
}

#[cfg(test)]
mod tests {
    #[test]
    fn position_prefixes_split_or_are_refused() {
        use super::{DecodeError, split_position};
        assert_eq!(
            split_position(b"rso 42 6f1c0a3e9b2d4c57 rsb\x02..."),
            Ok((Some((42, "6f1c0a3e9b2d4c57")), &b"rsb\x02..."[..]))
        );
        assert_eq!(split_position(b"rsb\x02"), Ok((None, &b"rsb\x02"[..])));
        for bad in [
            &b"rso "[..],
            b"rso 42",
            b"rso 42 e",
            b"rso x e rsb",
            b"rso 0 e rsb",
            b"rso 42  rsb",
            b"rso 42 e! rsb",
            b"rso 99999999999999999999999 e rsb",
        ] {
            assert_eq!(
                split_position(bad),
                Err(DecodeError::BadPosition),
                "{bad:?}"
            );
        }
    }

    use super::*;
    use proptest::prelude::*;

    const ORIGIN: Origin = [0xAB; ORIGIN_LEN];

    #[test]
    fn layout_is_magic_version_origin_sequence_kind_payload() {
        let mut out = Vec::new();
        encode(
            &ORIGIN,
            0x0102_0304_0506_0708,
            Kind::Binary,
            b"\x00\xff",
            &mut out,
        );
        let mut expected = b"rsb\x02".to_vec();
        expected.extend_from_slice(&[0xAB; 16]);
        expected.extend_from_slice(b"\x01\x02\x03\x04\x05\x06\x07\x08");
        expected.extend_from_slice(b"\x01\x00\xff");
        assert_eq!(out, expected);
        let binary = decode(&out).unwrap();
        assert_eq!(binary.kind, Kind::Binary);
        assert_eq!(binary.payload, b"\x00\xff");
        assert_eq!(binary.origin, ORIGIN);
        assert_eq!(binary.seq, Some(0x0102_0304_0506_0708));
        assert_eq!(peek(&out), Some((ORIGIN, 2)));
        assert_eq!(peek(&out[..HEADER_LEN - 1]), None);
        assert_eq!(peek(b"hello, this is no envelope at all"), None);
    }

    #[test]
    fn version_1_is_still_read_without_a_sequence_number() {
        let mut v1 = b"rsb\x01".to_vec();
        v1.extend_from_slice(&[0xAB; 16]);
        v1.extend_from_slice(b"\x00hi");
        assert_eq!(
            decode(&v1),
            Ok(Envelope {
                origin: ORIGIN,
                seq: None,
                kind: Kind::Text,
                payload: b"hi"
            })
        );
        assert_eq!(peek(&v1), Some((ORIGIN, 2)));
        assert_eq!(decode(&v1[..HEADER_LEN_1]).unwrap().payload, b"");
        assert_eq!(
            decode(&v1[..HEADER_LEN_1 - 1]),
            Err(DecodeError::TooShort(HEADER_LEN_1 - 1))
        );
    }

    #[test]
    fn empty_payload_is_valid() {
        let mut out = Vec::new();
        encode(&ORIGIN, 1, Kind::Text, b"", &mut out);
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(decode(&out).unwrap().payload, b"");
    }

    #[test]
    fn foreign_bytes_are_named_errors() {
        assert_eq!(decode(b""), Err(DecodeError::TooShort(0)));
        assert_eq!(decode(b"rs"), Err(DecodeError::TooShort(2)));
        assert_eq!(decode(b"hello"), Err(DecodeError::BadMagic));
        assert_eq!(decode(b"rsb\x01"), Err(DecodeError::TooShort(4)));
        assert_eq!(decode(b"rsb\x02"), Err(DecodeError::TooShort(4)));
        let mut out = Vec::new();
        encode(&ORIGIN, 7, Kind::Text, b"x", &mut out);
        assert_eq!(
            decode(&out[..HEADER_LEN - 1]),
            Err(DecodeError::TooShort(HEADER_LEN - 1))
        );
        let mut wrong = out.clone();
        wrong[0] = b'R';
        assert_eq!(decode(&wrong), Err(DecodeError::BadMagic));
        let mut wrong = out.clone();
        wrong[3] = 3;
        assert_eq!(decode(&wrong), Err(DecodeError::UnknownVersion(3)));
        let mut wrong = out.clone();
        wrong[28] = 7;
        assert_eq!(decode(&wrong), Err(DecodeError::UnknownKind(7)));
        let mut wrong = out;
        wrong[29] = 0xff;
        assert_eq!(decode(&wrong), Err(DecodeError::InvalidUtf8));
    }

    proptest! {
        #[test]
        fn round_trips(origin in any::<[u8; 16]>(), seq in any::<u64>(), binary in any::<bool>(),
                       payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let kind = if binary { Kind::Binary } else { Kind::Text };
            let payload = if binary { payload } else { String::from_utf8_lossy(&payload).into_owned().into_bytes() };
            let mut out = Vec::new();
            encode(&origin, seq, kind, &payload, &mut out);
            let envelope = decode(&out).unwrap();
            prop_assert_eq!(envelope, Envelope { origin, seq: Some(seq), kind, payload: &payload });
            prop_assert_eq!(peek(&out), Some((origin, payload.len())));
        }

        #[test]
        fn anything_decodes_or_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match decode(&bytes) {
                Ok(envelope) => {
                    let header = if envelope.seq.is_some() { HEADER_LEN } else { HEADER_LEN_1 };
                    prop_assert_eq!(envelope.payload.len(), bytes.len() - header);
                    prop_assert_eq!(peek(&bytes), Some((envelope.origin, envelope.payload.len())));
                }
                Err(DecodeError::TooShort(n)) => prop_assert!(n < HEADER_LEN),
                Err(_) => {}
            }
        }
    }
}
