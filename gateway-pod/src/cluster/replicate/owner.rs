//! The owner's side: the replicator task, one link per replica member, and the sequence
//! ceilings it reserves and raises once every replica of the SA acknowledged them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use concentrator_esp::SendCounter;
use concentrator_fleet::map::replicas;
use concentrator_fleet::replication::{Message, Records, Sequences, records};
use concentrator_fleet::wire::FleetKey;
use concentrator_fleet::{MemberId, Shard};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use zeroize::Zeroizing;

use super::{
    AbortOnDrop, ReplicationMetrics, Sessions, StreamError, current_lease, hello_exchange, read_record,
};
use crate::cluster::view::SharedView;
use crate::dataplane::table::SaCounters;

/// Sequence numbers reserved ahead of an SA's last one, at least.
pub const BLOCK: u64 = 65_536;
/// How often the owner looks at its SAs' sequence numbers and its replicas.
const TICK: Duration = Duration::from_millis(100);
/// How often inbound high-water marks are sent (the replay exposure after a take-over).
const TOPS_EVERY: Duration = Duration::from_secs(1);
/// A link that has sent nothing for this long sends a heartbeat.
const HEARTBEAT: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// A write that takes longer means a replica that does not read (stopped, or cut off): the
/// stream starts over.
const WRITE_STALL: Duration = Duration::from_secs(10);
/// Messages sealed into one write at most.
const WRITE_BATCH: usize = 4096;

/// A CHILD SA of a replicated IKE SA: its sequence state lives in its counters.
#[derive(Clone)]
pub struct ReplicatedChild {
    pub spi_in: u32,
    pub counters: Arc<SaCounters>,
}

/// What the driver tells the replicator.
pub enum ReplicaUpdate {
    /// IKE SA `id` (new or changed).
    Sa {
        shard: Shard,
        id: u64,
        snapshot: Zeroizing<Vec<u8>>,
        context: Vec<u8>,
        children: Vec<ReplicatedChild>,
    },
    /// IKE SA `id` is gone.
    Delete { id: u64 },
    /// IKE SA `id` was handed over and is gone here: the member it was handed to carries
    /// it on (its copy there is not deleted; the other replicas' are).
    Forget { id: u64 },
}

/// An IKE SA handed over with its shard: its final snapshot, taken after the driver
/// stopped handling it.
pub struct HandedSa {
    pub id: u64,
    pub snapshot: Zeroizing<Vec<u8>>,
    pub context: Vec<u8>,
    pub children: Vec<ReplicatedChild>,
}

/// What the driver asks of a whole shard.
enum ShardUpdate {
    Handover {
        shard: Shard,
        to: MemberId,
        sas: Vec<HandedSa>,
        state: Arc<HandoverState>,
    },
    Resume {
        shard: Shard,
    },
}

/// The owner's side: hands the driver's updates to the replicator task.
#[derive(Clone)]
pub struct Replicator {
    pending: Arc<Mutex<HashMap<u64, ReplicaUpdate>>>,
    shards: Arc<Mutex<Vec<ShardUpdate>>>,
    wake: Arc<Notify>,
    copies: usize,
}

impl Replicator {
    /// Starts the replicator task.
    pub(in crate::cluster) fn start(
        copies: usize,
        view: SharedView,
        key: FleetKey,
        metrics: ReplicationMetrics,
        sessions: Sessions,
    ) -> Self {
        let pending: Arc<Mutex<HashMap<u64, ReplicaUpdate>>> = Arc::default();
        let shards: Arc<Mutex<Vec<ShardUpdate>>> = Arc::default();
        let wake = Arc::new(Notify::new());
        tokio::spawn(
            Owner {
                copies,
                view,
                key,
                metrics,
                sessions,
                held: HashMap::new(),
                links: HashMap::new(),
                handovers: HashMap::new(),
                last_tops: Instant::now(),
            }
            .run(Arc::downgrade(&pending), shards.clone(), wake.clone()),
        );
        Self {
            pending,
            shards,
            wake,
            copies,
        }
    }

    /// On how many members each SA is copied (0: none; hand-overs only).
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// Hands `shard` over to `to`: its SAs (the final snapshots of all of them, which the
    /// driver no longer handles) are frozen in the data plane, sent there, and followed by
    /// the marker; once `to` acknowledged it, the view says the shard is handed over.
    pub fn hand_over(&self, shard: Shard, to: MemberId, sas: Vec<HandedSa>, state: Arc<HandoverState>) {
        self.shard_update(ShardUpdate::Handover {
            shard,
            to,
            sas,
            state,
        });
    }

