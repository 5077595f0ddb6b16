//! `proxy::parse` on raw bytes (HAProxy PROXY protocol v1 and v2).
//!
//! Checks: no panic; a parsed header takes at most `MAX_HEADER_LEN` bytes, every strict
//! prefix of it is partial, and `needed` never reaches past it; a header with
//! addresses re-encodes (in its version) to bytes that parse back to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringsocket::proto::proxy::{self, MAX_HEADER_LEN, ProxyVersion};

fuzz_target!(|data: &[u8]| {
    let (header, consumed) = match proxy::parse(data) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            assert!(
                data.len() < MAX_HEADER_LEN,
                "partial with {} bytes",
                data.len()
            );
            let needed = proxy::needed(data);
            assert!(needed >= 1 && data.len() + needed <= MAX_HEADER_LEN);
            return;
        }
        Err(_) => return,
    };
    assert!(consumed <= data.len() && consumed <= MAX_HEADER_LEN);
    for cut in 0..consumed {
        assert_eq!(proxy::parse(&data[..cut]), Ok(None), "prefix {cut}");
        assert!(
            cut + proxy::needed(&data[..cut]) <= consumed,
            "needed at {cut}"
        );
    }
    if let Some(addresses) = header.addresses {
        let encoded = match header.version {
            ProxyVersion::V1 => proxy::encode_v1(Some(&addresses)),
            ProxyVersion::V2 => proxy::encode_v2(Some(&addresses), &[]),
        };
        let (again, used) = proxy::parse(&encoded).unwrap().unwrap();
        assert_eq!(used, encoded.len());
        assert_eq!(again, header);
    }
});
