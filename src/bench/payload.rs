//! What fills the bench's messages after the header its checker reads (`--payload`):
//! the filler it always used, or JSON text that compresses as a live feed's does, made
//! to the exact `--size`.
//!
//! A JSON message is one object, `{"h":"<header>","d":[…]}`: the header as fixed-width
//! lowercase hex digits (so that it sits at a fixed offset and the message has an exact
//! length), then an array of market-data objects such as
//! `{"id":1042,"sym":"BTC-USD","px":43250.50,"qty":0.25,"side":"buy","ts":1733500000123}`,
//! cut to fit: when the next object does not fit, a string made of its characters
//! (quotes left out) fills the rest, or blanks when even that does not fit. Every byte is
//! ASCII, so the message is valid UTF-8 text.
//!
//! The arrays are made once per run, [`JSON_VARIANTS`] of them, and message `seq` carries
//! variant `seq % JSON_VARIANTS`: the load generator spends nothing on making JSON while
//! it measures. A server that keeps its compression context between messages (no
//! `server_no_context_takeover`) finds the earlier variants in its window once they fit,
//! and compresses better than it would a live feed; one that compresses every message
//! on its own (ringsocket) sees each message as a feed would send it.

use serde::Serialize;

/// `--payload`: what fills a message after its header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// echo: the sequence number in 8 hex digits, then a..z; broadcast: the binary
    /// header, then zeros.
    #[default]
    Pattern,
    /// Market-data records in a JSON text message of exactly --size bytes
    /// ({"id":…,"sym":"BTC-USD","px":…,"qty":…,"side":"buy","ts":…} each):
    /// compressible as a live feed.
    Json,
}

impl Payload {
    /// The value's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pattern => "pattern",
            Self::Json => "json",
        }
    }
}

/// How many different arrays a run's JSON messages cycle through.
pub const JSON_VARIANTS: usize = 8;

/// The opening of a JSON message, before its header's hex digits.
pub(crate) const JSON_OPEN: &[u8] = br#"{"h":""#;
/// Between the header and the array.
pub(crate) const JSON_MIDDLE: &[u8] = br#"","d":"#;
/// The end of a JSON message, after the array.
pub(crate) const JSON_CLOSE: &[u8] = b"}";

/// The bytes a JSON message with a header of `header_hex` digits has besides its array.
pub(crate) const fn json_overhead(header_hex: usize) -> usize {
    JSON_OPEN.len() + header_hex + JSON_MIDDLE.len() + JSON_CLOSE.len()
}

/// The smallest JSON message with a header of `header_hex` digits: its array empty.
pub(crate) const fn json_min_size(header_hex: usize) -> usize {
    json_overhead(header_hex) + 2
}

/// The arrays of a run's JSON messages, each exactly `len` bytes.
#[derive(Debug, Clone)]
pub(crate) struct JsonArrays {
    arrays: Vec<Vec<u8>>,
}

impl JsonArrays {
    /// [`JSON_VARIANTS`] arrays of `len` bytes each (at least 2: `[]`).
    pub(crate) fn new(len: usize) -> Self {
        let arrays = (0..JSON_VARIANTS as u64)
            .map(|variant| json_array(len, variant))
            .collect();
        Self { arrays }
    }

    /// The array message `seq` carries.
    pub(crate) fn get(&self, seq: u64) -> &[u8] {
        &self.arrays[(seq % JSON_VARIANTS as u64) as usize]
    }

    /// A JSON message: the header's hex digits, then the array for `seq`.
    pub(crate) fn message(&self, header_hex: &[u8], seq: u64) -> Vec<u8> {
        let array = self.get(seq);
        let mut out = Vec::with_capacity(json_overhead(header_hex.len()) + array.len());
        out.extend_from_slice(JSON_OPEN);
        out.extend_from_slice(header_hex);
        out.extend_from_slice(JSON_MIDDLE);
        out.extend_from_slice(array);
        out.extend_from_slice(JSON_CLOSE);
        out
    }

    /// The header's hex digits of a JSON message of `header_hex` digits, if `message`
    /// has the frame around them (not whether the array is right: see [`Self::matches`]).
    pub(crate) fn header(message: &[u8], header_hex: usize) -> Option<&[u8]> {
        let middle = JSON_OPEN.len() + header_hex;
        let rest = message.strip_prefix(JSON_OPEN)?;
        let hex = rest.get(..header_hex)?;
        message
            .get(middle..middle + JSON_MIDDLE.len())
            .filter(|m| *m == JSON_MIDDLE)?;
        message.ends_with(JSON_CLOSE).then_some(hex)
    }

    /// Whether `message` carries the array of `seq` and ends as a JSON message should.
    pub(crate) fn matches(&self, message: &[u8], header_hex: usize, seq: u64) -> bool {
        let start = JSON_OPEN.len() + header_hex + JSON_MIDDLE.len();
        let end = message.len().saturating_sub(JSON_CLOSE.len());
        Self::header(message, header_hex).is_some()
            && message.get(start..end) == Some(self.get(seq))
    }
}

/// Lowercase hex digits of `value`, `N` of them (the low `4 × N` bits).
pub(crate) fn hex<const N: usize>(value: u64) -> [u8; N] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        let shift = 4 * (N - 1 - i);
        *byte = DIGITS[((value >> shift) & 0xf) as usize];
    }
    out
}

/// Reads hex digits back (at most 16, either case); `None` if one is not a digit.
pub(crate) fn unhex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        let v = (d as char).to_digit(16)?;
        Some(acc << 4 | u64::from(v))
    })
}