    /// Carries `shard`'s SAs on here after all (the driver gave the hand-over up with
    /// [`HandoverState::cancel`], or the leader took the mark back).
    pub fn resume(&self, shard: Shard) {
        self.shard_update(ShardUpdate::Resume { shard });
    }

    fn shard_update(&self, u: ShardUpdate) {
        self.shards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(u);
        self.wake.notify_one();
    }

    /// Queues an SA's update. Only the latest per SA is kept: a replicator that falls
    /// behind holds one update per SA, never a backlog of them.
    pub fn update(&self, u: ReplicaUpdate) {
        let id = match &u {
            ReplicaUpdate::Sa { id, .. } | ReplicaUpdate::Delete { id } | ReplicaUpdate::Forget { id } => *id,
        };
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, u);
        self.wake.notify_one();
    }
}

/// An SA as the owner replicates it.
struct Held {
    shard: Shard,
    snapshot: Zeroizing<Vec<u8>>,
    context: Vec<u8>,
    children: Vec<Child>,
    /// The replicas it was last sent to, and their links' connections then.
    sent_to: Vec<(MemberId, u64)>,
    /// Changed since it was last sent.
    dirty: bool,
    /// Handed over (or being): never sent again, its sequence numbers frozen.
    frozen: bool,
}

/// A shard being handed over.
struct Handing {
    to: MemberId,
    /// The link's connection its final state went on (`None`: not sent yet); a new
    /// connection starts with a Reset, so it is sent again.
    sent_on: Option<u64>,
    ack: Arc<HandedAck>,
}

/// Where a hand-over stands, shared by the driver (which may give it up) and the link
/// (which sees it acknowledged): exactly one of the two wins.
#[derive(Debug, Default)]
pub struct HandoverState(std::sync::atomic::AtomicU8);

const PENDING: u8 = 0;
const ACKNOWLEDGED: u8 = 1;
const CANCELLED: u8 = 2;

impl HandoverState {
    /// Whether the new owner acknowledged the final state (it may carry the SAs on as soon
    /// as the map gives it the shard).
    pub fn acknowledged(&self) -> bool {
        self.0.load(Ordering::Acquire) == ACKNOWLEDGED
    }

