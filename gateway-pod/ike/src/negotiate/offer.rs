//! What the initiator offers (SA payloads from the configured proposals, traffic selectors
//! from the configured subnets) and the checks that the responder's answer picked from it.
//!
//! The responder's choice is checked with the same selection functions the responder uses
//! ([`select_ike`], [`select_esp`], [`narrow`]), run against the one proposal of ours whose
//! number it echoed: if they select it, every transform of the answer is one we offered.

use std::net::{Ipv4Addr, Ipv6Addr};

use concentrator_algorithms::{DhGroup, Encryption, Esn, EspProposal, IkeProposal};
use ipnet::IpNet;

use super::{EspChoice, IkeChoice, narrow, select_esp, select_ike};
use crate::error::Error;
use crate::message::codepoints::{ProtocolId, TransformId, TransformType};
use crate::payload::{Proposal, Sa, TrafficSelector, Transform, TsRange};

fn encr_transform(e: Encryption) -> Transform<'static> {
    let id = TransformId(e.transform_id());
    match e.key_bits() {
        Some(bits) => Transform::with_key_length(TransformType::ENCR, id, bits),
        None => Transform::new(TransformType::ENCR, id),
    }
}

/// Proposal numbers start at 1 and go up by one (RFC 7296 §3.3.1: "The first Proposal MUST
/// have a Proposal Num of one (1)"). More than 255 proposals cannot be numbered; the rest
/// are not offered.
fn numbered<T>(proposals: &[T]) -> impl Iterator<Item = (u8, &T)> {
    (1..=u8::MAX).zip(proposals)
}

/// SAi1 of IKE_SA_INIT: one proposal per configured IKE proposal, in our order of
/// preference (RFC 7296 §2.7), with every transform of each. RFC 7296 §3.3.1, SPI Size: "For
/// an initial IKE SA negotiation, this field MUST be zero".
pub(crate) fn ike_sa(ours: &[IkeProposal]) -> Sa<'static> {
    let proposals = numbered(ours)
        .map(|(number, o)| {
            let mut transforms: Vec<Transform<'static>> =
                o.encryption.iter().map(|e| encr_transform(*e)).collect();
            transforms.extend(
                o.prf
                    .iter()
                    .map(|p| Transform::new(TransformType::PRF, TransformId(p.transform_id()))),
            );
            transforms.extend(
                o.integrity
                    .iter()
                    .map(|i| Transform::new(TransformType::INTEG, TransformId(i.transform_id()))),
            );
            transforms.extend(
                o.dh.iter()
                    .map(|g| Transform::new(TransformType::DH, TransformId(g.number()))),
            );
            Proposal {
                number,
                protocol: ProtocolId::IKE,
                spi: &[],
                transforms,
            }
        })
        .collect();
    Sa { proposals }
}

/// SAi2 of IKE_AUTH: one ESP proposal per configured one, each carrying our inbound SPI
/// (RFC 7296 §3.3.1: the SPI field holds "the sending entity's SPI"). No DH transforms:
/// RFC 7296 §1.2, "the SA payloads in the IKE_AUTH exchange cannot contain Transform Type 4
/// (Diffie-Hellman group) with any value other than NONE" (the PFS groups of a proposal are
/// for CREATE_CHILD_SA).
pub(crate) fn esp_sa<'a>(ours: &[EspProposal], spi: &'a [u8; 4]) -> Sa<'a> {
    let proposals = numbered(ours)
        .map(|(number, o)| {
            let mut transforms: Vec<Transform<'static>> =
                o.encryption.iter().map(|e| encr_transform(*e)).collect();
            transforms.extend(
                o.integrity
                    .iter()
                    .map(|i| Transform::new(TransformType::INTEG, TransformId(i.transform_id()))),
            );
            let esn: &[Esn] = if o.esn.is_empty() { &[Esn::No] } else { &o.esn };
            transforms.extend(esn.iter().map(|e| {
                let id = match e {
                    Esn::No => TransformId::ESN_NO,
                    Esn::Yes => TransformId::ESN_YES,
                };
                Transform::new(TransformType::ESN, id)
            }));
            Proposal {
                number,
                protocol: ProtocolId::ESP,
                spi: spi.as_slice(),
                transforms,
            }
        })
        .collect();
    Sa { proposals }
}

/// The whole of `subnet`, any protocol and port, as one selector.
pub(crate) fn selector(subnet: &IpNet) -> TrafficSelector<'static> {
    match subnet {
        IpNet::V4(n) => TrafficSelector::V4(TsRange::<Ipv4Addr> {
            ip_proto: 0,
            start_port: 0,
            end_port: u16::MAX,
            start: n.network(),
            end: n.broadcast(),
        }),
        IpNet::V6(n) => TrafficSelector::V6(TsRange::<Ipv6Addr> {
            ip_proto: 0,
            start_port: 0,
            end_port: u16::MAX,
            start: n.network(),
            end: n.broadcast(),
        }),
    }
}

