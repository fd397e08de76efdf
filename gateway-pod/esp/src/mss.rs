//! TCP MSS clamping: the maximum segment size a TCP SYN announces, lowered so that the
//! flow's full-size segments, once sealed (and, in a fleet, framed for the hop to another
//! pod), still fit the path without IP fragmentation. What strongSwan users do with
//! iptables' `TCPMSS --set-mss`, done here on the packets the data plane seals and opens.
//!
//! Read from untrusted bytes without panicking: anything that is not a well-formed first
//! fragment of a TCP SYN is left alone.

/// TCP's protocol number.
const TCP: u8 = 6;
/// The SYN flag in the TCP header's flags byte.
const SYN: u8 = 0x02;
/// TCP option kinds.
const END: u8 = 0;
const NOP: u8 = 1;
const MSS: u8 = 2;

/// Where the TCP header of `packet` starts, if it is an unfragmented (or first-fragment)
/// IPv4 or IPv6 TCP packet. IPv6 extension headers are not walked: a SYN behind one keeps
/// its MSS.
fn tcp_offset(packet: &[u8]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 => {
            let h = packet.get(..20)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let fragment_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            (ihl >= 20 && h[9] == TCP && fragment_offset == 0).then_some(ihl)
        }
        6 => (*packet.get(6)? == TCP).then_some(40),
        _ => None,
    }
}

/// Is `packet` a TCP SYN (or SYN-ACK), the only packets [`clamp`] changes?
pub fn is_syn(packet: &[u8]) -> bool {
    tcp_offset(packet)
        .and_then(|at| packet.get(at + 13))
        .is_some_and(|flags| flags & SYN != 0)
}

