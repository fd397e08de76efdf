//! Validation across objects: references resolve, egroups do not overlap, static eroutes have
//! what a static tunnel needs. The gateway runs this on its config directory, the operator on
//! the objects of one namespace.

use std::collections::BTreeMap;
use std::fmt;

use crate::egroup::ValidatedEgroup;
use crate::eroute::{Role, ValidatedEroute};
use crate::{EgroupSpec, ErouteSpec, ValidationError, pattern};

/// A validation error together with the object it was found in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ObjectError {
    pub kind: &'static str,
    pub name: String,
    pub error: ValidationError,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} '{}': {}", self.kind, self.name, self.error)
    }
}

/// Eroutes and egroups that passed validation, each alone and together.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ValidatedSet {
    pub eroutes: BTreeMap<String, ValidatedEroute>,
    pub egroups: BTreeMap<String, ValidatedEgroup>,
}

impl ValidatedSet {
    /// The egroup that backs an eroute, if any.
    pub fn egroup_of(&self, eroute: &str) -> Option<(&str, &ValidatedEgroup)> {
        self.egroups
            .iter()
            .find(|(_, g)| g.eroute == eroute)
            .map(|(n, g)| (n.as_str(), g))
    }
}

fn err(kind: &'static str, name: &str, field: impl Into<String>, message: impl Into<String>) -> ObjectError {
    ObjectError {
        kind,
        name: name.to_owned(),
        error: ValidationError::new(field, message),
    }
}

/// Validates every object, then the relations between them. Stops at the first problem, in
/// the order the objects were given, so the message points at one place to fix.
pub fn validate(
    eroutes: &[(String, ErouteSpec)],
    egroups: &[(String, EgroupSpec)],
) -> Result<ValidatedSet, ObjectError> {
    let mut set = ValidatedSet::default();
    for (name, spec) in eroutes {
        let v = spec.validate().map_err(|error| ObjectError {
            kind: "Eroute",
            name: name.clone(),
            error,
        })?;
        if set.eroutes.insert(name.clone(), v).is_some() {
            return Err(err("Eroute", name, "metadata.name", "is defined twice"));
        }
    }
    for (name, spec) in egroups {
        let g = spec.validate().map_err(|error| ObjectError {
            kind: "Egroup",
            name: name.clone(),
            error,
        })?;
        let Some(base) = set.eroutes.get(&g.eroute) else {
            return Err(err(
                "Egroup",
                name,
                "spec.eroute",
                format!("refers to Eroute '{}', which does not exist", g.eroute),
            ));
        };
        let max_prefix = if base.remote_subnet.addr().is_ipv4() {
            32
        } else {
            128
        };
        if g.remote_subnet_prefix > max_prefix || g.remote_subnet_prefix < base.remote_subnet.prefix_len() {
            return Err(err(
                "Egroup",
                name,
                "spec.remoteSubnetPrefix",
                format!(
                    "/{} must lie between the base eroute's remoteSubnet /{} and /{max_prefix}",
                    g.remote_subnet_prefix,
                    base.remote_subnet.prefix_len()
                ),
            ));
        }
        if base.role != Role::Initiator && base.peer_id.is_none() {
            return Err(err(
                "Egroup",
                name,
                "spec.eroute",
                format!(
                    "Eroute '{}' has no peerId pattern to match sites against",
                    g.eroute
                ),
            ));
        }
        for (other_name, other) in &set.egroups {
            if other.eroute == g.eroute {
                return Err(err(
                    "Egroup",
                    name,
                    "spec.eroute",
                    format!(
                        "Eroute '{}' is already bound to Egroup '{other_name}'; one database per eroute",
                        g.eroute
                    ),
                ));
            }
            let (a, b) = (&set.eroutes[&other.eroute].peer_id, &base.peer_id);
            if let (Some(a), Some(b)) = (a, b)
                && pattern::overlap(a, b)
            {
                return Err(err(
                    "Egroup",
                    name,
                    "spec.eroute",
                    format!(
                        "peer-ID pattern '{b}' of Eroute '{}' overlaps '{a}' of Egroup '{other_name}': a site ID could match both",
                        g.eroute
                    ),
                ));
            }
        }
        if set.egroups.insert(name.clone(), g).is_some() {
            return Err(err("Egroup", name, "metadata.name", "is defined twice"));
        }
    }
    // Eroutes without an egroup are static tunnels: they need their own secret, and an address
    // if we are to initiate.
    for (name, e) in &set.eroutes {
        if set.egroup_of(name).is_some() {
            continue;
        }
        if e.psk_secret_ref.is_none() {
            return Err(err(
                "Eroute",
                name,
                "spec.pskSecretRef",
                "is required for a static eroute (one that no Egroup binds to a site database)",
            ));
        }
        if e.role == Role::Initiator && e.peer_address.is_none() {
            return Err(err(
                "Eroute",
                name,
                "spec.peerAddress",
                "is required for a static Initiator eroute: there is no database to look the peer up in",
            ));
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eroute(yaml: &str) -> ErouteSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn base(peer: &str) -> ErouteSpec {
        eroute(&format!(
            "localSubnet: 10.0.0.0/16\nremoteSubnet: 10.128.0.0/9\npeerId: '{peer}'\n"
        ))
    }

    fn egroup(eroute: &str) -> EgroupSpec {
        serde_yaml::from_str(&format!("eroute: {eroute}\nremoteSubnetPrefix: 24\n")).unwrap()
    }

    #[test]
    fn accepts_base_plus_egroup() {
        let set = validate(
            &[("b".into(), base("*.example.com"))],
            &[("g".into(), egroup("b"))],
        )
        .unwrap();
        assert_eq!(set.egroup_of("b").unwrap().0, "g");
    }

    #[test]
    fn rejects_dangling_eroute_reference() {
        let e = validate(&[], &[("g".into(), egroup("nope"))]).unwrap_err();
        assert_eq!(
            (e.kind, e.name.as_str(), e.error.field.as_str()),
            ("Egroup", "g", "spec.eroute")
        );
        assert!(e.to_string().contains("'nope'"));
    }

    #[test]
    fn rejects_overlapping_egroups() {
        let e = validate(
            &[("a".into(), base("*.example.com")), ("b".into(), base("site-*"))],
            &[("ga".into(), egroup("a")), ("gb".into(), egroup("b"))],
        )
        .unwrap_err();
        assert!(e.error.message.contains("overlaps"), "{e}");
        assert!(
            validate(
                &[
                    ("a".into(), base("*.a.example.com")),
                    ("b".into(), base("*.b.example.com"))
                ],
                &[("ga".into(), egroup("a")), ("gb".into(), egroup("b"))],
            )
            .is_ok()
        );
    }

    #[test]
    fn rejects_static_eroute_without_secret() {
        let e = validate(&[("s".into(), base("gw.example.com"))], &[]).unwrap_err();
        assert_eq!(e.error.field, "spec.pskSecretRef");
    }

    #[test]
    fn rejects_prefix_shorter_than_base() {
        let mut g = egroup("b");
        g.remote_subnet_prefix = 8;
        let e = validate(&[("b".into(), base("*"))], &[("g".into(), g)]).unwrap_err();
        assert_eq!(e.error.field, "spec.remoteSubnetPrefix");
    }

    #[test]
    fn rejects_duplicate_names() {
        let e = validate(&[("b".into(), base("*")), ("b".into(), base("*"))], &[]).unwrap_err();
        assert_eq!(e.error.field, "metadata.name");
    }
}
