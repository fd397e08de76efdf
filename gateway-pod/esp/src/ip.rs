//! Just enough of the inner IP header to enforce traffic selectors: version, addresses and
//! protocol, read from untrusted bytes without panicking.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Addresses and protocol of an inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IPv4 protocol or IPv6 next header (extension headers are not walked).
    pub protocol: u8,
}

/// Next-header value ESP carries for an inner IPv4 packet.
pub const NEXT_HEADER_IPV4: u8 = 4;
/// Next-header value ESP carries for an inner IPv6 packet.
pub const NEXT_HEADER_IPV6: u8 = 41;

/// Parses the fixed IPv4 or IPv6 header; None if the bytes are not one.
pub fn parse(packet: &[u8]) -> Option<Header> {
    match packet.first()? >> 4 {
        4 => {
            let h = packet.get(..20)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return None;
            }
            let a = |o: usize| IpAddr::V4(Ipv4Addr::new(h[o], h[o + 1], h[o + 2], h[o + 3]));
            Some(Header {
                src: a(12),
                dst: a(16),
                protocol: h[9],
            })
        }
        6 => {
            let h = packet.get(..40)?;
            let a = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&h[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            Some(Header {
                src: a(8),
                dst: a(24),
                protocol: h[6],
            })
        }
        _ => None,
    }
}

/// The ESP next-header value for a packet of this IP version.
pub fn next_header_for(packet: &[u8]) -> Option<u8> {
    match packet.first()? >> 4 {
        4 => Some(NEXT_HEADER_IPV4),
        6 => Some(NEXT_HEADER_IPV6),
        _ => None,
    }
}

/// Is `dst` an address that only means something on the link itself (multicast, broadcast,
/// link-local)? The kernel sends such packets out of every interface it brings up (IPv6
/// router solicitations, MLD reports), the TUN device included; they are nobody's tunnel
/// traffic unless a tunnel's selectors explicitly cover them.
pub fn link_scoped(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast() || a.is_link_local(),
        IpAddr::V6(a) => a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// A minimal IPv4 packet for tests.
#[cfg(test)]
pub(crate) fn test_v4(src: [u8; 4], dst: [u8; 4], proto: u8) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_v4 as v4;

    #[test]
    fn link_scoped_destinations_are_multicast_broadcast_and_link_local() {
        for a in [
            "ff02::2",
            "ff02::16",
            "fe80::1",
            "224.0.0.22",
            "255.255.255.255",
            "169.254.1.1",
        ] {
            assert!(link_scoped(a.parse().unwrap()), "{a}");
        }
        for a in ["10.2.0.1", "2001:db8::1", "fec0::1", "192.0.2.1"] {
            assert!(!link_scoped(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn parses_v4_and_v6() {
        let h = parse(&v4([10, 1, 0, 1], [10, 2, 0, 1], 1)).unwrap();
        assert_eq!(h.src, "10.1.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(h.dst, "10.2.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(h.protocol, 1);
        let mut p6 = vec![0u8; 48];
        p6[0] = 0x60;
        p6[6] = 58;
        p6[8..24].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        p6[24..40].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        let h = parse(&p6).unwrap();
        assert_eq!((h.src.to_string().as_str(), h.protocol), ("fd00::1", 58));
        assert_eq!(next_header_for(&p6), Some(NEXT_HEADER_IPV6));
    }

    #[test]
    fn rejects_truncated_and_unknown() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0x45; 19]), None);
        let mut bad_ihl = v4([1; 4], [2; 4], 6);
        bad_ihl[0] = 0x44;
        assert_eq!(parse(&bad_ihl), None);
        assert_eq!(parse(&[0x70; 40]), None);
        assert_eq!(parse(&[0x60; 39]), None);
        assert_eq!(next_header_for(&[0x10]), None);
    }
}
