//! The initiator side of an IKEv2 SA authenticated with a pre-shared key: IKE_SA_INIT +
//! IKE_AUTH (RFC 7296 §1.2) ending in an IKE SA and its first CHILD SA, then what the peer
//! asks on it — INFORMATIONAL requests (§1.4: liveness checks, deletes) — and the liveness
//! checks this side starts (§2.4). The mirror of [`crate::responder`]: once IKE_AUTH is
//! done both hold the same established IKE SA (`sa/established.rs`), with its IKE SA sealing,
//! Message ID windows, retransmission policy and CHILD SAs.
//!
//! Sans-IO like the responder: [`Initiator::connect`] queues the IKE_SA_INIT request;
//! datagrams go in through [`Initiator::handle_datagram`] and expired timers through
//! [`Initiator::handle_timeout`]; datagrams to send come out of [`Initiator::poll_transmit`]
//! (IKE bytes without the non-ESP marker of port 4500: the caller adds it to every message
//! of an SA that [`Initiator::floated`]), events out of [`Initiator::poll_event`], the next
//! deadline out of [`Initiator::poll_timeout`]. Time is an argument, randomness comes from
//! the caller's [`Entropy`]. The states consume themselves (`ExpectInit` → `ExpectAuth` →
//! `Established`, or `Closed` after a failure, a deletion or a dead peer).
//!
//! # IKE_SA_INIT
//!
//! The request offers every configured IKE proposal in order and a KE payload for the first
//! group of the first proposal (RFC 7296 §1.2: the initiator guesses the group), plus the NAT
//! detection notifies (§2.23). Two answers make us send it again, with the same SPI and nonce,
//! at most [`Config::max_init_retries`] times in all:
//! - N(COOKIE) (§2.6): the same request with the cookie as its first payload;
//! - INVALID_KE_PAYLOAD (§1.2) naming a group we offered: a new key pair for that group
//!   (keeping a cookie we were given, as in §2.6.1).
//!
//! Any other error notify fails the negotiation ([`Error::Refused`]). A response that is
//! malformed or not for our request is dropped and the request stays in flight.
//!
//! # IKE_AUTH and the port float
//!
//! When the NAT detection hashes show a NAT, or [`NatTraversal::force`] is set, every later
//! message of the SA goes from our NAT-T port to the peer's (§2.23: the initiator "MUST
//! tunnel all future IKE and ESP packets associated with this IKE SA over UDP port 4500"),
//! and the CHILD SA is UDP-encapsulated. The IKE_AUTH request carries IDi, IDr (when the
//! peer's identity is configured), AUTH, SAi2, TSi and TSr (the configured subnets whole).
//! The response must authenticate the peer (IDr as configured, AUTH with the PSK) and pick
//! from what we offered (one proposal of ours, selectors inside ours, §2.9).
//!
//! An authenticated response that refuses the CHILD SA (NO_PROPOSAL_CHOSEN,
//! TS_UNACCEPTABLE, ...; §2.21.2: the IKE SA is then established without it) fails the
//! negotiation as well: this initiator's IKE SA exists to carry that CHILD SA, so it deletes
//! the IKE SA (one INFORMATIONAL request, not waited for) rather than keep it idle. A peer
//! whose AUTH does not verify is told so with an INFORMATIONAL AUTHENTICATION_FAILED
//! (§2.21.2: "the notification MAY be returned in a separate INFORMATIONAL exchange").
//!
//! # Timers
//!
//! [`Initiator::poll_timeout`] is the earliest of: the retransmission of the request in flight
//! (IKE_SA_INIT, IKE_AUTH or a liveness check, [`Retransmit`] back-off; the last one
//! unanswered fails the negotiation or, once established, deletes the SA as a dead peer), and
//! the next liveness check ([`Config::dpd_interval`]).
//!
//! # After IKE_AUTH
//!
//! The peer's CREATE_CHILD_SA requests for a new or rekeyed CHILD SA (RFC 7296 §1.3.1,
//! §1.3.3, PFS when our ESP proposals name groups) are answered as the responder answers
//! them (`sa/established.rs`), against our proposals and subnets, and reported with
//! [`Event::ChildSaInstalled`] (a rekey names the SA it replaces, which stays until the peer
//! deletes it). Its INFORMATIONAL requests delete CHILD SAs or the IKE SA, or check liveness.
//!
//! CHILD SAs are rekeyed by this side at their soft lifetime (85 % to 95 % of
//! [`Config::child_lifetime`]), as the responder does: see `sa/rekey.rs` (RFC 7296 §1.3.3, §2.8,
//! the §2.8.1 collision rule).
//!
//! IKE SA rekeys (RFC 7296 §1.3.2, §2.18): this side rekeys at the soft lifetime of
//! [`Config::ike_lifetime`] and deletes the old IKE SA; a rekey by the peer is followed when
//! [`Config::accept_ike_rekey`] is set (else declined with NO_ADDITIONAL_SAS, §1.3), the old
//! IKE SA then answering until the peer deletes it. Either way the CHILD SAs move to the new
//! IKE SA, with [`Event::IkeSaRekeyed`] and [`Event::IkeSaRetired`] as for the responder.
//! Both are off by default (see [`Config::accept_ike_rekey`] for why).
//!
//! # Redirects (RFC 5685)
//!
//! With [`Config::redirect_supported`] (the default) IKE_SA_INIT carries
//! N(REDIRECT_SUPPORTED), or N(REDIRECTED_FROM) naming [`Config::redirected_from`]. A
//! REDIRECT is followed in the IKE_SA_INIT response (only with our Ni as its nonce data,
//! §4.1; [`Error::Redirected`]), in the IKE_AUTH response (§6; the IKE SA is deleted, then
//! [`Error::Redirected`]) and in an INFORMATIONAL request on the established SA (§5; answered,
//! the IKE SA deleted, [`Event::IkeSaDeleted`] with [`crate::DeleteReason::Redirected`]). Either way
//! [`Initiator::redirected_to`] names the new gateway, for the caller to connect there with
//! `redirected_from` set.
//!
//! Not here: new CHILD SAs started by this side, certificates, EAP, configuration payloads,
//! fragmentation, MOBIKE.

