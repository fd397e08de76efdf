//! What this pod knows of the fleet, shared with the IKE driver and the data plane threads:
//! who it is, who owns each shard, where each member is, and whether it may take new sites.
//!
//! The owner of each shard sits in an atomic, so the data plane finds where a packet goes
//! with one load and no lock; the rest changes a few times a minute and sits behind locks.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use concentrator_fleet::map::replicas;
use concentrator_fleet::member::MemberRecord;
use concentrator_fleet::{MemberId, SHARDS, Shard, ShardMap, ShardSet};

const NOBODY: u16 = u16::MAX;

/// How long a shard counts as occupied after an SPI was drawn in it, whether or not an SA
/// was made with it yet: longer than any exchange waits for its answer (a CHILD SA's
/// inbound SPI is drawn when its request goes out), so that the leader never moves a shard
/// under an SA that is being made; the driver's published set covers the SAs that exist.
const PICK_HOLD: Duration = Duration::from_secs(60);

/// Where a packet for a shard goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// This pod owns the shard.
    Local,
    /// Another member owns it: forward there.
    Member(MemberId, SocketAddr),
    /// Nobody (that we know of) owns it: drop and count.
    Nowhere,
}

/// One member's part of the shard map, as [`View::shard_summary`] counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberShardCount {
    /// Shards it owns.
    pub owned: u32,
    /// Shards of other members whose SAs it is a replica for.
    pub replica: u32,
    /// Shards it owns that the map marks to move elsewhere.
    pub handing_over: u32,
    /// Shards of other members that the map marks to move to it.
    pub taking_over: u32,
}

/// The shard map as this pod applied it last, counted per member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardSummary {
    pub map_version: u64,
    /// Shards nobody owns.
    pub unowned: u32,
    /// Every member with a record, and any other the map names.
    pub members: BTreeMap<MemberId, MemberShardCount>,
}

/// The pod's view of the fleet (see the module docs).
#[derive(Debug)]
pub struct View {
    me: AtomicU16,
    /// The lease is held and the map applied: new sites may be claimed.
    available: AtomicBool,
    owners: Box<[AtomicU16]>,
    epochs: Box<[AtomicU32]>,
    map_version: AtomicU64,
    /// Shards in which this pod holds SAs (IKE SPIs, half-open included, and inbound ESP
    /// SPIs), as the driver last published them.
    live: Box<[AtomicBool]>,
    /// Until when (seconds since `born`) each shard counts as occupied because an SPI was
    /// drawn in it ([`PICK_HOLD`]).
    picked_until: Box<[AtomicU32]>,
    /// Copies of other members' IKE SAs held here as their replica, per shard: a shard
    /// given to us in a take-over holds SAs from the moment the map says so, before the
    /// driver has adopted them.
    copies: Box<[AtomicU32]>,
    /// Per shard, where the map marks it to move ([`NOBODY`]: nowhere).
    moving_to: Box<[AtomicU16]>,
    /// Per shard, the member this pod handed it over to (its final state acknowledged there).
    handed_to: Box<[AtomicU16]>,
    /// Woken when our record should be written now (a shard handed over).
    report_now: tokio::sync::Notify,
    /// Woken when a new shard map is applied.
    map_changed: tokio::sync::Notify,
    born: Instant,
    /// The VIP front's director, as the election key says (`NOBODY`: none, or no VIP front).
    director: AtomicU16,
    /// The fleet has a VIP front (`--fleet-vip`): new sites that support redirects go to the
    /// director.
    vip_front: AtomicBool,
    /// Overloaded, this member redirects established sites (`--fleet-rebalance`).
    rebalance: AtomicBool,
    /// The director redirects new sites in IKE_AUTH (`--fleet-redirect-in-auth`).
    redirect_in_auth: AtomicBool,
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    allocatable: Vec<Shard>,
    /// The members that may take new sites (own a shard they allocate in), in ID order.
    allocating: Vec<MemberId>,
    members: BTreeMap<MemberId, MemberRecord>,
    leases: BTreeMap<MemberId, i64>,
}

