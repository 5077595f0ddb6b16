//! Benchmarks of permessage-deflate (RFC 7692) and of the deflate implementation under
//! it: flate2 on zlib-rs, what ringsocket ships, against miniz_oxide (flate2's default
//! backend) called directly, on realistic JSON.
//!
//! Groups (payload bytes/s, the uncompressed message's size):
//! - `deflate_compress/{1KiB,16KiB}`: one message compressed as permessage-deflate does
//!   it: raw deflate, a fresh context, a sync flush, the final `00 00 ff ff` removed
//!   (§7.2.1). `zlib-rs_l{1,6}` is flate2's `Compress` (zlib-rs backend) and
//!   `miniz_oxide_l{1,6}` miniz_oxide's `deflate::stream::deflate`, each reset per
//!   message into a reused output buffer; `ringsocket_l{1,6}` is
//!   `PerMessageDeflate::compress` (the per-thread compressor, into a reused `Vec`) and
//!   `ringsocket_frame_l{1,6}` `proto::deflate::encode_deflated_frame` (compressed and
//!   framed into a new `Bytes`, once per broadcast).
//! - `deflate_inflate/{1KiB,16KiB}`: the level-6 message (zlib-rs's bytes, the same for
//!   all) inflated with the `00 00 ff ff` appended (§7.2.2). `zlib-rs` is flate2's
//!   `Decompress` and `miniz_oxide` miniz_oxide's `inflate::stream::inflate` (what
//!   flate2 runs on that backend), each reset per message into a reused buffer;
//!   `miniz_oxide_core` is miniz_oxide's one-shot `inflate::core::decompress` into a
//!   non-wrapping buffer, its fastest path for a whole message. `ringsocket` is
//!   `PerMessageDeflate::inflate` without client context takeover and
//!   `ringsocket_takeover` with it (the kept 32 KiB window set as the preset dictionary
//!   each time): both allocate the message they return, as the connection does.
//!
//! Setup, untimed: every output is checked to inflate back to the message with the
//! other library, and the compressed sizes are printed once (`eprintln!`). The inputs
//! are built in code: a chat room's history page (1 KiB) and an order-book snapshot
//! with trades (16 KiB), numbers and words drawn from a fixed-seed generator.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use miniz_oxide::deflate::core::{CompressorOxide, create_comp_flags_from_zip_params};
use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::DecompressorOxide;
use miniz_oxide::inflate::core::inflate_flags::{
    TINFL_FLAG_HAS_MORE_INPUT, TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
};
use miniz_oxide::inflate::stream::InflateState;
use miniz_oxide::{DataFormat, MZFlush, MZStatus};
use ringsocket::proto::deflate::encode_deflated_frame;
use ringsocket::proto::{DeflateParams, OpCode, PerMessageDeflate, Role};

criterion_group!(benches, bench_compress, bench_inflate);
criterion_main!(benches);

/// The sync flush's end, removed from each message and appended to inflate it.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// The levels compared: zlib's fastest and its default.
const LEVELS: [u32; 2] = [1, 6];