mod handshake;

use std::fmt;
use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use concentrator_crypto::{ChildSaKeys, IkeSaKeys, KeyExchange, Prf, SecretBytes};

use crate::Message;
use crate::auth::{psk_auth, signed_octets, verify_psk_auth};
pub use crate::error::Error;
use crate::message::codepoints::{AuthMethod, DhGroup as WireGroup, ExchangeType, NotifyType};
use crate::message::error::InvalidMessage;
use crate::message::header::{Flags, Header};
use crate::nat::{behind_nat, nat_detection_hash};
use crate::negotiate::{dh_group, offer};
use crate::payload::{self, Auth, Ke, Nonce, Notify, Payload, Ts};
use crate::redirect::{GatewayId, decode_redirect, encode_redirected_from};
use crate::sa::established::{Authenticated, Cache, Established, Next, delete_ike};
use crate::sa::events::Output;
use crate::sa::session::{IkeSa, Retry, Session};
use crate::sa::snapshot::{IkeSaSnapshot, Role, SnapshotError};
use crate::sa::timers::{Timer, TimerTable};
use crate::sa::{
    ChildRef, ChildSa, Entropy, IdBuf, Incoming, NONCE_LEN, Retransmit, Transmit, deadline, random_spi,
};
pub use crate::sa::{Config, Event, NatTraversal};

/// RFC 7296 §2.6: "the initiator MUST then retry the IKE_SA_INIT request [...]"; the cookie
/// it echoes is "between 1 and 64 octets".
const COOKIE_LEN: std::ops::RangeInclusive<usize> = 1..=64;

