//! CHILD SA and IKE SA rekeys started by this side, in either role (RFC 7296 §1.3.3, §2.8): when to
//! start one ([`soft_deadline`]), the CREATE_CHILD_SA request ([`ChildRekey::start`],
//! [`ChildRekey::payloads`]), the checks on its response and the new CHILD SA
//! ([`ChildRekey::complete`]), and the simultaneous-rekey rule of §2.8.1
//! ([`ChildRekey::redundant`]).
//!
//! # When
//!
//! A CHILD SA is rekeyed at its soft lifetime: 90 % of its lifetime, ± 5 % of random jitter
//! (so between 85 % and 95 %), so that SAs installed together (after a restart, or both ends
//! with the same lifetime) do not all rekey in the same second; RFC 7296 §2.8: "the
//! rekeying [...] should be done with some randomness". The margin left before the
//! lifetime covers retransmissions of the rekey.
//!
//! # The exchange
//!
//! `HDR, SK {N(REKEY_SA), SA, Ni, [KEi,] TSi, TSr}` (§1.3.3), the REKEY_SA notify naming our
//! inbound SPI of the old SA ("the SPI the exchange initiator would expect in inbound ESP or
//! AH packets"), the SA payload offering every configured ESP proposal with our new inbound
//! SPI, and PFS when the first proposal names DH groups (a KE payload for its first group,
//! each proposal listing its groups). The responder's answer must pick from what we offered;
//! the keys are "KEYMAT = prf+(SK_d, g^ir (new) | Ni | Nr)" (§2.17), this side being the
//! exchange's initiator: the initiator-to-responder keys are our outbound ones.
//!
//! # IKE SA rekeys
//!
//! At the soft lifetime of the IKE SA (the same 85 % to 95 % of `ike_lifetime`),
//! `HDR, SK {SA, Ni, KEi}` (§1.3.2) with our new SPI in each proposal; the new IKE SA has us
//! as its initiator (§3.1: the I flag "changes to reflect who initiated the last rekey of
//! the IKE SA"), SKEYSEED from the old SK_d (§2.18), and inherits every CHILD SA; we then
//! delete the old IKE SA. A simultaneous IKE SA rekey of the peer (§2.8.2) is handled
//! safely rather than optimally: while ours is in flight the peer's is answered with
//! TEMPORARY_FAILURE (§2.25: "SHOULD be sent when a peer receives a request that cannot be
//! completed due to a temporary condition such as a rekeying operation"; §2.25.2 would
//! rather have both complete and the nonces decide), a refused rekey of ours is tried again
//! after a random 15 to 45 s ([`retry_at`]), and a peer's request on an SA we already
//! replaced is refused (NO_ADDITIONAL_SAS).

use std::time::{Duration, Instant};

use concentrator_algorithms::{DhGroup, EspProposal, IkeProposal};
use concentrator_crypto::keymat::rekey_skeyseed;
use concentrator_crypto::{ChildSaKeys, IkeSaKeys, KeyExchange, Prf, SecretBytes};
use ipnet::IpNet;

use super::session::{IkeSa, Session};
use super::snapshot::{InFlight, SnapshotError};
use super::{ChildRef, ChildSa, Entropy, NONCE_LEN, Retransmit, random_spi};
use crate::error::Error;
use crate::message::codepoints::{
    DhGroup as WireGroup, ExchangeType, NotifyType, ProtocolId, TransformId, TransformType,
};
use crate::negotiate::dh_group;
use crate::negotiate::offer;
use crate::payload::{Ke, Nonce, Notify, Payload, Proposal, Sa, Transform, Ts};

/// Share of the lifetime after which a CHILD SA is rekeyed, in per mille, before jitter.
const SOFT_PER_MILLE: u64 = 900;
/// Jitter around it, in per mille of the lifetime, either way.
const JITTER_PER_MILLE: u64 = 50;

