//! The controllers: `Eroute` and `Egroup` validation (spec and references), and how every
//! controller is wired to its watches.

use std::sync::Arc;
use std::time::Duration;

use concentrator_crds::{Egroup, Eroute, GatewayFleet, SecretKeyRef, ValidationError};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::status::{Problem, ready_status, ready_unchanged};

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
    /// Kubernetes Events on the objects the operator acts on ([`Recorders`]).
    pub recorders: Recorders,
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
            recorders: Recorders::new(client.clone(), reporter),
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
        let recorder = self
            .recorders
            .for_note(reason, ev.note.as_deref().unwrap_or_default());
        if let Err(e) = recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish Event");
        }
    }
}

/// Event recorders by (reason, note). kube's `Recorder` folds every Event of one type,
/// reason, action and object into one series and keeps the series' first note, so a scale
/// from 3 to 2 pods after one from 2 to 3 would show as the first, counted twice. client-go
/// counts the message in; so do we, with a recorder per note: the same note again joins its
/// series, a new note is a new Event. Bounded: past [`Self::MAX`] notes the recorders start
/// over (an ongoing series then begins a new Event, which loses nothing).
pub struct Recorders {
    client: Client,
    reporter: kube::runtime::events::Reporter,
    by_note: std::sync::Mutex<std::collections::HashMap<(String, String), kube::runtime::events::Recorder>>,
}

impl Recorders {
    const MAX: usize = 512;

    pub fn new(client: Client, reporter: kube::runtime::events::Reporter) -> Self {
        Self {
            client,
            reporter,
            by_note: std::sync::Mutex::default(),
        }
    }

    /// The recorder for Events of `reason` saying `note`.
    pub fn for_note(&self, reason: &str, note: &str) -> kube::runtime::events::Recorder {
        // A poisoned lock only means a panic mid-insert of a plain map: still usable.
        let mut by_note = self.by_note.lock().unwrap_or_else(|e| e.into_inner());
        let key = (reason.to_owned(), note.to_owned());
        if !by_note.contains_key(&key) && by_note.len() >= Self::MAX {
            by_note.clear();
        }
        by_note
            .entry(key)
            .or_insert_with(|| {
                kube::runtime::events::Recorder::new(self.client.clone(), self.reporter.clone())
            })
            .clone()
    }