/// Waiting for the IKE_SA_INIT response.
struct ExpectInit {
    ni: Vec<u8>,
    kex: KeyExchange,
    ke_public: Vec<u8>,
    /// The responder's cookie, echoed first in every request from now on (RFC 7296 §2.6).
    cookie: Option<Vec<u8>>,
    /// COOKIE and INVALID_KE_PAYLOAD retries so far.
    retries: u32,
    /// The request as sent last: retransmitted as is, and signed by our AUTH (§2.15).
    request: Vec<u8>,
    retransmits: u32,
    deadline: Instant,
}

/// Waiting for the IKE_AUTH response (in flight in the session's window).
struct ExpectAuth {
    session: Session,
    ni: Vec<u8>,
    nr: Vec<u8>,
    /// The IKE_SA_INIT response: the responder's AUTH signs it (§2.15).
    init_response: Vec<u8>,
    /// Our inbound SPI, offered in SAi2.
    spi_in: u32,
    /// The responder's AUTH verified: a failure from here on deletes the IKE SA.
    peer_authenticated: bool,
}

enum State {
    ExpectInit(Box<ExpectInit>),
    ExpectAuth(Box<ExpectAuth>),
    Established(Box<Established>),
    Closed(Cache),
}

/// One initiator-side IKE SA (see the module docs).
pub struct Initiator {
    config: Arc<Config>,
    spi_i: u64,
    /// Until IKE_AUTH is over; zeroized on drop.
    psk: Option<SecretBytes>,
    /// Where our messages go from and to during the handshake: the addresses given to
    /// [`Initiator::connect`], the NAT-T ports after a float.
    local: SocketAddr,
    remote: SocketAddr,
    nat_detected: bool,
    floated: bool,
    /// Where a REDIRECT sent us.
    redirected_to: Option<GatewayId>,
    state: State,
    out: Output,
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::ExpectInit(_) => "ExpectInit",
            State::ExpectAuth(_) => "ExpectAuth",
            State::Established(_) => "Established",
            State::Closed(_) => "Closed",
        };
        let (local, remote) = self.path();
        f.debug_struct("Initiator")
            .field("state", &state)
            .field("spi_i", &format_args!("{:016x}", self.spi_i))
            .field("local", &local)
            .field("remote", &remote)
            .finish_non_exhaustive()
    }
}

impl Initiator {
    /// The established IKE SA as data (see [`crate::sa::snapshot`]), deadlines relative to
    /// `now`; [`SnapshotError::NotEstablished`] before IKE_AUTH completed or after it closed.
    pub fn snapshot(&self, now: Instant) -> Result<IkeSaSnapshot, SnapshotError> {
        match &self.state {
            State::Established(s) => s.snapshot(&self.out.events, now),
            _ => Err(SnapshotError::NotEstablished),
        }
    }

    /// Carries on the IKE SA of a [`Self::snapshot`] (taken by an initiator) at `now`, under
    /// `config`. Its CHILD SAs are not reported again: install them from the snapshot.
    pub fn restore(
        config: Arc<Config>,
        snapshot: IkeSaSnapshot,
        now: Instant,
    ) -> Result<Self, SnapshotError> {
        let (local, remote, floated) = (snapshot.local, snapshot.remote, snapshot.floated);
        let (s, out) = Established::restore(Arc::clone(&config), Role::Initiator, snapshot, now)?;
        Ok(Self {
            config,
            // Its name from now on: our SPI of the IKE SA in use.
            spi_i: s.our_spi(),
            psk: None,
            local,
            remote,
            nat_detected: s.nat_detected(),
            floated,
            redirected_to: None,
            state: State::Established(Box::new(s)),
            out,
        })
    }