/// When a CHILD SA installed at `now` with `lifetime` is rekeyed: after 85 % to 95 % of its
/// lifetime (see the module docs); `None` for a zero lifetime (no rekey).
pub(crate) fn soft_deadline(now: Instant, lifetime: Duration, entropy: &mut dyn Entropy) -> Option<Instant> {
    if lifetime.is_zero() {
        return None;
    }
    let mut r = [0u8; 2];
    // Without randomness the rekey still happens, at 90 %.
    let r = entropy.fill(&mut r).map_or(JITTER_PER_MILLE, |()| {
        u64::from(u16::from_be_bytes(r)) * 2 * JITTER_PER_MILLE / 65_535
    });
    let per_mille = SOFT_PER_MILLE - JITTER_PER_MILLE + r;
    let ms = lifetime.as_millis().saturating_mul(u128::from(per_mille)) / 1000;
    let soft = Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX));
    Some(super::deadline(now, soft))
}

/// A rekey of ours in flight.
pub(crate) struct ChildRekey {
    /// The CHILD SA being replaced.
    pub(crate) old: ChildRef,
    old_spi: [u8; 4],
    /// Our inbound SPI of the new SA.
    spi_in: [u8; 4],
    pub(crate) ni: Vec<u8>,
    kex: Option<KeyExchange>,
    ke_public: Vec<u8>,
    /// The peer rekeyed the same SA while ours was in flight (§2.8.1): the lowest nonce of
    /// its exchange and the `spi_in` of the SA it created.
    pub(crate) collision: Option<(Vec<u8>, u32)>,
}

/// The PFS group of a rekey: the first group of the first ESP proposal, if any.
fn pfs_group(esp: &[EspProposal]) -> Option<DhGroup> {
    esp.first().and_then(|p| p.dh.first()).copied()
}

impl ChildRekey {
    /// Prepares the rekey of `old`, with a fresh inbound SPI that no CHILD SA of `children`
    /// uses.
    pub(crate) fn start(
        old: ChildRef,
        esp: &[EspProposal],
        children: &[ChildRef],
        near: u64,
        entropy: &mut dyn Entropy,
    ) -> Result<Self, Error> {
        let mut spi_in = None;
        for _ in 0..16 {
            // SPIs 1..=255 are reserved by IANA (RFC 4303 §2.1).
            let spi = random_spi::<4>(entropy, 256, Some(near))?;
            if !children.iter().any(|c| c.spi_in == u32::from_be_bytes(spi)) {
                spi_in = Some(spi);
                break;
            }
        }
        let spi_in = spi_in.ok_or(Error::Crypto(concentrator_crypto::CryptoError::Internal))?;
        let mut ni = vec![0u8; NONCE_LEN];
        entropy.fill(&mut ni)?;
        let (kex, ke_public) = match pfs_group(esp) {
            Some(g) => {
                let kex = entropy.key_exchange(g)?;
                let public = kex.public_value()?;
                (Some(kex), public)
            }
            None => (None, Vec::new()),
        };
        Ok(Self {
            old,
            old_spi: old.spi_in.to_be_bytes(),
            spi_in,
            ni,
            kex,
            ke_public,
            collision: None,
        })
    }

