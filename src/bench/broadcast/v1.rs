//! `bench broadcast --v1`: subscribers that speak `ringsocket.v1` (docs/protocol.md)
//! instead of sitting in the raw room.
//!
//! A subscriber connects to `/v1` on the URL's host (the URL's query kept, so a
//! `?token=` reaches `/v1` too), offering the subprotocol [`PROTOCOL`], which the
//! server must choose; it sends `{"id":1,"type":"subscribe","topic":<--topic>}` and
//! waits for the `subscribed` reply before the run begins (an `error` reply fails the
//! connection with its code and message). From then on every frame it gets must be a
//! publication, `{"type":"pub","topic":…,"offset":…,"epoch":…,"data":…}`, whose `data`
//! is the bench's message: a JSON message (`--payload json`) embedded as it was sent,
//! a binary one as its base64 with `"encoding":"base64"`, decoded here. What the data
//! holds is then checked exactly as a raw subscriber checks a message.
//!
//! [`Envelope::data`] is not a validating JSON parser: it walks the object's fields,
//! skipping the values it does not need by their brackets and strings (the server
//! checked the JSON; the bench checks the header and the exact length of what it finds
//! in `data`). With that walk alone over every 1 KiB `data`, 10,000 subscribers at 40
//! msg/s saturated the load generator's core (2.4 µs per delivery, against 1.9 µs for
//! raw subscribers), so the walk first asks whether `data` starts with, byte for byte,
//! a message this run sends (`known` below): that message is one complete JSON value
//! of known length, so the value ends there, exactly, and only the fields around it
//! are walked.

use std::borrow::Cow;

use base64::Engine;
use serde_json::Value;
use tokio::io::AsyncReadExt;

use super::conns::closed_by_server;
use crate::bench::BenchError;
use crate::bench::client::Client;
use crate::bench::target::Target;
use crate::proto::Event;

/// The subprotocol the subscribers offer (and the server must choose).
pub(super) const PROTOCOL: &str = crate::app::v1::PROTOCOL;

/// The path the subscribers connect to.
pub(super) const PATH: &str = "/v1";

/// The `id` of the subscribe request.
const SUBSCRIBE_ID: u64 = 1;

/// The URL the subscribers connect to: `target`'s scheme and host, the path `/v1`, and
/// `target`'s query, if any.
pub(super) fn subscriber_url(target: &Target) -> Result<Target, BenchError> {
    let scheme = if target.tls { "wss" } else { "ws" };
    let query = target.path.find('?').map_or("", |at| &target.path[at..]);
    Target::resolve(&format!("{scheme}://{}{PATH}{query}", target.host))
}