    /// Starts a negotiation from `local` to `remote` authenticated with `psk`: the
    /// IKE_SA_INIT request is queued for [`Self::poll_transmit`].
    pub fn connect(
        config: Arc<Config>,
        psk: &[u8],
        local: SocketAddr,
        remote: SocketAddr,
        now: Instant,
        entropy: &mut dyn Entropy,
    ) -> Result<Self, Error> {
        let group = config
            .ike_proposals
            .first()
            .and_then(|p| p.dh.first())
            .copied()
            .ok_or(Error::Config("no IKE proposal with a DH group"))?;
        if config.esp_proposals.is_empty() {
            return Err(Error::Config("no ESP proposal"));
        }
        // RFC 7296 §3.1, Initiator's SPI: "This value MUST NOT be zero."
        let spi_i = u64::from_be_bytes(random_spi::<8>(entropy, 1, None)?);
        // RFC 7296 §2.10: nonces "MUST be randomly chosen, MUST be at least 128 bits in size,
        // and MUST be at least half the key size of the negotiated pseudorandom function".
        let mut ni = vec![0u8; NONCE_LEN];
        entropy.fill(&mut ni)?;
        let kex = entropy.key_exchange(group)?;
        let ke_public = kex.public_value()?;
        let retransmit = config.retransmit;
        let mut me = Self {
            config,
            spi_i,
            psk: Some(SecretBytes::from_slice(psk)),
            local,
            remote,
            nat_detected: false,
            floated: false,
            redirected_to: None,
            state: State::Closed(None),
            out: Output::new(),
        };
        let mut s = ExpectInit {
            ni,
            kex,
            ke_public,
            cookie: None,
            retries: 0,
            request: Vec::new(),
            retransmits: 0,
            deadline: now,
        };
        me.send_init(&mut s, now, &retransmit);
        me.state = State::ExpectInit(Box::new(s));
        Ok(me)
    }

    /// Our IKE SPI.
    pub fn spi_i(&self) -> u64 {
        self.spi_i
    }

    /// The responder's IKE SPI, once IKE_SA_INIT is answered; `None` before and once closed.
    pub fn spi_r(&self) -> Option<u64> {
        self.ike_spis().map(|(_, r)| r)
    }

    /// The SPIs `(SPIi, SPIr)` of the IKE SA in use: after a rekey, the new one's (our SPI is
    /// SPIi if we started that rekey, SPIr if the peer did).
    pub fn ike_spis(&self) -> Option<(u64, u64)> {
        match &self.state {
            State::ExpectAuth(s) => Some((s.session.sa.spi_i, s.session.sa.spi_r)),
            State::Established(s) => Some(s.ike_spis()),
            State::ExpectInit(_) | State::Closed(_) => None,
        }
    }

    /// Every SPI of ours that the peer's messages may carry: our SPI of the IKE SA in use
    /// (SPIi, or SPIr after a rekey by the peer) and of the one a rekey replaced, until it is
    /// deleted. An endpoint routing an initiated SA only by its first SPIi ([`Self::spi_i`])
    /// loses it after an IKE SA rekey; route by these instead.
    pub fn our_spis(&self) -> Vec<u64> {
        match &self.state {
            State::Established(s) => s.our_spis(),
            State::Closed(_) => Vec::new(),
            _ => vec![self.spi_i],
        }
    }

    /// The gateway a REDIRECT named (RFC 5685), once this SA closed because of it (with
    /// [`Error::Redirected`] before establishment, [`DeleteReason::Redirected`] after).
    ///
    /// [`DeleteReason::Redirected`]: crate::DeleteReason::Redirected
    pub fn redirected_to(&self) -> Option<&GatewayId> {
        self.redirected_to.as_ref()
    }

    /// Our address and the peer's for the SA's messages (the NAT-T ports after a float).
    pub fn path(&self) -> (SocketAddr, SocketAddr) {
        match &self.state {
            State::Established(s) => s.path(),
            _ => (self.local, self.remote),
        }
    }

    /// Whether the SA moved to the NAT-T ports after IKE_SA_INIT: its messages then carry
    /// the non-ESP marker on the wire (RFC 3948 §2.2) and its CHILD SA is UDP-encapsulated.
    pub fn floated(&self) -> bool {
        self.floated
    }

