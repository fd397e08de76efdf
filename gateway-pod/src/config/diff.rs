//! What a new configuration changes against the running one, object by object: the reload
//! applies only that, so the tunnels of untouched eroutes never notice it.

use std::collections::{BTreeMap, BTreeSet};

use super::Config;
use crate::secret::Secret;

/// Names of one kind of object, by what happened to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: BTreeSet<String>,
    /// The spec differs, or a Secret it refers to holds other bytes now.
    pub changed: BTreeSet<String>,
    pub removed: BTreeSet<String>,
}

impl Changes {
    fn between<T: PartialEq>(
        old: &BTreeMap<String, T>,
        new: &BTreeMap<String, T>,
        old_secrets: &BTreeMap<String, Secret>,
        new_secrets: &BTreeMap<String, Secret>,
    ) -> Self {
        let mut c = Self::default();
        for (name, spec) in new {
            match old.get(name) {
                None => {
                    c.added.insert(name.clone());
                }
                Some(before) if before != spec || old_secrets.get(name) != new_secrets.get(name) => {
                    c.changed.insert(name.clone());
                }
                Some(_) => {}
            }
        }
        c.removed = old.keys().filter(|n| !new.contains_key(*n)).cloned().collect();
        c
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    /// Added or changed: what new SAs must take from the new configuration.
    pub fn new_or_changed(&self) -> impl Iterator<Item = &String> {
        self.added.iter().chain(&self.changed)
    }
}

/// The difference between two valid configurations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// A static eroute whose PSK Secret holds a new key counts as changed.
    pub eroutes: Changes,
    /// An egroup whose database URL Secret holds a new URL counts as changed.
    pub egroups: Changes,
}

