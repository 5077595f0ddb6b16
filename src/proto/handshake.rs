//! The opening handshake (RFC 6455 §4), both roles, parsed by hand with `httparse`.
//!
//! Server side: [`HeadReader`] collects a request head from bytes that may arrive one at
//! a time and hands back what follows it; [`parse_request`] parses a head into a
//! [`Request`] (method, path, query, headers); [`Request::validate_upgrade`] applies the
//! rules of RFC 6455 §4.2.1 and yields the [`AcceptKey`]; [`write_accept`] and
//! [`HandshakeError::write_response`] write the answer.
//!
//! Client side: [`ClientRequest::encode`] writes the request with the caller's random
//! key; [`ClientHandshake::parse_response`] checks the server's answer (§4.2.2, §4.1).

use std::fmt;
use std::mem::MaybeUninit;
use std::ops::Range;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

use super::limits::HandshakeLimits;

/// The GUID appended to the key before hashing (RFC 6455 §1.3).
pub const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only protocol version this implementation speaks (RFC 6455 §4.1).
pub const WEBSOCKET_VERSION: &str = "13";

/// A reason the server refuses an opening handshake, each with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The head is not valid HTTP/1.x (`httparse` said why). 400.
    Malformed(&'static str),
    /// The head is larger than `HandshakeLimits::max_head_bytes`. 431.
    HeadTooLarge { limit: usize },
    /// More header fields than `HandshakeLimits::max_headers`. 431.
    TooManyHeaders { limit: usize },
    /// A method other than GET (RFC 6455 §4.1). 405 with `Allow: GET`.
    MethodNotGet,
    /// HTTP/1.0; the handshake needs HTTP/1.1 or later (RFC 6455 §4.1). 400.
    HttpVersion,
    /// No `Host` header, or more than one (RFC 6455 §4.1, RFC 9112 §3.2). 400.
    Host,
    /// `Upgrade` lacks the token `websocket`. 400.
    UpgradeToken,
    /// `Connection` lacks the token `upgrade`. 400.
    ConnectionToken,
    /// `Sec-WebSocket-Key` is missing, repeated or not base64 of 16 bytes. 400.
    Key,
    /// `Sec-WebSocket-Version` is missing. 400.
    MissingVersion,
    /// `Sec-WebSocket-Version` is not 13. 426 with `Sec-WebSocket-Version: 13` (§4.4).
    UnsupportedVersion,
}

impl HandshakeError {
    /// The HTTP status of the refusal.
    pub fn status(self) -> u16 {
        match self {
            Self::HeadTooLarge { .. } | Self::TooManyHeaders { .. } => 431,
            Self::MethodNotGet => 405,
            Self::UnsupportedVersion => 426,
            _ => 400,
        }
    }

    /// A one-line reason, sent as the response body.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed(what) => what,
            Self::HeadTooLarge { .. } => "request header block too large",
            Self::TooManyHeaders { .. } => "too many request header fields",
            Self::MethodNotGet => "the WebSocket handshake requires GET",
            Self::HttpVersion => "the WebSocket handshake requires HTTP/1.1 or later",
            Self::Host => "exactly one Host header is required",
            Self::UpgradeToken => "missing Upgrade: websocket",
            Self::ConnectionToken => "missing Connection: upgrade",
            Self::Key => "Sec-WebSocket-Key must be one base64-encoded 16-byte value",
            Self::MissingVersion => "missing Sec-WebSocket-Version",
            Self::UnsupportedVersion => "unsupported Sec-WebSocket-Version; supported: 13",
        }
    }

    /// Writes the complete HTTP response for this refusal, with `Connection: close`.
    pub fn write_response(self, out: &mut BytesMut) {
        let mut body = [0u8; 128];
        let reason = self.reason().as_bytes();
        let n = reason.len().min(body.len() - 1);
        body[..n].copy_from_slice(&reason[..n]);
        body[n] = b'\n';
        let extra: &[(&str, &str)] = match self {
            Self::UnsupportedVersion => &[("Sec-WebSocket-Version", WEBSOCKET_VERSION)],
            Self::MethodNotGet => &[("Allow", "GET")],
            _ => &[],
        };
        write_response(
            out,
            self.status(),
            extra,
            "text/plain; charset=utf-8",
            &body[..=n],
            true,
        );
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status(),
            status_text(self.status()),
            self.reason()
        )
    }
}

