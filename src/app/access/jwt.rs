//! Subscribers' JWTs: `jwt_secret` (HS256) or `jwt_public_key` (RS256 or ES256), the
//! token taken from `?token=`, `Authorization: Bearer` or the `jwt_cookie` cookie.

use std::time::{Duration, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{Grant, TopicRules, bearer};
use crate::proto::handshake::Request;

/// The claims ringsocket reads; others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    topics: Option<Vec<String>>,
    publish: Option<Vec<String>>,
}

/// Verifies tokens with one key.
pub(crate) struct Verifier {
    key: DecodingKey,
    validation: Validation,
    algorithm: Algorithm,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({:?}, key hidden)", self.algorithm)
    }
}

/// Why a handshake's token was refused (answered 401; the text is the reason given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenError {
    Missing,
    Invalid(&'static str),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => f.write_str(
                "a token is required (?token=, Authorization: Bearer, or the JWT cookie)",
            ),
            Self::Invalid(why) => write!(f, "invalid token: {why}"),
        }
    }
}

impl Verifier {
    /// HS256 with `secret`.
    pub(crate) fn hs256(secret: &str) -> Self {
        Self::with(
            DecodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        )
    }

    /// RS256 or ES256 with the public key in `pem` (the text of a PEM file: a
    /// `PUBLIC KEY`, an `RSA PUBLIC KEY` or a certificate).
    pub(crate) fn public_key(pem: &str) -> Result<Self, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
            return Ok(Self::with(key, Algorithm::RS256));
        }
        match DecodingKey::from_ec_pem(pem.as_bytes()) {
            Ok(key) => Ok(Self::with(key, Algorithm::ES256)),
            Err(e) => Err(format!(
                "not an RSA or EC (P-256) public key in PEM form ({e})"
            )),
        }
    }

    fn with(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        // `exp` is required (jsonwebtoken's default); `nbf` is checked when present.
        validation.validate_nbf = true;
        // The connection is closed when `exp` passes, to the second: a token is
        // valid until then and no longer, on the issuer's clock (keep it in sync).
        validation.leeway = 0;
        Self {
            key,
            validation,
            algorithm,
        }
    }

    /// The algorithm tokens must be signed with.
    pub(crate) fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Verifies `token` and returns what it grants.
    pub(crate) fn verify(&self, token: &str) -> Result<Grant, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| TokenError::Invalid(reason(e.kind())))?;
        let claims = data.claims;
        Ok(Grant {
            sub: claims.sub,
            // No `topics` claim: the token authenticates, every topic is open to it.
            topics: claims.topics.map_or(TopicRules::Any, TopicRules::Only),
            // No `publish` claim: the client may not publish from its socket.
            publish: TopicRules::Only(claims.publish.unwrap_or_default()),
            expires_at: claims.exp.map(|exp| UNIX_EPOCH + Duration::from_secs(exp)),
        })
    }

    /// Finds the handshake's token and verifies it.
    pub(crate) fn check(&self, head: &Request, cookie: &str) -> Result<Grant, TokenError> {
        let token = find_token(head, cookie).ok_or(TokenError::Missing)?;
        self.verify(&token)
    }
}

/// A short, token-free reason for a refused token.
fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not valid yet (nbf)",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "signed with another algorithm"
        }
        ErrorKind::MissingRequiredClaim(_) => "a required claim (exp) is missing",
        ErrorKind::Json(_) => "its claims are not the JSON expected",
        ErrorKind::Base64(_) | ErrorKind::InvalidToken | ErrorKind::Utf8(_) => "malformed",
        _ => "rejected",
    }
}

/// The token of a handshake: `?token=`, then `Authorization: Bearer`, then the cookie
/// named `cookie` (if not empty).
pub(crate) fn find_token(head: &Request, cookie: &str) -> Option<String> {
    if let Some(query) = head.query() {
        for pair in query.split('&') {
            if let Some(value) = pair.strip_prefix("token=") {
                return Some(percent_decode(value)).filter(|t| !t.is_empty());
            }
        }
    }
    if let Some(token) = bearer::bearer(head) {
        return Some(token.to_owned());
    }
    if cookie.is_empty() {
        return None;
    }
    let cookies = head.header_str("cookie")?;
    cookies.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name.trim() == cookie)
            .then(|| value.trim().trim_matches('"').to_owned())
            .filter(|t| !t.is_empty())
    })
}