    /// Gives the hand-over up unless it was acknowledged; true if given up.
    pub fn cancel(&self) -> bool {
        self.0
            .compare_exchange(PENDING, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Tells the view a shard is handed over once its marker is acknowledged.
struct HandedAck {
    shard: Shard,
    to: MemberId,
    view: SharedView,
    state: Arc<HandoverState>,
}

impl HandedAck {
    fn acknowledged(&self) {
        let won = self
            .state
            .0
            .compare_exchange(PENDING, ACKNOWLEDGED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if won {
            tracing::debug!(shard = %self.shard, member = %self.to, "hand-over acknowledged");
            self.view.set_handed(self.shard, Some(self.to));
        }
    }
}

struct Child {
    spi_in: u32,
    counters: Arc<SaCounters>,
    /// The last inbound top sent, and the outbound sequence number a second ago (the rate).
    top_sent: u64,
    last_seen: u64,
    rate: u64,
    /// The final ceiling a hand-over sent: if it is given up, the SA sends no higher until
    /// its replicas acknowledged more (the target may have replaced a higher copy with it).
    handed_ceiling: Option<u64>,
}

impl Child {
    /// `c`, with what the owner measured of it in its previous version `old`, if any.
    fn carried_over(c: ReplicatedChild, old: Option<&Held>) -> Self {
        let prev = old.and_then(|o| o.children.iter().find(|p| p.spi_in == c.spi_in));
        Self {
            spi_in: c.spi_in,
            top_sent: prev.map_or(0, |p| p.top_sent),
            last_seen: prev.map_or(0, |p| p.last_seen),
            rate: prev.map_or(0, |p| p.rate),
            handed_ceiling: prev.and_then(|p| p.handed_ceiling),
            counters: c.counters,
        }
    }

    fn send(&self) -> Option<&Arc<SendCounter>> {
        self.counters.send_counter()
    }

    /// Numbers to reserve ahead: a block, or two seconds of this SA's traffic.
    fn block(&self) -> u64 {
        BLOCK.max(self.rate.saturating_mul(2))
    }
}

/// A ceiling to raise once every replica of its SA acknowledged it: a replica that takes the
/// SA over starts above the ceiling it knows, so none may know less than the owner uses.
struct Raise {
    counter: Arc<SendCounter>,
    value: u64,
    /// Replicas yet to acknowledge.
    remaining: AtomicUsize,
}

impl Raise {
    fn acknowledged(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Never raise past "no ceiling" nor lower what is acknowledged.
            let cur = self.counter.ceiling();
            if cur != u64::MAX && self.value > cur {
                self.counter.set_ceiling(self.value);
            }
        }
    }
}

/// Ceilings to raise once the replicas acknowledged them.
type Ceilings = Vec<Arc<Raise>>;

/// One message for a link, and the ceilings to apply once the replica acknowledged it.
struct Outgoing {
    message: Message,
    kind: &'static str,
    ceilings: Ceilings,
    /// A hand-over's marker: done once acknowledged.
    handed: Option<Arc<HandedAck>>,
}

/// Dropped, it closes the link's channel: the link sends what was queued (the Deletes that
/// tell the old replica to forget its copies) and ends.
struct LinkHandle {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Raised at each new connection: everything must be sent again.
    connection: Arc<AtomicU64>,
    /// Messages queued and not yet written, and whether the link gave up on its queue.
    queue: Arc<LinkQueue>,
}

/// The queue of a link to a replica that does not keep up (stopped, or its network slow): past
/// a bound the link drops its connection and the queue, and the next connection starts over
/// with a Reset and every SA, so a stuck replica costs the owner one copy of its SAs at most.
#[derive(Default)]
struct LinkQueue {
    queued: AtomicUsize,
    overflowed: std::sync::atomic::AtomicBool,
}

impl LinkQueue {
    fn took(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Messages a link may have queued beyond two per SA held (a whole copy and its sequences).
const LINK_QUEUE_SLACK: usize = 65_536;

impl LinkHandle {
    /// Queues `out` unless the link is over its bound (`limit` messages).
    fn send(&self, out: Outgoing, limit: usize) {
        let q = &self.queue;
        if q.overflowed.load(Ordering::Acquire) {
            return;
        }
        if q.queued.load(Ordering::Acquire) >= limit {
            q.overflowed.store(true, Ordering::Release);
            tracing::warn!(limit, "replica does not keep up: its stream starts over");
            return;
        }
        q.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(out).is_err() {
            q.took(1);
        }
    }
}

struct Owner {
    /// Replicas per shard.
    copies: usize,
    view: SharedView,
    key: FleetKey,
    metrics: ReplicationMetrics,
    sessions: Sessions,
    held: HashMap<u64, Held>,
    links: HashMap<MemberId, LinkHandle>,
    handovers: HashMap<Shard, Handing>,
    last_tops: Instant,
}

impl Owner {
    /// Ends once every [`Replicator`] handle is gone.
    async fn run(
        mut self,
        pending: Weak<Mutex<HashMap<u64, ReplicaUpdate>>>,
        shards: Arc<Mutex<Vec<ShardUpdate>>>,
        wake: Arc<Notify>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let woken = tokio::select! {
                () = wake.notified() => true,
                _ = tick.tick() => false,
            };
            let Some(pending) = pending.upgrade() else {
                return;
            };
            if !woken {
                self.sync(None);
                self.send_handovers();
                continue;
            }
            let updates =
                std::mem::take(&mut *pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            // Only the SAs that changed: a walk over every SA per update would cost as much
            // as the exchanges at tens of thousands of tunnels.
            let changed: Vec<u64> = updates.into_values().map(|u| self.apply(u)).collect();
            self.sync(Some(&changed));
            let ops = std::mem::take(&mut *shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            for op in ops {
                match op {
                    ShardUpdate::Handover {
                        shard,
                        to,
                        sas,
                        state,
                    } => {
                        // An update of one of them queued before the driver froze it must
                        // not follow the final state.
                        let mut p = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        for sa in &sas {
                            p.remove(&sa.id);
                        }
                        drop(p);
                        self.freeze(shard, to, sas, state);
                    }
                    ShardUpdate::Resume { shard } => self.resume(shard),
                }
            }
            drop(pending);
            self.send_handovers();
        }
    }

    /// Takes the driver's update in; returns the SA's id.
    fn apply(&mut self, u: ReplicaUpdate) -> u64 {
        match u {
            ReplicaUpdate::Sa {
                shard,
                id,
                snapshot,
                context,
                children,
            } => {
                if self.held.get(&id).is_some_and(|h| h.frozen) {
                    return id;
                }
                let old = self.held.remove(&id);
                let children = children
                    .into_iter()
                    .map(|c| Child::carried_over(c, old.as_ref()))
                    .collect();
                // Changed: sent again to the replicas at once.
                self.held.insert(
                    id,
                    Held {
                        shard,
                        snapshot,
                        context,
                        children,
                        sent_to: old.map(|o| o.sent_to).unwrap_or_default(),
                        dirty: true,
                        frozen: false,
                    },
                );
                id
            }
            ReplicaUpdate::Delete { id } => {
                if let Some(h) = self.held.remove(&id) {
                    for (m, _) in h.sent_to {
                        self.delete_at(m, id);
                    }
                    if !self.held.values().any(|o| o.shard == h.shard) {
                        self.handovers.remove(&h.shard);
                    }
                }
                id
            }
            ReplicaUpdate::Forget { id } => {
                if let Some(h) = self.held.remove(&id) {
                    let to = self.handovers.get(&h.shard).map(|x| x.to);
                    for (m, _) in h.sent_to {
                        if Some(m) != to {
                            self.delete_at(m, id);
                        }
                    }
                    if !self.held.values().any(|o| o.shard == h.shard) {
                        self.handovers.remove(&h.shard);
                    }
                }
                id
            }
        }
    }

    /// Sends each SA (of `only`, or all) to its shard's replicas that have not got it (new,
    /// changed, a new replica or a new connection), and moves sequence ceilings and inbound
    /// tops on.
    fn sync(&mut self, only: Option<&[u64]>) {
        let Some(me) = self.view.me() else {
            // Without a session we cannot tell who the replica is: ceilings stay as they are
            // (an owner cut off from etcd stops at its last acknowledged one).
            return;
        };
        let members: Vec<MemberId> = self
            .view
            .members()
            .into_iter()
            .filter(|(_, r)| !r.load.draining)
            .map(|(m, _)| m)
            .collect();
        let limit = self.link_limit();
        let tops_due = only.is_none() && self.last_tops.elapsed() >= TOPS_EVERY;
        if tops_due {
            self.last_tops = Instant::now();
        }
        let ids: Vec<u64> = match only {
            Some(ids) => ids.to_vec(),
            None => self.held.keys().copied().collect(),
        };
        let mut wanted: HashSet<MemberId> = HashSet::new();
        let mut sequences: BTreeMap<MemberId, (Vec<Sequences>, Ceilings)> = BTreeMap::new();
        for id in ids {
            let Some(h) = self.held.get_mut(&id).filter(|h| !h.frozen) else {
                continue;
            };
            if tops_due {
                for c in &mut h.children {
                    let last = c.send().map_or(0, |s| s.last());
                    c.rate = last.saturating_sub(c.last_seen);
                    c.last_seen = last;
                }
            }
            let targets = replicas(h.shard, me, &members, self.copies);
            if targets.is_empty() {
                // Alone: nobody could carry the SA on, so nobody could reuse its numbers
                // (but the one a given-up hand-over left a final copy with).
                for c in &h.children {
                    if let Some(s) = c.send() {
                        s.set_ceiling(c.handed_ceiling.unwrap_or(u64::MAX));
                    }
                }
                h.sent_to.clear();
                continue;
            }
            let mut now_sent = Vec::with_capacity(targets.len());
            for t in &targets {
                wanted.insert(*t);
                let link = self.links.entry(*t).or_insert_with(|| {
                    spawn_link(
                        me,
                        *t,
                        self.view.clone(),
                        self.key.clone(),
                        self.metrics.clone(),
                        self.sessions.clone(),
                    )
                });
                now_sent.push((*t, link.connection.load(Ordering::Acquire)));
            }
            // The whole SA to a replica that has not got this version of it (new, changed,
            // a new replica or a new connection); the sequences that moved to the others.
            let full: Vec<MemberId> = now_sent
                .iter()
                .filter(|t| h.dirty || !h.sent_to.contains(t))
                .map(|(t, _)| *t)
                .collect();
            // An old replica must not keep a copy it could adopt with an old ceiling.
            let old: Vec<MemberId> = h
                .sent_to
                .iter()
                .map(|(m, _)| *m)
                .filter(|m| !targets.contains(m))
                .collect();
            let mut every = Vec::with_capacity(h.children.len());
            let mut moved = Vec::new();
            let mut raises: Ceilings = Vec::new();
            for c in &mut h.children {
                let (ceiling, raise) = reserve(c);
                let top = c.counters.inbound_top();
                let top_moved = tops_due && top != c.top_sent;
                if let (Some(s), Some(v)) = (c.send(), raise) {
                    raises.push(Arc::new(Raise {
                        counter: s.clone(),
                        value: v,
                        remaining: AtomicUsize::new(targets.len()),
                    }));
                }
                let seq = Sequences {
                    spi_in: c.spi_in,
                    ceiling,
                    top,
                };
                if raise.is_some() || top_moved {
                    c.top_sent = top;
                    moved.push(seq);
                }
                every.push(seq);
            }
            for t in &targets {
                if full.contains(t) {
                    if let Some(link) = self.links.get(t) {
                        link.send(
                            Outgoing {
                                message: Message::Sa {
                                    shard: h.shard,
                                    id,
                                    snapshot: h.snapshot.clone(),
                                    context: h.context.clone(),
                                    children: every.clone(),
                                },
                                kind: "sa",
                                ceilings: raises.clone(),
                                handed: None,
                            },
                            limit,
                        );
                    }
                } else if !moved.is_empty() {
                    let entry = sequences.entry(*t).or_default();
                    entry.0.extend(moved.iter().copied());
                    entry.1.extend(raises.iter().cloned());
                }
            }
            h.sent_to = now_sent;
            h.dirty = false;
            for m in old {
                self.delete_at(m, id);
            }
        }
        for (target, (seqs, ceilings)) in sequences {
            if seqs.is_empty() {
                continue;
            }
            if let Some(link) = self.links.get(&target) {
                link.send(
                    Outgoing {
                        message: Message::Sequences(seqs),
                        kind: "sequences",
                        ceilings,
                        handed: None,
                    },
                    limit,
                );
            }
        }
        // Only a walk over every SA knows which links are still wanted.
        if only.is_none() {
            wanted.extend(self.handovers.values().map(|h| h.to));
            self.links.retain(|m, _| wanted.contains(m));
        }
    }
}

impl Owner {
    /// Tells replica `m` to forget its copy of SA `id`.
    fn delete_at(&self, m: MemberId, id: u64) {
        if let Some(link) = self.links.get(&m) {
            link.send(
                Outgoing {
                    message: Message::Delete { id },
                    kind: "delete",
                    ceilings: Vec::new(),
                    handed: None,
                },
                self.link_limit(),
            );
        }
    }

    /// Freezes `shard`'s SAs (their final snapshots in `sas`) for the hand-over to `to`.
    fn freeze(&mut self, shard: Shard, to: MemberId, sas: Vec<HandedSa>, state: Arc<HandoverState>) {
        for sa in sas {
            let old = self.held.remove(&sa.id);
            let children: Vec<Child> = sa
                .children
                .into_iter()
                .map(|c| {
                    // Inbound first: the top read when the final state goes out is exact.
                    c.counters.freeze(true);
                    Child::carried_over(c, old.as_ref())
                })
                .collect();
            self.held.insert(
                sa.id,
                Held {
                    shard,
                    snapshot: sa.snapshot,
                    context: sa.context,
                    children,
                    sent_to: old.map(|o| o.sent_to).unwrap_or_default(),
                    dirty: false,
                    frozen: true,
                },
            );
        }
        let ack = Arc::new(HandedAck {
            shard,
            to,
            view: self.view.clone(),
            state,
        });
        self.handovers.insert(
            shard,
            Handing {
                to,
                sent_on: None,
                ack,
            },
        );
    }

    /// Carries `shard`'s frozen SAs on here (the hand-over was given up).
    fn resume(&mut self, shard: Shard) {
        let Some(h) = self.handovers.remove(&shard) else {
            return;
        };
        self.view.set_handed(shard, None);
        let ids: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, x)| x.shard == shard && x.frozen)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(x) = self.held.get_mut(&id) else { continue };
            x.frozen = false;
            x.dirty = true;
            // The target may hold the final copy (its ceiling) and keep it: a replica gets
            // the current one at the next sync, and its acknowledgement lifts the cap below;
            // another member only a Delete, which a broken stream may lose, so those CHILD
            // SAs stay capped for good (the driver rekeys them).
            let replica = x.sent_to.iter().any(|(m, _)| *m == h.to);
            for c in &mut x.children {
                if let (Some(f), Some(s)) = (c.handed_ceiling, c.send())
                    && s.ceiling() > f
                {
                    s.set_ceiling(f);
                }
                if replica {
                    c.handed_ceiling = None;
                }
                c.counters.freeze(false);
            }
            if !replica {
                self.delete_at(h.to, id);
            }
        }
        let changed: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, x)| x.shard == shard)
            .map(|(id, _)| *id)
            .collect();
        self.sync(Some(&changed));
    }

    /// Sends the final state of each shard being handed over, and its marker, on the link
    /// to its new owner, and again on each new connection (which starts with a Reset) while
    /// the shard is ours: acknowledged or not, the new owner needs it until the map moves
    /// the shard, and one that has carried the SAs on already ignores it.
    fn send_handovers(&mut self) {
        let Some(me) = self.view.me() else { return };
        let limit = self.link_limit();
        let shards: Vec<Shard> = self.handovers.keys().copied().collect();
        for shard in shards {
            let Some(h) = self.handovers.get(&shard) else {
                continue;
            };
            if self.view.owner(shard) != Some(me) {
                continue;
            }
            let to = h.to;
            let link = self.links.entry(to).or_insert_with(|| {
                spawn_link(
                    me,
                    to,
                    self.view.clone(),
                    self.key.clone(),
                    self.metrics.clone(),
                    self.sessions.clone(),
                )
            });
            let connection = link.connection.load(Ordering::Acquire);
            if connection == 0 || h.sent_on == Some(connection) {
                // Not connected yet, or sent on this connection already.
                continue;
            }
            for (id, x) in self.held.iter_mut().filter(|(_, x)| x.shard == shard && x.frozen) {
                let children = x
                    .children
                    .iter_mut()
                    .map(|c| {
                        let ceiling = c.send().map_or(0, frozen_ceiling);
                        c.handed_ceiling = Some(ceiling);
                        Sequences {
                            spi_in: c.spi_in,
                            ceiling,
                            top: c.counters.inbound_top(),
                        }
                    })
                    .collect();
                link.send(
                    Outgoing {
                        message: Message::Sa {
                            shard,
                            id: *id,
                            snapshot: x.snapshot.clone(),
                            context: x.context.clone(),
                            children,
                        },
                        kind: "handover",
                        ceilings: Vec::new(),
                        handed: None,
                    },
                    limit,
                );
            }
            link.send(
                Outgoing {
                    message: Message::Handover { shard, to },
                    kind: "handover",
                    ceilings: Vec::new(),
                    handed: Some(h.ack.clone()),
                },
                limit,
            );
            if let Some(h) = self.handovers.get_mut(&shard) {
                h.sent_on = Some(connection);
            }
        }
    }

    /// How many messages a link may have queued.
    fn link_limit(&self) -> usize {
        self.held.len().saturating_mul(2).saturating_add(LINK_QUEUE_SLACK)
    }
}

/// Numbers a frozen SA's data plane may still have taken after the freeze was read (a packet
/// of each worker that passed the check just before it): the new owner starts above them.
const FROZEN_MARGIN: u64 = 1024;

/// The highest sequence number a frozen SA may have used, for its new owner to start above:
/// its last one and the margin, never above its ceiling (none without replicas).
fn frozen_ceiling(s: &Arc<SendCounter>) -> u64 {
    s.ceiling().min(s.last().saturating_add(FROZEN_MARGIN))
}

/// The ceiling to tell the replica for `c`, and the value to raise ours to once it is
/// acknowledged (`None`: nothing to raise). A fresh SA (no ceiling yet) is limited at once.
fn reserve(c: &Child) -> (u64, Option<u64>) {
    let Some(s) = c.send() else {
        return (0, None);
    };
    let (last, ceiling) = (s.last(), s.ceiling());
    let block = c.block();
    // Never above the final ceiling of a hand-over given up to a member that may keep it.
    let cap = c.handed_ceiling.unwrap_or(u64::MAX);
    if ceiling == u64::MAX {
        // Lowering is safe at once; the replica learns the same value.
        let v = last.saturating_add(block).min(cap);
        s.set_ceiling(v);
        return (v, None);
    }
    if last.saturating_add(block / 2) > ceiling && ceiling < cap {
        let v = last.saturating_add(block).min(cap);
        return (v, Some(v));
    }
    (ceiling, None)
}

fn spawn_link(
    me: MemberId,
    peer: MemberId,
    view: SharedView,
    key: FleetKey,
    metrics: ReplicationMetrics,
    sessions: Sessions,
) -> LinkHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let connection = Arc::new(AtomicU64::new(0));
    let queue = Arc::new(LinkQueue::default());
    tokio::spawn(link(
        (me, peer),
        view,
        key,
        metrics,
        sessions,
        (rx, queue.clone()),
        connection.clone(),
    ));
    LinkHandle {
        tx,
        connection,
        queue,
    }
}