/// Subscribes an open `/v1` connection to `topic` and waits for the `subscribed`
/// reply. Frames after the reply stay queued in the connection. `Err(cause)`: the
/// server refused (its error code and message), closed, or broke the protocol.
pub(super) async fn subscribe(client: &mut Client, topic: &str) -> Result<(), String> {
    let request = serde_json::json!({"id": SUBSCRIBE_ID, "type": "subscribe", "topic": topic});
    client
        .conn
        .send_text(request.to_string())
        .map_err(|e| format!("cannot send the subscribe request: {e}"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        client
            .flush()
            .await
            .map_err(|e| format!("write failed while subscribing: {e}"))?;
        loop {
            match client.conn.poll_event() {
                Ok(Some(Event::Text(text))) => {
                    if let Some(outcome) = reply(text.as_bytes(), topic) {
                        return outcome;
                    }
                }
                Ok(Some(Event::Binary(_))) => {
                    return Err("a binary frame on ringsocket.v1 while subscribing".into());
                }
                Ok(Some(Event::Close(frame))) => return Err(closed_by_server(frame)),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(format!("protocol error from the server: {e}")),
            }
        }
        // A ping answered above is flushed at the top of the loop.
        if client.conn.pending_output() > 0 {
            continue;
        }
        let n = client
            .stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read failed while subscribing: {e}"))?;
        if n == 0 {
            return Err("closed by the server while subscribing, without a close frame".into());
        }
        client.conn.handle_bytes(&buf[..n]);
    }
}

/// What a frame received while subscribing says: `Some(Ok)` for our `subscribed`,
/// `Some(Err)` for an error (or a frame that is not JSON), `None` for anything else.
fn reply(frame: &[u8], topic: &str) -> Option<Result<(), String>> {
    let Ok(value) = serde_json::from_slice::<Value>(frame) else {
        return Some(Err(format!(
            "a frame that is not JSON while subscribing: {}",
            excerpt(frame)
        )));
    };
    let is_ours = value["id"].as_u64() == Some(SUBSCRIBE_ID);
    match value["type"].as_str() {
        Some("subscribed") if is_ours && value["topic"].as_str() == Some(topic) => Some(Ok(())),
        Some("subscribed") if is_ours => Some(Err(format!(
            "subscribed to {} instead of {topic:?}",
            value["topic"]
        ))),
        Some("error") => Some(Err(format!(
            "subscribe to {topic:?} refused: {}: {}",
            value["code"].as_str().unwrap_or("?"),
            value["message"].as_str().unwrap_or("")
        ))),
        _ => None,
    }
}

/// The start of a frame, for a message.
fn excerpt(frame: &[u8]) -> String {
    const MAX: usize = 120;
    let text = String::from_utf8_lossy(&frame[..frame.len().min(MAX)]).into_owned();
    if frame.len() > MAX {
        format!("{text}…")
    } else {
        text
    }
}

/// Takes the bench's message out of a publication of one topic.
#[derive(Debug, Clone)]
pub(super) struct Envelope {
    topic: String,
}

impl Envelope {
    pub(super) fn new(topic: &str) -> Self {
        Self {
            topic: topic.to_owned(),
        }
    }

    /// The `data` of `frame`, a publication of the topic: as it is (JSON), or decoded
    /// from base64 (`"encoding":"base64"`). `Err`: why it is not one, to count as
    /// malformed. `known(bytes)`: the length of the JSON value at the start of `bytes`
    /// when the caller knows it exactly (a message it sent), else `None`, and the value
    /// is walked.
    pub(super) fn data<'a>(
        &self,
        frame: &'a [u8],
        known: impl Fn(&[u8]) -> Option<usize>,
    ) -> Result<Cow<'a, [u8]>, String> {
        let fields = Fields::parse(frame, known).ok_or_else(|| {
            format!(
                "a {} B ringsocket.v1 frame that is not one JSON object: {}",
                frame.len(),
                excerpt(frame)
            )
        })?;
        if fields.kind != Some(b"pub") {
            return Err(format!(
                "a ringsocket.v1 frame that is not a publication: {}",
                excerpt(frame)
            ));
        }
        if fields.topic != Some(self.topic.as_bytes()) {
            return Err(format!(
                "a publication of another topic than {:?}: {}",
                self.topic,
                excerpt(frame)
            ));
        }
        let (Some(data), true, true) = (fields.data, fields.offset, fields.epoch) else {
            return Err(format!(
                "a publication without data, offset or epoch: {}",
                excerpt(frame)
            ));
        };
        match fields.encoding {
            None => Ok(Cow::Borrowed(data)),
            Some(b"base64") => {
                let encoded = data
                    .strip_prefix(b"\"")
                    .and_then(|d| d.strip_suffix(b"\""))
                    .ok_or_else(|| {
                        format!("base64 data that is not a JSON string: {}", excerpt(frame))
                    })?;
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map(Cow::Owned)
                    .map_err(|e| format!("data that is not base64 ({e}): {}", excerpt(frame)))
            }
            Some(other) => Err(format!(
                "a publication with the unknown encoding {:?}",
                String::from_utf8_lossy(other)
            )),
        }
    }
}

/// The fields of a publication that the bench reads. Strings are their raw contents,
/// between the quotes (the bench's topics and encodings need no escapes); `data` is
/// the value's JSON text.
#[derive(Debug, Default, PartialEq, Eq)]
struct Fields<'a> {
    kind: Option<&'a [u8]>,
    topic: Option<&'a [u8]>,
    encoding: Option<&'a [u8]>,
    data: Option<&'a [u8]>,
    /// Whether `offset` is a whole number.
    offset: bool,
    /// Whether `epoch` is a string.
    epoch: bool,
}

