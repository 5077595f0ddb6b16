//! Path patterns with parameters: `/ws/{room}`, `/users/{id:u64}`.
//!
//! A parameter matches one non-empty path segment, percent-decoded. A type after a
//! colon (`u64`, `i64`, `u32`, `i32`, `f64`, `bool`) is checked by the router: a
//! segment that does not parse is answered with 400 before any handler runs (or any
//! upgrade happens), naming the parameter and the expected type.

use std::fmt;

/// A compiled path pattern.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    source: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Param { name: String, kind: ParamKind },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamKind {
    Str,
    U64,
    I64,
    U32,
    I32,
    F64,
    Bool,
}

impl ParamKind {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "" | "str" => Self::Str,
            "u64" => Self::U64,
            "i64" => Self::I64,
            "u32" => Self::U32,
            "i32" => Self::I32,
            "f64" => Self::F64,
            "bool" => Self::Bool,
            _ => return None,
        })
    }

    fn accepts(self, value: &str) -> bool {
        match self {
            Self::Str => true,
            Self::U64 => value.parse::<u64>().is_ok(),
            Self::I64 => value.parse::<i64>().is_ok(),
            Self::U32 => value.parse::<u32>().is_ok(),
            Self::I32 => value.parse::<i32>().is_ok(),
            Self::F64 => value.parse::<f64>().is_ok_and(f64::is_finite),
            Self::Bool => value.parse::<bool>().is_ok(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Str => "str",
            Self::U64 => "u64",
            Self::I64 => "i64",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::F64 => "f64",
            Self::Bool => "bool",
        }
    }
}

/// A path parameter that did not parse as its declared type (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// The parameter's name.
    pub name: String,
    /// The declared type.
    pub expected: &'static str,
    /// The value received.
    pub value: String,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "path parameter {:?}: expected {}, got {:?}",
            self.name, self.expected, self.value
        )
    }
}

impl std::error::Error for ParamError {}

/// How a path compares with a pattern.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Match {
    /// It matches, with these parameters.
    Yes(Vec<(String, String)>),
    /// It has the pattern's shape but a typed parameter does not parse.
    BadParam(ParamError),
    /// It does not match.
    No,
}

/// The parameter types a route pattern may declare after a colon.
pub const PARAM_TYPES: [&str; 7] = ["str", "u64", "i64", "u32", "i32", "f64", "bool"];

/// A route pattern that cannot be compiled (a programmer's mistake, reported by
/// [`App::check`](super::App::check) and when the server starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError {
    /// The pattern as written.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "route pattern {:?}: {}", self.pattern, self.reason)
    }
}

impl std::error::Error for RouteError {}

