//! Many IKE SAs behind one pair of UDP ports: the endpoint routes each datagram to its
//! [`Responder`] or [`Initiator`], with the header read once, creates responders for new IKE_SA_INIT requests, bounds the half-open ones
//! and defends them with stateless cookies (RFC 7296 §2.6), and forgets SAs that failed or
//! never finished.
//!
//! Sans-IO like the responder: datagrams in ([`Endpoint::handle_datagram`]), datagrams and
//! events out ([`Endpoint::poll_transmit`], [`Endpoint::poll_event`]), time as an argument
//! ([`Endpoint::handle_timeout`]). A request is routed by our SPI once we have chosen one; an
//! IKE_SA_INIT request (SPIr zero) by the initiator's address and SPI, so a retransmitted
//! request reaches the responder that answered it instead of creating a second SA.
//!
//! Each SA is named by the SPI we chose in IKE_SA_INIT (its "id" in [`EndpointEvent`]) for
//! its whole life, even after an IKE SA rekey gives it new SPIs: the endpoint routes every
//! SPI the responder answers for ([`Responder::spis_r`]) to it.
//!
//! The endpoint also starts IKE SAs ([`Endpoint::connect`], an [`Initiator`] named by its
//! SPIi). Both kinds live in one map, id to [`Sa`] (the role we have in it), and report
//! through one [`EndpointEvent::Sa`] that names the role. The Initiator flag of the header tells the two apart (RFC 7296 §3.1: it is set
//! by the original initiator of the IKE SA): a message with it comes from a peer that
//! initiated, so our SPI is SPIr; without it, from a peer we initiated to, so ours is SPIi.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_algorithms::Prf as PrfAlg;
use concentrator_crypto::Prf;
use concentrator_crypto::util::constant_time_eq as ct_eq;

use crate::Message;
use crate::error::Error;
use crate::initiator::Initiator;
use crate::message::codepoints::{ExchangeType, NotifyType};
use crate::message::header::Flags;
use crate::payload::Payload;
use crate::redirect::GatewayId;
use crate::responder::{Responder, init_error};
use crate::sa::snapshot::{IkeSaSnapshot, InFlight, Role, SnapshotError};
use crate::sa::{Config, Entropy, Event, Incoming, Transmit};

mod sa;
pub use sa::Sa;

/// Limits of an endpoint.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Half-open SAs (IKE_SA_INIT answered, IKE_AUTH not finished) at or above which a new
    /// IKE_SA_INIT must return our COOKIE before we keep any state for it.
    pub cookie_threshold: usize,
    /// Half-open SAs at which new IKE_SA_INIT requests are dropped even with a valid cookie.
    pub max_half_open: usize,
    /// How long an SA may stay half-open.
    pub half_open_timeout: Duration,
    /// How long a failed negotiation still answers retransmissions of its last request.
    pub linger: Duration,
    /// How often the cookie secret changes (the previous one stays valid for one period, so
    /// an initiator that got a cookie just before the change is not refused).
    pub cookie_secret_lifetime: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            cookie_threshold: 1000,
            max_half_open: 20_000,
            half_open_timeout: Duration::from_secs(30),
            linger: Duration::from_secs(10),
            cookie_secret_lifetime: Duration::from_secs(120),
        }
    }
}

/// What the endpoint reports.
#[derive(Debug)]
pub enum EndpointEvent {
    /// An event of the IKE SA `id`.
    Sa {
        /// The SA's id: our SPI of its IKE_SA_INIT (0 for a request refused there).
        id: u64,
        /// Who started the SA: the peer, or we ([`Endpoint::connect`]).
        role: Role,
        /// The SA's event.
        event: Event,
    },
    /// The endpoint forgot this IKE SA (failed, expired half-open, or closed): whatever the
    /// caller keeps for it (a pending PSK lookup, tunnels) is stale now.
    Removed {
        /// The SA's id.
        id: u64,
        /// Whether the SA had been established.
        established: bool,
    },
}

