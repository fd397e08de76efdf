//! Proposal selection (RFC 7296 §2.7, §3.3.6) and traffic selector narrowing (§2.9) for the
//! responder: the peer's SA / TS payloads against an eroute's configured proposals and subnets.

pub(crate) mod offer;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use concentrator_algorithms::{DhGroup, Encryption, Esn, EspProposal, IkeProposal, Integrity, Prf};
use ipnet::IpNet;

use crate::message::codepoints::{AttributeType, ProtocolId, TransformId, TransformType};
use crate::payload::{AttributeValue, Proposal, Sa, TrafficSelector, Transform, TsRange};

pub use crate::error::NegotiationError;

/// The IKE SA transforms chosen from the initiator's SA payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IkeChoice {
    /// The initiator's proposal number, echoed in the response.
    pub number: u8,
    /// Encryption.
    pub encryption: Encryption,
    /// Integrity; `None` with an AEAD cipher.
    pub integrity: Option<Integrity>,
    /// PRF.
    pub prf: Prf,
    /// Diffie-Hellman group.
    pub dh: DhGroup,
}

/// The ESP transforms chosen for a CHILD SA, with the initiator's inbound SPI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EspChoice {
    /// The initiator's proposal number, echoed in the response.
    pub number: u8,
    /// The initiator's SPI from that proposal: the SPI of our outbound SA.
    pub peer_spi: u32,
    /// Encryption.
    pub encryption: Encryption,
    /// Integrity; `None` with an AEAD cipher.
    pub integrity: Option<Integrity>,
    /// Extended sequence numbers.
    pub esn: Esn,
}

fn key_bits(t: &Transform<'_>) -> Result<Option<u16>, ()> {
    // RFC 7296 §3.3.6: "If the responder receives a transform with an attribute it doesn't
    // understand, it MUST reject that transform". Key Length is the only one we know.
    let mut bits = None;
    for a in &t.attributes {
        match (a.attribute_type, a.value) {
            (AttributeType::KEY_LENGTH, AttributeValue::Tv(b)) if bits.is_none() => bits = Some(b),
            _ => return Err(()),
        }
    }
    Ok(bits)
}

/// The configured-algorithm view of a wire transform, or `None` if we do not implement it.
fn encryption(t: &Transform<'_>) -> Option<Encryption> {
    let bits = key_bits(t).ok()?;
    match (t.id, bits) {
        (TransformId::ENCR_AES_CBC, Some(key_bits)) => Some(Encryption::AesCbc { key_bits }),
        (TransformId::ENCR_AES_GCM_16, Some(key_bits)) => Some(Encryption::AesGcm16 { key_bits }),
        (TransformId::ENCR_CHACHA20_POLY1305, None) => Some(Encryption::ChaCha20Poly1305),
        _ => None,
    }
}

fn plain_id(t: &Transform<'_>) -> Option<u16> {
    t.attributes.is_empty().then_some(t.id.0)
}

fn integrity(t: &Transform<'_>) -> Option<Integrity> {
    [
        Integrity::HmacSha256_128,
        Integrity::HmacSha384_192,
        Integrity::HmacSha512_256,
    ]
    .into_iter()
    .find(|i| Some(i.transform_id()) == plain_id(t))
}

fn prf(t: &Transform<'_>) -> Option<Prf> {
    [Prf::HmacSha256, Prf::HmacSha384, Prf::HmacSha512]
        .into_iter()
        .find(|p| Some(p.transform_id()) == plain_id(t))
}

/// The configured group for an IANA group number.
pub fn dh_group(number: u16) -> Option<DhGroup> {
    [
        DhGroup::Modp2048,
        DhGroup::Modp3072,
        DhGroup::Ecp256,
        DhGroup::Ecp384,
        DhGroup::Curve25519,
    ]
    .into_iter()
    .find(|g| g.number() == number)
}

fn esn(t: &Transform<'_>) -> Option<Esn> {
    match plain_id(t)? {
        0 => Some(Esn::No),
        1 => Some(Esn::Yes),
        _ => None,
    }
}

