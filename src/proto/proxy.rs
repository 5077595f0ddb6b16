//! The PROXY protocol (HAProxy, versions 1 and 2): the header a load balancer writes at
//! the start of a connection to name the client it relays.
//!
//! Sans-IO: [`parse`] takes the bytes received so far and answers `Ok(None)` while more
//! are needed, `Ok(Some((header, consumed)))` once the header is complete (the bytes
//! after `consumed` belong to the protocol that follows, e.g. TLS or HTTP), or the
//! error that names what is wrong. While it answers `Ok(None)`, every byte given so far
//! is part of the header, and [`needed`] says how many more bytes the header takes at
//! least, so a caller can read no further than the header (and leave what follows in
//! the socket).
//!
//! Call order: `parse(&buf)`; on `Ok(None)` read at most `needed(&buf)` more bytes,
//! append them, and `parse` again.
//!
//! Version 1 is a text line, `PROXY TCP4|TCP6 src dst sport dport\r\n` or
//! `PROXY UNKNOWN …\r\n`, at most 107 bytes. Version 2 is binary: the 12-byte
//! signature, a version/command byte (`0x20` LOCAL, `0x21` PROXY), a family/protocol
//! byte, a big-endian length, then the addresses and TLVs (skipped).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The signature that starts a version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 header, CRLF included.
pub const V1_MAX_LEN: usize = 107;
/// The longest version 2 payload (addresses and TLVs) accepted. Load balancers send
/// tens of bytes of TLVs (AWS NLB: the VPC endpoint, GCP: the PSC connection); a
/// longer header is refused rather than buffered.
pub const V2_MAX_PAYLOAD: usize = 1024;
/// The longest header accepted, of either version.
pub const MAX_HEADER_LEN: usize = 16 + V2_MAX_PAYLOAD;

const V1_PREFIX: &[u8] = b"PROXY ";
/// The shortest version 1 header: `PROXY UNKNOWN\r\n`.
const V1_MIN_LEN: usize = 15;

/// The protocol version of a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// The addresses of a relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyAddresses {
    /// The client.
    pub source: SocketAddr,
    /// The address the client connected to (the proxy's).
    pub destination: SocketAddr,
}

/// A complete PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: ProxyVersion,
    /// The relayed connection's addresses; `None` for a v2 LOCAL command (the proxy's
    /// own connection, e.g. a health check), v1 `UNKNOWN`, a v2 `UNSPEC` family or a
    /// family that is not TCP over IP (UNIX, UDP): the socket's peer address stands.
    pub addresses: Option<ProxyAddresses>,
}

/// Why a PROXY header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// The bytes start neither with `PROXY ` nor with the v2 signature.
    BadSignature,
    /// A v1 line with no CRLF within 107 bytes.
    V1TooLong,
    /// A v1 line that is not `PROXY TCP4|TCP6|UNKNOWN …`: which part is wrong.
    V1Malformed(&'static str),
    /// A v2 version nibble other than 2 (the byte).
    V2BadVersion(u8),
    /// A v2 command other than LOCAL (0) or PROXY (1) (the byte).
    V2BadCommand(u8),
    /// A v2 address family or transport protocol outside the spec (the byte).
    V2BadFamily(u8),
    /// A v2 payload longer than [`V2_MAX_PAYLOAD`] (the length announced).
    V2TooLong(usize),
    /// A v2 payload shorter than its family's addresses (the length announced).
    V2TooShort(usize),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadSignature => write!(f, "no PROXY protocol header (bad signature)"),
            Self::V1TooLong => write!(f, "PROXY v1 header without CRLF within 107 bytes"),
            Self::V1Malformed(what) => write!(f, "malformed PROXY v1 header: {what}"),
            Self::V2BadVersion(b) => write!(f, "PROXY v2 header of version {:#x}", b >> 4),
            Self::V2BadCommand(b) => write!(f, "PROXY v2 header with command {:#x}", b & 0xf),
            Self::V2BadFamily(b) => write!(f, "PROXY v2 header with family/protocol {b:#04x}"),
            Self::V2TooLong(len) => write!(
                f,
                "PROXY v2 header of {len} bytes (at most {V2_MAX_PAYLOAD} accepted)"
            ),
            Self::V2TooShort(len) => {
                write!(
                    f,
                    "PROXY v2 header of {len} bytes, shorter than its addresses"
                )
            }
        }
    }
}