impl std::error::Error for HandshakeError {}

/// A parsed HTTP/1.x request head. The head's bytes are kept once; its parts are
/// 16-bit offsets into them (heads are at most 64 KiB), so a request held for a
/// connection's life costs its bytes plus 8 bytes per header.
#[derive(Clone)]
pub struct Request {
    /// Boxed, not `Bytes`: a session keeps its request for its whole life, and this is
    /// half the size.
    head: Box<[u8]>,
    method: Span,
    path: Span,
    query: Option<Span>,
    minor_version: u8,
    headers: Box<[(Span, Span)]>,
}

/// A part of the head: `head[start..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u16,
    end: u16,
}

impl Span {
    fn range(self) -> Range<usize> {
        usize::from(self.start)..usize::from(self.end)
    }
}

impl Request {
    /// The method, e.g. `GET`.
    pub fn method(&self) -> &str {
        self.str_at(self.method)
    }

    /// The path of the request target, without the query.
    pub fn path(&self) -> &str {
        self.str_at(self.path)
    }

    /// The query string after `?`, if there is one.
    pub fn query(&self) -> Option<&str> {
        self.query.map(|r| self.str_at(r))
    }

    /// The minor HTTP version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub fn minor_version(&self) -> u8 {
        self.minor_version
    }

    /// Every header field in order, as (name, raw value).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers
            .iter()
            .map(|(name, value)| (self.str_at(*name), &self.head[value.range()]))
    }

    /// The first value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.values(name.as_bytes()).next()
    }

    /// The first value of the header `name` as text, if it is valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of the header `name` (case-insensitive), in order.
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.values(name.as_bytes())
    }

    /// Whether the header `name` holds `token` in any of its comma-separated lists
    /// (case-insensitive), e.g. `Connection: keep-alive, Upgrade`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name.as_bytes())
            .any(|v| list_items(v).any(|item| item.eq_ignore_ascii_case(token.as_bytes())))
    }

    /// Whether this request asks for a WebSocket upgrade (`Upgrade: websocket`). Use it
    /// to tell a handshake from a plain HTTP request before routing.
    pub fn is_upgrade(&self) -> bool {
        self.has_token("upgrade", "websocket")
    }

    /// The `Origin` header, if present (RFC 6455 §10.2).
    pub fn origin(&self) -> Option<&str> {
        self.header_str("origin")
    }

    /// The `Host` header, if present.
    pub fn host(&self) -> Option<&str> {
        self.header_str("host")
    }

    /// The subprotocols the client offers in `Sec-WebSocket-Protocol`, in its order.
    pub fn protocols(&self) -> impl Iterator<Item = &str> {
        self.header_all("sec-websocket-protocol")
            .flat_map(list_items)
            .filter_map(|p| std::str::from_utf8(p).ok())
    }

    /// Picks the subprotocol to answer with: the first of `supported` (the server's
    /// order of preference) that the client offered (RFC 6455 §4.2.2 item 5.4).
    pub fn select_protocol<'s>(&self, supported: &[&'s str]) -> Option<&'s str> {
        supported
            .iter()
            .copied()
            .find(|want| self.protocols().any(|p| p == *want))
    }

    /// The extensions offered in `Sec-WebSocket-Extensions` (RFC 6455 §9.1), in order.
    pub fn extensions(&self) -> Vec<ExtensionOffer> {
        self.header_all("sec-websocket-extensions")
            .flat_map(list_items)
            .filter_map(ExtensionOffer::parse)
            .collect()
    }

    /// Checks this request against RFC 6455 §4.2.1 and returns the accept key for the
    /// 101 response. Each failed rule has its own [`HandshakeError`].
    pub fn validate_upgrade(&self) -> Result<AcceptKey, HandshakeError> {
        if &self.head[self.method.range()] != b"GET" {
            return Err(HandshakeError::MethodNotGet);
        }
        if self.minor_version < 1 {
            return Err(HandshakeError::HttpVersion);
        }
        if self.values(b"host").count() != 1 {
            return Err(HandshakeError::Host);
        }
        if !self.is_upgrade() {
            return Err(HandshakeError::UpgradeToken);
        }
        if !self.has_token("connection", "upgrade") {
            return Err(HandshakeError::ConnectionToken);
        }
        let mut keys = self.values(b"sec-websocket-key");
        let (Some(key), None) = (keys.next(), keys.next()) else {
            return Err(HandshakeError::Key);
        };
        let key = trim(key);
        // 16 bytes are 24 base64 characters; longer keys cannot be 16 bytes and are
        // refused by the length check before any decoding.
        let mut raw = [0u8; 18];
        if key.len() != 24 || BASE64.decode_slice(key, &mut raw) != Ok(16) {
            return Err(HandshakeError::Key);
        }
        let mut versions = self.values(b"sec-websocket-version");
        match (versions.next(), versions.next()) {
            (None, _) => return Err(HandshakeError::MissingVersion),
            (Some(v), None) if trim(v) == WEBSOCKET_VERSION.as_bytes() => {}
            _ => return Err(HandshakeError::UnsupportedVersion),
        }
        Ok(AcceptKey::from_key(key))
    }

    /// Every value of the header `name` (case-insensitive), compared as bytes.
    fn values<'a, 'n>(&'a self, name: &'n [u8]) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.headers
            .iter()
            .filter(move |(n, _)| self.head[n.range()].eq_ignore_ascii_case(name))
            .map(|(_, value)| &self.head[value.range()])
    }

    /// The request a connection keeps once its upgrade is done: every header field
    /// but the four the handshake consumed, which say nothing afterwards (`Upgrade`,
    /// `Connection`, `Sec-WebSocket-Key`, `Sec-WebSocket-Version`), in a head of its
    /// own. An idle connection then holds ≈ 110 B less of a typical head (and 8 B per
    /// field dropped). Method, target, version and the other fields, their order and
    /// raw values stay as they were.
    pub fn into_upgraded(self) -> Request {
        const CONSUMED: [&[u8]; 4] = [
            b"upgrade",
            b"connection",
            b"sec-websocket-key",
            b"sec-websocket-version",
        ];
        let consumed = |name: &Span| {
            let name = &self.head[name.range()];
            CONSUMED.iter().any(|c| name.eq_ignore_ascii_case(c))
        };
        if !self.headers.iter().any(|(name, _)| consumed(name)) {
            return self;
        }
        // The request line's parts end where the first field starts at the latest.
        let line_end = [Some(self.method), Some(self.path), self.query]
            .into_iter()
            .flatten()
            .map(|span| usize::from(span.end))
            .max()
            .unwrap_or(0);
        let mut head = Vec::with_capacity(self.head.len());
        head.extend_from_slice(&self.head[..line_end]);
        // Each kept field becomes `name:value\r\n`, never longer than its line was
        // (`name:` OWS value OWS CRLF), so every offset still fits in 16 bits.
        let mut headers = Vec::with_capacity(self.headers.len());
        let copy = |head: &mut Vec<u8>, from: Span| {
            let start = u16::try_from(head.len()).unwrap_or(u16::MAX);
            head.extend_from_slice(&self.head[from.range()]);
            let end = u16::try_from(head.len()).unwrap_or(u16::MAX);
            Span { start, end }
        };
        for (name, value) in self.headers.iter().filter(|(name, _)| !consumed(name)) {
            let name = copy(&mut head, *name);
            head.push(b':');
            let value = copy(&mut head, *value);
            head.extend_from_slice(b"\r\n");
            headers.push((name, value));
        }
        Request {
            head: head.into_boxed_slice(),
            method: self.method,
            path: self.path,
            query: self.query,
            minor_version: self.minor_version,
            headers: headers.into_boxed_slice(),
        }
    }

    fn str_at(&self, span: Span) -> &str {
        // httparse only yields tokens and request targets made of visible ASCII, which
        // is valid UTF-8; the fallback is never taken.
        std::str::from_utf8(&self.head[span.range()]).unwrap_or("")
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("path", &self.path())
            .field("query", &self.query())
            .field("headers", &self.headers.len())
            .finish()
    }
}

