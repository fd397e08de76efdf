//! SA replication (DESIGN.md §5, stateful takeover): each shard's owner copies the SAs it
//! holds there to the shard's replica ([`concentrator_fleet::map::replica`]), over the
//! replication stream ([`concentrator_fleet::replication`]) on TCP at the member's fleet
//! address; the replica keeps the copies ([`ReplicaStore`]) and the driver adopts them when
//! the leader gives it the shards of a member that is gone.
//!
//! Outbound sequence numbers are never used twice under one key: the owner's data plane
//! stops at a ceiling ([`concentrator_esp::SendCounter`]) that the replica has
//! acknowledged; it reserves [`BLOCK`] numbers ahead (more for a fast SA) and asks for more
//! when half are used. A pod that adopts the SA starts above the ceiling, so even an owner
//! that was only frozen, and wakes up after the take-over, sends no number the new owner
//! sends. The owner's own ceiling is lowered before the replica hears it (safe at once), and
//! raised only once the replica acknowledged it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concentrator_esp::SendCounter;
use concentrator_fleet::map::replica;
use concentrator_fleet::replication::{
    HELLO_LEN, Hello, Message, Records, ReplicationError, Sequences, records,
};
use concentrator_fleet::wire::FleetKey;
use concentrator_fleet::{MemberId, Shard};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::view::SharedView;
use crate::dataplane::table::SaCounters;
use crate::metrics::ReasonLabel;

/// Sequence numbers reserved ahead of an SA's last one, at least.
pub const BLOCK: u64 = 65_536;
/// How often the owner looks at its SAs' sequence numbers and its replicas.
const TICK: Duration = Duration::from_millis(100);
/// How often inbound high-water marks are sent (the replay exposure after a take-over).
const TOPS_EVERY: Duration = Duration::from_secs(1);
/// A link that has sent nothing for this long sends a heartbeat.
const HEARTBEAT: Duration = Duration::from_millis(100);
/// An owner whose copies we hold and whose stream has been silent this long is probed; if
/// it does not answer, its lease is revoked (it is dead or hung), so that its shards go to
/// their replicas now rather than when the lease runs out.
const SUSPECT_AFTER: Duration = Duration::from_millis(600);
/// How long a probed owner has to answer a hello.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// How often the replica looks at its owners' streams.
const WATCH_EVERY: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// What one side may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// Replication metrics (`concentrator_gateway_fleet_replication_*`).
#[derive(Clone, Debug, Default)]
pub struct ReplicationMetrics {
    /// Bytes sent on replication streams (record layer included), by kind of message.
    pub bytes_sent: Family<ReasonLabel, Counter>,
    /// Messages applied as a replica.
    pub applied: Counter,
    /// Streams refused or ended by bad input, by reason.
    pub refused: Family<ReasonLabel, Counter>,
    /// IKE SAs adopted from a member that is gone.
    pub adopted: Counter,
    /// Copies that could not be adopted, by reason.
    pub adopt_failed: Family<ReasonLabel, Counter>,
    /// SAs given up because their shard is no longer ours (this pod was fenced).
    pub stepped_down: Counter,
    /// Copies of other members' IKE SAs held here.
    pub copies: Gauge,
    /// Owners found silent and probed, by outcome: `revoked` (no answer: lease revoked),
    /// `alive` (answered: stale copies dropped), `error` (etcd did not take the revocation).
    pub suspected: Family<ReasonLabel, Counter>,
}

impl ReplicationMetrics {
    pub(crate) fn count(family: &Family<ReasonLabel, Counter>, reason: &str, n: u64) {
        family
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }

    /// Registers them in `r`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "fleet_replication_bytes",
            "Bytes sent to replicas, by message kind (sa, sequences, delete, heartbeat)",
            self.bytes_sent.clone(),
        );
        r.register(
            "fleet_replication_applied",
            "Replication messages applied as a replica",
            self.applied.clone(),
        );
        r.register(
            "fleet_replication_refused",
            "Replication streams refused or ended by bad input, by reason",
            self.refused.clone(),
        );
        r.register(
            "fleet_adopted_sas",
            "IKE SAs carried on after their owner was gone",
            self.adopted.clone(),
        );
        r.register(
            "fleet_adopt_failures",
            "Replicated IKE SAs that could not be carried on, by reason",
            self.adopt_failed.clone(),
        );
        r.register(
            "fleet_replica_sas",
            "Copies of other members' IKE SAs this member holds as their replica",
            self.copies.clone(),
        );
        r.register(
            "fleet_suspected_owners",
            "Owners whose replication stream went silent, by outcome of the probe (revoked, alive, error)",
            self.suspected.clone(),
        );
        r.register(
            "fleet_stepped_down_sas",
            "SAs given up because their shard went to another member (this pod was fenced)",
            self.stepped_down.clone(),
        );
    }
}

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
}

/// The owner's side: hands the driver's updates to the replicator task.
#[derive(Clone)]
pub struct Replicator {
    tx: mpsc::UnboundedSender<ReplicaUpdate>,
}

/// The etcd sessions of this pod, one after another.
pub(super) type Sessions = tokio::sync::watch::Receiver<Option<super::SessionLease>>;

/// The lease of the current session, if there is one.
fn current_lease(sessions: &Sessions) -> Option<i64> {
    sessions.borrow().as_ref().map(super::SessionLease::lease_id)
}

impl Replicator {
    /// Starts the replicator task.
    pub(super) fn start(
        view: SharedView,
        key: FleetKey,
        metrics: ReplicationMetrics,
        sessions: Sessions,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(
            Owner {
                view,
                key,
                metrics,
                sessions,
                held: HashMap::new(),
                links: HashMap::new(),
                last_tops: Instant::now(),
            }
            .run(rx),
        );
        Self { tx }
    }

    pub fn update(&self, u: ReplicaUpdate) {
        let _ = self.tx.send(u);
    }
}

/// An SA as the owner replicates it.
struct Held {
    shard: Shard,
    snapshot: Zeroizing<Vec<u8>>,
    context: Vec<u8>,
    children: Vec<Child>,
    /// The replica it was last sent to, and that link's connection then.
    sent_to: Option<(MemberId, u64)>,
}

struct Child {
    spi_in: u32,
    counters: Arc<SaCounters>,
    /// The last inbound top sent, and the outbound sequence number a second ago (the rate).
    top_sent: u64,
    last_seen: u64,
    rate: u64,
}

impl Child {
    fn send(&self) -> Option<&Arc<SendCounter>> {
        self.counters.send_counter()
    }

    /// Numbers to reserve ahead: a block, or two seconds of this SA's traffic.
    fn block(&self) -> u64 {
        BLOCK.max(self.rate.saturating_mul(2))
    }
}

/// Ceilings to raise once the replica acknowledged them.
type Ceilings = Vec<(Arc<SendCounter>, u64)>;

/// One message for a link, and the ceilings to apply once the replica acknowledged it.
struct Outgoing {
    message: Message,
    kind: &'static str,
    ceilings: Ceilings,
}

/// Dropped, it closes the link's channel: the link sends what was queued (the Deletes that
/// tell the old replica to forget its copies) and ends.
struct LinkHandle {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Raised at each new connection: everything must be sent again.
    connection: Arc<AtomicU64>,
}

struct Owner {
    view: SharedView,
    key: FleetKey,
    metrics: ReplicationMetrics,
    sessions: Sessions,
    held: HashMap<u64, Held>,
    links: HashMap<MemberId, LinkHandle>,
    last_tops: Instant,
}

