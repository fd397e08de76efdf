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
//!
//! Rooms: `owner` (the replicator: links to the replicas, ceilings), `store` (the copies a
//! replica keeps), `replica` (the replica's side of the streams, and the watch on owners
//! that lets it revoke a dead one's lease).

mod owner;
mod replica;
mod store;

use std::time::Duration;

use concentrator_fleet::MemberId;
use concentrator_fleet::replication::{HELLO_LEN, Hello, Records, ReplicationError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics::ReasonLabel;

pub use owner::{BLOCK, HandedSa, HandoverState, ReplicaUpdate, ReplicatedChild, Replicator};
pub(super) use replica::{Revoker, serve};
pub use store::{Copy, Incarnation, ReplicaStore};

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

/// Hand-over metrics (`concentrator_gateway_fleet_handover_*`).
#[derive(Clone, Debug)]
pub struct HandoverMetrics {
    /// Shards handed over, by outcome: `moved` (the new owner has them), `resumed` (given
    /// up: carried on here), `empty` (no SA to send).
    pub shards: Family<ReasonLabel, Counter>,
    /// IKE SAs handed over and let go here.
    pub sas: Counter,
    /// From a shard's freeze to the map that gives it to the new owner, in seconds: the
    /// pause of its traffic.
    pub pause: Histogram,
}

impl Default for HandoverMetrics {
    fn default() -> Self {
        Self {
            shards: Family::default(),
            sas: Counter::default(),
            pause: Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        }
    }
}

impl HandoverMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "fleet_handover_shards",
            "Shards this draining member handed over, by outcome (moved, resumed, empty)",
            self.shards.clone(),
        );
        r.register(
            "fleet_handover_sas",
            "IKE SAs handed over to another member with their shard",
            self.sas.clone(),
        );
        r.register(
            "fleet_handover_pause_seconds",
            "Per shard: from its freeze to the shard map that gives it to its new owner",
            self.pause.clone(),
        );
    }

    pub(crate) fn count(&self, outcome: &str) {
        self.shards
            .get_or_create(&ReasonLabel {
                reason: outcome.to_owned(),
            })
            .inc();
    }
}

/// The etcd sessions of this pod, one after another.
pub(in crate::cluster) type Sessions = tokio::sync::watch::Receiver<Option<super::SessionLease>>;

/// The lease of the current session, if there is one.
fn current_lease(sessions: &Sessions) -> Option<i64> {
    sessions.borrow().as_ref().map(super::SessionLease::lease_id)
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

async fn read_record(r: &mut (impl AsyncReadExt + Unpin), buf: &mut Vec<u8>) -> Result<(), StreamError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let n = Records::record_len(len)?;
    buf.resize(n, 0);
    r.read_exact(buf).await?;
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
