//! The GatewayFleet controller: validate -> dereference (Eroutes, Egroups, Secrets) -> build
//! (pure, see [`build`]) -> server-side apply -> status.

pub mod admin;
pub mod build;
pub mod netpol;
pub mod render;
pub mod scale;
pub mod scale_in;
pub mod vip;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use concentrator_crds::{Egroup, Eroute, GatewayFleet};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::controller::{Context, Error, MANAGER};
use crate::status::{condition, ready_condition};

/// The ScaleIn condition: whether a pod is leaving, and what holds it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleInCondition {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl ScaleInCondition {
    fn from_outcome(fleet: &str, o: &scale_in::Outcome) -> Self {
        use scale_in::Outcome;
        match o {
            Outcome::Replicas { .. } => Self {
                status: "False",
                reason: "Idle",
                message: "no pod is leaving".into(),
            },
            Outcome::Draining {
                ordinal,
                remaining,
                since,
            } => Self {
                status: "True",
                reason: "Draining",
                message: format!(
                    "{fleet}-{ordinal} is handing {remaining} tunnel(s) over to the other pods ({}s so far)",
                    since.as_secs()
                ),
            },
            Outcome::TimedOut {
                ordinal,
                remaining,
                why,
            } => Self {
                status: "False",
                reason: "DrainTimedOut",
                message: format!(
                    "{fleet}-{ordinal} {}: {why}; its drain was cancelled and scale-in waits a drainTimeout before trying again",
                    remaining.map_or("did not drain".to_owned(), |r| format!(
                        "still held {r} tunnel(s)"
                    ))
                ),
            },
            Outcome::HeldBack { until } => Self {
                status: "False",
                reason: "DrainTimedOut",
                message: format!(
                    "the last drain timed out: scale-in tried again in {}s",
                    until.as_secs()
                ),
            },
        }
    }
}

/// Why a fleet is not Ready, as the condition's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    pub reason: &'static str,
    pub message: String,
}

/// The first of the Secrets (name, key) found missing, with who needs it.
async fn missing_secrets(
    api: &Api<Secret>,
    wanted: &BTreeSet<(String, String)>,
    needed_by: &str,
) -> Result<Option<NotReady>, Error> {
    for (name, key) in wanted {
        let found = api.get_opt(name).await?;
        if let Some(why) = crate::controller::secret_problem(found.as_ref(), name, key) {
            return Ok(Some(NotReady {
                reason: "SecretMissing",
                message: format!("{why} ({needed_by})"),
            }));
        }
    }
    Ok(None)
}

/// The Secrets the config names, by name, as [`config_secret_problem`] read them (`None`:
/// not found).
type FoundSecrets = std::collections::HashMap<String, Option<Secret>>;

/// The values of the Secret keys the config refers to, from the Secrets read for the check
/// just before (a key that is not there is left out, and the pods' reload names it).
fn secret_values(
    found: &FoundSecrets,
    wanted: &BTreeSet<(String, String)>,
) -> std::collections::BTreeMap<(String, String), k8s_openapi::ByteString> {
    let mut values = std::collections::BTreeMap::new();
    for (name, key) in wanted {
        let Some(Some(s)) = found.get(name) else {
            continue;
        };
        let value = s.data.as_ref().and_then(|d| d.get(key).cloned()).or_else(|| {
            s.string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|v| k8s_openapi::ByteString(v.clone().into_bytes()))
        });
        if let Some(v) = value {
            values.insert((name.clone(), key.clone()), v);
        }
    }
    values
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(obj))
        .await?)
}