    /// The CHILD SAs of the established IKE SA, as `(spi_in, spi_out)`.
    pub fn child_spis(&self) -> Vec<(u32, u32)> {
        match &self.state {
            State::Established(s) => s.child_spis(),
            _ => Vec::new(),
        }
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

    /// Whether the negotiation failed or the IKE SA is gone.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
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

    /// When [`Self::handle_timeout`] is due next, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers().next()
    }

    /// The deadline of each timer.
    fn timers(&self) -> TimerTable {
        let mut t = TimerTable::default();
        match &self.state {
            State::ExpectInit(s) => t.set(Timer::Handshake, Some(s.deadline)),
            State::ExpectAuth(s) => t.set(Timer::Handshake, s.session.pending_deadline()),
            State::Established(s) => t = s.timers(),
            State::Closed(_) => {}
        }
        t
    }

    /// The data plane saw authenticated ESP traffic from the peer: it is alive (RFC 7296
    /// §2.4), so the next liveness check moves out.
    pub fn handle_child_traffic(&mut self, now: Instant) {
        if let State::Established(s) = &mut self.state {
            s.handle_child_traffic(now);
        }
    }

    /// Rekeys the CHILD SA whose inbound SPI is `spi_in` now, as at its soft lifetime (see
    /// [`crate::Responder::rekey_child`]). False when there is nothing to rekey.
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

    /// Deletes the IKE SA from our side: one INFORMATIONAL request with a Delete payload for
    /// it (RFC 7296 §1.4.1), not waited for, and the SA is closed. A negotiation that is not
    /// established is just abandoned.
    pub fn delete(&mut self, now: Instant) {
        self.state = match mem::replace(&mut self.state, State::Closed(None)) {
            State::Established(mut s) => State::Closed(s.delete(&mut self.out, now)),
            State::Closed(cache) => State::Closed(cache),
            _ => {
                self.psk = None;
                State::Closed(None)
            }
        };
    }

    fn send(&mut self, payload: Vec<u8>) {
        self.out.send(self.local, self.remote, payload);
    }

    /// Starts a request of ours on `session` and sends it; nothing when the window is busy.
    fn request(&mut self, session: &mut Session, inner: &[Payload<'_>], now: Instant) {
        let policy = self.config.retransmit;
        if let Ok(Some(datagram)) = session.start_request(ExchangeType::INFORMATIONAL, inner, now, &policy) {
            self.send(datagram);
        }
    }

    fn fail(&mut self, e: Error) -> Result<(), Error> {
        self.state = State::Closed(None);
        self.psk = None;
        self.out.event(Event::Failed(e));
        Err(e)
    }

    /// Handles one IKE datagram (without the non-ESP marker) that arrived on `local` from
    /// `remote` at `now`. An `Err` says why the datagram was dropped or the negotiation
    /// failed; in the latter case [`Event::Failed`] is reported too.
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
        let (now, local, remote, datagram) = (d.now, d.local, d.remote, d.bytes);
        let h = &d.header;
        match mem::replace(&mut self.state, State::Closed(None)) {
            State::ExpectInit(mut s) => {
                match self.init_response(&mut s, now, local, remote, datagram, entropy) {
                    Ok(None) => {
                        self.state = State::ExpectInit(s);
                        Ok(())
                    }
                    Ok(Some(next)) => {
                        self.state = State::ExpectAuth(next);
                        Ok(())
                    }
                    Err(e) if e.is_drop() => {
                        self.state = State::ExpectInit(s);
                        Err(e)
                    }
                    Err(e) => self.fail(e),
                }
            }
            State::ExpectAuth(s) => self.auth_response(s, now, h, datagram, entropy),
            State::Established(mut s) => {
                let (state, r) = match s.handle_datagram(&mut self.out, d, entropy) {
                    Ok(Next::Close(cache)) => {
                        self.redirected_to = s.redirected_to().cloned();
                        (State::Closed(cache), Ok(()))
                    }
                    Ok(Next::Stay) => (State::Established(s), Ok(())),
                    Err(e) => (State::Established(s), Err(e)),
                };
                self.state = state;
                r
            }
            State::Closed(cache) => {
                // RFC 7296 §2.1: a retransmitted request is answered with the same response.
                let r = match cache.as_ref().and_then(|k| k.answer(datagram)) {
                    Some(resp) => {
                        self.out.send(local, remote, resp.to_vec());
                        Ok(())
                    }
                    None => Err(Error::Unexpected("the IKE SA is closed")),
                };
                self.state = State::Closed(cache);
                r
            }
        }
    }