/// Lowers the MSS option of the TCP SYN (or SYN-ACK) in `packet` to `max` if it announces
/// more, and updates the TCP checksum incrementally (RFC 1624). Returns whether the packet
/// changed.
pub fn clamp(packet: &mut [u8], max: u16) -> bool {
    let Some(start) = tcp_offset(packet) else {
        return false;
    };
    let Some(tcp) = packet.get_mut(start..) else {
        return false;
    };
    if tcp.len() < 20 || tcp[13] & SYN == 0 {
        return false;
    }
    let data = usize::from(tcp[12] >> 4) * 4;
    if data < 20 || data > tcp.len() {
        return false;
    }
    let mut i = 20;
    while i < data {
        match tcp[i] {
            END => return false,
            NOP => i += 1,
            kind => {
                let Some(&len) = tcp.get(i + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || i + len > data {
                    return false;
                }
                if kind == MSS && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if old <= max {
                        return false;
                    }
                    tcp[i + 2..i + 4].copy_from_slice(&max.to_be_bytes());
                    // The checksum sums 16-bit words from the header's start: a field at an
                    // odd offset straddles two words, its bytes in swapped places.
                    let (old, new) = if i.is_multiple_of(2) {
                        (old, max)
                    } else {
                        (old.swap_bytes(), max.swap_bytes())
                    };
                    let sum = u16::from_be_bytes([tcp[16], tcp[17]]);
                    tcp[16..18].copy_from_slice(&adjust(sum, old, new).to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

/// The checksum `sum` after one 16-bit word it covers changed from `old` to `new`
/// (RFC 1624, equation 3: HC' = ~(~HC + ~m + m')).
fn adjust(sum: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!sum) + u32::from(!old) + u32::from(new);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ones' complement sum over `bytes` (odd length padded), folded.
    fn sum(bytes: &[u8], initial: u32) -> u32 {
        let mut s = initial;
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |b| u32::from(*b));
            s += hi | lo;
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s
    }

    /// A TCP segment's checksum as a receiver checks it: the sum over the pseudo-header
    /// and segment, 0xffff when right.
    fn verify_v4(packet: &[u8]) -> u32 {
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        let tcp = &packet[ihl..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&packet[12..20]);
        pseudo.extend_from_slice(&[0, TCP]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        sum(tcp, sum(&pseudo, 0))
    }

    fn verify_v6(packet: &[u8]) -> u32 {
        let tcp = &packet[40..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&packet[8..40]);
        pseudo.extend_from_slice(&(tcp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, TCP]);
        sum(tcp, sum(&pseudo, 0))
    }

    /// A TCP segment with `flags` and `options` (padded to a multiple of 4 with END) in an
    /// IPv4 packet, with a correct checksum.
    fn v4(flags: u8, options: &[u8]) -> Vec<u8> {
        let mut opts = options.to_vec();
        while !opts.len().is_multiple_of(4) {
            opts.push(END);
        }
        let tcp_len = 20 + opts.len() + 3;
        let mut p = vec![0u8; 20 + tcp_len];
        p[0] = 0x45;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[8] = 64;
        p[9] = TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 128, 0, 2]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[12] = (((20 + opts.len()) / 4) as u8) << 4;
        t[13] = flags;
        t[20..20 + opts.len()].copy_from_slice(&opts);
        t[20 + opts.len()..].copy_from_slice(b"abc");
        let c = !(verify_v4(&p) as u16);
        p[36..38].copy_from_slice(&c.to_be_bytes());
        assert_eq!(verify_v4(&p), 0xffff);
        p
    }

    fn mss_of(packet: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([packet[at], packet[at + 1]])
    }

    #[test]
    fn a_syn_announcing_more_is_lowered_and_its_checksum_stays_right() {
        // MSS first, then window scale, SACK permitted, timestamps: Linux's SYN.
        let mut p = v4(
            SYN,
            &[
                MSS, 4, 0x05, 0xb4, NOP, 3, 3, 7, 4, 2, 8, 10, 1, 2, 3, 4, 0, 0, 0, 0,
            ],
        );
        assert!(clamp(&mut p, 1300));
        assert_eq!(mss_of(&p, 42), 1300);
        assert_eq!(verify_v4(&p), 0xffff);
        // Already low enough: untouched.
        let before = p.clone();
        assert!(!clamp(&mut p, 1300));
        assert_eq!(p, before);
    }

    #[test]
    fn an_mss_at_an_odd_offset_keeps_the_checksum_right() {
        // A NOP first puts the MSS value at an odd offset in the TCP header.
        let mut p = v4(SYN | 0x10, &[NOP, MSS, 4, 0x23, 0x28]);
        assert!(clamp(&mut p, 1280));
        assert_eq!(mss_of(&p, 43), 1280);
        assert_eq!(verify_v4(&p), 0xffff);
    }

    #[test]
    fn ipv6_syns_are_clamped_too() {
        let v4 = v4(SYN, &[MSS, 4, 0x05, 0xb4]);
        let tcp = &v4[20..];
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
        p[6] = TCP;
        p[7] = 64;
        p[23] = 1;
        p[39] = 2;
        p.extend_from_slice(tcp);
        p[56..58].fill(0);
        let c = !(verify_v6(&p) as u16);
        p[56..58].copy_from_slice(&c.to_be_bytes());
        assert!(clamp(&mut p, 1220));
        assert_eq!(mss_of(&p, 62), 1220);
        assert_eq!(verify_v6(&p), 0xffff);
    }

    #[test]
    fn other_packets_are_left_alone() {
        let options = [MSS, 4, 0x05, 0xb4];
        // Not a SYN.
        let mut ack = v4(0x10, &options);
        let before = ack.clone();
        assert!(!clamp(&mut ack, 1300));
        assert_eq!(ack, before);
        // A later fragment.
        let mut frag = v4(SYN, &options);
        frag[7] = 1;
        assert!(!clamp(&mut frag, 1300));
        // UDP.
        let mut udp = v4(SYN, &options);
        udp[9] = 17;
        assert!(!clamp(&mut udp, 1300));
        // Options that overrun the header, a zero-length option, truncation at every
        // length: no panic, nothing changed.
        let mut bad = v4(SYN, &[3, 9, 0, 0]);
        assert!(!clamp(&mut bad, 1300));
        let mut zero = v4(SYN, &[8, 0, MSS, 4, 0x05, 0xb4]);
        assert!(!clamp(&mut zero, 1300));
        let whole = v4(SYN, &options);
        for n in 0..whole.len() {
            let mut cut = whole[..n].to_vec();
            let _ = clamp(&mut cut, 1300);
        }
    }
}