    /// The request's payloads (see the module docs). TSi is `local`, TSr `remote`: this side
    /// starts the exchange.
    pub(crate) fn payloads(&self, esp: &[EspProposal], local: &IpNet, remote: &IpNet) -> Vec<Payload<'_>> {
        let mut sa = offer::esp_sa(esp, &self.spi_in);
        if self.kex.is_some() {
            // RFC 7296 §1.3.3: PFS groups travel as DH transforms of the ESP proposals.
            for (p, o) in sa.proposals.iter_mut().zip(esp) {
                let at = p
                    .transforms
                    .iter()
                    .position(|t| t.transform_type == TransformType::ESN)
                    .unwrap_or(p.transforms.len());
                for (n, g) in o.dh.iter().enumerate() {
                    p.transforms
                        .insert(at + n, Transform::new(TransformType::DH, TransformId(g.number())));
                }
            }
        }
        // RFC 7296 §1.3.3: "The SA being rekeyed is identified by the SPI field in the
        // Notify payload; this is the SPI the exchange initiator would expect in inbound ESP
        // or AH packets."
        let mut out = vec![
            Payload::Notify(Notify {
                protocol: ProtocolId::ESP,
                spi: &self.old_spi,
                notify_type: NotifyType::REKEY_SA,
                data: &[],
            }),
            Payload::Sa(sa),
            Payload::Nonce(Nonce { data: &self.ni }),
        ];
        if let Some(kex) = &self.kex {
            out.push(Payload::Ke(Ke {
                group: WireGroup(kex.group().number()),
                data: &self.ke_public,
            }));
        }
        out.push(Payload::TsI(Ts {
            selectors: vec![offer::selector(local)],
        }));
        out.push(Payload::TsR(Ts {
            selectors: vec![offer::selector(remote)],
        }));
        out
    }

    /// Checks the response and derives the new CHILD SA (replacing `self.old`), with the
    /// responder's nonce for the collision rule.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn complete(
        &self,
        inner: &[Payload<'_>],
        ike: &IkeSa,
        esp: &[EspProposal],
        local: &IpNet,
        remote: &IpNet,
        lifetime: Duration,
        now: Instant,
        udp_encap: bool,
    ) -> Result<(ChildSa, Vec<u8>), Error> {
        let Response {
            sa,
            nr,
            ke,
            ts_i,
            ts_r,
        } = Response::read(inner)?;
        let ts_i = ts_i.ok_or(Error::MissingPayload("TSi"))?;
        let ts_r = ts_r.ok_or(Error::MissingPayload("TSr"))?;
        // The accepted proposal names the PFS group, if any: checked apart, the rest as in
        // IKE_AUTH.
        let groups: Vec<u16> = sa
            .proposals
            .iter()
            .flat_map(Proposal::dh_ids)
            .filter(|&g| g != 0)
            .collect();
        let without_dh = Sa {
            proposals: sa.proposals.iter().map(Proposal::without_dh).collect(),
        };
        let choice = offer::check_esp(&without_dh, esp)?;
        let g_ir = match &self.kex {
            None if groups.is_empty() => None,
            None => return Err(Error::InvalidResponse("PFS group we did not offer")),
            Some(kex) => {
                // RFC 7296 §1.3: the responder that picks another group answers
                // INVALID_KE_PAYLOAD instead, so the answer must name ours.
                if groups.iter().any(|g| dh_group(*g) != Some(kex.group())) {
                    return Err(Error::InvalidResponse("PFS group other than our KE payload's"));
                }
                let ke = ke.ok_or(Error::MissingPayload("KEr"))?;
                if ke.group.0 != kex.group().number() {
                    return Err(Error::InvalidResponse("KE payload for another group"));
                }
                Some(kex.compute_shared(ke.data)?)
            }
        };
        let ts_local = offer::check_ts(&ts_i.selectors, local)?;
        let ts_remote = offer::check_ts(&ts_r.selectors, remote)?;
        // RFC 7296 §2.17: "KEYMAT = prf+(SK_d, g^ir (new) | Ni | Nr)", the initiator-to-
        // responder keys first: we started the exchange, so they are our outbound keys.
        let keys = ChildSaKeys::derive(
            ike.prf,
            ike.sk_d(),
            g_ir.as_ref().map(|s| s.expose()),
            &self.ni,
            nr,
            choice.encryption,
            choice.integrity,
        )?;
        let child = ChildSa {
            spi_in: u32::from_be_bytes(self.spi_in),
            spi_out: choice.peer_spi,
            encryption: choice.encryption,
            integrity: choice.integrity,
            esn: choice.esn,
            inbound: keys.responder,
            outbound: keys.initiator,
            ts_local,
            ts_remote,
            lifetime,
            installed_at: now,
            udp_encap,
            replaces: Some(self.old.spi_in),
        };
        Ok((child, nr.to_vec()))
    }

    /// RFC 7296 §2.8.1, after both rekeys of the same SA completed: "The SA created with the
    /// lowest of the four nonces used in the two exchanges is redundant and SHOULD be deleted
    /// by the endpoint that created it". Whether ours (its nonces `self.ni` and `nr`) is the
    /// redundant one; `false` without a collision.
    pub(crate) fn redundant(&self, nr: &[u8]) -> bool {
        let Some((theirs, _)) = &self.collision else {
            return false;
        };
        let ours = self.ni.as_slice().min(nr);
        ours < theirs.as_slice()
    }
}