    /// How many notes have a recorder (for tests).
    pub fn len(&self) -> usize {
        self.by_note.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A resource whose spec validates on its own, and whose references (Secrets, a base Eroute)
/// are checked against the cluster.
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
    /// The Secret keys the spec names, each with its field.
    fn secret_refs(&self) -> Vec<(&'static str, &SecretKeyRef)>;
    /// The Eroute it is built on (an Egroup's), checked to exist and to fit.
    fn base_eroute(&self) -> Option<&str> {
        None
    }
    /// Validates the pair of this object and its base Eroute (the checks across objects).
    fn fits(&self, _base: &Eroute) -> Result<(), concentrator_crds::set::ObjectError> {
        Ok(())
    }
}

impl Validated for Eroute {
    const KIND: &'static str = "Eroute";
    fn check(&self) -> Result<(), ValidationError> {
        self.spec.validate().map(|_| ())
    }
    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
    fn secret_refs(&self) -> Vec<(&'static str, &SecretKeyRef)> {
        self.spec
            .psk_secret_ref
            .iter()
            .map(|r| ("spec.pskSecretRef", r))
            .collect()
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
    fn secret_refs(&self) -> Vec<(&'static str, &SecretKeyRef)> {
        self.spec
            .database
            .url_secret_ref
            .iter()
            .map(|r| ("spec.database.urlSecretRef", r))
            .collect()
    }
    fn base_eroute(&self) -> Option<&str> {
        Some(&self.spec.eroute)
    }
    fn fits(&self, base: &Eroute) -> Result<(), concentrator_crds::set::ObjectError> {
        concentrator_crds::set::validate(
            &[(base.name_any(), base.spec.clone())],
            &[(self.name_any(), self.spec.clone())],
        )
        .map(|_| ())
    }
}

/// What is wrong with Secret `name` (as found) for a reference to its `key`, if anything.
pub fn secret_problem(found: Option<&Secret>, name: &str, key: &str) -> Option<String> {
    let has_key = found.is_some_and(|s| {
        s.data.as_ref().is_some_and(|d| d.contains_key(key))
            || s.string_data.as_ref().is_some_and(|d| d.contains_key(key))
    });
    match found {
        _ if has_key => None,
        None => Some(format!("Secret '{name}' not found")),
        Some(_) => Some(format!("Secret '{name}' has no key '{key}'")),
    }
}

/// Whether what `obj` refers to is there: its Secrets with their keys, its base Eroute
/// (existing, valid, and fitting it). `Ready` covers these, not just the spec's syntax: an
/// Eroute whose PSK Secret is missing brings up no tunnel.
async fn references<K: Validated>(
    obj: &K,
    client: &Client,
    ns: &str,
) -> Result<Result<(), Problem>, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (field, r) in obj.secret_refs() {
        let found = secrets.get_opt(&r.name).await?;
        if let Some(why) = secret_problem(found.as_ref(), &r.name, &r.key) {
            return Ok(Err(Problem {
                reason: "SecretMissing",
                message: format!("{field}: {why}"),
            }));
        }
    }
    let Some(base) = obj.base_eroute() else {
        return Ok(Ok(()));
    };
    let Some(eroute) = Api::<Eroute>::namespaced(client.clone(), ns)
        .get_opt(base)
        .await?
    else {
        return Ok(Err(Problem {
            reason: "ErouteMissing",
            message: format!("spec.eroute: Eroute '{base}' does not exist"),
        }));
    };
    if let Err(e) = eroute.spec.validate() {
        return Ok(Err(Problem {
            reason: "ErouteInvalid",
            message: format!("spec.eroute: Eroute '{base}' is invalid: {e}"),
        }));
    }
    Ok(obj.fits(&eroute).map_err(|e| Problem {
        reason: if e.kind == "Eroute" {
            "ErouteInvalid"
        } else {
            "Invalid"
        },
        message: e.to_string(),
    }))
}

/// Validates the object and what it refers to, and records the verdict in its status by
/// server-side apply; a new problem is also an Event on the object.
#[tracing::instrument(skip_all, fields(kind = K::KIND, name = %obj.name_any(), namespace = obj.namespace().unwrap_or_default()))]
pub async fn reconcile<K: Validated>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let measure = ctx.metrics.measure(K::KIND);
    let r = validate_and_record(obj, &ctx).await;
    measure.done(r.as_ref().err().map(Error::reason));
    r
}

async fn validate_and_record<K: Validated>(obj: Arc<K>, ctx: &Context) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let verdict = match obj.check() {
        Ok(()) => references(&*obj, &ctx.client, &ns).await?,
        Err(e) => Err(Problem::from(e)),
    };
    if let Err(p) = &verdict {
        tracing::warn!(reason = p.reason, message = %p.message, "not ready");
        if !ready_unchanged(obj.conditions(), "False", p.reason, &p.message) {
            ctx.event(&*obj, true, p.reason, p.message.clone()).await;
        }
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
    // Watches bring every change of the object and of the Secrets and Eroute it names; the
    // requeue is a safety net for a missed watch event.
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Retry soon after an API error.
pub fn error_policy<K: ResourceExt>(_obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Runs the GatewayFleet, Eroute and Egroup controllers of every scope (the cluster, or each
/// namespace of [`crate::triggers::scopes`]) until they stop; `admin` reaches the gateway
/// pods.
pub async fn run(
    client: Client,
    admin: crate::fleet::admin::GrpcFleetAdmin,
    metrics: crate::metrics::Metrics,
    scopes: Vec<Option<String>>,
) {
    let mut ctx = Context::new(client.clone(), Arc::new(admin));
    ctx.metrics = metrics;
    let ctx = Arc::new(ctx);
    futures::future::join_all(scopes.iter().map(|s| run_scope(&client, &ctx, s))).await;
    // Stopping (SIGTERM: `helm uninstall` deletes the chart's GatewayFleet and then this
    // Deployment): a fleet being deleted would keep its finalizer forever with no operator
    // left to lift it.
    crate::fleet::finish_deletions(&ctx, &scopes).await;
}

/// The three controllers of one scope. Each is triggered by watches, not by polling: its own
/// kind (spec changes only: the operator's status writes do not come back), the Secrets its
/// objects name, and for fleets their StatefulSets (by label) and every Eroute and Egroup of
/// their namespace.
async fn run_scope(client: &Client, ctx: &Arc<Context>, scope: &Option<String>) {
    use crate::triggers::{self, api};
    use kube::runtime::{WatchStreamExt, predicates};
    // Bursts (kubectl apply -f examples/) become one reconcile.
    let config = kube::runtime::controller::Config::default().debounce(Duration::from_millis(500));

    let (eroute_store, eroute_stream) =
        triggers::own_kind::<Eroute, _>(client, scope, predicates::generation);
    let store = eroute_store.clone();
    let eroutes = Controller::for_stream(eroute_stream, eroute_store.clone())
        .with_config(config.clone())
        .watches_stream(triggers::secret_changes(client, scope), move |s| {
            triggers::eroutes_using_secret(&store, s.namespace().as_deref(), &s.name_any())
        })
        .shutdown_on_signal()
        .run(reconcile::<Eroute>, error_policy::<Eroute>, ctx.clone())
        .for_each(|_| async {});

    let (egroup_store, egroup_stream) =
        triggers::own_kind::<Egroup, _>(client, scope, predicates::generation);
    let (by_secret, by_eroute) = (egroup_store.clone(), egroup_store.clone());
    let egroups = Controller::for_stream(egroup_stream, egroup_store.clone())
        .with_config(config.clone())
        .watches_stream(triggers::secret_changes(client, scope), move |s| {
            triggers::egroups_using_secret(&by_secret, s.namespace().as_deref(), &s.name_any())
        })
        .watches_stream(
            triggers::spec_changes(
                watcher(api::<Eroute>(client, scope), watcher::Config::default()).default_backoff(),
            ),
            move |e| triggers::egroups_of_eroute(&by_eroute, e.namespace().as_deref(), &e.name_any()),
        )
        .shutdown_on_signal()
        .run(reconcile::<Egroup>, error_policy::<Egroup>, ctx.clone())
        .for_each(|_| async {});

    let (fleet_store, fleet_stream) = triggers::own_kind(client, scope, triggers::fleet_predicate);
    let (on_eroute, on_egroup, on_secret) = (fleet_store.clone(), fleet_store.clone(), fleet_store.clone());
    let fleets = Controller::for_stream(fleet_stream, fleet_store.clone())
        .with_config(config)
        // Only our StatefulSets (by label), not every one in the cluster.
        .owns(
            api::<StatefulSet>(client, scope),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=concentrator-operator"),
        )
        .watches_stream(
            triggers::spec_changes(
                watcher(api::<Eroute>(client, scope), watcher::Config::default()).default_backoff(),
            ),
            move |e| triggers::fleets_of_namespace(&on_eroute, e.namespace().as_deref()),
        )
        .watches_stream(
            triggers::spec_changes(
                watcher(api::<Egroup>(client, scope), watcher::Config::default()).default_backoff(),
            ),
            move |g| triggers::fleets_of_namespace(&on_egroup, g.namespace().as_deref()),
        )
        .watches_stream(triggers::secret_changes(client, scope), move |s| {
            triggers::fleets_using_secret(
                &on_secret,
                &eroute_store,
                &egroup_store,
                s.namespace().as_deref(),
                &s.name_any(),
            )
        })
        .shutdown_on_signal()
        .run(crate::fleet::reconcile, error_policy::<GatewayFleet>, ctx.clone())
        .for_each(|_| async {});
    tokio::join!(eroutes, egroups, fleets);
}
