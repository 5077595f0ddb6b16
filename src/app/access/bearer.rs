//! Bearer tokens (`Authorization: Bearer …`) for the publish API and `/metrics`,
//! compared in constant time.

use subtle::ConstantTimeEq;

use crate::proto::handshake::Request;

/// The token of an `Authorization: Bearer <token>` header (the scheme's case does not
/// matter), if the request has one.
pub(crate) fn bearer(head: &Request) -> Option<&str> {
    let value = head.header_str("authorization")?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A set of accepted tokens.
#[derive(Clone, Default)]
pub(crate) struct Tokens(Vec<Box<[u8]>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} set, values hidden)", self.0.len())
    }
}

/// Why a request's token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No `Authorization: Bearer` header: 401.
    Missing,
    /// A token that is not one of ours: 403.
    Wrong,
}

impl Tokens {
    pub(crate) fn new(tokens: impl IntoIterator<Item = String>) -> Self {
        Self(
            tokens
                .into_iter()
                .filter(|t| !t.is_empty())
                .map(|t| t.into_bytes().into_boxed_slice())
                .collect(),
        )
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `given` is one of the tokens. Every token is compared, each in time
    /// that depends on its length only, so the time taken says nothing about how much
    /// of `given` was right (only, at most, whether its length is one of ours).
    pub(crate) fn contains(&self, given: &str) -> bool {
        let given = given.as_bytes();
        let mut found = subtle::Choice::from(0);
        for token in &self.0 {
            found |= token.as_ref().ct_eq(given);
        }
        found.into()
    }

    /// Checks the request's bearer token.
    pub(crate) fn check(&self, head: &Request) -> Result<(), Refused> {
        match bearer(head) {
            None => Err(Refused::Missing),
            Some(token) if self.contains(token) => Ok(()),
            Some(_) => Err(Refused::Wrong),
        }
    }
}

/// Reads a token file: one token per line; blank lines and lines starting with `#`
/// are skipped. The error names the file, never a token.
pub(crate) fn read_token_file(path: &str) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        return Err(format!("{path} holds no token (one per line)"));
    }
    if let Some(line) = tokens.iter().position(|t| t.len() < 16) {
        return Err(format!(
            "{path}: token {} is shorter than 16 characters",
            line + 1
        ));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::HandshakeLimits;
    use crate::proto::handshake::HeadReader;

    fn head(authorization: Option<&str>) -> Request {
        let mut text = String::from("POST /publish/x HTTP/1.1\r\nHost: x\r\n");
        if let Some(a) = authorization {
            text.push_str(&format!("Authorization: {a}\r\n"));
        }
        text.push_str("\r\n");
        let mut reader = HeadReader::new(HandshakeLimits::default());
        reader.handle_bytes(text.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        assert_eq!(bearer(&head(Some("Bearer abc"))), Some("abc"));
        assert_eq!(bearer(&head(Some("bearer   abc  "))), Some("abc"));
        assert_eq!(bearer(&head(Some("Basic abc"))), None);
        assert_eq!(bearer(&head(Some("Bearer"))), None);
        assert_eq!(bearer(&head(None)), None);
    }

    #[test]
    fn only_a_listed_token_passes() {
        let tokens = Tokens::new(["0123456789abcdef".to_owned(), "fedcba9876543210".to_owned()]);
        assert_eq!(tokens.check(&head(Some("Bearer 0123456789abcdef"))), Ok(()));
        assert_eq!(tokens.check(&head(Some("Bearer fedcba9876543210"))), Ok(()));
        assert_eq!(
            tokens.check(&head(Some("Bearer 0123456789abcdeX"))),
            Err(Refused::Wrong)
        );
        assert_eq!(
            tokens.check(&head(Some("Bearer 0123456789abcdef0"))),
            Err(Refused::Wrong),
            "a longer token with ours as its prefix"
        );
        assert_eq!(
            tokens.check(&head(Some("Bearer 0123"))),
            Err(Refused::Wrong)
        );
        assert_eq!(tokens.check(&head(None)), Err(Refused::Missing));
        assert!(!format!("{tokens:?}").contains("0123"), "Debug hides them");
    }

    #[test]
    fn token_files_skip_comments_and_refuse_short_tokens() {
        let dir = std::env::temp_dir().join(format!("rs-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "# ci\n0123456789abcdef\n\n  fedcba9876543210  \n").unwrap();
        assert_eq!(
            read_token_file(good.to_str().unwrap()).unwrap(),
            ["0123456789abcdef", "fedcba9876543210"]
        );
        let short = dir.join("short");
        std::fs::write(&short, "0123456789abcdef\nshort-secret\n").unwrap();
        let err = read_token_file(short.to_str().unwrap()).unwrap_err();
        assert!(err.contains("token 2 is shorter"), "{err}");
        assert!(!err.contains("short-secret"), "never the token: {err}");
        let err = read_token_file(dir.join("missing").to_str().unwrap()).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
