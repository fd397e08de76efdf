//! What makes a reconcile happen: the watch of each controller's own kind (with a predicate
//! that drops the operator's own status writes), and the mapping from a changed Eroute, Egroup
//! or Secret to the objects that use it. Polling is only the safety net (requeues), never the
//! way a change is noticed.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use concentrator_crds::{Egroup, Eroute, GatewayFleet, SecretKeyRef};
use futures::{Stream, StreamExt, future};
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{Predicate, WatchStreamExt, watcher as watch};
use kube::{Api, Client, Resource, ResourceExt};

/// Where the operator looks: the whole cluster, or the namespaces named in
/// `WATCH_NAMESPACES` (comma-separated; the chart's `watchNamespaces`, installed with Roles
/// only). One set of controllers runs per entry.
pub fn scopes(watch_namespaces: Option<&str>) -> Vec<Option<String>> {
    let named: Vec<Option<String>> = watch_namespaces
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| Some(n.to_owned()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if named.is_empty() { vec![None] } else { named }
}

/// The API of `K` within one scope.
pub fn api<K>(client: &Client, scope: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A controller's own kind in one scope: the store of every object (for
/// `Controller::for_stream`), and the objects that pass `predicate` (their spec changed, by
/// `metadata.generation` or what `predicate` hashes: the operator's own status writes do not
/// come back as reconciles).
pub fn own_kind<K, P>(
    client: &Client,
    scope: &Option<String>,
    predicate: P,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    P: Predicate<K> + Send + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let stream = watch(api::<K>(client, scope), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicate, Default::default());
    (store, stream)
}

/// Secrets as triggers: metadata only (an `Api<PartialObjectMeta<_>>` lists and watches with
/// `Accept: ...;as=PartialObjectMetadata` in kube 5, so the API server never sends Secret
/// data here), and not the ones the operator writes itself (each fleet's
/// `<fleet>-config-secrets`), whose every write would otherwise come back as a reconcile.
pub fn secret_changes(
    client: &Client,
    scope: &Option<String>,
) -> impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static {
    let cfg = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by!={}",
        crate::controller::MANAGER
    ));
    watch(api::<PartialObjectMeta<Secret>>(client, scope), cfg)
        .default_backoff()
        .touched_objects()
}

/// Spec changes and deletions of `K`: an object whose `metadata.generation` did not move (a
/// status write, the operator's own counts among them) is dropped; a deletion always passes
/// (it does not move the generation). A re-list after a broken watch passes only what changed
/// meanwhile.
pub fn spec_changes<K>(
    events: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    events
        .scan(HashMap::<String, Option<i64>>::new(), |seen, ev| {
            let out = match ev {
                Err(e) => Some(Err(e)),
                Ok(Event::Apply(o) | Event::InitApply(o)) => {
                    let generation = o.meta().generation;
                    match seen.insert(key(&o), generation) {
                        Some(before) if before == generation => None,
                        _ => Some(Ok(o)),
                    }
                }
                Ok(Event::Delete(o)) => {
                    seen.remove(&key(&o));
                    Some(Ok(o))
                }
                Ok(Event::Init | Event::InitDone) => None,
            };
            future::ready(Some(out))
        })
        .filter_map(future::ready)
}

fn key<K: Resource>(o: &K) -> String {
    let m = o.meta();
    m.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            m.namespace.as_deref().unwrap_or_default(),
            m.name.as_deref().unwrap_or_default()
        )
    })
}

/// The predicate of the fleet's own watch: what the user asked for (generation, which also
/// moves when a deletion begins) and the finalizers (the drain finalizer's addition must
/// come back as a reconcile, and moves no generation).
pub fn fleet_predicate(f: &GatewayFleet) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    f.meta().generation.hash(&mut h);
    f.finalizers().hash(&mut h);
    Some(h.finish())
}

fn in_namespace<K: Resource>(o: &K, ns: Option<&str>) -> bool {
    o.meta().namespace.as_deref() == ns
}

/// Every fleet of `ns`: a fleet renders all the Eroutes and Egroups of its namespace.
pub fn fleets_of_namespace(fleets: &Store<GatewayFleet>, ns: Option<&str>) -> Vec<ObjectRef<GatewayFleet>> {
    fleets
        .state()
        .iter()
        .filter(|f| in_namespace(f.as_ref(), ns))
        .map(|f| ObjectRef::from(f.as_ref()))
        .collect()
}

fn names(r: Option<&SecretKeyRef>, secret: &str) -> bool {
    r.is_some_and(|r| r.name == secret)
}