/// One offer from `Sec-WebSocket-Extensions`, e.g.
/// `permessage-deflate; client_max_window_bits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionOffer {
    /// The extension token.
    pub name: String,
    /// Its parameters, `name` or `name=value` (quotes removed).
    pub params: Vec<(String, Option<String>)>,
}

impl ExtensionOffer {
    fn parse(item: &[u8]) -> Option<Self> {
        let item = std::str::from_utf8(item).ok()?;
        let mut parts = item.split(';').map(str::trim);
        let name = parts.next().filter(|n| !n.is_empty())?.to_owned();
        let params = parts
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (
                    k.trim().to_owned(),
                    Some(v.trim().trim_matches('"').to_owned()),
                ),
                None => (p.to_owned(), None),
            })
            .collect();
        Some(Self { name, params })
    }
}

/// The `Sec-WebSocket-Accept` value: base64(SHA-1(key + GUID)) (RFC 6455 §4.2.2).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AcceptKey([u8; 28]);

impl AcceptKey {
    /// Derives the accept value from the client's `Sec-WebSocket-Key` as sent.
    pub fn from_key(key: &[u8]) -> Self {
        let mut sha = Sha1::new();
        sha.update(key);
        sha.update(WEBSOCKET_GUID);
        let mut out = [0u8; 28];
        // A 20-byte digest is always 28 base64 characters with padding.
        let _ = BASE64.encode_slice(sha.finalize(), &mut out);
        Self(out)
    }