/// Why a datagram was not handed to a responder, or what the responder said about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// Too short for an IKE header.
    #[error("not an IKE message")]
    NotIke,
    /// A request for an SPI we do not know (or no longer know).
    #[error("unknown IKE SPI {0:016x}")]
    UnknownSpi(u64),
    /// A response without our SPI: nothing we sent is answered by it.
    #[error("unexpected response")]
    UnexpectedResponse,
    /// Under load and without a valid cookie: answered with N(COOKIE), no state kept.
    #[error("cookie required (half-open SAs at the threshold)")]
    CookieRequired,
    /// Too many half-open SAs: dropped.
    #[error("half-open SA limit reached")]
    HalfOpenLimit,
    /// The initiator refused to start (configuration) or dropped the message.
    #[error(transparent)]
    Initiator(Error),
    /// Sent elsewhere with N(REDIRECT) (RFC 5685), no state kept.
    #[error("redirected to {0}")]
    Redirected(GatewayId),
    /// The responder dropped the message or failed the negotiation.
    #[error(transparent)]
    Responder(#[from] Error),
    /// A snapshot could not be taken or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A restored SA's SPI is one this endpoint already routes.
    #[error("SPI {0:016x} is in use here")]
    SpiInUse(u64),
}

/// Counts of the SAs an endpoint holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaCounts {
    /// IKE_SA_INIT answered, IKE_AUTH not finished.
    pub half_open: usize,
    /// Established.
    pub established: usize,
    /// Failed, answering retransmissions until they linger out.
    pub closing: usize,
    /// Initiated by us, not established yet.
    pub connecting: usize,
}

/// One SA and what the endpoint keeps for it. The map holds it boxed: a table of ~200-byte
/// slots is paid for at the table's load factor (up to twice over, per tunnel), a table of
/// pointers hardly.
struct Slot {
    sa: Sa,
    /// The SPIs routed to it: at most two (the IKE SA in use and the one a rekey replaced,
    /// see [`Sa::our_spis`]); 0 for none (no IKE SPI is zero, RFC 7296 §3.1).
    spis: [u64; 2],
    /// The peer's address and SPIi of the IKE_SA_INIT request that made a responder: its
    /// key in `by_init` until established. Boxed: only for the handshake.
    init_key: Option<Box<(SocketAddr, u64)>>,
    /// When it was created, or once closed, when it closed.
    since: Instant,
    closed: bool,
    /// It was established (and stays so once closed: [`EndpointEvent::Removed`]).
    established: bool,
    /// Its entry in the endpoint's `timers`, and the phase it is counted in.
    deadline: Option<Instant>,
    phase: Option<Phase>,
}

impl Slot {
    /// A slot for `sa`; `init_key` for a responder made by an IKE_SA_INIT request.
    fn new(sa: Sa, init_key: Option<(SocketAddr, u64)>, now: Instant) -> Box<Self> {
        Box::new(Self {
            sa,
            spis: [0; 2],
            init_key: init_key.map(Box::new),
            since: now,
            closed: false,
            established: false,
            deadline: None,
            phase: None,
        })
    }

    fn routed(&self) -> impl Iterator<Item = u64> + '_ {
        self.spis.iter().copied().filter(|s| *s != 0)
    }

    fn closed_at(&self) -> Option<Instant> {
        self.closed.then_some(self.since)
    }

    /// Drops the slot's `by_init` entry (it is `id`'s), if any.
    fn forget_init_key(&mut self, by_init: &mut HashMap<(SocketAddr, u64), u64>, id: u64) {
        if let Some(key) = self.init_key.take()
            && by_init.get(&key) == Some(&id)
        {
            by_init.remove(&key);
        }
    }
}

struct CookieSecret {
    version: u8,
    key: [u8; 32],
    created: Instant,
}

/// Length of our cookies: one version octet and an HMAC-SHA-256 (RFC 7296 §2.6 allows 1 to
/// 64 octets).
const COOKIE_LEN: usize = 33;