/// What a request of ours in flight is, so that its response is understood.
pub(crate) enum Ours {
    /// A liveness check (or a DELETE): the answer only has to verify.
    Plain,
    /// A CHILD SA rekey.
    ChildRekey(Box<ChildRekey>),
    /// An IKE SA rekey.
    IkeRekey(Box<IkeRekey>),
}

/// The payloads of the response to one of our CREATE_CHILD_SA requests (the last of each
/// kind): the SA and Nr every answer carries, KEr and TSi/TSr as the rekey needs them.
struct Response<'p, 'a> {
    sa: &'p Sa<'a>,
    nr: &'a [u8],
    ke: Option<&'p Ke<'a>>,
    ts_i: Option<&'p Ts<'a>>,
    ts_r: Option<&'p Ts<'a>>,
}

impl<'p, 'a> Response<'p, 'a> {
    /// Reads the inner payloads of the response: its first error notify refuses the request,
    /// else SA and Nr must be there.
    fn read(inner: &'p [Payload<'a>]) -> Result<Self, Error> {
        let (mut sa, mut nr, mut ke, mut ts_i, mut ts_r, mut error) = (None, None, None, None, None, None);
        for p in inner {
            match p {
                Payload::Sa(x) => sa = Some(x),
                Payload::Nonce(n) => nr = Some(n.data),
                Payload::Ke(k) => ke = Some(k),
                Payload::TsI(t) => ts_i = Some(t),
                Payload::TsR(t) => ts_r = Some(t),
                Payload::Notify(n) if n.notify_type.is_error() => error = error.or(Some(n.notify_type)),
                _ => {}
            }
        }
        // RFC 7296 §2.21.3: a refused CREATE_CHILD_SA leaves the IKE SA as it was.
        if let Some(notify) = error {
            return Err(Error::Refused {
                exchange: ExchangeType::CREATE_CHILD_SA,
                notify,
            });
        }
        Ok(Self {
            sa: sa.ok_or(Error::MissingPayload("SA"))?,
            nr: nr.ok_or(Error::MissingPayload("Nr"))?,
            ke,
            ts_i,
            ts_r,
        })
    }
}

/// An IKE SA rekey of ours in flight (RFC 7296 §1.3.2): "HDR, SK {SA, Ni, KEi}", our new
/// SPI in every proposal (§2.18), a KE payload for the first group of our first proposal.
pub(crate) struct IkeRekey {
    spi_i: [u8; 8],
    ni: Vec<u8>,
    kex: KeyExchange,
    ke_public: Vec<u8>,
}

impl IkeRekey {
    /// Prepares the rekey of the IKE SA whose SPIs are `old` (the new SPI differs from both;
    /// `near`: our SPI of it, see [`Entropy::spi`]).
    pub(crate) fn start(
        ours: &[IkeProposal],
        old: (u64, u64),
        near: u64,
        entropy: &mut dyn Entropy,
    ) -> Result<Self, Error> {
        let group = ours
            .first()
            .and_then(|p| p.dh.first())
            .copied()
            .ok_or(Error::Config("no IKE proposal with a DH group"))?;
        let mut spi_i = None;
        for _ in 0..16 {
            // RFC 7296 §3.1: an SPI is never zero.
            let spi = random_spi::<8>(entropy, 1, Some(near))?;
            let v = u64::from_be_bytes(spi);
            if v != old.0 && v != old.1 {
                spi_i = Some(spi);
                break;
            }
        }
        let spi_i = spi_i.ok_or(Error::Crypto(concentrator_crypto::CryptoError::Internal))?;
        let mut ni = vec![0u8; NONCE_LEN];
        entropy.fill(&mut ni)?;
        let kex = entropy.key_exchange(group)?;
        let ke_public = kex.public_value()?;
        Ok(Self {
            spi_i,
            ni,
            kex,
            ke_public,
        })
    }

