//! `Eroute`: a template tunnel policy. Static when it carries its own peer address and PSK;
//! a base for dynamic eroutes when an `Egroup` binds it to a site database.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::proposal::{self, EspProposal, IkeProposal};
use crate::{SecretKeyRef, ValidationError, duration, pattern};

/// Default IKE proposal when none is given: what strongSwan users commonly pick today.
pub const DEFAULT_IKE_PROPOSAL: &str = "aes128gcm16-prfsha256-x25519";
/// Default ESP proposal when none is given.
pub const DEFAULT_ESP_PROPOSAL: &str = "aes128gcm16";
/// Default anti-replay window in packets.
pub const DEFAULT_REPLAY_WINDOW: u32 = 4096;
/// Largest anti-replay window we accept, in packets.
pub const MAX_REPLAY_WINDOW: u32 = 65536;

/// A template tunnel policy: local and remote subnets, peer-ID pattern, proposals, lifetimes.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vpn.concentrator.io",
    version = "v1alpha1",
    kind = "Eroute",
    namespaced,
    status = "ErouteStatus",
    shortname = "er",
    category = "concentrator",
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"Local","type":"string","jsonPath":".spec.localSubnet"}"#,
    printcolumn = r#"{"name":"Remote","type":"string","jsonPath":".spec.remoteSubnet"}"#,
    printcolumn = r#"{"name":"Peer ID","type":"string","jsonPath":".spec.peerId"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Dynamic","type":"integer","jsonPath":".status.dynamicEroutes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ErouteSpec {
    /// Subnet behind the concentrator, as a CIDR (`10.0.0.0/16`).
    #[schemars(length(min = 1))]
    pub local_subnet: String,
    /// Subnet of the remote side, as a CIDR. For an egroup-backed eroute it covers all sites.
    #[schemars(length(min = 1))]
    pub remote_subnet: String,
    /// Peer-ID pattern (`*` any run of characters, `?` one character). Required unless the
    /// role is Initiator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    /// Address (IP or DNS name) of a static peer. Usually empty for egroup-backed eroutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<String>,
    /// Address tried when `peerAddress` does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_peer_address: Option<String>,
    /// Our identity in IKE_AUTH (FQDN, user@fqdn, IP address). Defaults to the local address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_id: Option<String>,
    /// Pre-shared key of a static peer. Egroup-backed eroutes take the PSK from the database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_secret_ref: Option<SecretKeyRef>,
    /// Who may start the negotiation.
    #[serde(default)]
    pub role: Role,
    /// IKE SA parameters.
    #[serde(default)]
    pub ike: IkeSpec,
    /// CHILD SA (ESP) parameters.
    #[serde(default)]
    pub esp: EspSpec,
    /// Remove the tunnel after this long without traffic (`10m`). Unset: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactivity_timeout: Option<String>,
}

/// Who may start the negotiation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Role {
    /// The concentrator keeps the tunnel up: it connects to `peerAddress` at start and again
    /// whenever the tunnel goes (strongSwan `start_action = start`).
    Initiator,
    /// Sites initiate; the concentrator only answers.
    Responder,
    /// Either side may initiate: with a `peerAddress` the concentrator connects when traffic
    /// needs the tunnel (strongSwan `start_action = trap`).
    #[default]
    Both,
}

/// IKE SA parameters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IkeSpec {
    /// Proposals in strongSwan syntax, most preferred first. Default: `aes128gcm16-prfsha256-x25519`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proposals: Vec<String>,
    /// IKE SA lifetime before rekeying (`4h`). Default: 4h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,
    /// Dead-peer-detection interval (`30s`). Default: 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpd_interval: Option<String>,
}

/// CHILD SA (ESP) parameters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EspSpec {
    /// Proposals in strongSwan syntax, most preferred first. Default: `aes128gcm16`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proposals: Vec<String>,
    /// CHILD SA lifetime before rekeying (`1h`). Default: 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,
    /// Anti-replay window in packets (0 disables). Default: 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 65536))]
    pub replay_window: Option<u32>,
    /// Bytes (of inner packets, each direction counted apart) after which a CHILD SA is
    /// rekeyed, as strongSwan's `rekey_bytes`. Default: 90 % of `lifeBytes` if that is set,
    /// else no volume limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rekey_bytes: Option<u64>,
    /// Bytes after which a CHILD SA that could not be rekeyed is removed, as strongSwan's
    /// `life_bytes`. Default: `rekeyBytes` + 10 %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub life_bytes: Option<u64>,
    /// Packets after which a CHILD SA is rekeyed, as strongSwan's `rekey_packets`. Default:
    /// 90 % of `lifePackets` if that is set, else no packet limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rekey_packets: Option<u64>,
    /// Packets after which a CHILD SA that could not be rekeyed is removed, as strongSwan's
    /// `life_packets`. Default: `rekeyPackets` + 10 %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub life_packets: Option<u64>,
}

