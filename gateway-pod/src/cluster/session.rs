//! The pod's etcd session: its lease and member record, the watch on the fleet's keys that
//! keeps the [`View`] current, and, while this pod is the elected leader, the shard map.
//!
//! Keys, under the fleet prefix `P`:
//! - `P/fleet/members/<id>`: a member's record, under its lease. Creating it (compare and
//!   create) is how a pod claims its member ID, so two pods never share one: a restarted
//!   StatefulSet pod waits for its predecessor's lease to end first.
//! - `P/fleet/leader`: the elected leader's ID, under its lease.
//! - `P/fleet/shards`: the shard map, written by the leader only, in a transaction that
//!   checks it still holds the leader key (a leader that lost its lease writes nothing).
//!
//! Whatever goes wrong (etcd unreachable, the lease lost, a watch cancelled), the session
//! ends, the pod stops taking new sites, and a new session starts after a pause; established
//! tunnels never wait for etcd.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use concentrator_fleet::map::{Report, plan};
use concentrator_fleet::member::MemberRecord;
use concentrator_fleet::{MemberId, ShardMap};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;

use super::view::SharedView;
use super::{FleetError, FleetMetrics as Metrics, FleetOptions, SessionLease};

/// How often the member record is refreshed (load, occupied shards), if it changed.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// The fleet's keys.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    pub(super) fleet: String,
    pub(super) members: String,
    pub(super) leader: String,
    pub(super) shards: String,
    pub(super) sites: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        let p = prefix.trim_end_matches('/');
        Self {
            fleet: format!("{p}/fleet/"),
            members: format!("{p}/fleet/members/"),
            leader: format!("{p}/fleet/leader"),
            shards: format!("{p}/fleet/shards"),
            sites: format!("{p}/sites/"),
        }
    }

    fn member(&self, id: MemberId) -> String {
        format!("{}{:05}", self.members, id.0)
    }
}

/// What the watch has told us.
#[derive(Default)]
struct State {
    members: BTreeMap<MemberId, MemberRecord>,
    /// Each member's lease (of its record).
    leases: BTreeMap<MemberId, i64>,
    map: ShardMap,
    /// The leader key's value and lease.
    leader: Option<(MemberId, i64)>,
    /// When this session began.
    started: Option<Instant>,
    /// Members whose record this session saw go (lease ended or revoked): gone for sure,
    /// unlike members it has not seen at all yet.
    seen_gone: std::collections::BTreeSet<MemberId>,
}

impl State {
    fn apply(&mut self, keys: &Keys, kv: &KeyValue, deleted: bool, metrics: &Metrics) {
        let key = kv.key();
        if key == keys.shards.as_bytes() {
            if deleted {
                self.map = ShardMap::new();
                return;
            }
            match ShardMap::decode(kv.value()) {
                // The watch brings back the maps this pod wrote as leader, after it applied
                // them: an older one must not take back what a newer one decided (it could
                // give a shard back to a member that has handed it over).
                Ok(map) if map.version() <= self.map.version() && self.map.version() > 0 => {}
                Ok(map) => self.map = map,
                Err(e) => {
                    metrics.count_bad_record("shard_map");
                    tracing::error!(error = %e, "the shard map in etcd does not decode: kept the last one");
                }
            }
        } else if key == keys.leader.as_bytes() {
            self.leader = if deleted {
                None
            } else {
                parse_id(kv.value()).map(|m| (m, kv.lease()))
            };
        } else if let Some(id) = key.strip_prefix(keys.members.as_bytes()).and_then(parse_id) {
            if deleted {
                self.members.remove(&id);
                self.leases.remove(&id);
                self.seen_gone.insert(id);
                return;
            }
            self.seen_gone.remove(&id);
            match MemberRecord::decode(kv.value()) {
                Ok(r) => {
                    self.members.insert(id, r);
                    self.leases.insert(id, kv.lease());
                }
                Err(e) => {
                    metrics.count_bad_record("member");
                    tracing::warn!(member = %id, error = %e, "a member record does not decode: member ignored");
                    self.members.remove(&id);
                    self.leases.remove(&id);
                }
            }
        }
    }

