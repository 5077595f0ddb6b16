//! `auth_url`: the team's backend admits WebSocket handshakes (cookie sessions).
//!
//! The I/O cores never wait on it: one thread (`ringsocket-auth`) runs an async HTTP
//! client (hyper; rustls on aws-lc-rs for `https://`, with the system's roots) with a
//! pool of kept-alive connections; a worker hands it the handshake's headers over a
//! bounded channel and awaits the answer, within `auth_timeout_secs`, in the
//! connection's own task. The backend gets `GET auth_url` with the upgrade request's
//! `Cookie`, `Authorization`, `Origin`, `User-Agent` and `Sec-WebSocket-Protocol`,
//! plus `X-Original-URI` (path and query), `X-Original-Method` and `X-Forwarded-For`
//! (the client's address). It answers:
//! - 200 with `{"sub": "...", "topics": [...], "publish": [...], "exp": unix-seconds}`
//!   (every field optional; no `topics`: any topic; no `publish`: none) to admit;
//! - anything else to refuse: a 3xx, 4xx or 5xx status is passed to the client as it
//!   is, any other (a 204, say) becomes 403.
//!
//! A backend that does not answer in time, cannot be reached or answers with a body
//! that is not that JSON: 503 to the client, a WARN naming the cause.

use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::{Grant, TopicRules};
use crate::config::mask_url_password;
use crate::proto::handshake::Request;
use crate::runtime::Response;

/// Handshakes waiting for the backend, across the process, beyond which new ones get
/// 503 at once.
const QUEUE: usize = 4096;
/// The largest answer body read.
const MAX_BODY: usize = 64 << 10;
/// The request headers forwarded to the backend.
const FORWARDED: [&str; 5] = [
    "cookie",
    "authorization",
    "origin",
    "user-agent",
    "sec-websocket-protocol",
];

/// The backend's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Admit(Grant),
    Refuse(u16),
}

struct Job {
    headers: Vec<(HeaderName, HeaderValue)>,
    reply: oneshot::Sender<Result<Verdict, String>>,
}

/// The handle the workers ask through.
pub(crate) struct AuthClient {
    jobs: mpsc::Sender<Job>,
    timeout: Duration,
    /// The URL as logs show it (a password masked).
    shown: String,
}

impl std::fmt::Debug for AuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthClient({})", self.shown)
    }
}

/// The answer body of an admitting backend.
#[derive(Debug, Deserialize)]
struct Admission {
    sub: Option<String>,
    topics: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    exp: Option<u64>,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

impl AuthClient {
    /// Starts the client's thread for `url`.
    pub(crate) fn start(url: &str, timeout: Duration) -> Result<Self, String> {
        let shown = mask_url_password(url);
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("auth_url: {shown:?} is not a URL: {e}"))?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match builder.with_provider_and_native_roots(provider.clone()) {
            Ok(builder) => builder,
            Err(e) if uri.scheme_str() == Some("https") => {
                return Err(format!(
                    "auth_url: cannot load the system's root certificates for {shown}: {e}"
                ));
            }
            // Plain http: no root is ever needed.
            Err(_) => {
                let config = rustls::ClientConfig::builder_with_provider(provider.into())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("auth_url: {e}"))?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        let connector = builder.https_or_http().enable_http1().build();
        let (jobs, queue) = mpsc::channel(QUEUE);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("auth_url: cannot start the client's runtime: {e}"))?;
        std::thread::Builder::new()
            .name("ringsocket-auth".into())
            .spawn(move || {
                let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
                runtime.block_on(serve(queue, client, uri, timeout));
            })
            .map_err(|e| format!("auth_url: cannot start the client's thread: {e}"))?;
        Ok(Self {
            jobs,
            timeout,
            shown,
        })
    }

