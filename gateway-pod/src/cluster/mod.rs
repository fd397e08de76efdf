//! The fleet (DESIGN.md §5): the pods of one fleet behind one address, sharing ownership
//! through etcd. Off (`--fleet-etcd` unset), the gateway is the standalone one.
//!
//! The sans-IO part (shards, the shard map and the leader's plan, member records, frames)
//! is the `concentrator-fleet` crate; this room holds what talks to etcd and to other pods:
//! - `session`: the etcd session: lease, member ID and record, the watch that keeps the
//!   [`View`] current, and the shard map while this pod leads;
//! - `claims`: sites claimed by one pod at a time (compare and create), and the requests
//!   to give one up;
//! - `view`: what the driver and the data plane read: who owns each shard, where members
//!   are, whether new sites may be taken.
//! - `forward`: the frames that carry packets to the owner of their SA and its answers back
//!   through the member the site's flow enters.
//! - `director`: the VIP front's director, elected in etcd, and where a new site's
//!   IKE_SA_INIT goes in that front.
//! - `replicate`: copies of each shard's SAs on its replica member, the sequence ceilings
//!   that keep a taker from reusing a number, and the watch that ends a dead owner's lease.
//!
//! The cluster runs on tasks of its own and exchanges values with the driver over channels
//! and the [`View`]: the IKE task never waits for etcd or a peer pod.

mod claims;
mod director;
mod forward;
mod replicate;
mod session;
mod spis;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use concentrator_fleet::MemberId;
use concentrator_fleet::member::Load;
use concentrator_fleet::wire::FleetKey;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

pub use claims::{Claimed, Claims, SiteKey};
pub use director::{RedirectAddress, VipOptions};
pub use forward::{
    Delivery, EspBatch, ForwardLabel, ForwardMetrics, IkeRoute, Link, Links, Via, route_ike, serve,
};
pub use replicate::{
    BLOCK, Copy as ReplicaCopy, HandedSa, HandoverMetrics, HandoverState, Incarnation, ReplicaStore,
    ReplicaUpdate, ReplicatedChild, ReplicationMetrics, Replicator,
};
pub use spis::GatewayEntropy;
pub use view::{MemberShardCount, Route, ShardSummary, SharedView, View};

use crate::metrics::ReasonLabel;

/// How a pod joins its fleet.
#[derive(Clone)]
pub struct FleetOptions {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix of the fleet in etcd (one etcd can serve several fleets).
    pub prefix: String,
    /// This pod's name (its StatefulSet ordinal, if it ends in `-<n>`, is its member ID).
    pub member: String,
    /// Where other pods send this one frames.
    pub address: SocketAddr,
    /// The fleet key.
    pub key: FleetKey,
    /// TTL of the member lease (kept alive at a third of it).
    pub lease_ttl: Duration,
    /// On how many other members each shard's SAs are copied (take-over); 0: none.
    pub replicas: usize,
    /// Adopted IKE SAs synchronize Message IDs with their sites (RFC 6311).
    pub message_id_sync: bool,
    /// Pause before a new session after one ended.
    pub retry: Duration,
    /// etcd client TLS: CA bundle, and a client certificate and key.
    pub tls: Option<EtcdTls>,
    /// The load to report (read at each report).
    pub load: Arc<dyn Fn() -> Load + Send + Sync>,
    /// Where other members reach our admin API (the fleet-wide tunnel list), if they can.
    pub admin: Option<SocketAddr>,
    /// Our own address sites may be redirected to (the VIP front), if we have one.
    pub redirect: RedirectAddress,
    /// The VIP front (`None`: the SLB front, no director).
    pub vip: Option<VipOptions>,
}

impl FleetOptions {
    /// Our redirect address as it is now (the addresses file may have changed).
    pub(crate) fn redirect_address(&self) -> Option<std::net::IpAddr> {
        self.redirect.resolve(&self.member)
    }
}

impl std::fmt::Debug for FleetOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("member", &self.member)
            .field("address", &self.address)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

/// Why the fleet options are refused.
#[derive(Debug, thiserror::Error)]
pub enum FleetConfigError {
    #[error("--fleet-address (CONCENTRATOR_FLEET_ADDRESS) is required with --fleet-etcd: the pod IP")]
    NoAddress,
    #[error("--fleet-address {0:?} is neither IP nor IP:PORT")]
    Address(String),
    #[error("--fleet-key-file (CONCENTRATOR_FLEET_KEY_FILE) is required with --fleet-etcd")]
    NoKey,
    #[error("fleet key file {path}: {source}")]
    KeyFile { path: PathBuf, source: std::io::Error },
    #[error("fleet key file {0}: {1}")]
    Key(PathBuf, concentrator_fleet::wire::KeyError),
    #[error("no --fleet-member given and the host name cannot be read: {0}")]
    Hostname(std::io::Error),
}

/// The port of `--fleet-address` when none is given.
pub const DEFAULT_FLEET_PORT: u16 = 4510;