    fn reports(&self) -> BTreeMap<MemberId, Report> {
        self.members
            .iter()
            .map(|(id, r)| {
                let report = Report {
                    map_version: r.map_version,
                    occupied: r.occupied_shards().unwrap_or_default(),
                    draining: r.load.draining,
                };
                (*id, report)
            })
            .collect()
    }
}

fn parse_id(b: &[u8]) -> Option<MemberId> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>()
        .ok()
        .filter(|n| *n <= MemberId::MAX)
        .map(MemberId)
}

/// Runs sessions one after the other until `stop`.
pub(super) async fn run(
    opts: FleetOptions,
    view: SharedView,
    lease_tx: watch::Sender<Option<SessionLease>>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let keys = Keys::new(&opts.prefix);
    // Our member ID and lease, kept across sessions while the lease lives: a session that
    // ends because etcd could not be reached resumes with them, so the others never see us
    // leave.
    let mut held = None;
    loop {
        let r = tokio::select! {
            r = session(&opts, &keys, &view, &lease_tx, &metrics, &mut held) => r,
            _ = stop.changed() => break,
        };
        view.set_available(false);
        lease_tx.send_replace(None);
        if matches!(r, Err(FleetError::LeaseLost)) {
            held = None;
        }
        if let Err(e) = r {
            metrics.count_etcd_error(e.kind());
            tracing::warn!(error = %e, "fleet session ended: new sites are refused until it is back");
        }
        tokio::select! {
            () = tokio::time::sleep(opts.retry) => {}
            _ = stop.changed() => break,
        }
    }
    // Leaving on purpose: revoke the lease, so that the others move our shards now rather
    // than after its TTL.
    if let Some(s) = lease_tx.send_replace(None) {
        let mut client = s.client;
        let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(s.lease)).await;
    }
    view.set_available(false);
}