/// Volume limits of a CHILD SA, each direction counted apart; `None` means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeLimits {
    /// Bytes after which the SA is rekeyed.
    pub rekey_bytes: Option<u64>,
    /// Bytes after which the SA is removed.
    pub life_bytes: Option<u64>,
    /// Packets after which the SA is rekeyed.
    pub rekey_packets: Option<u64>,
    /// Packets after which the SA is removed.
    pub life_packets: Option<u64>,
}

/// The soft and hard limit from what was given: strongSwan's defaults (hard = soft + 10 %),
/// and a soft limit at 90 % when only the hard one is given, so that such an SA is rekeyed
/// rather than cut off.
fn soft_and_hard(
    soft_field: &str,
    soft: Option<u64>,
    hard: Option<u64>,
) -> Result<(Option<u64>, Option<u64>), ValidationError> {
    for (field, v) in [(soft_field, soft), ("", hard)] {
        if v == Some(0) {
            let field = if field.is_empty() {
                soft_field.replace("rekey", "life")
            } else {
                field.to_owned()
            };
            return Err(ValidationError::new(
                &field,
                "must be at least 1 (leave it out for no limit)",
            ));
        }
    }
    Ok(match (soft, hard) {
        (None, None) => (None, None),
        (Some(s), None) => (Some(s), Some(s.saturating_add((s / 10).max(1)))),
        (None, Some(h)) => (Some((h - h / 10).max(1)), Some(h)),
        (Some(s), Some(h)) if s < h => (Some(s), Some(h)),
        (Some(s), Some(h)) => {
            return Err(ValidationError::new(
                soft_field,
                format!("{s} must be less than the hard limit {h}"),
            ));
        }
    })
}

/// What the concentrator observed for an eroute.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErouteStatus {
    /// `Ready` (True/False with a reason such as `Invalid`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation of the spec these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Dynamic eroutes currently derived from this eroute, across the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_eroutes: Option<u64>,
    /// Established CHILD SAs under this eroute, across the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_sas: Option<u64>,
}

/// An eroute spec that passed validation, in typed form. Nothing downstream reads the raw spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedEroute {
    pub local_subnet: IpNet,
    pub remote_subnet: IpNet,
    pub peer_id: Option<String>,
    pub peer_address: Option<String>,
    pub backup_peer_address: Option<String>,
    pub local_id: Option<String>,
    pub psk_secret_ref: Option<SecretKeyRef>,
    pub role: Role,
    pub ike_proposals: Vec<IkeProposal>,
    pub ike_lifetime: Duration,
    pub dpd_interval: Duration,
    pub esp_proposals: Vec<EspProposal>,
    pub esp_lifetime: Duration,
    pub replay_window: u32,
    pub esp_volume: VolumeLimits,
    pub inactivity_timeout: Option<Duration>,
}

/// Parses a CIDR and insists on a network address, since a host address with a prefix is
/// almost always a typo for the network.
pub fn parse_subnet(field: &str, s: &str) -> Result<IpNet, ValidationError> {
    let net: IpNet = s.trim().parse().map_err(|_| {
        ValidationError::new(
            field,
            format!("'{s}' is not a CIDR subnet; write e.g. '10.0.0.0/24' or 'fd00::/64'"),
        )
    })?;
    if net.trunc() != net {
        return Err(ValidationError::new(
            field,
            format!("'{s}' has host bits set; did you mean '{}'?", net.trunc()),
        ));
    }
    Ok(net)
}

/// An address of a peer: an IP address or a DNS name.
pub fn validate_address(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let hostname_ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        // A dotted all-numeric string is a broken IP address, not a name.
        && !s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if hostname_ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("'{s}' is neither an IP address nor a DNS name"),
        ))
    }
}

