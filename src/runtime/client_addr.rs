//! The client's address: the TCP peer, the PROXY protocol header's source (read by the
//! connection driver), or what a trusted proxy's `Forwarded` / `X-Forwarded-For`
//! header names ([`forwarded_client`], pure).

use std::net::{IpAddr, SocketAddr};

use crate::config::parse_cidr;
use crate::proto::Request;

/// A list of CIDRs (`trusted_proxies`, `ip_limits_exempt`), parsed once.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cidrs(Vec<(IpAddr, u8)>);

impl Cidrs {
    /// The CIDRs of `list`; entries that do not parse (the configuration validates
    /// them) are left out.
    pub(crate) fn parse(list: &[String]) -> Self {
        Self(list.iter().filter_map(|c| parse_cidr(c).ok()).collect())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `ip` is in one of the CIDRs (an IPv4-mapped IPv6 address counts as IPv4).
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0
            .iter()
            .any(|&(net, len)| in_prefix(ip, net.to_canonical(), len))
    }
}

fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// A peer address as the rest of the server sees it: an IPv4-mapped IPv6 address (a
/// dual-stack listener's IPv4 client) as the IPv4 address.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// One hop of a forwarding chain.
#[derive(Debug, PartialEq)]
enum Hop {
    Addr(SocketAddr),
    /// `unknown`, an obfuscated identifier (`_hidden`), or a value that does not parse.
    Opaque,
}

/// The client `request` was forwarded for, when `peer` is a trusted proxy: from the
/// `Forwarded` header (RFC 7239, `for=`) if there is one, else `X-Forwarded-For`.
/// The chain is walked from the right (the hop nearest to us) and the first address
/// that is not itself a trusted proxy is the client. A hop that names no address
/// (`unknown`, an obfuscated id) ends the walk: the client is then the last trusted
/// hop, as it is when every hop is trusted. `None`: the peer is not trusted, or it sent
/// no such header; the peer is the client. An address without a port gets port 0.
pub(crate) fn forwarded_client(
    peer: IpAddr,
    request: &Request,
    trusted: &Cidrs,
) -> Option<SocketAddr> {
    if trusted.is_empty() || !trusted.contains(peer) {
        return None;
    }
    let mut hops = Vec::new();
    for value in request.header_all("forwarded") {
        forwarded_hops(value, &mut hops);
    }
    if hops.is_empty() {
        for value in request.header_all("x-forwarded-for") {
            for item in value.split(|&b| b == b',') {
                let item = String::from_utf8_lossy(item);
                let item = item.trim();
                if !item.is_empty() {
                    hops.push(node(item));
                }
            }
        }
    }
    let mut client = None;
    for hop in hops.iter().rev() {
        match hop {
            Hop::Addr(addr) if trusted.contains(addr.ip()) => client = Some(*addr),
            Hop::Addr(addr) => return Some(*addr),
            Hop::Opaque => break,
        }
    }
    client
}

/// The `for=` of each element of one `Forwarded` value (an element without one is an
/// opaque hop).
fn forwarded_hops(value: &[u8], hops: &mut Vec<Hop>) {
    let value = String::from_utf8_lossy(value);
    for element in split_unquoted(&value, ',') {
        if element.trim().is_empty() {
            continue;
        }
        let mut hop = Hop::Opaque;
        for pair in split_unquoted(element, ';') {
            let Some((name, v)) = pair.split_once('=') else {
                continue;
            };
            if name.trim().eq_ignore_ascii_case("for") {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                hop = node(v);
            }
        }
        hops.push(hop);
    }
}