    /// The value as text.
    pub fn as_str(&self) -> &str {
        // Base64 output is ASCII; the fallback is never taken.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Debug for AcceptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses an HTTP/1.x request head at the start of `buf`.
///
/// `Ok(None)` when the head is not complete yet (nothing is consumed);
/// `Ok(Some((request, head_len)))` when it is, where `buf[head_len..]` is what followed
/// the head (a client may send its first frame right behind it). The limits are applied
/// before anything else: a partial head already at `max_head_bytes` is refused.
pub fn parse_request(
    buf: &[u8],
    limits: &HandshakeLimits,
) -> Result<Option<(Request, usize)>, HandshakeError> {
    let max_headers = limits.max_headers.min(HandshakeLimits::MAX_HEADERS_CEILING);
    // Left uninitialised: httparse writes each header before reading it, so a parse
    // does not first fill the whole array (256 × 32 bytes).
    let mut storage = [const { MaybeUninit::uninit() }; HandshakeLimits::MAX_HEADERS_CEILING];
    let mut req = httparse::Request::new(&mut []);
    let status = match req.parse_with_uninit_headers(buf, &mut storage[..max_headers]) {
        Ok(status) => status,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError::TooManyHeaders { limit: max_headers });
        }
        Err(e) => return Err(HandshakeError::Malformed(httparse_reason(e))),
    };
    let limit = limits.head_limit();
    let httparse::Status::Complete(head_len) = status else {
        if buf.len() >= limit {
            return Err(HandshakeError::HeadTooLarge { limit });
        }
        return Ok(None);
    };
    if head_len > limit {
        return Err(HandshakeError::HeadTooLarge { limit });
    }
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(HandshakeError::Malformed("incomplete request line"));
    };
    let head: Box<[u8]> = buf[..head_len].into();
    let base = buf.as_ptr() as usize;
    // Every part lies inside the head, which is at most 64 KiB - 1 long.
    let at = |offset: usize| u16::try_from(offset).unwrap_or(u16::MAX);
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        Span {
            start: at(start),
            end: at(start + s.len()),
        }
    };
    let target_span = span(target.as_bytes());
    let (path, query) = match target.find('?') {
        Some(q) => {
            let q = at(q);
            (
                Span {
                    start: target_span.start,
                    end: target_span.start + q,
                },
                Some(Span {
                    start: target_span.start + q + 1,
                    end: target_span.end,
                }),
            )
        }
        None => (target_span, None),
    };
    let headers = req
        .headers
        .iter()
        .map(|h| (span(h.name.as_bytes()), span(h.value)))
        .collect();
    Ok(Some((
        Request {
            head,
            method: span(method.as_bytes()),
            path,
            query,
            minor_version,
            headers,
        },
        head_len,
    )))
}

