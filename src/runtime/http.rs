//! HTTP/1.1 responses as the runtime writes them, and request-body framing.

use bytes::{Bytes, BytesMut};

use crate::proto::handshake::{self, Request};

/// An HTTP response: status, headers and a body sent with `Content-Length`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Extra headers. `Content-Length` and `Connection` are written by the runtime.
    pub headers: Vec<(String, String)>,
    /// The `Content-Type`, empty for none.
    pub content_type: String,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// A response with a `text/plain` body.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            content_type: "text/plain; charset=utf-8".into(),
            body: Bytes::from(body.into()),
        }
    }

    /// A response with an `application/json` body.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self {
            content_type: "application/json".into(),
            ..Self::text(status, body)
        }
    }

    /// A response with no body.
    pub fn empty(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            content_type: String::new(),
            body: Bytes::new(),
        }
    }

    /// An error response whose body is a one-line reason.
    pub fn error(status: u16, reason: &str) -> Self {
        Self::text(status, format!("{reason}\n"))
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Serializes the response; `close` adds `Connection: close`. Header values with CR
    /// or LF are dropped, so a handler cannot split the response.
    pub fn write(&self, out: &mut BytesMut, close: bool) {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .filter(|(n, v)| !has_crlf(n) && !has_crlf(v))
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let content_type = if has_crlf(&self.content_type) {
            ""
        } else {
            &self.content_type
        };
        handshake::write_response(out, self.status, &headers, content_type, &self.body, close);
    }
}

fn has_crlf(s: &str) -> bool {
    s.bytes().any(|b| b == b'\r' || b == b'\n')
}

/// How a request's body is framed (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(usize),
}

/// Why a request body cannot be read; each maps to a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// `Transfer-Encoding` (chunked or other): 411, send `Content-Length` instead.
    TransferEncoding,
    /// `Content-Length` is not a number, or repeated with different values: 400.
    BadLength,
    /// `Content-Length` over the limit: 413.
    TooLarge { limit: usize },
}

impl BodyError {
    /// The response for this error.
    pub fn response(self) -> Response {
        match self {
            Self::TransferEncoding => Response::error(
                411,
                "Transfer-Encoding request bodies are not supported; send Content-Length",
            ),
            Self::BadLength => Response::error(400, "invalid Content-Length"),
            Self::TooLarge { limit } => {
                Response::error(413, &format!("request body over the {limit}-byte limit"))
            }
        }
    }
}

/// Finds how `request`'s body is framed, applying the body limit.
pub fn body_framing(request: &Request, max_body: usize) -> Result<BodyFraming, BodyError> {
    if request.header("transfer-encoding").is_some() {
        return Err(BodyError::TransferEncoding);
    }
    let mut length = None;
    for value in request.header_all("content-length") {
        let text = std::str::from_utf8(value).map_err(|_| BodyError::BadLength)?;
        for item in text.split(',') {
            let n: usize = item.trim().parse().map_err(|_| BodyError::BadLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(BodyError::BadLength);
            }
            length = Some(n);
        }
    }
    match length {
        None | Some(0) => Ok(BodyFraming::None),
        Some(n) if n > max_body => Err(BodyError::TooLarge { limit: max_body }),
        Some(n) => Ok(BodyFraming::Length(n)),
    }
}

/// Whether the connection stays open after answering `request` (RFC 9112 §9.3).
pub fn keep_alive(request: &Request) -> bool {
    if request.has_token("connection", "close") {
        return false;
    }
    request.minor_version() >= 1 || request.has_token("connection", "keep-alive")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::HandshakeLimits;
    use crate::proto::handshake::parse_request;

    fn head(lines: &str) -> Request {
        let text = format!("POST /x HTTP/1.1\r\nHost: h\r\n{lines}\r\n");
        parse_request(text.as_bytes(), &HandshakeLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn content_length_frames_the_body_within_the_limit() {
        assert_eq!(body_framing(&head(""), 10), Ok(BodyFraming::None));
        assert_eq!(
            body_framing(&head("Content-Length: 0\r\n"), 10),
            Ok(BodyFraming::None)
        );
        assert_eq!(
            body_framing(&head("Content-Length: 7\r\n"), 10),
            Ok(BodyFraming::Length(7))
        );
        assert_eq!(
            body_framing(&head("Content-Length: 11\r\n"), 10),
            Err(BodyError::TooLarge { limit: 10 })
        );
        assert_eq!(BodyError::TooLarge { limit: 10 }.response().status, 413);
    }

    /// RFC 9112 §6.3: a repeated Content-Length must agree; anything else is refused.
    #[test]
    fn bad_or_conflicting_lengths_are_refused() {
        assert_eq!(
            body_framing(&head("Content-Length: x\r\n"), 10),
            Err(BodyError::BadLength)
        );
        assert_eq!(
            body_framing(&head("Content-Length: 3\r\nContent-Length: 4\r\n"), 10),
            Err(BodyError::BadLength)
        );
        assert_eq!(
            body_framing(&head("Content-Length: 3, 3\r\n"), 10),
            Ok(BodyFraming::Length(3))
        );
        assert_eq!(
            body_framing(&head("Content-Length: -1\r\n"), 10),
            Err(BodyError::BadLength)
        );
    }

    #[test]
    fn transfer_encoding_is_refused_with_411() {
        let e = body_framing(&head("Transfer-Encoding: chunked\r\n"), 10).unwrap_err();
        assert_eq!(e, BodyError::TransferEncoding);
        assert_eq!(e.response().status, 411);
    }

    /// RFC 9112 §9.3: HTTP/1.1 stays open unless `Connection: close`; HTTP/1.0 only with
    /// `Connection: keep-alive`.
    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(keep_alive(&head("")));
        assert!(!keep_alive(&head("Connection: close\r\n")));
        let v10 = |extra: &str| {
            let text = format!("GET / HTTP/1.0\r\n{extra}\r\n");
            parse_request(text.as_bytes(), &HandshakeLimits::default())
                .unwrap()
                .unwrap()
                .0
        };
        assert!(!keep_alive(&v10("")));
        assert!(keep_alive(&v10("Connection: keep-alive\r\n")));
    }

    #[test]
    fn header_values_with_line_breaks_are_dropped() {
        let mut out = BytesMut::new();
        Response::text(200, "ok")
            .with_header("X-Evil", "a\r\nSet-Cookie: x")
            .write(&mut out, false);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(!text.contains("X-Evil"), "{text}");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
    }
}
