//! The responder side of an IKEv2 SA authenticated with a pre-shared key: IKE_SA_INIT +
//! IKE_AUTH (RFC 7296 §1.2) ending in an IKE SA and its first CHILD SA, then the exchanges the
//! peer starts on it — INFORMATIONAL (§1.4: liveness checks, deletes) and CREATE_CHILD_SA
//! (§1.3: new CHILD SAs, CHILD SA and IKE SA rekeys, optional PFS) — and the liveness checks
//! this side starts (§2.4).
//!
//! Sans-IO: datagrams go in through [`Responder::handle_datagram`], the PSK (looked up by the
//! caller after [`Event::PeerIdentified`], possibly asynchronously) through
//! [`Responder::provide_psk`], expired timers through [`Responder::handle_timeout`];
//! datagrams to send come out of [`Responder::poll_transmit`], events out of
//! [`Responder::poll_event`], the next deadline out of [`Responder::poll_timeout`]. Time is an
//! argument, randomness comes from the caller's [`Entropy`]. The states consume themselves
//! (`ExpectInit` → `ExpectAuth` → `ExpectPsk` → `Established`, or `Closed` after a fatal
//! error, a deletion or a dead peer), so a stale state cannot be reused.
//!
//! # Message IDs
//!
//! Both directions use a window of one (RFC 7296 §2.3; we never send SET_WINDOW_SIZE). A
//! request of the peer with the next expected Message ID is processed; a bitwise copy of the
//! last one is answered from the cache; anything else is dropped. Our own requests count from
//! zero and are retransmitted until answered (see [`Retransmit`]).
//!
//! # Timers
//!
//! [`Responder::poll_timeout`] is the earliest of:
//! - half-open expiry: IKE_AUTH (with the PSK lookup) must complete within
//!   [`Config::half_open_timeout`] of the IKE_SA_INIT response, else [`Event::Failed`] with
//!   [`Error::Timeout`];
//! - liveness: after [`Config::dpd_interval`] without an authenticated message from the peer
//!   (or traffic reported through [`Responder::handle_child_traffic`]), an empty INFORMATIONAL
//!   request is sent;
//! - retransmission of that request, with exponential back-off; when the last one goes
//!   unanswered the IKE SA is deleted ([`Event::IkeSaDeleted`] with [`DeleteReason::DeadPeer`]);
//! - expiry of an IKE SA replaced by a rekey that the peer never deleted
//!   ([`REKEYED_SA_LINGER`]);
//! - the soft lifetime of each CHILD SA (85 % to 95 % of [`Config::child_lifetime`], see
//!   `sa/rekey.rs`): this side rekeys it (RFC 7296 §1.3.3: CREATE_CHILD_SA with
//!   N(REKEY_SA), PFS when the ESP proposals name groups), reports the new SA with
//!   [`Event::ChildSaInstalled`] naming the one it replaces, and deletes the old one at once
//!   (an INFORMATIONAL request, [`Event::ChildSaDeleted`]). A CHILD SA the peer rekeys first
//!   is left to the peer; when both rekey the same SA at once, the redundant new SA is
//!   deleted by the lowest-nonce rule of §2.8.1.
//!
//! # IKE SA rekey
//!
//! After the peer rekeys the IKE SA (RFC 7296 §1.3.2, §2.18), the responder carries on as the
//! new IKE SA: [`Responder::spi_r`] returns the new SPI and every CHILD SA moves to it (§2.8:
//! "The new IKE SA inherits all of the original IKE SA's Child SAs"). The old IKE SA's keys
//! stay in the same `Responder` until the peer deletes it (§2.8: "After the new equivalent IKE
//! SA is created, the initiator deletes the old IKE SA") or [`REKEYED_SA_LINGER`] passes.
//! So one `Responder` may answer for two responder SPIs at a time:
//! [`Responder::spis_r`] lists them, [`Event::IkeSaRekeyed`] announces the new one and
//! [`Event::IkeSaRetired`] says when the old one is gone. An endpoint routing by SPI adds a
//! route on the first and removes one on the second.
//!
//! With [`Config::ike_lifetime`] set, this side rekeys the IKE SA at its soft lifetime (85 %
//! to 95 % of it): CREATE_CHILD_SA "HDR, SK {SA, Ni, KEi}" with our new SPI, then it carries
//! on as the new IKE SA, of which it is now the *initiator* (§3.1: the I flag "changes to
//! reflect who initiated the last rekey of the IKE SA"), and deletes the old one; the same
//! [`Event::IkeSaRekeyed`] (with `new_spi_r` our SPI of the new SA, which is its SPIi) and
//! [`Event::IkeSaRetired`] (once the peer answers the DELETE). [`Responder::spi_r`] and
//! [`Responder::spis_r`] return *our* SPIs, whichever role they have, so an endpoint routes
//! the peer's messages by our SPI in either position of the header. A simultaneous rekey by
//! the peer (§2.8.2) is handled safely: while ours is in flight the peer's is answered with
//! TEMPORARY_FAILURE (§2.25) and both try again after a random wait; the peer's request on
//! an IKE SA we already replaced is refused (NO_ADDITIONAL_SAS).
//!
//! # Events after IKE_AUTH
//!
//! CHILD SAs appear with [`Event::ChildSaInstalled`] (a rekey names the SA it replaces, which
//! stays until the peer deletes it) and disappear with [`Event::ChildSaDeleted`]. When the IKE
//! SA goes, every CHILD SA still on it gets [`Event::ChildSaDeleted`] first, then
//! [`Event::IkeSaDeleted`]; the responder is then closed and only answers a retransmission of
//! the request that deleted it.
//!
//! # Redirects (RFC 5685)
//!
//! [`Responder::redirect`] sends a peer that announced N(REDIRECT_SUPPORTED) (or
//! N(REDIRECTED_FROM)) in IKE_SA_INIT an INFORMATIONAL request with N(REDIRECT) (§5); the
//! IKE SA stays until the peer deletes it. Redirects during IKE_SA_INIT are the endpoint's
//! ([`crate::endpoint::Endpoint::set_redirect`]).
//!
//! Not here: cookies, fragmentation, transport mode (a USE_TRANSPORT_MODE request is declined
//! by not echoing it, which RFC 7296 §1.3.1 allows: "If the responder declines the request,
//! the Child SA will be established in tunnel mode"), MOBIKE, configuration payloads.