impl Default for View {
    fn default() -> Self {
        Self::new()
    }
}

impl View {
    /// A view of nothing: no member ID, no shard, not available.
    pub fn new() -> Self {
        let n = usize::from(SHARDS);
        Self {
            me: AtomicU16::new(NOBODY),
            available: AtomicBool::new(false),
            owners: (0..n).map(|_| AtomicU16::new(NOBODY)).collect(),
            epochs: (0..n).map(|_| AtomicU32::new(0)).collect(),
            map_version: AtomicU64::new(0),
            live: (0..n).map(|_| AtomicBool::new(false)).collect(),
            picked_until: (0..n).map(|_| AtomicU32::new(0)).collect(),
            copies: (0..n).map(|_| AtomicU32::new(0)).collect(),
            moving_to: (0..n).map(|_| AtomicU16::new(NOBODY)).collect(),
            handed_to: (0..n).map(|_| AtomicU16::new(NOBODY)).collect(),
            report_now: tokio::sync::Notify::new(),
            map_changed: tokio::sync::Notify::new(),
            born: Instant::now(),
            director: AtomicU16::new(NOBODY),
            vip_front: AtomicBool::new(false),
            rebalance: AtomicBool::new(false),
            redirect_in_auth: AtomicBool::new(false),
            inner: RwLock::default(),
        }
    }

    /// This pod's member ID, once it has one.
    pub fn me(&self) -> Option<MemberId> {
        match self.me.load(Ordering::Acquire) {
            NOBODY => None,
            m => Some(MemberId(m)),
        }
    }

    pub(super) fn set_me(&self, me: Option<MemberId>) {
        self.me.store(me.map_or(NOBODY, |m| m.0), Ordering::Release);
    }

    /// The VIP front's director, if there is one now.
    pub fn director(&self) -> Option<MemberId> {
        match self.director.load(Ordering::Acquire) {
            NOBODY => None,
            m => Some(MemberId(m)),
        }
    }

    pub(super) fn set_director(&self, director: Option<MemberId>) {
        self.director
            .store(director.map_or(NOBODY, |m| m.0), Ordering::Release);
    }

    /// Whether the fleet has a VIP front with a director.
    pub fn vip_front(&self) -> bool {
        self.vip_front.load(Ordering::Acquire)
    }

    pub(super) fn set_vip_front(&self, on: bool) {
        self.vip_front.store(on, Ordering::Release);
    }

    /// Whether the director redirects new sites in IKE_AUTH rather than in IKE_SA_INIT.
    pub fn redirect_in_auth(&self) -> bool {
        self.redirect_in_auth.load(Ordering::Acquire)
    }

    pub(super) fn set_redirect_in_auth(&self, on: bool) {
        self.redirect_in_auth.store(on, Ordering::Release);
    }

    /// Whether this member redirects established sites when it holds more than its share.
    pub fn rebalance(&self) -> bool {
        self.rebalance.load(Ordering::Acquire)
    }

    pub(super) fn set_rebalance(&self, on: bool) {
        self.rebalance.store(on, Ordering::Release);
    }

    /// Whether new sites may be taken: the lease is held and the map is current.
    pub fn available(&self) -> bool {
        self.available.load(Ordering::Acquire)
    }