/// The IKE SAs behind one address (see the module docs).
pub struct Endpoint {
    config: EndpointConfig,
    responder_config: Arc<Config>,
    /// SAs by id (our SPI of their IKE_SA_INIT), in either role.
    slots: HashMap<u64, Box<Slot>>,
    /// Every SPI of ours an SA answers for, to its id, but its id itself: nearly every SA
    /// answers for exactly its id all its life, and its slot is found by it (see
    /// [`Self::route`]).
    routes: HashMap<u64, u64>,
    /// Half-open responders by the peer's address and SPIi, for retransmitted IKE_SA_INITs.
    by_init: HashMap<(SocketAddr, u64), u64>,
    secret: Option<CookieSecret>,
    previous_secret: Option<CookieSecret>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<EndpointEvent>,
    redirect: Option<GatewayId>,
    /// Every SA's next deadline, in order, and each SA's entry in it: finding what is due
    /// costs a lookup, not a scan of every SA (tens of thousands at a time).
    timers: BTreeSet<(Instant, u64)>,
    /// The totals of the SAs' phases, kept as SAs change.
    counts: SaCounts,
    /// Established SAs touched since [`Endpoint::take_changed`] last ran, when the caller
    /// asked for them ([`Endpoint::track_changes`]).
    changed: Option<HashSet<u64>>,
}

/// Where an SA stands, for [`SaCounts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    HalfOpen,
    Established,
    Closing,
    Connecting,
}

impl SaCounts {
    fn slot(&mut self, phase: Phase) -> &mut usize {
        match phase {
            Phase::HalfOpen => &mut self.half_open,
            Phase::Established => &mut self.established,
            Phase::Closing => &mut self.closing,
            Phase::Connecting => &mut self.connecting,
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint whose new responders use `responder_config`.
    pub fn new(config: EndpointConfig, responder_config: Arc<Config>) -> Self {
        Self {
            config,
            responder_config,
            slots: HashMap::new(),
            routes: HashMap::new(),
            by_init: HashMap::new(),
            secret: None,
            previous_secret: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            redirect: None,
            timers: BTreeSet::new(),
            counts: SaCounts::default(),
            changed: None,
        }
    }

    /// From now on, remembers which established SAs each call touched (a message handled,
    /// a timer run, a request started), for [`Self::take_changed`]: a fleet replicates
    /// their snapshots.
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(HashSet::new);
    }

    /// The established SAs touched since the last call (empty unless tracking).
    pub fn take_changed(&mut self) -> Vec<u64> {
        self.changed
            .as_mut()
            .map(|c| c.drain().collect())
            .unwrap_or_default()
    }

    /// SA `id`'s next deadline: the SA's own timer, or ours (half-open expiry of a
    /// responder, linger of a closed SA).
    fn deadline_of(&self, id: u64) -> Option<Instant> {
        let s = self.slots.get(&id)?;
        if let Some(at) = s.closed_at() {
            return Some(at + self.config.linger);
        }
        let half_open = match s.sa {
            Sa::Responder(_) if !s.established => Some(s.since + self.config.half_open_timeout),
            _ => None,
        };
        half_open.into_iter().chain(s.sa.poll_timeout()).min()
    }

    /// Whether SA `id` is due to be forgotten: closed and lingered, or a responder that took
    /// too long to finish IKE_AUTH.
    fn expired(&self, id: u64, now: Instant) -> bool {
        self.slots.get(&id).is_some_and(|s| match (s.closed_at(), &s.sa) {
            (Some(at), _) => now >= at + self.config.linger,
            (None, Sa::Responder(_)) => !s.established && now >= s.since + self.config.half_open_timeout,
            (None, Sa::Initiator(_)) => false,
        })
    }

    fn phase_of(&self, id: u64) -> Option<Phase> {
        let s = self.slots.get(&id)?;
        Some(match (s.closed_at(), s.sa.is_established(), &s.sa) {
            (Some(_), _, _) => Phase::Closing,
            (None, true, _) => Phase::Established,
            (None, false, Sa::Responder(_)) => Phase::HalfOpen,
            (None, false, Sa::Initiator(_)) => Phase::Connecting,
        })
    }

    /// Brings SA `id`'s timer entry and phase count up to date (after anything that may
    /// have changed them).
    fn refresh(&mut self, id: u64) {
        let (deadline, phase) = (self.deadline_of(id), self.phase_of(id));
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        if slot.deadline != deadline {
            if let Some(old) = slot.deadline {
                self.timers.remove(&(old, id));
            }
            if let Some(t) = deadline {
                self.timers.insert((t, id));
            }
            slot.deadline = deadline;
        }
        if slot.phase != phase {
            Self::count(&mut self.counts, slot.phase, phase);
            slot.phase = phase;
        }
    }

    /// Moves one SA from phase `old` to `new` in the totals.
    fn count(counts: &mut SaCounts, old: Option<Phase>, new: Option<Phase>) {
        if let Some(p) = old {
            let n = counts.slot(p);
            *n = n.saturating_sub(1);
        }
        if let Some(p) = new {
            *counts.slot(p) += 1;
        }
    }

    /// From now on, send new initiators that announce REDIRECT_SUPPORTED to `gateway`
    /// (RFC 5685 §4.1: redirect during IKE_SA_INIT, before any state is kept); `None`
    /// accepts them again. Initiators that do not support redirects are served as usual.
    pub fn set_redirect(&mut self, gateway: Option<GatewayId>) {
        self.redirect = gateway;
    }

    /// The configuration of responders created from now on (existing SAs keep theirs).
    pub fn set_responder_config(&mut self, config: Arc<Config>) {
        self.responder_config = config;
    }

    /// How many SAs are in each phase.
    pub fn counts(&self) -> SaCounts {
        self.counts
    }

    /// The IKE SA `id`, while the endpoint keeps it: after it closed, until it lingered out
    /// (e.g. to read [`Initiator::redirected_to`]).
    pub fn sa(&self, id: u64) -> Option<&Sa> {
        self.slots.get(&id).map(|s| &s.sa)
    }

    /// Every IKE SA the endpoint keeps, with its id.
    pub fn sas(&self) -> impl Iterator<Item = (u64, &Sa)> {
        self.slots.iter().map(|(id, s)| (*id, &s.sa))
    }

    /// The responder of the IKE SA `id`.
    pub fn responder_mut(&mut self, id: u64) -> Option<&mut Responder> {
        match self.slots.get_mut(&id).map(|s| &mut s.sa) {
            Some(Sa::Responder(r)) => Some(r),
            _ => None,
        }
    }

    /// Sends the peer of our established responder SA `id` to `gateway` (RFC 5685 §5,
    /// [`Responder::redirect`]): an INFORMATIONAL request with N(REDIRECT); the SA stays
    /// until the peer deletes it. Refused for a peer that did not announce redirects, an SA
    /// not established, and SAs we initiated.
    pub fn redirect(&mut self, id: u64, now: Instant, gateway: &GatewayId) -> Result<(), EndpointError> {
        let responder = self.responder_mut(id).ok_or(EndpointError::UnknownSpi(id))?;
        responder.redirect(now, gateway)?;
        self.collect(id, now);
        Ok(())
    }

    /// The initiator of SA `id` (one we started), while the endpoint keeps it.
    pub fn initiator(&self, id: u64) -> Option<&Initiator> {
        match self.sa(id) {
            Some(Sa::Initiator(i)) => Some(i),
            _ => None,
        }
    }

    /// The data plane saw authenticated ESP from the peer of SA `id` at `now`: proof of
    /// liveness, so no liveness check is needed yet.
    pub fn handle_child_traffic(&mut self, id: u64, now: Instant) {
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.sa.handle_child_traffic(now);
        }
        self.refresh(id);
    }