    /// The request's payloads.
    pub(crate) fn payloads(&self, ours: &[IkeProposal]) -> Vec<Payload<'_>> {
        let mut sa = offer::ike_sa(ours);
        // RFC 7296 §3.3.1: during a rekey the SPI Size is 8 and the SPI the sender's new one.
        for p in &mut sa.proposals {
            p.spi = &self.spi_i;
        }
        vec![
            Payload::Sa(sa),
            Payload::Nonce(Nonce { data: &self.ni }),
            Payload::Ke(Ke {
                group: WireGroup(self.kex.group().number()),
                data: &self.ke_public,
            }),
        ]
    }

    /// Checks the response ("HDR, SK {SA, Nr, KEr}") and derives the new IKE SA, of which
    /// this side is the initiator (RFC 7296 §2.18).
    pub(crate) fn complete(
        &self,
        inner: &[Payload<'_>],
        old: &IkeSa,
        ours: &[IkeProposal],
    ) -> Result<IkeSa, Error> {
        let Response { sa, nr, ke, .. } = Response::read(inner)?;
        let ke = ke.ok_or(Error::MissingPayload("KEr"))?;
        // §2.18: the responder's new SPI is in its proposal; an SPI of other than 8 octets,
        // or zero, is no answer.
        let spi_r = sa
            .proposals
            .first()
            .and_then(|p| <[u8; 8]>::try_from(p.spi).ok())
            .filter(|s| u64::from_be_bytes(*s) != 0)
            .ok_or(Error::InvalidResponse(
                "IKE rekey proposal without an 8-octet SPI",
            ))?;
        let without_spi = Sa {
            proposals: sa
                .proposals
                .iter()
                .map(|p| Proposal {
                    spi: &[],
                    ..p.clone()
                })
                .collect(),
        };
        let choice = offer::check_ike(&without_spi, ours, self.kex.group())?;
        if ke.group.0 != choice.dh.number() {
            return Err(Error::InvalidResponse(
                "KE payload for another group than the SA's",
            ));
        }
        let g_ir = self.kex.compute_shared(ke.data)?;
        // RFC 7296 §2.18: "SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)" with the old
        // SA's PRF, then the SK_* keys as in §2.14 with the new SPIs, nonces and PRF.
        let seed = rekey_skeyseed(old.prf, old.sk_d(), g_ir.expose(), &self.ni, nr);
        let prf = Prf::new(choice.prf);
        let keys = IkeSaKeys::derive(
            prf,
            seed.expose(),
            &self.ni,
            nr,
            &self.spi_i,
            &spi_r,
            choice.encryption,
            choice.integrity,
        )?;
        Ok(IkeSa::new_initiator(
            u64::from_be_bytes(self.spi_i),
            u64::from_be_bytes(spi_r),
            prf,
            choice.encryption,
            choice.integrity,
            keys,
            old.nat_detected,
        )?)
    }
}

/// Starts our IKE SA rekey if it is due and the window is free; returns the request.
pub(crate) fn start_ike_due(
    session: &mut Session,
    rekey_at: &mut Option<Instant>,
    ours: &mut Ours,
    proposals: &[IkeProposal],
    retransmit: &Retransmit,
    now: Instant,
    entropy: &mut dyn Entropy,
) -> Option<Vec<u8>> {
    if !session.can_start_request() || !rekey_at.is_some_and(|t| now >= t) {
        return None;
    }
    let started = IkeRekey::start(
        proposals,
        (session.sa.spi_i, session.sa.spi_r),
        session.sa.our_spi(),
        entropy,
    )
    .and_then(|r| {
        let d = session
            .start_request(
                ExchangeType::CREATE_CHILD_SA,
                &r.payloads(proposals),
                now,
                retransmit,
            )?
            .ok_or(Error::WrongState("a request is in flight"))?;
        Ok((r, d))
    });
    match started {
        Ok((r, d)) => {
            *rekey_at = None;
            *ours = Ours::IkeRekey(Box::new(r));
            Some(d)
        }
        Err(_) => {
            *rekey_at = Some(retry_at(now, entropy));
            None
        }
    }
}