/// Collects a request head from bytes that arrive in pieces (as small as one byte),
/// re-parsing only when a piece holds a line end, and refusing heads over the limit.
#[derive(Debug, Default)]
pub struct HeadReader {
    buf: BytesMut,
    limits: HandshakeLimits,
}

impl HeadReader {
    /// A reader with the given limits.
    pub fn new(limits: HandshakeLimits) -> Self {
        Self {
            buf: BytesMut::new(),
            limits,
        }
    }

    /// Adds `bytes`. Returns the request and the bytes that followed its head once the
    /// head is complete, `Ok(None)` while it is not.
    pub fn handle_bytes(
        &mut self,
        bytes: &[u8],
    ) -> Result<Option<(Request, Bytes)>, HandshakeError> {
        let limit = self.limits.head_limit();
        // Never hold more than the limit: what does not fit is only looked at once the
        // head is complete (it is what follows the head), or refused with 431.
        let room = limit.saturating_sub(self.buf.len());
        let (take, overflow) = bytes.split_at(bytes.len().min(room));
        self.buf.extend_from_slice(take);
        let full = self.buf.len() >= limit;
        if !take.contains(&b'\n') && overflow.is_empty() && !full {
            return Ok(None);
        }
        match parse_request(&self.buf, &self.limits)? {
            Some((request, head_len)) => {
                let mut rest = std::mem::take(&mut self.buf).split_off(head_len);
                rest.extend_from_slice(overflow);
                Ok(Some((request, rest.freeze())))
            }
            None if full || !overflow.is_empty() => Err(HandshakeError::HeadTooLarge { limit }),
            None => Ok(None),
        }
    }