/// Splits `text` at `sep` outside double quotes.
fn split_unquoted(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// A node: `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]:4711`, `[2001:db8::1]`,
/// `2001:db8::1` (X-Forwarded-For); anything else is opaque.
fn node(text: &str) -> Hop {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Hop::Addr(canonical(addr));
    }
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    match bare.parse::<IpAddr>() {
        Ok(ip) => Hop::Addr(SocketAddr::new(ip.to_canonical(), 0)),
        // `[v6]:obfport` or `v4:obfport`: the address, port unknown.
        Err(_) => match text.rsplit_once(':') {
            Some((host, port)) if port.starts_with('_') => {
                let host = host
                    .strip_prefix('[')
                    .and_then(|t| t.strip_suffix(']'))
                    .unwrap_or(host);
                host.parse::<IpAddr>()
                    .map(|ip| Hop::Addr(SocketAddr::new(ip.to_canonical(), 0)))
                    .unwrap_or(Hop::Opaque)
            }
            _ => Hop::Opaque,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::proto::HandshakeLimits;
    use crate::proto::handshake::{HeadReader, Request};

    fn request(headers: &[(&str, &str)]) -> Request {
        let mut head = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut reader = HeadReader::new(HandshakeLimits::default());
        reader.handle_bytes(head.as_bytes()).unwrap().unwrap().0
    }

    fn cidrs(list: &[&str]) -> Cidrs {
        Cidrs::parse(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn client(peer: &str, headers: &[(&str, &str)], trusted: &[&str]) -> Option<String> {
        forwarded_client(ip(peer), &request(headers), &cidrs(trusted)).map(|a| a.to_string())
    }

    #[test]
    fn cidrs_match_by_prefix_and_treat_mapped_ipv4_as_ipv4() {
        let c = cidrs(&["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "0.0.0.0/0"]);
        assert!(c.contains(ip("10.255.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(c.contains(ip("2001:db8:1::1")));
        assert!(!c.contains(ip("2001:db9::1")));
        let c = cidrs(&["192.0.2.7"]);
        assert!(c.contains(ip("192.0.2.7")) && !c.contains(ip("192.0.2.8")));
        assert!(cidrs(&["::/0"]).contains(ip("::1")));
        assert!(!cidrs(&["::/0"]).contains(ip("1.2.3.4")));
    }

    #[test]
    fn an_untrusted_peer_s_headers_are_ignored() {
        let spoof = [
            ("X-Forwarded-For", "203.0.113.9"),
            ("Forwarded", "for=203.0.113.9"),
        ];
        assert_eq!(client("192.0.2.1", &spoof, &["10.0.0.0/8"]), None);
        assert_eq!(client("192.0.2.1", &spoof, &[]), None);
    }

    #[test]
    fn x_forwarded_for_gives_the_rightmost_untrusted_address() {
        let trusted = ["10.0.0.0/8"];
        let xff = |v| [("X-Forwarded-For", v)];
        assert_eq!(
            client("10.0.0.1", &xff("203.0.113.9"), &trusted).unwrap(),
            "203.0.113.9:0"
        );
        // The client's own (spoofable) entries on the left are not taken.
        assert_eq!(
            client("10.0.0.1", &xff("1.1.1.1, 203.0.113.9, 10.0.0.2"), &trusted).unwrap(),
            "203.0.113.9:0"
        );
        // Several headers are one list, in order.
        let two = [
            ("X-Forwarded-For", "1.1.1.1"),
            ("X-Forwarded-For", "198.51.100.4"),
        ];
        assert_eq!(
            client("10.0.0.1", &two, &trusted).unwrap(),
            "198.51.100.4:0"
        );
        assert_eq!(
            client("10.0.0.1", &xff("2001:db8::5"), &trusted).unwrap(),
            "[2001:db8::5]:0"
        );
        // Every hop trusted: the farthest one.
        assert_eq!(
            client("10.0.0.1", &xff("10.0.0.3, 10.0.0.2"), &trusted).unwrap(),
            "10.0.0.3:0"
        );
        // Garbage ends the walk at the last trusted hop.
        assert_eq!(
            client("10.0.0.1", &xff("1.1.1.1, junk, 10.0.0.2"), &trusted).unwrap(),
            "10.0.0.2:0"
        );
        assert_eq!(client("10.0.0.1", &xff("junk"), &trusted), None);
        // No header: the peer.
        assert_eq!(client("10.0.0.1", &[], &trusted), None);
    }

    #[test]
    fn forwarded_for_is_parsed_per_rfc_7239() {
        let trusted = ["10.0.0.0/8"];
        let fwd = |v| [("Forwarded", v)];
        assert_eq!(
            client(
                "10.0.0.1",
                &fwd("for=192.0.2.60;proto=http;by=203.0.113.43"),
                &trusted
            )
            .unwrap(),
            "192.0.2.60:0"
        );
        assert_eq!(
            client(
                "10.0.0.1",
                &fwd("For=\"[2001:db8:cafe::17]:4711\""),
                &trusted
            )
            .unwrap(),
            "[2001:db8:cafe::17]:4711"
        );
        assert_eq!(
            client(
                "10.0.0.1",
                &fwd("for=192.0.2.43, for=198.51.100.17;by=10.0.0.2, for=10.0.0.2"),
                &trusted
            )
            .unwrap(),
            "198.51.100.17:0"
        );
        assert_eq!(
            client("10.0.0.1", &fwd("for=\"192.0.2.43:_port\""), &trusted).unwrap(),
            "192.0.2.43:0"
        );
        // Obfuscated or unknown: not an address; the walk ends at the last trusted hop.
        assert_eq!(client("10.0.0.1", &fwd("for=_hidden"), &trusted), None);
        assert_eq!(
            client(
                "10.0.0.1",
                &fwd("for=1.1.1.1, for=unknown, for=10.0.0.9"),
                &trusted
            )
            .unwrap(),
            "10.0.0.9:0"
        );
        // A quoted comma does not split the element.
        assert_eq!(
            client("10.0.0.1", &fwd("for=198.51.100.1;x=\"a,b\""), &trusted).unwrap(),
            "198.51.100.1:0"
        );
        // Forwarded wins over X-Forwarded-For.
        let both = [
            ("X-Forwarded-For", "1.1.1.1"),
            ("Forwarded", "for=198.51.100.2"),
        ];
        assert_eq!(
            client("10.0.0.1", &both, &trusted).unwrap(),
            "198.51.100.2:0"
        );
    }
}