impl Owner {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ReplicaUpdate>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                u = rx.recv() => match u {
                    Some(u) => {
                        self.apply(u);
                        while let Ok(u) = rx.try_recv() {
                            self.apply(u);
                        }
                    }
                    None => return,
                },
                _ = tick.tick() => {}
            }
            self.sync();
        }
    }

    fn apply(&mut self, u: ReplicaUpdate) {
        match u {
            ReplicaUpdate::Sa {
                shard,
                id,
                snapshot,
                context,
                children,
            } => {
                let old = self.held.remove(&id);
                let children = children
                    .into_iter()
                    .map(|c| {
                        let prev = old
                            .as_ref()
                            .and_then(|o| o.children.iter().find(|p| p.spi_in == c.spi_in));
                        Child {
                            spi_in: c.spi_in,
                            top_sent: prev.map_or(0, |p| p.top_sent),
                            last_seen: prev.map_or(0, |p| p.last_seen),
                            rate: prev.map_or(0, |p| p.rate),
                            counters: c.counters,
                        }
                    })
                    .collect();
                // Changed: sent again to the replica at once (None forces it).
                self.held.insert(
                    id,
                    Held {
                        shard,
                        snapshot,
                        context,
                        children,
                        sent_to: None,
                    },
                );
            }
            ReplicaUpdate::Delete { id } => {
                if let Some(h) = self.held.remove(&id)
                    && let Some((m, _)) = h.sent_to
                    && let Some(link) = self.links.get(&m)
                {
                    let _ = link.tx.send(Outgoing {
                        message: Message::Delete { id },
                        kind: "delete",
                        ceilings: Vec::new(),
                    });
                }
            }
        }
    }

    /// Sends each SA to its shard's replica if it has not got it (new, changed, a new
    /// replica or a new connection), and moves sequence ceilings and inbound tops on.
    fn sync(&mut self) {
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
        let tops_due = self.last_tops.elapsed() >= TOPS_EVERY;
        if tops_due {
            self.last_tops = Instant::now();
        }
        let mut wanted: HashSet<MemberId> = HashSet::new();
        let mut sequences: BTreeMap<MemberId, (Vec<Sequences>, Ceilings)> = BTreeMap::new();
        for (&id, h) in &mut self.held {
            if tops_due {
                for c in &mut h.children {
                    let last = c.send().map_or(0, |s| s.last());
                    c.rate = last.saturating_sub(c.last_seen);
                    c.last_seen = last;
                }
            }
            let Some(target) = replica(h.shard, me, &members) else {
                // Alone: nobody could carry the SA on, so nobody could reuse its numbers.
                for c in &h.children {
                    if let Some(s) = c.send() {
                        s.set_ceiling(u64::MAX);
                    }
                }
                h.sent_to = None;
                continue;
            };
            wanted.insert(target);
            let link = self.links.entry(target).or_insert_with(|| {
                spawn_link(
                    me,
                    target,
                    self.view.clone(),
                    self.key.clone(),
                    self.metrics.clone(),
                    self.sessions.clone(),
                )
            });
            let connection = link.connection.load(Ordering::Acquire);
            if h.sent_to != Some((target, connection)) {
                if let Some((old, _)) = h.sent_to.filter(|(m, _)| *m != target)
                    && let Some(l) = self.links.get(&old)
                {
                    // The old replica must not keep a copy it could adopt with an old ceiling.
                    let _ = l.tx.send(Outgoing {
                        message: Message::Delete { id },
                        kind: "delete",
                        ceilings: Vec::new(),
                    });
                }
                let Some(link) = self.links.get(&target) else {
                    continue;
                };
                let mut seqs = Vec::with_capacity(h.children.len());
                let mut ceilings = Vec::new();
                for c in &mut h.children {
                    let (ceiling, raise) = reserve(c);
                    if let (Some(s), Some(v)) = (c.send(), raise) {
                        ceilings.push((s.clone(), v));
                    }
                    c.top_sent = c.counters.inbound_top();
                    seqs.push(Sequences {
                        spi_in: c.spi_in,
                        ceiling,
                        top: c.top_sent,
                    });
                }
                let _ = link.tx.send(Outgoing {
                    message: Message::Sa {
                        shard: h.shard,
                        id,
                        snapshot: h.snapshot.clone(),
                        context: h.context.clone(),
                        children: seqs,
                    },
                    kind: "sa",
                    ceilings,
                });
                h.sent_to = Some((target, connection));
                continue;
            }
            let entry = sequences.entry(target).or_default();
            for c in &mut h.children {
                let (ceiling, raise) = reserve(c);
                let top = c.counters.inbound_top();
                let top_moved = tops_due && top != c.top_sent;
                if raise.is_none() && !top_moved {
                    continue;
                }
                if let (Some(s), Some(v)) = (c.send(), raise) {
                    entry.1.push((s.clone(), v));
                }
                c.top_sent = top;
                entry.0.push(Sequences {
                    spi_in: c.spi_in,
                    ceiling,
                    top,
                });
            }
        }
        for (target, (seqs, ceilings)) in sequences {
            if seqs.is_empty() {
                continue;
            }
            if let Some(link) = self.links.get(&target) {
                let _ = link.tx.send(Outgoing {
                    message: Message::Sequences(seqs),
                    kind: "sequences",
                    ceilings,
                });
            }
        }
        self.links.retain(|m, _| wanted.contains(m));
    }
}