    /// Bytes held so far.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Writes the `101 Switching Protocols` response (RFC 6455 §4.2.2), with the chosen
/// subprotocol, if any, and extra headers.
pub fn write_accept(
    out: &mut BytesMut,
    accept: &AcceptKey,
    protocol: Option<&str>,
    extra_headers: &[(&str, &str)],
) {
    out.reserve(160);
    out.put_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.put_slice(&accept.0);
    out.put_slice(b"\r\n");
    if let Some(protocol) = protocol {
        put_header(out, "Sec-WebSocket-Protocol", protocol);
    }
    for (name, value) in extra_headers {
        put_header(out, name, value);
    }
    out.put_slice(b"\r\n");
}

/// Writes a complete HTTP/1.1 response with a body and its `Content-Length`; with
/// `close`, adds `Connection: close`. Header values must not contain CR or LF.
pub fn write_response(
    out: &mut BytesMut,
    status: u16,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
    close: bool,
) {
    out.reserve(128 + body.len());
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(itoa3(status).as_slice());
    out.put_u8(b' ');
    out.put_slice(status_text(status).as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in headers {
        put_header(out, name, value);
    }
    if !body.is_empty() || !content_type.is_empty() {
        put_header(out, "Content-Type", content_type);
    }
    out.put_slice(b"Content-Length: ");
    out.put_slice(body.len().to_string().as_bytes());
    out.put_slice(b"\r\n");
    if close {
        out.put_slice(b"Connection: close\r\n");
    }
    out.put_slice(b"\r\n");
    out.put_slice(body);
}

/// The reason phrase for the statuses this crate sends.
pub fn status_text(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

// ---- client role --------------------------------------------------------------------

/// What a client puts in its opening handshake (RFC 6455 §4.1).
#[derive(Debug, Clone, Copy)]
pub struct ClientRequest<'a> {
    /// The `Host` header: `host[:port]`.
    pub host: &'a str,
    /// The request target: path and query, e.g. `/ws/room?token=x`.
    pub target: &'a str,
    /// Subprotocols to offer, in order of preference.
    pub protocols: &'a [&'a str],
    /// Other headers, e.g. `Origin`. Values must not contain CR or LF.
    pub headers: &'a [(&'a str, &'a str)],
}

impl ClientRequest<'_> {
    /// Writes the request with `key` (16 random bytes from the caller, RFC 6455 §4.1
    /// item 7) and returns what is needed to check the response.
    pub fn encode(&self, key: [u8; 16], out: &mut BytesMut) -> ClientHandshake {
        let mut key_b64 = [0u8; 24];
        let _ = BASE64.encode_slice(key, &mut key_b64);
        out.reserve(200 + self.target.len() + self.host.len());
        out.put_slice(b"GET ");
        out.put_slice(if self.target.is_empty() {
            b"/"
        } else {
            self.target.as_bytes()
        });
        out.put_slice(b" HTTP/1.1\r\n");
        put_header(out, "Host", self.host);
        out.put_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ");
        out.put_slice(&key_b64);
        out.put_slice(b"\r\nSec-WebSocket-Version: 13\r\n");
        if !self.protocols.is_empty() {
            put_header(out, "Sec-WebSocket-Protocol", &self.protocols.join(", "));
        }
        for (name, value) in self.headers {
            put_header(out, name, value);
        }
        out.put_slice(b"\r\n");
        // permessage-deflate is offered by a `Sec-WebSocket-Extensions` header among
        // `headers` (e.g. `deflate::client_offer()`): the response may then accept it.
        let deflate_offered = self.headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                && list_items(value.as_bytes())
                    .filter_map(ExtensionOffer::parse)
                    .any(|o| o.name.eq_ignore_ascii_case(super::deflate::EXTENSION))
        });
        ClientHandshake {
            accept: AcceptKey::from_key(&key_b64),
            protocols: self.protocols.iter().map(|p| (*p).to_owned()).collect(),
            deflate_offered,
        }
    }
}

/// A client's handshake in flight: checks the server's response.
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    accept: AcceptKey,
    protocols: Vec<String>,
    deflate_offered: bool,
}

/// A server's handshake response that the client accepted (101, key and tokens
/// checked): what it chose. Not an HTTP response to send; that is
/// `runtime::Response`, above this layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The subprotocol the server chose, one of those offered.
    pub protocol: Option<String>,
    /// permessage-deflate as the server accepted it, if offered and accepted.
    pub deflate: Option<super::deflate::DeflateParams>,
    /// Every header of the response, as (name, value) with lossy UTF-8.
    pub headers: Vec<(String, String)>,
}

/// Why a client refuses the server's handshake response (RFC 6455 §4.1, "the client
/// MUST _Fail the WebSocket Connection_").
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientHandshakeError {
    /// The response is not valid HTTP/1.x.
    Malformed(&'static str),
    /// The response head is over the limit.
    HeadTooLarge { limit: usize },
    /// The status is not 101; the server refused. Carries the status and reason phrase.
    Status(u16, String),
    /// `Upgrade: websocket` is missing.
    UpgradeToken,
    /// `Connection: upgrade` is missing.
    ConnectionToken,
    /// `Sec-WebSocket-Accept` is missing or does not match the key.
    AcceptKey,
    /// The server chose a subprotocol the client did not offer.
    Protocol(String),
    /// The server answered with an extension the client did not offer.
    Extension(String),
}

impl fmt::Display for ClientHandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed handshake response: {why}"),
            Self::HeadTooLarge { limit } => write!(f, "handshake response head over {limit} bytes"),
            Self::Status(status, reason) => {
                write!(f, "server refused the handshake: {status} {reason}")
            }
            Self::UpgradeToken => f.write_str("response lacks Upgrade: websocket"),
            Self::ConnectionToken => f.write_str("response lacks Connection: upgrade"),
            Self::AcceptKey => f.write_str("Sec-WebSocket-Accept is missing or wrong"),
            Self::Protocol(p) => write!(f, "server chose subprotocol {p:?}, which was not offered"),
            Self::Extension(e) => write!(f, "server chose extension {e:?}, which was not offered"),
        }
    }
}

