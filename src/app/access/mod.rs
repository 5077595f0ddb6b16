//! Who may connect, subscribe and publish (`docs/security.md` has the threat model).
//!
//! The rules are built once from the configuration when the server starts and shared by
//! every worker. A WebSocket handshake goes through, in this order, each refusal
//! answered before the upgrade, logged at debug with the cause (never a token) and
//! counted in `ringsocket_rejections_total{reason}`:
//!
//! 1. `Origin` against `allowed_origins`: 403 (`origin`);
//! 2. the JWT, when `jwt_secret` or `jwt_public_key` is set: 401 (`unauthorized`);
//! 3. the connect hooks, `auth_url` and the app's [`App::authorize`](super::App::authorize):
//!    their status (`auth_hook`);
//!
//! and the handler then runs with the connection's [`Grant`]s, which
//! [`WebSocket::subscribe`](super::WebSocket::subscribe) and the `publish` methods
//! consult (a topic must be allowed by every grant). When a grant expires the
//! connection is closed with 1008 "token expired".
//!
//! `POST /publish` needs one of `publish_token` (or, with none, a loopback-bound
//! server), and `/metrics` the `metrics_token` when it is set.

mod bearer;
pub(crate) mod hook;
mod jwt;
mod origin;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::Config;
use crate::metrics::{Rejection, Rejections};
use crate::proto::handshake::Request;
use crate::runtime::{Response, Session};

pub(crate) use bearer::Refused;

/// Topics a grant allows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TopicRules {
    /// Every topic.
    #[default]
    Any,
    /// These topics: exact names, `prefix*` patterns (e.g. `chat:*`), or `*` for all.
    Only(Vec<String>),
}

impl TopicRules {
    /// Whether `topic` is allowed.
    pub fn allows(&self, topic: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(patterns) => patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => p == topic,
            }),
        }
    }

    /// No topic.
    pub fn none() -> Self {
        Self::Only(Vec::new())
    }
}

/// What a client may do, from its JWT, `auth_url`'s answer or an
/// [`App::authorize`](super::App::authorize) hook.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Grant {
    /// The client's id (the JWT's `sub`), shown in logs.
    pub sub: Option<String>,
    /// Topics it may subscribe to.
    pub topics: TopicRules,
    /// Topics it may publish to from its socket.
    pub publish: TopicRules,
    /// When the connection must close with 1008 "token expired" (the JWT's `exp`).
    pub expires_at: Option<SystemTime>,
}

impl Grant {
    /// A grant for `sub` that allows every topic, subscribing and publishing.
    pub fn new(sub: impl Into<String>) -> Self {
        Self {
            sub: Some(sub.into()),
            ..Self::default()
        }
    }

    /// Only these topics (names, `prefix*` patterns) for subscribing.
    pub fn topics<S: Into<String>>(mut self, topics: impl IntoIterator<Item = S>) -> Self {
        self.topics = TopicRules::Only(topics.into_iter().map(Into::into).collect());
        self
    }

    /// Only these topics (names, `prefix*` patterns) for publishing.
    pub fn publish<S: Into<String>>(mut self, topics: impl IntoIterator<Item = S>) -> Self {
        self.publish = TopicRules::Only(topics.into_iter().map(Into::into).collect());
        self
    }

    /// Closes the connection at `at` with 1008 "token expired".
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }
}

/// A handshake as an [`App::authorize`](super::App::authorize) hook sees it.
#[derive(Debug, Clone)]
pub struct AuthRequest {
    session: Session,
    jwt: Option<Grant>,
}

impl AuthRequest {
    pub(crate) fn new(session: Session, jwt: Option<Grant>) -> Self {
        Self { session, jwt }
    }

    /// The upgrade request: path, query, headers (cookies, `Authorization`, `Origin`).
    pub fn request(&self) -> &Request {
        self.session.request()
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.session.peer()
    }

    /// What the handshake's JWT granted, when JWTs are configured.
    pub fn jwt(&self) -> Option<&Grant> {
        self.jwt.as_ref()
    }
}