/// The first transform of `ty` in the peer's order that `parse` maps into `ours`.
fn pick<T: PartialEq + Copy>(
    p: &Proposal<'_>,
    ty: TransformType,
    parse: impl Fn(&Transform<'_>) -> Option<T>,
    ours: &[T],
) -> Option<T> {
    p.transforms
        .iter()
        .filter(|t| t.transform_type == ty)
        .filter_map(parse)
        .find(|v| ours.contains(v))
}

fn offers(p: &Proposal<'_>, ty: TransformType) -> bool {
    p.transforms.iter().any(|t| t.transform_type == ty)
}

/// Integrity for `encr`: none for an AEAD (RFC 5282 §8: AEAD proposals carry no integrity
/// transform, or only NONE), else the first acceptable one.
fn pick_integrity(p: &Proposal<'_>, encr: Encryption, ours: &[Integrity]) -> Option<Option<Integrity>> {
    if encr.is_aead() {
        let only_none = p
            .transforms
            .iter()
            .filter(|t| t.transform_type == TransformType::INTEG)
            .all(|t| t.id.0 == 0);
        only_none.then_some(None)
    } else {
        pick(p, TransformType::INTEG, integrity, ours).map(Some)
    }
}

/// Selects the IKE SA proposal: the first of the initiator's proposals (its preference order,
/// RFC 7296 §2.7) that one of `ours` accepts whole. Within it, each transform type takes the
/// initiator's first acceptable transform, except that the DH group of the initiator's KE
/// payload (`ke_group`) is taken when acceptable, so that a guessed group is not rejected
/// needlessly: `ours` may hold the proposals of several eroutes, and one that takes the
/// initiator's proposal with the KE group as sent is preferred to one that would answer
/// INVALID_KE_PAYLOAD.
pub fn select_ike(
    offered: &Sa<'_>,
    ours: &[IkeProposal],
    ke_group: u16,
) -> Result<IkeChoice, NegotiationError> {
    for p in offered.proposals.iter().filter(|p| p.protocol == ProtocolId::IKE) {
        // RFC 7296 §3.3.1: "For an initial IKE SA negotiation, this field MUST be zero".
        if !p.spi.is_empty() {
            continue;
        }
        // One pass: the first choice that takes the KE group as sent wins at once; else the
        // first choice at all.
        let mut first = None;
        for c in ours.iter().filter_map(|o| choose_ike(p, o, ke_group)) {
            if c.dh.number() == ke_group {
                return Ok(c);
            }
            first.get_or_insert(c);
        }
        if let Some(c) = first {
            return Ok(c);
        }
    }
    Err(NegotiationError::NoProposalChosen)
}

/// What `o` takes of the initiator's proposal `p`, if it takes it whole.
fn choose_ike(p: &Proposal<'_>, o: &IkeProposal, ke_group: u16) -> Option<IkeChoice> {
    let encryption = pick(p, TransformType::ENCR, encryption, &o.encryption)?;
    let integrity = pick_integrity(p, encryption, &o.integrity)?;
    let prf = pick(p, TransformType::PRF, prf, &o.prf)?;
    let ke = dh_group(ke_group).filter(|g| {
        o.dh.contains(g)
            && p.transforms
                .iter()
                .any(|t| t.transform_type == TransformType::DH && t.id.0 == ke_group)
    });
    let dh = ke.or_else(|| pick(p, TransformType::DH, |t| dh_group(plain_id(t)?), &o.dh))?;
    Some(IkeChoice {
        number: p.number,
        encryption,
        integrity,
        prf,
        dh,
    })
}

/// Selects the ESP proposal of an IKE_AUTH request (first acceptable in the initiator's
/// order). RFC 7296 §1.2: "the SA payloads in the IKE_AUTH exchange cannot contain Transform
/// Type 4 (Diffie-Hellman group) with any value other than NONE", so a proposal whose only DH
/// transforms are NONE (or absent) is accepted without PFS and one with a real group is not.
pub fn select_esp(offered: &Sa<'_>, ours: &[EspProposal]) -> Result<EspChoice, NegotiationError> {
    for p in offered.proposals.iter().filter(|p| p.protocol == ProtocolId::ESP) {
        let Ok(spi) = <[u8; 4]>::try_from(p.spi) else {
            continue;
        };
        let dh_none = p.dh_ids().all(|g| g == 0);
        if !dh_none {
            continue;
        }
        for o in ours {
            let Some(encryption) = pick(p, TransformType::ENCR, encryption, &o.encryption) else {
                continue;
            };
            let Some(integrity) = pick_integrity(p, encryption, &o.integrity) else {
                continue;
            };
            // An ESP proposal without an ESN transform means "no ESN".
            let esn = if offers(p, TransformType::ESN) {
                match pick(p, TransformType::ESN, esn, &o.esn) {
                    Some(e) => e,
                    None => continue,
                }
            } else if o.esn.contains(&Esn::No) {
                Esn::No
            } else {
                continue;
            };
            return Ok(EspChoice {
                number: p.number,
                peer_spi: u32::from_be_bytes(spi),
                encryption,
                integrity,
                esn,
            });
        }
    }
    Err(NegotiationError::NoProposalChosen)
}

fn encr_transform(e: Encryption) -> Transform<'static> {
    let id = TransformId(e.transform_id());
    match e.key_bits() {
        Some(bits) => Transform::with_key_length(TransformType::ENCR, id, bits),
        None => Transform::new(TransformType::ENCR, id),
    }
}