impl std::error::Error for ClientHandshakeError {}

impl ClientHandshake {
    /// Parses and checks the response head at the start of `buf`: `Ok(None)` while it
    /// is incomplete; otherwise the response and the head's length (frames may follow).
    pub fn parse_response(
        &self,
        buf: &[u8],
        limits: &HandshakeLimits,
    ) -> Result<Option<(Accepted, usize)>, ClientHandshakeError> {
        let max_headers = limits.max_headers.min(HandshakeLimits::MAX_HEADERS_CEILING);
        let mut storage = [const { MaybeUninit::uninit() }; HandshakeLimits::MAX_HEADERS_CEILING];
        let mut res = httparse::Response::new(&mut []);
        let parser = httparse::ParserConfig::default();
        let head_len = match parser.parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut storage[..max_headers],
        ) {
            Ok(httparse::Status::Complete(n)) if n <= limits.max_head_bytes => n,
            Ok(_) if buf.len() < limits.max_head_bytes => return Ok(None),
            Ok(_) => {
                return Err(ClientHandshakeError::HeadTooLarge {
                    limit: limits.max_head_bytes,
                });
            }
            Err(e) => return Err(ClientHandshakeError::Malformed(httparse_reason(e))),
        };
        let status = res.code.unwrap_or(0);
        if status != 101 {
            return Err(ClientHandshakeError::Status(
                status,
                res.reason.unwrap_or("").to_owned(),
            ));
        }
        let values = |name: &'static str| {
            res.headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        let has_token = |name: &'static str, token: &str| {
            values(name)
                .flat_map(list_items)
                .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
        };
        if !has_token("upgrade", "websocket") {
            return Err(ClientHandshakeError::UpgradeToken);
        }
        if !has_token("connection", "upgrade") {
            return Err(ClientHandshakeError::ConnectionToken);
        }
        let mut accepts = values("sec-websocket-accept");
        match (accepts.next(), accepts.next()) {
            (Some(v), None) if trim(v) == self.accept.0.as_slice() => {}
            _ => return Err(ClientHandshakeError::AcceptKey),
        }
        // RFC 6455 §4.1: extensions we did not offer fail the connection. The one we
        // may offer is permessage-deflate, accepted once, with valid parameters (RFC
        // 7692 §5.2, §7.1).
        let mut deflate = None;
        for ext in values("sec-websocket-extensions").flat_map(list_items) {
            let refused =
                || ClientHandshakeError::Extension(String::from_utf8_lossy(ext).into_owned());
            let offer = ExtensionOffer::parse(ext).ok_or_else(refused)?;
            if !self.deflate_offered
                || deflate.is_some()
                || !offer.name.eq_ignore_ascii_case(super::deflate::EXTENSION)
            {
                return Err(refused());
            }
            deflate = Some(super::deflate::accept_response(&offer).map_err(|_| refused())?);
        }
        let mut chosen = values("sec-websocket-protocol").flat_map(list_items);
        let protocol = match (chosen.next(), chosen.next()) {
            (None, _) => None,
            (Some(p), None) => {
                let p = String::from_utf8_lossy(p).into_owned();
                if !self.protocols.contains(&p) {
                    return Err(ClientHandshakeError::Protocol(p));
                }
                Some(p)
            }
            (Some(_), Some(_)) => {
                return Err(ClientHandshakeError::Protocol("more than one".to_owned()));
            }
        };
        let headers = res
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        Ok(Some((
            Accepted {
                protocol,
                deflate,
                headers,
            },
            head_len,
        )))
    }
}

// ---- helpers --------------------------------------------------------------------------

/// The items of a comma-separated header list, trimmed, empty ones skipped.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|item| !item.is_empty())
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn put_header(out: &mut BytesMut, name: &str, value: &str) {
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

fn itoa3(n: u16) -> [u8; 3] {
    let n = n.min(999);
    [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid response status",
        httparse::Error::Token => "invalid token in request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

#[cfg(test)]
mod tests;