impl<'a> Fields<'a> {
    /// `None` when `frame` is not one JSON object (as far as the walk sees). `known`:
    /// as for [`Envelope::data`].
    fn parse(frame: &'a [u8], known: impl Fn(&[u8]) -> Option<usize>) -> Option<Self> {
        let mut scan = Scan { b: frame, i: 0 };
        let mut fields = Fields::default();
        scan.expect(b'{')?;
        if !scan.peek_is(b'}') {
            loop {
                let key = scan.string()?;
                scan.expect(b':')?;
                let value = if key == b"data" {
                    scan.known_value(&known)?
                } else {
                    scan.value()?
                };
                let string = || {
                    value
                        .strip_prefix(b"\"")
                        .and_then(|v| v.strip_suffix(b"\""))
                };
                match key {
                    b"type" => fields.kind = Some(string()?),
                    b"topic" => fields.topic = Some(string()?),
                    b"encoding" => fields.encoding = Some(string()?),
                    b"epoch" => fields.epoch = string().is_some(),
                    b"offset" => {
                        fields.offset = !value.is_empty() && value.iter().all(u8::is_ascii_digit)
                    }
                    b"data" => fields.data = Some(value),
                    _ => {}
                }
                if scan.peek_is(b',') {
                    scan.i += 1;
                    continue;
                }
                break;
            }
        }
        scan.expect(b'}')?;
        scan.ws();
        (scan.i == frame.len()).then_some(fields)
    }
}

/// Bytes that matter inside an array or object being skipped.
static STRUCTURAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'{' as usize] = true;
    table[b'}' as usize] = true;
    table[b'[' as usize] = true;
    table[b']' as usize] = true;
    table
};

