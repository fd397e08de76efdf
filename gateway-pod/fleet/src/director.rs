//! The director of the VIP front: which member a new site is redirected to (RFC 5685), from
//! the load the members report in their records.
//!
//! Records are refreshed about once a second, while a burst of new sites arrives within
//! milliseconds: picking the least-loaded member from the reports alone would send the whole
//! burst to one member. [`Spread`] therefore adds the redirects it sent each member since
//! that member's report last changed (a new report counts the sites that arrived).

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::member::{Load, MemberId, MemberRecord};

/// The tunnels a member that reports no capacity is taken to be sized for: comparable with
/// members that do report one, and large enough that the count decides among such members.
pub const DEFAULT_CAPACITY: u64 = 10_000;

/// A member whose CPU use (in percent of one core) is at or above this is chosen only when
/// every candidate is.
pub const HOT_CPU_PERCENT: u32 = 90;

/// The director's choice of members for new sites (see the module docs).
#[derive(Debug, Default)]
pub struct Spread {
    /// Per member: the load of its record when we last looked, and the redirects sent to
    /// it since that record changed.
    sent: BTreeMap<MemberId, (Load, u64)>,
}

/// Where a new site goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The member.
    pub member: MemberId,
    /// Its redirect address.
    pub address: IpAddr,
}

impl Spread {
    /// A director with no redirect sent yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The member the next new site goes to, among `members` that have a redirect address
    /// and are not draining, and counts the redirect; `None` when no member qualifies.
    ///
    /// The least loaded wins: members under [`HOT_CPU_PERCENT`] before the others, then by
    /// (tunnels + half-open + redirects sent since its report) relative to its capacity,
    /// then by member ID.
    pub fn choose(&mut self, members: &BTreeMap<MemberId, MemberRecord>) -> Option<Choice> {
        let c = self.peek(members)?;
        self.count(c.member);
        Some(c)
    }

    /// The member [`Self::choose`] would pick, without counting a redirect to it.
    pub fn peek(&mut self, members: &BTreeMap<MemberId, MemberRecord>) -> Option<Choice> {
        self.sent.retain(|m, _| members.contains_key(m));
        for (m, r) in members {
            let e = self.sent.entry(*m).or_insert_with(|| (r.load.clone(), 0));
            if e.0 != r.load {
                *e = (r.load.clone(), 0);
            }
        }
        members
            .iter()
            .filter(|(_, r)| !r.load.draining)
            .filter_map(|(m, r)| Some((*m, r.redirect?, r)))
            .min_by_key(|(m, _, r)| {
                let pending = self.sent.get(m).map_or(0, |e| e.1);
                (r.load.cpu_percent >= HOT_CPU_PERCENT, fill(&r.load, pending), *m)
            })
            .map(|(member, address, _)| Choice { member, address })
    }

    /// Counts a redirect sent to `member` (one [`Self::peek`] picked).
    pub fn count(&mut self, member: MemberId) {
        if let Some(e) = self.sent.get_mut(&member) {
            e.1 = e.1.saturating_add(1);
        }
    }

    /// The redirects sent to `member` that its report does not count yet.
    pub fn pending(&self, member: MemberId) -> u64 {
        self.sent.get(&member).map_or(0, |e| e.1)
    }
}

/// How many more tunnels than its even share member `me` holds, which a rebalance may send
/// to the others (RFC 5685 §5 redirects of established SAs): the share is the mean over `me`
/// and the members a site may be redirected to (an address, not draining), rounded up. A
/// member at the rounded-up mean never sends, so sites move only from above the mean to the
/// least loaded, and never back and forth. 0 when there is no other member to send sites to.
pub fn excess(me: MemberId, members: &BTreeMap<MemberId, MemberRecord>) -> u64 {
    let Some(mine) = members.get(&me) else {
        return 0;
    };
    let others: Vec<u64> = members
        .iter()
        .filter(|(m, r)| **m != me && r.redirect.is_some() && !r.load.draining)
        .map(|(_, r)| r.load.tunnels)
        .collect();
    if others.is_empty() {
        return 0;
    }
    let count = others.len() as u128 + 1;
    let total = others.iter().map(|t| u128::from(*t)).sum::<u128>() + u128::from(mine.load.tunnels);
    let allowed = total.div_ceil(count);
    u64::try_from(u128::from(mine.load.tunnels).saturating_sub(allowed)).unwrap_or(u64::MAX)
}