    /// Runs the timers due at `now`: retransmissions (and giving up), liveness checks,
    /// rekeys. Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Instant, entropy: &mut dyn Entropy) {
        let policy = self.config.retransmit;
        match mem::replace(&mut self.state, State::Closed(None)) {
            State::ExpectInit(mut s) if now >= s.deadline => {
                if s.retransmits >= policy.tries {
                    let _ = self.fail(Error::Timeout("no IKE_SA_INIT response"));
                    return;
                }
                s.retransmits += 1;
                s.deadline = deadline(now, policy.wait(s.retransmits));
                self.send(s.request.clone());
                self.state = State::ExpectInit(s);
            }
            State::ExpectAuth(mut s) => match s.session.on_timer(now, &policy) {
                Retry::Idle => self.state = State::ExpectAuth(s),
                Retry::Resend(d) => {
                    self.send(d);
                    self.state = State::ExpectAuth(s);
                }
                Retry::GiveUp => {
                    let _ = self.fail(Error::Timeout("no IKE_AUTH response"));
                }
            },
            State::Established(mut s) => {
                self.state = match s.handle_timeout(&mut self.out, now, entropy) {
                    Next::Stay => State::Established(s),
                    Next::Close(cache) => State::Closed(cache),
                };
            }
            other => self.state = other,
        }
    }
}

#[cfg(test)]
mod tests {
    use concentrator_algorithms::{DhGroup, parse_esp, parse_ike};
    use concentrator_crypto::CryptoError;

    use super::*;
    use crate::message::codepoints::PayloadType;
    use crate::payload::Identity;

