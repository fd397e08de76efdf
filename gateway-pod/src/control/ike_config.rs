//! Our side of every negotiation: where we listen, who we are on each eroute, and the
//! responder and initiator configurations built from validated eroutes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use concentrator_crds::eroute::{Role, ValidatedEroute};
use concentrator_ike::initiator::Config as InitiatorConfig;
use concentrator_ike::payload::Identity;
use concentrator_ike::responder::{Config as ResponderConfig, IdBuf, Retransmit};
use ipnet::IpNet;

use super::ControlError;
use crate::config::Config;

/// Where we negotiate from, and our identity per eroute (built once).
pub(super) struct IkeConfigs {
    listen: IpAddr,
    ike_port: u16,
    /// Our NAT-T port: IKE sent from it carries the non-ESP marker.
    pub(super) nat_t_port: u16,
    retransmit: Retransmit,
    /// Plain ESP is carried too: peers we initiate to need not float to UDP.
    raw_esp: bool,
    /// Our identity per eroute (built once).
    local_ids: HashMap<String, IdBuf>,
    /// What a peer of each eroute is answered with once it is identified, shared by all its
    /// SAs (one `Config` of ~300 bytes per SA otherwise).
    responders: HashMap<String, std::sync::Arc<ResponderConfig>>,
}

impl IkeConfigs {
    pub(super) fn new(
        listen: IpAddr,
        ike_port: u16,
        nat_t_port: u16,
        retransmit: Retransmit,
        raw_esp: bool,
    ) -> Self {
        Self {
            listen,
            ike_port,
            nat_t_port,
            retransmit,
            raw_esp,
            local_ids: HashMap::new(),
            responders: HashMap::new(),
        }
    }

    /// Whether plain ESP is carried too (else every peer is made to use ESP in UDP).
    pub(super) fn raw_esp(&self) -> bool {
        self.raw_esp
    }

    /// The address our IKE SAs start from (port 500 side).
    pub(super) fn local_addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen, self.ike_port)
    }

    /// The configuration that answers IKE_SA_INIT under `config` ([`accepting_config`]).
    pub(super) fn accepting(&self, config: &Config) -> Result<ResponderConfig, ControlError> {
        accepting_config(config, self.listen, self.retransmit, self.raw_esp)
    }

    /// Forgets our identity on eroute `name`: it changed or went.
    pub(super) fn forget(&mut self, name: &str) {
        self.local_ids.remove(name);
        self.responders.remove(name);
    }

    /// The configuration an identified peer of eroute `name` is answered with, `accepting`
    /// being the one that answered its IKE_SA_INIT (its retransmission and half-open limits
    /// carry over). Built once per eroute while those stay the same.
    pub(super) fn responder_for(
        &mut self,
        name: &str,
        e: &ValidatedEroute,
        accepting: &ResponderConfig,
    ) -> std::sync::Arc<ResponderConfig> {
        let (retransmit, half_open_timeout) = (accepting.retransmit, accepting.half_open_timeout);
        if let Some(c) = self.responders.get(name)
            && c.retransmit == retransmit
            && c.half_open_timeout == half_open_timeout
        {
            return std::sync::Arc::clone(c);
        }
        let local_id = self.local_id_for(name, e);
        // The endpoint routes by our SPI in either position, so this side may rekey the IKE
        // SA at its lifetime (RFC 7296 §2.18) as well as the CHILD SAs.
        let c = std::sync::Arc::new(ResponderConfig {
            retransmit,
            half_open_timeout,
            ike_lifetime: Some(e.ike_lifetime).filter(|d| !d.is_zero()),
            ..responder_config(e, local_id)
        });
        self.responders.insert(name.to_owned(), std::sync::Arc::clone(&c));
        c
    }

    /// Our identity on `eroute` (built once per eroute).
    pub(super) fn local_id_for(&mut self, name: &str, e: &ValidatedEroute) -> IdBuf {
        let listen = self.listen;
        self.local_ids
            .entry(name.to_owned())
            .or_insert_with(|| local_id(e, listen))
            .clone()
    }

    /// What we propose and expect when we initiate on eroute `name` toward `remote_subnet`.
    pub(super) fn initiator(
        &mut self,
        name: &str,
        e: &ValidatedEroute,
        remote_subnet: IpNet,
        remote_id: Option<IdBuf>,
    ) -> InitiatorConfig {
        let mut config = InitiatorConfig::new(
            e.ike_proposals.clone(),
            e.esp_proposals.clone(),
            e.local_subnet,
            remote_subnet,
            self.local_id_for(name, e),
        );
        config.remote_id = remote_id;
        config.child_lifetime = e.esp_lifetime;
        // The endpoint routes by every SPI of ours, so IKE SA rekeys from either side work.
        config.ike_lifetime = Some(e.ike_lifetime).filter(|d| !d.is_zero());
        config.accept_ike_rekey = true;
        config.dpd_interval = Some(e.dpd_interval).filter(|d| !d.is_zero());
        config.retransmit = self.retransmit;
        config.nat_t.local_port = self.nat_t_port;
        // Without a raw ESP socket our data plane carries ESP in UDP only: float to 4500 even
        // without a NAT (RFC 7296 §2.23 allows it), so that the peer expects ESP in UDP.
        config.nat_t.force = !self.raw_esp;
        config
    }
}