impl std::error::Error for ProxyError {}

/// Parses the PROXY header at the start of `bytes`: `Ok(None)` while incomplete,
/// else the header and the number of bytes it takes.
pub fn parse(bytes: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let n = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..n] == V2_SIGNATURE[..n] {
        return parse_v2(bytes);
    }
    let n = bytes.len().min(V1_PREFIX.len());
    if bytes[..n] == V1_PREFIX[..n] {
        return parse_v1(bytes);
    }
    Err(ProxyError::BadSignature)
}

/// After [`parse`] answered `Ok(None)` for `bytes`: how many more bytes the header
/// takes at least (1 or more). Reading no more than this never reads past the header.
pub fn needed(bytes: &[u8]) -> usize {
    let n = bytes.len().min(V2_SIGNATURE.len());
    let v2 = bytes[..n] == V2_SIGNATURE[..n];
    let n = bytes.len().min(V1_PREFIX.len());
    let v1 = bytes[..n] == V1_PREFIX[..n];
    let v2_needed = || {
        if bytes.len() < 16 {
            16 - bytes.len()
        } else {
            (16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]])))
                .saturating_sub(bytes.len())
        }
    };
    let v1_needed = || {
        let end = if bytes.last() == Some(&b'\r') { 1 } else { 2 };
        V1_MIN_LEN.saturating_sub(bytes.len()).max(end)
    };
    let needed = match (v1, v2) {
        // Only the empty input is both.
        (true, true) => v1_needed().min(v2_needed()),
        (false, true) => v2_needed(),
        (true, false) => v1_needed(),
        (false, false) => 1,
    };
    needed.max(1)
}

fn parse_v1(bytes: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let window = &bytes[..bytes.len().min(V1_MAX_LEN)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if bytes.len() >= V1_MAX_LEN {
            return Err(ProxyError::V1TooLong);
        }
        if let Some(cr) = window.iter().position(|&b| b == b'\r') {
            if cr + 1 < window.len() {
                return Err(ProxyError::V1Malformed("CR not followed by LF"));
            }
        }
        return Ok(None);
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(ProxyError::V1Malformed("LF not preceded by CR"));
    }
    let line = &window[..lf - 1];
    if line.contains(&b'\r') {
        return Err(ProxyError::V1Malformed("CR not followed by LF"));
    }
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1Malformed("not ASCII"))?;
    let mut fields = line.split(' ');
    if fields.next() != Some("PROXY") {
        return Err(ProxyError::V1Malformed("does not start with PROXY"));
    }
    let addresses = match fields.next() {
        // Anything may follow UNKNOWN, up to the CRLF.
        Some("UNKNOWN") => None,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let v4 = proto == "TCP4";
            let mut next = || {
                fields
                    .next()
                    .ok_or(ProxyError::V1Malformed("too few fields"))
            };
            let src = v1_ip(next()?, v4)?;
            let dst = v1_ip(next()?, v4)?;
            let sport = v1_port(next()?)?;
            let dport = v1_port(next()?)?;
            if fields.next().is_some() {
                return Err(ProxyError::V1Malformed("too many fields"));
            }
            Some(ProxyAddresses {
                source: SocketAddr::new(src, sport),
                destination: SocketAddr::new(dst, dport),
            })
        }
        _ => {
            return Err(ProxyError::V1Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ));
        }
    };
    let header = ProxyHeader {
        version: ProxyVersion::V1,
        addresses,
    };
    Ok(Some((header, lf + 1)))
}

fn v1_ip(text: &str, v4: bool) -> Result<IpAddr, ProxyError> {
    if v4 {
        text.parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| ProxyError::V1Malformed("bad IPv4 address"))
    } else {
        text.parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| ProxyError::V1Malformed("bad IPv6 address"))
    }
}

fn v1_port(text: &str) -> Result<u16, ProxyError> {
    // Digits only (`u16::from_str` takes a leading `+`), no leading zero.
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return Err(ProxyError::V1Malformed("bad port"));
    }
    text.parse()
        .map_err(|_| ProxyError::V1Malformed("port out of range"))
}

