//! What a CHILD SA enforces beyond cryptography: its traffic selectors on inbound packets
//! (RFC 4303 §3.4.4 / RFC 4301 §5.2: a decrypted packet whose addresses lie outside the
//! negotiated selectors is discarded) and its lifetimes (soft: ask IKE to rekey; hard: remove).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::ip;

/// An inclusive address range with a protocol (0: any), as IKEv2 traffic selectors carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selector {
    /// First address of the range.
    pub start: IpAddr,
    /// Last address of the range.
    pub end: IpAddr,
    /// IP protocol, 0 for any.
    pub protocol: u8,
}

impl Selector {
    fn contains(&self, addr: IpAddr, protocol: u8) -> bool {
        let in_range = match (self.start, self.end, addr) {
            (IpAddr::V4(s), IpAddr::V4(e), IpAddr::V4(a)) => s <= a && a <= e,
            (IpAddr::V6(s), IpAddr::V6(e), IpAddr::V6(a)) => s <= a && a <= e,
            _ => false,
        };
        in_range && (self.protocol == 0 || self.protocol == protocol)
    }
}

/// Does an inner packet that arrived on this SA fit its selectors? `remote` must contain the
/// source, `local` the destination.
pub fn inbound_allowed(packet: &[u8], local: &[Selector], remote: &[Selector]) -> bool {
    let Some(h) = ip::parse(packet) else {
        return false;
    };
    remote.iter().any(|s| s.contains(h.src, h.protocol))
        && local.iter().any(|s| s.contains(h.dst, h.protocol))
}

/// Limits of one SA; `None` means no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifetime {
    /// Age at which to rekey.
    pub soft_time: Option<Duration>,
    /// Age at which the SA is removed.
    pub hard_time: Option<Duration>,
    /// Bytes after which to rekey.
    pub soft_bytes: Option<u64>,
    /// Bytes after which the SA is removed.
    pub hard_bytes: Option<u64>,
    /// Packets after which to rekey.
    pub soft_packets: Option<u64>,
    /// Packets after which the SA is removed.
    pub hard_packets: Option<u64>,
}

impl Lifetime {
    /// The volume limit one packet crossed, given a direction's (bytes, packets) counters
    /// before and after it was counted. Each limit is reported by the one packet that reaches
    /// it, so it is reported once even when several workers count into the same atomic
    /// counters (each sees its own `before`). Time limits are the IKE engine's (its timers).
    pub fn crossed(&self, before: (u64, u64), after: (u64, u64)) -> Expiry {
        let reached = |limit: Option<u64>, b: u64, a: u64| limit.is_some_and(|x| b < x && x <= a);
        if reached(self.hard_bytes, before.0, after.0) || reached(self.hard_packets, before.1, after.1) {
            Expiry::Expired
        } else if reached(self.soft_bytes, before.0, after.0) || reached(self.soft_packets, before.1, after.1)
        {
            Expiry::Rekey
        } else {
            Expiry::Fine
        }
    }

    /// Whether any volume limit is set (the data plane skips the check otherwise).
    pub fn has_volume_limit(&self) -> bool {
        self.soft_bytes.is_some()
            || self.hard_bytes.is_some()
            || self.soft_packets.is_some()
            || self.hard_packets.is_some()
    }
}

/// What the SA's use asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Nothing to do.
    Fine,
    /// A soft limit was crossed: rekey now. Reported once.
    Rekey,
    /// A hard limit was crossed: remove the SA; no more packets on it.
    Expired,
}

/// Use of one SA direction: counters and the lifetime check.
#[derive(Debug, Clone)]
pub struct Usage {
    limits: Lifetime,
    installed: Instant,
    /// Bytes carried (inner packets).
    pub bytes: u64,
    /// Packets carried.
    pub packets: u64,
    rekey_asked: bool,
}

impl Usage {
    /// Counters of an SA installed at `installed`.
    pub fn new(limits: Lifetime, installed: Instant) -> Self {
        Self {
            limits,
            installed,
            bytes: 0,
            packets: 0,
            rekey_asked: false,
        }
    }

    /// Counts a packet of `bytes` and says whether a limit was reached.
    pub fn record(&mut self, bytes: usize, now: Instant) -> Expiry {
        self.bytes = self.bytes.saturating_add(bytes as u64);
        self.packets = self.packets.saturating_add(1);
        self.poll(now)
    }