async fn patch_status(
    api: &Api<GatewayFleet>,
    fleet: &GatewayFleet,
    verdict: Result<(), NotReady>,
    replicas: (i32, i32),
    tunnels: u64,
    scale_in: Option<&ScaleInCondition>,
) -> Result<(), Error> {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let (status, reason, message) = match verdict {
        // Said where `kubectl describe` shows it: without admin TLS the operator cannot ask
        // the pods (their admin API is on loopback), so the fleet neither scales by load nor
        // drains before scale-in or deletion.
        Ok(()) if fleet.spec.admin_tls_secret_name.is_none() => (
            "True",
            "Applied",
            "gateway objects applied; no adminTlsSecretName: the pods' admin API is on loopback, \
             so the fleet does not scale by load and is not drained (docs/security.md)"
                .to_owned(),
        ),
        Ok(()) => ("True", "Applied", "gateway objects applied".to_owned()),
        Err(n) => ("False", n.reason, n.message),
    };
    let generation = fleet.meta().generation;
    let previous = fleet.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    let mut conditions = vec![ready_condition(
        previous, status, reason, &message, generation, &now,
    )];
    if let Some(c) = scale_in {
        conditions.push(condition(
            previous,
            "ScaleIn",
            c.status,
            (c.reason, &c.message),
            generation,
            &now,
        ));
    }
    let patch = json!({
        "apiVersion": "vpn.concentrator.io/v1alpha1",
        "kind": "GatewayFleet",
        "status": {
            "observedGeneration": generation,
            "replicas": replicas.0.max(0),
            "readyReplicas": replicas.1.max(0),
            "tunnels": tunnels,
            "conditions": conditions,
        },
    });
    api.patch_status(
        &fleet.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Finalizer that keeps a deleted fleet (and its pods) until its tunnels have left.
pub const FINALIZER: &str = "vpn.concentrator.io/drain";

/// Reconciles one fleet: apply while it exists, drain before it goes.
#[tracing::instrument(skip_all, fields(fleet = %fleet.name_any(), namespace = fleet.namespace().unwrap_or_default()))]
pub async fn reconcile(fleet: Arc<GatewayFleet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let measure = ctx.metrics.measure("GatewayFleet");
    let r = async {
        let ns = fleet.namespace().ok_or(Error::NoNamespace)?;
        let api: Api<GatewayFleet> = Api::namespaced(ctx.client.clone(), &ns);
        kube::runtime::finalizer(&api, FINALIZER, fleet, |event| async {
            match event {
                kube::runtime::finalizer::Event::Apply(f) => apply_fleet(f, ctx.clone()).await,
                kube::runtime::finalizer::Event::Cleanup(f) => cleanup(f, ctx.clone()).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    }
    .await;
    measure.done(r.as_ref().err().map(Error::reason));
    r
}

/// How long a deleted fleet waits for its tunnels to leave before the deletion goes on: the
/// whole fleet goes, so its tunnels cannot be handed over; only sites that leave by
/// themselves shorten it. The pods then tell their sites (IKE DELETE) as they stop.
pub const DELETION_DRAIN_BOUND: Duration = Duration::from_secs(30);

/// A deleted fleet: every pod drains (refuses new sites, reports not ready); the finalizer
/// goes once no tunnel is left, no pod has anywhere to hand its tunnels to, or
/// [`DELETION_DRAIN_BOUND`] after the deletion began, whichever comes first. A pod that
/// cannot be reached has nothing left to hand over.
async fn cleanup(fleet: Arc<GatewayFleet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (remaining, stuck) = drain_all(&fleet, &ctx).await?;
    let since = fleet
        .meta()
        .deletion_timestamp
        .as_ref()
        .and_then(|t| {
            std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::from(t.0))
                .ok()
        })
        .unwrap_or_default();
    if remaining > 0 && !stuck && since < DELETION_DRAIN_BOUND {
        ctx.event(
            &*fleet,
            false,
            "Draining",
            format!("deleting: waiting up to {DELETION_DRAIN_BOUND:?} for {remaining} tunnel(s) to leave"),
        )
        .await;
        return Err(Error::StillDraining(remaining));
    }
    let note = if remaining > 0 {
        format!(
            "deleting with {remaining} tunnel(s) left: their pods send each site an IKE DELETE as they stop"
        )
    } else {
        "all pods drained; deleting the fleet".into()
    };
    ctx.event(&*fleet, remaining > 0, "Drained", note).await;
    Ok(Action::await_change())
}

/// Asks every pod of `fleet` to drain; the tunnels left, and whether no pod has anywhere to
/// hand them over to.
async fn drain_all(fleet: &GatewayFleet, ctx: &Context) -> Result<(u64, bool), Error> {
    let ns = fleet.namespace().ok_or(Error::NoNamespace)?;
    let name = fleet.name_any();
    let sts = Api::<StatefulSet>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&name)
        .await?;
    let replicas = sts.and_then(|s| s.spec.and_then(|sp| sp.replicas)).unwrap_or(0);
    // Without admin TLS the pods' admin API is on their loopback: nobody can be asked.
    let replicas = if fleet.spec.admin_tls_secret_name.is_some() {
        replicas
    } else {
        0
    };
    let (mut remaining, mut stuck) = (0, true);
    for ordinal in 0..u32::try_from(replicas).unwrap_or(0) {
        match ctx.admin.drain(&ns, &name, ordinal).await {
            Ok(admin::DrainState::Drained | admin::DrainState::Active) => {}
            Ok(admin::DrainState::Draining {
                remaining: r,
                nowhere_to_go,
            }) => {
                remaining += r.max(1);
                stuck &= nowhere_to_go;
            }
            Err(e) => tracing::warn!(error = %e, "pod unreachable while deleting the fleet"),
        }
    }
    Ok((remaining, stuck && remaining > 0))
}

/// Lifts the finalizer of every fleet being deleted, after asking its pods to drain: called
/// as the operator stops. `helm uninstall` deletes the chart's GatewayFleet and then the
/// operator's Deployment; a finalizer left behind would hold the fleet (and its namespace)
/// forever.
pub async fn finish_deletions(ctx: &Context, scopes: &[Option<String>]) {
    let work = async {
        let mut list = Vec::new();
        for scope in scopes {
            let fleets: Api<GatewayFleet> = crate::triggers::api(&ctx.client, scope);
            match fleets.list(&ListParams::default()).await {
                Ok(l) => list.extend(l.items),
                Err(e) => {
                    tracing::warn!(error = %e, "stopping: cannot list fleets being deleted");
                }
            }
        }
        for f in list
            .into_iter()
            .filter(|f| f.meta().deletion_timestamp.is_some())
            .filter(|f| f.finalizers().iter().any(|x| x == FINALIZER))
        {
            let (name, ns) = (f.name_any(), f.namespace().unwrap_or_default());
            let remaining = drain_all(&f, ctx).await.map(|(r, _)| r).unwrap_or(0);
            let api: Api<GatewayFleet> = Api::namespaced(ctx.client.clone(), &ns);
            let keep: Vec<String> = f
                .finalizers()
                .iter()
                .filter(|x| *x != FINALIZER)
                .cloned()
                .collect();
            let patch = json!({"metadata": {"finalizers": keep, "resourceVersion": f.resource_version()}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(fleet = %name, namespace = %ns, remaining, "stopping: fleet deletion finished")
                }
                Err(e) => {
                    tracing::warn!(fleet = %name, error = %e, "stopping: cannot lift the drain finalizer")
                }
            }
        }
    };
    // Within the operator pod's termination grace period.
    if tokio::time::timeout(Duration::from_secs(20), work).await.is_err() {
        tracing::warn!("stopping: finishing fleet deletions took too long");
    }
}

/// The fleet's Ready condition says what is wrong (once, as an Event, when it first shows),
/// and an Event goes on the object at fault when the fleet can name it.
async fn report_problem(
    ctx: &Context,
    fleet: &GatewayFleet,
    n: &NotReady,
    at_fault: Option<(&str, &str)>,
    objects: (&[Eroute], &[Egroup]),
) {
    let previous = fleet.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    tracing::warn!(reason = n.reason, message = %n.message, "fleet not ready");
    if crate::status::ready_unchanged(previous, "False", n.reason, &n.message) {
        return;
    }
    ctx.event(fleet, true, n.reason, n.message.clone()).await;
    match at_fault {
        Some(("Eroute", name)) => {
            if let Some(e) = objects.0.iter().find(|e| e.name_any() == name) {
                ctx.event(e, true, n.reason, n.message.clone()).await;
            }
        }
        Some(("Egroup", name)) => {
            if let Some(g) = objects.1.iter().find(|g| g.name_any() == name) {
                ctx.event(g, true, n.reason, n.message.clone()).await;
            }
        }
        _ => {}
    }
}

/// The first Secret an Eroute or Egroup names that is missing (or lacks its key), saying who
/// names it; and the Secrets read, whose values the config then carries.
async fn config_secret_problem(
    api: &Api<Secret>,
    eroutes: &[Eroute],
    egroups: &[Egroup],
) -> Result<(Option<NotReady>, FoundSecrets), Error> {
    let refs = eroutes
        .iter()
        .filter_map(|e| {
            let r = e.spec.psk_secret_ref.as_ref()?;
            Some((format!("Eroute '{}' spec.pskSecretRef", e.name_any()), r))
        })
        .chain(egroups.iter().filter_map(|g| {
            let r = g.spec.database.url_secret_ref.as_ref()?;
            Some((format!("Egroup '{}' spec.database.urlSecretRef", g.name_any()), r))
        }));
    let mut found = FoundSecrets::new();
    for (who, r) in refs {
        if !found.contains_key(&r.name) {
            found.insert(r.name.clone(), api.get_opt(&r.name).await?);
        }
        let secret = found.get(&r.name).and_then(Option::as_ref);
        if let Some(why) = crate::controller::secret_problem(secret, &r.name, &r.key) {
            let problem = NotReady {
                reason: "SecretMissing",
                message: format!("{who}: {why}"),
            };
            return Ok((Some(problem), found));
        }
    }
    Ok((None, found))
}

/// `desired`, with the `loadBalancerClass` of the Service as it exists: Kubernetes refuses
/// to change the class of a Service once it has one, and that refusal must not stop the rest
/// of the fleet's reconcile. A change is said (warning and Event) and waits until the Service
/// is deleted, which gives it the new class.
async fn keep_load_balancer_class(
    ctx: &Context,
    fleet: &GatewayFleet,
    services: &Api<Service>,
    desired: &Service,
) -> Result<Service, Error> {
    let name = desired.metadata.name.clone().unwrap_or_default();
    let wanted = desired.spec.as_ref().and_then(|s| s.load_balancer_class.clone());
    let existing = services
        .get_opt(&name)
        .await?
        .and_then(|s| s.spec.and_then(|sp| sp.load_balancer_class));
    let Some(kept) = existing.filter(|e| Some(e) != wanted.as_ref()) else {
        return Ok(desired.clone());
    };
    let note = format!(
        "Service '{name}' keeps loadBalancerClass '{kept}' (Kubernetes does not change it): \
         delete the Service for it to be re-created with {}",
        wanted.map_or("none".to_owned(), |w| format!("'{w}'"))
    );
    tracing::warn!(service = %name, "{note}");
    ctx.event(fleet, true, "LoadBalancerClassKept", note).await;
    let mut s = desired.clone();
    if let Some(spec) = s.spec.as_mut() {
        spec.load_balancer_class = Some(kept);
    }
    Ok(s)
}

/// The StatefulSet's pod counts as it is now (none: zero).
fn pod_counts(sts: Option<&StatefulSet>) -> (i32, i32) {
    let st = sts.and_then(|s| s.status.as_ref());
    (
        st.map_or(0, |s| s.replicas),
        st.and_then(|s| s.ready_replicas).unwrap_or(0),
    )
}

async fn apply_fleet(fleet: Arc<GatewayFleet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = fleet.namespace().ok_or(Error::NoNamespace)?;
    let client = ctx.client.clone();
    let fleets: Api<GatewayFleet> = Api::namespaced(client.clone(), &ns);
    let sts_api = Api::<StatefulSet>::namespaced(client.clone(), &ns);

    let window = match fleet.spec.validate() {
        Ok(w) => w,
        Err(e) => {
            // Nothing can be built from an invalid fleet: what runs stays as it is, and the
            // status still says what runs.
            let n = NotReady {
                reason: "Invalid",
                message: e.to_string(),
            };
            report_problem(&ctx, &fleet, &n, None, (&[], &[])).await;
            let counts = pod_counts(sts_api.get_opt(&fleet.name_any()).await?.as_ref());
            let tunnels = fleet.status.as_ref().map_or(0, |s| s.tunnels);
            patch_status(&fleets, &fleet, Err(n), counts, tunnels, None).await?;
            return Ok(Action::await_change());
        }
    };

    let eroutes = Api::<Eroute>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let egroups = Api::<Egroup>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    // A bad Eroute or Egroup, or a Secret one of them names, holds back the configuration
    // only: the pods keep the last one that was valid as a whole (the ConfigMap applied
    // before), while the fleet goes on scaling, applying and reporting.
    let named_e: Vec<_> = eroutes.iter().map(|e| (e.name_any(), e.spec.clone())).collect();
    let named_g: Vec<_> = egroups.iter().map(|g| (g.name_any(), g.spec.clone())).collect();
    let (config_problem, at_fault, found) = match concentrator_crds::set::validate(&named_e, &named_g) {
        Err(e) => (
            Some(NotReady {
                reason: "InvalidConfig",
                message: e.to_string(),
            }),
            Some((e.kind, e.name)),
            FoundSecrets::new(),
        ),
        Ok(_) => {
            let (problem, found) = config_secret_problem(&secrets, &eroutes, &egroups).await?;
            (problem, None, found)
        }
    };
    let config_refs = build::referenced_secrets(&eroutes, &egroups);
    let mut wanted = BTreeSet::new();
    let fk = &fleet.spec.fleet_key_secret_ref;
    wanted.insert((fk.name.clone(), fk.key.clone()));
    if let Some(r) = &fleet.spec.site_database_url_secret_ref {
        wanted.insert((r.name.clone(), r.key.clone()));
    }
    if let Some(tls) = &fleet.spec.admin_tls_secret_name {
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            wanted.insert((tls.clone(), key.to_owned()));
        }
    }
    // The fleet's own Secrets: pods that run keep running; new ones wait for it.
    let fleet_problem = missing_secrets(&secrets, &wanted, "named by the GatewayFleet").await?;

    let (replicas, tunnels, scale_in, reports) = scale_step(&ctx, &sts_api, &fleet, &ns, window).await?;
    let draining = scale_in.as_ref().is_some_and(|c| c.status == "True");
    let config_ok = config_problem.is_none();
    let (use_e, use_g): (&[Eroute], &[Egroup]) = if config_ok {
        (&eroutes, &egroups)
    } else {
        (&[], &[])
    };
    let d = build::desired(&fleet, use_e, use_g, replicas).map_err(|e| Error::Build(e.to_string()))?;
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let config_name = d.config.metadata.name.clone().unwrap_or_default();
    // Held back, the config applied before stays; a fleet that lacks either object (never
    // had one, or it was deleted, or an earlier reconcile stopped between the two) gets an
    // empty one, so that its pods can start: the projected volume needs both.
    if config_ok || config_maps.get_opt(&config_name).await?.is_none() {
        apply(&config_maps, &d.config).await?;
    }
    let carried_name = build::config_secrets_name(&fleet.name_any());
    if config_ok || secrets.get_metadata_opt(&carried_name).await?.is_none() {
        let values = if config_ok {
            secret_values(&found, &config_refs)
        } else {
            Default::default()
        };
        let carried = build::config_secrets(&fleet, &values).map_err(|e| Error::Build(e.to_string()))?;
        apply(&secrets, &carried).await?;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    apply(&services, &d.headless).await?;
    let mut fronts = Vec::with_capacity(d.fronts.len());
    for s in &d.fronts {
        let s = keep_load_balancer_class(&ctx, &fleet, &services, s).await?;
        fronts.push(apply(&services, &s).await?);
    }
    if let Some(cm) = vip::config_map(&fleet, &fronts).map_err(|e| Error::Build(e.to_string()))? {
        apply(&Api::<ConfigMap>::namespaced(client.clone(), &ns), &cm).await?;
    }
    let sts = apply(
        &Api::<StatefulSet>::namespaced(client.clone(), &ns),
        &d.statefulset,
    )
    .await?;
    apply(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
        &d.pdb,
    )
    .await?;
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), &ns);
    match netpol::network_policy(&fleet, &ctx.operator_namespace).map_err(|e| Error::Build(e.to_string()))? {
        Some(p) => {
            apply(&policies, &p).await?;
        }
        // Turned off: the one applied before goes (only ours, by its owner reference).
        None => {
            if let Some(p) = policies.get_opt(&fleet.name_any()).await?
                && p.owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == fleet.uid().as_ref())
            {
                policies
                    .delete(&fleet.name_any(), &DeleteParams::default())
                    .await?;
            }
        }
    }

    // Per-pod front Services of pods that no longer exist (VIP mode scaled in, or mode
    // switched to SLB) are removed.
    let keep: BTreeSet<String> = d
        .fronts
        .iter()
        .chain(std::iter::once(&d.headless))
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    let selector = format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/managed-by={MANAGER}",
        fleet.name_any()
    );
    for s in services
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let n = s.name_any();
        if !keep.contains(&n) {
            tracing::info!(service = %n, "deleting orphaned Service");
            services.delete(&n, &DeleteParams::default()).await?;
        }
    }

    let counts = pod_counts(Some(&sts));
    let verdict = match (config_problem, fleet_problem) {
        (Some(mut n), _) => {
            let at_fault = at_fault.as_ref().map(|(k, n)| (*k, n.as_str()));
            n.message.push_str("; the pods keep the last valid configuration");
            report_problem(&ctx, &fleet, &n, at_fault, (&eroutes, &egroups)).await;
            Err(n)
        }
        (None, Some(n)) => {
            report_problem(&ctx, &fleet, &n, None, (&[], &[])).await;
            Err(n)
        }
        (None, None) => Ok(()),
    };
    patch_status(&fleets, &fleet, verdict, counts, tunnels, scale_in.as_ref()).await?;
    if !reports.is_empty() {
        publish_counts(&ctx, &ns, &eroutes, &egroups, &reports).await?;
    }
    // Reports change with load: look again soon, sooner while a pod drains.
    Ok(Action::requeue(Duration::from_secs(if draining {
        10
    } else {
        30
    })))
}