/// The single proposal of a responder's SA payload, and which of ours it claims to be.
///
/// RFC 7296 §2.7: "the responder MUST choose a single suite, which may be any subset of the
/// SA proposal"; §3.3: the accepted proposal holds "one transform of each type", and its
/// Proposal Num is the one of the initiator's proposal it accepted (§3.3.1).
fn single<'p, 'a, T>(
    answer: &'p Sa<'a>,
    ours: &'p [T],
    protocol: ProtocolId,
) -> Result<(&'p Proposal<'a>, &'p T), Error> {
    let [p] = answer.proposals.as_slice() else {
        return Err(Error::InvalidResponse("SA payload without exactly one proposal"));
    };
    if p.protocol != protocol {
        return Err(Error::InvalidResponse("SA proposal for another protocol"));
    }
    for ty in [
        TransformType::ENCR,
        TransformType::PRF,
        TransformType::INTEG,
        TransformType::DH,
        TransformType::ESN,
    ] {
        if p.transforms.iter().filter(|t| t.transform_type == ty).count() > 1 {
            return Err(Error::InvalidResponse("more than one transform of a type"));
        }
    }
    let ours = usize::from(p.number)
        .checked_sub(1)
        .and_then(|i| ours.get(i))
        .ok_or(Error::InvalidResponse("proposal number we did not send"))?;
    Ok((p, ours))
}

/// Checks the responder's SAr1 against ours and returns what it chose. `group` is the group of
/// our KE payload: a responder selecting another one answers INVALID_KE_PAYLOAD instead (RFC
/// 7296 §1.2), so an SAr1 naming another group is not an answer to this request.
pub(crate) fn check_ike(answer: &Sa<'_>, ours: &[IkeProposal], group: DhGroup) -> Result<IkeChoice, Error> {
    let (p, o) = single(answer, ours, ProtocolId::IKE)?;
    if !p.spi.is_empty() {
        return Err(Error::InvalidResponse("SPI in the IKE_SA_INIT proposal"));
    }
    let choice = select_ike(answer, std::slice::from_ref(o), group.number())
        .map_err(|_| Error::InvalidResponse("IKE proposal we did not offer"))?;
    if choice.dh != group {
        return Err(Error::InvalidResponse("DH group other than our KE payload's"));
    }
    Ok(choice)
}

/// Checks the responder's SAr2 against ours and returns what it chose, with its SPI (our
/// outbound SPI).
pub(crate) fn check_esp(answer: &Sa<'_>, ours: &[EspProposal]) -> Result<EspChoice, Error> {
    let (_, o) = single(answer, ours, ProtocolId::ESP)?;
    select_esp(answer, std::slice::from_ref(o))
        .map_err(|_| Error::InvalidResponse("ESP proposal we did not offer"))
}

