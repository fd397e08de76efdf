//! The egroup engine of the responder path (DESIGN.md, "The two lookup paths"): a peer whose
//! identity matches an egroup's base eroute is looked up in that egroup's site table, and a
//! dynamic eroute (base eroute + row) is built for it, bounded per egroup by
//! `maxDynamicEroutes` (least recently used out first, see `eroute::lru`).
//!
//! Lookups run as tasks off the IKE task ([`Egroups::lookup_by_peer`] returns a future), so a
//! slow database delays only the sites waiting for it; concurrent lookups of one site share a
//! query and a missing or malformed site is remembered briefly (`sitedb::cache`); lookups of
//! different sites that wait while a statement is in flight go out together in the next one
//! (`sitedb::batch`).

use std::collections::BTreeMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_crds::egroup::{DatabaseLocation, ValidatedEgroup};
use ipnet::IpNet;

use crate::config::Config;
use crate::eroute::lru::{DynamicEroute, DynamicTable};
use crate::sitedb::cache::{Key, LookupCache};
use crate::sitedb::{LookupError, Site, SiteDbError, SiteLookups, SiteStore};

/// The site store of egroup `name`: the gateway's own (`default_store`; `None` where there is
/// none), or the one its `database.url` / `urlSecretRef` names.
pub async fn store_of(
    config: &Config,
    name: &str,
    spec: &ValidatedEgroup,
    default_store: Option<&SiteStore>,
) -> Result<Option<SiteStore>, SiteDbError> {
    match &spec.database {
        DatabaseLocation::Embedded => Ok(default_store.cloned()),
        DatabaseLocation::Url(url) => SiteStore::open_url(url.expose(), spec.timeout).await.map(Some),
        DatabaseLocation::Secret(_) => {
            let url = config
                .egroup_db_urls
                .get(name)
                .map(|s| String::from_utf8_lossy(s.expose()).into_owned())
                .unwrap_or_default();
            SiteStore::open_url(url.trim(), spec.timeout).await.map(Some)
        }
    }
}

/// How long a missing or malformed site is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// At most this many remembered failures.
const MAX_NEGATIVE: usize = 100_000;

struct Egroup {
    spec: ValidatedEgroup,
    lookups: SiteLookups,
    table: DynamicTable,
}

/// Every egroup of the configuration, with its site store and dynamic eroutes.
pub struct Egroups {
    groups: BTreeMap<String, Egroup>,
    cache: Arc<LookupCache>,
}

impl Egroups {
    /// Opens each egroup's site store: the gateway's own (`default_store`), or the one its
    /// `database.url` / `urlSecretRef` names. MySQL pools connect lazily, so a database that
    /// is down now does not stop the gateway; its sites fail until it is back.
    pub async fn open(config: &Config, default_store: &SiteStore) -> Result<Self, SiteDbError> {
        let mut groups = BTreeMap::new();
        for (name, spec) in &config.set.egroups {
            let Some(store) = store_of(config, name, spec, Some(default_store)).await? else {
                continue;
            };
            let capacity = NonZeroUsize::new(spec.max_dynamic_eroutes as usize).unwrap_or(NonZeroUsize::MIN);
            groups.insert(
                name.clone(),
                Egroup {
                    spec: spec.clone(),
                    lookups: SiteLookups::new(name, store, spec.site_table.clone(), spec.timeout),
                    table: DynamicTable::new(capacity),
                },
            );
        }
        Ok(Self {
            groups,
            cache: Arc::new(LookupCache::new(NEGATIVE_TTL, MAX_NEGATIVE)),
        })
    }

