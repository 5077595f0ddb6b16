//! Payload masking (RFC 6455 §5.3): `payload[i] ^= key[i % 4]`.
//!
//! [`apply_mask`] works a 32-byte block at a time on any alignment and length; the
//! compiler turns the block loop into SIMD XORs. [`apply_mask_scalar`] is the
//! byte-at-a-time definition the tests compare it against.

/// XORs `buf` with the masking `key`, as if `buf` started at byte `offset` of the
/// frame's payload. Masking and unmasking are the same operation.
///
/// `offset` lets a payload that arrives in pieces be unmasked piece by piece.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = rotate_key(key, offset);
    // The key twice, as the 8 bytes of a word: the same in either byte order.
    let half = u64::from(u32::from_ne_bytes(key));
    let word = half | (half << 32);
    let mut blocks = buf.chunks_exact_mut(32);
    for block in &mut blocks {
        for lane in block.chunks_exact_mut(8) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(lane);
            lane.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
        }
    }
    // Blocks and lanes are multiples of 4 bytes long, so the key phase is unchanged.
    let mut lanes = blocks.into_remainder().chunks_exact_mut(8);
    for lane in &mut lanes {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(lane);
        lane.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    // Then one 4-byte step, still in phase, and at most 3 bytes.
    let rest = lanes.into_remainder();
    let tail = match rest.split_first_chunk_mut::<4>() {
        Some((quad, tail)) => {
            *quad = (u32::from_ne_bytes(*quad) ^ half as u32).to_ne_bytes();
            tail
        }
        None => rest,
    };
    apply_mask_scalar(tail, key, 0);
}

/// Byte-at-a-time masking: the definition of RFC 6455 §5.3.
pub fn apply_mask_scalar(buf: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[(i + offset) & 3];
    }
}

/// The key as seen from byte `offset` of the payload: rotated left by `offset % 4`
/// bytes (one rotate instruction; `<[u8]>::rotate_left` is an out-of-line call).
#[inline]
fn rotate_key(key: [u8; 4], offset: usize) -> [u8; 4] {
    // Byte i of a little-endian word is bits 8i..8i+8: moving every byte down n places
    // is a right rotation by 8n bits.
    let bits = 8 * (offset & 3) as u32;
    u32::from_le_bytes(key).rotate_right(bits).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6455 §5.3: the fast path equals the definition for every length, offset and
    /// alignment.
    #[test]
    fn fast_mask_matches_scalar_for_all_alignments() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..9 {
            for len in 0..(300 - start) {
                for offset in 0..4 {
                    let mut fast = data[start..start + len].to_vec();
                    let mut slow = fast.clone();
                    apply_mask(&mut fast, key, offset);
                    apply_mask_scalar(&mut slow, key, offset);
                    assert_eq!(fast, slow, "start {start} len {len} offset {offset}");
                }
            }
        }
    }

    /// RFC 6455 §5.7: the masked "Hello" example.
    /// The word rotation equals rotating the key's bytes, on any target's endianness.
    #[test]
    fn rotated_key_matches_byte_rotation() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        for offset in 0..12 {
            let mut expected = key;
            expected.rotate_left(offset % 4);
            assert_eq!(rotate_key(key, offset), expected, "offset {offset}");
        }
    }

    #[test]
    fn rfc_example_unmasks_to_hello() {
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&payload, b"Hello");
    }

    #[test]
    fn piecewise_unmask_equals_whole() {
        let key = [1, 2, 3, 4];
        let original: Vec<u8> = (0..100u8).collect();
        let mut whole = original.clone();
        apply_mask(&mut whole, key, 0);
        let mut pieces = original.clone();
        let (a, rest) = pieces.split_at_mut(7);
        let (b, c) = rest.split_at_mut(33);
        apply_mask(a, key, 0);
        apply_mask(b, key, 7);
        apply_mask(c, key, 40);
        assert_eq!(whole, pieces);
    }
}
