//! "Packet too big" toward an inner sender: an inner packet that may not be fragmented (IPv4
//! with DF set, or any IPv6 packet) and would make an ESP-in-UDP datagram longer than the path
//! toward the peer is dropped, and its sender is told the largest inner packet that fits, as a
//! router on its path would (path MTU discovery: RFC 1191 for IPv4, RFC 8201 for IPv6).
//!
//! The error is built from untrusted bytes without panicking, and never about a packet that
//! must not get one (RFC 1122 §3.2.2, RFC 4443 §2.4 (e)).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::ip;

/// The IPv6 minimum link MTU (RFC 8200 §5): every link, a tunnel included, carries packets of
/// this size, fragmenting below IPv6 if it must.
pub const IPV6_MIN_MTU: usize = 1280;

/// RFC 1812 §4.3.2.3: "the ICMP datagram SHOULD contain as much of the original datagram as
/// possible without the length of the ICMP datagram exceeding 576 bytes".
const V4_ERROR_MAX: usize = 576;
const V4_HEADER: usize = 20;
const V6_HEADER: usize = 40;
const ICMP_HEADER: usize = 8;
const HOP_LIMIT: u8 = 64;

/// Longest ICMP error [`too_big`] writes.
pub const MAX_ERROR_LEN: usize = IPV6_MIN_MTU;

/// May this inner packet only travel whole? IPv4 with DF set; IPv6 above its minimum MTU
/// (RFC 8200 §5: only the source fragments IPv6, and a link must carry 1280 bytes, so a
/// tunnel fragments its outer packets for anything up to that).
pub fn must_not_fragment(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(6).is_some_and(|f| f & 0x40 != 0),
        Some(6) => packet.len() > IPV6_MIN_MTU,
        _ => false,
    }
}

/// Writes into `out` (at least [`MAX_ERROR_LEN`] bytes) the ICMP error that tells the sender
/// of `packet` that `mtu` is the largest packet the path takes: ICMPv4 Destination
/// Unreachable, Fragmentation Needed (type 3, code 4, next-hop MTU in the second word, RFC
/// 1191 §4) or ICMPv6 Packet Too Big (type 2, RFC 4443 §3.2). Its source is the packet's
/// destination (the error comes back from where the packet was going, so it passes a
/// reverse-path filter on the tunnel device), its destination the packet's source.
///
/// Returns the error's length, or `None` when no error may be sent about this packet: it is
/// an ICMP error itself, a non-first IPv4 fragment, an IPv4 packet to a broadcast or
/// multicast address, from an address that is not one host's, or malformed.
pub fn too_big(packet: &[u8], mtu: usize, out: &mut [u8]) -> Option<usize> {
    let h = ip::parse(packet)?;
    match (h.src, h.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => too_big_v4(packet, src, dst, h.protocol, mtu, out),
        (IpAddr::V6(src), IpAddr::V6(dst)) => too_big_v6(packet, src, h.protocol, dst, mtu, out),
        _ => None,
    }
}

fn too_big_v4(
    packet: &[u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    mtu: usize,
    out: &mut [u8],
) -> Option<usize> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let fragment_offset = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff;
    // RFC 1122 §3.2.2: "An ICMP error message MUST NOT be sent as the result of receiving:
    // an ICMP error message, or a datagram destined to an IP broadcast or IP multicast
    // address, ... or a datagram whose source address does not define a single host ...
    // or a fragment other than the first fragment."
    let icmp_error = protocol == 1 && packet.get(ihl).is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
    if icmp_error
        || fragment_offset != 0
        || dst.is_broadcast()
        || dst.is_multicast()
        || src.is_unspecified()
        || src.is_broadcast()
        || src.is_multicast()
        || src.is_loopback()
    {
        return None;
    }
    let quoted = packet.len().min(V4_ERROR_MAX - V4_HEADER - ICMP_HEADER);
    let len = V4_HEADER + ICMP_HEADER + quoted;
    let out = out.get_mut(..len)?;
    out.fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[8] = HOP_LIMIT;
    out[9] = 1;
    out[12..16].copy_from_slice(&dst.octets());
    out[16..20].copy_from_slice(&src.octets());
    let sum = checksum(&[&out[..V4_HEADER]], 0);
    out[10..12].copy_from_slice(&sum.to_be_bytes());
    let icmp = &mut out[V4_HEADER..];
    icmp[0] = 3;
    icmp[1] = 4;
    // RFC 1191 §4: "the low-order 16 bits of the second word of the ICMP header (labelled
    // "unused" in the ICMP specification) ... set to the MTU of the next-hop network".
    icmp[6..8].copy_from_slice(&(mtu.min(usize::from(u16::MAX)) as u16).to_be_bytes());
    icmp[ICMP_HEADER..].copy_from_slice(&packet[..quoted]);
    let sum = checksum(&[icmp], 0);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(len)
}