/// Who may use the publish API.
#[derive(Debug)]
enum PublishApi {
    /// A bearer token from `publish_token` / `publish_token_file`.
    Tokens(bearer::Tokens),
    /// No token set, every listener on loopback: open to local callers.
    Loopback,
    /// No token set and a listener on another address: closed (403).
    Closed,
}

/// The access rules of a running server.
#[derive(Debug)]
pub(crate) struct Access {
    origins: origin::Origins,
    jwt: Option<jwt::Verifier>,
    jwt_cookie: String,
    publish: PublishApi,
    metrics_tokens: bearer::Tokens,
    max_topic_length: usize,
    max_topics: usize,
    hook: Option<hook::AuthClient>,
    rejections: Arc<Rejections>,
}

impl Default for Access {
    /// No rule: what an app that was never started by a server uses.
    fn default() -> Self {
        Self {
            origins: origin::Origins::default(),
            jwt: None,
            jwt_cookie: String::new(),
            publish: PublishApi::Loopback,
            metrics_tokens: bearer::Tokens::default(),
            max_topic_length: crate::config::MAX_TOPIC_LENGTH,
            max_topics: crate::pubsub::MAX_TOPICS_PER_SESSION,
            hook: None,
            rejections: Arc::default(),
        }
    }
}

impl Access {
    /// The rules of `config`. Errors name the setting and the file, never a secret.
    pub(crate) fn from_config(
        config: &Config,
        rejections: Arc<Rejections>,
    ) -> Result<Self, String> {
        let jwt = if !config.jwt_secret.is_empty() {
            if config.jwt_secret.len() < 32 {
                return Err(
                    "jwt_secret must be at least 32 characters (HS256 needs 256 bits; \
                     generate one with `openssl rand -hex 32`)"
                        .into(),
                );
            }
            Some(jwt::Verifier::hs256(&config.jwt_secret))
        } else if !config.jwt_public_key.is_empty() {
            let key = &config.jwt_public_key;
            let pem = if key.trim_start().starts_with("-----BEGIN") {
                key.clone()
            } else {
                std::fs::read_to_string(key)
                    .map_err(|e| format!("jwt_public_key: cannot read {key}: {e}"))?
            };
            Some(jwt::Verifier::public_key(&pem).map_err(|e| format!("jwt_public_key: {e}"))?)
        } else {
            None
        };
        let mut tokens = config.publish_token.clone();
        if !config.publish_token_file.is_empty() {
            tokens.extend(
                bearer::read_token_file(&config.publish_token_file)
                    .map_err(|e| format!("publish_token_file: {e}"))?,
            );
        }
        let loopback = config.bind.ip().is_loopback()
            && config
                .plain_bind_addr()
                .ok()
                .flatten()
                .is_none_or(|a| a.ip().is_loopback());
        let publish = match (tokens.is_empty(), loopback) {
            (false, _) => PublishApi::Tokens(bearer::Tokens::new(tokens)),
            (true, true) => PublishApi::Loopback,
            (true, false) => PublishApi::Closed,
        };
        let hook = if config.auth_url.is_empty() {
            None
        } else {
            Some(hook::AuthClient::start(
                &config.auth_url,
                config.auth_timeout(),
            )?)
        };
        Ok(Self {
            origins: origin::Origins::new(&config.allowed_origins),
            jwt,
            jwt_cookie: config.jwt_cookie.clone(),
            publish,
            metrics_tokens: bearer::Tokens::new([config.metrics_token.clone()]),
            max_topic_length: config.max_topic_length,
            max_topics: config.max_topics_per_connection,
            hook,
            rejections,
        })
    }

    /// One line for the startup log on what the publish API accepts.
    pub(crate) fn publish_summary(&self) -> String {
        match &self.publish {
            PublishApi::Tokens(tokens) => {
                format!(
                    "POST /publish needs a bearer token ({} configured)",
                    tokens.len()
                )
            }
            PublishApi::Loopback => "POST /publish is open to local callers: the server is \
                 bound to loopback and no publish_token is set"
                .into(),
            PublishApi::Closed => "POST /publish answers 403: the server listens beyond \
                 loopback and no publish_token (or publish_token_file) is set"
                .into(),
        }
    }