/// Checks a traffic selector payload of the response against the subnet we proposed: RFC
/// 7296 §2.9, the responder "is allowed to narrow the choices by selecting a subset of the
/// traffic", never to widen them. Each selector must lie inside `subnet`; there must be one.
pub(crate) fn check_ts(
    answer: &[TrafficSelector<'_>],
    subnet: &IpNet,
) -> Result<Vec<TrafficSelector<'static>>, Error> {
    let out = answer
        .iter()
        .map(|ts| {
            let inside = narrow(std::slice::from_ref(ts), subnet)
                .is_ok_and(|v| v.len() == 1 && v.first().is_some_and(|n| n == ts));
            match ts {
                TrafficSelector::V4(r) if inside => Ok(TrafficSelector::V4(*r)),
                TrafficSelector::V6(r) if inside => Ok(TrafficSelector::V6(*r)),
                _ => Err(Error::InvalidResponse(
                    "traffic selector outside what we proposed",
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if out.is_empty() {
        return Err(Error::InvalidResponse("no traffic selector"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use concentrator_algorithms::{Integrity, Prf, parse_esp, parse_ike};

    use super::*;
    use crate::Message;
    use crate::payload::Payload;

    fn ours() -> Vec<IkeProposal> {
        vec![
            parse_ike("p", "aes128gcm16-prfsha256-x25519").unwrap(),
            parse_ike("p", "aes256-sha256-modp2048").unwrap(),
        ]
    }

    #[test]
    fn offers_every_proposal_and_survives_a_round_trip() {
        let sa = ike_sa(&ours());
        assert_eq!(sa.proposals.len(), 2);
        assert_eq!(sa.proposals[1].number, 2);
        let mut body = Vec::new();
        sa.encode(&mut body);
        assert_eq!(Sa::decode(&body), Ok(sa.clone()));
        // Our own offer, as a responder with our proposals would read it.
        let c = select_ike(&sa, &ours()[1..], 14).unwrap();
        assert_eq!(
            (c.number, c.encryption, c.integrity, c.prf, c.dh),
            (
                2,
                Encryption::AesCbc { key_bits: 256 },
                Some(Integrity::HmacSha256_128),
                Prf::HmacSha256,
                DhGroup::Modp2048
            )
        );
        let esp = esp_sa(&[parse_esp("e", "aes128gcm16").unwrap()], &[1, 2, 3, 4]);
        let types: Vec<_> = esp.proposals[0]
            .transforms
            .iter()
            .map(|t| t.transform_type)
            .collect();
        assert_eq!(types, [TransformType::ENCR, TransformType::ESN]);
    }

    #[test]
    fn accepts_the_responders_choice_of_our_second_proposal() {
        let c = IkeChoice {
            number: 2,
            encryption: Encryption::AesCbc { key_bits: 256 },
            integrity: Some(Integrity::HmacSha256_128),
            prf: Prf::HmacSha256,
            dh: DhGroup::Modp2048,
        };
        assert_eq!(check_ike(&c.to_sa(), &ours(), DhGroup::Modp2048), Ok(c));
    }

    #[test]
    fn rejects_choices_we_did_not_offer() {
        let mut c = IkeChoice {
            number: 1,
            encryption: Encryption::AesCbc { key_bits: 256 },
            integrity: Some(Integrity::HmacSha256_128),
            prf: Prf::HmacSha256,
            dh: DhGroup::Modp2048,
        };
        // Proposal 1 is AES-GCM with X25519: a CBC suite under its number was not offered.
        assert!(check_ike(&c.to_sa(), &ours(), DhGroup::Modp2048).is_err());
        c.number = 3;
        assert_eq!(
            check_ike(&c.to_sa(), &ours(), DhGroup::Modp2048),
            Err(Error::InvalidResponse("proposal number we did not send"))
        );
        c.number = 2;
        // Our KE was for X25519: an SA naming MODP-2048 does not answer it.
        assert_eq!(
            check_ike(&c.to_sa(), &ours(), DhGroup::Curve25519),
            Err(Error::InvalidResponse("DH group other than our KE payload's"))
        );
        // Two proposals, or two transforms of a type, are not a choice.
        let mut two = c.to_sa();
        two.proposals.push(two.proposals[0].clone());
        assert!(check_ike(&two, &ours(), DhGroup::Modp2048).is_err());
        let mut doubled = c.to_sa();
        let t = doubled.proposals[0].transforms[0].clone();
        doubled.proposals[0].transforms.push(t);
        assert_eq!(
            check_ike(&doubled, &ours(), DhGroup::Modp2048),
            Err(Error::InvalidResponse("more than one transform of a type"))
        );
    }

    #[test]
    fn accepts_narrowed_selectors_and_rejects_wider_ones() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        let inside = selector(&"10.1.2.0/24".parse().unwrap());
        assert_eq!(check_ts(&[inside], &net), Ok(vec![inside]));
        let wider = selector(&"10.0.0.0/8".parse().unwrap());
        assert!(check_ts(&[wider], &net).is_err());
        assert!(check_ts(&[], &net).is_err());
        let v6 = selector(&"2001:db8::/64".parse().unwrap());
        assert!(check_ts(&[inside, v6], &net).is_err());
    }

    #[test]
    fn checks_an_esp_choice_and_takes_the_responders_spi() {
        let ours = [parse_esp("e", "aes256-sha256").unwrap()];
        let offer = esp_sa(&ours, &[0, 0, 1, 0]);
        let c = select_esp(&offer, &ours).unwrap();
        let answer = c.to_sa(&[0xc1, 0, 0, 9]);
        let got = check_esp(&answer, &ours).unwrap();
        assert_eq!(got.peer_spi, 0xc100_0009);
        // The answer as the wire carries it.
        let msg = Message {
            header: crate::Header {
                spi_i: 1,
                spi_r: 2,
                next_payload: crate::PayloadType::NONE,
                exchange: crate::ExchangeType::IKE_AUTH,
                flags: crate::Flags::RESPONSE,
                message_id: 1,
                length: 0,
            },
            payloads: vec![Payload::Sa(answer)],
        }
        .to_vec();
        let Payload::Sa(decoded) = &Message::decode(&msg).unwrap().payloads[0] else {
            panic!("no SA");
        };
        assert_eq!(check_esp(decoded, &ours), Ok(got));
    }
}