impl FleetOptions {
    /// The fleet options of the command line; `None` without `--fleet-etcd` (standalone).
    pub fn from_cli(
        opts: &crate::cli::Options,
        load: Arc<dyn Fn() -> Load + Send + Sync>,
    ) -> Result<Option<Self>, FleetConfigError> {
        if opts.fleet_etcd.is_empty() {
            return Ok(None);
        }
        let address = opts.fleet_address.as_deref().ok_or(FleetConfigError::NoAddress)?;
        let address = address
            .parse::<SocketAddr>()
            .or_else(|_| {
                address
                    .parse::<std::net::IpAddr>()
                    .map(|ip| SocketAddr::new(ip, DEFAULT_FLEET_PORT))
            })
            .map_err(|_| FleetConfigError::Address(address.to_owned()))?;
        let path = opts.fleet_key_file.clone().ok_or(FleetConfigError::NoKey)?;
        let secret =
            zeroize::Zeroizing::new(std::fs::read(&path).map_err(|source| FleetConfigError::KeyFile {
                path: path.clone(),
                source,
            })?);
        let key = FleetKey::new(&secret).map_err(|e| FleetConfigError::Key(path, e))?;
        let member = match &opts.fleet_member {
            Some(m) => m.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_err(FleetConfigError::Hostname)?
                .trim()
                .to_owned(),
        };
        // An admin API on every address answers the others on our fleet address; one on
        // loopback answers nobody else.
        let admin = match opts.admin_listen.ip() {
            ip if ip.is_unspecified() => Some(SocketAddr::new(address.ip(), opts.admin_listen.port())),
            ip if ip.is_loopback() => None,
            _ => Some(opts.admin_listen),
        };
        Ok(Some(Self {
            admin,
            redirect: RedirectAddress::from_cli(opts),
            vip: opts.fleet_vip.map(|address| VipOptions {
                address,
                rebalance: opts.fleet_rebalance,
                in_auth: opts.fleet_redirect_in_auth,
            }),
            endpoints: opts.fleet_etcd.clone(),
            prefix: opts.fleet_prefix.clone(),
            member,
            address,
            key,
            lease_ttl: opts.fleet_lease_ttl.max(Duration::from_secs(1)),
            replicas: usize::from(opts.fleet_replicas),
            message_id_sync: opts.fleet_message_id_sync,
            retry: Duration::from_millis(500),
            tls: opts.fleet_etcd_ca.clone().map(|ca| EtcdTls {
                ca,
                cert: opts.fleet_etcd_cert.clone(),
                key: opts.fleet_etcd_key.clone(),
            }),
            load,
        }))
    }
}

/// etcd client TLS files (PEM).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// What went wrong with etcd.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("the member lease was lost")]
    LeaseLost,
    #[error("the etcd watch ended")]
    WatchClosed,
    #[error("every member ID is taken")]
    NoFreeId,
    #[error("etcd TLS files: {0}")]
    Tls(String),
    #[error("the fleet is unavailable (no etcd session)")]
    Unavailable,
    #[error("etcd did not answer in time")]
    Timeout,
    #[error("the claim changed hands while it was being read: try again")]
    Contended,
}

/// The fleet's metrics (`concentrator_gateway_fleet_*`).
#[derive(Clone, Debug, Default)]
pub struct FleetMetrics {
    /// Members in the fleet, as this pod sees it.
    pub members: Gauge,
    /// 1 while this pod is the leader.
    pub leader: Gauge,
    /// Shards whose owner changed, in maps this pod wrote as leader.
    pub shard_moves: Counter,
    /// etcd errors that ended a session or failed a request, by kind.
    pub etcd_errors: Family<ReasonLabel, Counter>,
    /// Records in etcd that did not decode, by kind (member, shard_map, claim).
    pub bad_records: Family<ReasonLabel, Counter>,
    /// Site claims by result (won, mine, held, unavailable).
    pub claims: Family<ReasonLabel, Counter>,
    /// How long claims took, summed, in seconds (with `claims`: the mean).
    pub claim_seconds: Counter<f64, AtomicU64>,
    /// 1 while this pod is the VIP front's director.
    pub director: Gauge,
    /// RFC 5685 redirects sent, by reason (`init`: a new site sent by the director).
    pub redirects: Family<ReasonLabel, Counter>,
    /// SPI routing.
    pub forward: ForwardMetrics,
    /// SA replication and take-over.
    pub replication: ReplicationMetrics,
    /// Shards handed over by a draining member.
    pub handover: HandoverMetrics,
}

impl FleetMetrics {
    fn count_etcd_error(&self, kind: &str) {
        self.etcd_errors
            .get_or_create(&ReasonLabel { reason: kind.into() })
            .inc();
    }

    fn count_bad_record(&self, kind: &str) {
        self.bad_records
            .get_or_create(&ReasonLabel { reason: kind.into() })
            .inc();
    }