    /// Asks the backend about the handshake `head` from `peer`: its grant, or the
    /// response that refuses it.
    pub(crate) async fn ask(&self, head: &Request, peer: SocketAddr) -> Result<Grant, Response> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            headers: forwarded_headers(head, peer),
            reply,
        };
        if self.jobs.try_send(job).is_err() {
            tracing::warn!(%peer, url = %self.shown, "auth_url: {QUEUE} handshakes already wait for the backend: 503");
            return Err(unavailable("the authorization backend is busy"));
        }
        // The client thread gives up at the same timeout; a little more here, so that
        // its answer (a timeout) is what is reported.
        match tokio::time::timeout(self.timeout + Duration::from_millis(50), answer).await {
            Ok(Ok(Ok(Verdict::Admit(grant)))) => Ok(grant),
            Ok(Ok(Ok(Verdict::Refuse(status)))) => {
                tracing::debug!(%peer, status, "auth_url refused the handshake");
                Err(Response::error(
                    status,
                    "refused by the authorization backend",
                ))
            }
            Ok(Ok(Err(why))) => {
                tracing::warn!(%peer, url = %self.shown, "auth_url failed: {why}: 503");
                Err(unavailable("the authorization backend failed"))
            }
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(%peer, url = %self.shown, "auth_url did not answer within {:?}: 503", self.timeout);
                Err(unavailable(
                    "the authorization backend did not answer in time",
                ))
            }
        }
    }
}

fn unavailable(reason: &str) -> Response {
    Response::error(503, reason).with_header("Retry-After", "1")
}

/// The headers the backend gets for `head`.
fn forwarded_headers(head: &Request, peer: SocketAddr) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::with_capacity(8);
    for (name, value) in head.headers() {
        let lower = name.to_ascii_lowercase();
        if !FORWARDED.contains(&lower.as_str()) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(lower.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.push((name, value));
        }
    }
    let uri = match head.query() {
        Some(query) => format!("{}?{query}", head.path()),
        None => head.path().to_owned(),
    };
    let extra = [
        ("x-original-uri", uri),
        ("x-original-method", head.method().to_owned()),
        ("x-forwarded-for", peer.ip().to_string()),
    ];
    for (name, value) in extra {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.push((HeaderName::from_static(name), value));
        }
    }
    headers
}

/// The client thread: every job becomes a request of its own task.
async fn serve(
    mut queue: mpsc::Receiver<Job>,
    client: HttpClient,
    uri: hyper::Uri,
    timeout: Duration,
) {
    while let Some(job) = queue.recv().await {
        let client = client.clone();
        let uri = uri.clone();
        tokio::spawn(async move {
            let answer = match tokio::time::timeout(timeout, call(&client, uri, job.headers)).await
            {
                Ok(answer) => answer,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            let _ = job.reply.send(answer);
        });
    }
}

async fn call(
    client: &HttpClient,
    uri: hyper::Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
) -> Result<Verdict, String> {
    let mut request = hyper::Request::get(uri)
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    request.headers_mut().extend(headers);
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Ok(Verdict::Refuse(refusal_status(status)));
    }
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    parse_admission(&body).map(Verdict::Admit)
}

/// The status a refused client gets for the backend's `status`.
fn refusal_status(status: u16) -> u16 {
    if (300..=599).contains(&status) {
        status
    } else {
        403
    }
}

/// The grant in an admitting answer's body.
fn parse_admission(body: &[u8]) -> Result<Grant, String> {
    let admission: Admission = serde_json::from_slice(body)
        .map_err(|e| format!("the 200 answer is not the JSON expected ({e})"))?;
    Ok(Grant {
        sub: admission.sub,
        topics: admission.topics.map_or(TopicRules::Any, TopicRules::Only),
        publish: TopicRules::Only(admission.publish.unwrap_or_default()),
        expires_at: admission
            .exp
            .map(|exp| UNIX_EPOCH + Duration::from_secs(exp)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admissions_are_read_with_secure_defaults() {
        let grant =
            parse_admission(br#"{"sub":"u1","topics":["lobby","chat:*"],"publish":["lobby"]}"#)
                .unwrap();
        assert_eq!(grant.sub.as_deref(), Some("u1"));
        assert!(grant.topics.allows("chat:9"));
        assert!(!grant.topics.allows("admin"));
        assert!(grant.publish.allows("lobby"));
        assert!(!grant.publish.allows("chat:9"));
        let bare = parse_admission(b"{}").unwrap();
        assert!(bare.topics.allows("any"), "no topics: every topic");
        assert!(!bare.publish.allows("any"), "no publish: none");
        let err = parse_admission(b"<html>ok</html>").unwrap_err();
        assert!(err.contains("not the JSON expected"), "{err}");
    }

    #[test]
    fn refusals_keep_error_statuses() {
        assert_eq!(refusal_status(401), 401);
        assert_eq!(refusal_status(403), 403);
        assert_eq!(refusal_status(503), 503);
        assert_eq!(refusal_status(302), 302);
        assert_eq!(refusal_status(204), 403);
        assert_eq!(refusal_status(101), 403);
    }
}
