//! CREATE_CHILD_SA requests of the peer (RFC 7296 §1.3): a new CHILD SA (§1.3.1), a CHILD SA
//! rekey (§1.3.3), either with optional PFS, and an IKE SA rekey (§1.3.2, §2.18).
//!
//! The proposal selection reuses [`crate::negotiate`]: CREATE_CHILD_SA differs from IKE_AUTH
//! and IKE_SA_INIT only in the DH transform of ESP proposals (PFS) and the SPI of IKE
//! proposals, so both are taken out of the offer before it goes through the same functions.

use std::time::{Duration, Instant};

use concentrator_algorithms::{DhGroup, EspProposal, IkeProposal};
use concentrator_crypto::keymat::rekey_skeyseed;
use concentrator_crypto::{ChildSaKeys, IkeSaKeys, Prf};
use ipnet::IpNet;

use super::session::IkeSa;
use super::{ChildRef, ChildSa, Entropy, NONCE_LEN, random_spi};
use crate::error::Error;
use crate::message::codepoints::{DhGroup as WireGroup, NotifyType, ProtocolId, TransformId, TransformType};
use crate::message::error::InvalidMessage;
use crate::negotiate::{EspChoice, IkeChoice, NegotiationError, dh_group, narrow, select_esp, select_ike};
use crate::payload::{Ke, Nonce, Notify, Payload, Proposal, Sa, Transform, Ts};

/// What the request is evaluated against: the role's proposals, subnets and CHILD SA
/// lifetime, and the IKE SA's state.
pub(crate) struct Context<'a> {
    pub(crate) ike_proposals: &'a [IkeProposal],
    pub(crate) esp_proposals: &'a [EspProposal],
    /// Our side: TSr is narrowed to it.
    pub(crate) local_subnet: IpNet,
    /// The peer's side: TSi is narrowed to it.
    pub(crate) remote_subnet: IpNet,
    pub(crate) child_lifetime: Duration,
    /// The IKE SA the request came on: its SK_d and PRF derive the new keys.
    pub(crate) sa: &'a IkeSa,
    /// The CHILD SAs a REKEY_SA notify may name.
    pub(crate) children: &'a [ChildRef],
    pub(crate) now: Instant,
    /// The request arrived on port 4500 or a NAT was detected: ESP goes in UDP.
    pub(crate) udp_encap: bool,
}

/// An accepted request: what to answer and what to install.
pub(crate) enum Created {
    /// A new or rekeyed CHILD SA.
    Child(Box<NewChild>),
    /// A new IKE SA replacing the one the request came on.
    Ike(Box<NewIkeSa>),
}

/// A negotiated CHILD SA and the values of our response.
pub(crate) struct NewChild {
    esp: EspChoice,
    dh: Option<DhGroup>,
    spi_in: [u8; 4],
    nr: Vec<u8>,
    /// The lower of the exchange's two nonces, for the simultaneous-rekey rule (RFC 7296
    /// §2.8.1).
    pub(crate) lowest_nonce: Vec<u8>,
    ke_r: Option<Vec<u8>>,
    /// The SA for the data plane (and the event).
    pub(crate) child: ChildSa,
}

impl NewChild {
    /// The response: "HDR, SK {SA, Nr, [KEr,] TSi, TSr}" (RFC 7296 §1.3.1). A request for
    /// transport mode is declined by not echoing USE_TRANSPORT_MODE (§1.3.1).
    pub(crate) fn payloads(&self) -> Vec<Payload<'_>> {
        let mut sa = self.esp.to_sa(&self.spi_in);
        if let Some(g) = self.dh {
            // The accepted proposal names the PFS group (RFC 7296 §3.3: the responder's SA
            // holds the one proposal it accepted, with one transform of each type).
            for p in &mut sa.proposals {
                let at = p
                    .transforms
                    .iter()
                    .position(|t| t.transform_type == TransformType::ESN)
                    .unwrap_or(p.transforms.len());
                p.transforms
                    .insert(at, Transform::new(TransformType::DH, TransformId(g.number())));
            }
        }
        let mut out = vec![Payload::Sa(sa), Payload::Nonce(Nonce { data: &self.nr })];
        if let (Some(g), Some(ke)) = (self.dh, &self.ke_r) {
            out.push(Payload::Ke(Ke {
                group: WireGroup(g.number()),
                data: ke,
            }));
        }
        out.push(Payload::TsI(Ts {
            selectors: self.child.ts_remote.clone(),
        }));
        out.push(Payload::TsR(Ts {
            selectors: self.child.ts_local.clone(),
        }));
        out
    }
}