    /// Rekeys CHILD SA `spi_in` (our inbound SPI) of SA `id` now, whichever role we have in
    /// it ([`Responder::rekey_child`], [`Initiator::rekey_child`]); false when there is
    /// nothing to rekey.
    pub fn rekey_child(&mut self, id: u64, spi_in: u32, now: Instant, entropy: &mut dyn Entropy) -> bool {
        let Some(slot) = self.slots.get_mut(&id) else {
            return false;
        };
        let started = !slot.closed && slot.sa.rekey_child(spi_in, now, entropy);
        self.collect(id, now);
        started
    }

    /// Starts an IKE SA of ours from `local` to `remote` with `psk`; returns its id (our
    /// SPIi). Its events come with [`Role::Initiator`].
    pub fn connect(
        &mut self,
        config: Arc<Config>,
        psk: &[u8],
        local: SocketAddr,
        remote: SocketAddr,
        now: Instant,
        entropy: &mut dyn Entropy,
    ) -> Result<u64, EndpointError> {
        // Ids of both kinds share one namespace: a fresh SPIi that collides is drawn again.
        for _ in 0..4 {
            let i = Initiator::connect(config.clone(), psk, local, remote, now, entropy)
                .map_err(EndpointError::Initiator)?;
            let id = i.spi_i();
            if self.is_taken(id) {
                continue;
            }
            self.slots
                .insert(id, Slot::new(Sa::Initiator(Box::new(i)), None, now));
            self.collect(id, now);
            return Ok(id);
        }
        Err(EndpointError::UnknownSpi(0))
    }

