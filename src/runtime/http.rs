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