/// The redirect address of member `name` in an addresses file: one `<member name> <IP>`
/// per line (blank lines and `#` comments skipped; a line that does not parse is skipped,
/// not an error, since the operator writes the file while Services get their addresses).
/// `None` when `name` has no valid line; the first valid one wins.
pub fn address_in_file(text: &str, name: &str) -> Option<IpAddr> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (n, a) = (words.next()?, words.next()?);
            if words.next().is_some() || n != name {
                return None;
            }
            a.parse().ok()
        })
        .next()
}

/// How full a member is, in millionths of its capacity (an integer, so that the order is
/// exact and total).
fn fill(load: &Load, pending: u64) -> u128 {
    let sites = u128::from(load.tunnels) + u128::from(load.half_open) + u128::from(pending);
    let capacity = match load.capacity {
        0 => DEFAULT_CAPACITY,
        c => c,
    };
    sites * 1_000_000 / u128::from(capacity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::ShardSet;

    fn record(n: u16, tunnels: u64, redirect: Option<&str>) -> MemberRecord {
        MemberRecord {
            name: format!("gw-{n}"),
            address: format!("10.244.0.{}:4510", 10 + n).parse().unwrap(),
            load: Load {
                tunnels,
                ..Load::default()
            },
            map_version: 1,
            occupied: ShardSet::new().to_hex(),
            admin: None,
            redirect: redirect.map(|a| a.parse().unwrap()),
        }
    }

    fn three(tunnels: [u64; 3]) -> BTreeMap<MemberId, MemberRecord> {
        (0..3u16)
            .map(|n| {
                let a = format!("192.0.2.{}", 20 + n);
                (MemberId(n), record(n, tunnels[usize::from(n)], Some(&a)))
            })
            .collect()
    }

    #[test]
    fn a_burst_between_reports_is_spread_evenly() {
        let members = three([0, 0, 0]);
        let mut s = Spread::new();
        let mut per = [0u32; 3];
        for _ in 0..60 {
            let c = s.choose(&members).unwrap();
            per[usize::from(c.member.0)] += 1;
            assert_eq!(c.address, members[&c.member].redirect.unwrap());
        }
        assert_eq!(per, [20, 20, 20]);
    }

    #[test]
    fn the_least_loaded_fills_up_first() {
        let members = three([10, 4, 7]);
        let mut s = Spread::new();
        let picks: Vec<u16> = (0..5).map(|_| s.choose(&members).unwrap().member.0).collect();
        // 4 → 5, 6, 7; then ties with member 2 at 7 go by ID.
        assert_eq!(picks, [1, 1, 1, 1, 2]);
    }

    #[test]
    fn a_new_report_replaces_the_redirects_counted_since_the_last() {
        let mut members = three([0, 0, 0]);
        let mut s = Spread::new();
        for _ in 0..3 {
            s.choose(&members).unwrap();
        }
        assert_eq!(s.pending(MemberId(0)), 1);
        // Member 0's report now counts the site sent to it: the redirect is not counted twice.
        if let Some(r) = members.get_mut(&MemberId(0)) {
            r.load.half_open = 1;
        }
        // All three at one site again: the tie goes to member 0, which a redirect counted
        // twice (reported and pending) would have lost.
        assert_eq!(s.choose(&members).unwrap().member, MemberId(0));
        assert_eq!(s.pending(MemberId(0)), 1);
        assert_eq!(s.pending(MemberId(1)), 1);
    }

    #[test]
    fn draining_members_and_members_without_an_address_are_never_chosen() {
        let mut members = three([50, 0, 0]);
        if let Some(r) = members.get_mut(&MemberId(1)) {
            r.load.draining = true;
        }
        members.insert(MemberId(3), record(3, 0, None));
        let mut s = Spread::new();
        for _ in 0..10 {
            let m = s.choose(&members).unwrap().member;
            assert!(m == MemberId(0) || m == MemberId(2), "{m}");
        }
        for r in members.values_mut() {
            r.load.draining = true;
        }
        assert_eq!(s.choose(&members), None);
        assert_eq!(Spread::new().choose(&BTreeMap::new()), None);
    }

    #[test]
    fn capacity_and_cpu_weigh_in() {
        let mut members = three([100, 60, 0]);
        if let Some(r) = members.get_mut(&MemberId(0)) {
            r.load.capacity = 1000; // 10 % full
        }
        if let Some(r) = members.get_mut(&MemberId(1)) {
            r.load.capacity = 100; // 60 % full
        }
        if let Some(r) = members.get_mut(&MemberId(2)) {
            r.load.capacity = 10; // empty but hot
            r.load.cpu_percent = 95;
        }
        let mut s = Spread::new();
        assert_eq!(s.choose(&members).unwrap().member, MemberId(0));
        for r in members.values_mut() {
            r.load.cpu_percent = 99;
        }
        assert_eq!(Spread::new().choose(&members).unwrap().member, MemberId(2));
    }

    #[test]
    fn extreme_reports_do_not_overflow() {
        let mut members = three([u64::MAX, u64::MAX, 0]);
        if let Some(r) = members.get_mut(&MemberId(0)) {
            r.load.half_open = u64::MAX;
            r.load.capacity = 1;
        }
        let mut s = Spread::new();
        assert_eq!(s.choose(&members).unwrap().member, MemberId(2));
    }

    #[test]
    fn finds_a_members_line_in_the_addresses_file() {
        let text = "# per-pod Services\ngw-0 192.0.2.20\n\ngw-1 not-an-ip\ngw-1 192.0.2.21 # late\n\
                    gw-2 2001:db8::2\ngw-3 192.0.2.23 extra\n  gw-4\t192.0.2.24  \n";
        let at = |n: &str| address_in_file(text, n);
        assert_eq!(at("gw-0"), Some("192.0.2.20".parse().unwrap()));
        assert_eq!(at("gw-1"), Some("192.0.2.21".parse().unwrap()));
        assert_eq!(at("gw-2"), Some("2001:db8::2".parse().unwrap()));
        assert_eq!(at("gw-3"), None);
        assert_eq!(at("gw-4"), Some("192.0.2.24".parse().unwrap()));
        assert_eq!(at("gw-5"), None);
        assert_eq!(at("gw"), None);
        assert_eq!(address_in_file("", "gw-0"), None);
        assert_eq!(address_in_file("\u{0}\u{ffff} \n#", "\u{0}\u{ffff}"), None);
    }

    #[test]
    fn only_a_member_clearly_over_its_share_has_an_excess() {
        let members = three([30, 30, 0]);
        assert_eq!(excess(MemberId(0), &members), 10);
        assert_eq!(excess(MemberId(2), &members), 0);
        assert_eq!(excess(MemberId(0), &three([21, 20, 19])), 1);
        // 31 over three: 11 is the rounded-up mean, nobody sends.
        assert_eq!(excess(MemberId(0), &three([11, 10, 10])), 0);
        assert_eq!(excess(MemberId(9), &members), 0);
        // Nobody to send sites to: the others drain or have no address.
        let mut alone = three([30, 0, 0]);
        if let Some(r) = alone.get_mut(&MemberId(1)) {
            r.load.draining = true;
        }
        if let Some(r) = alone.get_mut(&MemberId(2)) {
            r.redirect = None;
        }
        assert_eq!(excess(MemberId(0), &alone), 0);
        assert!(excess(MemberId(0), &three([u64::MAX, u64::MAX, 0])) > 0);
    }
}