/// The ceiling to tell the replica for `c`, and the value to raise ours to once it is
/// acknowledged (`None`: nothing to raise). A fresh SA (no ceiling yet) is limited at once.
fn reserve(c: &Child) -> (u64, Option<u64>) {
    let Some(s) = c.send() else {
        return (0, None);
    };
    let (last, ceiling) = (s.last(), s.ceiling());
    let block = c.block();
    if ceiling == u64::MAX {
        // Lowering is safe at once; the replica learns the same value.
        let v = last.saturating_add(block);
        s.set_ceiling(v);
        return (v, None);
    }
    if last.saturating_add(block / 2) > ceiling {
        let v = last.saturating_add(block);
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
    tokio::spawn(link(
        (me, peer),
        view,
        key,
        metrics,
        sessions,
        rx,
        connection.clone(),
    ));
    LinkHandle { tx, connection }
}

/// The connection to one replica, made again whenever it breaks or our etcd session
/// changes (a stream counts only under the lease it was opened with).
async fn link(
    (me, peer): (MemberId, MemberId),
    view: SharedView,
    key: FleetKey,
    metrics: ReplicationMetrics,
    sessions: Sessions,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    connection: Arc<AtomicU64>,
) {
    loop {
        if let (Some(addr), Some(lease)) = (view.address(peer), current_lease(&sessions)) {
            match connect(me, lease, addr, &key).await {
                Ok((stream, tx, rxr)) => {
                    tracing::debug!(member = %peer, %addr, "replication stream open");
                    connection.fetch_add(1, Ordering::AcqRel);
                    let r = stream_to(stream, (tx, rxr), &mut rx, &metrics, (&sessions, lease)).await;
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
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Replication(#[from] ReplicationError),
    #[error("timed out")]
    Timeout,
    #[error("unexpected message from the replica")]
    Unexpected,
    #[error("the stream's member lease is not (or no longer) its membership")]
    Stale,
}

async fn hello_exchange(
    stream: &mut TcpStream,
    me: MemberId,
    lease: i64,
) -> Result<(Hello, Hello), StreamError> {
    let mut random = [0u8; 16];
    // Fixed bytes would give two connections one key, and their counters the same nonces.
    concentrator_crypto::util::fill_random(&mut random)
        .map_err(|_| std::io::Error::other("no system randomness for the replication hello"))?;
    let mine = Hello {
        member: me,
        lease,
        random,
    };
    stream.write_all(&mine.encode()).await?;
    let mut theirs = [0u8; HELLO_LEN];
    tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut theirs))
        .await
        .map_err(|_| StreamError::Timeout)??;
    Ok((mine, Hello::decode(&theirs)?))
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

async fn read_record(r: &mut (impl AsyncReadExt + Unpin), buf: &mut Vec<u8>) -> Result<(), StreamError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let n = Records::record_len(len)?;
    buf.resize(n, 0);
    r.read_exact(buf).await?;
    Ok(())
}

/// Sends the owner's messages on one connection and applies the replica's acknowledgements.
async fn stream_to(
    stream: TcpStream,
    (mut tx, mut rxr): (Records, Records),
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    metrics: &ReplicationMetrics,
    (sessions, lease): (&Sessions, i64),
) -> Result<(), StreamError> {
    let (mut read, mut write) = stream.into_split();
    let mut sent: u64 = 0;
    let mut pending: VecDeque<(u64, Ceilings)> = VecDeque::new();
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
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { return Ok(()) };
                let mut batch = vec![m];
                while let Ok(m) = rx.try_recv() {
                    batch.push(m);
                }
                for m in batch {
                    send(&m.message, m.kind, &mut out, &mut tx)?;
                    sent += 1;
                    if !m.ceilings.is_empty() {
                        pending.push_back((sent, m.ceilings));
                    }
                }
                write.write_all(&out).await?;
                out.clear();
                idle.reset();
            }
            a = acks.recv() => {
                let n = a.ok_or(StreamError::Unexpected)??;
                while pending.front().is_some_and(|(i, _)| *i <= n) {
                    if let Some((_, ceilings)) = pending.pop_front() {
                        for (s, v) in ceilings {
                            // Never raise past "no ceiling" nor lower what is acknowledged.
                            let cur = s.ceiling();
                            if cur != u64::MAX && v > cur {
                                s.set_ceiling(v);
                            }
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
                write.write_all(&out).await?;
                out.clear();
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A copy of an IKE SA that another member owns.
pub struct Copy {
    pub shard: Shard,
    pub id: u64,
    pub snapshot: Zeroizing<Vec<u8>>,
    pub context: Vec<u8>,
    /// By the CHILD SA's inbound SPI: (ceiling, inbound top).
    pub sequences: HashMap<u32, (u64, u64)>,
}

#[derive(Default)]
struct OwnerCopies {
    sas: HashMap<u64, Copy>,
    by_spi: HashMap<u32, u64>,
}

impl OwnerCopies {
    fn apply(&mut self, m: Message) {
        match m {
            Message::Sa {
                shard,
                id,
                snapshot,
                context,
                children,
            } => {
                if let Some(old) = self.sas.remove(&id) {
                    for spi in old.sequences.keys() {
                        self.by_spi.remove(spi);
                    }
                }
                let sequences = children
                    .iter()
                    .map(|s| (s.spi_in, (s.ceiling, s.top)))
                    .collect::<HashMap<_, _>>();
                for spi in sequences.keys() {
                    self.by_spi.insert(*spi, id);
                }
                self.sas.insert(
                    id,
                    Copy {
                        shard,
                        id,
                        snapshot,
                        context,
                        sequences,
                    },
                );
            }
            Message::Delete { id } => {
                if let Some(old) = self.sas.remove(&id) {
                    for spi in old.sequences.keys() {
                        self.by_spi.remove(spi);
                    }
                }
            }
            Message::Sequences(seqs) => {
                for s in seqs {
                    let Some(copy) = self.by_spi.get(&s.spi_in).and_then(|id| self.sas.get_mut(id)) else {
                        continue;
                    };
                    if let Some(e) = copy.sequences.get_mut(&s.spi_in) {
                        // Never backwards: a ceiling the owner may have used stays.
                        e.0 = e.0.max(s.ceiling);
                        e.1 = e.1.max(s.top);
                    }
                }
            }
            Message::Reset => *self = Self::default(),
            Message::Heartbeat | Message::Ack(_) => {}
        }
    }
}

/// An owner process: its member ID and the etcd lease of its membership. A member that
/// restarts comes back under another lease: the copies its old process sent are the old
/// incarnation's (to adopt once that lease is gone), never wiped by the new one's Reset.
pub type Incarnation = (MemberId, i64);

/// The copies this pod keeps as a replica, by owner incarnation (shared with the driver,
/// which adopts them). The view counts them per shard ([`super::View::occupied`]).
#[derive(Clone)]
pub struct ReplicaStore {
    copies: Arc<Mutex<HashMap<Incarnation, OwnerCopies>>>,
    view: SharedView,
}

impl ReplicaStore {
    pub fn new(view: SharedView) -> Self {
        Self {
            copies: Arc::default(),
            view,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Incarnation, OwnerCopies>> {
        self.copies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn apply(&self, owner: Incarnation, m: Message) {
        let mut all = self.lock();
        let copies = all.entry(owner).or_default();
        let before: Vec<Shard> = match &m {
            Message::Sa { id, .. } | Message::Delete { id } => {
                copies.sas.get(id).map(|c| c.shard).into_iter().collect()
            }
            Message::Reset => copies.sas.values().map(|c| c.shard).collect(),
            _ => Vec::new(),
        };
        let added = match &m {
            Message::Sa { shard, .. } => Some(*shard),
            _ => None,
        };
        copies.apply(m);
        for s in before {
            self.view.count_copy(s, false);
        }
        if let Some(s) = added {
            self.view.count_copy(s, true);
        }
    }

    /// Takes out the copies `pick(owner, shard)` selects.
    pub fn take(&self, pick: impl Fn(Incarnation, Shard) -> bool) -> Vec<(Incarnation, Copy)> {
        let mut out = Vec::new();
        let mut all = self.lock();
        for (owner, copies) in all.iter_mut() {
            let ids: Vec<u64> = copies
                .sas
                .iter()
                .filter(|(_, c)| pick(*owner, c.shard))
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(c) = copies.sas.remove(&id) {
                    for spi in c.sequences.keys() {
                        copies.by_spi.remove(spi);
                    }
                    self.view.count_copy(c.shard, false);
                    out.push((*owner, c));
                }
            }
        }
        all.retain(|_, c| !c.sas.is_empty());
        out
    }

    /// The shards of the copies `pick(owner, shard)` selects.
    pub fn shards(&self, pick: &impl Fn(Incarnation, Shard) -> bool) -> Vec<Shard> {
        let mut out: Vec<Shard> = self
            .lock()
            .iter()
            .flat_map(|(o, c)| c.sas.values().map(move |s| (*o, s.shard)))
            .filter(|(o, s)| pick(*o, *s))
            .map(|(_, s)| s)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The owner incarnations we hold copies for.
    pub fn owners(&self) -> Vec<Incarnation> {
        self.lock().keys().copied().collect()
    }

    /// Forgets `owner`'s copies; returns how many there were.
    pub fn drop_owner(&self, owner: Incarnation) -> usize {
        let Some(c) = self.lock().remove(&owner) else {
            return 0;
        };
        for copy in c.sas.values() {
            self.view.count_copy(copy.shard, false);
        }
        c.sas.len()
    }

    /// Copies held, all owners together.
    pub fn len(&self) -> usize {
        self.lock().values().map(|c| c.sas.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// When each owner's stream was last heard from, and whether it is connected.
type Heard = Arc<Mutex<HashMap<Incarnation, (Instant, bool)>>>;

/// Accepts replication streams from the owners whose shards this pod replicates, and
/// watches that those owners stay alive.
pub(super) async fn serve(
    listener: TcpListener,
    view: SharedView,
    key: FleetKey,
    store: ReplicaStore,
    metrics: ReplicationMetrics,
    revoker: Revoker,
) {
    let heard: Heard = Arc::default();
    let watcher = tokio::spawn(watch_owners(
        view.clone(),
        store.clone(),
        heard.clone(),
        metrics.clone(),
        revoker,
    ));
    let _watcher = AbortOnDrop(watcher);
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let (view, key, store, metrics, heard) = (
            view.clone(),
            key.clone(),
            store.clone(),
            metrics.clone(),
            heard.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &view, &key, &store, &metrics, &heard).await {
                let reason = match &e {
                    StreamError::Io(_) => "closed",
                    StreamError::Replication(ReplicationError::Authentication) => "authentication",
                    StreamError::Replication(ReplicationError::Hello) => "hello",
                    StreamError::Replication(_) => "malformed",
                    StreamError::Timeout => "timeout",
                    StreamError::Unexpected => "unexpected",
                    StreamError::Stale => "stale_owner",
                };
                if reason != "closed" {
                    ReplicationMetrics::count(&metrics.refused, reason, 1);
                    tracing::warn!(%from, error = %e, "replication stream refused");
                }
            }
        });
    }
}

async fn serve_one(
    mut stream: TcpStream,
    view: &SharedView,
    key: &FleetKey,
    store: &ReplicaStore,
    metrics: &ReplicationMetrics,
    heard: &Heard,
) -> Result<(), StreamError> {
    let me = view.me().ok_or(StreamError::Unexpected)?;
    let lease = view.lease_of(me).ok_or(StreamError::Unexpected)?;
    stream.set_nodelay(true)?;
    let (mine, theirs) = hello_exchange(&mut stream, me, lease).await?;
    if theirs.member == me {
        return Err(StreamError::Unexpected);
    }
    // Only a member, under the lease that is its membership now: an owner that was fenced
    // and comes back must not have a ceiling acknowledged after its SAs were taken over.
    if view.lease_of(theirs.member) != Some(theirs.lease) {
        return Err(StreamError::Stale);
    }
    let owner = theirs.member;
    let (mut tx, mut rx) = records(key, false, &mine, &theirs)?;
    // A probe (see `watch_owners`) says hello and closes: only a stream whose first record
    // opens counts as the owner's.
    let r = serve_records(
        (owner, theirs.lease),
        &mut stream,
        (&mut tx, &mut rx),
        (view, store),
        metrics,
        heard,
    )
    .await;
    if let Some(h) = heard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get_mut(&(owner, theirs.lease))
    {
        h.1 = false;
    }
    r
}

async fn serve_records(
    (owner, lease): (MemberId, i64),
    stream: &mut TcpStream,
    (tx, rx): (&mut Records, &mut Records),
    (view, store): (&SharedView, &ReplicaStore),
    metrics: &ReplicationMetrics,
    heard: &Heard,
) -> Result<(), StreamError> {
    let (mut read, mut write) = stream.split();
    let mut buf = Vec::new();
    let mut applied: u64 = 0;
    let mut out = Vec::new();
    loop {
        read_record(&mut read, &mut buf).await?;
        let m = Message::decode(rx.open(&mut buf)?)?;
        if view.lease_of(owner) != Some(lease) {
            return Err(StreamError::Stale);
        }
        heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((owner, lease), (Instant::now(), true));
        if matches!(m, Message::Ack(_)) {
            return Err(StreamError::Unexpected);
        }
        let heartbeat = matches!(m, Message::Heartbeat);
        let counted = matches!(m, Message::Sa { .. } | Message::Delete { .. } | Message::Reset);
        store.apply((owner, lease), m);
        if counted {
            metrics.copies.set(store.len() as i64);
        }
        applied += 1;
        metrics.applied.inc();
        if heartbeat {
            continue;
        }
        tx.seal(&Message::Ack(applied).encode(), &mut out)?;
        write.write_all(&out).await?;
        out.clear();
    }
}

/// Revokes a member's lease through the current etcd session.
pub(super) struct Revoker {
    pub(super) session: Sessions,
}

impl Revoker {
    fn lease(&self) -> Option<i64> {
        current_lease(&self.session)
    }

    async fn revoke(&self, lease: i64) -> Result<(), super::FleetError> {
        let session = self.session.borrow().clone();
        let Some(s) = session else {
            return Err(super::FleetError::Unavailable);
        };
        super::session::revoke_lease(&s, lease).await
    }
}

/// Whether `owner` answers a replication hello at `addr` in time, as the process whose
/// lease `owner_lease` is: a new process at the same address (a restarted container,
/// whose predecessor's lease has not run out yet) is not the owner of our copies.
async fn answers(me: MemberId, lease: i64, owner: MemberId, owner_lease: i64, addr: SocketAddr) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(addr).await?;
        hello_exchange(&mut stream, me, lease).await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok((_, theirs))) => theirs.member == owner && theirs.lease == owner_lease,
        _ => false,
    }
}

/// Watches the owners whose copies this pod holds: one whose stream has been silent for
/// [`SUSPECT_AFTER`] is probed; an owner that does not answer is dead or hung, and its lease
/// is revoked (the leader then gives its shards to their replicas at once); one that answers
/// no longer replicates to us, and its copies, which nothing keeps current, are dropped.
async fn watch_owners(
    view: SharedView,
    store: ReplicaStore,
    heard: Heard,
    metrics: ReplicationMetrics,
    revoker: Revoker,
) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = Instant::now();
    let mut probed: HashMap<Incarnation, Instant> = HashMap::new();
    loop {
        tick.tick().await;
        // This pod was stalled itself: its streams' silence proves nothing yet (the records
        // may be waiting in the socket).
        let stalled = last_tick.elapsed() > WATCH_EVERY * 3;
        last_tick = Instant::now();
        let (Some(me), true) = (view.me(), view.available()) else {
            continue;
        };
        if stalled {
            continue;
        }
        for owner in store.owners() {
            let (member, owner_lease) = owner;
            if view.lease_of(member) != Some(owner_lease) {
                continue; // That incarnation is gone: the driver adopts its copies.
            }
            let silent = heard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&owner)
                .is_none_or(|(t, _)| t.elapsed() > SUSPECT_AFTER);
            if !silent
                || probed
                    .get(&owner)
                    .is_some_and(|t| t.elapsed() < SUSPECT_AFTER * 5)
            {
                continue;
            }
            probed.insert(owner, Instant::now());
            let (Some(addr), Some(lease)) = (view.address(member), revoker.lease()) else {
                continue;
            };
            if answers(me, lease, member, owner_lease, addr).await {
                // Alive, and not replicating to us: the copies are stale.
                let dropped = store.drop_owner(owner);
                metrics.copies.set(store.len() as i64);
                ReplicationMetrics::count(&metrics.suspected, "alive", 1);
                tracing::info!(%member, dropped, "owner answers but no longer replicates here: its copies dropped");
                continue;
            }
            match revoker.revoke(owner_lease).await {
                Ok(()) => {
                    ReplicationMetrics::count(&metrics.suspected, "revoked", 1);
                    tracing::warn!(%member, "owner silent and not answering: its lease is revoked so its shards move now");
                }
                Err(e) => {
                    ReplicationMetrics::count(&metrics.suspected, "error", 1);
                    tracing::warn!(%member, error = %e, "could not revoke the lease of a silent owner");
                }
            }
        }
        probed.retain(|_, t| t.elapsed() < Duration::from_secs(60));
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
    fn a_fast_sa_reserves_two_seconds_ahead() {
        let (c, _) = child(1_000_000);
        assert_eq!(reserve(&c).0, 2_000_000);
    }

    #[test]
    fn copies_follow_the_owner_and_never_move_a_ceiling_back() {
        let view: SharedView = Arc::new(super::super::View::new());
        let store = ReplicaStore::new(view.clone());
        let owner = (MemberId(1), 7);
        let shard = Shard::new(7).unwrap();
        store.apply(
            owner,
            Message::Sa {
                shard,
                id: 9,
                snapshot: Zeroizing::new(vec![1]),
                context: vec![],
                children: vec![Sequences {
                    spi_in: 5,
                    ceiling: 100,
                    top: 3,
                }],
            },
        );
        store.apply(
            owner,
            Message::Sequences(vec![Sequences {
                spi_in: 5,
                ceiling: 50,
                top: 10,
            }]),
        );
        assert!(view.occupied().contains(shard), "a copy makes its shard occupied");
        let taken = store.take(|o, s| o == owner && s == shard);
        assert!(!view.occupied().contains(shard));
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1.sequences[&5], (100, 10));
        assert!(store.is_empty());
        // A reset forgets the owner's copies.
        store.apply(
            owner,
            Message::Sa {
                shard,
                id: 9,
                snapshot: Zeroizing::new(vec![1]),
                context: vec![],
                children: vec![],
            },
        );
        store.apply(owner, Message::Reset);
        assert!(store.is_empty());
    }
}