/// The two messages: (label, JSON).
fn messages() -> [(&'static str, String); 2] {
    let messages = [
        ("1KiB", chat_history(1024)),
        ("16KiB", order_book(16 * 1024)),
    ];
    for (label, json) in &messages {
        serde_json::from_str::<serde_json::Value>(json).expect(label);
    }
    messages
}

// ---- compress -----------------------------------------------------------------------

fn bench_compress(c: &mut Criterion) {
    for (label, json) in messages() {
        let input = json.as_bytes();
        report_sizes(label, input);
        let mut group = c.benchmark_group(format!("deflate_compress/{label}"));
        group.throughput(Throughput::Bytes(input.len() as u64));
        let mut out = Vec::with_capacity(input.len() * 2 + 64);
        for level in LEVELS {
            let mut zlib = Compress::new_with_window_bits(Compression::new(level), false, 15);
            group.bench_function(format!("zlib-rs_l{level}"), |b| {
                b.iter(|| zlib_rs_compress(&mut zlib, black_box(input), &mut out));
            });
            let mut miniz = miniz_compressor(level);
            let mut buf = vec![0; input.len() * 2 + 64];
            group.bench_function(format!("miniz_oxide_l{level}"), |b| {
                b.iter(|| black_box(miniz_compress(&mut miniz, black_box(input), &mut buf)));
            });
        }
        for level in LEVELS {
            let codec = PerMessageDeflate::new(&DeflateParams::default(), Role::Server, level, 0);
            group.bench_function(format!("ringsocket_l{level}"), |b| {
                b.iter(|| assert!(codec.compress(black_box(input), &mut out)));
            });
            group.bench_function(format!("ringsocket_frame_l{level}"), |b| {
                b.iter(|| encode_deflated_frame(OpCode::Text, black_box(input), level, 0));
            });
        }
        group.finish();
    }
}

/// flate2 (zlib-rs): one message, fresh context, sync flush, tail removed, into `out`.
fn zlib_rs_compress(compress: &mut Compress, input: &[u8], out: &mut Vec<u8>) {
    compress.reset();
    out.clear();
    // `out` has room for the whole message: one call (checked).
    let status = compress
        .compress_vec(input, out, FlushCompress::Sync)
        .expect("zlib-rs compresses");
    assert!(status == Status::Ok && compress.total_in() as usize == input.len());
    assert!(out.len() < out.capacity() && out.ends_with(&TAIL));
    out.truncate(out.len() - TAIL.len());
}

fn miniz_compressor(level: u32) -> Box<CompressorOxide> {
    // Negative window bits: raw deflate (miniz_oxide's window is always 32 KiB).
    let flags = create_comp_flags_from_zip_params(level as i32, -15, 0);
    Box::new(CompressorOxide::new(flags))
}

/// miniz_oxide: the same as [`zlib_rs_compress`]; returns the compressed length in `buf`.
fn miniz_compress(compressor: &mut CompressorOxide, input: &[u8], buf: &mut [u8]) -> usize {
    compressor.reset();
    let result = miniz_oxide::deflate::stream::deflate(compressor, input, buf, MZFlush::Sync);
    assert_eq!(result.status, Ok(MZStatus::Ok));
    assert_eq!(result.bytes_consumed, input.len());
    let len = result.bytes_written;
    assert!(len < buf.len() && buf[..len].ends_with(&TAIL));
    len - TAIL.len()
}

/// Prints each library's compressed size at each level, once, after checking that it
/// inflates back with the other library.
fn report_sizes(label: &str, input: &[u8]) {
    let mut line = format!("{label}: {} bytes;", input.len());
    for level in LEVELS {
        let mut out = Vec::with_capacity(input.len() * 2 + 64);
        zlib_rs_compress(
            &mut Compress::new_with_window_bits(Compression::new(level), false, 15),
            input,
            &mut out,
        );
        let mut buf = vec![0; input.len() * 2 + 64];
        let len = miniz_compress(&mut miniz_compressor(level), input, &mut buf);
        let miniz = &buf[..len];
        let mut back = vec![0; input.len() + 1];
        let n = miniz_core_inflate(&mut DecompressorOxide::new(), &with_tail(&out), &mut back);
        assert_eq!(&back[..n], input, "zlib-rs l{level} -> miniz_oxide");
        let mut back = Vec::with_capacity(input.len() + 1);
        zlib_rs_inflate(&mut raw_decompress(), &with_tail(miniz), &mut back);
        assert_eq!(back, input, "miniz_oxide l{level} -> zlib-rs");
        line += &format!(
            " l{level}: zlib-rs {} ({:.1} %), miniz_oxide {} ({:.1} %);",
            out.len(),
            percent(out.len(), input.len()),
            miniz.len(),
            percent(miniz.len(), input.len())
        );
    }
    eprintln!("{line}");
}

fn percent(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole as f64
}

// ---- inflate ------------------------------------------------------------------------

fn bench_inflate(c: &mut Criterion) {
    for (label, json) in messages() {
        let input = json.as_bytes();
        let mut compressed = Vec::with_capacity(input.len() * 2 + 64);
        zlib_rs_compress(
            &mut Compress::new_with_window_bits(Compression::new(6), false, 15),
            input,
            &mut compressed,
        );
        let joined = with_tail(&compressed);
        let mut group = c.benchmark_group(format!("deflate_inflate/{label}"));
        group.throughput(Throughput::Bytes(input.len() as u64));

        let mut zlib = raw_decompress();
        let mut out = Vec::with_capacity(input.len() + 1);
        zlib_rs_inflate(&mut zlib, &joined, &mut out);
        assert_eq!(out, input);
        group.bench_function("zlib-rs", |b| {
            b.iter(|| zlib_rs_inflate(&mut zlib, black_box(&joined), &mut out));
        });

        let mut state = InflateState::new_boxed(DataFormat::Raw);
        let mut buf = vec![0; input.len() + 1];
        let n = miniz_stream_inflate(&mut state, &joined, &mut buf);
        assert_eq!(&buf[..n], input);
        group.bench_function("miniz_oxide", |b| {
            b.iter(|| {
                black_box(miniz_stream_inflate(
                    &mut state,
                    black_box(&joined),
                    &mut buf,
                ))
            });
        });

        let mut core = Box::new(DecompressorOxide::new());
        let n = miniz_core_inflate(&mut core, &joined, &mut buf);
        assert_eq!(&buf[..n], input);
        group.bench_function("miniz_oxide_core", |b| {
            b.iter(|| black_box(miniz_core_inflate(&mut core, black_box(&joined), &mut buf)));
        });

        for (name, takeover) in [("ringsocket", false), ("ringsocket_takeover", true)] {
            let params = DeflateParams {
                client_no_context_takeover: !takeover,
                ..DeflateParams::default()
            };
            let mut codec = PerMessageDeflate::new(&params, Role::Server, 6, 0);
            // Twice: with takeover, the second runs with the first's window.
            for _ in 0..2 {
                assert_eq!(codec.inflate(&compressed, 1 << 20).as_deref(), Ok(input));
            }
            assert_eq!(codec.window_bytes() > 0, takeover);
            group.bench_function(name, |b| {
                b.iter(|| codec.inflate(black_box(&compressed), 1 << 20));
            });
        }
        group.finish();
    }
}

fn raw_decompress() -> Decompress {
    Decompress::new_with_window_bits(false, 15)
}

/// flate2 (zlib-rs): `joined` (message + tail) inflated into `out`, which has room.
fn zlib_rs_inflate(decompress: &mut Decompress, joined: &[u8], out: &mut Vec<u8>) {
    decompress.reset(false);
    out.clear();
    let status = decompress
        .decompress_vec(joined, out, FlushDecompress::Sync)
        .expect("valid deflate");
    assert!(status == Status::Ok && decompress.total_in() as usize == joined.len());
    assert!(out.len() < out.capacity());
}

/// miniz_oxide's stream API (flate2's miniz_oxide backend): returns the length.
fn miniz_stream_inflate(state: &mut InflateState, joined: &[u8], out: &mut [u8]) -> usize {
    state.reset(DataFormat::Raw);
    let result = miniz_oxide::inflate::stream::inflate(state, joined, out, MZFlush::Sync);
    assert_eq!(result.status, Ok(MZStatus::Ok));
    assert_eq!(result.bytes_consumed, joined.len());
    assert!(result.bytes_written < out.len());
    result.bytes_written
}

/// miniz_oxide's one-shot core API, into a non-wrapping buffer: returns the length.
fn miniz_core_inflate(core: &mut DecompressorOxide, joined: &[u8], out: &mut [u8]) -> usize {
    core.init();
    let flags = TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF | TINFL_FLAG_HAS_MORE_INPUT;
    let (status, read, written) =
        miniz_oxide::inflate::core::decompress(core, joined, out, 0, flags);
    // No BFINAL: the stream ends waiting for more, every byte read.
    assert_eq!(status, TINFLStatus::NeedsMoreInput);
    assert_eq!(read, joined.len());
    assert!(written < out.len());
    written
}

fn with_tail(compressed: &[u8]) -> Vec<u8> {
    [compressed, &TAIL[..]].concat()
}

// ---- the messages -------------------------------------------------------------------

/// A chat room's page of history, at most `max` bytes: what a client gets on joining.
fn chat_history(max: usize) -> String {
    const WORDS: [&str; 24] = [
        "ok", "the", "deploy", "is", "done", "can", "you", "check", "staging", "again", "looks",
        "good", "to", "me", "lunch", "at", "noon", "?", "PR", "merged", "thanks", "latency",
        "dropped", "nice",
    ];
    const USERS: [&str; 5] = ["alice", "bob", "carol", "dmitri", "eun-ji"];
    let mut rng = Rng(0x243f_6a88_85a3_08d3);
    let head = r#"{"type":"history","room":"team-backend","messages":["#;
    let mut out = String::from(head);
    for i in 0.. {
        let user = rng.below(USERS.len());
        let words = 3 + rng.below(9);
        let text: Vec<&str> = (0..words).map(|_| WORDS[rng.below(WORDS.len())]).collect();
        let message = format!(
            r#"{{"id":"m{:06}","user":{{"id":{},"name":"{}"}},"text":"{}","ts":{}}}"#,
            80_000 + i * 7 + rng.below(7),
            1000 + user,
            USERS[user],
            text.join(" "),
            1_733_580_000_000_u64 + (i as u64) * 31_000 + rng.below(30_000) as u64,
        );
        let sep = if i == 0 { "" } else { "," };
        if out.len() + sep.len() + message.len() + 2 > max {
            break;
        }
        out += sep;
        out += &message;
    }
    out + "]}"
}

/// An exchange's order-book snapshot with its last trades, at most `max` bytes.
fn order_book(max: usize) -> String {
    let mut rng = Rng(0x1319_8a2e_0370_7344);
    let mut out = String::from(r#"{"type":"snapshot","symbol":"BTC-USD","seq":918273645,"#);
    let mid = 97_431.50_f64;
    let level = |rng: &mut Rng, side: f64, i: usize| {
        let price = mid + side * (0.5 + i as f64 * 0.5 + rng.below(4) as f64 * 0.01);
        let size = (1 + rng.below(250_000)) as f64 / 100_000.0;
        format!(r#"["{price:.2}","{size:.5}"]"#)
    };
    let trade = |rng: &mut Rng, i: usize| {
        format!(
            r#"{{"id":{},"px":"{:.2}","qty":"{:.5}","side":"{}","ts":{}}}"#,
            4_410_000 + i,
            mid + (rng.below(2000) as f64 - 1000.0) / 100.0,
            (1 + rng.below(80_000)) as f64 / 100_000.0,
            if rng.below(2) == 0 { "buy" } else { "sell" },
            1_733_580_000_000_u64 + (i as u64) * 137,
        )
    };
    // Bids, asks and trades in equal parts of the room, then closed.
    let share = (max - out.len() - 64) / 3;
    for (key, side) in [("bids", -1.0), ("asks", 1.0)] {
        out += &format!(r#""{key}":["#);
        let start = out.len();
        for i in 0.. {
            let item = level(&mut rng, side, i);
            if out.len() - start + item.len() + 1 > share {
                break;
            }
            if i > 0 {
                out.push(',');
            }
            out += &item;
        }
        out += "],";
    }
    out += r#""trades":["#;
    for i in 0.. {
        let item = trade(&mut rng, i);
        if out.len() + item.len() + 3 > max {
            break;
        }
        if i > 0 {
            out.push(',');
        }
        out += &item;
    }
    out + "]}"
}

/// xorshift64: the messages are the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 33) as usize % n
    }
}