    /// The established IKE SA `id` as data, to be carried on elsewhere ([`Self::restore`]).
    pub fn snapshot(&self, id: u64, now: Instant) -> Result<IkeSaSnapshot, EndpointError> {
        let slot = self.slots.get(&id).ok_or(EndpointError::UnknownSpi(id))?;
        Ok(slot.sa.snapshot(now)?)
    }

    /// Carries on the IKE SA of a [`Self::snapshot`] here, under `config` if the peer
    /// started it or `initiator_config` if we did; returns its id (our SPI of the IKE SA in
    /// use). Its CHILD SAs are not reported: the caller installs them from the snapshot.
    /// Nothing changes when any of its SPIs is in use here already.
    pub fn restore(
        &mut self,
        snapshot: IkeSaSnapshot,
        config: Arc<Config>,
        initiator_config: Arc<Config>,
        now: Instant,
    ) -> Result<u64, EndpointError> {
        // The SPI of an IKE SA rekey in flight becomes a route once the rekey completes.
        if let InFlight::IkeRekey { spi_i, .. } = snapshot.in_flight
            && self.is_taken(spi_i)
        {
            return Err(EndpointError::SpiInUse(spi_i));
        }
        let (sa, id) = match snapshot.role {
            Role::Responder => {
                let r = Responder::restore(config, snapshot, now)?;
                let id = r.spi_r().ok_or(SnapshotError::NotEstablished)?;
                (Sa::Responder(r), id)
            }
            Role::Initiator => {
                let i = Initiator::restore(initiator_config, snapshot, now)?;
                let id = i.spi_i();
                (Sa::Initiator(Box::new(i)), id)
            }
        };
        if let Some(used) = sa.our_spis().into_iter().chain([id]).find(|s| self.is_taken(*s)) {
            return Err(EndpointError::SpiInUse(used));
        }
        let mut slot = Slot::new(sa, None, now);
        slot.established = true;
        self.slots.insert(id, slot);
        self.collect(id, now);
        Ok(id)
    }

    /// The id of the SA that answers for our SPI `spi`: the SA named by it, if that one
    /// still answers for it (an IKE SA rekey moves an SA to new SPIs), or the one a route
    /// names. (No route names another SA's id: an id stays taken while its SA lives.)
    fn route(&self, spi: u64) -> Option<u64> {
        match self.slots.get(&spi) {
            Some(s) if s.routed().any(|r| r == spi) => Some(spi),
            _ => self.routes.get(&spi).copied(),
        }
    }

    /// Whether `spi` names an SA here (as an id or a route).
    fn is_taken(&self, spi: u64) -> bool {
        self.slots.contains_key(&spi) || self.routes.contains_key(&spi)
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<EndpointEvent> {
        self.events.pop_front()
    }

    /// The next instant [`Endpoint::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Runs the responders' and initiators' timers (liveness checks, retransmissions,
    /// rekeys) and forgets half-open SAs that took too long and closed ones that lingered
    /// long enough. Only the SAs that are due are visited.
    pub fn handle_timeout(&mut self, now: Instant, entropy: &mut dyn Entropy) {
        let due: Vec<(Instant, u64)> = self
            .timers
            .iter()
            .take_while(|(t, _)| *t <= now)
            .copied()
            .collect();
        for (t, id) in due {
            let Some(slot) = self.slots.get_mut(&id) else {
                // Not reached: a removed SA takes its entry with it.
                self.timers.remove(&(t, id));
                continue;
            };
            if !slot.closed && slot.sa.poll_timeout().is_some_and(|t| t <= now) {
                slot.sa.handle_timeout(now, entropy);
            }
            self.collect(id, now);
            if self.expired(id, now) {
                self.remove(id);
            }
        }
    }

    /// Hands the PSK of a peer (after [`Event::PeerIdentified`]) to SA `id`; `None` refuses
    /// the peer. The SA may have gone meanwhile (expired, or the peer gave up).
    pub fn provide_psk(
        &mut self,
        id: u64,
        now: Instant,
        psk: Option<&[u8]>,
        entropy: &mut dyn Entropy,
    ) -> Result<(), EndpointError> {
        let responder = self.responder_mut(id).ok_or(EndpointError::UnknownSpi(id))?;
        let r = responder.provide_psk(now, psk, entropy);
        self.collect(id, now);
        r.map_err(EndpointError::from)
    }

    /// Deletes SA `id` from our side: the peer gets an INFORMATIONAL DELETE (if the SA is
    /// established) and the SA closes at once ([`Responder::delete`], [`Initiator::delete`]).
    pub fn delete(&mut self, id: u64, now: Instant) {
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.sa.delete(now);
            self.collect(id, now);
        }
    }

