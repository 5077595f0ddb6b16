//! The bench's messages and what a subscriber makes of them: the header every message
//! starts with, and per publisher the next sequence number expected and the gaps below
//! it (see the parent module for the rules).

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::HEADER_BYTES;

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