impl IkeChoice {
    /// Whether one of `ours` accepts this choice whole. A responder serving several eroutes
    /// chooses in IKE_SA_INIT from the proposals of all of them, before the peer's identity
    /// selects one; this is the check, in IKE_AUTH, that the selected eroute allows it.
    pub fn allowed_by(&self, ours: &[IkeProposal]) -> bool {
        ours.iter().any(|o| {
            o.encryption.contains(&self.encryption)
                && self.integrity.is_none_or(|i| o.integrity.contains(&i))
                && o.prf.contains(&self.prf)
                && o.dh.contains(&self.dh)
        })
    }

    /// The single-proposal SA payload of the IKE_SA_INIT response (RFC 7296 §2.7: "The
    /// responder MUST choose a single suite"), under the initiator's proposal number.
    pub fn to_sa(&self) -> Sa<'static> {
        let mut transforms = vec![encr_transform(self.encryption)];
        transforms.push(Transform::new(
            TransformType::PRF,
            TransformId(self.prf.transform_id()),
        ));
        if let Some(i) = self.integrity {
            transforms.push(Transform::new(
                TransformType::INTEG,
                TransformId(i.transform_id()),
            ));
        }
        transforms.push(Transform::new(TransformType::DH, TransformId(self.dh.number())));
        Sa {
            proposals: vec![Proposal {
                number: self.number,
                protocol: ProtocolId::IKE,
                spi: &[],
                transforms,
            }],
        }
    }
}

impl EspChoice {
    /// The single-proposal SA payload of the IKE_AUTH response: the initiator's proposal
    /// number and *our* inbound SPI (RFC 7296 §3.3.1: the SPI field holds "the sending
    /// entity's SPI").
    pub fn to_sa<'a>(&self, our_spi: &'a [u8; 4]) -> Sa<'a> {
        let mut transforms = vec![encr_transform(self.encryption)];
        if let Some(i) = self.integrity {
            transforms.push(Transform::new(
                TransformType::INTEG,
                TransformId(i.transform_id()),
            ));
        }
        let esn = match self.esn {
            Esn::No => TransformId::ESN_NO,
            Esn::Yes => TransformId::ESN_YES,
        };
        transforms.push(Transform::new(TransformType::ESN, esn));
        Sa {
            proposals: vec![Proposal {
                number: self.number,
                protocol: ProtocolId::ESP,
                spi: our_spi,
                transforms,
            }],
        }
    }
}

fn v4_bounds(net: &IpNet) -> Option<(Ipv4Addr, Ipv4Addr)> {
    match net {
        IpNet::V4(n) => Some((n.network(), n.broadcast())),
        IpNet::V6(_) => None,
    }
}

fn v6_bounds(net: &IpNet) -> Option<(Ipv6Addr, Ipv6Addr)> {
    match net {
        IpNet::V6(n) => Some((n.network(), n.broadcast())),
        IpNet::V4(_) => None,
    }
}

fn intersect<A: Ord + Copy>(r: &TsRange<A>, (lo, hi): (A, A)) -> Option<TsRange<A>> {
    let start = r.start.max(lo);
    let end = r.end.min(hi);
    (start <= end && r.start_port <= r.end_port).then_some(TsRange { start, end, ..*r })
}

/// Narrows the peer's traffic selectors to `subnet` (RFC 7296 §2.9: "the responder is
/// allowed to narrow the choices by selecting a subset of the traffic"): each selector is
/// intersected with the subnet, keeping its protocol and ports; empty intersections and
/// selector types we do not know are dropped. No selector left: TS_UNACCEPTABLE.
pub fn narrow(
    peer: &[TrafficSelector<'_>],
    subnet: &IpNet,
) -> Result<Vec<TrafficSelector<'static>>, NegotiationError> {
    let out: Vec<TrafficSelector<'static>> = peer
        .iter()
        .filter_map(|ts| match ts {
            TrafficSelector::V4(r) => intersect(r, v4_bounds(subnet)?).map(TrafficSelector::V4),
            TrafficSelector::V6(r) => intersect(r, v6_bounds(subnet)?).map(TrafficSelector::V6),
            TrafficSelector::Other { .. } => None,
        })
        .collect();
    if out.is_empty() {
        return Err(NegotiationError::TsUnacceptable);
    }
    Ok(out)
}