impl ErouteSpec {
    /// Validates the spec on its own (references to other objects are checked by the
    /// configuration set that holds it).
    pub fn validate(&self) -> Result<ValidatedEroute, ValidationError> {
        let local_subnet = parse_subnet("spec.localSubnet", &self.local_subnet)?;
        let remote_subnet = parse_subnet("spec.remoteSubnet", &self.remote_subnet)?;
        if local_subnet.addr().is_ipv4() != remote_subnet.addr().is_ipv4() {
            return Err(ValidationError::new(
                "spec.remoteSubnet",
                format!(
                    "'{remote_subnet}' and localSubnet '{local_subnet}' are of different address families"
                ),
            ));
        }
        let peer_id = match self.peer_id.as_deref().map(str::trim) {
            None | Some("") if self.role != Role::Initiator => {
                return Err(ValidationError::new(
                    "spec.peerId",
                    format!(
                        "is required for role {:?}: responders match the site's IKE ID against it (use '*' to accept any)",
                        self.role
                    ),
                ));
            }
            None | Some("") => None,
            Some(p) => {
                pattern::validate("spec.peerId", p)?;
                Some(p.to_owned())
            }
        };
        for (field, addr) in [
            ("spec.peerAddress", &self.peer_address),
            ("spec.backupPeerAddress", &self.backup_peer_address),
        ] {
            if let Some(a) = addr {
                validate_address(field, a)?;
            }
        }
        if self.backup_peer_address.is_some() && self.peer_address.is_none() {
            return Err(ValidationError::new(
                "spec.backupPeerAddress",
                "is set but spec.peerAddress is not; set the primary address first",
            ));
        }
        if let Some(id) = &self.local_id {
            pattern::validate("spec.localId", id)?;
            if !pattern::is_literal(id) {
                return Err(ValidationError::new(
                    "spec.localId",
                    format!("'{id}' contains a wildcard; our own identity must be exact"),
                ));
            }
        }
        if let Some(r) = &self.psk_secret_ref {
            r.validate("spec.pskSecretRef")?;
        }
        let ike_proposals = proposals(
            &self.ike.proposals,
            DEFAULT_IKE_PROPOSAL,
            "spec.ike.proposals",
            proposal::parse_ike,
        )?;
        let esp_proposals = proposals(
            &self.esp.proposals,
            DEFAULT_ESP_PROPOSAL,
            "spec.esp.proposals",
            proposal::parse_esp,
        )?;
        let ike_lifetime = duration::parse_or(
            "spec.ike.lifetime",
            self.ike.lifetime.as_deref(),
            Duration::from_secs(4 * 3600),
        )?;
        let dpd_interval = duration::parse_or(
            "spec.ike.dpdInterval",
            self.ike.dpd_interval.as_deref(),
            Duration::from_secs(30),
        )?;
        let esp_lifetime = duration::parse_or(
            "spec.esp.lifetime",
            self.esp.lifetime.as_deref(),
            Duration::from_secs(3600),
        )?;
        let replay_window = self.esp.replay_window.unwrap_or(DEFAULT_REPLAY_WINDOW);
        if replay_window > MAX_REPLAY_WINDOW {
            return Err(ValidationError::new(
                "spec.esp.replayWindow",
                format!("{replay_window} is larger than the maximum of {MAX_REPLAY_WINDOW} packets"),
            ));
        }
        let (rekey_bytes, life_bytes) =
            soft_and_hard("spec.esp.rekeyBytes", self.esp.rekey_bytes, self.esp.life_bytes)?;
        let (rekey_packets, life_packets) = soft_and_hard(
            "spec.esp.rekeyPackets",
            self.esp.rekey_packets,
            self.esp.life_packets,
        )?;
        let esp_volume = VolumeLimits {
            rekey_bytes,
            life_bytes,
            rekey_packets,
            life_packets,
        };
        let inactivity_timeout = self
            .inactivity_timeout
            .as_deref()
            .map(|v| duration::parse("spec.inactivityTimeout", v))
            .transpose()?;
        Ok(ValidatedEroute {
            local_subnet,
            remote_subnet,
            peer_id,
            peer_address: self.peer_address.clone(),
            backup_peer_address: self.backup_peer_address.clone(),
            local_id: self.local_id.clone(),
            psk_secret_ref: self.psk_secret_ref.clone(),
            role: self.role,
            ike_proposals,
            ike_lifetime,
            dpd_interval,
            esp_proposals,
            esp_lifetime,
            replay_window,
            esp_volume,
            inactivity_timeout,
        })
    }
}