    pub(super) fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::Release);
    }

    /// Who owns `shard`.
    pub fn owner(&self, shard: Shard) -> Option<MemberId> {
        match self.owners[shard.index()].load(Ordering::Acquire) {
            NOBODY => None,
            m => Some(MemberId(m)),
        }
    }

    /// The epoch of `shard`'s ownership.
    pub fn epoch(&self, shard: Shard) -> u32 {
        self.epochs[shard.index()].load(Ordering::Acquire)
    }

    /// Where a packet of `shard` goes.
    pub fn route(&self, shard: Shard) -> Route {
        match self.owner(shard) {
            None => Route::Nowhere,
            Some(m) if Some(m) == self.me() => Route::Local,
            Some(m) => self.address(m).map_or(Route::Nowhere, |a| Route::Member(m, a)),
        }
    }

    /// Where member `m` takes frames.
    pub fn address(&self, m: MemberId) -> Option<SocketAddr> {
        self.read().members.get(&m).map(|r| r.address)
    }

    /// Whether some member's address satisfies `pred` (no copy of the records).
    pub fn any_member_address(&self, pred: impl Fn(IpAddr) -> bool) -> bool {
        self.read().members.values().any(|r| pred(r.address.ip()))
    }

    /// The member records, by ID.
    pub fn members(&self) -> BTreeMap<MemberId, MemberRecord> {
        self.read().members.clone()
    }

    /// The version of the shard map applied last.
    pub fn map_version(&self) -> u64 {
        self.map_version.load(Ordering::Acquire)
    }

    /// A shard for a new SPI of ours, from `random` (`None` when we may allocate none); it
    /// counts as occupied from now on (see [`PICK_HOLD`]).
    pub fn pick_shard(&self, random: u64) -> Option<Shard> {
        let inner = self.read();
        let n = inner.allocatable.len() as u64;
        let shard = (n > 0).then(|| inner.allocatable[(random % n) as usize])?;
        // Marked under the read lock: a new map (which takes the write lock) is applied
        // either before the pick (and the shard was allocatable in it) or after the mark
        // (and the report made at its version includes the shard).
        self.hold(shard);
        Some(shard)
    }

    /// Counts `shard` as occupied for [`PICK_HOLD`]: an SA is being put there.
    pub fn hold(&self, shard: Shard) {
        let until = self.seconds() + PICK_HOLD.as_secs() as u32;
        self.picked_until[shard.index()].fetch_max(until, Ordering::AcqRel);
    }

    /// One more (`true`) or one fewer copy of another member's IKE SA in `shard`.
    pub(super) fn count_copy(&self, shard: Shard, more: bool) {
        let c = &self.copies[shard.index()];
        if more {
            c.fetch_add(1, Ordering::AcqRel);
        } else {
            let _ = c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    fn seconds(&self) -> u32 {
        u32::try_from(self.born.elapsed().as_secs()).unwrap_or(u32::MAX - PICK_HOLD.as_secs() as u32)
    }

    /// The member that takes a new IKE SA (an IKE_SA_INIT request) from `source` with the
    /// initiator SPI `spi_i`: rendezvous hashing over the members that take new sites, so
    /// that a retransmission lands on the same member whichever pod it reached, and a
    /// member joining or leaving moves only its own share of new sites.
    pub fn place(&self, source: IpAddr, spi_i: u64) -> Option<MemberId> {
        let inner = self.read();
        inner
            .allocating
            .iter()
            .max_by_key(|m| placement_score(source, spi_i, **m))
            .copied()
    }

    /// Each member's etcd lease.
    pub(super) fn set_leases(&self, leases: BTreeMap<MemberId, i64>) {
        self.inner.write().unwrap_or_else(|e| e.into_inner()).leases = leases;
    }

    /// The etcd lease member `m` holds its membership under, if it is a member.
    pub fn lease_of(&self, m: MemberId) -> Option<i64> {
        self.read().leases.get(&m).copied()
    }

    /// Applies a new shard map and member set.
    pub(super) fn apply(&self, map: &ShardMap, members: BTreeMap<MemberId, MemberRecord>) {
        for s in Shard::all() {
            let e = map.entry(s);
            self.owners[s.index()].store(e.owner.map_or(NOBODY, |m| m.0), Ordering::Release);
            self.epochs[s.index()].store(e.epoch, Ordering::Release);
            self.moving_to[s.index()].store(e.moving_to.map_or(NOBODY, |m| m.0), Ordering::Release);
        }
        let changed = self.map_version() != map.version();
        let allocatable = self
            .me()
            .map(|me| map.allocatable(me).iter().collect())
            .unwrap_or_default();
        let allocating = map
            .allocating_members()
            .into_iter()
            .filter(|m| members.contains_key(m))
            .collect();
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.allocatable = allocatable;
        inner.allocating = allocating;
        inner.members = members;
        self.map_version.store(map.version(), Ordering::Release);
        drop(inner);
        if changed {
            self.map_changed.notify_one();
        }
    }

    /// Where the map marks `shard` to move, if anywhere.
    pub fn moving_to(&self, shard: Shard) -> Option<MemberId> {
        match self.moving_to[shard.index()].load(Ordering::Acquire) {
            NOBODY => None,
            m => Some(MemberId(m)),
        }
    }

    /// Records that `shard`'s final state is acknowledged by `to` (`None`: not handed over,
    /// or the hand-over was given up), and has our record written at once: the leader moves
    /// the shard when the record says it is empty.
    pub fn set_handed(&self, shard: Shard, to: Option<MemberId>) {
        self.handed_to[shard.index()].store(to.map_or(NOBODY, |m| m.0), Ordering::Release);
        self.report_now.notify_one();
    }

    /// Has our record written now rather than at the next report tick (a drain began or
    /// ended: the leader acts on it).
    pub fn request_report(&self) {
        self.report_now.notify_one();
    }

    /// The member `shard` was handed over to, if it was.
    pub fn handed_to(&self, shard: Shard) -> Option<MemberId> {
        match self.handed_to[shard.index()].load(Ordering::Acquire) {
            NOBODY => None,
            m => Some(MemberId(m)),
        }
    }

    /// Resolves when our record should be written before the next report tick.
    pub(super) async fn report_wanted(&self) {
        self.report_now.notified().await;
    }

    /// Resolves when a new shard map was applied since the last call.
    pub async fn map_applied(&self) {
        self.map_changed.notified().await;
    }

    /// The shards in which this pod holds SAs now (the driver publishes them).
    pub fn set_live(&self, shards: &ShardSet) {
        for s in Shard::all() {
            self.live[s.index()].store(shards.contains(s), Ordering::Release);
        }
    }

    /// The shards the leader must not move away from us: those we hold SAs in, those an
    /// SPI was drawn in lately, and those we hold copies of SAs in (ours to adopt if the
    /// map gives them to us).
    pub fn occupied(&self) -> ShardSet {
        let now = self.seconds();
        Shard::all()
            .filter(|s| {
                self.picked_until[s.index()].load(Ordering::Acquire) > now
                    || self.live[s.index()].load(Ordering::Acquire)
                    || self.copies[s.index()].load(Ordering::Acquire) > 0
            })
            // A shard handed over to the member the map moves it to is empty for the leader:
            // its SAs are frozen here and carried on there. Handed to another member than
            // the mark now names, it is not (that member has not got its final state).
            .filter(|s| self.handed_to(*s).is_none_or(|to| self.moving_to(*s) != Some(to)))
            .collect()
    }

    /// The shard map counted per member (for the admin API). A member is replica for the
    /// shards whose `copies` replicas, as their owner chooses them among the members that are
    /// not draining, include it.
    pub fn shard_summary(&self, copies: usize) -> ShardSummary {
        let members = self.members();
        let accepting: Vec<MemberId> = members
            .iter()
            .filter(|(_, r)| !r.load.draining)
            .map(|(m, _)| *m)
            .collect();
        let mut out = ShardSummary {
            map_version: self.map_version(),
            unowned: 0,
            members: members
                .keys()
                .map(|m| (*m, MemberShardCount::default()))
                .collect(),
        };
        for s in Shard::all() {
            let Some(owner) = self.owner(s) else {
                out.unowned += 1;
                continue;
            };
            let counts = out.members.entry(owner).or_default();
            counts.owned += 1;
            if let Some(to) = self.moving_to(s).filter(|to| *to != owner) {
                counts.handing_over += 1;
                out.members.entry(to).or_default().taking_over += 1;
            }
            for r in replicas(s, owner, &accepting, copies) {
                out.members.entry(r).or_default().replica += 1;
            }
        }
        out
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent data (each write
        // replaces the whole value): go on with it.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Shared handle.
pub type SharedView = Arc<View>;

/// The rendezvous score of `member` for a new IKE SA (FNV-1a over the inputs; a spread, not
/// a secret: a site can only choose where its own IKE SA lands).
fn placement_score(source: IpAddr, spi_i: u64, member: MemberId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match source {
        IpAddr::V4(ip) => eat(&ip.octets()),
        IpAddr::V6(ip) => eat(&ip.octets()),
    }
    eat(&spi_i.to_be_bytes());
    eat(&member.0.to_be_bytes());
    // FNV's low bits mix poorly for inputs that differ in their last bytes: finish like
    // splitmix64.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use concentrator_fleet::map::{Report, plan};
    use concentrator_fleet::member::Load;

    use super::*;

    fn record(n: u16) -> MemberRecord {
        MemberRecord {
            name: format!("gw-{n}"),
            address: SocketAddr::from(([10, 0, 0, n as u8], 4510)),
            load: Load::default(),
            map_version: 0,
            occupied: ShardSet::new().to_hex(),
            admin: None,
            redirect: None,
        }
    }

    fn fleet(ids: &[u16]) -> (ShardMap, BTreeMap<MemberId, MemberRecord>) {
        let reports: BTreeMap<_, _> = ids.iter().map(|n| (MemberId(*n), Report::default())).collect();
        let mut map = plan(&ShardMap::new(), &reports).unwrap();
        // Settle: everyone saw everything and holds no SA.
        loop {
            let seen: BTreeMap<_, _> = reports
                .keys()
                .map(|m| {
                    (
                        *m,
                        Report {
                            map_version: map.version(),
                            ..Report::default()
                        },
                    )
                })
                .collect();
            match plan(&map, &seen) {
                Some(next) => map = next,
                None => break,
            }
        }
        (map, ids.iter().map(|n| (MemberId(*n), record(*n))).collect())
    }

    #[test]
    fn a_shard_handed_to_its_marked_member_reads_as_empty() {
        let view = View::new();
        let (map, members) = fleet(&[0, 1]);
        view.set_me(Some(MemberId(1)));
        view.apply(&map, members.clone());
        let s = map.owned_by(MemberId(1)).iter().next().unwrap();
        view.set_live(&[s].into_iter().collect());
        assert!(view.occupied().contains(s));
        // Member 1 drains: its shards are marked to member 0; handed there, empty for the
        // leader.
        let reports: BTreeMap<_, _> = [
            (MemberId(0), Report::default()),
            (
                MemberId(1),
                Report {
                    map_version: map.version(),
                    occupied: [s].into_iter().collect(),
                    draining: true,
                },
            ),
        ]
        .into_iter()
        .collect();
        let marked = plan(&map, &reports).unwrap();
        assert_eq!(marked.entry(s).moving_to, Some(MemberId(0)));
        view.apply(&marked, members.clone());
        view.set_handed(s, Some(MemberId(0)));
        assert!(!view.occupied().contains(s));
        // Handed to another member than the mark names now: occupied again.
        view.set_handed(s, Some(MemberId(1)));
        assert!(view.occupied().contains(s));
    }

    #[test]
    fn routes_follow_the_map() {
        let view = View::new();
        let (map, members) = fleet(&[0, 1, 2]);
        view.set_me(Some(MemberId(1)));
        view.apply(&map, members);
        let mut seen = [0; 3];
        for s in Shard::all() {
            match view.route(s) {
                Route::Local => seen[1] += 1,
                Route::Member(m, addr) => {
                    assert_eq!(addr, record(m.0).address);
                    seen[usize::from(m.0)] += 1;
                }
                Route::Nowhere => panic!("shard {s} goes nowhere"),
            }
        }
        assert!(seen.iter().all(|n| (341..=342).contains(n)), "{seen:?}");
        let mine = view.pick_shard(12345).unwrap();
        assert_eq!(view.route(mine), Route::Local);
    }

    #[test]
    fn placement_is_stable_and_spread() {
        let view = View::new();
        let (map, members) = fleet(&[0, 1, 2]);
        view.set_me(Some(MemberId(0)));
        view.apply(&map, members);
        let mut counts = [0u32; 3];
        for i in 0..3000u64 {
            let src = IpAddr::from([192, 0, 2, (i % 200) as u8]);
            let m = view.place(src, i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).unwrap();
            assert_eq!(view.place(src, i.wrapping_mul(0x9e37_79b9_7f4a_7c15)), Some(m));
            counts[usize::from(m.0)] += 1;
        }
        assert!(counts.iter().all(|n| (800..1200).contains(n)), "{counts:?}");

        // Member 2 leaves: new sites that went to 0 or 1 still go there.
        let before: Vec<_> = (0..300u64)
            .map(|i| view.place(IpAddr::from([198, 51, 100, 1]), i))
            .collect();
        let (map, members) = fleet(&[0, 1]);
        view.apply(&map, members);
        for (i, m) in before.iter().enumerate() {
            let now = view.place(IpAddr::from([198, 51, 100, 1]), i as u64);
            if *m != Some(MemberId(2)) {
                assert_eq!(now, *m);
            }
        }
    }

    #[test]
    fn occupied_shards_are_the_published_ones_and_those_drawn_from_lately() {
        let view = View::new();
        let (map, members) = fleet(&[0, 1, 2]);
        view.set_me(Some(MemberId(0)));
        view.apply(&map, members);
        assert!(view.occupied().is_empty());
        // An SPI drawn (no SA published yet) occupies its shard.
        let drawn = view.pick_shard(7).unwrap();
        assert_eq!(view.occupied().iter().collect::<Vec<_>>(), vec![drawn]);
        let other = Shard::all().find(|s| *s != drawn).unwrap();
        view.set_live(&[other].into_iter().collect());
        let occupied = view.occupied();
        assert!(occupied.contains(drawn) && occupied.contains(other));
        assert_eq!(occupied.len(), 2);
        view.set_live(&ShardSet::new());
        assert!(!view.occupied().contains(other));
    }

    #[test]
    fn the_shard_summary_counts_each_shard_once_per_role() {
        let view = View::new();
        assert_eq!(view.shard_summary(1).unowned, u32::from(SHARDS), "no map yet");
        let (map, members) = fleet(&[0, 1, 2]);
        view.set_me(Some(MemberId(0)));
        view.apply(&map, members.clone());
        let sum = view.shard_summary(1);
        assert_eq!(sum.map_version, map.version());
        assert_eq!(sum.members.len(), 3);
        let total = |f: fn(&MemberShardCount) -> u32| sum.members.values().map(f).sum::<u32>();
        assert_eq!(total(|c| c.owned) + sum.unowned, u32::from(SHARDS));
        assert_eq!(sum.unowned, 0);
        assert_eq!(total(|c| c.replica), u32::from(SHARDS), "one replica per shard");
        assert_eq!(total(|c| c.handing_over) + total(|c| c.taking_over), 0);
        assert_eq!(
            view.shard_summary(2)
                .members
                .values()
                .map(|c| c.replica)
                .sum::<u32>(),
            2 * u32::from(SHARDS)
        );
        assert_eq!(
            view.shard_summary(0)
                .members
                .values()
                .map(|c| c.replica)
                .sum::<u32>(),
            0
        );

        // Member 2 drains: every shard of its is marked to another member, and it is
        // nobody's replica any more.
        let reports: BTreeMap<_, _> = [0u16, 1, 2]
            .into_iter()
            .map(|n| {
                (
                    MemberId(n),
                    Report {
                        map_version: map.version(),
                        occupied: if n == 2 {
                            map.owned_by(MemberId(2))
                        } else {
                            ShardSet::new()
                        },
                        draining: n == 2,
                    },
                )
            })
            .collect();
        let marked = plan(&map, &reports).unwrap();
        let mut members = members;
        members.get_mut(&MemberId(2)).unwrap().load.draining = true;
        view.apply(&marked, members);
        let sum = view.shard_summary(1);
        let draining = sum.members[&MemberId(2)];
        assert_eq!(draining.handing_over, draining.owned);
        assert!(draining.owned > 300, "{draining:?}");
        assert_eq!(draining.replica, 0);
        assert_eq!(
            sum.members[&MemberId(0)].taking_over + sum.members[&MemberId(1)].taking_over,
            draining.handing_over
        );
    }
}