fn parse_v2(bytes: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if let Some(&ver_cmd) = bytes.get(12) {
        if ver_cmd >> 4 != 2 {
            return Err(ProxyError::V2BadVersion(ver_cmd));
        }
        if ver_cmd & 0xf > 1 {
            return Err(ProxyError::V2BadCommand(ver_cmd));
        }
    }
    if let Some(&family) = bytes.get(13) {
        if family >> 4 > 3 || family & 0xf > 2 {
            return Err(ProxyError::V2BadFamily(family));
        }
    }
    if bytes.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, family) = (bytes[12], bytes[13]);
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if len > V2_MAX_PAYLOAD {
        return Err(ProxyError::V2TooLong(len));
    }
    // The addresses each family needs, checked before the payload is in.
    let need = match family >> 4 {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if len < need {
        return Err(ProxyError::V2TooShort(len));
    }
    let Some(payload) = bytes.get(16..16 + len) else {
        return Ok(None);
    };
    let local = ver_cmd & 0xf == 0;
    let stream = family & 0xf == 1;
    let addresses = match family >> 4 {
        _ if local || !stream => None,
        1 => {
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    payload[at],
                    payload[at + 1],
                    payload[at + 2],
                    payload[at + 3],
                ))
            };
            let port = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
            Some(ProxyAddresses {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            })
        }
        2 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&payload[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
            Some(ProxyAddresses {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            })
        }
        // UNSPEC or UNIX: no IP address to take.
        _ => None,
    };
    let header = ProxyHeader {
        version: ProxyVersion::V2,
        addresses,
    };
    Ok(Some((header, 16 + len)))
}

/// A version 1 header for `addresses` (`None`: `PROXY UNKNOWN`). Both addresses
/// must be of the same family.
pub fn encode_v1(addresses: Option<&ProxyAddresses>) -> Vec<u8> {
    match addresses {
        None => b"PROXY UNKNOWN\r\n".to_vec(),
        Some(a) => {
            let proto = if a.source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {proto} {} {} {} {}\r\n",
                a.source.ip(),
                a.destination.ip(),
                a.source.port(),
                a.destination.port()
            )
            .into_bytes()
        }
    }
}

