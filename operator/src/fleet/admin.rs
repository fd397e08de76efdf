//! Talking to the gateway pods' admin API (gRPC on port 50051 through the headless Service):
//! load reports for autoscaling, and drain before a pod is removed.

use futures::future::BoxFuture;

use super::scale::PodReport;

/// A pod's answer to Drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainState {
    Draining { remaining: u64 },
    Drained,
}

/// Errors reaching a pod.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("pod {pod}: {message}")]
    Unreachable { pod: String, message: String },
}

/// The pods of a fleet, as the operator sees them. A trait so that reconcile tests can script
/// the pods' answers.
pub trait FleetAdmin: Send + Sync {
    fn report<'a>(
        &'a self,
        ns: &'a str,
        fleet: &'a str,
        ordinal: u32,
    ) -> BoxFuture<'a, Result<PodReport, AdminError>>;
    fn drain<'a>(
        &'a self,
        ns: &'a str,
        fleet: &'a str,
        ordinal: u32,
    ) -> BoxFuture<'a, Result<DrainState, AdminError>>;
}

/// The real pods, by their stable DNS names.
#[derive(Debug, Default, Clone)]
pub struct GrpcFleetAdmin;

fn endpoint(ns: &str, fleet: &str, ordinal: u32) -> String {
    format!("http://{fleet}-{ordinal}.{fleet}-pods.{ns}.svc:50051")
}

async fn client(
    ns: &str,
    fleet: &str,
    ordinal: u32,
) -> Result<
    concentrator_proto::admin::gateway_admin_client::GatewayAdminClient<tonic::transport::Channel>,
    AdminError,
> {
    let url = endpoint(ns, fleet, ordinal);
    let unreachable = |e: &dyn std::fmt::Display| AdminError::Unreachable {
        pod: format!("{fleet}-{ordinal}"),
        message: e.to_string(),
    };
    let ch = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| unreachable(&e))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| unreachable(&e))?;
    Ok(concentrator_proto::admin::gateway_admin_client::GatewayAdminClient::new(ch))
}

fn rpc_error(fleet: &str, ordinal: u32) -> impl Fn(tonic::Status) -> AdminError + '_ {
    move |e| AdminError::Unreachable {
        pod: format!("{fleet}-{ordinal}"),
        message: e.message().to_owned(),
    }
}

impl FleetAdmin for GrpcFleetAdmin {
    fn report<'a>(
        &'a self,
        ns: &'a str,
        fleet: &'a str,
        ordinal: u32,
    ) -> BoxFuture<'a, Result<PodReport, AdminError>> {
        Box::pin(async move {
            let mut c = client(ns, fleet, ordinal).await?;
            let v = c
                .get_counters(concentrator_proto::admin::GetCountersRequest {})
                .await
                .map_err(rpc_error(fleet, ordinal))?
                .into_inner()
                .values;
            let eroutes = c
                .list_eroutes(concentrator_proto::admin::ListEroutesRequest {})
                .await
                .map_err(rpc_error(fleet, ordinal))?
                .into_inner()
                .eroutes;
            Ok(PodReport {
                tunnels: v.get("tunnels").copied().unwrap_or(0),
                cpu_percent: v.get("cpu_percent").and_then(|c| u32::try_from(*c).ok()),
                dynamic_eroutes: eroutes.into_iter().map(|e| (e.name, e.dynamic_eroutes)).collect(),
            })
        })
    }

    fn drain<'a>(
        &'a self,
        ns: &'a str,
        fleet: &'a str,
        ordinal: u32,
    ) -> BoxFuture<'a, Result<DrainState, AdminError>> {
        Box::pin(async move {
            use concentrator_proto::admin::drain_status::State;
            let mut c = client(ns, fleet, ordinal).await?;
            let s = c
                .drain(concentrator_proto::admin::DrainRequest {})
                .await
                .map_err(rpc_error(fleet, ordinal))?
                .into_inner();
            Ok(match s.state() {
                State::Drained => DrainState::Drained,
                _ => DrainState::Draining {
                    remaining: s.remaining_tunnels,
                },
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoint_uses_the_stable_pod_dns_name() {
        assert_eq!(
            super::endpoint("vpn", "edge", 2),
            "http://edge-2.edge-pods.vpn.svc:50051"
        );
    }
}
