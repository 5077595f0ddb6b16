//! The server under test: a `ws://` or `wss://` URL, resolved once, and the source
//! addresses that spread many connections over loopback.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

use super::BenchError;

/// A WebSocket endpoint to load, parsed from a `ws://host[:port][/path][?query]` or
/// `wss://…` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// Whether the URL says `wss://`: TLS over TCP (`--tls` asks for it on a `ws://`
    /// URL too).
    pub tls: bool,
    /// The `Host` header: the URL's authority, `host[:port]`.
    pub host: String,
    /// The host alone, without port or IPv6 brackets: the TLS server name (sent as SNI
    /// and the name the certificate must carry; an IP address is allowed).
    pub server_name: String,
    /// The request target: path and query, at least `/`.
    pub path: String,
    /// The address connected to (the first the host resolves to, IPv4 preferred).
    pub addr: SocketAddr,
}

impl Target {
    /// Parses `url` and resolves its host. `ws://` defaults to port 80, `wss://` to
    /// port 443.
    pub fn resolve(url: &str) -> Result<Self, BenchError> {
        let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("ws://") {
            (rest, false, 80)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (rest, true, 443)
        } else {
            return Err(BenchError::Url(format!(
                "{url}: expected ws://host[:port][/path] or wss://host[:port][/path]"
            )));
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.is_empty() {
            return Err(BenchError::Url(format!("{url}: no host")));
        }
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        let (host, port) = split_host_port(authority, default_port)
            .ok_or_else(|| BenchError::Url(format!("{url}: bad host or port {authority:?}")))?;
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| BenchError::Url(format!("{url}: cannot resolve {host}: {e}")))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| BenchError::Url(format!("{url}: {host} has no address")))?;
        Ok(Self {
            url: url.to_owned(),
            tls,
            host: authority.to_owned(),
            server_name: host.to_owned(),
            path,
            addr,
        })
    }

    /// The local address connection `index` binds to before connecting, if any.
    ///
    /// One source address has about 28,000 ephemeral ports (`ip_local_port_range`),
    /// and each closed connection holds its port in TIME_WAIT for a minute, so runs of
    /// 10,000 connections exhaust them. When the server is on loopback (127.0.0.0/8,
    /// all of it local on Linux), connection `i` binds to `127.0.0.(2 + i % spread)`.
    /// `spread` 0 leaves the choice to the kernel.
    pub fn source_for(&self, index: usize, spread: u8) -> Option<IpAddr> {
        match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_loopback() && spread > 0 => {
                let spread = usize::from(spread.min(250));
                let last = 2 + (index % spread) as u8;
                Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
            }
            _ => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// Splits `host:port`, `[v6]:port` or `host` (`default_port`).
fn split_host_port(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => default_port,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host, port.parse().ok()?)),
        Some(_) => None,
        None => Some((authority, default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_path_and_query() {
        let t = Target::resolve("ws://127.0.0.1:9001/echo?x=1").unwrap();
        assert_eq!(t.host, "127.0.0.1:9001");
        assert_eq!(t.path, "/echo?x=1");
        assert_eq!(t.addr, "127.0.0.1:9001".parse().unwrap());
        let t = Target::resolve("ws://127.0.0.1:9001").unwrap();
        assert_eq!(t.path, "/");
        let t = Target::resolve("ws://127.0.0.1:9001?q").unwrap();
        assert_eq!(t.path, "/?q");
        let t = Target::resolve("ws://[::1]:9001/x").unwrap();
        assert_eq!(t.addr, "[::1]:9001".parse().unwrap());
        let t = Target::resolve("ws://127.0.0.1/").unwrap();
        assert_eq!(t.addr.port(), 80);
        assert!(!t.tls);
        assert_eq!(t.server_name, "127.0.0.1");
    }

    #[test]
    fn parses_wss_with_its_default_port_and_server_name() {
        let t = Target::resolve("wss://127.0.0.1/echo").unwrap();
        assert!(t.tls);
        assert_eq!(t.addr, "127.0.0.1:443".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1");
        assert_eq!(t.server_name, "127.0.0.1");
        assert_eq!(t.path, "/echo");
        let t = Target::resolve("wss://localhost:9443?x").unwrap();
        assert!(t.tls);
        assert_eq!(t.addr.port(), 9443);
        assert_eq!(t.host, "localhost:9443");
        assert_eq!(t.server_name, "localhost");
        assert_eq!(t.path, "/?x");
        let t = Target::resolve("wss://[::1]:9443/").unwrap();
        assert_eq!(t.server_name, "::1");
        assert_eq!(t.addr, "[::1]:9443".parse().unwrap());
        let t = Target::resolve("wss://[::1]/").unwrap();
        assert_eq!(t.addr.port(), 443);
    }

    #[test]
    fn refuses_other_schemes_and_bad_ports() {
        for url in [
            "https://127.0.0.1/",
            "http://127.0.0.1/",
            "wss://",
            "wss://127.0.0.1:x/",
            "wss://:443/",
            "ws://",
            "ws://127.0.0.1:x/",
            "ws://:80/",
        ] {
            assert!(Target::resolve(url).is_err(), "{url}");
        }
    }

    #[test]
    fn spreads_loopback_sources_only() {
        let t = Target::resolve("ws://127.0.0.1:9001/").unwrap();
        assert_eq!(t.source_for(0, 50), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(t.source_for(49, 50), Some("127.0.0.51".parse().unwrap()));
        assert_eq!(t.source_for(50, 50), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(t.source_for(7, 0), None);
        let t = Target::resolve("ws://[::1]:9001/").unwrap();
        assert_eq!(t.source_for(0, 50), None);
    }
}
