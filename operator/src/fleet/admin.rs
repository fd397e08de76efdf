//! Talking to the gateway pods' admin API (gRPC on port 50051 through the headless Service,
//! mutual TLS): load reports for autoscaling, and drain before a pod is removed.

use concentrator_proto::admin::gateway_admin_client::GatewayAdminClient;
use concentrator_proto::tls::ClientTls;
use futures::future::BoxFuture;

use super::scale::PodReport;

/// A pod's answer to Drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainState {
    /// Handing its tunnels over; `nowhere_to_go`: no other member takes them (they end with
    /// the pod), so waiting is useless.
    Draining {
        remaining: u64,
        nowhere_to_go: bool,
    },
    Drained,
    /// Not draining (after a cancel).
    Active,
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
    /// Stops a pod's drain: it takes new sites again.
    fn cancel_drain<'a>(
        &'a self,
        ns: &'a str,
        fleet: &'a str,
        ordinal: u32,
    ) -> BoxFuture<'a, Result<DrainState, AdminError>>;
}

/// Where a pod's admin API is, from namespace, fleet and ordinal (`host:port`).
type Locate = dyn Fn(&str, &str, u32) -> String + Send + Sync;

/// The real pods, by their stable DNS names, over mutual TLS when the operator has a client
/// certificate (`--admin-tls-dir`): a fleet with `adminTlsSecretName` answers nothing else.
#[derive(Clone)]
pub struct GrpcFleetAdmin {
    tls: Option<ClientTls>,
    locate: std::sync::Arc<Locate>,
}

impl std::fmt::Debug for GrpcFleetAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The TLS files' Debug names their directory, never the key.
        f.debug_struct("GrpcFleetAdmin")
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Default for GrpcFleetAdmin {
    fn default() -> Self {
        Self::new(None)
    }
}

impl GrpcFleetAdmin {
    /// Pods reached by their per-pod DNS names; with `tls`, over mutual TLS.
    pub fn new(tls: Option<ClientTls>) -> Self {
        Self {
            tls,
            locate: std::sync::Arc::new(authority),
        }
    }

    async fn drain_request(
        &self,
        ns: &str,
        fleet: &str,
        ordinal: u32,
        cancel: bool,
    ) -> Result<DrainState, AdminError> {
        use concentrator_proto::admin::drain_status::State;
        let mut c = self.client(ns, fleet, ordinal).await?;
        let s = c
            .drain(concentrator_proto::admin::DrainRequest {
                cancel,
                exit_when_drained: false,
            })
            .await
            .map_err(rpc_error(fleet, ordinal))?
            .into_inner();
        Ok(match s.state() {
            State::Drained => DrainState::Drained,
            State::Active | State::Unspecified => DrainState::Active,
            State::Draining => DrainState::Draining {
                remaining: s.remaining_tunnels,
                nowhere_to_go: s.nowhere_to_go,
            },
        })
    }

    /// Pods found elsewhere than by their DNS names (tests: a gateway on loopback).
    #[must_use]
    pub fn locating(mut self, locate: impl Fn(&str, &str, u32) -> String + Send + Sync + 'static) -> Self {
        self.locate = std::sync::Arc::new(locate);
        self
    }

    async fn client(
        &self,
        ns: &str,
        fleet: &str,
        ordinal: u32,
    ) -> Result<GatewayAdminClient<tonic::transport::Channel>, AdminError> {
        let at = (self.locate)(ns, fleet, ordinal);
        let unreachable = |message: String| AdminError::Unreachable {
            pod: format!("{fleet}-{ordinal}"),
            message,
        };
        // Gateways serve plaintext on their loopback only: without a client certificate no
        // pod can be reached, and saying so beats a protocol error.
        let Some(tls) = self.tls.as_ref() else {
            return Err(unreachable(
                "the operator has no admin client certificate (--admin-tls-dir, CONCENTRATOR_ADMIN_TLS_DIR)"
                    .into(),
            ));
        };
        // Re-read per connection (every 30 s per pod at most): a renewed certificate is used
        // without a restart; unusable files leave the ones loaded at start in use.
        let fresh = tls.reloaded().map_err(|e| {
            tracing::warn!(error = %e, "admin client TLS files unusable; using those loaded at start");
        });
        let tls = fresh.as_ref().unwrap_or(tls);
        let ch = concentrator_proto::tls::endpoint(&at, Some(tls))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(std::time::Duration::from_secs(3))
            .timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        Ok(GatewayAdminClient::new(ch))
    }
}

/// A pod's admin API by its stable DNS name through the headless Service.
fn authority(ns: &str, fleet: &str, ordinal: u32) -> String {
    format!(
        "{fleet}-{ordinal}.{fleet}-pods.{ns}.svc:{}",
        super::build::ADMIN_PORT
    )
}

/// An error and its sources, `: `-separated (tonic's own says only "transport error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
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
            let mut c = self.client(ns, fleet, ordinal).await?;
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
                draining: v.get("drain_state").is_some_and(|d| *d != 0),
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
        Box::pin(self.drain_request(ns, fleet, ordinal, false))
    }

    fn cancel_drain<'a>(
        &'a self,
        ns: &'a str,
        fleet: &'a str,
        ordinal: u32,
    ) -> BoxFuture<'a, Result<DrainState, AdminError>> {
        Box::pin(self.drain_request(ns, fleet, ordinal, true))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn without_a_client_certificate_no_pod_is_tried() {
        use super::FleetAdmin;
        let admin = super::GrpcFleetAdmin::default().locating(|_, _, _| "127.0.0.1:1".into());
        let e = admin.report("vpn", "edge", 0).await.unwrap_err().to_string();
        assert!(e.contains("edge-0") && e.contains("--admin-tls-dir"), "{e}");
    }

    #[test]
    fn pods_are_reached_by_their_stable_dns_name() {
        assert_eq!(
            super::authority("vpn", "edge", 2),
            "edge-2.edge-pods.vpn.svc:50051"
        );
    }
}