fn too_big_v6(
    packet: &[u8],
    src: Ipv6Addr,
    next_header: u8,
    dst: Ipv6Addr,
    mtu: usize,
    out: &mut [u8],
) -> Option<usize> {
    // RFC 4443 §2.4 (e): "An ICMPv6 error message MUST NOT be originated as a result of
    // receiving ... (e.1) An ICMPv6 error message" and (e.3)-(e.6), a source that does not
    // uniquely identify a single node. (Packet Too Big is the exception to (e.2): it is sent
    // about packets to multicast addresses too.) Error types are those below 128 (§2.1).
    let icmp_error = next_header == 58 && packet.get(V6_HEADER).is_some_and(|t| *t < 128);
    if icmp_error || src.is_unspecified() || src.is_multicast() || src.is_loopback() {
        return None;
    }
    // §2.4 (c): "as much of invoking packet as possible without the ICMPv6 packet exceeding
    // the minimum IPv6 MTU".
    let quoted = packet.len().min(IPV6_MIN_MTU - V6_HEADER - ICMP_HEADER);
    let len = V6_HEADER + ICMP_HEADER + quoted;
    let out = out.get_mut(..len)?;
    out.fill(0);
    out[0] = 0x60;
    let payload_len = (ICMP_HEADER + quoted) as u16;
    out[4..6].copy_from_slice(&payload_len.to_be_bytes());
    out[6] = 58;
    out[7] = HOP_LIMIT;
    out[8..24].copy_from_slice(&dst.octets());
    out[24..40].copy_from_slice(&src.octets());
    let (header, icmp) = out.split_at_mut(V6_HEADER);
    icmp[0] = 2;
    // §3.2: "MTU: The Maximum Transmission Unit of the next-hop link." A link never has less
    // than the minimum MTU.
    let mtu = mtu.max(IPV6_MIN_MTU).min(u32::MAX as usize) as u32;
    icmp[4..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[ICMP_HEADER..].copy_from_slice(&packet[..quoted]);
    // §2.3: the checksum covers a pseudo-header (RFC 8200 §8.1): both addresses, the
    // upper-layer length and the next header.
    let pseudo = u32::from(payload_len) + 58;
    let sum = checksum(&[&header[8..40], icmp], pseudo);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(len)
}

/// The Internet checksum (RFC 1071) of the concatenated parts (each of even length except
/// maybe the last) plus `extra` already summed 16-bit words.
fn checksum(parts: &[&[u8]], extra: u32) -> u16 {
    let mut sum = u64::from(extra);
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u64::from(*last) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(len: usize, df: bool, proto: u8) -> Vec<u8> {
        let mut p = ip::test_v4([10, 1, 0, 1], [10, 2, 0, 1], proto);
        p.resize(len, 0xab);
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        if df {
            p[6] = 0x40;
        }
        p
    }

    fn v6(len: usize, next_header: u8) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = next_header;
        p[8..24].copy_from_slice(&"fd01::1".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd02::1".parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    #[test]
    fn dont_fragment_is_df_for_ipv4_and_size_for_ipv6() {
        assert!(must_not_fragment(&v4(1400, true, 6)));
        assert!(!must_not_fragment(&v4(1400, false, 6)));
        assert!(must_not_fragment(&v6(1400, 6)));
        assert!(
            !must_not_fragment(&v6(1280, 6)),
            "IPv6 up to 1280 is the tunnel's to carry"
        );
        assert!(!must_not_fragment(&[]));
        assert!(!must_not_fragment(&[0x45]));
    }

    #[test]
    fn fragmentation_needed_names_the_mtu_and_quotes_the_packet() {
        let p = v4(1400, true, 6);
        let mut out = [0u8; MAX_ERROR_LEN];
        let n = too_big(&p, 1342, &mut out).unwrap();
        let e = &out[..n];
        assert_eq!(n, 576);
        assert_eq!(u16::from_be_bytes([e[2], e[3]]) as usize, n);
        assert_eq!(e[9], 1, "ICMP");
        assert_eq!(&e[12..16], &[10, 2, 0, 1], "from where the packet went");
        assert_eq!(&e[16..20], &[10, 1, 0, 1], "to its sender");
        assert_eq!(checksum(&[&e[..20]], 0), 0, "IP header checksum");
        assert_eq!((e[20], e[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([e[26], e[27]]), 1342);
        assert_eq!(&e[28..], &p[..548]);
        assert_eq!(checksum(&[&e[20..]], 0), 0, "ICMP checksum");
        // A short packet is quoted whole.
        let short = v4(60, true, 17);
        let n = too_big(&short, 1000, &mut out).unwrap();
        assert_eq!(&out[28..n], &short[..]);
    }

    #[test]
    fn packet_too_big_for_ipv6_has_a_valid_checksum() {
        let p = v6(1500, 6);
        let mut out = [0u8; MAX_ERROR_LEN];
        let n = too_big(&p, 1400, &mut out).unwrap();
        assert_eq!(n, IPV6_MIN_MTU);
        let e = &out[..n];
        assert_eq!((e[6], e[40], e[41]), (58, 2, 0));
        assert_eq!(u16::from_be_bytes([e[4], e[5]]) as usize, n - 40);
        assert_eq!(u32::from_be_bytes([e[44], e[45], e[46], e[47]]), 1400);
        assert_eq!(&e[8..24], &p[24..40]);
        assert_eq!(&e[24..40], &p[8..24]);
        let pseudo = (n - 40) as u32 + 58;
        assert_eq!(checksum(&[&e[8..40], &e[40..]], pseudo), 0);
        // Never below the IPv6 minimum.
        too_big(&p, 600, &mut out).unwrap();
        assert_eq!(u32::from_be_bytes([out[44], out[45], out[46], out[47]]), 1280);
    }

    #[test]
    fn no_error_about_errors_fragments_or_broadcasts() {
        let mut out = [0u8; MAX_ERROR_LEN];
        let mut icmp_error = v4(1400, true, 1);
        icmp_error[20] = 3;
        assert_eq!(too_big(&icmp_error, 1000, &mut out), None);
        let mut echo = v4(1400, true, 1);
        echo[20] = 8;
        assert!(too_big(&echo, 1000, &mut out).is_some(), "a ping gets one");
        let mut fragment = v4(1400, true, 6);
        fragment[7] = 1;
        assert_eq!(too_big(&fragment, 1000, &mut out), None);
        let mut broadcast = v4(1400, true, 17);
        broadcast[16..20].copy_from_slice(&[255; 4]);
        assert_eq!(too_big(&broadcast, 1000, &mut out), None);
        let mut v6_error = v6(1400, 58);
        v6_error[40] = 1;
        assert_eq!(too_big(&v6_error, 1300, &mut out), None);
        assert_eq!(too_big(&[0x45, 0, 0], 1000, &mut out), None);
        assert_eq!(
            too_big(&v4(1400, true, 6), 1000, &mut [0u8; 100]),
            None,
            "no room"
        );
    }
}