/// A version 2 header: PROXY over TCP for `addresses` (same family), or LOCAL for
/// `None`, followed by `tlvs` (raw TLV bytes, skipped by the parser).
pub fn encode_v2(addresses: Option<&ProxyAddresses>, tlvs: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    let mut payload = Vec::new();
    match addresses {
        None => out.extend_from_slice(&[0x20, 0x00]),
        Some(a) => {
            match (a.source.ip(), a.destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.extend_from_slice(&[0x21, 0x11]);
                    payload.extend_from_slice(&s.octets());
                    payload.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.extend_from_slice(&[0x21, 0x21]);
                    payload.extend_from_slice(&v6(s).octets());
                    payload.extend_from_slice(&v6(d).octets());
                }
            }
            payload.extend_from_slice(&a.source.port().to_be_bytes());
            payload.extend_from_slice(&a.destination.port().to_be_bytes());
        }
    }
    payload.extend_from_slice(tlvs);
    let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addrs(source: &str, destination: &str) -> ProxyAddresses {
        ProxyAddresses {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    fn complete(bytes: &[u8]) -> (ProxyHeader, usize) {
        parse(bytes).unwrap().unwrap()
    }

    /// Every strict prefix of a header is incomplete, and `needed` never reaches past it.
    fn check_prefixes(header: &[u8]) {
        for len in 0..header.len() {
            assert_eq!(parse(&header[..len]), Ok(None), "prefix of {len} bytes");
            let needed = needed(&header[..len]);
            assert!(
                needed >= 1 && len + needed <= header.len(),
                "needed {needed} at {len}"
            );
        }
    }

    #[test]
    fn v1_tcp4() {
        let bytes = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
        let (header, used) = complete(bytes);
        assert_eq!(used, 45);
        assert_eq!(header.version, ProxyVersion::V1);
        assert_eq!(
            header.addresses,
            Some(addrs("192.0.2.1:56324", "198.51.100.2:443"))
        );
        check_prefixes(&bytes[..used]);
    }

    #[test]
    fn v1_tcp6() {
        let bytes = b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 80\r\n";
        let (header, used) = complete(bytes);
        assert_eq!(used, bytes.len());
        assert_eq!(
            header.addresses,
            Some(addrs("[2001:db8::1]:4711", "[2001:db8::2]:80"))
        );
        check_prefixes(bytes);
    }

    #[test]
    fn v1_unknown_keeps_the_peer_and_ignores_the_rest_of_the_line() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ] {
            let (header, used) = complete(line);
            assert_eq!((header.addresses, used), (None, line.len()));
            check_prefixes(line);
        }
    }

    #[test]
    fn v1_longest_header_is_accepted_and_one_more_byte_is_refused() {
        let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY TCP6 {ip} {ip} 65535 65535\r\n");
        assert_eq!(complete(line.as_bytes()).1, 104);
        // The spec's longest: UNKNOWN with the longest addresses.
        let line = format!("PROXY UNKNOWN {ip} {ip} 65535 65535\r\n");
        assert_eq!(line.len(), V1_MAX_LEN);
        assert_eq!(complete(line.as_bytes()).1, V1_MAX_LEN);
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        assert_eq!(parse(long.as_bytes()), Err(ProxyError::V1TooLong));
        assert_eq!(
            parse(&long.as_bytes()[..V1_MAX_LEN]),
            Err(ProxyError::V1TooLong)
        );
        assert_eq!(parse(&long.as_bytes()[..V1_MAX_LEN - 1]), Ok(None));
    }

    #[test]
    fn v1_malformed_lines_name_the_part() {
        let cases: &[(&[u8], &str)] = &[
            (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "protocol"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "too few"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", "too many"),
            (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "IPv4"),
            (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "IPv4"),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "IPv6"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "range"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "port"),
            (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", "IPv4"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "CR"),
            (b"PROXY TCP4 1.2.3.4\r1.2.3.4 1 2\r\n", "CR"),
            (b"PROXY \xff\r\n", "ASCII"),
        ];
        for (line, part) in cases {
            match parse(line) {
                Err(e @ ProxyError::V1Malformed(what)) => {
                    assert!(
                        what.contains(part),
                        "{e} for {:?}",
                        String::from_utf8_lossy(line)
                    );
                }
                other => panic!("{other:?} for {:?}", String::from_utf8_lossy(line)),
            }
        }
    }

    #[test]
    fn bad_signatures_are_refused_at_the_first_wrong_byte() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::BadSignature));
        assert_eq!(parse(b"\x16\x03\x01"), Err(ProxyError::BadSignature));
        assert_eq!(parse(b"PROX_"), Err(ProxyError::BadSignature));
        assert_eq!(parse(b"proxy "), Err(ProxyError::BadSignature));
        assert_eq!(
            parse(b"\r\n\r\n\0\r\nQUIT\r"),
            Err(ProxyError::BadSignature)
        );
        assert_eq!(parse(b"P"), Ok(None));
        assert_eq!(parse(b"\r\n\r"), Ok(None));
    }

    #[test]
    fn v2_tcp4_with_tlvs() {
        let a = addrs("192.0.2.1:56324", "198.51.100.2:443");
        let tlvs = [0x04, 0x00, 0x03, b'a', b'b', b'c'];
        let mut bytes = encode_v2(Some(&a), &tlvs);
        let len = bytes.len();
        assert_eq!(len, 16 + 12 + 6);
        bytes.extend_from_slice(b"\x16\x03\x01 the ClientHello");
        let (header, used) = complete(&bytes);
        assert_eq!(used, len);
        assert_eq!(header.version, ProxyVersion::V2);
        assert_eq!(header.addresses, Some(a));
        check_prefixes(&bytes[..len]);
    }

    #[test]
    fn v2_tcp6() {
        let a = addrs("[2001:db8::1]:4711", "[2001:db8::2]:443");
        let bytes = encode_v2(Some(&a), &[]);
        assert_eq!(
            complete(&bytes),
            (
                ProxyHeader {
                    version: ProxyVersion::V2,
                    addresses: Some(a)
                },
                52
            )
        );
        check_prefixes(&bytes);
    }

    #[test]
    fn v2_local_keeps_the_peer() {
        let bytes = encode_v2(None, &[]);
        assert_eq!(bytes.len(), 16);
        assert_eq!(complete(&bytes).0.addresses, None);
        // LOCAL with addresses: they are ignored.
        let mut bytes = encode_v2(Some(&addrs("1.2.3.4:1", "5.6.7.8:2")), &[]);
        bytes[12] = 0x20;
        assert_eq!(complete(&bytes).0.addresses, None);
        check_prefixes(&bytes);
    }

    #[test]
    fn v2_unspec_unix_and_udp_keep_the_peer() {
        let mut bytes = encode_v2(Some(&addrs("1.2.3.4:1", "5.6.7.8:2")), &[]);
        bytes[13] = 0x12; // UDP over IPv4
        assert_eq!(complete(&bytes).0.addresses, None);
        bytes[13] = 0x00; // UNSPEC, with 12 bytes to skip
        assert_eq!(
            complete(&bytes),
            (
                ProxyHeader {
                    version: ProxyVersion::V2,
                    addresses: None
                },
                28
            )
        );
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 216]);
        unix.extend_from_slice(&[0; 216]);
        assert_eq!(complete(&unix).0.addresses, None);
    }

    #[test]
    fn v2_bad_fields_are_refused_before_the_payload_is_in() {
        let sig = V2_SIGNATURE;
        let with = |rest: &[u8]| [&sig[..], rest].concat();
        assert_eq!(parse(&with(&[0x11])), Err(ProxyError::V2BadVersion(0x11)));
        assert_eq!(parse(&with(&[0x22])), Err(ProxyError::V2BadCommand(0x22)));
        assert_eq!(
            parse(&with(&[0x21, 0x41])),
            Err(ProxyError::V2BadFamily(0x41))
        );
        assert_eq!(
            parse(&with(&[0x21, 0x13])),
            Err(ProxyError::V2BadFamily(0x13))
        );
        assert_eq!(
            parse(&with(&[0x21, 0x11, 0x04, 0x01])),
            Err(ProxyError::V2TooLong(1025))
        );
        assert_eq!(
            parse(&with(&[0x21, 0x11, 0x00, 0x0b])),
            Err(ProxyError::V2TooShort(11))
        );
        assert_eq!(
            parse(&with(&[0x21, 0x21, 0x00, 0x0c])),
            Err(ProxyError::V2TooShort(12))
        );
        // The longest accepted payload.
        let mut long = with(&[0x21, 0x11, 0x04, 0x00]);
        long.extend_from_slice(&[0; 1024]);
        assert_eq!(complete(&long).1, MAX_HEADER_LEN);
        check_prefixes(&long);
    }

    #[test]
    fn errors_name_the_cause() {
        assert!(ProxyError::BadSignature.to_string().contains("signature"));
        assert!(ProxyError::V2TooLong(2000).to_string().contains("2000"));
        assert!(
            ProxyError::V1Malformed("bad port")
                .to_string()
                .contains("bad port")
        );
    }

    fn any_addresses() -> impl Strategy<Value = ProxyAddresses> {
        let v4 = (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(s, d, sp, dp)| ProxyAddresses {
                source: SocketAddr::new(IpAddr::from(s), sp),
                destination: SocketAddr::new(IpAddr::from(d), dp),
            });
        let v6 = (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(s, d, sp, dp)| ProxyAddresses {
                source: SocketAddr::new(IpAddr::from(s), sp),
                destination: SocketAddr::new(IpAddr::from(d), dp),
            });
        prop_oneof![v4, v6]
    }

    proptest! {
        #[test]
        fn encoded_headers_parse_back(
            addresses in proptest::option::of(any_addresses()),
            v2 in any::<bool>(),
            tlvs in proptest::collection::vec(any::<u8>(), 0..64),
            rest in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let mut bytes = if v2 {
                encode_v2(addresses.as_ref(), &tlvs)
            } else {
                encode_v1(addresses.as_ref())
            };
            let len = bytes.len();
            bytes.extend_from_slice(&rest);
            let (header, used) = parse(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, len);
            prop_assert_eq!(header.addresses, addresses);
            prop_assert_eq!(header.version, if v2 { ProxyVersion::V2 } else { ProxyVersion::V1 });
            for cut in 0..len {
                prop_assert_eq!(parse(&bytes[..cut]), Ok(None));
                prop_assert!(cut + needed(&bytes[..cut]) <= len);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, used))) = parse(&bytes) {
                prop_assert!(used <= bytes.len() && used <= MAX_HEADER_LEN);
            }
            let _ = needed(&bytes);
        }

        #[test]
        fn random_bytes_behind_a_signature_never_panic(
            v2 in any::<bool>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut input = if v2 { V2_SIGNATURE.to_vec() } else { V1_PREFIX.to_vec() };
            input.extend_from_slice(&bytes);
            if let Ok(Some((_, used))) = parse(&input) {
                prop_assert!(used <= input.len());
            }
            let _ = needed(&input);
        }
    }
}