    /// Whether the publish API refuses every request (no token, not on loopback).
    pub(crate) fn publish_closed(&self) -> bool {
        matches!(self.publish, PublishApi::Closed)
    }

    /// Step 1: the handshake's `Origin`.
    pub(crate) fn check_origin(&self, head: &Request, peer: SocketAddr) -> Result<(), Response> {
        if self.origins.any() {
            return Ok(());
        }
        let origin = head.header_str("origin");
        if self.origins.allows(origin) {
            return Ok(());
        }
        self.rejected(Rejection::Origin);
        tracing::debug!(%peer, origin = origin.unwrap_or_default(), "origin not allowed: 403");
        Err(Response::error(403, "origin not allowed"))
    }

    /// Step 2: the JWT. `Ok(None)` when JWTs are not configured.
    pub(crate) fn check_jwt(
        &self,
        head: &Request,
        peer: SocketAddr,
    ) -> Result<Option<Grant>, Response> {
        let Some(verifier) = &self.jwt else {
            return Ok(None);
        };
        match verifier.check(head, &self.jwt_cookie) {
            Ok(grant) => Ok(Some(grant)),
            Err(e) => {
                self.rejected(Rejection::Unauthorized);
                tracing::debug!(%peer, path = head.path(), reason = %e, "handshake refused: 401");
                Err(Response::error(401, &e.to_string()).with_header("WWW-Authenticate", "Bearer"))
            }
        }
    }

    /// The algorithm subscribers' JWTs must be signed with, when JWTs are needed.
    pub(crate) fn jwt_algorithm(&self) -> Option<jsonwebtoken::Algorithm> {
        self.jwt.as_ref().map(jwt::Verifier::algorithm)
    }

    /// The `auth_url` client, when one is configured.
    pub(crate) fn hook(&self) -> Option<&hook::AuthClient> {
        self.hook.as_ref()
    }

    /// The publish API's bearer token.
    pub(crate) fn check_publish(&self, head: &Request, peer: SocketAddr) -> Result<(), Response> {
        let refused = match &self.publish {
            PublishApi::Loopback => return Ok(()),
            PublishApi::Closed => {
                self.rejected(Rejection::PublishToken);
                tracing::debug!(%peer, "publish API closed (no publish_token): 403");
                return Err(Response::error(
                    403,
                    "the publish API is closed: the server is not bound to loopback and no \
                     publish_token is set",
                ));
            }
            PublishApi::Tokens(tokens) => match tokens.check(head) {
                Ok(()) => return Ok(()),
                Err(refused) => refused,
            },
        };
        self.rejected(Rejection::PublishToken);
        Err(token_refusal(refused, peer, "publish"))
    }

    /// `/metrics`' bearer token, when `metrics_token` is set.
    pub(crate) fn check_metrics(&self, head: &Request, peer: SocketAddr) -> Result<(), Response> {
        if self.metrics_tokens.is_empty() {
            return Ok(());
        }
        self.metrics_tokens.check(head).map_err(|refused| {
            self.rejected(Rejection::MetricsToken);
            token_refusal(refused, peer, "metrics")
        })
    }

    /// Whether `topic` is a name clients may use: 1 to `max_topic_length` bytes of
    /// letters, digits (any script) and `_ - . : @ / = + ~ , ! $`.
    pub(crate) fn check_topic_name(&self, topic: &str) -> Result<(), String> {
        check_topic_name(topic, self.max_topic_length)
    }

    /// Counts a rejection.
    pub(crate) fn rejected(&self, reason: Rejection) {
        self.rejections.add(reason);
    }

    /// `max_topics_per_connection`.
    pub(crate) fn max_topics(&self) -> usize {
        self.max_topics
    }
}

/// 401 (no token, with `WWW-Authenticate`) or 403 (a wrong one), logged at debug.
fn token_refusal(refused: Refused, peer: SocketAddr, realm: &str) -> Response {
    match refused {
        Refused::Missing => {
            tracing::debug!(%peer, realm, "no bearer token: 401");
            Response::error(401, "an Authorization: Bearer token is required")
                .with_header("WWW-Authenticate", format!("Bearer realm=\"{realm}\""))
        }
        Refused::Wrong => {
            tracing::debug!(%peer, realm, "wrong bearer token: 403");
            Response::error(403, "the bearer token is not valid here")
        }
    }
}

