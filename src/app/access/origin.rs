//! `allowed_origins`: which web pages may open a WebSocket (cross-site WebSocket
//! hijacking is a page on another site opening one with the user's cookies).

/// One entry of `allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// `https://app.example.com`: this origin exactly (ASCII case aside).
    Exact(String),
    /// `https://*.example.com` (`scheme` set) or `*.example.com` (any scheme): a
    /// subdomain of `suffix`, any depth, with the port written after it if any. The
    /// apex (`https://example.com`) needs an entry of its own.
    Subdomains {
        scheme: Option<String>,
        /// `.example.com`, with its leading dot.
        suffix: String,
    },
}

/// The compiled `allowed_origins`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origins(Vec<Entry>);

impl Origins {
    /// Compiles the entries (checked by the configuration already).
    pub(crate) fn new(entries: &[String]) -> Self {
        Self(
            entries
                .iter()
                .map(|entry| {
                    let entry = entry.trim().trim_end_matches('/').to_ascii_lowercase();
                    let (scheme, host) = match entry.split_once("://") {
                        Some((scheme, host)) => (Some(scheme.to_owned()), host.to_owned()),
                        None => (None, entry.clone()),
                    };
                    match host.strip_prefix('*') {
                        Some(suffix) => Entry::Subdomains {
                            scheme,
                            suffix: suffix.to_owned(),
                        },
                        None => Entry::Exact(entry),
                    }
                })
                .collect(),
        )
    }

    /// Whether any origin is allowed (the list is empty).
    pub(crate) fn any(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a handshake whose `Origin` header is `origin` may go on. No header
    /// (`None`: not a browser, which could send any header anyway) is allowed.
    pub(crate) fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        if self.any() {
            return true;
        }
        let origin = origin.trim().to_ascii_lowercase();
        let (scheme, host) = origin.split_once("://").unwrap_or(("", &origin));
        self.0.iter().any(|entry| match entry {
            Entry::Exact(exact) => *exact == origin,
            Entry::Subdomains {
                scheme: want,
                suffix,
            } => {
                want.as_deref().is_none_or(|want| want == scheme)
                    && host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && !host[..host.len() - suffix.len()].contains(['/', ':', '@'])
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(entries: &[&str]) -> Origins {
        Origins::new(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn an_empty_list_allows_every_origin() {
        let any = origins(&[]);
        assert!(any.allows(Some("https://evil.example")));
        assert!(any.allows(None));
    }

    #[test]
    fn exact_origins_match_scheme_host_and_port() {
        let o = origins(&["https://app.example.com", "http://localhost:3000"]);
        assert!(o.allows(Some("https://app.example.com")));
        assert!(o.allows(Some("HTTPS://App.Example.com")));
        assert!(o.allows(Some("http://localhost:3000")));
        assert!(!o.allows(Some("http://app.example.com")), "another scheme");
        assert!(
            !o.allows(Some("https://app.example.com:8443")),
            "another port"
        );
        assert!(!o.allows(Some("http://localhost:3001")));
        assert!(!o.allows(Some("https://app.example.com.evil.io")));
        assert!(!o.allows(Some("null")), "sandboxed pages send null");
        assert!(o.allows(None), "no Origin: not a browser");
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let o = origins(&["https://*.example.com"]);
        assert!(o.allows(Some("https://a.example.com")));
        assert!(o.allows(Some("https://a.b.example.com")));
        assert!(
            !o.allows(Some("https://example.com")),
            "the apex needs its own entry"
        );
        assert!(
            !o.allows(Some("http://a.example.com")),
            "the scheme is part of it"
        );
        assert!(!o.allows(Some("https://evilexample.com")));
        assert!(!o.allows(Some("https://a.example.com.evil.io")));
        assert!(!o.allows(Some("https://a.example.com:444")));
        let any_scheme = origins(&["*.example.com"]);
        assert!(any_scheme.allows(Some("http://a.example.com")));
        assert!(any_scheme.allows(Some("https://a.example.com")));
        assert!(!any_scheme.allows(Some("https://example.org")));
        let with_port = origins(&["https://*.example.com:8443"]);
        assert!(with_port.allows(Some("https://a.example.com:8443")));
        assert!(!with_port.allows(Some("https://a.example.com")));
    }
}