mod handshake;

use std::fmt;
use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use concentrator_crypto::{ChildSaKeys, IkeSaKeys, Prf};

pub use crate::error::Error;
pub use crate::sa::{
    ChildSa, DeleteReason, Entropy, IdBuf, NONCE_LEN, REKEYED_SA_LINGER, Retransmit, SystemEntropy, Transmit,
};
pub use crate::sa::{Config, Event};

use crate::Message;
use crate::auth::{psk_auth, signed_octets, verify_psk_auth};
use crate::message::codepoints::{AuthMethod, DhGroup as WireGroup, ExchangeType, NotifyType, PayloadType};
use crate::message::error::InvalidMessage;
use crate::message::header::{Flags, Header};
use crate::nat::{behind_nat, nat_detection_hash};
use crate::negotiate::{IkeChoice, narrow, select_esp, select_ike};
use crate::payload::{self, Auth, Identity, Ke, Nonce, Notify, Payload, Ts};
use crate::redirect::GatewayId;
use crate::sa::established::{Authenticated, Cache, Established, Next};
use crate::sa::events::Output;
use crate::sa::session::{Answered, IkeSa, Kept, Session};
use crate::sa::snapshot::RequestDigest;
use crate::sa::snapshot::{IkeSaSnapshot, Role, SnapshotError};
use crate::sa::timers::{Timer, TimerTable};
use crate::sa::{ChildRef, Incoming, deadline, random_spi};

