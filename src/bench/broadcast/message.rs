//! The bench's messages and what a subscriber makes of them: the header every message
//! starts with (in binary, or as hex digits in a JSON message), and per publisher the
//! next sequence number expected and the gaps below it (see the parent module for the
//! rules).

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::HEADER_BYTES;
use crate::bench::payload::{JsonArrays, Payload, hex, json_min_size, unhex};
use crate::proto::{Connection, SendError};

/// The hex digits of a JSON message's header: publisher, step, sequence number and due
/// time, 8 + 8 + 16 + 16 of them.
pub(super) const JSON_HEADER_HEX: usize = 48;

/// The smallest `--size` of a JSON message: `{"h":"<48 digits>","d":[]}`.
pub(super) const JSON_MIN_SIZE: usize = json_min_size(JSON_HEADER_HEX);

/// How a run's messages are made and read: `--size` bytes, the header in binary with
/// zeros after it (`--payload pattern`), or a JSON text message (`--payload json`).
#[derive(Debug)]
pub(super) struct Format {
    pub(super) size: usize,
    /// The arrays of JSON messages, when `--payload json`.
    json: Option<JsonArrays>,
}

impl Format {
    pub(super) fn new(size: usize, payload: Payload) -> Self {
        let json = (payload == Payload::Json)
            .then(|| JsonArrays::new(size.saturating_sub(JSON_MIN_SIZE - 2)));
        Self { size, json }
    }

    /// Queues the message with `header` on `conn`: binary, or text for JSON.
    pub(super) fn send(&self, conn: &mut Connection, header: &Header) -> Result<(), SendError> {
        match &self.json {
            None => conn.send_binary(header.encode(self.size)),
            Some(arrays) => {
                let message = arrays.message(&header.hex(), header.seq);
                // A JSON message is ASCII; the fallback is never taken.
                conn.send_text(String::from_utf8(message).unwrap_or_default())
            }
        }
    }

    /// The message with `header`, as [`Self::send`] sends it.
    #[cfg(test)]
    pub(super) fn message(&self, header: &Header) -> Vec<u8> {
        match &self.json {
            None => header.encode(self.size).to_vec(),
            Some(arrays) => arrays.message(&header.hex(), header.seq),
        }
    }

    /// The length of the message at the start of `bytes` when it is, byte for byte, a
    /// JSON message this run sends (its header, then the array its sequence number
    /// carries), else `None`. Such a message is one complete JSON value, so a
    /// ringsocket.v1 subscriber knows where the `data` holding it ends without walking
    /// its 1 KiB of strings and brackets ([`super::v1::Envelope::data`]).
    pub(super) fn json_len_at(&self, bytes: &[u8]) -> Option<usize> {
        let arrays = self.json.as_ref()?;
        let candidate = bytes.get(..self.size)?;
        let header = JsonArrays::header(candidate, JSON_HEADER_HEX).and_then(Header::decode_hex)?;
        arrays
            .matches(candidate, JSON_HEADER_HEX, header.seq)
            .then_some(self.size)
    }

    /// The header of a received message, or why it is not one of the bench's.
    pub(super) fn decode(&self, payload: &[u8]) -> Result<Header, String> {
        match &self.json {
            None => Header::decode(payload).ok_or_else(|| {
                format!("a {} B message, shorter than the header", payload.len())
            }),
            Some(_) => JsonArrays::header(payload, JSON_HEADER_HEX)
                .and_then(Header::decode_hex)
                .ok_or_else(|| {
                    format!(
                        "a {} B message without the bench's JSON header ({{\"h\":\"<{JSON_HEADER_HEX} hex digits>\",\"d\":…}})",
                        payload.len()
                    )
                }),
        }
    }
}

/// One message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) publisher: u32,
    pub(super) step: u32,
    pub(super) seq: u64,
    pub(super) sent_ns: u64,
}

impl Header {
    pub(super) fn encode(&self, size: usize) -> Bytes {
        let mut out = BytesMut::zeroed(size.max(HEADER_BYTES));
        out[0..4].copy_from_slice(&self.publisher.to_le_bytes());
        out[4..8].copy_from_slice(&self.step.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.sent_ns.to_le_bytes());
        out.freeze()
    }

    /// The header as the hex digits of a JSON message.
    pub(super) fn hex(&self) -> [u8; JSON_HEADER_HEX] {
        let mut out = [0u8; JSON_HEADER_HEX];
        out[0..8].copy_from_slice(&hex::<8>(self.publisher.into()));
        out[8..16].copy_from_slice(&hex::<8>(self.step.into()));
        out[16..32].copy_from_slice(&hex::<16>(self.seq));
        out[32..48].copy_from_slice(&hex::<16>(self.sent_ns));
        out
    }

    /// Reads [`Self::hex`]'s digits back.
    pub(super) fn decode_hex(digits: &[u8]) -> Option<Self> {
        let field = |range: Range<usize>| digits.get(range).and_then(unhex);
        if digits.len() != JSON_HEADER_HEX {
            return None;
        }
        Some(Self {
            publisher: u32::try_from(field(0..8)?).ok()?,
            step: u32::try_from(field(8..16)?).ok()?,
            seq: field(16..32)?,
            sent_ns: field(32..48)?,
        })
    }