/// Decodes `%XX` escapes and `+` (a form-encoded space); bad escapes stay as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::HandshakeLimits;
    use crate::proto::handshake::HeadReader;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;
    use std::time::SystemTime;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn head(target: &str, extra: &str) -> Request {
        let text = format!("GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        let mut reader = HeadReader::new(HandshakeLimits::default());
        reader.handle_bytes(text.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn valid_tokens_grant_their_claims() {
        let v = Verifier::hs256(SECRET);
        let token = hs(
            json!({"sub": "u1", "exp": now() + 60, "topics": ["chat:*"], "publish": ["chat:1"]}),
        );
        let grant = v.verify(&token).unwrap();
        assert_eq!(grant.sub.as_deref(), Some("u1"));
        assert!(grant.topics.allows("chat:7") && !grant.topics.allows("admin"));
        assert!(grant.publish.allows("chat:1") && !grant.publish.allows("chat:2"));
        assert!(grant.expires_at.is_some());
        let bare = v.verify(&hs(json!({"exp": now() + 60}))).unwrap();
        assert!(bare.topics.allows("any"), "no topics claim: every topic");
        assert!(!bare.publish.allows("any"), "no publish claim: none");
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let v = Verifier::hs256(SECRET);
        let cases = [
            (hs(json!({"exp": now() - 1})), "expired"),
            (
                hs(json!({"exp": now() + 60, "nbf": now() + 30})),
                "not valid yet",
            ),
            (hs(json!({"sub": "u1"})), "exp"),
            ("not.a.token".to_owned(), "malformed"),
            (
                encode(
                    &Header::new(Algorithm::HS256),
                    &json!({"exp": now() + 60}),
                    &EncodingKey::from_secret(b"another-secret-another-secret-00"),
                )
                .unwrap(),
                "bad signature",
            ),
            (hs(json!({"exp": now() + 60, "topics": "lobby"})), "JSON"),
        ];
        for (token, says) in cases {
            let err = v.verify(&token).unwrap_err().to_string();
            assert!(err.contains(says), "{says}: {err}");
            assert!(!err.contains(&token), "the reason never holds the token");
        }
    }

    #[test]
    fn es256_tokens_verify_with_the_public_key_and_not_as_hs256() {
        let pair = rcgen::KeyPair::generate().unwrap();
        let v = Verifier::public_key(&pair.public_key_pem()).unwrap();
        assert_eq!(v.algorithm(), Algorithm::ES256);
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let claims = json!({"sub": "u2", "exp": now() + 60});
        let token = encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap();
        assert_eq!(v.verify(&token).unwrap().sub.as_deref(), Some("u2"));
        // The classic confusion: an HS256 token "signed" with the public key.
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(pair.public_key_pem().as_bytes()),
        )
        .unwrap();
        assert!(
            v.verify(&forged)
                .unwrap_err()
                .to_string()
                .contains("algorithm")
        );
    }

    #[test]
    fn tokens_are_found_in_the_query_the_header_and_the_cookie() {
        let q = head("/ws/a?x=1&token=abc%2Edef", "");
        assert_eq!(find_token(&q, "").as_deref(), Some("abc.def"));
        let h = head("/ws/a", "Authorization: Bearer hdr\r\n");
        assert_eq!(find_token(&h, "").as_deref(), Some("hdr"));
        let c = head("/ws/a", "Cookie: theme=dark; jwt=ck; other=1\r\n");
        assert_eq!(find_token(&c, "jwt").as_deref(), Some("ck"));
        assert_eq!(
            find_token(&c, ""),
            None,
            "no cookie name: cookies are not read"
        );
        assert_eq!(find_token(&c, "session"), None);
        assert_eq!(find_token(&head("/ws/a?token=", ""), ""), None);
        let v = Verifier::hs256(SECRET);
        assert_eq!(v.check(&head("/ws/a", ""), "jwt"), Err(TokenError::Missing));
    }
}