fn proposals<T>(
    given: &[String],
    default: &str,
    field: &str,
    parse: fn(&str, &str) -> Result<T, proposal::ProposalError>,
) -> Result<Vec<T>, ValidationError> {
    if given.is_empty() {
        return Ok(vec![parse(field, default)?]);
    }
    given
        .iter()
        .enumerate()
        .map(|(i, p)| Ok(parse(&format!("{field}[{i}]"), p)?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ErouteSpec {
        serde_yaml::from_str(
            r#"
localSubnet: 10.0.0.0/16
remoteSubnet: 10.128.0.0/9
peerId: "*.sites.example.com"
"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_fill_in() {
        let v = spec().validate().unwrap();
        assert_eq!(v.role, Role::Both);
        assert_eq!(v.ike_lifetime, Duration::from_secs(4 * 3600));
        assert_eq!(v.replay_window, DEFAULT_REPLAY_WINDOW);
        assert_eq!(v.ike_proposals.len(), 1);
        assert_eq!(v.inactivity_timeout, None);
    }

    #[test]
    fn rejects_bad_cidr_naming_the_field() {
        let mut s = spec();
        s.local_subnet = "10.0.0.0/33".into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "spec.localSubnet");
        assert!(e.message.contains("10.0.0.0/33"));
    }

    #[test]
    fn rejects_host_bits_with_a_hint() {
        let mut s = spec();
        s.remote_subnet = "10.128.0.1/9".into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "spec.remoteSubnet");
        assert!(e.message.contains("10.128.0.0/9"), "{e}");
    }

    #[test]
    fn rejects_mixed_families() {
        let mut s = spec();
        s.remote_subnet = "fd00::/64".into();
        assert_eq!(s.validate().unwrap_err().field, "spec.remoteSubnet");
    }

    #[test]
    fn rejects_empty_peer_id_on_responder() {
        for role in [Role::Responder, Role::Both] {
            let mut s = spec();
            s.role = role;
            s.peer_id = Some(" ".into());
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, "spec.peerId");
            s.peer_id = None;
            assert_eq!(s.validate().unwrap_err().field, "spec.peerId");
        }
        let mut s = spec();
        s.role = Role::Initiator;
        s.peer_id = None;
        s.peer_address = Some("192.0.2.1".into());
        assert!(s.validate().is_ok());
    }

    #[test]
    fn rejects_unknown_proposal_with_index() {
        let mut s = spec();
        s.esp.proposals = vec!["aes128gcm16".into(), "aes128-blake".into()];
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "spec.esp.proposals[1]");
        assert!(e.message.contains("'blake'"), "{e}");
    }

    #[test]
    fn rejects_bad_durations_and_window() {
        let mut s = spec();
        s.ike.dpd_interval = Some("often".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.ike.dpdInterval");
        let mut s = spec();
        s.esp.replay_window = Some(MAX_REPLAY_WINDOW + 1);
        assert_eq!(s.validate().unwrap_err().field, "spec.esp.replayWindow");
        let mut s = spec();
        s.inactivity_timeout = Some("0s".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.inactivityTimeout");
    }

    #[test]
    fn volume_limits_default_like_strongswan() {
        assert_eq!(spec().validate().unwrap().esp_volume, VolumeLimits::default());
        let mut s = spec();
        s.esp.rekey_bytes = Some(1_000_000);
        s.esp.life_packets = Some(1000);
        let v = s.validate().unwrap().esp_volume;
        assert_eq!(
            v,
            VolumeLimits {
                rekey_bytes: Some(1_000_000),
                life_bytes: Some(1_100_000),
                rekey_packets: Some(900),
                life_packets: Some(1000),
            }
        );
        let mut s = spec();
        s.esp.rekey_packets = Some(5);
        s.esp.life_packets = Some(5);
        assert_eq!(s.validate().unwrap_err().field, "spec.esp.rekeyPackets");
        let mut s = spec();
        s.esp.life_bytes = Some(0);
        assert_eq!(s.validate().unwrap_err().field, "spec.esp.lifeBytes");
        let mut s = spec();
        s.esp.rekey_bytes = Some(0);
        assert_eq!(s.validate().unwrap_err().field, "spec.esp.rekeyBytes");
        let mut s = spec();
        s.esp.life_packets = Some(1);
        assert_eq!(
            s.validate().unwrap().esp_volume.rekey_packets,
            Some(1),
            "never a zero soft limit"
        );
    }

    #[test]
    fn rejects_bad_addresses_and_wildcard_local_id() {
        let mut s = spec();
        s.peer_address = Some("300.1.1.1".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.peerAddress");
        let mut s = spec();
        s.peer_address = Some("gw.example.com".into());
        s.local_id = Some("*.hq".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.localId");
        let mut s = spec();
        s.backup_peer_address = Some("192.0.2.2".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.backupPeerAddress");
    }

    #[test]
    fn role_is_case_exact_in_yaml() {
        let r: Result<ErouteSpec, _> =
            serde_yaml::from_str("localSubnet: a\nremoteSubnet: b\nrole: responder\n");
        assert!(r.is_err());
    }
}