/// The address range of a selector, for display and for the data plane.
pub fn ts_bounds(ts: &TrafficSelector<'_>) -> Option<(IpAddr, IpAddr)> {
    match ts {
        TrafficSelector::V4(r) => Some((r.start.into(), r.end.into())),
        TrafficSelector::V6(r) => Some((r.start.into(), r.end.into())),
        TrafficSelector::Other { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use concentrator_algorithms::{parse_esp, parse_ike};

    use super::*;
    use crate::Message;
    use crate::payload::Payload;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn offered_ike(bytes: &[u8]) -> Sa<'_> {
        let msg = Message::decode(bytes).unwrap();
        msg.payloads
            .into_iter()
            .find_map(|p| match p {
                Payload::Sa(sa) => Some(sa),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn selects_strongswan_default_proposal_and_echoes_it() {
        let bytes = hex(include_str!(
            "../../tests/vectors/strongswan-ike-sa-init-request.hex"
        ));
        let sa = offered_ike(&bytes);
        let ours = [parse_ike("p", "aes128gcm16-prfsha256-x25519").unwrap()];
        let c = select_ike(&sa, &ours, 31).unwrap();
        assert_eq!(c.encryption, Encryption::AesGcm16 { key_bits: 128 });
        assert_eq!(c.prf, Prf::HmacSha256);
        assert_eq!(c.integrity, None);
        assert_eq!(c.dh, DhGroup::Curve25519);
        let back = c.to_sa();
        assert_eq!(back.proposals.len(), 1);
        assert_eq!(back.proposals[0].number, sa.proposals[0].number);
    }

    #[test]
    fn rejects_unacceptable_ike_proposal() {
        let bytes = hex(include_str!(
            "../../tests/vectors/strongswan-ike-sa-init-request.hex"
        ));
        let sa = offered_ike(&bytes);
        let ours = [parse_ike("p", "aes256-sha512-modp3072").unwrap()];
        assert_eq!(
            select_ike(&sa, &ours, 31),
            Err(NegotiationError::NoProposalChosen)
        );
    }

    fn proposal(
        protocol: ProtocolId,
        spi: &'static [u8],
        transforms: Vec<Transform<'static>>,
    ) -> Sa<'static> {
        Sa {
            proposals: vec![Proposal {
                number: 1,
                protocol,
                spi,
                transforms,
            }],
        }
    }

    #[test]
    fn prefers_the_ke_group_and_falls_back_to_the_first_acceptable() {
        let sa = proposal(
            ProtocolId::IKE,
            &[],
            vec![
                Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 256),
                Transform::new(TransformType::PRF, TransformId::PRF_HMAC_SHA2_384),
                Transform::new(TransformType::DH, TransformId(19)),
                Transform::new(TransformType::DH, TransformId(20)),
            ],
        );
        let ours = [parse_ike("p", "aes256gcm16-prfsha384-ecp256-ecp384").unwrap()];
        assert_eq!(select_ike(&sa, &ours, 20).unwrap().dh, DhGroup::Ecp384);
        assert_eq!(select_ike(&sa, &ours, 31).unwrap().dh, DhGroup::Ecp256);
    }

    #[test]
    fn chooses_across_eroutes_in_the_initiators_order_and_prefers_its_ke_group() {
        // The initiator prefers GCM with X25519 or MODP-2048 (KE sent for MODP-2048), then
        // CBC. Two eroutes: one takes the first proposal with X25519 only, the other with
        // MODP-2048; the one that takes the KE as sent wins, so no INVALID_KE round trip.
        let gcm = Proposal {
            number: 1,
            protocol: ProtocolId::IKE,
            spi: &[],
            transforms: vec![
                Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 128),
                Transform::new(TransformType::PRF, TransformId::PRF_HMAC_SHA2_256),
                Transform::new(TransformType::DH, TransformId(31)),
                Transform::new(TransformType::DH, TransformId(14)),
            ],
        };
        let cbc = Proposal {
            number: 2,
            protocol: ProtocolId::IKE,
            spi: &[],
            transforms: vec![
                Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_CBC, 256),
                Transform::new(TransformType::PRF, TransformId::PRF_HMAC_SHA2_256),
                Transform::new(TransformType::INTEG, TransformId::AUTH_HMAC_SHA2_256_128),
                Transform::new(TransformType::DH, TransformId(14)),
            ],
        };
        let sa = Sa {
            proposals: vec![gcm.clone(), cbc.clone()],
        };
        let x25519 = parse_ike("a", "aes128gcm16-prfsha256-x25519").unwrap();
        let modp = parse_ike("b", "aes128gcm16-prfsha256-modp2048").unwrap();
        let legacy = parse_ike("c", "aes256-sha256-modp2048").unwrap();
        let c = select_ike(&sa, &[legacy.clone(), x25519.clone(), modp.clone()], 14).unwrap();
        assert_eq!((c.number, c.dh), (1, DhGroup::Modp2048), "{c:?}");
        assert!(c.allowed_by(std::slice::from_ref(&modp)));
        assert!(!c.allowed_by(&[x25519.clone(), legacy.clone()]));
        // Only the X25519 eroute takes the first proposal: INVALID_KE names its group.
        let c = select_ike(&sa, &[legacy.clone(), x25519.clone()], 14).unwrap();
        assert_eq!((c.number, c.dh), (1, DhGroup::Curve25519));
        // Only the legacy eroute: the initiator's second proposal.
        let c = select_ike(&sa, std::slice::from_ref(&legacy), 14).unwrap();
        assert_eq!((c.number, c.integrity.is_some()), (2, true));
        assert!(c.allowed_by(&[legacy]) && !c.allowed_by(&[x25519, modp]));
    }

    #[test]
    fn rejects_transform_with_unknown_attribute_and_wrong_key_length() {
        let mut encr = Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 192);
        let sa = proposal(
            ProtocolId::ESP,
            &[1, 2, 3, 4],
            vec![
                encr.clone(),
                Transform::new(TransformType::ESN, TransformId::ESN_NO),
            ],
        );
        let ours = [parse_esp("p", "aes128gcm16").unwrap()];
        assert_eq!(select_esp(&sa, &ours), Err(NegotiationError::NoProposalChosen));
        encr.attributes[0].value = AttributeValue::Tv(128);
        encr.attributes.push(encr.attributes[0]);
        let sa = proposal(ProtocolId::ESP, &[1, 2, 3, 4], vec![encr]);
        assert_eq!(select_esp(&sa, &ours), Err(NegotiationError::NoProposalChosen));
    }

    #[test]
    fn selects_esp_with_peer_spi_and_rejects_pfs_group_in_ike_auth() {
        let sa = proposal(
            ProtocolId::ESP,
            &[0xc1, 0, 0, 7],
            vec![
                Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_CBC, 256),
                Transform::new(TransformType::INTEG, TransformId::AUTH_HMAC_SHA2_256_128),
                Transform::new(TransformType::ESN, TransformId::ESN_NO),
            ],
        );
        let ours = [parse_esp("p", "aes256-sha256").unwrap()];
        let c = select_esp(&sa, &ours).unwrap();
        assert_eq!(c.peer_spi, 0xc100_0007);
        assert_eq!(c.integrity, Some(Integrity::HmacSha256_128));
        let sa_back = c.to_sa(&[9, 9, 9, 9]);
        assert_eq!(sa_back.proposals[0].spi, &[9, 9, 9, 9]);
        assert_eq!(sa_back.proposals[0].transforms.len(), 3);

        let mut pfs = sa.clone();
        pfs.proposals[0]
            .transforms
            .push(Transform::new(TransformType::DH, TransformId(14)));
        assert_eq!(select_esp(&pfs, &ours), Err(NegotiationError::NoProposalChosen));
    }

    fn v4(a: [u8; 4], b: [u8; 4]) -> TrafficSelector<'static> {
        TrafficSelector::V4(TsRange {
            ip_proto: 0,
            start_port: 0,
            end_port: 65535,
            start: a.into(),
            end: b.into(),
        })
    }

    #[test]
    fn narrows_to_the_intersection() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        let wide = [v4([10, 0, 0, 0], [10, 255, 255, 255])];
        assert_eq!(
            narrow(&wide, &net),
            Ok(vec![v4([10, 1, 0, 0], [10, 1, 255, 255])])
        );
        let inside = [v4([10, 1, 2, 0], [10, 1, 2, 255])];
        assert_eq!(narrow(&inside, &net), Ok(inside.to_vec()));
    }

    #[test]
    fn rejects_disjoint_traffic_selectors() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        let other = [v4([10, 2, 0, 0], [10, 2, 0, 255])];
        assert_eq!(narrow(&other, &net), Err(NegotiationError::TsUnacceptable));
        let v6net: IpNet = "2001:db8::/32".parse().unwrap();
        assert_eq!(
            narrow(&[v4([10, 1, 0, 0], [10, 1, 0, 255])], &v6net),
            Err(NegotiationError::TsUnacceptable)
        );
    }
}