/// The connection to one replica, made again whenever it breaks or our etcd session
/// changes (a stream counts only under the lease it was opened with).
async fn link(
    (me, peer): (MemberId, MemberId),
    view: SharedView,
    key: FleetKey,
    metrics: ReplicationMetrics,
    sessions: Sessions,
    (mut rx, queue): (mpsc::UnboundedReceiver<Outgoing>, Arc<LinkQueue>),
    connection: Arc<AtomicU64>,
) {
    loop {
        if let (Some(addr), Some(lease)) = (view.address(peer), current_lease(&sessions)) {
            match connect(me, lease, addr, &key).await {
                Ok((stream, tx, rxr)) => {
                    tracing::debug!(member = %peer, %addr, "replication stream open");
                    connection.fetch_add(1, Ordering::AcqRel);
                    let r =
                        stream_to(stream, (tx, rxr), (&mut rx, &queue), &metrics, (&sessions, lease)).await;
                    if let Err(e) = r {
                        tracing::debug!(member = %peer, error = %e, "replication stream ended");
                    }
                }
                Err(e) => tracing::debug!(member = %peer, %addr, error = %e, "replication connect failed"),
            }
        }
        if rx.is_closed() {
            return;
        }
        // Messages for the broken connection are dropped: the next one starts with a Reset
        // and every SA again.
        while rx.try_recv().is_ok() {
            queue.took(1);
        }
        queue.overflowed.store(false, Ordering::Release);
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

async fn connect(
    me: MemberId,
    lease: i64,
    addr: SocketAddr,
    key: &FleetKey,
) -> Result<(TcpStream, Records, Records), StreamError> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| StreamError::Timeout)??;
    stream.set_nodelay(true)?;
    let (mine, theirs) = hello_exchange(&mut stream, me, lease).await?;
    let (tx, rx) = records(key, true, &mine, &theirs)?;
    Ok((stream, tx, rx))
}

