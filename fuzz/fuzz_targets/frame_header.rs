//! `FrameHeader::parse` on raw bytes (RFC 6455 §5.2).
//!
//! Checks: a strict prefix of a parsed header is partial (`Ok(None)`: nothing is
//! consumed); a parsed header re-encodes to bytes that parse back to the same header;
//! the re-encoding is byte-for-byte the input when the input used the shortest length
//! form; errors name what the bytes show.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringsocket::proto::frame::MAX_HEADER_LEN;
use ringsocket::proto::{FrameHeader, ProtocolError};

fuzz_target!(|data: &[u8]| {
    let (header, consumed) = match FrameHeader::parse(data) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            // Partial only while the header is shorter than its longest form.
            assert!(
                data.len() < MAX_HEADER_LEN,
                "partial with {} bytes",
                data.len()
            );
            return;
        }
        Err(ProtocolError::ReservedOpcode(op)) => {
            assert_eq!(op, data[0] & 0x0F);
            assert!(matches!(op, 0x3..=0x7 | 0xB..=0xF));
            return;
        }
        Err(ProtocolError::LengthTopBitSet) => {
            assert_eq!(data[1] & 0x7F, 127);
            assert!(data[2] & 0x80 != 0);
            return;
        }
        Err(other) => panic!("unexpected error {other:?} from a header alone"),
    };
    assert!((2..=MAX_HEADER_LEN).contains(&consumed) && consumed <= data.len());
    assert_eq!(header.payload_len >> 63, 0);
    for cut in 0..consumed {
        assert_eq!(FrameHeader::parse(&data[..cut]), Ok(None), "prefix {cut}");
    }

    let mut encoded = Vec::new();
    header.encode(&mut encoded);
    assert_eq!(encoded.len(), header.len());
    assert_eq!(
        FrameHeader::parse(&encoded),
        Ok(Some((header, encoded.len())))
    );

    // RFC 6455 §5.2: "the minimal number of bytes MUST be used to encode the length".
    let minimal = match data[1] & 0x7F {
        126 => header.payload_len > 125,
        127 => header.payload_len > 0xFFFF,
        _ => true,
    };
    if minimal {
        assert_eq!(header.len(), consumed);
        assert_eq!(encoded, &data[..consumed]);
    } else {
        assert!(header.len() < consumed);
    }
});