impl ConfigDiff {
    pub fn between(old: &Config, new: &Config) -> Self {
        Self {
            eroutes: Changes::between(
                &old.set.eroutes,
                &new.set.eroutes,
                &old.static_psks,
                &new.static_psks,
            ),
            egroups: Changes::between(
                &old.set.egroups,
                &new.set.egroups,
                &old.egroup_db_urls,
                &new.egroup_db_urls,
            ),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.eroutes.is_empty() && self.egroups.is_empty()
    }

    /// Whether the SAs of a tunnel on `eroute` (and of `egroup`, for a dynamic eroute) must
    /// close: their eroute or egroup is gone (an egroup kept but pointed at a new eroute
    /// leaves its SAs without the eroute they run on). Changed ones run on with what they
    /// negotiated.
    pub fn closes(&self, eroute: Option<&str>, egroup: Option<&str>) -> bool {
        egroup.is_some_and(|g| self.egroups.removed.contains(g))
            || eroute.is_some_and(|e| self.eroutes.removed.contains(e))
    }
}

impl std::fmt::Display for ConfigDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |s: &BTreeSet<String>| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.iter().cloned().collect::<Vec<_>>().join(",")
            }
        };
        write!(
            f,
            "eroutes added {} changed {} removed {}; egroups added {} changed {} removed {}",
            list(&self.eroutes.added),
            list(&self.eroutes.changed),
            list(&self.eroutes.removed),
            list(&self.egroups.added),
            list(&self.egroups.changed),
            list(&self.egroups.removed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::config;

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    const HQ: &str = "localSubnet: 10.0.0.0/16\nremoteSubnet: 172.16.0.0/24\npeerId: hq\npskSecretRef: {name: hq, key: psk}\n";
    const HQ_EDITED: &str = "localSubnet: 10.0.0.0/16\nremoteSubnet: 172.16.0.0/24\npeerId: hq\npskSecretRef: {name: hq, key: psk}\nesp: {lifetime: 2h}\n";
    const LAB: &str = "localSubnet: 10.0.0.0/16\nremoteSubnet: 172.17.0.0/24\npeerId: lab\npskSecretRef: {name: lab, key: psk}\n";
    const BRANCHES: &str = "localSubnet: 10.0.0.0/16\nremoteSubnet: 10.128.0.0/9\npeerId: '*.sites'\n";

    #[test]
    fn the_same_config_changes_nothing() {
        let a = config(&[("hq", HQ)], &[], &[("hq", "k1")]);
        let b = config(&[("hq", HQ)], &[], &[("hq", "k1")]);
        let d = ConfigDiff::between(&a, &b);
        assert!(d.is_empty(), "{d}");
        assert!(!d.closes(Some("hq"), None));
    }

    #[test]
    fn added_changed_and_removed_eroutes_are_told_apart() {
        let a = config(&[("hq", HQ), ("lab", LAB)], &[], &[("hq", "k1"), ("lab", "k2")]);
        let b = config(
            &[("hq", HQ_EDITED), ("branches", BRANCHES)],
            &[("branches", "eroute: branches\nremoteSubnetPrefix: 24\n")],
            &[("hq", "k1")],
        );
        let d = ConfigDiff::between(&a, &b);
        assert_eq!(d.eroutes.added, names(&["branches"]));
        assert_eq!(d.eroutes.changed, names(&["hq"]));
        assert_eq!(d.eroutes.removed, names(&["lab"]));
        assert_eq!(d.egroups.added, names(&["branches"]));
        assert!(d.egroups.changed.is_empty() && d.egroups.removed.is_empty());
        assert!(d.closes(Some("lab"), None), "a removed eroute's SAs close");
        assert!(!d.closes(Some("hq"), None), "a changed eroute's SAs run on");
    }

    #[test]
    fn a_rotated_psk_changes_its_eroute_only() {
        let a = config(&[("hq", HQ), ("lab", LAB)], &[], &[("hq", "old"), ("lab", "k2")]);
        let b = config(&[("hq", HQ), ("lab", LAB)], &[], &[("hq", "new"), ("lab", "k2")]);
        let d = ConfigDiff::between(&a, &b);
        assert_eq!(d.eroutes.changed, names(&["hq"]));
        assert!(d.eroutes.added.is_empty() && d.eroutes.removed.is_empty());
        assert!(d.egroups.is_empty());
    }

    #[test]
    fn a_removed_egroup_closes_its_dynamic_eroutes_not_static_ones() {
        let g = [("branches", "eroute: branches\nremoteSubnetPrefix: 24\n")];
        let a = config(&[("hq", HQ), ("branches", BRANCHES)], &g, &[("hq", "k1")]);
        let b = config(&[("hq", HQ)], &[], &[("hq", "k1")]);
        let d = ConfigDiff::between(&a, &b);
        assert_eq!(d.egroups.removed, names(&["branches"]));
        assert_eq!(d.eroutes.removed, names(&["branches"]));
        assert!(d.closes(Some("branches"), Some("branches")));
        assert!(!d.closes(Some("hq"), None));
    }

    #[test]
    fn an_egroup_pointed_at_a_renamed_eroute_closes_the_old_eroutes_sas() {
        let a = config(
            &[("branches", BRANCHES)],
            &[("sites", "eroute: branches\nremoteSubnetPrefix: 24\n")],
            &[],
        );
        let b = config(
            &[("branches-v2", BRANCHES)],
            &[("sites", "eroute: branches-v2\nremoteSubnetPrefix: 24\n")],
            &[],
        );
        let d = ConfigDiff::between(&a, &b);
        assert_eq!(d.egroups.changed, names(&["sites"]));
        assert!(d.closes(Some("branches"), Some("sites")));
    }

    #[test]
    fn an_egroup_with_another_mask_or_database_url_is_changed() {
        let a = config(
            &[("branches", BRANCHES)],
            &[("branches", "eroute: branches\nremoteSubnetPrefix: 24\n")],
            &[],
        );
        let b = config(
            &[("branches", BRANCHES)],
            &[("branches", "eroute: branches\nremoteSubnetPrefix: 26\n")],
            &[],
        );
        assert_eq!(ConfigDiff::between(&a, &b).egroups.changed, names(&["branches"]));
        let mut c = config(
            &[("branches", BRANCHES)],
            &[("branches", "eroute: branches\nremoteSubnetPrefix: 24\n")],
            &[],
        );
        c.egroup_db_urls
            .insert("branches".into(), Secret::new(b"mysql://u:p@db/sites".to_vec()));
        let d = ConfigDiff::between(&a, &c);
        assert_eq!(d.egroups.changed, names(&["branches"]));
        assert!(!d.closes(Some("branches"), Some("branches")), "its sites run on");
    }
}