/// How long a failed rekey waits before the next try.
pub(crate) const REKEY_RETRY: Duration = Duration::from_secs(30);

/// When to try a failed rekey again: after half to one and a half [`REKEY_RETRY`], at
/// random, so that two ends refusing each other's colliding IKE SA rekeys
/// (TEMPORARY_FAILURE) do not collide again.
pub(crate) fn retry_at(now: Instant, entropy: &mut dyn Entropy) -> Instant {
    let mut r = [0u8; 2];
    let r = entropy
        .fill(&mut r)
        .map_or(32_768, |()| u64::from(u16::from_be_bytes(r)));
    let ms = (REKEY_RETRY.as_millis() as u64 / 2) + REKEY_RETRY.as_millis() as u64 * r / 65_535;
    super::deadline(now, Duration::from_millis(ms))
}

/// What the CHILD SA rekeys of one IKE SA are checked against: the role's configuration.
pub(crate) struct Params<'a> {
    pub(crate) esp: &'a [EspProposal],
    pub(crate) local: &'a IpNet,
    pub(crate) remote: &'a IpNet,
    pub(crate) lifetime: Duration,
    pub(crate) udp_encap: bool,
    pub(crate) retransmit: &'a Retransmit,
}

/// A change to the CHILD SAs, for the role to report as its events.
pub(crate) enum ChildChange {
    Installed(Box<ChildSa>),
    Deleted(ChildRef),
}

/// The earliest soft lifetime among `children`.
pub(crate) fn next_rekey(children: &[ChildRef]) -> Option<Instant> {
    children.iter().filter_map(|c| c.rekey_at).min()
}

/// Makes the CHILD SA whose inbound SPI is `spi_in` due for a rekey at `now` (its volume
/// soft limit was reached, in the data plane): the same rekey as at its soft lifetime, from
/// the next timer run on. False when there is nothing to rekey: no such SA, the peer
/// replaced it already, or our rekey of it is in flight.
pub(crate) fn mark_due(children: &mut [ChildRef], ours: &Ours, spi_in: u32, now: Instant) -> bool {
    if matches!(ours, Ours::ChildRekey(r) if r.old.spi_in == spi_in) {
        return false;
    }
    match children.iter_mut().find(|c| c.spi_in == spi_in && !c.replaced) {
        Some(c) => {
            c.rekey_at = Some(c.rekey_at.map_or(now, |t| t.min(now)));
            true
        }
        None => false,
    }
}

/// Starts the rekey of the first CHILD SA whose soft lifetime has come, if the window is
/// free: returns the request to send.
pub(crate) fn start_due(
    session: &mut Session,
    children: &mut [ChildRef],
    ours: &mut Ours,
    p: &Params<'_>,
    now: Instant,
    entropy: &mut dyn Entropy,
) -> Option<Vec<u8>> {
    if !session.can_start_request() {
        return None;
    }
    let i = children
        .iter()
        .position(|c| c.rekey_at.is_some_and(|t| now >= t))?;
    let old = children.get(i).copied()?;
    let started = ChildRekey::start(old, p.esp, children, session.sa.our_spi(), entropy).and_then(|r| {
        let datagram = session
            .start_request(
                ExchangeType::CREATE_CHILD_SA,
                &r.payloads(p.esp, p.local, p.remote),
                now,
                p.retransmit,
            )?
            .ok_or(Error::WrongState("a request is in flight"))?;
        Ok((r, datagram))
    });
    let c = children.get_mut(i)?;
    match started {
        Ok((r, datagram)) => {
            c.rekey_at = None;
            *ours = Ours::ChildRekey(Box::new(r));
            Some(datagram)
        }
        Err(_) => {
            c.rekey_at = Some(retry_at(now, entropy));
            None
        }
    }
}