/// Decides this round's replica count from the pods' reports (scale-in through
/// [`scale_in::ScaleIn`]); returns it, the fleet's tunnel total, the ScaleIn condition (none
/// when the pods cannot be asked) and the reports.
async fn scale_step(
    ctx: &Context,
    sts_api: &Api<StatefulSet>,
    fleet: &GatewayFleet,
    ns: &str,
    window: Duration,
) -> Result<(u32, u64, Option<ScaleInCondition>, Vec<scale::PodReport>), Error> {
    let name = fleet.name_any();
    let spec = &fleet.spec.scaling;
    let current = sts_api
        .get_opt(&name)
        .await?
        .and_then(|s| s.spec.and_then(|sp| sp.replicas))
        .map(|r| u32::try_from(r).unwrap_or(0));
    let Some(current) = current else {
        return Ok((spec.min_replicas, 0, None, Vec::new()));
    };
    let mut reports = Vec::new();
    let mut draining_pods = Vec::new();
    // Without admin TLS the pods' admin API is on their loopback: no reports (and so no
    // scale-in), rather than a connection timeout per pod and round.
    let reachable = fleet.spec.admin_tls_secret_name.is_some();
    let mut all_reported = reachable;
    for ordinal in (0..current).filter(|_| reachable) {
        match ctx.admin.report(ns, &name, ordinal).await {
            Ok(r) => {
                if r.draining {
                    draining_pods.push(ordinal);
                }
                reports.push(r);
            }
            Err(e) => {
                tracing::debug!(error = %e, "no load report");
                all_reported = false;
            }
        }
    }
    let tunnels = reports.iter().map(|r| r.tunnels).sum();
    let recommended = scale::recommend(spec, &reports);
    let key = format!("{ns}/{name}");
    let target = {
        let mut h = ctx.scale_history.lock().unwrap_or_else(|e| e.into_inner());
        h.entry(key.clone())
            .or_default()
            .stabilize(std::time::Instant::now(), window, recommended)
    };
    let step = scale::step(current, target, all_reported);
    // Out of the map while the pods are asked (no lock across an await).
    let mut state = ctx
        .scale_in
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key)
        .unwrap_or_default();
    let outcome = state
        .round(
            ctx.admin.as_ref(),
            (ns, &name),
            current,
            step,
            spec.drain_timeout(),
            std::time::Instant::now(),
        )
        .await;
    ctx.scale_in
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, state);
    let n = match &outcome {
        scale_in::Outcome::Replicas { n, scaled_in } => {
            if *n != current {
                let note = if *scaled_in {
                    format!(
                        "{current} -> {n} pods for {tunnels} tunnels ({name}-{n} drained: its tunnels were handed over)"
                    )
                } else {
                    format!("{current} -> {n} pods for {tunnels} tunnels")
                };
                tracing::info!(from = current, to = n, tunnels, "scaling");
                ctx.event(fleet, false, "Scaled", note).await;
            }
            *n
        }
        scale_in::Outcome::Draining {
            ordinal, remaining, ..
        } => {
            tracing::info!(
                pod = ordinal,
                remaining,
                "waiting for the pod to drain before scaling in"
            );
            current
        }
        scale_in::Outcome::TimedOut { ordinal, .. } => {
            let c = ScaleInCondition::from_outcome(&name, &outcome);
            tracing::warn!(pod = ordinal, message = %c.message, "scale-in: drain timed out");
            ctx.event(fleet, true, "DrainTimedOut", c.message).await;
            current
        }
        scale_in::Outcome::HeldBack { .. } => current,
    };
    // A pod left draining by a scale-in that is no longer under way (the operator restarted,
    // or its replica count was not lowered after all) takes sites again.
    let leaving = ctx
        .scale_in
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&format!("{ns}/{name}"))
        .and_then(scale_in::ScaleIn::draining_ordinal);
    for ordinal in draining_pods {
        if ordinal < n && Some(ordinal) != leaving {
            tracing::info!(
                pod = ordinal,
                "a pod that is not leaving was draining: un-drained"
            );
            if let Err(e) = ctx.admin.cancel_drain(ns, &name, ordinal).await {
                tracing::warn!(pod = ordinal, error = %e, "could not un-drain a pod");
            }
        }
    }
    let condition = reachable.then(|| ScaleInCondition::from_outcome(&name, &outcome));
    Ok((n, tunnels, condition, reports))
}