/// A walk over JSON text.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// Whether the next byte after blanks is `c` (not taken).
    fn peek_is(&mut self, c: u8) -> bool {
        self.ws();
        self.b.get(self.i) == Some(&c)
    }

    /// Takes `c` after blanks.
    fn expect(&mut self, c: u8) -> Option<()> {
        self.peek_is(c).then(|| self.i += 1)
    }

    /// Takes a string after blanks; returns its raw contents.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.i;
        loop {
            let at = self
                .b
                .get(self.i..)?
                .iter()
                .position(|&c| c == b'"' || c == b'\\')?;
            self.i += at;
            if self.b[self.i] == b'"' {
                self.i += 1;
                return Some(&self.b[start..self.i - 1]);
            }
            // A backslash and the byte it escapes.
            self.i += 2;
        }
    }

    /// Takes any value after blanks; returns its text.
    fn value(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let start = self.i;
        match self.b.get(self.i)? {
            b'"' => {
                self.string()?;
            }
            b'{' | b'[' => self.nested()?,
            _ => {
                let len = self.b[self.i..]
                    .iter()
                    .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                    .unwrap_or(self.b.len() - self.i);
                if len == 0 {
                    return None;
                }
                self.i += len;
            }
        }
        Some(&self.b[start..self.i])
    }

    /// Takes a value after blanks: `known` bytes if it says how long it is, else
    /// walked as [`Self::value`] does.
    fn known_value(&mut self, known: impl Fn(&[u8]) -> Option<usize>) -> Option<&'a [u8]> {
        self.ws();
        match known(self.b.get(self.i..)?) {
            Some(len) => {
                let value = self.b.get(self.i..self.i + len)?;
                self.i += len;
                Some(value)
            }
            None => self.value(),
        }
    }

    /// Skips an array or object, from its opening bracket to the one that closes it.
    fn nested(&mut self) -> Option<()> {
        let mut depth = 0usize;
        loop {
            let at = self
                .b
                .get(self.i..)?
                .iter()
                .position(|&c| STRUCTURAL[usize::from(c)])?;
            self.i += at;
            match self.b[self.i] {
                b'"' => {
                    self.string()?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                _ => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        self.i += 1;
                        return Some(());
                    }
                }
            }
            self.i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::broadcast::message::{Format, Header};
    use crate::bench::payload::Payload;

    /// A publication as the server frames it (src/pubsub/history.rs: `encoding` before
    /// `data`, `data` last).
    fn publication(topic: &str, data: &[u8], base64: bool) -> Vec<u8> {
        let mut out =
            format!(r#"{{"type":"pub","topic":"{topic}","offset":58,"epoch":"6f1c0a3e9b2d4c57""#)
                .into_bytes();
        if base64 {
            out.extend_from_slice(br#","encoding":"base64""#);
        }
        out.extend_from_slice(br#","data":"#);
        out.extend_from_slice(data);
        out.push(b'}');
        out
    }

    /// No value known: every one is walked.
    fn walk(_: &[u8]) -> Option<usize> {
        None
    }

    fn header() -> Header {
        Header {
            publisher: 2,
            step: 3,
            seq: 41,
            sent_ns: 987_654_321,
        }
    }

    #[test]
    fn json_data_is_the_bench_message_as_it_was_sent() {
        let format = Format::new(300, Payload::Json);
        let message = format.message(&header());
        assert_eq!(message.len(), 300);
        let frame = publication("broadcast", &message, false);
        let data = Envelope::new("broadcast").data(&frame, walk).unwrap();
        assert!(matches!(data, Cow::Borrowed(_)));
        assert_eq!(&data[..], &message[..]);
        assert_eq!(format.decode(&data), Ok(header()));
    }

    /// A JSON message the run sends is recognised where it starts, and the walk goes on
    /// after it; one that differs from what was sent (here, its last array byte) is
    /// walked, with the same result.
    #[test]
    fn a_known_message_is_taken_without_walking_it() {
        let format = Format::new(1024, Payload::Json);
        let message = format.message(&header());
        let known = |bytes: &[u8]| format.json_len_at(bytes);
        assert_eq!(known(&message), Some(1024));
        let mut frame = publication("broadcast", &message, false);
        let data = Envelope::new("broadcast").data(&frame, known).unwrap();
        assert_eq!(&data[..], &message[..]);
        // Fields after it are read too.
        frame.pop();
        frame.extend_from_slice(br#" , "later" : [1] }"#);
        let data = Envelope::new("broadcast").data(&frame, known).unwrap();
        assert_eq!(&data[..], &message[..]);
        // A message not sent by this run is walked instead.
        let mut other = message.clone();
        let digit = other
            .windows(5)
            .position(|w| w == b"\"id\":")
            .map(|at| at + 5)
            .unwrap();
        other[digit] = if other[digit] == b'9' { b'8' } else { b'9' };
        assert_eq!(known(&other), None);
        let frame = publication("broadcast", &other, false);
        let data = Envelope::new("broadcast").data(&frame, known).unwrap();
        assert_eq!(&data[..], &other[..]);
        // Nor is a message of another length, or in another format.
        assert_eq!(known(&message[..1000]), None);
        assert_eq!(
            Format::new(1024, Payload::Pattern).json_len_at(&message),
            None
        );
    }

    #[test]
    fn binary_data_is_decoded_from_base64() {
        let format = Format::new(64, Payload::Pattern);
        let message = format.message(&header());
        let encoded = base64::engine::general_purpose::STANDARD.encode(&message);
        let frame = publication("broadcast", format!("\"{encoded}\"").as_bytes(), true);
        let data = Envelope::new("broadcast").data(&frame, walk).unwrap();
        assert_eq!(&data[..], &message[..]);
        assert_eq!(format.decode(&data), Ok(header()));
        // Not base64, or not a string.
        let bad = publication("broadcast", b"\"@@@\"", true);
        let err = Envelope::new("broadcast").data(&bad, walk).unwrap_err();
        assert!(err.contains("not base64"), "{err}");
        let bad = publication("broadcast", b"[1]", true);
        let err = Envelope::new("broadcast").data(&bad, walk).unwrap_err();
        assert!(err.contains("not a JSON string"), "{err}");
    }

    /// Brackets and quotes inside strings, escapes, blanks and another field order.
    #[test]
    fn data_ends_where_its_value_does() {
        let tricky = br#"{"s":"a } ] \" [ {","n":[1,{"x":"\\"}],"e":{}}"#;
        let frame = publication("t", tricky, false);
        assert_eq!(
            &Envelope::new("t").data(&frame, walk).unwrap()[..],
            &tricky[..]
        );

        let frame = br#" { "data" : [1, 2] , "offset" : 7, "epoch":"e", "extra": {"a":[]},
            "topic" : "t", "type" : "pub" } "#;
        assert_eq!(
            &Envelope::new("t").data(frame, walk).unwrap()[..],
            b"[1, 2]"
        );

        for scalar in [&b"12.5e3"[..], b"true", b"null", b"\"text\""] {
            let frame = publication("t", scalar, false);
            assert_eq!(&Envelope::new("t").data(&frame, walk).unwrap()[..], scalar);
        }
    }

    #[test]
    fn other_frames_are_refused_with_a_reason() {
        let envelope = Envelope::new("broadcast");
        let cases: [(&[u8], &str); 9] = [
            (br#"{"type":"pub","topic":"other","offset":1,"epoch":"e","data":1}"#, "another topic"),
            (br#"{"id":3,"type":"error","code":"unavailable","message":"x"}"#, "not a publication"),
            (br#"{"type":"pub","topic":"broadcast","offset":1,"epoch":"e"}"#, "without data"),
            (br#"{"type":"pub","topic":"broadcast","epoch":"e","data":1}"#, "without data"),
            (br#"{"type":"pub","topic":"broadcast","offset":"1","epoch":"e","data":1}"#, "without data"),
            (br#"{"type":"pub","topic":"broadcast","offset":1,"epoch":"e","encoding":"hex","data":"00"}"#, "unknown encoding"),
            (br#"{"type":"pub","topic":"broadcast","offset":1,"epoch":"e","data":[1}"#, "not one JSON object"),
            (br#"{"type":"pub","topic":"broadcast","offset":1,"epoch":"e","data":1} x"#, "not one JSON object"),
            (b"\x00\x01binary", "not one JSON object"),
        ];
        for (frame, why) in cases {
            let err = envelope.data(frame, walk).unwrap_err();
            assert!(
                err.contains(why),
                "{err} for {}",
                String::from_utf8_lossy(frame)
            );
        }
        for truncated in [
            &br#"{"type":"pub","data":"#[..],
            b"{",
            b"",
            br#"{"type":"pu"#,
            br#"{"type":"pub\"#,
            br#"{"data":["\"#,
        ] {
            assert!(Fields::parse(truncated, walk).is_none());
        }
    }

    #[test]
    fn the_subscribe_reply_is_recognised() {
        let ok = br#"{"id":1,"type":"subscribed","topic":"broadcast","offset":0,"epoch":"e","recovered":false,"missed":0,"conflated":false}"#;
        assert_eq!(reply(ok, "broadcast"), Some(Ok(())));
        let refused = br#"{"id":1,"type":"error","code":"not_allowed","message":"not allowed to subscribe to broadcast"}"#;
        let err = reply(refused, "broadcast").unwrap().unwrap_err();
        assert!(err.contains("refused: not_allowed: not allowed"), "{err}");
        assert_eq!(reply(br#"{"id":2,"type":"pong"}"#, "broadcast"), None);
        assert!(reply(b"not json", "broadcast").unwrap().is_err());
        assert!(reply(ok, "other").unwrap().is_err());
    }

    #[test]
    fn subscribers_go_to_v1_on_the_same_host_with_the_query() {
        let t = Target::resolve("ws://127.0.0.1:9001/broadcast?token=abc").unwrap();
        let v1 = subscriber_url(&t).unwrap();
        assert_eq!(v1.url, "ws://127.0.0.1:9001/v1?token=abc");
        assert_eq!(
            (v1.host.as_str(), v1.path.as_str()),
            ("127.0.0.1:9001", "/v1?token=abc")
        );
        let t = Target::resolve("ws://127.0.0.1:9001/ws/lobby").unwrap();
        assert_eq!(subscriber_url(&t).unwrap().url, "ws://127.0.0.1:9001/v1");
    }
}