/// The peer rekeyed `replaced` into `new` (§1.3.3): the old SA is the peer's to delete, so it
/// is not rekeyed here; if our own rekey of it is in flight, that is a collision (§2.8.1).
pub(crate) fn peer_rekeyed(
    children: &mut [ChildRef],
    ours: &mut Ours,
    replaced: u32,
    new: u32,
    lowest_nonce: &[u8],
) {
    if let Some(c) = children.iter_mut().find(|c| c.spi_in == replaced) {
        c.rekey_at = None;
        c.replaced = true;
    }
    if let Ours::ChildRekey(r) = ours
        && r.old.spi_in == replaced
    {
        r.collision = Some((lowest_nonce.to_vec(), new));
    }
}

/// The response to our rekey: installs the new CHILD SA and deletes the old one (one
/// INFORMATIONAL request, returned to send; RFC 7296 §1.3.3 leaves the deletion to the
/// exchange's initiator, "after the new equivalent SA is created"). A refusal or an invalid
/// response leaves the old SA, to be rekeyed again after [`REKEY_RETRY`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish(
    r: &ChildRekey,
    inner: &[Payload<'_>],
    session: &mut Session,
    children: &mut Vec<ChildRef>,
    p: &Params<'_>,
    now: Instant,
    entropy: &mut dyn Entropy,
    changes: &mut Vec<ChildChange>,
) -> Result<Option<Vec<u8>>, Error> {
    let old_alive = children.iter().any(|c| c.spi_in == r.old.spi_in);
    let (mut child, nr) = match r.complete(
        inner,
        &session.sa,
        p.esp,
        p.local,
        p.remote,
        p.lifetime,
        now,
        p.udp_encap,
    ) {
        Ok(v) => v,
        Err(e) => {
            if let Some(c) = children.iter_mut().find(|c| c.spi_in == r.old.spi_in) {
                c.rekey_at = Some(retry_at(now, entropy));
            }
            return Err(e);
        }
    };
    let redundant = r.redundant(&nr);
    if !old_alive || redundant {
        // The old SA is gone, or the peer's rekey of it won: ours replaces nothing.
        child.replaces = None;
    }
    let new = ChildRef {
        spi_in: child.spi_in,
        spi_out: child.spi_out,
        rekey_at: if redundant {
            None
        } else {
            soft_deadline(now, p.lifetime, entropy)
        },
        replaced: redundant,
    };
    // Exactly one more: a Vec's first growth makes room for four.
    children.reserve_exact(1);
    children.push(new);
    changes.push(ChildChange::Installed(Box::new(child)));
    let mut gone: Vec<ChildRef> = Vec::new();
    if redundant {
        gone.push(new);
    }
    if old_alive {
        gone.push(r.old);
    }
    children.retain(|c| !gone.iter().any(|g| g.spi_in == c.spi_in));
    children.shrink_to_fit();
    if gone.is_empty() {
        return Ok(None);
    }
    // RFC 7296 §3.11: a CHILD SA's Delete names "the SPI the sending endpoint would expect in
    // inbound ESP or AH packets". The data plane drops the SAs now: the peer moved its
    // traffic to the new SA when it answered.
    let delete = Payload::Delete(crate::payload::Delete {
        protocol: ProtocolId::ESP,
        spis: gone.iter().map(|c| c.spi_in).collect(),
    });
    changes.extend(gone.into_iter().map(ChildChange::Deleted));
    Ok(session
        .start_request(ExchangeType::INFORMATIONAL, &[delete], now, p.retransmit)
        .ok()
        .flatten())
}