/// The IKE_SA_INIT exchange: IKE_AUTH signs it (RFC 7296 §2.15) and its nonces key the
/// first CHILD SA (§2.17).
struct InitExchange {
    /// The peer announced RFC 5685 redirects (N(REDIRECT_SUPPORTED) or N(REDIRECTED_FROM)).
    redirect_supported: bool,
    /// The IKE SA's proposal.
    choice: IkeChoice,
    ni: Vec<u8>,
    nr: Vec<u8>,
    request: Vec<u8>,
    response: Vec<u8>,
}

struct ExpectAuth {
    sa: IkeSa,
    init: InitExchange,
    /// Half-open expiry.
    deadline: Instant,
}

struct ExpectPsk {
    sa: IkeSa,
    init: InitExchange,
    /// The IKE_AUTH request as received, by its digest: to recognise a retransmission.
    request: RequestDigest,
    /// Its decrypted inner payload chain.
    plain: Vec<u8>,
    first_inner: PayloadType,
    message_id: u32,
    local: SocketAddr,
    remote: SocketAddr,
    /// Half-open expiry.
    deadline: Instant,
    /// Where to redirect the peer once it is authenticated (RFC 5685 §6), instead of making
    /// its CHILD SA.
    redirect: Option<GatewayId>,
}

enum State {
    ExpectInit,
    ExpectAuth(Box<ExpectAuth>),
    ExpectPsk(Box<ExpectPsk>),
    Established(Box<Established>),
    /// After a fatal error or the end of the IKE SA; keeps the last request and our answer to
    /// it for retransmissions.
    Closed(Cache),
}

