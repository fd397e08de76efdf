//! Eroutes at run time: which eroute a site's identity selects, and the per-egroup tables of
//! dynamic eroutes (`lru`).

pub mod lru;

use concentrator_crds::eroute::Role;
use concentrator_crds::pattern;
use concentrator_crds::set::ValidatedSet;

/// What an IKE_AUTH identity selects, in the order of DESIGN.md's responder path: dynamic
/// eroutes first, then egroup-backed base eroutes (look the site up), then static eroutes
/// (their own secret), else refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// A dynamic eroute of this egroup exists for the peer already.
    Dynamic { egroup: String },
    /// Look the peer up in this egroup's database, on this base eroute.
    Egroup { egroup: String, base_eroute: String },
    /// A static eroute with its own PSK.
    Static { eroute: String },
    /// Nothing matches: AUTHENTICATION_FAILED.
    None,
}

/// Selects for a responder: `has_dynamic(egroup, id)` asks the dynamic tables.
pub fn select_responder(
    set: &ValidatedSet,
    peer_id: &str,
    has_dynamic: impl Fn(&str, &str) -> bool,
) -> Selection {
    let accepts = |role: Role| role != Role::Initiator;
    for (name, g) in &set.egroups {
        if has_dynamic(name, peer_id) {
            return Selection::Dynamic { egroup: name.clone() };
        }
        let Some(base) = set.eroutes.get(&g.eroute) else {
            continue;
        };
        if accepts(base.role)
            && base
                .peer_id
                .as_deref()
                .is_some_and(|p| pattern::matches(p, peer_id))
        {
            return Selection::Egroup {
                egroup: name.clone(),
                base_eroute: g.eroute.clone(),
            };
        }
    }
    for (name, e) in &set.eroutes {
        if set.egroup_of(name).is_none()
            && accepts(e.role)
            && e.peer_id.as_deref().is_some_and(|p| pattern::matches(p, peer_id))
        {
            return Selection::Static { eroute: name.clone() };
        }
    }
    Selection::None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> ValidatedSet {
        let e = |y: &str| serde_yaml::from_str(y).unwrap();
        concentrator_crds::set::validate(
            &[
                ("branches".into(), e("localSubnet: 10.0.0.0/16\nremoteSubnet: 10.128.0.0/9\npeerId: '*.sites.example.com'\n")),
                (
                    "hq".into(),
                    e("localSubnet: 10.0.0.0/16\nremoteSubnet: 172.16.0.0/24\npeerId: 'hq.example.com'\npskSecretRef: {name: hq, key: psk}\n"),
                ),
                (
                    "out".into(),
                    e("localSubnet: 10.0.0.0/16\nremoteSubnet: 172.17.0.0/24\npeerId: 'out.example.com'\npeerAddress: 192.0.2.9\nrole: Initiator\npskSecretRef: {name: o, key: psk}\n"),
                ),
            ],
            &[("branches".into(), serde_yaml::from_str("eroute: branches\nremoteSubnetPrefix: 24\n").unwrap())],
        )
        .unwrap()
    }

    #[test]
    fn dynamic_then_egroup_then_static_then_refuse() {
        let s = set();
        let none = |_: &str, _: &str| false;
        assert_eq!(
            select_responder(&s, "a.sites.example.com", |g, id| g == "branches"
                && id == "a.sites.example.com"),
            Selection::Dynamic {
                egroup: "branches".into()
            }
        );
        assert_eq!(
            select_responder(&s, "b.sites.example.com", none),
            Selection::Egroup {
                egroup: "branches".into(),
                base_eroute: "branches".into()
            }
        );
        assert_eq!(
            select_responder(&s, "hq.example.com", none),
            Selection::Static { eroute: "hq".into() }
        );
        assert_eq!(select_responder(&s, "evil.example.org", none), Selection::None);
        assert_eq!(
            select_responder(&s, "out.example.com", none),
            Selection::None,
            "an Initiator eroute does not answer"
        );
    }
}