    /// Ends an SA at once (no DELETE is sent): a gateway shutting down, a replaced peer.
    pub fn close(&mut self, id: u64) {
        self.remove(id);
    }

    /// Handles one IKE datagram (without the non-ESP marker of port 4500) that arrived on
    /// `local` from `remote`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        entropy: &mut dyn Entropy,
    ) -> Result<(), EndpointError> {
        let d = Incoming::new(now, local, remote, datagram).ok_or(EndpointError::NotIke)?;
        let header = d.header;
        // Responders and initiators both answer for every SPI of ours they name, so the SA is
        // found across IKE SA rekeys from either side ([`crate::message::header::Header::our_spi`]).
        let from_initiator = header.flags.contains(Flags::INITIATOR);
        let ours = header.our_spi().unwrap_or(0);
        if ours != 0
            && let Some(id) = self.route(ours)
            && let Some(slot) = self.slots.get_mut(&id)
        {
            let r = slot.sa.handle(&d, entropy);
            self.collect(id, now);
            return r.map_err(EndpointError::from);
        }
        if !from_initiator || header.spi_r != 0 {
            return Err(EndpointError::UnknownSpi(ours));
        }
        // Responses answer our liveness checks on established SAs, which have our SPI; a
        // response without it answers nothing we sent.
        if header.flags.contains(Flags::RESPONSE) {
            return Err(EndpointError::UnexpectedResponse);
        }
        if let Some(&spi_r) = self.by_init.get(&(remote, header.spi_i)) {
            // A retransmitted IKE_SA_INIT (or garbage with its SPI): its responder decides.
            let slot = self
                .slots
                .get_mut(&spi_r)
                .ok_or(EndpointError::UnknownSpi(spi_r))?;
            let r = slot.sa.handle(&d, entropy);
            self.collect(spi_r, now);
            return r.map_err(EndpointError::from);
        }
        if header.exchange != ExchangeType::IKE_SA_INIT {
            return Err(EndpointError::UnknownSpi(0));
        }
        let half_open = self.counts().half_open;
        // Redirects and cookies read the request's payloads: decoded once for both.
        let msg = if self.redirect.is_some() || half_open >= self.config.cookie_threshold {
            Some(Message::decode(datagram).map_err(Error::from)?)
        } else {
            None
        };
        if let (Some(gateway), Some(msg)) = (self.redirect.clone(), &msg) {
            self.redirect_init(local, remote, msg, gateway)?;
        }
        if half_open >= self.config.max_half_open {
            return Err(EndpointError::HalfOpenLimit);
        }
        if let Some(msg) = &msg
            && half_open >= self.config.cookie_threshold
        {
            self.check_cookie(now, local, remote, msg, entropy)?;
        }
        let mut responder = Responder::new(Arc::clone(&self.responder_config));
        let r = responder.handle(&d, entropy);
        match responder.spi_r() {
            Some(spi_r) if !self.is_taken(spi_r) => {
                self.by_init.insert((remote, header.spi_i), spi_r);
                let slot = Slot::new(Sa::Responder(responder), Some((remote, header.spi_i)), now);
                self.slots.insert(spi_r, slot);
                self.collect(spi_r, now);
            }
            Some(_) => {
                // A random 64-bit SPI that collides with a live one: drop the request, the
                // initiator's retransmission gets a fresh SPI.
                return Err(EndpointError::UnknownSpi(0));
            }
            None => {
                // Refused at IKE_SA_INIT: the error response goes out, no state stays.
                self.transmits
                    .extend(std::iter::from_fn(|| responder.poll_transmit()));
                while let Some(event) = responder.poll_event() {
                    self.events.push_back(EndpointEvent::Sa {
                        id: 0,
                        role: Role::Responder,
                        event,
                    });
                }
            }
        }
        r.map_err(EndpointError::from)
    }

    /// Takes SA `id`'s output and updates its phase and routes.
    fn collect(&mut self, id: u64, now: Instant) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        // A closed SA still answers retransmissions on its last SPIs until it is removed; an
        // open one answers for exactly the SPIs it names.
        if !slot.sa.is_closed() {
            let spis = slot.sa.our_spis();
            for old in slot.routed().filter(|s| !spis.contains(s)) {
                self.routes.remove(&old);
            }
            let mut routed = [0; 2];
            for (new, at) in spis.iter().zip(&mut routed) {
                if *new != id {
                    self.routes.insert(*new, id);
                }
                *at = *new;
            }
            slot.spis = routed;
        }
        self.transmits
            .extend(std::iter::from_fn(|| slot.sa.poll_transmit()));
        let role = slot.sa.role();
        while let Some(event) = slot.sa.poll_event() {
            self.events.push_back(EndpointEvent::Sa { id, role, event });
        }
        if slot.sa.is_established() && !slot.established {
            slot.established = true;
            // Established SAs are routed by our SPI only.
            slot.forget_init_key(&mut self.by_init, id);
            // So a retransmitted IKE_SA_INIT (no SPI of ours) never reaches it again: the
            // copy of that exchange it kept is a few hundred bytes per tunnel for nothing.
            slot.sa.forget_init_exchange();
        }
        if slot.sa.is_closed() && !slot.closed {
            slot.closed = true;
            slot.since = now;
        }
        if let Some(changed) = &mut self.changed
            && slot.established
            && !slot.sa.is_closed()
        {
            changed.insert(id);
        }
        self.refresh(id);
    }

    fn remove(&mut self, spi_r: u64) {
        if let Some(mut slot) = self.slots.remove(&spi_r) {
            if let Some(changed) = &mut self.changed {
                changed.remove(&spi_r);
            }
            for spi in slot.routed() {
                self.routes.remove(&spi);
            }
            slot.forget_init_key(&mut self.by_init, spi_r);
            if let Some(t) = slot.deadline {
                self.timers.remove(&(t, spi_r));
            }
            Self::count(&mut self.counts, slot.phase, None);
            self.events.push_back(EndpointEvent::Removed {
                id: spi_r,
                established: slot.established,
            });
        }
    }

    /// RFC 7296 §2.6: under load, an IKE_SA_INIT request must echo a cookie we computed
    /// from its Ni, the initiator's address and SPIi, so that only initiators that receive at
    /// their claimed address make us keep state. Answers N(COOKIE) when it does not.
    fn check_cookie(
        &mut self,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        msg: &Message<'_>,
        entropy: &mut dyn Entropy,
    ) -> Result<(), EndpointError> {
        let header = &msg.header;
        let (mut nonce, mut cookie) = (None, None);
        for p in &msg.payloads {
            match p {
                Payload::Nonce(n) => nonce = Some(n.data),
                Payload::Notify(n) if n.notify_type == NotifyType::COOKIE => cookie = Some(n.data),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(Error::MissingPayload("Ni"))?;
        self.rotate_secret(now, entropy)?;
        let valid = cookie.is_some_and(|c| {
            [&self.secret, &self.previous_secret]
                .into_iter()
                .flatten()
                .any(|s| {
                    c.first() == Some(&s.version) && ct_eq(c, &cookie_for(s, nonce, remote, header.spi_i))
                })
        });
        if valid {
            return Ok(());
        }
        let Some(secret) = &self.secret else {
            return Err(EndpointError::CookieRequired);
        };
        let cookie = cookie_for(secret, nonce, remote, header.spi_i);
        let response = init_error(&msg.header, NotifyType::COOKIE, &cookie);
        self.transmits.push_back(Transmit {
            local,
            remote,
            payload: response,
        });
        Err(EndpointError::CookieRequired)
    }

    /// RFC 5685 §4.1: an IKE_SA_INIT request with N(REDIRECT_SUPPORTED) is answered with
    /// N(REDIRECT) naming the new gateway and echoing Ni (the unprotected response is bound
    /// to the request by the nonce). Returns `Ok` to go on when the initiator does not
    /// support redirects.
    fn redirect_init(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        msg: &Message<'_>,
        gateway: GatewayId,
    ) -> Result<(), EndpointError> {
        let Some(response) = init_redirect_response(msg, &gateway) else {
            return Ok(());
        };
        self.transmits.push_back(Transmit {
            local,
            remote,
            payload: response,
        });
        Err(EndpointError::Redirected(gateway))
    }

    fn rotate_secret(&mut self, now: Instant, entropy: &mut dyn Entropy) -> Result<(), EndpointError> {
        let fresh = self
            .secret
            .as_ref()
            .is_some_and(|s| now < s.created + self.config.cookie_secret_lifetime);
        if fresh {
            return Ok(());
        }
        let mut key = [0u8; 32];
        entropy
            .fill(&mut key)
            .map_err(|e| EndpointError::Responder(Error::Crypto(e)))?;
        let version = self.secret.as_ref().map_or(0, |s| s.version.wrapping_add(1));
        self.previous_secret = self.secret.replace(CookieSecret {
            version,
            key,
            created: now,
        });
        Ok(())
    }
}

/// `Cookie = <VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>)` (RFC 7296 §2.6), with
/// HMAC-SHA-256 keyed by the secret as the hash.
fn cookie_for(secret: &CookieSecret, nonce: &[u8], remote: SocketAddr, spi_i: u64) -> Vec<u8> {
    let ip = match remote.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mac = Prf::new(PrfAlg::HmacSha256).compute(&secret.key, &[nonce, &ip, &spi_i.to_be_bytes()]);
    let mut cookie = Vec::with_capacity(COOKIE_LEN);
    cookie.push(secret.version);
    cookie.extend_from_slice(mac.expose());
    cookie
}

/// RFC 5685 §4.1, the answer to the IKE_SA_INIT request `msg` that sends its initiator to
/// `gateway`: "the VPN gateway MUST include the nonce data from the Ni payload sent by the
/// client" in N(REDIRECT). `None` when the initiator cannot be redirected (no
/// REDIRECT_SUPPORTED, or already redirected, or no nonce): it is served as usual.
pub fn init_redirect_response(msg: &Message<'_>, gateway: &GatewayId) -> Option<Vec<u8>> {
    let r = crate::redirect::InitRedirect::of(msg);
    if !r.supported {
        return None;
    }
    let nonce = r.nonce?;
    let data = crate::redirect::encode_redirect(gateway, Some(nonce));
    Some(init_error(&msg.header, NotifyType::REDIRECT, &data))
}

/// What an established SA costs the endpoint, by its parts' sizes (issue 21: the goal is
/// a few KiB per tunnel for the whole gateway): a test that fails when one of them grows,
/// so that it grows on purpose. Measured on x86_64 and aarch64 Linux (64-bit pointers, a
/// 16-byte `Instant`).
#[cfg(test)]
mod size_budget {
    use std::mem::size_of;

    use crate::sa::established::Established;
    use crate::sa::session::{IkeSa, Session};

    #[test]
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    fn per_sa_state_stays_within_its_budget() {
        // Every established SA: its slot in the endpoint (the map holds a pointer to it) and
        // its Established, each one heap block.
        assert!(
            size_of::<super::Slot>() <= 128,
            "Slot: {}",
            size_of::<super::Slot>()
        );
        assert!(
            size_of::<Established>() <= 520,
            "Established: {}",
            size_of::<Established>()
        );
        assert!(size_of::<Session>() <= 304, "Session: {}", size_of::<Session>());
        assert!(size_of::<IkeSa>() <= 208, "IkeSa: {}", size_of::<IkeSa>());
        // Nothing inline for what is rare: the endpoint's map entry is a key and a pointer.
        assert_eq!(size_of::<(u64, Box<super::Slot>)>(), 16);
    }
}