/// Sends the owner's messages on one connection and applies the replica's acknowledgements.
async fn stream_to(
    stream: TcpStream,
    (mut tx, mut rxr): (Records, Records),
    (rx, queue): (&mut mpsc::UnboundedReceiver<Outgoing>, &LinkQueue),
    metrics: &ReplicationMetrics,
    (sessions, lease): (&Sessions, i64),
) -> Result<(), StreamError> {
    let (mut read, mut write) = stream.into_split();
    let mut sent: u64 = 0;
    let mut pending: VecDeque<(u64, Ceilings, Option<Arc<HandedAck>>)> = VecDeque::new();
    let mut out = Vec::new();
    let send = |m: &Message, kind: &str, out: &mut Vec<u8>, tx: &mut Records| -> Result<(), StreamError> {
        let before = out.len();
        tx.seal(&m.encode(), out)?;
        ReplicationMetrics::count(&metrics.bytes_sent, kind, (out.len() - before) as u64);
        Ok(())
    };
    send(&Message::Reset, "reset", &mut out, &mut tx)?;
    sent += 1;
    write.write_all(&out).await?;
    out.clear();
    // Acknowledgements are read on their own task: a replica's answer must not wait for
    // our next write.
    let (acks_tx, mut acks) = mpsc::unbounded_channel::<Result<u64, StreamError>>();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            let r = async {
                read_record(&mut read, &mut buf).await?;
                match Message::decode(rxr.open(&mut buf)?)? {
                    Message::Ack(n) => Ok(n),
                    _ => Err(StreamError::Unexpected),
                }
            }
            .await;
            let end = r.is_err();
            if acks_tx.send(r).is_err() || end {
                return;
            }
        }
    });
    let _guard = AbortOnDrop(reader);
    let mut idle = tokio::time::interval(HEARTBEAT);
    loop {
        if queue.overflowed.load(Ordering::Acquire) {
            return Err(StreamError::Timeout);
        }
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { return Ok(()) };
                let mut batch = vec![m];
                while batch.len() < WRITE_BATCH
                    && let Ok(m) = rx.try_recv()
                {
                    batch.push(m);
                }
                queue.took(batch.len());
                for m in batch {
                    send(&m.message, m.kind, &mut out, &mut tx)?;
                    sent += 1;
                    if !m.ceilings.is_empty() || m.handed.is_some() {
                        pending.push_back((sent, m.ceilings, m.handed));
                    }
                }
                tokio::time::timeout(WRITE_STALL, write.write_all(&out))
                    .await
                    .map_err(|_| StreamError::Timeout)??;
                out.clear();
                idle.reset();
            }
            a = acks.recv() => {
                let n = a.ok_or(StreamError::Unexpected)??;
                while pending.front().is_some_and(|(i, ..)| *i <= n) {
                    if let Some((_, ceilings, handed)) = pending.pop_front() {
                        for r in ceilings {
                            r.acknowledged();
                        }
                        if let Some(h) = handed {
                            h.acknowledged();
                        }
                    }
                }
            }
            _ = idle.tick() => {
                if current_lease(sessions) != Some(lease) {
                    return Err(StreamError::Stale);
                }
                send(&Message::Heartbeat, "heartbeat", &mut out, &mut tx)?;
                sent += 1;
                tokio::time::timeout(WRITE_STALL, write.write_all(&out))
                    .await
                    .map_err(|_| StreamError::Timeout)??;
                out.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(rate: u64) -> (Child, Arc<SendCounter>) {
        let send = Arc::new(SendCounter::new(0));
        let counters = Arc::new(SaCounters::new(Instant::now()).sending(send.clone()));
        (
            Child {
                spi_in: 1,
                counters,
                top_sent: 0,
                last_seen: 0,
                rate,
                handed_ceiling: None,
            },
            send,
        )
    }

    #[test]
    fn a_fresh_sa_is_limited_at_once_and_raised_only_near_its_ceiling() {
        let (c, send) = child(0);
        let (v, raise) = reserve(&c);
        assert_eq!((v, raise), (BLOCK, None));
        assert_eq!(send.ceiling(), BLOCK, "lowered before the replica hears it");
        // Far from the ceiling: nothing to ask.
        assert_eq!(reserve(&c), (BLOCK, None));
    }

    #[test]
    fn a_ceiling_is_raised_once_every_replica_acknowledged_it() {
        let send = Arc::new(SendCounter::new(0));
        send.set_ceiling(BLOCK);
        let raise = Raise {
            counter: send.clone(),
            value: 2 * BLOCK,
            remaining: AtomicUsize::new(2),
        };
        raise.acknowledged();
        assert_eq!(send.ceiling(), BLOCK, "one of two replicas");
        raise.acknowledged();
        assert_eq!(send.ceiling(), 2 * BLOCK);
    }

    #[test]
    fn a_link_over_its_bound_stops_queueing_and_starts_over() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let link = LinkHandle {
            tx,
            connection: Arc::default(),
            queue: Arc::default(),
        };
        let beat = || Outgoing {
            message: Message::Heartbeat,
            kind: "heartbeat",
            ceilings: Vec::new(),
            handed: None,
        };
        for _ in 0..5 {
            link.send(beat(), 2);
        }
        assert_eq!(link.queue.queued.load(Ordering::Acquire), 2);
        assert!(link.queue.overflowed.load(Ordering::Acquire));
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 2, "nothing queued past the bound");
    }

    #[test]
    fn a_handover_is_either_acknowledged_or_given_up_never_both() {
        let view: SharedView = Arc::new(crate::cluster::View::new());
        let shard = Shard::new(4).unwrap();
        let ack = |state: &Arc<HandoverState>| HandedAck {
            shard,
            to: MemberId(2),
            view: view.clone(),
            state: state.clone(),
        };
        // Acknowledged first: the driver can no longer give it up.
        let state = Arc::new(HandoverState::default());
        ack(&state).acknowledged();
        assert!(state.acknowledged());
        assert!(!state.cancel());
        assert_eq!(view.handed_to(shard), Some(MemberId(2)));
        // Given up first: a late acknowledgement changes nothing.
        view.set_handed(shard, None);
        let state = Arc::new(HandoverState::default());
        assert!(state.cancel());
        ack(&state).acknowledged();
        assert!(!state.acknowledged());
        assert_eq!(view.handed_to(shard), None);
    }

    #[test]
    fn a_frozen_sa_hands_over_its_last_number_and_a_margin_within_its_ceiling() {
        let send = Arc::new(SendCounter::new(500));
        // No replica: no ceiling, the last number decides.
        assert_eq!(frozen_ceiling(&send), 500 + FROZEN_MARGIN);
        send.set_ceiling(800);
        assert_eq!(frozen_ceiling(&send), 800, "never above what may have been sent");
    }

    #[test]
    fn a_capped_sa_never_reserves_past_its_cap() {
        let (mut c, send) = child(0);
        c.handed_ceiling = Some(100);
        assert_eq!(reserve(&c), (100, None));
        assert_eq!(send.ceiling(), 100);
        assert_eq!(reserve(&c), (100, None), "near the cap, nothing more is asked");
    }

    #[test]
    fn a_fast_sa_reserves_two_seconds_ahead() {
        let (c, _) = child(1_000_000);
        assert_eq!(reserve(&c).0, 2_000_000);
    }
}