async fn session(
    opts: &FleetOptions,
    keys: &Keys,
    view: &SharedView,
    lease_tx: &watch::Sender<Option<SessionLease>>,
    metrics: &Metrics,
    held: &mut Option<(MemberId, i64)>,
) -> Result<(), FleetError> {
    let mut client = super::connect(opts).await?;
    let mut resumed = None;
    if let Some((me, lease)) = *held {
        if client.lease_time_to_live(lease, None).await?.ttl() > 0 {
            resumed = Some((me, lease));
        } else {
            *held = None;
        }
    }
    let ttl = i64::try_from(opts.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let lease = match resumed {
        Some((_, lease)) => lease,
        None => client.lease_grant(ttl, None).await?.id(),
    };
    let (mut keeper, mut keep_stream) = client.lease_keep_alive(lease).await?;
    let mut keepalive = tokio::time::interval(opts.lease_ttl / 3);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let me = match resumed {
        Some((me, _)) => me,
        None => claim_id(&mut client, opts, keys, lease, view, &mut keeper, &mut keepalive).await?,
    };
    *held = Some((me, lease));
    view.set_me(Some(me));
    tracing::info!(member = %me, name = %opts.member, resumed = resumed.is_some(), "in the fleet");

    let got = client
        .get(keys.fleet.as_str(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = got.header().map_or(0, |h| h.revision());
    let mut state = State {
        started: Some(Instant::now()),
        ..State::default()
    };
    for kv in got.kvs() {
        state.apply(keys, kv, false, metrics);
    }
    let mut events = client
        .watch(
            keys.fleet.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    lease_tx.send_replace(Some(SessionLease {
        client: client.clone(),
        me,
        lease,
    }));
    let mut written = None;
    // When the record was last written: a change of load alone waits for the report
    // interval (under a wave of new sites it changes with every event, and every write is an
    // event at every member).
    let mut loaded = Instant::now();
    // A frozen or partitioned etcd answers nothing and breaks no connection for a while:
    // keep-alive answers that stop for a TTL end the session (the lease may have ended).
    let mut acked = Instant::now();
    let mut report = tokio::time::interval(REPORT_INTERVAL);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !state.members.contains_key(&me) && written.is_some() {
            return Err(FleetError::LeaseLost);
        }
        view.set_leases(state.leases.clone());
        view.apply(&state.map, state.members.clone());
        metrics.members.set(state.members.len() as i64);
        view.set_available(state.members.contains_key(&me) && state.map.version() > 0);
        // The map first: a shard handed over pauses until it is written.
        lead(
            &mut client,
            keys,
            &mut state,
            (me, lease),
            opts.lease_ttl * 2,
            metrics,
        )
        .await?;
        let record = record(opts, view);
        if needs_write(written.as_ref(), &record, loaded.elapsed() >= REPORT_INTERVAL) {
            put_record(&mut client, keys, me, lease, &record).await?;
            tracing::debug!(
                map_version = record.map_version,
                draining = record.load.draining,
                "member record written"
            );
            loaded = Instant::now();
            written = Some(record);
        }
        tokio::select! {
            _ = keepalive.tick() => {
                if acked.elapsed() > opts.lease_ttl {
                    return Err(FleetError::Timeout);
                }
                keeper.keep_alive().await?;
            }
            msg = keep_stream.message() => match msg? {
                Some(r) if r.ttl() > 0 => acked = Instant::now(),
                _ => return Err(FleetError::LeaseLost),
            },
            msg = events.message() => {
                let resp = msg?.ok_or(FleetError::WatchClosed)?;
                if resp.canceled() {
                    return Err(FleetError::WatchClosed);
                }
                for ev in resp.events() {
                    if let Some(kv) = ev.kv() {
                        state.apply(keys, kv, ev.event_type() == EventType::Delete, metrics);
                    }
                }
            }
            _ = report.tick() => {}
            // A shard handed over: the leader moves it once our record says so.
            () = view.report_wanted() => {}
        }
    }
}

/// Ends another member's `lease`, and with it its record, its claims and its place in the
/// shard map: a replica found the owner of its copies unresponsive. (Never our own.)
pub(super) async fn revoke_lease(s: &SessionLease, lease: i64) -> Result<(), FleetError> {
    if lease == s.lease {
        return Ok(());
    }
    let mut client = s.client.clone();
    match client.lease_revoke(lease).await {
        Ok(_) => Ok(()),
        // Gone already (expired, or revoked by another replica).
        Err(etcd_client::Error::GRpcStatus(st)) if st.code() == tonic::Code::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Claims this pod's member ID by creating its member record: the StatefulSet ordinal in
/// the member name if there is one (waiting for a predecessor's lease to end), else the
/// lowest free ID.
async fn claim_id(
    client: &mut Client,
    opts: &FleetOptions,
    keys: &Keys,
    lease: i64,
    view: &SharedView,
    keeper: &mut etcd_client::LeaseKeeper,
    keepalive: &mut tokio::time::Interval,
) -> Result<MemberId, FleetError> {
    let ordinal = MemberId::from_ordinal_name(&opts.member);
    let mut waited = false;
    loop {
        let candidate = match ordinal {
            Some(id) => id,
            None => {
                let got = client
                    .get(
                        keys.members.as_str(),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await?;
                let taken: Vec<MemberId> = got
                    .kvs()
                    .iter()
                    .filter_map(|kv| kv.key().strip_prefix(keys.members.as_bytes()).and_then(parse_id))
                    .collect();
                (0..=MemberId::MAX)
                    .map(MemberId)
                    .find(|m| !taken.contains(m))
                    .ok_or(FleetError::NoFreeId)?
            }
        };
        view.set_me(Some(candidate));
        let key = keys.member(candidate);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                record(opts, view).encode(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if client.txn(txn).await?.succeeded() {
            return Ok(candidate);
        }
        view.set_me(None);
        if ordinal.is_some() && !waited {
            tracing::info!(
                member = %candidate,
                "member ID still held (a predecessor's lease): waiting for it to end"
            );
            waited = true;
        }
        keepalive.tick().await;
        keeper.keep_alive().await?;
    }
}

/// Whether `record` must be written over `written`: at once when what the leader plans with
/// changed (shards, map version, draining, addresses), and for a change of load alone once
/// `load_due`.
fn needs_write(written: Option<&MemberRecord>, record: &MemberRecord, load_due: bool) -> bool {
    let Some(w) = written else { return true };
    let planned = |r: &MemberRecord| {
        (
            r.name.clone(),
            r.address,
            r.map_version,
            r.occupied.clone(),
            r.load.draining,
            r.admin,
        )
    };
    planned(w) != planned(record) || (load_due && w.load != record.load)
}

/// This pod's record as it should be now.
fn record(opts: &FleetOptions, view: &SharedView) -> MemberRecord {
    MemberRecord {
        name: opts.member.clone(),
        address: opts.address,
        load: (opts.load)(),
        map_version: view.map_version(),
        occupied: view.occupied().to_hex(),
        admin: opts.admin,
        redirect: opts.redirect_address(),
    }
}

async fn put_record(
    client: &mut Client,
    keys: &Keys,
    me: MemberId,
    lease: i64,
    record: &MemberRecord,
) -> Result<(), FleetError> {
    // Only over our own record (same lease): if it is gone, the lease is gone, and writing
    // it back would resurrect a member the leader has given up.
    let key = keys.member(me);
    let txn = Txn::new()
        .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
        .and_then([TxnOp::put(
            key.as_str(),
            record.encode(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
    if client.txn(txn).await?.succeeded() {
        Ok(())
    } else {
        Err(FleetError::LeaseLost)
    }
}

/// Becomes the leader if there is none, and as the leader writes the next shard map.
///
/// A leader whose session is new (after a start, or etcd coming back) leaves the shards of
/// members it does not see alone for `grace`, unless it saw their records go: after an etcd
/// outage every member resumes its lease in its own time, and a member not back yet is not
/// a member gone. A member whose record this session saw deleted (its lease ended or was
/// revoked) is gone: its shards go to their replicas at once, which is what keeps a
/// take-over short, also when the leader itself was the member that died.
async fn lead(
    client: &mut Client,
    keys: &Keys,
    state: &mut State,
    (me, lease): (MemberId, i64),
    grace: Duration,
    metrics: &Metrics,
) -> Result<(), FleetError> {
    if state.leader.is_none() {
        let txn = Txn::new()
            .when([Compare::create_revision(
                keys.leader.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                keys.leader.as_str(),
                me.0.to_string(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if client.txn(txn).await?.succeeded() {
            tracing::info!(member = %me, "elected fleet leader");
            state.leader = Some((me, lease));
        }
    }
    if state.leader != Some((me, lease)) {
        metrics.leader.set(0);
        return Ok(());
    }
    metrics.leader.set(1);
    let young = state.started.is_none_or(|t| t.elapsed() < grace);
    let missing = concentrator_fleet::Shard::all()
        .filter_map(|s| state.map.owner(s))
        .any(|m| !state.members.contains_key(&m) && !state.seen_gone.contains(&m));
    if missing && young {
        return Ok(());
    }
    let Some(next) = plan(&state.map, &state.reports()) else {
        return Ok(());
    };
    let txn = Txn::new()
        .when([
            Compare::value(keys.leader.as_str(), CompareOp::Equal, me.0.to_string()),
            Compare::lease(keys.leader.as_str(), CompareOp::Equal, lease),
        ])
        .and_then([TxnOp::put(keys.shards.as_str(), next.encode(), None)]);
    if client.txn(txn).await?.succeeded() {
        let moved = concentrator_fleet::Shard::all()
            .filter(|s| next.owner(*s) != state.map.owner(*s))
            .count();
        metrics.shard_moves.inc_by(moved as u64);
        tracing::info!(version = next.version(), moved, "shard map written");
        // The watch brings it back too; applying it now saves a round.
        state.map = next;
    } else {
        // Someone else leads now; the watch tells us who.
        state.leader = None;
        metrics.leader.set(0);
    }
    Ok(())
}

impl FleetError {
    /// The label of `fleet_etcd_errors_total`.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Self::Etcd(_) => "etcd",
            Self::LeaseLost => "lease_lost",
            Self::WatchClosed => "watch_closed",
            Self::NoFreeId => "no_free_id",
            Self::Tls(_) => "tls",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Contended => "contended",
        }
    }
}