/// One responder-side IKE SA (see the module docs).
pub struct Responder {
    config: Arc<Config>,
    state: State,
    out: Output,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::ExpectInit => "ExpectInit",
            State::ExpectAuth(_) => "ExpectAuth",
            State::ExpectPsk(_) => "ExpectPsk",
            State::Established(_) => "Established",
            State::Closed(_) => "Closed",
        };
        f.debug_struct("Responder")
            .field("state", &state)
            .field("spis_r", &self.spis_r())
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// A responder waiting for an IKE_SA_INIT request.
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            state: State::ExpectInit,
            out: Output::new(),
        }
    }

    /// The established IKE SA as data (see [`crate::sa::snapshot`]), deadlines relative to
    /// `now`; [`SnapshotError::NotEstablished`] before IKE_AUTH completed or after it closed.
    pub fn snapshot(&self, now: Instant) -> Result<IkeSaSnapshot, SnapshotError> {
        match &self.state {
            State::Established(s) => s.snapshot(&self.out.events, now),
            _ => Err(SnapshotError::NotEstablished),
        }
    }

    /// Carries on the IKE SA of a [`Self::snapshot`] (taken by a responder) at `now`, under
    /// `config`. Its CHILD SAs are not reported again: install them from the snapshot.
    pub fn restore(
        config: Arc<Config>,
        snapshot: IkeSaSnapshot,
        now: Instant,
    ) -> Result<Self, SnapshotError> {
        let (s, out) = Established::restore(Arc::clone(&config), Role::Responder, snapshot, now)?;
        Ok(Self {
            config,
            state: State::Established(Box::new(s)),
            out,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Replaces the configuration once the peer is identified ([`Event::PeerIdentified`]):
    /// the eroute its identity selects (for a site from a database, the base eroute with the
    /// site's subnet) decides the CHILD SA, our identity and the timers from here on. Only
    /// while the PSK is awaited. The IKE SA's proposal was chosen in IKE_SA_INIT and stays:
    /// a configuration whose proposals do not allow it is refused
    /// ([`Error::ProposalNotAllowed`]) and the old one kept; refuse the peer then.
    pub fn set_config(&mut self, config: Arc<Config>) -> Result<(), Error> {
        match &self.state {
            State::ExpectPsk(s) if !s.init.choice.allowed_by(&config.ike_proposals) => {
                Err(Error::ProposalNotAllowed)
            }
            State::ExpectPsk(_) => {
                self.config = config;
                Ok(())
            }
            _ => Err(Error::WrongState("no PSK lookup pending")),
        }
    }

    /// The IKE SA's proposal, chosen in IKE_SA_INIT; known until IKE_AUTH completes.
    pub fn ike_choice(&self) -> Option<IkeChoice> {
        match &self.state {
            State::ExpectAuth(s) => Some(s.init.choice),
            State::ExpectPsk(s) => Some(s.init.choice),
            _ => None,
        }
    }

    /// Deletes the IKE SA and its CHILD SAs from our side: one INFORMATIONAL request with a
    /// Delete payload for the IKE SA (RFC 7296 §1.4.1), so that the peer knows at once and
    /// can reconnect when it next has traffic, then the SA is closed without waiting for the
    /// answer (a lost DELETE leaves the peer to its own liveness checks). A negotiation that
    /// is not established is just closed.
    pub fn delete(&mut self, now: Instant) {
        self.state = match mem::replace(&mut self.state, State::Closed(None)) {
            State::Established(mut s) => State::Closed(s.delete(&mut self.out, now)),
            State::Closed(cache) => State::Closed(cache),
            _ => State::Closed(None),
        };
    }

    /// While the PSK is looked up ([`Event::PeerIdentified`]): once the peer has
    /// authenticated, answer its IKE_AUTH request with our AUTH and N(REDIRECT) naming
    /// `gateway` instead of a CHILD SA, and close the IKE SA (RFC 5685 §6, redirect during
    /// IKE_AUTH: the peer learns where to go only after both ends proved who they are). Only
    /// for a peer that announced N(REDIRECT_SUPPORTED) (or N(REDIRECTED_FROM)) in
    /// IKE_SA_INIT; [`Self::provide_psk`] then ends with [`Error::Redirected`].
    pub fn redirect_after_auth(&mut self, gateway: GatewayId) -> Result<(), Error> {
        match &mut self.state {
            State::ExpectPsk(s) if s.init.redirect_supported => {
                s.redirect = Some(gateway);
                Ok(())
            }
            State::ExpectPsk(_) => Err(Error::WrongState("the peer did not announce REDIRECT_SUPPORTED")),
            _ => Err(Error::WrongState("no PSK lookup pending")),
        }
    }

    /// Redirects the peer to `gateway` (RFC 5685 §5): an INFORMATIONAL request with
    /// N(REDIRECT) naming it, on the established IKE SA, for a peer that announced
    /// N(REDIRECT_SUPPORTED) (or N(REDIRECTED_FROM)) in IKE_SA_INIT. The IKE SA stays until
    /// the peer deletes it, once it has moved to the new gateway.
    pub fn redirect(&mut self, now: Instant, gateway: &GatewayId) -> Result<(), Error> {
        match &mut self.state {
            State::Established(s) => s.redirect(&mut self.out, now, gateway),
            _ => Err(Error::WrongState("no established IKE SA to redirect")),
        }
    }

    /// Our IKE SPI, once IKE_SA_INIT has been answered; after an IKE SA rekey, the new IKE
    /// SA's. `None` before IKE_SA_INIT and once closed.
    pub fn spi_r(&self) -> Option<u64> {
        match &self.state {
            State::ExpectAuth(s) => Some(s.sa.spi_r),
            State::ExpectPsk(s) => Some(s.sa.spi_r),
            State::Established(s) => Some(s.our_spi()),
            State::ExpectInit | State::Closed(_) => None,
        }
    }

    /// The initiator's SPI of the IKE SA being set up (from IKE_SA_INIT until the IKE_AUTH
    /// exchange ends) or in use; `None` before IKE_SA_INIT and once closed.
    pub fn spi_i(&self) -> Option<u64> {
        match &self.state {
            State::ExpectAuth(s) => Some(s.sa.spi_i),
            State::ExpectPsk(s) => Some(s.sa.spi_i),
            State::Established(s) => Some(s.ike_spis().0),
            State::ExpectInit | State::Closed(_) => None,
        }
    }

    /// The SPIs `(SPIi, SPIr)` of the IKE SA in use, once established: after a rekey, the
    /// new one's (our SPI is SPIi if we started that rekey).
    pub fn ike_spis(&self) -> Option<(u64, u64)> {
        match &self.state {
            State::Established(s) => Some(s.ike_spis()),
            _ => None,
        }
    }

    /// Every responder SPI this responder answers for: [`Self::spi_r`] and, between an IKE SA
    /// rekey and the retirement of the replaced IKE SA ([`Event::IkeSaRetired`]), that one's.
    pub fn spis_r(&self) -> Vec<u64> {
        match &self.state {
            State::Established(s) => s.our_spis(),
            _ => self.spi_r().into_iter().collect(),
        }
    }

    /// The CHILD SAs of the established IKE SA, as `(spi_in, spi_out)`.
    pub fn child_spis(&self) -> Vec<(u32, u32)> {
        match &self.state {
            State::Established(s) => s.child_spis(),
            _ => Vec::new(),
        }
    }

    /// Whether the negotiation failed or the IKE SA is gone (the responder only answers a
    /// retransmission of the last request now).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// Whether the IKE SA is established.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    /// Forgets the IKE_SA_INIT exchange kept to answer its retransmissions, once nothing
    /// routes them to this SA any more (an [`crate::endpoint::Endpoint`] routes established
    /// SAs by our SPI only, and a retransmitted IKE_SA_INIT carries none).
    pub fn forget_init_exchange(&mut self) {
        if let State::Established(e) = &mut self.state {
            e.forget_init();
        }
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.poll_transmit()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.out.poll_event()
    }

    /// When [`Self::handle_timeout`] is due next (see the module docs for the timers), if
    /// ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers().next()
    }

    /// The deadline of each timer.
    fn timers(&self) -> TimerTable {
        let mut t = TimerTable::default();
        match &self.state {
            State::ExpectAuth(s) => t.set(Timer::Handshake, Some(s.deadline)),
            State::ExpectPsk(s) => t.set(Timer::Handshake, Some(s.deadline)),
            State::Established(s) => t = s.timers(),
            State::ExpectInit | State::Closed(_) => {}
        }
        t
    }

    /// Runs the timers due at `now`: half-open expiry, the liveness check and its
    /// retransmissions, rekeys, the expiry of a rekeyed IKE SA. Calling it early does
    /// nothing.
    pub fn handle_timeout(&mut self, now: Instant, entropy: &mut dyn Entropy) {
        match mem::replace(&mut self.state, State::Closed(None)) {
            State::ExpectAuth(s) if now >= s.deadline => {
                let _ = self.fail(Error::Timeout("IKE_AUTH did not arrive in time"), None);
            }
            State::ExpectPsk(s) if now >= s.deadline => {
                let _ = self.fail(Error::Timeout("IKE_AUTH did not complete in time"), None);
            }
            State::Established(mut s) => {
                self.state = match s.handle_timeout(&mut self.out, now, entropy) {
                    Next::Stay => State::Established(s),
                    Next::Close(cache) => State::Closed(cache),
                };
            }
            other => self.state = other,
        }
    }

    /// The data plane saw authenticated ESP traffic from the peer on a CHILD SA of this IKE
    /// SA: the peer is alive (RFC 7296 §2.4), so the next liveness check moves out.
    pub fn handle_child_traffic(&mut self, now: Instant) {
        if let State::Established(s) = &mut self.state {
            s.handle_child_traffic(now);
        }
    }

    /// Rekeys the CHILD SA whose inbound SPI is `spi_in` now, as at its soft lifetime (the
    /// data plane saw it reach a volume limit): CREATE_CHILD_SA with N(REKEY_SA) when the
    /// window is free, else as soon as it is. False when there is nothing to rekey: no such
    /// SA, the peer rekeyed it already, or our rekey of it is in flight.
    pub fn rekey_child(&mut self, spi_in: u32, now: Instant, entropy: &mut dyn Entropy) -> bool {
        let State::Established(s) = &mut self.state else {
            return false;
        };
        if !s.mark_rekey_due(spi_in, now) {
            return false;
        }
        self.handle_timeout(now, entropy);
        true
    }

    fn send(&mut self, local: SocketAddr, remote: SocketAddr, payload: Vec<u8>) {
        self.out.send(local, remote, payload);
    }

    /// Handles one IKE datagram (without the non-ESP marker) that arrived on `local` from
    /// `remote` at `now`. An `Err` says why the datagram was dropped or the negotiation
    /// failed; in the latter case the error response (if any) is queued and [`Event::Failed`]
    /// reported. A request refused on an established IKE SA is answered and reported with
    /// [`Event::RequestRefused`], and returns `Ok`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        entropy: &mut dyn Entropy,
    ) -> Result<(), Error> {
        let d = Incoming::new(now, local, remote, datagram)
            .ok_or(Error::Malformed(InvalidMessage::Truncated("IKE header")))?;
        self.handle(&d, entropy)
    }

    /// [`Self::handle_datagram`] for a datagram whose header was read already.
    pub fn handle(&mut self, d: &Incoming<'_>, entropy: &mut dyn Entropy) -> Result<(), Error> {
        let (local, remote, datagram) = (d.local, d.remote, d.bytes);
        match mem::replace(&mut self.state, State::Closed(None)) {
            State::ExpectInit => match self.handle_init(d, entropy) {
                Ok(next) => {
                    self.state = State::ExpectAuth(Box::new(next));
                    Ok(())
                }
                Err(e) => self.fail(e, None),
            },
            State::ExpectAuth(s) => self.handle_auth(*s, local, remote, datagram),
            State::ExpectPsk(s) => {
                let r = if datagram == s.init.request {
                    self.send(local, remote, s.init.response.clone());
                    Ok(())
                } else if s.request.matches(datagram) {
                    // The PSK lookup is still running; the answer will follow it.
                    Err(Error::Unexpected(
                        "IKE_AUTH retransmitted while looking up the PSK",
                    ))
                } else {
                    Err(Error::Unexpected("message while looking up the PSK"))
                };
                self.state = State::ExpectPsk(s);
                r
            }
            State::Established(mut s) => {
                let (state, r) = match s.handle_datagram(&mut self.out, d, entropy) {
                    Ok(Next::Close(cache)) => (State::Closed(cache), Ok(())),
                    Ok(Next::Stay) => (State::Established(s), Ok(())),
                    Err(e) => (State::Established(s), Err(e)),
                };
                self.state = state;
                r
            }
            State::Closed(cache) => {
                let r = match cache.as_ref().and_then(|k| k.answer(datagram)) {
                    Some(resp) => {
                        let resp = resp.to_vec();
                        self.retransmit(local, remote, &resp);
                        Ok(())
                    }
                    None => Err(Error::Unexpected("the IKE SA is closed")),
                };
                self.state = State::Closed(cache);
                r
            }
        }
    }

    /// Answers a retransmitted request from the cache; nothing is recomputed. RFC 7296 §2.1:
    /// "A retransmission from the initiator MUST be bitwise identical to the original request",
    /// so a byte comparison recognises it, and "The responder MUST never retransmit a response
    /// unless it receives a retransmission of the request."
    fn retransmit(&mut self, local: SocketAddr, remote: SocketAddr, response: &[u8]) {
        self.send(local, remote, response.to_vec());
    }

    fn fail(&mut self, e: Error, cache: Cache) -> Result<(), Error> {
        self.state = State::Closed(cache);
        self.out.event(Event::Failed(e));
        Err(e)
    }
}