/// The characters a topic name may hold besides letters and digits.
pub const TOPIC_PUNCTUATION: &str = "_-.:@/=+~,!$";

/// Checks a topic name against the length limit and the character set.
pub(crate) fn check_topic_name(topic: &str, max_len: usize) -> Result<(), String> {
    if topic.is_empty() || topic.len() > max_len {
        return Err(format!(
            "topic names are 1 to {max_len} bytes, got {}",
            topic.len()
        ));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_alphanumeric() || TOPIC_PUNCTUATION.contains(*c)))
    {
        return Err(format!(
            "{c:?} is not allowed in a topic name (letters, digits and {TOPIC_PUNCTUATION})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_bounds_are_the_pubsub_layers() {
        assert_eq!(
            crate::config::MAX_TOPICS_PER_CONNECTION,
            crate::pubsub::MAX_TOPICS_PER_SESSION
        );
        assert_eq!(
            crate::config::MAX_TOPIC_LENGTH,
            crate::pubsub::MAX_TOPIC_LEN
        );
    }

    #[test]
    fn topic_rules_match_names_and_prefixes() {
        let rules = TopicRules::Only(vec!["lobby".into(), "chat:*".into()]);
        assert!(rules.allows("lobby"));
        assert!(rules.allows("chat:42"));
        assert!(rules.allows("chat:"));
        assert!(!rules.allows("lobby2"));
        assert!(!rules.allows("chat"));
        assert!(TopicRules::Only(vec!["*".into()]).allows("anything"));
        assert!(!TopicRules::none().allows("lobby"));
        assert!(TopicRules::Any.allows("lobby"));
    }

    #[test]
    fn topic_names_have_a_length_and_a_character_set() {
        assert!(check_topic_name("chat:room-1/a_b.c@d=e+f~g,h!i$j", 255).is_ok());
        assert!(check_topic_name("café", 255).is_ok());
        assert!(check_topic_name(&"a".repeat(255), 255).is_ok());
        let long = check_topic_name(&"a".repeat(256), 255).unwrap_err();
        assert!(long.contains("1 to 255 bytes"), "{long}");
        assert!(check_topic_name("", 255).is_err());
        for bad in [
            "a b", "a\nb", "a*", "a#b", "a?b", "a%20b", "<script>", "a\"b", "a\u{0}",
        ] {
            let err = check_topic_name(bad, 255).unwrap_err();
            assert!(err.contains("is not allowed"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_publish_api_is_closed_off_loopback_without_a_token() {
        let mut config = Config::default();
        assert!(matches!(
            Access::from_config(&config, Arc::default())
                .unwrap()
                .publish,
            PublishApi::Loopback
        ));
        config.set("bind", "0.0.0.0:9001").unwrap();
        let access = Access::from_config(&config, Arc::default()).unwrap();
        assert!(access.publish_closed());
        assert!(access.publish_summary().contains("403"));
        config.set("publish_token", "0123456789abcdef0123").unwrap();
        let access = Access::from_config(&config, Arc::default()).unwrap();
        assert!(!access.publish_closed());
        assert!(!access.publish_summary().contains("0123456789abcdef"));
    }

    #[test]
    fn key_errors_name_the_setting_never_the_secret() {
        let mut config = Config::default();
        config.set("jwt_secret", "too-short-secret").unwrap();
        let err = Access::from_config(&config, Arc::default()).unwrap_err();
        assert!(err.contains("at least 32"), "{err}");
        assert!(!err.contains("too-short-secret"), "{err}");
        let mut config = Config::default();
        config
            .set("jwt_public_key", "/nonexistent/key.pem")
            .unwrap();
        let err = Access::from_config(&config, Arc::default()).unwrap_err();
        assert!(
            err.starts_with("jwt_public_key: cannot read /nonexistent/key.pem"),
            "{err}"
        );
        let mut config = Config::default();
        config
            .set(
                "jwt_public_key",
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            )
            .unwrap();
        let err = Access::from_config(&config, Arc::default()).unwrap_err();
        assert!(err.contains("not an RSA or EC"), "{err}");
    }
}