    /// A reload: removed egroups go (with their dynamic eroutes: the caller closes their
    /// SAs), added ones start with an empty table, changed ones look sites up with their
    /// new settings in `stores` (opened beforehand, [`store_of`]) and keep their dynamic
    /// eroutes, whose SAs run on (returned: those a smaller `maxDynamicEroutes` evicts, whose
    /// SAs the caller deletes). Remembered lookup failures are forgotten: a fixed row or
    /// database may be why the configuration changed.
    pub fn reconfigure(
        &mut self,
        config: &Config,
        diff: &crate::config::ConfigDiff,
        mut stores: BTreeMap<String, Option<SiteStore>>,
    ) -> Vec<DynamicEroute> {
        let mut evicted = Vec::new();
        if diff.egroups.is_empty() {
            return evicted;
        }
        for name in &diff.egroups.removed {
            self.groups.remove(name);
        }
        for name in diff.egroups.new_or_changed() {
            let Some(spec) = config.set.egroups.get(name) else {
                continue;
            };
            // No store to look sites up in (the gateway has none of its own): as at start,
            // the egroup has no sites here.
            let Some(Some(store)) = stores.remove(name) else {
                continue;
            };
            let old = self.groups.remove(name);
            let capacity = NonZeroUsize::new(spec.max_dynamic_eroutes as usize).unwrap_or(NonZeroUsize::MIN);
            let table = match old {
                Some(old) if old.table.capacity() == capacity.get() => old.table,
                Some(old) => {
                    // Another bound: the sites are kept, oldest first in, so that a smaller
                    // one evicts the least recently used (the 10% rule, as on arrival).
                    let mut table = DynamicTable::new(capacity);
                    let mut kept: Vec<DynamicEroute> = old.table.iter().cloned().collect();
                    kept.sort_by_key(|d| d.last_used);
                    for d in kept {
                        evicted.extend(table.insert(d));
                    }
                    table
                }
                None => DynamicTable::new(capacity),
            };
            self.groups.insert(
                name.clone(),
                Egroup {
                    spec: spec.clone(),
                    lookups: SiteLookups::new(name, store, spec.site_table.clone(), spec.timeout),
                    table,
                },
            );
        }
        self.cache = Arc::new(LookupCache::new(NEGATIVE_TTL, MAX_NEGATIVE));
        evicted
    }

