//! The gRPC admin API (`concentrator.admin.v1.GatewayAdmin`). Errors become `Status` here and
//! nowhere else.

pub mod incoming;

use std::sync::Arc;
use std::time::Duration;

use concentrator_fleet::member::MemberRecord;
use concentrator_proto::admin::gateway_admin_client::GatewayAdminClient;

use concentrator_proto::admin::gateway_admin_server::GatewayAdmin;
use concentrator_proto::admin::{
    Counters, DrainRequest, DrainStatus, ErouteInfo, GetCountersRequest, GetShardsRequest, GetTunnelRequest,
    ImportSitesRequest, ImportSitesResponse, ListEroutesRequest, ListEroutesResponse, ListTunnelsRequest,
    ListTunnelsResponse, MemberShards, Shards, Tunnel, drain_status,
};
use concentrator_proto::import::Assembler;
use concentrator_proto::tls::{AdminTls, ClientTls, TlsError};
use tonic::{Request, Response, Status, Streaming};

use crate::cli::Options;
use crate::cluster::SharedView;
use crate::sitedb::SiteStore;
use crate::state::Gateway;

/// How long a site import waits for the next piece of its CSV before it gives up.
const IMPORT_PIECE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the admin API cannot be served as the options say.
#[derive(Debug, thiserror::Error)]
pub enum AdminTlsError {
    #[error(
        "the admin API would be plaintext on {0}, which is not a loopback address: whoever \
         reaches it could drain this gateway or list its sites. Give --admin-tls-dir \
         (CONCENTRATOR_ADMIN_TLS_DIR), a directory with tls.crt, tls.key and ca.crt, for mutual \
         TLS, or listen on 127.0.0.1"
    )]
    Plaintext(std::net::SocketAddr),
    #[error("admin API TLS: {0}")]
    Files(#[from] TlsError),
}

/// The admin API's server TLS from the options: `None` is plaintext, which only a loopback
/// address may serve (checked here, before anything starts).
pub fn server_tls(opts: &Options) -> Result<Option<AdminTls>, AdminTlsError> {
    match &opts.admin_tls_dir {
        Some(dir) => Ok(Some(AdminTls::load(dir)?)),
        None if opts.admin_listen.ip().is_loopback() => Ok(None),
        None => Err(AdminTlsError::Plaintext(opts.admin_listen)),
    }
}

/// What this gateway presents to other admin APIs (`tunnels`, the fleet-wide list).
pub fn client_tls(opts: &Options) -> Result<Option<ClientTls>, TlsError> {
    opts.admin_tls_dir
        .as_deref()
        .map(|dir| {
            Ok(ClientTls {
                files: AdminTls::load(dir)?,
                server_name: opts.admin_tls_server_name.clone(),
            })
        })
        .transpose()
}

/// A client of the admin API at `authority` (`host:port`), over TLS when `tls` is given.
/// The error is one line with its causes, as tonic's own says little ("transport error").
pub async fn connect(
    authority: &str,
    tls: Option<&ClientTls>,
) -> Result<GatewayAdminClient<tonic::transport::Channel>, String> {
    let endpoint = concentrator_proto::tls::endpoint(authority, tls).map_err(|e| e.to_string())?;
    let channel = endpoint.connect().await.map_err(|e| error_chain(&e))?;
    Ok(GatewayAdminClient::new(channel))
}

/// A status for people: its message, and the transport's causes where tonic has only
/// "transport error" to say (e.g. a TLS alert from the server).
pub fn status_text(s: &Status) -> String {
    match std::error::Error::source(s) {
        Some(cause) => format!("{}: {}", s.message(), error_chain(cause)),
        None => s.message().to_owned(),
    }
}

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// How long the fleet-wide tunnel list waits for each other member.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(3);