impl NewChild {
    /// The SA for the data plane.
    pub(crate) fn into_child(self: Box<Self>) -> ChildSa {
        self.child
    }
}

/// A negotiated IKE SA rekey and the values of our response.
pub(crate) struct NewIkeSa {
    choice: IkeChoice,
    /// Our SPI of the new IKE SA, as sent in the SA payload.
    spi_r: [u8; 8],
    nr: Vec<u8>,
    ke_r: Vec<u8>,
    /// The new IKE SA.
    pub(crate) sa: IkeSa,
}

impl NewIkeSa {
    /// The response: "HDR, SK {SA, Nr, KEr}" (RFC 7296 §1.3.2), our new SPI in the proposal
    /// (§2.18: "New initiator and responder SPIs are supplied in the SPI fields in the
    /// Proposal structures inside the Security Association (SA) payloads").
    pub(crate) fn payloads(&self) -> Vec<Payload<'_>> {
        let proposals = self
            .choice
            .to_sa()
            .proposals
            .into_iter()
            .map(|p| Proposal {
                spi: &self.spi_r,
                ..p
            })
            .collect();
        vec![
            Payload::Sa(Sa { proposals }),
            Payload::Nonce(Nonce { data: &self.nr }),
            Payload::Ke(Ke {
                group: WireGroup(self.choice.dh.number()),
                data: &self.ke_r,
            }),
        ]
    }
}

impl NewIkeSa {
    /// The new IKE SA.
    pub(crate) fn into_sa(self: Box<Self>) -> IkeSa {
        self.sa
    }
}

/// The payloads of a CREATE_CHILD_SA request this responder uses.
#[derive(Default)]
struct Request<'p, 'a> {
    sa: Option<&'p Sa<'a>>,
    ni: Option<&'a [u8]>,
    ke: Option<Ke<'a>>,
    ts_i: Option<&'p Ts<'a>>,
    ts_r: Option<&'p Ts<'a>>,
    rekey: Option<Notify<'a>>,
}

impl<'p, 'a> Request<'p, 'a> {
    fn parse(inner: &'p [Payload<'a>]) -> Self {
        let mut r = Self::default();
        for p in inner {
            match p {
                Payload::Sa(s) => r.sa = Some(s),
                Payload::Nonce(n) => r.ni = Some(n.data),
                Payload::Ke(k) => r.ke = Some(*k),
                Payload::TsI(t) => r.ts_i = Some(t),
                Payload::TsR(t) => r.ts_r = Some(t),
                Payload::Notify(n) if n.notify_type == NotifyType::REKEY_SA => r.rekey = Some(*n),
                // USE_TRANSPORT_MODE (declined), ESP_TFC_PADDING_NOT_SUPPORTED,
                // NON_FIRST_FRAGMENTS_ALSO, vendor IDs: nothing to do.
                _ => {}
            }
        }
        r
    }
}