    /// Reads each egroup's site table columns and checks them against the Egroup, all at
    /// once: a table that does not fit is logged (once) and its lookups fail with the
    /// `schema` reason; a database that cannot be reached now is asked again by the first
    /// lookup.
    pub fn check_tables(
        &self,
    ) -> impl Future<Output = Vec<(String, Result<(), LookupError>)>> + Send + 'static {
        self.check_tables_of(&|_| true)
    }

    /// [`Self::check_tables`] for the egroups `which` names (those a reload started anew).
    pub fn check_tables_of(
        &self,
        which: &dyn Fn(&str) -> bool,
    ) -> impl Future<Output = Vec<(String, Result<(), LookupError>)>> + Send + 'static + use<> {
        let mut checks = tokio::task::JoinSet::new();
        for (name, g) in self.groups.iter().filter(|(n, _)| which(n)) {
            let (name, lookups) = (name.clone(), g.lookups.clone());
            checks.spawn(async move { (name, lookups.check_schema().await) });
        }
        async move {
            let mut results = checks.join_all().await;
            results.sort_by(|a, b| a.0.cmp(&b.0));
            results
        }
    }

    /// Runs [`Self::check_tables`] (or `_of`) on a task of its own: a table that does not fit
    /// was logged by the check; one not reached yet is said here.
    pub fn spawn_checks(
        checks: impl Future<Output = Vec<(String, Result<(), LookupError>)>> + Send + 'static,
    ) {
        tokio::spawn(async move {
            for (egroup, result) in checks.await {
                match result {
                    Ok(()) | Err(LookupError::Schema { .. }) => {}
                    Err(e) => tracing::warn!(%egroup, error = %e, "site table not checked yet"),
                }
            }
        });
    }

    /// Whether `egroup` holds a dynamic eroute for `peer_id`.
    pub fn has_dynamic(&self, egroup: &str, peer_id: &str) -> bool {
        self.groups
            .get(egroup)
            .is_some_and(|g| g.table.contains_peer(peer_id))
    }

    /// The site row of `peer_id` in `egroup`'s table, as a future that owns what it needs.
    pub fn lookup_by_peer(
        &self,
        egroup: &str,
        peer_id: &str,
        now: Instant,
    ) -> impl Future<Output = Result<Site, LookupError>> + Send + 'static + use<> {
        let group = self
            .groups
            .get(egroup)
            .map(|g| (g.lookups.clone(), g.spec.remote_subnet_prefix));
        let cache = self.cache.clone();
        let (egroup, peer_id) = (egroup.to_owned(), peer_id.to_owned());
        async move {
            let Some((lookups, prefix)) = group else {
                return Err(LookupError::NotFound);
            };
            let key = Key::PeerId {
                egroup,
                peer_id: peer_id.clone(),
            };
            cache
                .get(
                    key,
                    now,
                    || async move { lookups.by_peer_id(&peer_id, prefix).await },
                )
                .await
        }
    }

    /// The site whose subnet is `subnet` (destination & the egroup's mask) in `egroup`'s
    /// table: the initiator path, for traffic toward a site that has no tunnel.
    pub fn lookup_by_subnet(
        &self,
        egroup: &str,
        subnet: IpNet,
        now: Instant,
    ) -> impl Future<Output = Result<Site, LookupError>> + Send + 'static + use<> {
        let lookups = self.groups.get(egroup).map(|g| g.lookups.clone());
        let cache = self.cache.clone();
        let egroup = egroup.to_owned();
        async move {
            let Some(lookups) = lookups else {
                return Err(LookupError::NotFound);
            };
            cache
                .get(Key::Subnet { egroup, subnet }, now, || async move {
                    lookups.by_subnet(subnet).await
                })
                .await
        }
    }

    /// The egroups whose base eroute may initiate, with its remote subnet and the egroup's
    /// site prefix.
    pub fn initiating(&self, config: &Config) -> Vec<(String, IpNet, u8)> {
        self.groups
            .iter()
            .filter_map(|(name, g)| {
                let base = config.set.eroutes.get(&g.spec.eroute)?;
                (base.role != concentrator_crds::eroute::Role::Responder)
                    .then(|| (name.clone(), base.remote_subnet, g.spec.remote_subnet_prefix))
            })
            .collect()
    }

    /// Records the dynamic eroute of an authenticated site; returns the ones evicted to keep
    /// more than 10% of the table free (their SAs must go).
    pub fn insert(
        &mut self,
        egroup: &str,
        base_eroute: &str,
        peer_id: &str,
        remote_subnet: IpNet,
        peer_address: Option<String>,
        now: Instant,
    ) -> Vec<DynamicEroute> {
        let Some(g) = self.groups.get_mut(egroup) else {
            return Vec::new();
        };
        g.table.insert(DynamicEroute {
            peer_id: peer_id.to_owned(),
            egroup: egroup.to_owned(),
            base_eroute: base_eroute.to_owned(),
            remote_subnet,
            peer_address,
            last_used: now,
        })
    }

    /// Marks the site's dynamic eroute as used (it carried traffic).
    pub fn touch(&mut self, egroup: &str, peer_id: &str, now: Instant) {
        if let Some(g) = self.groups.get_mut(egroup) {
            let _ = g.table.get_by_peer(peer_id, now);
        }
    }

    /// Forgets the site's dynamic eroute (its last SA is gone).
    pub fn remove(&mut self, egroup: &str, peer_id: &str) {
        if let Some(g) = self.groups.get_mut(egroup) {
            g.table.remove(peer_id);
        }
    }

    /// Dynamic eroutes per egroup.
    pub fn counts(&self) -> impl Iterator<Item = (&str, usize)> {
        self.groups.iter().map(|(n, g)| (n.as_str(), g.table.len()))
    }

    /// The site's subnet must lie inside the base eroute's remote subnet: a row cannot widen
    /// what the head-end configured.
    pub fn check_subnet(site: &Site, base_remote: IpNet) -> Result<(), LookupError> {
        if base_remote.contains(&site.remote_subnet) {
            Ok(())
        } else {
            Err(LookupError::Malformed {
                column: "remote_subnet".into(),
                reason: format!(
                    "{} is outside the base eroute's {base_remote}",
                    site.remote_subnet
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigDiff;
    use crate::config::testing::config;

    const BRANCHES: &str = "localSubnet: 10.0.0.0/16\nremoteSubnet: 10.128.0.0/9\npeerId: '*.sites'\n";
    const LABS: &str = "localSubnet: 10.0.0.0/16\nremoteSubnet: 10.64.0.0/10\npeerId: '*.labs'\n";

    fn with_max(max: u32) -> Config {
        config(
            &[("branches", BRANCHES), ("labs", LABS)],
            &[
                (
                    "branches",
                    &format!("eroute: branches\nremoteSubnetPrefix: 24\nmaxDynamicEroutes: {max}\n"),
                ),
                ("labs", "eroute: labs\nremoteSubnetPrefix: 24\n"),
            ],
            &[],
        )
    }

    fn site(egroups: &mut Egroups, g: &str, i: u8, now: Instant) {
        let subnet = format!("10.{}.{i}.0/24", if g == "labs" { 64 } else { 128 });
        let evicted = egroups.insert(g, g, &format!("s{i}.{g}"), subnet.parse().unwrap(), None, now);
        assert!(evicted.is_empty());
    }

    fn stores(c: &Config, diff: &ConfigDiff, store: &SiteStore) -> BTreeMap<String, Option<SiteStore>> {
        diff.egroups
            .new_or_changed()
            .filter(|n| c.set.egroups.contains_key(*n))
            .map(|n| (n.clone(), Some(store.clone())))
            .collect()
    }

    #[tokio::test]
    async fn a_reload_keeps_the_sites_of_changed_egroups_and_forgets_removed_ones() {
        let data = tempfile::tempdir().unwrap();
        let store = SiteStore::open_embedded(data.path()).await.unwrap();
        let old = with_max(100);
        let mut egroups = Egroups::open(&old, &store).await.unwrap();
        let t0 = Instant::now();
        for i in 0..4 {
            site(
                &mut egroups,
                "branches",
                i,
                t0 + Duration::from_secs(u64::from(i)),
            );
        }
        site(&mut egroups, "labs", 1, t0);

        // Another bound: the sites stay, the least recently used go beyond the 10% rule.
        let smaller = with_max(4);
        let diff = ConfigDiff::between(&old, &smaller);
        assert_eq!(diff.egroups.changed.len(), 1);
        let evicted = egroups.reconfigure(&smaller, &diff, stores(&smaller, &diff, &store));
        let gone: Vec<_> = evicted.iter().map(|d| d.peer_id.as_str()).collect();
        assert_eq!(gone, ["s0.branches"], "the least recently used first");
        assert!(egroups.has_dynamic("branches", "s3.branches"));
        assert!(
            egroups.has_dynamic("labs", "s1.labs"),
            "an unchanged egroup is untouched"
        );

        // Only the mask changes: the table is kept as it is.
        let mut masked = with_max(4);
        masked
            .set
            .egroups
            .get_mut("branches")
            .unwrap()
            .remote_subnet_prefix = 26;
        let diff = ConfigDiff::between(&smaller, &masked);
        assert!(
            egroups
                .reconfigure(&masked, &diff, stores(&masked, &diff, &store))
                .is_empty()
        );
        assert_eq!(
            egroups.counts().collect::<Vec<_>>(),
            [("branches", 3), ("labs", 1)]
        );

        // A removed egroup goes with its dynamic eroutes; an added one starts empty.
        let renamed = config(
            &[("branches", BRANCHES), ("labs2", LABS)],
            &[
                (
                    "branches",
                    "eroute: branches\nremoteSubnetPrefix: 26\nmaxDynamicEroutes: 4\n",
                ),
                ("labs2", "eroute: labs2\nremoteSubnetPrefix: 24\n"),
            ],
            &[],
        );
        let diff = ConfigDiff::between(&masked, &renamed);
        egroups.reconfigure(&renamed, &diff, stores(&renamed, &diff, &store));
        assert!(!egroups.has_dynamic("labs", "s1.labs"));
        assert_eq!(
            egroups.counts().collect::<Vec<_>>(),
            [("branches", 3), ("labs2", 0)]
        );
        let initiating: Vec<_> = egroups
            .initiating(&renamed)
            .into_iter()
            .map(|(g, ..)| g)
            .collect();
        assert_eq!(initiating, ["branches", "labs2"]);
    }
}