/// Admin service over a shared gateway state.
#[derive(Clone)]
pub struct AdminService {
    gw: Arc<Gateway>,
    /// The default site store, which `ImportSites` writes to.
    sites: SiteStore,
    /// The fleet this pod is a member of, if any.
    fleet: Option<SharedView>,
    /// On how many other members each shard's SAs are copied (`--fleet-replicas`).
    replicas: usize,
    /// What this pod presents to the other members' admin APIs.
    client_tls: Option<ClientTls>,
    /// Held by the import under way: one at a time, so that imports hold at most
    /// [`concentrator_proto::import::MAX_CSV_BYTES`] of CSV in memory.
    importing: Arc<tokio::sync::Mutex<()>>,
}

impl AdminService {
    /// A standalone gateway's admin API over `gw`, importing sites into `sites`.
    pub fn new(gw: Arc<Gateway>, sites: SiteStore) -> Self {
        Self {
            gw,
            sites,
            fleet: None,
            replicas: 0,
            client_tls: None,
            importing: Arc::default(),
        }
    }

    /// A fleet member's: `view` is the fleet as this pod sees it, `replicas` its
    /// `--fleet-replicas`.
    #[must_use]
    pub fn in_fleet(mut self, view: Option<SharedView>, replicas: usize) -> Self {
        self.fleet = view;
        self.replicas = replicas;
        self
    }

    /// Asks the other members over mutual TLS with these files.
    #[must_use]
    pub fn with_client_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.client_tls = tls;
        self
    }

    /// Every member's tunnels: ours, and each other member's own list from its admin API
    /// (asked at once, each for [`MEMBER_TIMEOUT`] at most).
    async fn fleet_tunnels(
        &self,
        view: &SharedView,
        r: ListTunnelsRequest,
        mut own: Vec<Tunnel>,
    ) -> ListTunnelsResponse {
        let members = view.members();
        let me = view.me();
        let name_of = |m| {
            members
                .get(&m)
                .map(|r: &MemberRecord| r.name.clone())
                .unwrap_or_default()
        };
        let my_name = me.map(name_of).unwrap_or_default();
        for t in &mut own {
            t.member.clone_from(&my_name);
        }
        // Re-read per listing: a renewed certificate is used without a restart.
        let tls = self.client_tls.as_ref().map(|t| {
            t.reloaded().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "admin TLS files unusable; using those loaded at start");
                t.clone()
            })
        });
        let mut asks = tokio::task::JoinSet::new();
        let mut unreachable = Vec::new();
        for (m, rec) in &members {
            if Some(*m) == me {
                continue;
            }
            let Some(addr) = rec.admin else {
                unreachable.push(format!("{}: no admin API address it answers others on", rec.name));
                continue;
            };
            let (name, req) = (
                rec.name.clone(),
                ListTunnelsRequest {
                    fleet: false,
                    ..r.clone()
                },
            );
            let tls = tls.clone();
            asks.spawn(async move {
                let asked = async {
                    let mut c = connect(&addr.to_string(), tls.as_ref()).await?;
                    c.list_tunnels(req)
                        .await
                        .map(|r| r.into_inner().tunnels)
                        .map_err(|s| status_text(&s))
                };
                let r = tokio::time::timeout(MEMBER_TIMEOUT, asked)
                    .await
                    .unwrap_or_else(|_| Err("no answer in time".into()));
                (name, r)
            });
        }
        while let Some(done) = asks.join_next().await {
            match done {
                Ok((name, Ok(tunnels))) => own.extend(tunnels.into_iter().map(|t| Tunnel {
                    member: name.clone(),
                    ..t
                })),
                Ok((name, Err(e))) => unreachable.push(format!("{name}: {e}")),
                Err(e) => unreachable.push(e.to_string()),
            }
        }
        own.sort_by(|a, b| (&a.remote_peer_id, &a.member).cmp(&(&b.remote_peer_id, &b.member)));
        ListTunnelsResponse {
            tunnels: own,
            unreachable,
        }
    }
}