    /// Deterministic entropy: counting bytes, fixed private keys.
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
            let len = if group == DhGroup::Ecp384 { 48 } else { 32 };
            KeyExchange::from_private_key(group, &vec![7; len])
        }
    }

    fn config() -> Arc<Config> {
        Arc::new(Config::new(
            vec![parse_ike("ike", "aes128gcm16-prfsha256-x25519-ecp256").unwrap()],
            vec![parse_esp("esp", "aes128gcm16").unwrap()],
            "10.1.0.0/24".parse().unwrap(),
            "10.2.0.0/24".parse().unwrap(),
            IdBuf::new(&Identity::Fqdn(b"site")),
        ))
    }

    fn addrs() -> (SocketAddr, SocketAddr) {
        ("192.0.2.1:500".parse().unwrap(), "192.0.2.2:500".parse().unwrap())
    }

    fn start() -> (Initiator, Vec<u8>) {
        let (local, remote) = addrs();
        let mut i =
            Initiator::connect(config(), b"psk", local, remote, Instant::now(), &mut Counter(0)).unwrap();
        let t = i.poll_transmit().unwrap();
        assert_eq!((t.local, t.remote), (local, remote));
        (i, t.payload)
    }

    fn response(spi_i: u64, payloads: Vec<Payload<'_>>) -> Vec<u8> {
        Message {
            header: Header::new(spi_i, 0, ExchangeType::IKE_SA_INIT, Flags::RESPONSE, 0),
            payloads,
        }
        .to_vec()
    }

    #[test]
    fn ike_sa_init_request_offers_ke_nonce_and_nat_detection() {
        let (i, req) = start();
        let m = Message::decode(&req).unwrap();
        assert_eq!(m.header.flags, Flags::INITIATOR);
        assert_eq!(m.header.spi_i, i.spi_i());
        let types: Vec<_> = m.payloads.iter().map(Payload::payload_type).collect();
        assert_eq!(
            types,
            [
                PayloadType::SA,
                PayloadType::KE,
                PayloadType::NONCE,
                PayloadType::NOTIFY,
                PayloadType::NOTIFY,
                PayloadType::NOTIFY
            ]
        );
        assert!(matches!(&m.payloads[1], Payload::Ke(k) if k.group == WireGroup::CURVE25519));
        // RFC 5685 §3: we can be redirected.
        assert_eq!(
            m.payloads[5],
            Payload::Notify(Notify::new(NotifyType::REDIRECT_SUPPORTED, &[]))
        );
    }

    #[test]
    fn follows_a_redirect_in_ike_sa_init_only_with_our_nonce() {
        let (mut i, req) = start();
        let (local, remote) = addrs();
        let ni = Message::decode(&req)
            .unwrap()
            .payloads
            .iter()
            .find_map(|p| match p {
                Payload::Nonce(n) => Some(n.data.to_vec()),
                _ => None,
            })
            .unwrap();
        let gw = GatewayId::Ip("192.0.2.9".parse().unwrap());
        // RFC 5685 §4.1: a REDIRECT with another nonce is not for our request.
        let forged = crate::redirect::encode_redirect(&gw, Some(&[0; 32]));
        let forged = response(
            i.spi_i(),
            vec![Payload::Notify(Notify::new(NotifyType::REDIRECT, &forged))],
        );
        assert!(matches!(
            i.handle_datagram(Instant::now(), local, remote, &forged, &mut Counter(9)),
            Err(Error::Unexpected(_))
        ));
        assert!(!i.is_closed());
        let data = crate::redirect::encode_redirect(&gw, Some(&ni));
        let real = response(
            i.spi_i(),
            vec![Payload::Notify(Notify::new(NotifyType::REDIRECT, &data))],
        );
        assert_eq!(
            i.handle_datagram(Instant::now(), local, remote, &real, &mut Counter(9)),
            Err(Error::Redirected)
        );
        assert!(i.is_closed());
        assert_eq!(i.redirected_to(), Some(&gw));
        assert!(matches!(i.poll_event(), Some(Event::Failed(Error::Redirected))));
    }

    #[test]
    fn names_the_gateway_it_was_redirected_from() {
        let (local, remote) = addrs();
        let mut c = (*config()).clone();
        c.redirected_from = Some(GatewayId::Fqdn("old-gw.example".into()));
        let mut i = Initiator::connect(
            Arc::new(c),
            b"psk",
            local,
            remote,
            Instant::now(),
            &mut Counter(0),
        )
        .unwrap();
        let req = i.poll_transmit().unwrap().payload;
        let m = Message::decode(&req).unwrap();
        let from = encode_redirected_from(&GatewayId::Fqdn("old-gw.example".into()));
        assert_eq!(
            m.payloads.last(),
            Some(&Payload::Notify(Notify::new(NotifyType::REDIRECTED_FROM, &from)))
        );
        assert!(
            !m.payloads
                .iter()
                .any(|p| matches!(p, Payload::Notify(n) if n.notify_type == NotifyType::REDIRECT_SUPPORTED))
        );
    }

    #[test]
    fn echoes_a_cookie_first_with_everything_else_unchanged() {
        let (mut i, first) = start();
        let (local, remote) = addrs();
        let cookie = response(
            i.spi_i(),
            vec![Payload::Notify(Notify::new(NotifyType::COOKIE, &[9; 20]))],
        );
        i.handle_datagram(Instant::now(), local, remote, &cookie, &mut Counter(50))
            .unwrap();
        let again = i.poll_transmit().unwrap().payload;
        let (a, b) = (Message::decode(&first).unwrap(), Message::decode(&again).unwrap());
        assert_eq!(
            b.payloads[0],
            Payload::Notify(Notify::new(NotifyType::COOKIE, &[9; 20]))
        );
        assert_eq!(b.payloads[1..], a.payloads[..]);
        assert_eq!(
            b.header,
            Header {
                length: b.header.length,
                next_payload: b.header.next_payload,
                ..a.header
            }
        );
    }

    #[test]
    fn retries_with_the_group_of_invalid_ke_payload_and_refuses_one_not_offered() {
        let (mut i, _) = start();
        let (local, remote) = addrs();
        let ecp256 = 19u16.to_be_bytes();
        let invalid = response(
            i.spi_i(),
            vec![Payload::Notify(Notify::new(
                NotifyType::INVALID_KE_PAYLOAD,
                &ecp256,
            ))],
        );
        i.handle_datagram(Instant::now(), local, remote, &invalid, &mut Counter(50))
            .unwrap();
        let again = i.poll_transmit().unwrap().payload;
        let m = Message::decode(&again).unwrap();
        assert!(
            matches!(&m.payloads[1], Payload::Ke(k) if k.group == WireGroup::ECP_256 && k.data.len() == 64)
        );

        let modp = 14u16.to_be_bytes();
        let invalid = response(
            i.spi_i(),
            vec![Payload::Notify(Notify::new(
                NotifyType::INVALID_KE_PAYLOAD,
                &modp,
            ))],
        );
        let e = Error::Refused {
            exchange: ExchangeType::IKE_SA_INIT,
            notify: NotifyType::INVALID_KE_PAYLOAD,
        };
        assert_eq!(
            i.handle_datagram(Instant::now(), local, remote, &invalid, &mut Counter(50)),
            Err(e)
        );
        assert!(i.is_closed());
        assert!(matches!(i.poll_event(), Some(Event::Failed(f)) if f == e));
    }

    #[test]
    fn gives_up_after_max_init_retries() {
        let (mut i, _) = start();
        let (local, remote) = addrs();
        let cookie = response(
            i.spi_i(),
            vec![Payload::Notify(Notify::new(NotifyType::COOKIE, &[1]))],
        );
        for _ in 0..Config::DEFAULT_MAX_INIT_RETRIES {
            i.handle_datagram(Instant::now(), local, remote, &cookie, &mut Counter(50))
                .unwrap();
        }
        assert_eq!(
            i.handle_datagram(Instant::now(), local, remote, &cookie, &mut Counter(50)),
            Err(Error::TooManyRetries(Config::DEFAULT_MAX_INIT_RETRIES))
        );
    }

    #[test]
    fn drops_garbage_and_fails_on_no_proposal_chosen() {
        let (mut i, req) = start();
        let (local, remote) = addrs();
        let now = Instant::now();
        for n in 0..req.len() {
            assert!(
                i.handle_datagram(now, local, remote, &req[..n], &mut Counter(1))
                    .is_err()
            );
        }
        // Our own request echoed back is not a response.
        assert!(matches!(
            i.handle_datagram(now, local, remote, &req, &mut Counter(1)),
            Err(Error::Unexpected(_))
        ));
        assert!(!i.is_closed());
        let refusal = response(
            i.spi_i(),
            vec![Payload::Notify(Notify::new(NotifyType::NO_PROPOSAL_CHOSEN, &[]))],
        );
        assert_eq!(
            i.handle_datagram(now, local, remote, &refusal, &mut Counter(1))
                .map_err(|e| e.notify()),
            Err(Some(NotifyType::NO_PROPOSAL_CHOSEN))
        );
        assert!(i.is_closed());
    }

    #[test]
    fn retransmits_ike_sa_init_with_back_off_then_fails() {
        let (mut i, req) = start();
        let policy = Retransmit::default();
        let mut now = Instant::now();
        for n in 0..policy.tries {
            let due = i.poll_timeout().unwrap();
            assert!(due > now);
            now = due;
            i.handle_timeout(now, &mut Counter(1));
            assert_eq!(i.poll_transmit().unwrap().payload, req, "retransmission {n}");
        }
        now = i.poll_timeout().unwrap();
        i.handle_timeout(now, &mut Counter(1));
        assert!(i.poll_transmit().is_none());
        assert!(matches!(i.poll_event(), Some(Event::Failed(Error::Timeout(_)))));
        assert!(i.poll_timeout().is_none());
    }
}
