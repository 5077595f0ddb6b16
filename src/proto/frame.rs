//! Frame headers (RFC 6455 §5.2): incremental decode and encode.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               |Masking-key, if MASK set to 1  |
//! +-------------------------------+-------------------------------+
//! ```

use bytes::{BufMut, Bytes};

use super::error::ProtocolError;

/// The longest frame header: 2 bytes, a 64-bit length and a masking key.
pub const MAX_HEADER_LEN: usize = 14;

/// The most payload a control frame may carry (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame opcode (RFC 6455 §5.2, §11.8). Reserved opcodes are rejected when decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: a text message (UTF-8).
    Text,
    /// 0x2: a binary message.
    Binary,
    /// 0x8: connection close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// Whether this is a control opcode (0x8 and above, RFC 6455 §5.5).
    #[inline]
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }

    /// The 4-bit wire value.
    #[inline]
    pub fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// The opcode for a 4-bit wire value; reserved values are a protocol error.
    #[inline]
    pub fn from_bits(bits: u8) -> Result<Self, ProtocolError> {
        Ok(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            other => return Err(ProtocolError::ReservedOpcode(other)),
        })
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN: this is the final fragment of a message.
    pub fin: bool,
    /// RSV1, RSV2, RSV3 as the low three bits (RSV1 = 0b100).
    pub rsv: u8,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, present on every client-to-server frame.
    pub mask: Option<[u8; 4]>,
    /// The payload length in bytes.
    pub payload_len: u64,
}

impl FrameHeader {
    /// Decodes a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` and consumes nothing when `buf` holds only part of a header,
    /// `Ok(Some((header, header_len)))` when it holds a whole one. Only errors that the
    /// header alone shows are reported here: a reserved opcode and a 64-bit length with
    /// its top bit set. The rules that depend on the role, the extensions or the message
    /// in progress belong to the connection.
    #[inline]
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let opcode = OpCode::from_bits(b0 & 0x0F)?;
        let masked = b1 & 0x80 != 0;
        let (payload_len, len_bytes) = match b1 & 0x7F {
            126 => {
                let Some(&[a, b]) = buf.get(2..4).and_then(|s| s.first_chunk::<2>()) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([a, b])), 2)
            }
            127 => {
                let Some(bytes) = buf.get(2..10).and_then(|s| s.first_chunk::<8>()) else {
                    return Ok(None);
                };
                let len = u64::from_be_bytes(*bytes);
                if len >> 63 != 0 {
                    return Err(ProtocolError::LengthTopBitSet);
                }
                (len, 8)
            }
            short => (u64::from(short), 0),
        };
        let mut header_len = 2 + len_bytes;
        let mask = if masked {
            let Some(key) = buf
                .get(header_len..header_len + 4)
                .and_then(|s| s.first_chunk::<4>())
            else {
                return Ok(None);
            };
            header_len += 4;
            Some(*key)
        } else {
            None
        };
        Ok(Some((
            Self {
                fin: b0 & 0x80 != 0,
                rsv: (b0 >> 4) & 0x07,
                opcode,
                mask,
                payload_len,
            },
            header_len,
        )))
    }

    /// The encoded length of this header, 2 to [`MAX_HEADER_LEN`] bytes.
    #[inline]
    pub fn len(&self) -> usize {
        let len_bytes = match self.payload_len {
            0..=125 => 0,
            126..=0xFFFF => 2,
            _ => 8,
        };
        2 + len_bytes + if self.mask.is_some() { 4 } else { 0 }
    }

    /// Whether the encoded header is empty: never, a header is at least 2 bytes.
    #[inline]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Encodes this header into `out`, using the shortest length form (RFC 6455 §5.2).
    #[inline]
    pub fn encode(&self, out: &mut impl BufMut) {
        let b0 = (u8::from(self.fin) << 7) | ((self.rsv & 0x07) << 4) | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        out.put_u8(b0);
        match self.payload_len {
            len @ 0..=125 => out.put_u8(mask_bit | len as u8),
            len @ 126..=0xFFFF => {
                out.put_u8(mask_bit | 126);
                out.put_u16(len as u16);
            }
            len => {
                out.put_u8(mask_bit | 127);
                out.put_u64(len);
            }
        }
        if let Some(key) = self.mask {
            out.put_slice(&key);
        }
    }
}

/// Splits one whole, unmasked, unfragmented frame, such as
/// [`encode_server_frame`](super::conn::encode_server_frame) makes, into its opcode and
/// its payload, which shares `frame`'s memory (no copy).
///
/// `None` unless `frame` is exactly one such frame: a header that [`FrameHeader::parse`]
/// accepts, with FIN set, not a continuation, no RSV bit (no extension transformed the
/// payload) and no mask, followed by exactly the payload length it states. A truncated
/// frame, trailing bytes, a masked (client) frame and a fragment are all `None`: nothing
/// is assumed about input that is not such a frame. Control opcodes are returned as
/// they are: which ones to accept is the caller's business.
pub fn split_unmasked_frame(frame: &Bytes) -> Option<(OpCode, Bytes)> {
    let (header, header_len) = FrameHeader::parse(frame).ok()??;
    if !header.fin
        || header.opcode == OpCode::Continuation
        || header.rsv != 0
        || header.mask.is_some()
    {
        return None;
    }
    let payload_len = usize::try_from(header.payload_len).ok()?;
    if frame.len().checked_sub(header_len)? != payload_len {
        return None;
    }
    Some((header.opcode, frame.slice(header_len..)))
}