impl Ours {
    /// What is in flight, as data: the key exchange's private key goes with it, so that the
    /// answer to our request can still be completed elsewhere.
    pub(crate) fn snapshot(&self) -> Result<InFlight, SnapshotError> {
        let private = |k: &KeyExchange| {
            k.private_key()
                .map(|p| (k.group(), p))
                .map_err(|_| SnapshotError::Keys("key exchange in flight cannot be exported"))
        };
        Ok(match self {
            Self::Plain => InFlight::Plain,
            Self::ChildRekey(r) => InFlight::ChildRekey {
                old_spi_in: r.old.spi_in,
                spi_in: u32::from_be_bytes(r.spi_in),
                ni: r.ni.clone(),
                kex: r.kex.as_ref().map(private).transpose()?,
                collision: r.collision.clone(),
            },
            Self::IkeRekey(r) => InFlight::IkeRekey {
                spi_i: u64::from_be_bytes(r.spi_i),
                ni: r.ni.clone(),
                kex: private(&r.kex)?,
            },
        })
    }

    /// What [`Self::snapshot`] took, for an IKE SA whose CHILD SAs are `children`.
    pub(crate) fn restore(f: InFlight, children: &[ChildRef]) -> Result<Self, SnapshotError> {
        let kex =
            |(group, private): (DhGroup, SecretBytes)| -> Result<(KeyExchange, Vec<u8>), SnapshotError> {
                let k = KeyExchange::from_private_key(group, private.expose())
                    .map_err(|_| SnapshotError::Keys("key exchange in flight"))?;
                let public = k
                    .public_value()
                    .map_err(|_| SnapshotError::Keys("key exchange in flight"))?;
                Ok((k, public))
            };
        Ok(match f {
            InFlight::Plain => Self::Plain,
            InFlight::ChildRekey {
                old_spi_in,
                spi_in,
                ni,
                kex: k,
                collision,
            } => {
                // The peer may have deleted the CHILD SA being rekeyed meanwhile (a rekey
                // collision): `finish` sees that from `children`, and needs only its SPI here.
                let old = children
                    .iter()
                    .find(|c| c.spi_in == old_spi_in)
                    .copied()
                    .unwrap_or(ChildRef {
                        spi_in: old_spi_in,
                        spi_out: 0,
                        rekey_at: None,
                        replaced: true,
                    });
                let (kex, ke_public) = match k.map(kex).transpose()? {
                    Some((k, p)) => (Some(k), p),
                    None => (None, Vec::new()),
                };
                Self::ChildRekey(Box::new(ChildRekey {
                    old,
                    old_spi: old_spi_in.to_be_bytes(),
                    spi_in: spi_in.to_be_bytes(),
                    ni,
                    kex,
                    ke_public,
                    collision,
                }))
            }
            InFlight::IkeRekey { spi_i, ni, kex: k } => {
                let (kex, ke_public) = kex(k)?;
                Self::IkeRekey(Box::new(IkeRekey {
                    spi_i: spi_i.to_be_bytes(),
                    ni,
                    kex,
                    ke_public,
                }))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(u8);

    impl Entropy for Fixed {
        fn fill(&mut self, buf: &mut [u8]) -> Result<(), concentrator_crypto::CryptoError> {
            buf.fill(self.0);
            Ok(())
        }
        fn key_exchange(&mut self, group: DhGroup) -> Result<KeyExchange, concentrator_crypto::CryptoError> {
            KeyExchange::generate(group)
        }
    }

    #[test]
    fn soft_deadline_lies_between_85_and_95_percent() {
        let now = Instant::now();
        let life = Duration::from_secs(1000);
        let at = |b| soft_deadline(now, life, &mut Fixed(b)).unwrap() - now;
        assert_eq!(at(0), Duration::from_secs(850));
        assert_eq!(at(0xff), Duration::from_secs(950));
        assert!((Duration::from_secs(899)..=Duration::from_secs(901)).contains(&at(0x80)));
        assert_eq!(soft_deadline(now, Duration::ZERO, &mut Fixed(1)), None);
    }
}