/// The identity we answer with: the eroute's `localId`, else our IKE address.
pub(super) fn local_id(eroute: &ValidatedEroute, listen: IpAddr) -> IdBuf {
    match eroute.local_id.as_deref() {
        Some(id) => id_from_str(id),
        None => match listen {
            IpAddr::V4(a) if !a.is_unspecified() => IdBuf::new(&Identity::Ipv4(a)),
            IpAddr::V6(a) if !a.is_unspecified() => IdBuf::new(&Identity::Ipv6(a)),
            _ => IdBuf::new(&Identity::Fqdn(b"concentrator")),
        },
    }
}

/// The configuration that answers IKE_SA_INIT. The peer's identity, known only at IKE_AUTH,
/// selects the eroute that authenticates it, so IKE_SA_INIT is answered with any IKE
/// proposal that some eroute accepting tunnels allows (as strongSwan considers every
/// config), chosen in the initiator's order; the selected eroute must then allow it
/// (`use_eroute`). An egroup's base eroute accepts the sites of its dynamic eroutes whatever
/// its role (a site we initiated to may connect back). With no such eroute (none yet, or
/// only static ones we initiate), IKE_SA_INIT is still answered with the default proposal
/// and every identity is refused at IKE_AUTH: a pod that starts before its eroutes exist
/// must not fail.
pub(super) fn accepting_config(
    config: &Config,
    listen: IpAddr,
    retransmit: Retransmit,
    raw_esp: bool,
) -> Result<ResponderConfig, ControlError> {
    let set = &config.set;
    let accepting: Vec<_> = set
        .eroutes
        .iter()
        .filter(|(name, e)| e.role != Role::Initiator || set.egroups.values().any(|g| &g.eroute == *name))
        .map(|(_, e)| e)
        .collect();
    let answer = match accepting.first() {
        Some(e) => {
            let mut ike_proposals = Vec::new();
            for p in accepting.iter().flat_map(|e| &e.ike_proposals) {
                if !ike_proposals.contains(p) {
                    ike_proposals.push(p.clone());
                }
            }
            ResponderConfig {
                retransmit,
                ike_proposals,
                ..responder_config(e, local_id(e, listen))
            }
        }
        None => refusing_config(listen, retransmit)?,
    };
    Ok(answer.forcing_udp_encap(!raw_esp))
}

/// The responder configuration when no eroute accepts tunnels: the default proposals, no
/// subnets; the PSK step refuses every identity.
pub(super) fn refusing_config(
    listen: IpAddr,
    retransmit: Retransmit,
) -> Result<ResponderConfig, ControlError> {
    use concentrator_crds::eroute::{DEFAULT_ESP_PROPOSAL, DEFAULT_IKE_PROPOSAL};
    use concentrator_crds::proposal::{parse_esp, parse_ike};
    let ike = parse_ike("ike", DEFAULT_IKE_PROPOSAL).map_err(|_| ControlError::DefaultProposal)?;
    let esp = parse_esp("esp", DEFAULT_ESP_PROPOSAL).map_err(|_| ControlError::DefaultProposal)?;
    let none: IpNet = "0.0.0.0/32".parse().map_err(|_| ControlError::DefaultProposal)?;
    let local_id = match listen {
        IpAddr::V4(a) if !a.is_unspecified() => IdBuf::new(&Identity::Ipv4(a)),
        _ => IdBuf::new(&Identity::Fqdn(b"concentrator")),
    };
    Ok(ResponderConfig {
        retransmit,
        ..ResponderConfig::new(vec![ike], vec![esp], none, none, local_id)
    })
}

/// The responder configuration of a validated eroute (its proposals, subnets, CHILD SA and
/// IKE SA lifetimes, which start our rekeys, and liveness-check interval), answering as
/// `local_id`.
pub(super) fn responder_config(eroute: &ValidatedEroute, local_id: IdBuf) -> ResponderConfig {
    ResponderConfig {
        child_lifetime: eroute.esp_lifetime,
        // A zero lifetime (rejected by validation) means no rekeys of ours.
        ike_lifetime: Some(eroute.ike_lifetime).filter(|d| !d.is_zero()),
        // Validation rejects a zero interval; should one get here, it means "off" rather
        // than a liveness check after every answer.
        dpd_interval: Some(eroute.dpd_interval).filter(|d| !d.is_zero()),
        ..ResponderConfig::new(
            eroute.ike_proposals.clone(),
            eroute.esp_proposals.clone(),
            eroute.local_subnet,
            eroute.remote_subnet,
            local_id,
        )
    }
}

/// An identity as strongSwan users write it: an address, `user@domain` (RFC822), else FQDN.
pub(super) fn id_from_str(s: &str) -> IdBuf {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return match ip {
            IpAddr::V4(a) => IdBuf::new(&Identity::Ipv4(a)),
            IpAddr::V6(a) => IdBuf::new(&Identity::Ipv6(a)),
        };
    }
    if s.contains('@') {
        IdBuf::new(&Identity::Rfc822(s.as_bytes()))
    } else {
        IdBuf::new(&Identity::Fqdn(s.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_as_strongswan_users_write_them() {
        assert_eq!(
            id_from_str("192.0.2.1").to_string(),
            IdBuf::new(&Identity::Ipv4("192.0.2.1".parse().unwrap())).to_string()
        );
        assert_eq!(id_from_str("gw.example").body()[0], 2); // ID_FQDN
        assert_eq!(id_from_str("ops@example.com").body()[0], 3); // ID_RFC822_ADDR
        assert_eq!(id_from_str("2001:db8::1").body()[0], 5); // ID_IPV6_ADDR
    }
}