/// How many bytes of the frame that byte `offset` of `frames` falls in come from
/// `offset` on (0 when `offset` is where a frame starts), for `frames` that start
/// with a frame header and hold whole frames back to back (a broadcast feed's frames).
/// `None` when a header on the way does not parse.
pub fn frame_rest(frames: &[u8], offset: usize) -> Option<usize> {
    let mut at = 0usize;
    while at < offset {
        let (header, header_len) = FrameHeader::parse(frames.get(at..)?).ok()??;
        let payload = usize::try_from(header.payload_len).ok()?;
        at = at.checked_add(header_len)?.checked_add(payload)?;
    }
    Some(at - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(opcode: OpCode, len: u64, mask: Option<[u8; 4]>) -> FrameHeader {
        FrameHeader {
            fin: true,
            rsv: 0,
            opcode,
            mask,
            payload_len: len,
        }
    }

    /// RFC 6455 §5.2: 7-bit, 16-bit and 64-bit lengths, with and without a mask, decode
    /// to what was encoded, and every strict prefix is "need more".
    #[test]
    fn header_round_trips_all_length_forms() {
        for len in [0, 1, 125, 126, 127, 0xFFFF, 0x1_0000, u64::MAX >> 1] {
            for mask in [None, Some([9, 8, 7, 6])] {
                let h = header(OpCode::Binary, len, mask);
                let mut buf = Vec::new();
                h.encode(&mut buf);
                assert_eq!(buf.len(), h.len());
                for cut in 0..buf.len() {
                    assert_eq!(
                        FrameHeader::parse(&buf[..cut]),
                        Ok(None),
                        "len {len} cut {cut}"
                    );
                }
                assert_eq!(FrameHeader::parse(&buf), Ok(Some((h, buf.len()))));
            }
        }
    }

    /// RFC 6455 §5.7 examples.
    #[test]
    fn rfc_examples_decode() {
        // A single-frame unmasked text message "Hello".
        let (h, n) = FrameHeader::parse(&[0x81, 0x05, 0x48]).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.payload_len, n),
            (true, OpCode::Text, None, 5, 2)
        );
        // A masked "Hello".
        let (h, n) = FrameHeader::parse(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d])
            .unwrap()
            .unwrap();
        assert_eq!((h.mask, n), (Some([0x37, 0xfa, 0x21, 0x3d]), 6));
        // First fragment of an unmasked text message.
        let (h, _) = FrameHeader::parse(&[0x01, 0x03]).unwrap().unwrap();
        assert!(!h.fin);
        // 256 bytes binary message in a single unmasked frame.
        let (h, n) = FrameHeader::parse(&[0x82, 0x7E, 0x01, 0x00])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, n), (256, 4));
        // 64KiB binary message in a single unmasked frame.
        let (h, n) = FrameHeader::parse(&[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, n), (65536, 10));
    }

    /// RFC 6455 §5.2: opcodes 0x3-0x7 and 0xB-0xF are reserved.
    #[test]
    fn reserved_opcodes_are_rejected() {
        for op in (0x3..=0x7).chain(0xB..=0xF) {
            assert_eq!(
                FrameHeader::parse(&[0x80 | op, 0]),
                Err(ProtocolError::ReservedOpcode(op))
            );
        }
    }

    /// RFC 6455 §5.2: "the most significant bit MUST be 0" in a 64-bit length.
    #[test]
    fn length_with_top_bit_is_rejected() {
        let buf = [0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            FrameHeader::parse(&buf),
            Err(ProtocolError::LengthTopBitSet)
        );
    }

    #[test]
    fn rsv_bits_are_reported() {
        let (h, _) = FrameHeader::parse(&[0xF1, 0x00]).unwrap().unwrap();
        assert_eq!(h.rsv, 0b111);
        let (h, _) = FrameHeader::parse(&[0xC1, 0x00]).unwrap().unwrap();
        assert_eq!(h.rsv, 0b100);
    }

    fn frame(b0: u8, len_field: &[u8], payload: &[u8]) -> Bytes {
        let mut buf = vec![b0];
        buf.extend_from_slice(len_field);
        buf.extend_from_slice(payload);
        Bytes::from(buf)
    }

    /// A text and a binary frame split into their opcode and payload, and the payload
    /// is a slice of the frame, not a copy.
    #[test]
    fn split_unmasked_frame_returns_opcode_and_payload() {
        let text = frame(0x81, &[5], b"Hello");
        let (opcode, payload) = split_unmasked_frame(&text).unwrap();
        assert_eq!((opcode, &payload[..]), (OpCode::Text, &b"Hello"[..]));
        assert_eq!(payload.as_ptr(), text[2..].as_ptr(), "no copy");
        let binary = frame(0x82, &[3], &[0, 0xff, 7]);
        assert_eq!(
            split_unmasked_frame(&binary),
            Some((OpCode::Binary, Bytes::from_static(&[0, 0xff, 7])))
        );
        assert_eq!(
            split_unmasked_frame(&frame(0x82, &[0], b"")),
            Some((OpCode::Binary, Bytes::new()))
        );
        // Control opcodes are not the splitter's business to refuse.
        assert_eq!(
            split_unmasked_frame(&frame(0x89, &[2], b"hi")),
            Some((OpCode::Ping, Bytes::from_static(b"hi")))
        );
    }

    /// 7-bit, 16-bit and 64-bit lengths, as `encode_server_frame` writes them, on both
    /// sides of each boundary.
    #[test]
    fn split_unmasked_frame_reads_every_length_form() {
        use crate::proto::conn::encode_server_frame;
        for (len, header_len) in [
            (0usize, 2),
            (1, 2),
            (125, 2),
            (126, 4),
            (65_535, 4),
            (65_536, 10),
            (70_000, 10),
        ] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let encoded = encode_server_frame(OpCode::Binary, &payload);
            assert_eq!(encoded.len(), header_len + len);
            let (opcode, split) = split_unmasked_frame(&encoded).unwrap();
            assert_eq!(opcode, OpCode::Binary);
            assert_eq!(split, payload, "len {len}");
        }
        let encoded = encode_server_frame(OpCode::Text, "héllo".as_bytes());
        assert_eq!(
            split_unmasked_frame(&encoded),
            Some((OpCode::Text, Bytes::from("héllo")))
        );
        // The 64-bit form by hand: 0x1_0000 bytes.
        let mut len = vec![127];
        len.extend_from_slice(&0x1_0000u64.to_be_bytes());
        let big = frame(0x82, &len, &vec![9u8; 0x1_0000]);
        assert_eq!(
            split_unmasked_frame(&big).map(|(_, p)| p.len()),
            Some(0x1_0000)
        );
    }

    /// Every strict prefix of a frame is truncated, and a byte more is not one frame.
    #[test]
    fn split_unmasked_frame_rejects_truncated_and_trailing_bytes() {
        use crate::proto::conn::encode_server_frame;
        for len in [0usize, 5, 125, 126, 300, 65_536] {
            let encoded = encode_server_frame(OpCode::Text, &vec![b'a'; len]);
            for cut in 0..encoded.len() {
                assert_eq!(
                    split_unmasked_frame(&encoded.slice(..cut)),
                    None,
                    "len {len} cut {cut}"
                );
            }
            let mut longer = encoded.to_vec();
            longer.push(b'a');
            assert_eq!(
                split_unmasked_frame(&Bytes::from(longer)),
                None,
                "len {len}"
            );
        }
        // A length field that promises more than is there, in each form.
        assert_eq!(
            split_unmasked_frame(&frame(0x81, &[126, 0x01, 0x00], b"x")),
            None
        );
        let mut len = vec![127];
        len.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
        assert_eq!(split_unmasked_frame(&frame(0x82, &len, b"x")), None);
    }

    /// A masked (client) frame, a fragment, RSV bits, a reserved opcode and a 64-bit
    /// length with its top bit set are not frames to split.
    #[test]
    fn split_unmasked_frame_rejects_what_is_not_one_plain_frame() {
        // RFC 6455 §5.7: a masked "Hello".
        let masked = Bytes::from_static(&[
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ]);
        assert_eq!(split_unmasked_frame(&masked), None);
        // The first fragment of a text message, and its last one.
        assert_eq!(split_unmasked_frame(&frame(0x01, &[3], b"Hel")), None);
        assert_eq!(split_unmasked_frame(&frame(0x80, &[2], b"lo")), None);
        // RSV1 (e.g. permessage-deflate).
        assert_eq!(split_unmasked_frame(&frame(0xC1, &[1], b"x")), None);
        assert_eq!(split_unmasked_frame(&frame(0x83, &[1], b"x")), None);
        let mut len = vec![127];
        len.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(split_unmasked_frame(&frame(0x82, &len, b"")), None);
        assert_eq!(split_unmasked_frame(&Bytes::new()), None);
    }

    /// `frame_rest` walks the headers: 0 at each frame's start, the bytes left of the
    /// frame anywhere inside it, across 7-bit and 16-bit lengths.
    #[test]
    fn frame_rest_finds_the_end_of_the_frame_an_offset_is_in() {
        let mut frames = Vec::new();
        let mut starts = Vec::new();
        for len in [3usize, 0, 200, 1] {
            starts.push(frames.len());
            header(OpCode::Binary, len as u64, None).encode(&mut frames);
            frames.extend(std::iter::repeat_n(7u8, len));
        }
        starts.push(frames.len());
        for pair in starts.windows(2) {
            let (start, end) = (pair[0], pair[1]);
            assert_eq!(frame_rest(&frames, start), Some(0));
            for offset in start + 1..end {
                assert_eq!(
                    frame_rest(&frames, offset),
                    Some(end - offset),
                    "at {offset}"
                );
            }
        }
        assert_eq!(frame_rest(&[0x82, 0x7e], 1), None, "a cut header");
    }
}
