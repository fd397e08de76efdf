//! The gRPC admin API (`concentrator.admin.v1.GatewayAdmin`). Errors become `Status` here and
//! nowhere else.

use std::sync::Arc;

use concentrator_proto::admin::gateway_admin_server::GatewayAdmin;
use concentrator_proto::admin::{
    Counters, DrainRequest, DrainStatus, ErouteInfo, GetCountersRequest, GetTunnelRequest,
    ListEroutesRequest, ListEroutesResponse, ListTunnelsRequest, ListTunnelsResponse, Tunnel, drain_status,
};
use tonic::{Request, Response, Status};

use crate::state::Gateway;

/// Admin service over a shared gateway state.
#[derive(Clone)]
pub struct AdminService {
    gw: Arc<Gateway>,
}

impl AdminService {
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self { gw }
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
        Ok(Response::new(ListTunnelsResponse { tunnels }))
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