    pub(super) fn decode(payload: &[u8]) -> Option<Self> {
        let field = |range: Range<usize>| payload.get(range);
        let u32_at = |at: usize| {
            field(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
        };
        let u64_at = |at: usize| {
            field(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        Some(Self {
            publisher: u32_at(0)?,
            step: u32_at(4)?,
            seq: u64_at(8)?,
            sent_ns: u64_at(16)?,
        })
    }
}

/// One subscriber's view of one publisher in the current step.
#[derive(Debug, Clone, Default)]
pub(super) struct Track {
    pub(super) step: u32,
    /// The next sequence number expected.
    next: u64,
    /// Sequence numbers below `next` not received yet.
    gaps: Vec<Range<u64>>,
}

/// What happened to a received sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arrival {
    InOrder,
    Reordered,
    Duplicate,
}

impl Track {
    pub(super) fn arrive(&mut self, step: u32, seq: u64) -> Arrival {
        if self.step != step {
            *self = Self {
                step,
                ..Self::default()
            };
        }
        if seq >= self.next {
            if seq > self.next {
                self.gaps.push(self.next..seq);
            }
            self.next = seq + 1;
            return Arrival::InOrder;
        }
        let Some(i) = self.gaps.iter().position(|g| g.contains(&seq)) else {
            return Arrival::Duplicate;
        };
        let gap = self.gaps.swap_remove(i);
        if gap.start < seq {
            self.gaps.push(gap.start..seq);
        }
        if seq + 1 < gap.end {
            self.gaps.push(seq + 1..gap.end);
        }
        Arrival::Reordered
    }

    /// Messages of `step` not received, of `published` sent.
    pub(super) fn missing(&self, step: u32, published: u64) -> u64 {
        if self.step != step {
            return published;
        }
        let gaps: u64 = self
            .gaps
            .iter()
            .map(|g| g.end.min(published).saturating_sub(g.start))
            .sum();
        gaps + published.saturating_sub(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_short_payloads_are_refused() {
        let h = Header {
            publisher: 3,
            step: 7,
            seq: 1 << 40,
            sent_ns: 123_456_789,
        };
        let bytes = h.encode(64);
        assert_eq!(bytes.len(), 64);
        assert!(bytes[HEADER_BYTES..].iter().all(|b| *b == 0));
        assert_eq!(Header::decode(&bytes), Some(h));
        assert_eq!(Header::decode(&bytes[..HEADER_BYTES - 1]), None);
    }

    #[test]
    fn json_messages_carry_the_header_in_exactly_size_bytes() {
        let h = Header {
            publisher: 3,
            step: 7,
            seq: 1 << 40,
            sent_ns: u64::MAX - 1,
        };
        assert_eq!(Header::decode_hex(&h.hex()), Some(h));
        for size in [JSON_MIN_SIZE, 64, 100, 1000] {
            let format = Format::new(size, Payload::Json);
            let mut conn = Connection::client(crate::proto::Limits::default(), [7; 32]);
            format.send(&mut conn, &h).unwrap();
            let mut server = Connection::server(crate::proto::Limits::default());
            while let Some(chunk) = conn.poll_transmit() {
                server.handle_bytes(&chunk);
            }
            let Ok(Some(crate::proto::Event::Text(text))) = server.poll_event() else {
                panic!("not a text message");
            };
            assert_eq!(text.len(), size);
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(value["d"].is_array(), "{text}");
            assert_eq!(format.decode(text.as_bytes()), Ok(h));
            let mut bad = text.as_bytes().to_vec();
            bad[10] = b'x';
            assert!(format.decode(&bad).unwrap_err().contains("JSON header"));
            assert!(format.decode(&text.as_bytes()[..size - 1]).is_err());
        }
        // The binary format is as before.
        let binary = Format::new(64, Payload::Pattern);
        assert_eq!(binary.decode(&h.encode(64)), Ok(h));
        assert!(binary.decode(&[0; 10]).unwrap_err().contains("shorter"));
    }

    #[test]
    fn tracks_gaps_reorders_and_duplicates() {
        let mut t = Track::default();
        assert_eq!(t.arrive(1, 0), Arrival::InOrder);
        assert_eq!(t.arrive(1, 3), Arrival::InOrder); // gap 1..3
        assert_eq!(t.arrive(1, 2), Arrival::Reordered); // gap 1..2 left
        assert_eq!(t.arrive(1, 2), Arrival::Duplicate);
        assert_eq!(t.arrive(1, 0), Arrival::Duplicate);
        assert_eq!(t.arrive(1, 6), Arrival::InOrder); // gaps 1..2, 4..6
        assert_eq!(t.arrive(1, 4), Arrival::Reordered); // gaps 1..2, 5..6
        // Published 9: missing 1, 5 and 7, 8 never came.
        assert_eq!(t.missing(1, 9), 4);
        // Another step: everything of it is missing until it arrives.
        assert_eq!(t.missing(2, 5), 5);
        assert_eq!(t.arrive(2, 0), Arrival::InOrder);
        assert_eq!(t.missing(2, 1), 0);
    }
}