    /// The lifetime check alone, for timers (an idle SA still expires).
    pub fn poll(&mut self, now: Instant) -> Expiry {
        let age = now.saturating_duration_since(self.installed);
        let l = &self.limits;
        let over = |limit: Option<u64>, v: u64| limit.is_some_and(|x| v >= x);
        let over_t = |limit: Option<Duration>| limit.is_some_and(|x| age >= x);
        if over_t(l.hard_time) || over(l.hard_bytes, self.bytes) || over(l.hard_packets, self.packets) {
            return Expiry::Expired;
        }
        if !self.rekey_asked
            && (over_t(l.soft_time) || over(l.soft_bytes, self.bytes) || over(l.soft_packets, self.packets))
        {
            self.rekey_asked = true;
            return Expiry::Rekey;
        }
        Expiry::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str, e: &str, p: u8) -> Selector {
        Selector {
            start: s.parse().unwrap(),
            end: e.parse().unwrap(),
            protocol: p,
        }
    }

    use crate::ip::test_v4 as v4;

    #[test]
    fn inbound_packets_must_fit_the_selectors() {
        let local = [sel("10.0.0.0", "10.0.255.255", 0)];
        let remote = [sel("10.128.7.0", "10.128.7.255", 0)];
        assert!(inbound_allowed(
            &v4([10, 128, 7, 9], [10, 0, 1, 1], 6),
            &local,
            &remote
        ));
        assert!(
            !inbound_allowed(&v4([10, 128, 8, 9], [10, 0, 1, 1], 6), &local, &remote),
            "spoofed source"
        );
        assert!(
            !inbound_allowed(&v4([10, 128, 7, 9], [192, 168, 0, 1], 6), &local, &remote),
            "wrong destination"
        );
        assert!(!inbound_allowed(&[0x45, 0, 0], &local, &remote), "not a packet");
        let icmp_only = [sel("10.128.7.0", "10.128.7.255", 1)];
        assert!(!inbound_allowed(
            &v4([10, 128, 7, 9], [10, 0, 1, 1], 6),
            &local,
            &icmp_only
        ));
        assert!(inbound_allowed(
            &v4([10, 128, 7, 9], [10, 0, 1, 1], 1),
            &local,
            &icmp_only
        ));
    }

    #[test]
    fn each_volume_limit_is_crossed_by_exactly_one_packet() {
        let l = Lifetime {
            soft_bytes: Some(1000),
            hard_bytes: Some(2000),
            soft_packets: Some(10),
            ..Lifetime::default()
        };
        assert_eq!(l.crossed((0, 0), (999, 1)), Expiry::Fine);
        assert_eq!(l.crossed((999, 1), (1000, 2)), Expiry::Rekey);
        assert_eq!(l.crossed((1000, 2), (1500, 3)), Expiry::Fine, "reported once");
        // Each limit speaks once: the packet limit too (the IKE engine ignores a second ask
        // while the rekey is in flight).
        assert_eq!(l.crossed((1500, 9), (1600, 10)), Expiry::Rekey);
        assert_eq!(l.crossed((1900, 11), (2100, 12)), Expiry::Expired);
        assert_eq!(l.crossed((2100, 12), (2200, 13)), Expiry::Fine, "expired once");
        // Two workers counting at once: the one whose packet reaches the limit reports it.
        assert_eq!(l.crossed((500, 4), (1200, 5)), Expiry::Rekey);
        assert_eq!(l.crossed((1200, 5), (1300, 6)), Expiry::Fine);
        assert!(!Lifetime::default().has_volume_limit());
        assert!(l.has_volume_limit());
    }

    #[test]
    fn soft_limit_asks_once_hard_limit_expires() {
        let t0 = Instant::now();
        let mut u = Usage::new(
            Lifetime {
                soft_bytes: Some(1000),
                hard_bytes: Some(2000),
                soft_time: Some(Duration::from_secs(50)),
                hard_time: Some(Duration::from_secs(60)),
                ..Lifetime::default()
            },
            t0,
        );
        assert_eq!(u.record(999, t0), Expiry::Fine);
        assert_eq!(u.record(1, t0), Expiry::Rekey);
        assert_eq!(u.record(500, t0), Expiry::Fine, "asked once");
        assert_eq!(u.record(500, t0), Expiry::Expired);
        let mut idle = Usage::new(
            Lifetime {
                soft_time: Some(Duration::from_secs(50)),
                hard_time: Some(Duration::from_secs(60)),
                ..Lifetime::default()
            },
            t0,
        );
        assert_eq!(idle.poll(t0 + Duration::from_secs(49)), Expiry::Fine);
        assert_eq!(idle.poll(t0 + Duration::from_secs(50)), Expiry::Rekey);
        assert_eq!(idle.poll(t0 + Duration::from_secs(60)), Expiry::Expired);
    }
}