/// A JSON array of exactly `len` bytes (at least 2) of market-data objects; the same
/// for the same `variant`.
fn json_array(len: usize, variant: u64) -> Vec<u8> {
    let len = len.max(2);
    let mut out = Vec::with_capacity(len);
    out.push(b'[');
    let mut rng = XorShift::new(variant);
    let mut count = 0u64;
    // Room left before the closing `]`.
    let room = |out: &Vec<u8>| len - 1 - out.len();
    loop {
        let object = market_object(&mut rng, variant, count);
        let comma = usize::from(count > 0);
        if object.len() + comma > room(&out) {
            // The string that fills the rest: `,"…"` (or `"…"` as the first element),
            // from the object that did not fit, quotes left out.
            let left = room(&out);
            if left >= comma + 2 {
                if comma == 1 {
                    out.push(b',');
                }
                out.push(b'"');
                let fill = left - comma - 2;
                out.extend(
                    object
                        .iter()
                        .copied()
                        .filter(|&b| b != b'"')
                        .cycle()
                        .take(fill),
                );
                out.push(b'"');
            } else {
                out.extend(std::iter::repeat_n(b' ', left));
            }
            break;
        }
        if comma == 1 {
            out.push(b',');
        }
        out.extend_from_slice(&object);
        count += 1;
    }
    out.push(b']');
    out
}

/// One record of a market-data feed.
fn market_object(rng: &mut XorShift, variant: u64, index: u64) -> Vec<u8> {
    const SYMBOLS: [(&str, u64); 8] = [
        ("BTC-USD", 4_325_050),
        ("ETH-USD", 228_715),
        ("SOL-USD", 10_342),
        ("XRP-USD", 62),
        ("EUR-USD", 105),
        ("AAPL", 19_412),
        ("MSFT", 41_880),
        ("NVDA", 13_875),
    ];
    let r = rng.next();
    let (sym, cents) = SYMBOLS[(r % SYMBOLS.len() as u64) as usize];
    // The price within ±0.5 % of the symbol's, in cents.
    let spread = (cents / 200).max(1);
    let px = cents - spread + (r >> 8) % (2 * spread + 1);
    let qty_hundredths = 1 + (r >> 24) % 500;
    let side = if (r >> 40) & 1 == 0 { "buy" } else { "sell" };
    let id = 1000 + variant * 1000 + index;
    let ts = 1_733_500_000_000 + variant * 1000 + index * 7 + (r >> 48) % 5;
    format!(
        r#"{{"id":{id},"sym":"{sym}","px":{}.{:02},"qty":{}.{:02},"side":"{side}","ts":{ts}}}"#,
        px / 100,
        px % 100,
        qty_hundredths / 100,
        qty_hundredths % 100
    )
    .into_bytes()
}

/// A small deterministic generator (xorshift64*): the same records every run.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_are_valid_json_of_the_exact_length() {
        for len in (2..300).chain([1000, 4096, 65_536]) {
            for variant in [0, 1, 7] {
                let array = json_array(len, variant);
                assert_eq!(array.len(), len, "len {len}");
                assert!(array.is_ascii());
                let value: serde_json::Value = serde_json::from_slice(&array).unwrap_or_else(|e| {
                    panic!("len {len}: {e}: {}", String::from_utf8_lossy(&array))
                });
                assert!(value.is_array());
            }
        }
        // Big enough for records: they are there, with the fields a feed has.
        let value: serde_json::Value = serde_json::from_slice(&json_array(1000, 3)).unwrap();
        let first = &value[0];
        for key in ["id", "sym", "px", "qty", "side", "ts"] {
            assert!(first.get(key).is_some(), "{first}");
        }
        assert_eq!(json_array(500, 2), json_array(500, 2));
        assert_ne!(json_array(500, 2), json_array(500, 3));
    }

    #[test]
    fn messages_frame_their_header() {
        let arrays = JsonArrays::new(100);
        let m = arrays.message(&hex::<8>(0x2a), 5);
        assert_eq!(m.len(), json_overhead(8) + 100);
        assert_eq!(JsonArrays::header(&m, 8), Some(&b"0000002a"[..]));
        assert!(arrays.matches(&m, 8, 5));
        assert!(arrays.matches(&m, 8, 5 + JSON_VARIANTS as u64));
        assert!(!arrays.matches(&m, 8, 6));
        let value: serde_json::Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(value["h"], "0000002a");
        assert!(value["d"].is_array());
        assert_eq!(JsonArrays::header(&m[1..], 8), None);
        assert_eq!(JsonArrays::header(&m[..m.len() - 1], 8), None);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(&hex::<8>(0x1234_abcd), b"1234abcd");
        assert_eq!(&hex::<8>(1 << 33 | 7), b"00000007");
        assert_eq!(unhex(&hex::<16>(u64::MAX)), Some(u64::MAX));
        assert_eq!(unhex(b"00ff"), Some(255));
        assert_eq!(unhex(b"0g"), None);
        assert_eq!(unhex(b""), None);
    }

    #[test]
    fn json_compresses() {
        let array = json_array(4096, 1);
        let mut compressed = Vec::new();
        let params = crate::proto::DeflateParams::default();
        let codec = crate::proto::PerMessageDeflate::new(&params, crate::proto::Role::Client, 1, 0);
        assert!(codec.compress(&array, &mut compressed));
        // Repeated keys and similar values: a feed's ratio, not random bytes'.
        assert!(compressed.len() * 2 < array.len(), "{}", compressed.len());
    }
}