/// Whether a CREATE_CHILD_SA request rekeys the IKE SA (RFC 7296 §1.3.2: IKE proposals, no
/// REKEY_SA).
pub(crate) fn is_ike_rekey(inner: &[Payload<'_>]) -> bool {
    let req = Request::parse(inner);
    req.rekey.is_none()
        && req
            .sa
            .is_some_and(|sa| sa.proposals.iter().all(|p| p.protocol == ProtocolId::IKE))
}

/// Evaluates a CREATE_CHILD_SA request. An `Err` is answered with its notify
/// ([`Error::notify`]) and leaves the IKE SA as it was (RFC 7296 §2.21.3: a failed
/// CREATE_CHILD_SA does not affect the IKE SA).
pub(crate) fn process(
    cx: &Context<'_>,
    inner: &[Payload<'_>],
    entropy: &mut dyn Entropy,
) -> Result<Created, Error> {
    let req = Request::parse(inner);
    let sa = req.sa.ok_or(Error::MissingPayload("SA"))?;
    let ni = req.ni.ok_or(Error::MissingPayload("Ni"))?;
    // RFC 7296 §1.3.2: an IKE SA rekey is "HDR, SK {SA, Ni, KEi}" with IKE proposals; a
    // CHILD SA request carries ESP (or AH) proposals.
    let ike = req.rekey.is_none() && sa.proposals.iter().all(|p| p.protocol == ProtocolId::IKE);
    if ike {
        rekey_ike(cx, sa, ni, req.ke, entropy).map(|n| Created::Ike(Box::new(n)))
    } else {
        new_child(cx, &req, sa, ni, entropy).map(|n| Created::Child(Box::new(n)))
    }
}

fn new_child(
    cx: &Context<'_>,
    req: &Request<'_, '_>,
    sa: &Sa<'_>,
    ni: &[u8],
    entropy: &mut dyn Entropy,
) -> Result<NewChild, Error> {
    let replaces = match req.rekey {
        None => None,
        Some(n) => {
            let spi = <[u8; 4]>::try_from(n.spi)
                .map(u32::from_be_bytes)
                .map_err(|_| Error::MalformedInner(InvalidMessage::BadLength("REKEY_SA SPI")))?;
            // RFC 7296 §1.3.3: "The SA being rekeyed is identified by the SPI field in the
            // Notify payload; this is the SPI the exchange initiator would expect in inbound
            // ESP or AH packets", our outbound SPI. §2.25: "A CHILD_SA_NOT_FOUND notification
            // SHOULD be sent when a peer receives a request to rekey a Child SA that does not
            // exist."
            let old = cx
                .children
                .iter()
                .find(|c| n.protocol == ProtocolId::ESP && c.spi_out == spi)
                .ok_or(Error::ChildSaNotFound {
                    protocol: n.protocol,
                    spi,
                })?;
            Some(old.spi_in)
        }
    };
    let ke_group = req.ke.map(|k| k.group.0);
    let (esp, dh) = select_child(sa, cx.esp_proposals, ke_group)?;
    // RFC 7296 §1.3: "If the responder selects a proposal using a different Diffie-Hellman
    // group (other than NONE), the responder MUST reject the request and indicate its
    // preferred Diffie-Hellman group in the INVALID_KE_PAYLOAD Notify payload." A missing KE
    // payload with a PFS proposal is answered the same way (`got` 0).
    let peer_ke = match dh {
        None => None,
        Some(g) => {
            let ke = req
                .ke
                .filter(|k| k.group.0 == g.number())
                .ok_or(Error::InvalidKe {
                    got: ke_group.unwrap_or(0),
                    selected: g.number(),
                })?;
            Some((g, ke.data))
        }
    };
    let ts_i = req.ts_i.ok_or(Error::MissingPayload("TSi"))?;
    let ts_r = req.ts_r.ok_or(Error::MissingPayload("TSr"))?;
    let ts_remote = narrow(&ts_i.selectors, &cx.remote_subnet)?;
    let ts_local = narrow(&ts_r.selectors, &cx.local_subnet)?;

    let mut nr = vec![0u8; NONCE_LEN];
    entropy.fill(&mut nr)?;
    let spi_in = fresh_child_spi(entropy, cx.children, cx.sa.our_spi())?;
    let (ke_r, g_ir) = match peer_ke {
        None => (None, None),
        Some((g, data)) => {
            let kex = entropy.key_exchange(g)?;
            let shared = kex.compute_shared(data)?;
            (Some(kex.public_value()?), Some(shared))
        }
    };
    // RFC 7296 §2.17: "KEYMAT = prf+(SK_d, g^ir (new) | Ni | Nr)" with PFS, prf+(SK_d, Ni |
    // Nr) without; Ni and Nr are this exchange's nonces, and the peer initiated it, so the
    // initiator-to-responder keys protect our inbound SA.
    let keys = ChildSaKeys::derive(
        cx.sa.prf,
        cx.sa.sk_d(),
        g_ir.as_ref().map(|s| s.expose()),
        ni,
        &nr,
        esp.encryption,
        esp.integrity,
    )?;
    let child = ChildSa {
        spi_in: u32::from_be_bytes(spi_in),
        spi_out: esp.peer_spi,
        encryption: esp.encryption,
        integrity: esp.integrity,
        esn: esp.esn,
        inbound: keys.initiator,
        outbound: keys.responder,
        ts_local,
        ts_remote,
        lifetime: cx.child_lifetime,
        installed_at: cx.now,
        udp_encap: cx.udp_encap,
        replaces,
    };
    Ok(NewChild {
        esp,
        dh,
        spi_in,
        lowest_nonce: ni.min(nr.as_slice()).to_vec(),
        nr,
        ke_r,
        child,
    })
}

/// A random inbound SPI that no CHILD SA of this IKE SA uses (SPIs 1..=255 are reserved by
/// IANA, RFC 4303 §2.1).
fn fresh_child_spi(entropy: &mut dyn Entropy, children: &[ChildRef], near: u64) -> Result<[u8; 4], Error> {
    for _ in 0..16 {
        let spi = random_spi::<4>(entropy, 256, Some(near))?;
        if !children.iter().any(|c| c.spi_in == u32::from_be_bytes(spi)) {
            return Ok(spi);
        }
    }
    Err(Error::Crypto(concentrator_crypto::CryptoError::Internal))
}

/// A random IKE SPI other than the one being replaced (zero is invalid, RFC 7296 §3.1).
fn fresh_ike_spi(entropy: &mut dyn Entropy, old: u64, near: u64) -> Result<[u8; 8], Error> {
    for _ in 0..16 {
        let spi = random_spi::<8>(entropy, 1, Some(near))?;
        if u64::from_be_bytes(spi) != old {
            return Ok(spi);
        }
    }
    Err(Error::Crypto(concentrator_crypto::CryptoError::Internal))
}

/// Selects an ESP proposal of a CREATE_CHILD_SA request and its PFS group.
///
/// Each of the initiator's proposals (in its order, RFC 7296 §2.7) is matched against each of
/// ours without its DH transforms ([`select_esp`]); then, for one of ours without PFS groups
/// the offer must allow NONE (or name no group), and for one with PFS groups the offer must
/// name one of them: the KE payload's group when acceptable, so that a right guess is not
/// rejected, else the initiator's first acceptable one (which then costs an
/// INVALID_KE_PAYLOAD round trip).
fn select_child(
    offered: &Sa<'_>,
    ours: &[EspProposal],
    ke_group: Option<u16>,
) -> Result<(EspChoice, Option<DhGroup>), NegotiationError> {
    for p in offered.proposals.iter().filter(|p| p.protocol == ProtocolId::ESP) {
        let groups: Vec<u16> = p.dh_ids().collect();
        let without_dh = Sa {
            proposals: vec![p.without_dh()],
        };
        for o in ours {
            let Ok(esp) = select_esp(&without_dh, std::slice::from_ref(o)) else {
                continue;
            };
            let dh = if o.dh.is_empty() {
                if !groups.is_empty() && !groups.contains(&0) {
                    continue;
                }
                None
            } else {
                let acceptable = |g: u16| dh_group(g).filter(|d| o.dh.contains(d));
                let guessed = ke_group.filter(|g| groups.contains(g)).and_then(acceptable);
                match guessed.or_else(|| groups.iter().find_map(|&g| acceptable(g))) {
                    Some(g) => Some(g),
                    None => continue,
                }
            };
            return Ok((esp, dh));
        }
    }
    Err(NegotiationError::NoProposalChosen)
}

/// Selects the IKE proposal of an IKE SA rekey and returns it with the initiator's new SPI.
/// RFC 7296 §3.3.1, SPI Size: "For an initial IKE SA negotiation, this field MUST be zero;
/// the SPI is obtained from the outer header. During subsequent negotiations, it is equal to
/// the size, in octets, of the SPI of the corresponding protocol (8 for IKE, 4 for ESP and
/// AH)." Proposals with another SPI size (or a zero SPI) are skipped; the rest go through
/// [`select_ike`] with their SPI taken out. §2.18: "a responder MUST NOT accept" DH NONE,
/// which `select_ike` never selects.
fn select_ike_rekey(
    offered: &Sa<'_>,
    ours: &[IkeProposal],
    ke_group: u16,
) -> Result<(IkeChoice, u64), NegotiationError> {
    let spi_of = |p: &Proposal<'_>| {
        let spi = u64::from_be_bytes(<[u8; 8]>::try_from(p.spi).ok()?);
        (p.protocol == ProtocolId::IKE && spi != 0).then_some(spi)
    };
    let candidates = Sa {
        proposals: offered
            .proposals
            .iter()
            .filter(|p| spi_of(p).is_some())
            .map(|p| Proposal {
                spi: &[],
                ..p.clone()
            })
            .collect(),
    };
    let choice = select_ike(&candidates, ours, ke_group)?;
    // Proposal numbers of a decoded SA payload are strictly increasing, so the number
    // identifies the proposal.
    let spi = offered
        .proposals
        .iter()
        .filter(|p| p.number == choice.number)
        .find_map(spi_of)
        .ok_or(NegotiationError::NoProposalChosen)?;
    Ok((choice, spi))
}

fn rekey_ike(
    cx: &Context<'_>,
    offered: &Sa<'_>,
    ni: &[u8],
    ke: Option<Ke<'_>>,
    entropy: &mut dyn Entropy,
) -> Result<NewIkeSa, Error> {
    let ke_group = ke.map_or(0, |k| k.group.0);
    let (choice, spi_i) = select_ike_rekey(offered, cx.ike_proposals, ke_group)?;
    // RFC 7296 §2.18: "a successful exchange rekeying the IKE SA always includes the KEi/KEr
    // payloads"; a KE payload of another group gets INVALID_KE_PAYLOAD naming ours (§1.3).
    let ke = ke
        .filter(|k| k.group.0 == choice.dh.number())
        .ok_or(Error::InvalidKe {
            got: ke_group,
            selected: choice.dh.number(),
        })?;
    let kex = entropy.key_exchange(choice.dh)?;
    let g_ir = kex.compute_shared(ke.data)?;
    let mut nr = vec![0u8; NONCE_LEN];
    entropy.fill(&mut nr)?;
    let spi_r = fresh_ike_spi(entropy, cx.sa.spi_r, cx.sa.our_spi())?;
    // RFC 7296 §2.18: "SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)" with the old SA's
    // PRF, then the SK_* keys as in §2.14 "using SPIi, SPIr, Ni, and Nr from the new
    // exchange, and using the new IKE SA's PRF".
    let seed = rekey_skeyseed(cx.sa.prf, cx.sa.sk_d(), g_ir.expose(), ni, &nr);
    let prf = Prf::new(choice.prf);
    let keys = IkeSaKeys::derive(
        prf,
        seed.expose(),
        ni,
        &nr,
        &spi_i.to_be_bytes(),
        &spi_r,
        choice.encryption,
        choice.integrity,
    )?;
    let sa = IkeSa::new(
        spi_i,
        u64::from_be_bytes(spi_r),
        prf,
        choice.encryption,
        choice.integrity,
        keys,
        cx.sa.nat_detected,
    )?;
    Ok(NewIkeSa {
        choice,
        spi_r,
        nr,
        ke_r: kex.public_value()?,
        sa,
    })
}

#[cfg(test)]
mod tests {
    use concentrator_algorithms::{Encryption, Esn, parse_esp, parse_ike};

    use super::*;

    fn esp_offer(spi: &'static [u8], groups: &[u16]) -> Sa<'static> {
        let mut transforms = vec![
            Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 128),
            Transform::new(TransformType::ESN, TransformId::ESN_NO),
        ];
        transforms.extend(
            groups
                .iter()
                .map(|g| Transform::new(TransformType::DH, TransformId(*g))),
        );
        Sa {
            proposals: vec![Proposal {
                number: 1,
                protocol: ProtocolId::ESP,
                spi,
                transforms,
            }],
        }
    }

    #[test]
    fn selects_no_pfs_when_neither_side_wants_it() {
        let ours = [parse_esp("p", "aes128gcm16").unwrap()];
        let (esp, dh) = select_child(&esp_offer(&[0xc0, 0, 0, 9], &[]), &ours, None).unwrap();
        assert_eq!(
            (esp.peer_spi, esp.encryption, esp.esn, dh),
            (0xc000_0009, Encryption::AesGcm16 { key_bits: 128 }, Esn::No, None)
        );
        // NONE offered next to a group: no PFS either.
        let (_, dh) = select_child(&esp_offer(&[0, 0, 1, 0], &[31, 0]), &ours, Some(31)).unwrap();
        assert_eq!(dh, None);
    }

    #[test]
    fn rejects_pfs_only_offer_without_configured_group() {
        let ours = [parse_esp("p", "aes128gcm16").unwrap()];
        assert_eq!(
            select_child(&esp_offer(&[0, 0, 1, 0], &[31]), &ours, Some(31)).map(|(_, d)| d),
            Err(NegotiationError::NoProposalChosen)
        );
    }

    #[test]
    fn prefers_the_ke_group_for_pfs_and_falls_back_to_the_first_acceptable() {
        let ours = [parse_esp("p", "aes128gcm16-ecp256-x25519").unwrap()];
        let offer = esp_offer(&[0, 0, 1, 0], &[19, 31]);
        assert_eq!(
            select_child(&offer, &ours, Some(31)).unwrap().1,
            Some(DhGroup::Curve25519)
        );
        assert_eq!(
            select_child(&offer, &ours, Some(14)).unwrap().1,
            Some(DhGroup::Ecp256)
        );
        // PFS required by us, not offered: no proposal.
        assert_eq!(
            select_child(&esp_offer(&[0, 0, 1, 0], &[0]), &ours, None).map(|(_, d)| d),
            Err(NegotiationError::NoProposalChosen)
        );
    }

    fn ike_offer(spi: &'static [u8]) -> Sa<'static> {
        Sa {
            proposals: vec![Proposal {
                number: 1,
                protocol: ProtocolId::IKE,
                spi,
                transforms: vec![
                    Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 128),
                    Transform::new(TransformType::PRF, TransformId::PRF_HMAC_SHA2_256),
                    Transform::new(TransformType::DH, TransformId(31)),
                ],
            }],
        }
    }

    #[test]
    fn selects_ike_rekey_proposal_with_the_initiators_new_spi() {
        let ours = [parse_ike("p", "aes128gcm16-prfsha256-x25519").unwrap()];
        let (choice, spi) = select_ike_rekey(&ike_offer(&[1, 2, 3, 4, 5, 6, 7, 8]), &ours, 31).unwrap();
        assert_eq!(spi, 0x0102_0304_0506_0708);
        assert_eq!(choice.dh, DhGroup::Curve25519);
    }

    #[test]
    fn rejects_ike_rekey_proposal_without_an_eight_octet_spi() {
        let ours = [parse_ike("p", "aes128gcm16-prfsha256-x25519").unwrap()];
        for spi in [&[][..], &[1, 2, 3, 4], &[0; 8]] {
            let offer = Sa {
                proposals: vec![Proposal {
                    spi,
                    ..ike_offer(&[]).proposals[0].clone()
                }],
            };
            assert_eq!(
                select_ike_rekey(&offer, &ours, 31).map(|(_, s)| s),
                Err(NegotiationError::NoProposalChosen)
            );
        }
    }
}
