//! The gRPC admin API (`concentrator.admin.v1.GatewayAdmin`). Errors become `Status` here and
//! nowhere else.

use std::sync::Arc;
use std::time::Duration;

use concentrator_fleet::member::MemberRecord;
use concentrator_proto::admin::gateway_admin_client::GatewayAdminClient;

use concentrator_proto::admin::gateway_admin_server::GatewayAdmin;
use concentrator_proto::admin::{
    Counters, DrainRequest, DrainStatus, ErouteInfo, GetCountersRequest, GetTunnelRequest,
    ListEroutesRequest, ListEroutesResponse, ListTunnelsRequest, ListTunnelsResponse, Tunnel, drain_status,
};
use tonic::{Request, Response, Status};

use crate::cluster::SharedView;
use crate::state::Gateway;

/// How long the fleet-wide tunnel list waits for each other member.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(3);

/// Admin service over a shared gateway state.
#[derive(Clone)]
pub struct AdminService {
    gw: Arc<Gateway>,
    /// The fleet this pod is a member of, if any.
    fleet: Option<SharedView>,
}

impl AdminService {
    pub fn new(gw: Arc<Gateway>, fleet: Option<SharedView>) -> Self {
        Self { gw, fleet }
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
            asks.spawn(async move {
                let asked = async {
                    let mut c = GatewayAdminClient::connect(format!("http://{addr}"))
                        .await
                        .map_err(|e| e.to_string())?;
                    c.list_tunnels(req)
                        .await
                        .map(|r| r.into_inner().tunnels)
                        .map_err(|s| s.message().to_owned())
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
        let set = &self.gw.config.set;
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
                    dynamic_eroutes: self
                        .gw
                        .tunnels
                        .list("", name)
                        .iter()
                        .filter(|t| t.dynamic)
                        .count() as u64,
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
    async fn drain(&self, _req: Request<DrainRequest>) -> Result<Response<DrainStatus>, Status> {
        self.gw.metrics.count_admin("Drain");
        let remaining = self.gw.start_drain();
        let state = if remaining == 0 {
            drain_status::State::Drained
        } else {
            drain_status::State::Draining
        };
        tracing::info!(remaining, ?state, "drain requested");
        Ok(Response::new(DrainStatus {
            state: state.into(),
            remaining_tunnels: remaining as u64,
        }))
    }
}