impl Pattern {
    /// Compiles `source`: literal segments and `{name}` or `{name:type}` parameters,
    /// `type` one of [`PARAM_TYPES`].
    pub(crate) fn parse(source: &str) -> Result<Self, RouteError> {
        let error = |reason: String| RouteError {
            pattern: source.to_owned(),
            reason,
        };
        if !source.starts_with('/') {
            return Err(error("must start with '/'".into()));
        }
        let mut segments = Vec::new();
        for seg in split(source) {
            let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) else {
                if seg.contains(['{', '}']) {
                    return Err(error(format!(
                        "segment {seg:?}: a parameter is a whole segment, written {{name}} or \
                         {{name:type}}"
                    )));
                }
                segments.push(Segment::Literal(seg.to_owned()));
                continue;
            };
            let (name, kind) = inner.split_once(':').unwrap_or((inner, ""));
            let kind = ParamKind::parse(kind).ok_or_else(|| {
                error(format!(
                    "unknown parameter type {kind:?} for {{{name}}} (supported: {})",
                    PARAM_TYPES.join(", ")
                ))
            })?;
            if name.is_empty() || name.contains(['{', '}']) {
                return Err(error(format!(
                    "segment {seg:?}: empty or invalid parameter name"
                )));
            }
            let taken = segments
                .iter()
                .any(|s| matches!(s, Segment::Param { name: n, .. } if n == name));
            if taken {
                return Err(error(format!("parameter {{{name}}} appears twice")));
            }
            segments.push(Segment::Param {
                name: name.to_owned(),
                kind,
            });
        }
        Ok(Self {
            source: source.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Compares `path` (without the query) with this pattern.
    pub(crate) fn matches(&self, path: &str) -> Match {
        let mut params = Vec::new();
        let mut bad = None;
        let mut parts = split(path);
        for segment in &self.segments {
            let Some(part) = parts.next() else {
                return Match::No;
            };
            match segment {
                Segment::Literal(lit) => {
                    if lit != part {
                        return Match::No;
                    }
                }
                Segment::Param { name, kind } => {
                    let value = percent_decode(part);
                    if value.is_empty() {
                        return Match::No;
                    }
                    if bad.is_none() && !kind.accepts(&value) {
                        bad = Some(ParamError {
                            name: name.clone(),
                            expected: kind.name(),
                            value: value.clone(),
                        });
                    }
                    params.push((name.clone(), value));
                }
            }
        }
        if parts.next().is_some() {
            return Match::No;
        }
        match bad {
            Some(error) => Match::BadParam(error),
            None => Match::Yes(params),
        }
    }
}

/// Path segments; a trailing slash is ignored, `/` has none.
fn split(path: &str) -> impl Iterator<Item = &str> {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
}

/// Decodes `%XX` escapes; invalid escapes and invalid UTF-8 are kept as they are.
fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Pattern {
        fn new(source: &str) -> Self {
            Self::parse(source).unwrap()
        }
    }

    /// A mistake in a pattern is an error that says what is wrong and, for a type,
    /// lists the supported ones; it never panics.
    #[test]
    fn bad_patterns_are_errors_naming_the_fix() {
        let err = Pattern::parse("/u/{id:usize}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "route pattern \"/u/{id:usize}\": unknown parameter type \"usize\" for {id} \
             (supported: str, u64, i64, u32, i32, f64, bool)"
        );
        for (pattern, says) in [
            ("ws/{room}", "must start with '/'"),
            ("/ws/{}", "empty or invalid parameter name"),
            ("/ws/room-{id}", "a parameter is a whole segment"),
            ("/ws/{id", "a parameter is a whole segment"),
            ("/a/{id}/b/{id}", "appears twice"),
        ] {
            let err = Pattern::parse(pattern).unwrap_err().to_string();
            assert!(err.contains(says), "{pattern}: {err}");
        }
        for ty in PARAM_TYPES {
            assert!(Pattern::parse(&format!("/x/{{v:{ty}}}")).is_ok(), "{ty}");
        }
    }

    #[test]
    fn literal_and_param_segments_match() {
        let p = Pattern::new("/ws/{room}");
        assert_eq!(
            p.matches("/ws/lobby"),
            Match::Yes(vec![("room".into(), "lobby".into())])
        );
        assert_eq!(
            p.matches("/ws/lobby/"),
            Match::Yes(vec![("room".into(), "lobby".into())])
        );
        assert_eq!(p.matches("/ws"), Match::No);
        assert_eq!(p.matches("/ws/a/b"), Match::No);
        assert_eq!(p.matches("/other/a"), Match::No);
        assert_eq!(Pattern::new("/").matches("/"), Match::Yes(vec![]));
    }

    #[test]
    fn typed_params_are_checked() {
        let p = Pattern::new("/users/{id:u64}");
        assert_eq!(
            p.matches("/users/42"),
            Match::Yes(vec![("id".into(), "42".into())])
        );
        let Match::BadParam(e) = p.matches("/users/abc") else {
            panic!("expected BadParam")
        };
        assert_eq!(
            e.to_string(),
            "path parameter \"id\": expected u64, got \"abc\""
        );
    }

    #[test]
    fn params_are_percent_decoded() {
        let p = Pattern::new("/ws/{room}");
        assert_eq!(
            p.matches("/ws/caf%C3%A9"),
            Match::Yes(vec![("room".into(), "café".into())])
        );
        assert_eq!(
            p.matches("/ws/100%"),
            Match::Yes(vec![("room".into(), "100%".into())])
        );
        assert_eq!(
            p.matches("/ws/%zz"),
            Match::Yes(vec![("room".into(), "%zz".into())])
        );
    }
}