/// The fleets that use Secret `name` of `ns`: their own (fleet key, admin TLS, site
/// database) or one named by an Eroute or Egroup of the namespace.
pub fn fleets_using_secret(
    fleets: &Store<GatewayFleet>,
    eroutes: &Store<Eroute>,
    egroups: &Store<Egroup>,
    ns: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<GatewayFleet>> {
    let by_config = eroutes
        .state()
        .iter()
        .any(|e| in_namespace(e.as_ref(), ns) && names(e.spec.psk_secret_ref.as_ref(), name))
        || egroups
            .state()
            .iter()
            .any(|g| in_namespace(g.as_ref(), ns) && names(g.spec.database.url_secret_ref.as_ref(), name));
    fleets
        .state()
        .iter()
        .filter(|f| in_namespace(f.as_ref(), ns))
        .filter(|f| {
            by_config
                || f.spec.fleet_key_secret_ref.name == name
                || names(f.spec.site_database_url_secret_ref.as_ref(), name)
                || f.spec.admin_tls_secret_name.as_deref() == Some(name)
                || f.spec.etcd.tls_secret_name.as_deref() == Some(name)
        })
        .map(|f| ObjectRef::from(f.as_ref()))
        .collect()
}

/// The Eroutes whose pre-shared key is in Secret `name` of `ns`.
pub fn eroutes_using_secret(eroutes: &Store<Eroute>, ns: Option<&str>, name: &str) -> Vec<ObjectRef<Eroute>> {
    eroutes
        .state()
        .iter()
        .filter(|e| in_namespace(e.as_ref(), ns) && names(e.spec.psk_secret_ref.as_ref(), name))
        .map(|e| ObjectRef::from(e.as_ref()))
        .collect()
}

/// The Egroups whose database URL is in Secret `name` of `ns`.
pub fn egroups_using_secret(egroups: &Store<Egroup>, ns: Option<&str>, name: &str) -> Vec<ObjectRef<Egroup>> {
    egroups
        .state()
        .iter()
        .filter(|g| in_namespace(g.as_ref(), ns) && names(g.spec.database.url_secret_ref.as_ref(), name))
        .map(|g| ObjectRef::from(g.as_ref()))
        .collect()
}

/// The Egroups built on Eroute `name` of `ns`.
pub fn egroups_of_eroute(egroups: &Store<Egroup>, ns: Option<&str>, name: &str) -> Vec<ObjectRef<Egroup>> {
    egroups
        .state()
        .iter()
        .filter(|g| in_namespace(g.as_ref(), ns) && g.spec.eroute == name)
        .map(|g| ObjectRef::from(g.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;

    fn eroute(name: &str, generation: i64) -> Eroute {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "vpn.concentrator.io/v1alpha1", "kind": "Eroute",
            "metadata": {"name": name, "namespace": "vpn", "uid": name, "generation": generation},
            "spec": {"localSubnet": "10.0.0.0/16", "remoteSubnet": "172.16.0.0/24"},
        }))
        .unwrap()
    }

    async fn passed(events: Vec<Event<Eroute>>) -> Vec<(String, i64)> {
        spec_changes(stream::iter(events.into_iter().map(Ok)))
            .map(|r| {
                let e = r.unwrap();
                (e.name_any(), e.meta().generation.unwrap())
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn status_writes_are_dropped_spec_changes_and_deletions_pass() {
        let got = passed(vec![
            Event::Init,
            Event::InitApply(eroute("a", 1)),
            Event::InitDone,
            Event::Apply(eroute("a", 1)), // a status write
            Event::Apply(eroute("a", 2)), // the spec changed
            Event::Apply(eroute("b", 1)),
            Event::Delete(eroute("b", 1)),
        ])
        .await;
        assert_eq!(
            got,
            [("a".into(), 1), ("a".into(), 2), ("b".into(), 1), ("b".into(), 1)]
        );
    }

    #[tokio::test]
    async fn a_relist_passes_only_what_changed_meanwhile() {
        let got = passed(vec![
            Event::Apply(eroute("a", 1)),
            Event::Apply(eroute("b", 1)),
            Event::Init,
            Event::InitApply(eroute("a", 1)),
            Event::InitApply(eroute("b", 3)),
            Event::InitDone,
        ])
        .await;
        assert_eq!(got, [("a".into(), 1), ("b".into(), 1), ("b".into(), 3)]);
    }

    #[test]
    fn scopes_from_the_environment() {
        assert_eq!(scopes(None), [None]);
        assert_eq!(scopes(Some(" ")), [None]);
        assert_eq!(
            scopes(Some("vpn-b, vpn-a,vpn-b")),
            [Some("vpn-a".to_owned()), Some("vpn-b".to_owned())]
        );
    }

    #[test]
    fn the_fleet_predicate_ignores_status_but_not_finalizers() {
        let mut f: GatewayFleet = serde_yaml::from_str(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: GatewayFleet\nmetadata: {name: edge, namespace: vpn, generation: 1}\n\
             spec: {etcd: {endpoints: []}, fleetKeySecretRef: {name: f, key: k}}",
        )
        .unwrap();
        let before = fleet_predicate(&f);
        f.status = Some(Default::default());
        assert_eq!(fleet_predicate(&f), before);
        f.metadata.finalizers = Some(vec!["vpn.concentrator.io/drain".into()]);
        assert_ne!(fleet_predicate(&f), before);
    }
}