/// An unencrypted IKE_SA_INIT error response: one notify, SPIr zero (no state was kept).
pub(crate) fn init_error(request: &Header, notify: NotifyType, data: &[u8]) -> Vec<u8> {
    Message {
        header: Header::new(
            request.spi_i,
            0,
            ExchangeType::IKE_SA_INIT,
            Flags::RESPONSE,
            request.message_id,
        ),
        payloads: vec![Payload::Notify(Notify::new(notify, data))],
    }
    .to_vec()
}

#[cfg(test)]
mod tests {
    use crate::negotiate::NegotiationError;
    use concentrator_algorithms::{DhGroup, parse_esp, parse_ike};
    use concentrator_crypto::{CryptoError, KeyExchange, PacketError};

    use super::*;

    /// Deterministic entropy: counting bytes, fixed X25519 private keys.
    struct Counter(u8);

    impl Entropy for Counter {
        fn fill(&mut self, buf: &mut [u8]) -> Result<(), CryptoError> {
            for b in buf {
                self.0 = self.0.wrapping_add(1);
                *b = self.0;
            }
            Ok(())
        }
        fn key_exchange(&mut self, group: DhGroup) -> Result<KeyExchange, CryptoError> {
            KeyExchange::from_private_key(group, &[7u8; 32])
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn config(ike: &str) -> Arc<Config> {
        Arc::new(Config::new(
            vec![parse_ike("ike", ike).unwrap()],
            vec![parse_esp("esp", "aes128gcm16").unwrap()],
            "10.2.0.0/24".parse().unwrap(),
            "10.1.0.0/24".parse().unwrap(),
            IdBuf::new(&Identity::Fqdn(b"gw")),
        ))
    }

    fn addrs() -> (SocketAddr, SocketAddr) {
        ("192.0.2.2:500".parse().unwrap(), "192.0.2.1:500".parse().unwrap())
    }

    #[test]
    fn answers_strongswan_ike_sa_init_and_its_retransmission() {
        let req = hex(include_str!(
            "../tests/vectors/strongswan-ike-sa-init-request.hex"
        ));
        let mut r = Responder::new(config("aes128gcm16-prfsha256-x25519"));
        let (local, remote) = addrs();
        let now = Instant::now();
        r.handle_datagram(now, local, remote, &req, &mut Counter(0))
            .unwrap();
        let t = r.poll_transmit().unwrap();
        assert_eq!((t.local, t.remote), (local, remote));
        let resp = Message::decode(&t.payload).unwrap();
        assert_eq!(resp.header.flags, Flags::RESPONSE);
        assert_eq!(Some(resp.header.spi_r), r.spi_r());
        let types: Vec<_> = resp.payloads.iter().map(Payload::payload_type).collect();
        assert_eq!(
            types,
            [
                PayloadType::SA,
                PayloadType::KE,
                PayloadType::NONCE,
                PayloadType::NOTIFY,
                PayloadType::NOTIFY
            ]
        );
        // A retransmitted request gets the same bytes again.
        r.handle_datagram(now, local, remote, &req, &mut Counter(0))
            .unwrap();
        assert_eq!(r.poll_transmit().unwrap().payload, t.payload);
        // An IKE_AUTH request with a bad ICV is dropped; the SA waits on.
        let mut auth = hex(include_str!("../tests/vectors/strongswan-ike-auth-request.hex"));
        auth[8..16].copy_from_slice(&r.spi_r().unwrap().to_be_bytes());
        auth[..8].copy_from_slice(&resp.header.spi_i.to_be_bytes());
        assert_eq!(
            r.handle_datagram(now, local, remote, &auth, &mut Counter(0)),
            Err(Error::Packet(PacketError::IcvMismatch))
        );
        assert!(r.poll_transmit().is_none());
        assert!(!r.is_closed());
        assert_eq!(
            r.provide_psk(now, Some(b"x"), &mut Counter(0)),
            Err(Error::WrongState("no PSK lookup pending"))
        );
    }

    #[test]
    fn rejects_wrong_ke_group_with_invalid_ke_payload_naming_ours() {
        let req = hex(include_str!(
            "../tests/vectors/strongswan-ike-sa-init-request.hex"
        ));
        // strongSwan offered x25519 first; we accept only ecp256 (which it also offered? no):
        // a config without x25519 but with one of its other groups makes the KE guess wrong.
        let offered = Message::decode(&req).unwrap();
        let Some(Payload::Sa(sa)) = offered.payloads.iter().find(|p| matches!(p, Payload::Sa(_))) else {
            panic!("no SA");
        };
        let other_group = sa.proposals[0]
            .transforms
            .iter()
            .filter(|t| t.transform_type == crate::TransformType::DH)
            .map(|t| t.id.0)
            .find(|&g| g != 31 && crate::negotiate::dh_group(g).is_some());
        let Some(group) = other_group else {
            return; // the vector offers only x25519
        };
        let name = match group {
            14 => "modp2048",
            15 => "modp3072",
            19 => "ecp256",
            _ => "ecp384",
        };
        let mut r = Responder::new(config(&format!("aes128gcm16-prfsha256-{name}")));
        let (local, remote) = addrs();
        let e = r.handle_datagram(Instant::now(), local, remote, &req, &mut Counter(0));
        assert_eq!(
            e,
            Err(Error::InvalidKe {
                got: 31,
                selected: group
            })
        );
        let resp = r.poll_transmit().unwrap().payload;
        let m = Message::decode(&resp).unwrap();
        let group_bytes = group.to_be_bytes();
        assert_eq!(
            m.payloads,
            [Payload::Notify(Notify::new(
                NotifyType::INVALID_KE_PAYLOAD,
                &group_bytes
            ))]
        );
        assert!(r.is_closed());
        assert!(matches!(
            r.poll_event(),
            Some(Event::Failed(Error::InvalidKe { .. }))
        ));
    }

    #[test]
    fn rejects_unacceptable_proposal_with_no_proposal_chosen() {
        let req = hex(include_str!(
            "../tests/vectors/strongswan-ike-sa-init-request.hex"
        ));
        let mut r = Responder::new(config("aes256-sha512-modp3072"));
        let (local, remote) = addrs();
        assert_eq!(
            r.handle_datagram(Instant::now(), local, remote, &req, &mut Counter(0)),
            Err(Error::Negotiation(NegotiationError::NoProposalChosen))
        );
        let m_bytes = r.poll_transmit().unwrap().payload;
        let m = Message::decode(&m_bytes).unwrap();
        assert_eq!(
            m.payloads,
            [Payload::Notify(Notify::new(NotifyType::NO_PROPOSAL_CHOSEN, &[]))]
        );
    }

    #[test]
    fn drops_responses_and_garbage_in_expect_init() {
        let mut req = hex(include_str!(
            "../tests/vectors/strongswan-ike-sa-init-response.hex"
        ));
        let mut r = Responder::new(config("aes128gcm16-prfsha256-x25519"));
        let (local, remote) = addrs();
        assert!(matches!(
            r.handle_datagram(Instant::now(), local, remote, &req, &mut Counter(0)),
            Err(Error::Unexpected(_))
        ));
        req.truncate(20);
        let mut r = Responder::new(config("aes128gcm16-prfsha256-x25519"));
        assert!(matches!(
            r.handle_datagram(Instant::now(), local, remote, &req, &mut Counter(0)),
            Err(Error::Malformed(_))
        ));
        assert!(r.poll_transmit().is_none());
    }
}