    /// Registers the fleet's metrics in `r` (the gateway's sub-registry).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "fleet_members",
            "Members of the fleet as this pod sees them",
            self.members.clone(),
        );
        r.register(
            "fleet_leader",
            "1 while this pod is the fleet's leader",
            self.leader.clone(),
        );
        r.register(
            "fleet_shard_moves",
            "Shards whose owner changed in maps this pod wrote as leader",
            self.shard_moves.clone(),
        );
        r.register(
            "fleet_etcd_errors",
            "etcd errors by kind",
            self.etcd_errors.clone(),
        );
        r.register(
            "fleet_bad_records",
            "Records in etcd that did not decode, by kind",
            self.bad_records.clone(),
        );
        r.register("fleet_claims", "Site claims by result", self.claims.clone());
        r.register(
            "fleet_claim_seconds",
            "Time spent claiming sites in etcd, in seconds",
            self.claim_seconds.clone(),
        );
        r.register(
            "fleet_director",
            "1 while this pod is the VIP front's director",
            self.director.clone(),
        );
        r.register(
            "fleet_redirects",
            "RFC 5685 redirects sent, by reason",
            self.redirects.clone(),
        );
        self.forward.register(r);
        self.replication.register(r);
        self.handover.register(r);
    }
}

/// The current etcd session, for claims: a client, our member ID and our lease.
#[derive(Clone)]
pub(crate) struct SessionLease {
    client: Client,
    me: MemberId,
    lease: i64,
}

impl SessionLease {
    /// The etcd lease of the session (a new one each time the session begins anew).
    pub(crate) fn lease_id(&self) -> i64 {
        self.lease
    }
}

/// A running fleet membership.
pub struct Fleet {
    pub view: SharedView,
    pub claims: Claims,
    /// Senders of frames to other members.
    pub links: Links,
    /// Where other members send this one frames (UDP) and replication streams (TCP).
    pub address: SocketAddr,
    /// Copies SAs to their shards' replicas (none with `--fleet-replicas 0`), and hands
    /// shards over when this member drains.
    pub replicator: Replicator,
    /// The copies of other members' SAs this pod keeps.
    pub replicas: ReplicaStore,
    /// TTL of the member leases.
    pub lease_ttl: Duration,
    /// Adopted IKE SAs synchronize Message IDs with their sites (RFC 6311).
    pub message_id_sync: bool,
    /// Keys the replication streams.
    pub(crate) key: FleetKey,
    pub(crate) replication_metrics: ReplicationMetrics,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// The director election (VIP front only).
    director: Option<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Joins the fleet: starts the session task (which retries until etcd answers).
    pub fn start(opts: FleetOptions, metrics: FleetMetrics) -> Self {
        let view: SharedView = Arc::new(View::new());
        let (lease_tx, lease_rx) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let claims = Claims::new(&opts.prefix, lease_rx, view.clone(), metrics.clone());
        let links = Links::new(
            view.clone(),
            opts.key.clone(),
            opts.address.ip(),
            metrics.forward.clone(),
        );
        let address = opts.address;
        let key = opts.key.clone();
        let replication_metrics = metrics.replication.clone();
        let replicator = Replicator::start(
            opts.replicas,
            view.clone(),
            key.clone(),
            replication_metrics.clone(),
            claims.sessions(),
        );
        let replicas = ReplicaStore::new(view.clone());
        let (lease_ttl, message_id_sync) = (opts.lease_ttl, opts.message_id_sync);
        let director = opts.vip.as_ref().map(|vip| {
            tracing::info!(
                vip = %vip.address,
                redirect_address = ?opts.redirect_address(),
                in_auth = vip.in_auth,
                rebalance = vip.rebalance,
                "VIP front: director election on"
            );
            view.set_vip_front(true);
            view.set_rebalance(vip.rebalance);
            view.set_redirect_in_auth(vip.in_auth);
            tokio::spawn(director::run(
                opts.prefix.clone(),
                claims.sessions(),
                view.clone(),
                metrics.clone(),
                stop_rx.clone(),
            ))
        });
        let task = tokio::spawn(session::run(opts, view.clone(), lease_tx, metrics, stop_rx));
        Self {
            view,
            claims,
            links,
            address,
            replicator,
            replicas,
            lease_ttl,
            message_id_sync,
            key,
            replication_metrics,
            stop,
            task,
            director,
        }
    }

    /// Leaves the fleet: revokes the lease, so that the others take our shards at once.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Some(d) = self.director {
            let _ = d.await;
        }
        let _ = self.task.await;
    }

    /// Accepts the replication streams of the members whose shards this pod replicates.
    pub fn serve_replicas(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        tokio::spawn(replicate::serve(
            listener,
            self.view.clone(),
            self.key.clone(),
            self.replicas.clone(),
            self.replication_metrics.clone(),
            replicate::Revoker {
                session: self.claims.sessions(),
            },
        ))
    }

    /// Stops at once without a word to etcd, as a crashed pod would: the others learn of it
    /// when the lease runs out.
    pub fn kill(self) {
        if let Some(d) = &self.director {
            d.abort();
        }
        self.task.abort();
    }
}

/// A client for `opts`' endpoints.
async fn connect(opts: &FleetOptions) -> Result<Client, FleetError> {
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(tls) = &opts.tls {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| FleetError::Tls(format!("{}: {e}", p.display())));
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        connect = connect.with_tls(t);
    }
    Ok(Client::connect(&opts.endpoints, Some(connect)).await?)
}
