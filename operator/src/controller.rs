//! Validation controllers for `Eroute` and `Egroup`.

use std::sync::Arc;
use std::time::Duration;

use concentrator_crds::{Egroup, Eroute, GatewayFleet, ValidationError};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::status::ready_status;

/// Field manager for status patches.
pub const MANAGER: &str = "concentrator-operator";

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no namespace")]
    NoNamespace,
    #[error("building objects: {0}")]
    Build(String),
    #[error("waiting for {0} tunnel(s) to leave the fleet before it is deleted")]
    StillDraining(u64),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Self>>),
}

impl Error {
    /// The `reason` label of `concentrator_operator_reconcile_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::NoNamespace => "no_namespace",
            Self::Build(_) => "build",
            Self::StillDraining(_) => "still_draining",
            Self::Finalizer(_) => "finalizer",
        }
    }
}

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    /// The gateway pods' admin API (load reports, drain).
    pub admin: Arc<dyn crate::fleet::admin::FleetAdmin>,
    /// Autoscaling recommendations per fleet (`namespace/name`), for the stabilisation window.
    pub scale_history: std::sync::Mutex<std::collections::HashMap<String, crate::fleet::scale::History>>,
    /// Each fleet's scale-in in progress (`namespace/name`).
    pub scale_in: std::sync::Mutex<std::collections::HashMap<String, crate::fleet::scale_in::ScaleIn>>,
    /// Kubernetes Events on the objects the operator acts on.
    pub recorder: kube::runtime::events::Recorder,
    /// The operator's own namespace (`POD_NAMESPACE`), whose operator pods the fleets'
    /// NetworkPolicies admit to the admin API.
    pub operator_namespace: String,
    /// Reconcile counts, failures and durations.
    pub metrics: crate::metrics::Metrics,
}

impl Context {
    pub fn new(client: Client, admin: Arc<dyn crate::fleet::admin::FleetAdmin>) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: kube::runtime::events::Recorder::new(client.clone(), reporter),
            client,
            admin,
            scale_history: Default::default(),
            scale_in: Default::default(),
            metrics: crate::metrics::Metrics::default(),
            operator_namespace: std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".to_owned()),
        }
    }

    /// Publishes an Event on `obj`; a failure to do so is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        use kube::runtime::events::{Event, EventType};
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish Event");
        }
    }
}

/// A resource whose spec validates on its own.
pub trait Validated:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    const KIND: &'static str;
    fn check(&self) -> Result<(), ValidationError>;
    /// The conditions in the object's status now (for `lastTransitionTime`).
    fn conditions(&self) -> &[Condition];
}

impl Validated for Eroute {
    const KIND: &'static str = "Eroute";
    fn check(&self) -> Result<(), ValidationError> {
        self.spec.validate().map(|_| ())
    }
    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

impl Validated for Egroup {
    const KIND: &'static str = "Egroup";
    fn check(&self) -> Result<(), ValidationError> {
        self.spec.validate().map(|_| ())
    }
    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

/// Validates the object and records the verdict in its status by server-side apply.
#[tracing::instrument(skip_all, fields(kind = K::KIND, name = %obj.name_any(), namespace = obj.namespace().unwrap_or_default()))]
pub async fn reconcile<K: Validated>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let measure = ctx.metrics.measure(K::KIND);
    let r = validate_and_record(obj, &ctx).await;
    measure.done(r.as_ref().err().map(Error::reason));
    r
}

async fn validate_and_record<K: Validated>(obj: Arc<K>, ctx: &Context) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let verdict = obj.check();
    if let Err(e) = &verdict {
        tracing::warn!(error = %e, "invalid spec");
    }
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::KIND,
        "status": ready_status(&verdict, obj.meta().generation, obj.conditions(), &now),
    });
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Retry soon after an API error.
pub fn error_policy<K: ResourceExt>(_obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Runs the GatewayFleet, Eroute and Egroup controllers until the stream ends; `admin`
/// reaches the gateway pods.
pub async fn run(
    client: Client,
    admin: crate::fleet::admin::GrpcFleetAdmin,
    metrics: crate::metrics::Metrics,
) {
    let mut ctx = Context::new(client.clone(), Arc::new(admin));
    ctx.metrics = metrics;
    let ctx = Arc::new(ctx);
    let eroutes = Controller::new(Api::<Eroute>::all(client.clone()), watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile::<Eroute>, error_policy::<Eroute>, ctx.clone())
        .for_each(|_| async {});
    let egroups = Controller::new(Api::<Egroup>::all(client.clone()), watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile::<Egroup>, error_policy::<Egroup>, ctx.clone())
        .for_each(|_| async {});
    let fleets = Controller::new(
        Api::<GatewayFleet>::all(client.clone()),
        watcher::Config::default(),
    )
    // Only our StatefulSets (by label), not every one in the cluster.
    .owns(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default().labels("app.kubernetes.io/managed-by=concentrator-operator"),
    )
    .shutdown_on_signal()
    .run(crate::fleet::reconcile, error_policy::<GatewayFleet>, ctx.clone())
    .for_each(|_| async {});
    tokio::join!(eroutes, egroups, fleets);
    // Stopping (SIGTERM: `helm uninstall` deletes the chart's GatewayFleet and then this
    // Deployment): a fleet being deleted would keep its finalizer forever with no operator
    // left to lift it.
    crate::fleet::finish_deletions(&ctx).await;
}
