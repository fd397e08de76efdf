//! The replica's side: streams from the owners whose shards this pod replicates, applied to
//! the store and acknowledged, and the watch that probes a silent owner and revokes its lease
//! when it does not answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concentrator_fleet::MemberId;
use concentrator_fleet::replication::{Message, Records, ReplicationError, records};
use concentrator_fleet::wire::FleetKey;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::store::{Incarnation, ReplicaStore};
use super::{
    AbortOnDrop, ReplicationMetrics, Sessions, StreamError, current_lease, hello_exchange, read_record,
};
use crate::cluster::view::SharedView;

/// An owner whose copies we hold and whose stream has been silent this long is probed; if
/// it does not answer, its lease is revoked (it is dead or hung), so that its shards go to
/// their replicas now rather than when the lease runs out.
const SUSPECT_AFTER: Duration = Duration::from_millis(600);
/// How long a probed owner has to answer a hello.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// How often the replica looks at its owners' streams.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// When each owner's stream was last heard from, and whether it is connected.
type Heard = Arc<Mutex<HashMap<Incarnation, (Instant, bool)>>>;

/// Accepts replication streams from the owners whose shards this pod replicates, and
/// watches that those owners stay alive.
pub(in crate::cluster) async fn serve(
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
pub(in crate::cluster) struct Revoker {
    pub(in crate::cluster) session: Sessions,
}

impl Revoker {
    fn lease(&self) -> Option<i64> {
        current_lease(&self.session)
    }

    async fn revoke(&self, lease: i64) -> Result<(), crate::cluster::FleetError> {
        let session = self.session.borrow().clone();
        let Some(s) = session else {
            return Err(crate::cluster::FleetError::Unavailable);
        };
        crate::cluster::session::revoke_lease(&s, lease).await
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