/// Field manager of the live counts, apart from the validity conditions, so that neither
/// server-side apply removes the other's fields.
pub const COUNTS_MANAGER: &str = "concentrator-operator-counts";

/// Writes the fleet-wide dynamic-eroute counts into each Eroute's and Egroup's status.
async fn publish_counts(
    ctx: &Context,
    ns: &str,
    eroutes: &[Eroute],
    egroups: &[Egroup],
    reports: &[scale::PodReport],
) -> Result<(), Error> {
    let count = |eroute: &str| -> u64 { reports.iter().filter_map(|r| r.dynamic_eroutes.get(eroute)).sum() };
    let params = PatchParams::apply(COUNTS_MANAGER).force();
    let eroute_api: Api<Eroute> = Api::namespaced(ctx.client.clone(), ns);
    for e in eroutes {
        let patch = json!({"apiVersion": "vpn.concentrator.io/v1alpha1", "kind": "Eroute",
                           "status": {"dynamicEroutes": count(&e.name_any())}});
        eroute_api
            .patch_status(&e.name_any(), &params, &Patch::Apply(&patch))
            .await?;
    }
    let egroup_api: Api<Egroup> = Api::namespaced(ctx.client.clone(), ns);
    for g in egroups {
        let patch = json!({"apiVersion": "vpn.concentrator.io/v1alpha1", "kind": "Egroup",
                           "status": {"dynamicEroutes": count(&g.spec.eroute)}});
        egroup_api
            .patch_status(&g.name_any(), &params, &Patch::Apply(&patch))
            .await?;
    }
    Ok(())
}