#[tonic::async_trait]
impl GatewayAdmin for AdminService {
    #[tracing::instrument(skip_all, fields(pattern = %req.get_ref().peer_id_pattern))]
    async fn list_tunnels(
        &self,
        req: Request<ListTunnelsRequest>,
    ) -> Result<Response<ListTunnelsResponse>, Status> {
        self.gw.metrics.count_admin("ListTunnels");
        let r = req.into_inner();
        if !r.peer_id_pattern.is_empty() {
            concentrator_crds::pattern::validate("peer_id_pattern", &r.peer_id_pattern)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let tunnels = self.gw.tunnels.list(&r.peer_id_pattern, &r.eroute);
        if let (true, Some(view)) = (r.fleet, &self.fleet) {
            return Ok(Response::new(self.fleet_tunnels(view, r.clone(), tunnels).await));
        }
        Ok(Response::new(ListTunnelsResponse {
            tunnels,
            unreachable: Vec::new(),
        }))
    }

    async fn get_tunnel(&self, req: Request<GetTunnelRequest>) -> Result<Response<Tunnel>, Status> {
        self.gw.metrics.count_admin("GetTunnel");
        let id = req.into_inner().id;
        self.gw
            .tunnels
            .get(&id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no tunnel with id '{id}'")))
    }

    async fn list_eroutes(
        &self,
        _req: Request<ListEroutesRequest>,
    ) -> Result<Response<ListEroutesResponse>, Status> {
        self.gw.metrics.count_admin("ListEroutes");
        let config = self.gw.config();
        let set = &config.set;
        let eroutes = set
            .eroutes
            .iter()
            .map(|(name, e)| {
                let group = set.egroup_of(name);
                ErouteInfo {
                    name: name.clone(),
                    egroup: group.map(|(n, _)| n.to_owned()).unwrap_or_default(),
                    local_subnet: e.local_subnet.to_string(),
                    remote_subnet: e.remote_subnet.to_string(),
                    peer_id: e.peer_id.clone().unwrap_or_default(),
                    role: format!("{:?}", e.role),
                    ike_proposals: e.ike_proposals.iter().map(|p| p.to_string()).collect(),
                    esp_proposals: e.esp_proposals.iter().map(|p| p.to_string()).collect(),
                    dynamic_eroutes: self.gw.tunnels.count("", name, true) as u64,
                    max_dynamic_eroutes: group.map(|(_, g)| g.max_dynamic_eroutes).unwrap_or(0),
                }
            })
            .collect();
        Ok(Response::new(ListEroutesResponse { eroutes }))
    }

    async fn get_counters(&self, _req: Request<GetCountersRequest>) -> Result<Response<Counters>, Status> {
        self.gw.metrics.count_admin("GetCounters");
        Ok(Response::new(Counters {
            values: self.gw.metrics.snapshot().into_iter().collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<DrainStatus>, Status> {
        self.gw.metrics.count_admin("Drain");
        let req = req.into_inner();
        let (state, remaining) = if req.cancel && self.gw.is_draining() && !self.gw.cancel_drain() {
            tracing::info!("drain not cancelled: the gateway is stopping");
            (drain_status::State::Draining, self.gw.tunnels.len())
        } else if req.cancel {
            if self.gw.is_draining() {
                tracing::info!("drain cancelled: taking new sites again");
            }
            self.gw.cancel_drain();
            (drain_status::State::Active, self.gw.tunnels.len())
        } else {
            let first = !self.gw.is_draining();
            let remaining = self.gw.start_drain(req.exit_when_drained);
            if first {
                tracing::info!(
                    remaining,
                    exit_when_drained = req.exit_when_drained,
                    "drain requested"
                );
            }
            let state = if remaining == 0 {
                drain_status::State::Drained
            } else {
                drain_status::State::Draining
            };
            (state, remaining)
        };
        // The leader hands our shards over (or stops) once our record says so: now, not at
        // the next report.
        if let Some(view) = &self.fleet {
            view.request_report();
        }
        let me = self.fleet.as_ref().and_then(|v| v.me());
        let takers = self.fleet.as_ref().is_some_and(|v| {
            v.members()
                .iter()
                .any(|(m, r)| Some(*m) != me && !r.load.draining)
        });
        Ok(Response::new(DrainStatus {
            state: state.into(),
            remaining_tunnels: remaining as u64,
            nowhere_to_go: state == drain_status::State::Draining && !takers,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn import_sites(
        &self,
        req: Request<Streaming<ImportSitesRequest>>,
    ) -> Result<Response<ImportSitesResponse>, Status> {
        self.gw.metrics.count_admin("ImportSites");
        // Owned: the check below runs on a blocking thread that outlives this request if the
        // client goes away, and holds the lock until it is done (never two files in memory).
        let Ok(one_at_a_time) = self.importing.clone().try_lock_owned() else {
            return Err(Status::aborted(
                "another site import is under way on this gateway: try again once it is done",
            ));
        };
        let mut pieces = req.into_inner();
        let mut file = Assembler::new();
        // A client that stalls would hold the import lock for as long as its connection lives.
        loop {
            let piece = tokio::time::timeout(IMPORT_PIECE_TIMEOUT, pieces.message())
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "no piece of the CSV for {IMPORT_PIECE_TIMEOUT:?}: import abandoned, nothing written"
                    ))
                })??;
            let Some(piece) = piece else { break };
            file.push(piece)
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        }
        let file = file
            .finish()
            .ok_or_else(|| Status::invalid_argument("no CSV received"))?;
        let prefix = file
            .prefix
            .map(|p| {
                u8::try_from(p)
                    .map_err(|_| Status::invalid_argument(format!("prefix {p} is not a prefix length")))
            })
            .transpose()?;
        let name = file.file.clone();
        let bytes = file.csv.len();
        // Tens of MiB take a while to check: not on the runtime's threads, which carry IKE.
        let (checked, _one_at_a_time) = tokio::task::spawn_blocking(move || {
            (crate::sites::parse(&file.csv, &file.file, prefix), one_at_a_time)
        })
        .await
        .map_err(|e| Status::internal(format!("checking the CSV: {e}")))?;
        let written = match checked {
            Ok(sites) => crate::sites::write(&self.sites, &sites).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(n) => {
                tracing::info!(file = %name, bytes, sites = n, store = self.sites.kind(), "sites imported");
                if let Ok(count) = self.sites.count_sites().await {
                    self.gw
                        .metrics
                        .sites
                        .set(i64::try_from(count).unwrap_or(i64::MAX));
                }
                Ok(Response::new(ImportSitesResponse {
                    imported: n as u64,
                    embedded: matches!(self.sites, SiteStore::Sqlite(_)),
                }))
            }
            Err(e) => {
                tracing::warn!(file = %name, bytes, error = %e, "sites import refused: nothing written");
                Err(if e.is_bad_file() {
                    Status::invalid_argument(e.to_string())
                } else {
                    Status::unavailable(e.to_string())
                })
            }
        }
    }

    async fn get_shards(&self, _req: Request<GetShardsRequest>) -> Result<Response<Shards>, Status> {
        self.gw.metrics.count_admin("GetShards");
        let Some(view) = &self.fleet else {
            return Ok(Response::new(Shards::default()));
        };
        let records = view.members();
        let summary = view.shard_summary(self.replicas);
        let me = view
            .me()
            .and_then(|m| records.get(&m))
            .map(|r| r.name.clone())
            .unwrap_or_default();
        let members = summary
            .members
            .iter()
            .map(|(id, c)| {
                let rec = records.get(id);
                MemberShards {
                    name: rec.map(|r| r.name.clone()).unwrap_or_default(),
                    id: u32::from(id.0),
                    owned: c.owned,
                    replica: c.replica,
                    handing_over: c.handing_over,
                    taking_over: c.taking_over,
                    draining: rec.is_some_and(|r| r.load.draining),
                    map_version: rec.map_or(0, |r| r.map_version),
                }
            })
            .collect();
        Ok(Response::new(Shards {
            fleet: true,
            map_version: summary.map_version,
            total: u32::from(concentrator_fleet::SHARDS),
            unowned: summary.unowned,
            replicas: u32::try_from(self.replicas).unwrap_or(u32::MAX),
            me,
            members,
        }))
    }
}
