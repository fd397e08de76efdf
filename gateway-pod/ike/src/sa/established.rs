//! The established phase of an IKE SA, once for both roles ([`Established`]): the IKE SA in
//! use and the one a rekey replaced, the CHILD SAs, our request in flight, the path to the
//! peer and its liveness; the responses to our requests, rekeys by either side, the timers
//! (retransmissions, liveness checks, rekeys, the replaced SA's linger), DELETE and REDIRECT
//! of our own, and snapshot/restore. The peer's requests are in [`requests`].
//!
//! What differs by role is data: [`Role`] decides whether a REDIRECT of the peer is followed
//! (only an SA we initiated announced support for it, RFC 5685 §3) and whether the peer's
//! IKE SA rekeys need [`Config::accept_ike_rekey`]; the IKE_SA_INIT exchange kept for late
//! retransmissions is only the responder's.
//!
//! # Message IDs
//!
//! Both directions use a window of one (RFC 7296 §2.3; we never send SET_WINDOW_SIZE). A
//! request of the peer with the next expected Message ID is processed; a bitwise copy of the
//! last one is answered from the cache; anything else is dropped. Our own requests are
//! retransmitted until answered (see [`super::Retransmit`]).

mod requests;

use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::events::{Events, Output};
use super::mid_sync::{self, MidSync, SyncData};
use super::rekey::{self, ChildChange, Ours, soft_deadline};
use super::session::{IkeSa, Kept, Previous, Retry, Session};
use super::snapshot::{Exchange, IkeSaSnapshot, Role, SnapshotError, restore_children, snapshot_children};
use super::timers::TimerTable;
use super::{ChildRef, Config, DeleteReason, Entropy, Event, IdBuf, Incoming, REKEYED_SA_LINGER, deadline};
use crate::error::Error;
use crate::message::codepoints::NotifyType;
use crate::message::codepoints::{ExchangeType, ProtocolId};
use crate::message::header::Flags;
use crate::payload::{self, Delete, Notify, Payload};
use crate::redirect::{GatewayId, encode_redirect};

/// Retransmissions of our RFC 6311 sync request before it is given up (the SA stays, with
/// the catch-up window): enough to outlast a site that sends nothing for a while (a NAT
/// keepalive every 20 s), since after a take-over our messages reach it only once its own
/// come in through the front again.
const SYNC_TRIES: u32 = 4;

/// A request (by its digest) and our response, kept after the state that answered it is
/// gone. Boxed: most SAs have none.
pub(crate) type Cache = Option<Box<Kept>>;

/// What happens to the SA after a datagram or a timer.
pub(crate) enum Next {
    Stay,
    /// The IKE SA is gone; the last exchange answers retransmissions.
    Close(Cache),
}

/// What a role hands over once IKE_AUTH is done.
pub(crate) struct Authenticated {
    pub(crate) role: Role,
    pub(crate) session: Session,
    /// The first CHILD SAs, as reported installed.
    pub(crate) children: Vec<ChildRef>,
    pub(crate) peer_id: IdBuf,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    /// We initiated and moved to the NAT-T ports.
    pub(crate) floated: bool,
    /// The peer announced RFC 5685 redirects in IKE_SA_INIT.
    pub(crate) redirect_supported: bool,
    /// Both ends announced RFC 6311 Message ID synchronization in IKE_AUTH.
    pub(crate) mid_sync: bool,
    /// The IKE_SA_INIT request and our response (responder), for a late retransmission.
    pub(crate) init: Cache,
}

/// An established IKE SA (see the module docs).
pub(crate) struct Established {
    config: Arc<Config>,
    /// Who started the IKE SA.
    role: Role,
    /// The IKE SA in use.
    current: Session,
    /// The one it replaced, if not deleted yet.
    /// Boxed: it exists for seconds after a rekey, and inline it would make every SA
    /// ~430 bytes larger for all of its life.
    previous: Option<Box<Previous>>,
    /// The first IKE SA's IKE_SA_INIT request and response, for a late retransmission.
    init: Cache,
    /// The last request on a retired IKE SA (its DELETE) and our response.
    retired: Cache,
    /// The CHILD SAs, whichever IKE SA created them.
    children: Vec<ChildRef>,
    /// What our request in flight on the current IKE SA is.
    ours: Ours,
    /// When we rekey the current IKE SA (its soft lifetime), if ever.
    ike_rekey_at: Option<Instant>,
    /// Where our requests go: the addresses of the peer's latest authenticated request.
    local: SocketAddr,
    remote: SocketAddr,
    /// We initiated and moved to the NAT-T ports: ESP goes in UDP.
    floated: bool,
    /// When the peer was last heard from (an authenticated message, or CHILD SA traffic).
    last_heard: Instant,
    /// The peer announced RFC 5685 redirects in IKE_SA_INIT.
    redirect_supported: bool,
    /// Where the SA stands with RFC 6311 (see [`MidSync`]).
    mid_sync: MidSync,
    /// The peer's authenticated identity.
    peer_id: IdBuf,
    /// Where the peer's REDIRECT sent us. Boxed: set only as the SA closes.
    redirected_to: Option<Box<GatewayId>>,
}

/// Our request deleting the IKE SA it goes on (RFC 7296 §1.4.1).
pub(crate) fn delete_ike() -> Payload<'static> {
    Payload::Delete(Delete {
        protocol: ProtocolId::IKE,
        spis: Vec::new(),
    })
}

impl Established {
    /// Drops the copy of the IKE_SA_INIT exchange kept for its retransmissions: the caller
    /// no longer routes them here (see [`crate::endpoint::Endpoint`]).
    pub(crate) fn forget_init(&mut self) {
        self.init = None;
    }

    /// The SA after IKE_AUTH at `now`, under `config`.
    pub(crate) fn new(
        config: Arc<Config>,
        mut a: Authenticated,
        now: Instant,
        entropy: &mut dyn Entropy,
    ) -> Self {
        a.session.sa.forget_auth_keys();
        // Room for exactly the CHILD SAs there are (one, nearly always), for all of the
        // SA's life: the handshake's Vec may have grown to four.
        a.children.shrink_to_fit();
        let ike_rekey_at = config.ike_lifetime.and_then(|l| soft_deadline(now, l, entropy));
        Self {
            config,
            role: a.role,
            current: a.session,
            previous: None,
            init: a.init,
            retired: None,
            children: a.children,
            ours: Ours::Plain,
            ike_rekey_at,
            local: a.local,
            remote: a.remote,
            floated: a.floated,
            last_heard: now,
            redirect_supported: a.redirect_supported,
            mid_sync: MidSync::from_announced(a.mid_sync),
            peer_id: a.peer_id,
            redirected_to: None,
        }
    }

    /// The SA as data, deadlines relative to `now`; `events` keeps what the CHILD SAs were
    /// installed with.
    pub(crate) fn snapshot(
        &self,
        events: &Events<Event>,
        now: Instant,
    ) -> Result<IkeSaSnapshot, SnapshotError> {
        let exchange = |c: &Cache| c.as_ref().map(|k| k.snapshot());
        Ok(IkeSaSnapshot {
            role: self.role,
            local: self.local,
            remote: self.remote,
            floated: self.floated,
            redirect_supported: self.redirect_supported,
            mid_sync_supported: self.mid_sync.supported(),
            local_id: self.config.local_id.clone(),
            peer_id: self.peer_id.clone(),
            current: self.current.snapshot(now),
            previous: self.previous.as_ref().map(|p| p.snapshot(now)),
            init: exchange(&self.init),
            retired: exchange(&self.retired),
            children: snapshot_children(&self.children, events, now)?,
            in_flight: self.ours.snapshot()?,
            ike_rekey_in: self.ike_rekey_at.map(|t| t.saturating_duration_since(now)),
            last_heard_ago: now.saturating_duration_since(self.last_heard),
        })
    }

    /// Carries on the SA of a [`Self::snapshot`] taken in `role` at `now`, under `config`;
    /// with the output that knows its CHILD SAs (they are not reported again).
    pub(crate) fn restore(
        config: Arc<Config>,
        role: Role,
        snapshot: IkeSaSnapshot,
        now: Instant,
    ) -> Result<(Self, Output), SnapshotError> {
        if snapshot.role != role {
            return Err(SnapshotError::InvalidValue("role"));
        }
        let (children, installed) = restore_children(&snapshot.children, now);
        let ours = Ours::restore(snapshot.in_flight, &children)?;
        let previous = snapshot
            .previous
            .map(|p| Previous::restore(p, now).map(Box::new))
            .transpose()?;
        let exchange = |e: Option<Exchange>| e.map(|e| Box::new(Kept::restore(e)));
        let current = Session::restore(snapshot.current, now)?;
        let mid_sync = match (
            snapshot.mid_sync_supported,
            config.sync_after_restore && current.sync_is_safe(),
        ) {
            (true, true) => MidSync::Due(now),
            (true, false) => MidSync::Supported,
            (false, _) => MidSync::Unsupported,
        };
        let s = Self {
            config,
            role,
            current,
            previous,
            init: exchange(snapshot.init),
            retired: exchange(snapshot.retired),
            children,
            ours,
            ike_rekey_at: snapshot.ike_rekey_in.map(|d| deadline(now, d)),
            local: snapshot.local,
            remote: snapshot.remote,
            floated: snapshot.floated,
            last_heard: now.checked_sub(snapshot.last_heard_ago).unwrap_or(now),
            redirect_supported: snapshot.redirect_supported,
            // A copy may be behind the peer: with RFC 6311 the counters are asked for at once
            // (the catch-up window of the session covers a peer without it).
            mid_sync,
            peer_id: snapshot.peer_id,
            redirected_to: None,
        };
        Ok((s, Output::restored(&installed)))
    }

    /// Our SPI of the IKE SA in use.
    pub(crate) fn our_spi(&self) -> u64 {
        self.current.sa.our_spi()
    }

    /// The SPIs `(SPIi, SPIr)` of the IKE SA in use.
    pub(crate) fn ike_spis(&self) -> (u64, u64) {
        (self.current.sa.spi_i, self.current.sa.spi_r)
    }

    /// Every SPI of ours the peer's messages may carry: the IKE SA in use and the one a rekey
    /// replaced, until it is retired.
    pub(crate) fn our_spis(&self) -> Vec<u64> {
        std::iter::once(self.our_spi())
            .chain(self.previous.as_ref().map(|p| p.session.sa.our_spi()))
            .collect()
    }

    /// The CHILD SAs, as `(spi_in, spi_out)`.
    pub(crate) fn child_spis(&self) -> Vec<(u32, u32)> {
        self.children.iter().map(|c| (c.spi_in, c.spi_out)).collect()
    }

    /// Our address and the peer's for our requests.
    pub(crate) fn path(&self) -> (SocketAddr, SocketAddr) {
        (self.local, self.remote)
    }

    /// A NAT was detected between the peers.
    pub(crate) fn nat_detected(&self) -> bool {
        self.current.sa.nat_detected
    }

    /// Where the peer's REDIRECT sent us, once it closed the SA.
    pub(crate) fn redirected_to(&self) -> Option<&GatewayId> {
        self.redirected_to.as_deref()
    }

    /// Whether ESP goes in UDP (RFC 3948): a NAT was detected, we floated, or IKE runs on
    /// the NAT-T port.
    fn udp_encap(&self, local: SocketAddr) -> bool {
        self.current.sa.nat_detected || self.floated || local.port() == 4500
    }

    /// A datagram on the IKE SA in use or the one a rekey replaced.
    pub(crate) fn handle_datagram(
        &mut self,
        out: &mut Output,
        d: &Incoming<'_>,
        entropy: &mut dyn Entropy,
    ) -> Result<Next, Error> {
        let (now, local, remote, datagram) = (d.now, d.local, d.remote, d.bytes);
        let h = &d.header;
        // Bitwise copies of requests answered by state that is gone (RFC 7296 §2.1): the
        // IKE_SA_INIT request, the DELETE of a retired IKE SA.
        let cached = [&self.init, &self.retired]
            .into_iter()
            .flatten()
            .find_map(|k| k.answer(datagram))
            .map(<[u8]>::to_vec);
        if let Some(response) = cached {
            out.send(local, remote, response);
            return Ok(Next::Stay);
        }
        let is_current = if self.current.sa.matches(h) {
            true
        } else if self.previous.as_ref().is_some_and(|p| p.session.sa.matches(h)) {
            false
        } else {
            return Err(Error::Unexpected("SPIs of another IKE SA"));
        };
        let session = pick(&mut self.current, &mut self.previous, is_current)?;
        // RFC 7296 §3.1, I flag: "This bit MUST be set in messages sent by the original
        // initiator of the IKE SA and MUST be cleared in messages sent by the original
        // responder"; "This bit changes to reflect who initiated the last rekey of the IKE
        // SA".
        if h.flags.contains(Flags::INITIATOR) == session.sa.is_initiator() {
            return Err(Error::Unexpected("message with the wrong Initiator flag"));
        }
        if h.flags.contains(Flags::RESPONSE) {
            // RFC 7296 §2.2: a response is matched to its request by Message ID; anything
            // else (a duplicate, an answer to an abandoned request) is dropped.
            if !session.answers_pending(h) {
                return Err(Error::Unexpected("response to no request of ours"));
            }
            let opened = session.sa.open(datagram)?;
            session.complete_request();
            self.last_heard = now;
            if is_current && let MidSync::InFlight(nonce) = self.mid_sync {
                let inner =
                    payload::decode_inner_chain(opened.first_inner, &opened.plain).unwrap_or_default();
                self.mid_sync_answered(out, &inner, nonce);
            } else if is_current {
                let inner =
                    payload::decode_inner_chain(opened.first_inner, &opened.plain).unwrap_or_default();
                self.handle_response(out, &inner, now, entropy);
            } else {
                // The answer to our DELETE of an IKE SA we rekeyed: it is gone now.
                self.retire_previous(out);
            }
            return Ok(Next::Stay);
        }
        if is_current
            && self.mid_sync.supported()
            && h.message_id == 0
            && h.exchange == ExchangeType::INFORMATIONAL
            && self.peer_mid_sync(out, d)?
        {
            return Ok(Next::Stay);
        }
        let Some(outcome) = self.handle_request(out, is_current, d, entropy)? else {
            return Ok(Next::Stay);
        };
        // Authenticated: the peer is alive, and our requests go where it is now.
        self.last_heard = now;
        self.local = local;
        self.remote = remote;
        Ok(match outcome {
            requests::Outcome::Answered => Next::Stay,
            requests::Outcome::DeleteIke if is_current => {
                Next::Close(self.close(out, DeleteReason::PeerDeleted))
            }
            requests::Outcome::DeleteIke => {
                self.retire_previous(out);
                Next::Stay
            }
            requests::Outcome::Rekeyed(sa) => {
                self.peer_rekeyed(out, *sa, now, entropy);
                Next::Stay
            }
            requests::Outcome::Redirected(gateway) => {
                // RFC 5685 §5: answered; we delete the IKE SA (not waited for) and the
                // caller connects to the new gateway.
                self.abandon_request();
                self.request(out, &[delete_ike()], now);
                self.redirected_to = Some(Box::new(gateway));
                Next::Close(self.close(out, DeleteReason::Redirected))
            }
        })
    }

    /// The verified response to our request in flight on the IKE SA in use. The answer to a
    /// liveness check or a DELETE only has to verify; the answer to a CHILD SA rekey installs
    /// the new SA and deletes the old one ([`rekey::finish`]); the answer to an IKE SA rekey
    /// makes the new IKE SA.
    fn handle_response(
        &mut self,
        out: &mut Output,
        inner: &[Payload<'_>],
        now: Instant,
        entropy: &mut dyn Entropy,
    ) {
        match mem::replace(&mut self.ours, Ours::Plain) {
            Ours::Plain => {}
            // A refused or unusable IKE SA rekey is tried again later (RFC 7296 §2.21.3: the
            // old IKE SA is unaffected).
            Ours::IkeRekey(r) => match r.complete(inner, &self.current.sa, &self.config.ike_proposals) {
                Ok(sa) => self.we_rekeyed(out, sa, now, entropy),
                Err(_) => self.ike_rekey_at = Some(rekey::retry_at(now, entropy)),
            },
            Ours::ChildRekey(r) => {
                let config = Arc::clone(&self.config);
                let p = rekey_params(&config, self.udp_encap(self.local));
                let mut changes = Vec::new();
                // A failed rekey (refused, or an answer we cannot use) leaves the old SA in
                // place and is tried again later; nothing to report to the gateway.
                if let Ok(Some(datagram)) = rekey::finish(
                    &r,
                    inner,
                    &mut self.current,
                    &mut self.children,
                    &p,
                    now,
                    entropy,
                    &mut changes,
                ) {
                    out.send(self.local, self.remote, datagram);
                }
                for c in changes {
                    out.event(match c {
                        ChildChange::Installed(child) => Event::ChildSaInstalled(child),
                        ChildChange::Deleted(c) => Event::ChildSaDeleted {
                            spi_in: c.spi_in,
                            spi_out: c.spi_out,
                        },
                    });
                }
            }
        }
    }

    /// Starts a request of ours on the IKE SA in use and sends it; nothing when the window
    /// is busy.
    fn request(&mut self, out: &mut Output, inner: &[Payload<'_>], now: Instant) {
        if let Ok(Some(d)) =
            self.current
                .start_request(ExchangeType::INFORMATIONAL, inner, now, &self.config.retransmit)
        {
            out.send(self.local, self.remote, d);
        }
    }

    /// The current IKE SA was replaced by `sa` (a rekey by either side): it carries on with
    /// every CHILD SA (RFC 7296 §2.8: "The new IKE SA inherits all of the original IKE SA's
    /// Child SAs"), the old one is kept until deleted; a previous one still there goes.
    fn replace_current(
        &mut self,
        out: &mut Output,
        sa: IkeSa,
        now: Instant,
        entropy: &mut dyn Entropy,
    ) -> Session {
        let mut sa = sa;
        // A rekeyed IKE SA has no IKE_AUTH: its SK_pi and SK_pr are never used.
        sa.forget_auth_keys();
        let (new_spi_i, new_spi_r) = if sa.is_initiator() {
            (sa.spi_r, sa.spi_i)
        } else {
            (sa.spi_i, sa.spi_r)
        };
        let old = mem::replace(&mut self.current, Session::new(sa, None));
        // The new IKE SA's counters start at zero on both ends: nothing left to synchronize.
        if self.mid_sync.supported() {
            self.mid_sync = MidSync::Supported;
        }
        self.retire_previous(out);
        // IKE_SA_INIT was the first IKE SA's; its retransmissions are long over.
        self.init = None;
        self.ike_rekey_at = self
            .config
            .ike_lifetime
            .and_then(|l| soft_deadline(now, l, entropy));
        out.event(Event::IkeSaRekeyed {
            old_spi_r: old.sa.our_spi(),
            new_spi_i,
            new_spi_r,
        });
        old
    }

    /// Our rekey of the current IKE SA made `sa` (RFC 7296 §1.3.2), and we delete the old one
    /// (§2.8: "After the new equivalent IKE SA is created, the initiator deletes the old IKE
    /// SA"); its response retires it.
    fn we_rekeyed(&mut self, out: &mut Output, sa: IkeSa, now: Instant, entropy: &mut dyn Entropy) {
        let mut old = self.replace_current(out, sa, now, entropy);
        if let Ok(Some(d)) = old.start_request(
            ExchangeType::INFORMATIONAL,
            &[delete_ike()],
            now,
            &self.config.retransmit,
        ) {
            out.send(self.local, self.remote, d);
        }
        self.previous = Some(Box::new(Previous {
            session: old,
            expires: deadline(now, REKEYED_SA_LINGER),
        }));
    }

    /// The peer rekeyed the current IKE SA into `sa`; the old one stays until the peer
    /// deletes it.
    fn peer_rekeyed(&mut self, out: &mut Output, sa: IkeSa, now: Instant, entropy: &mut dyn Entropy) {
        let mut old = self.replace_current(out, sa, now, entropy);
        // A liveness check in flight on the old SA is moot: the rekey request just proved the
        // peer alive, and the old SA is about to go.
        old.abandon_request();
        self.retry_child_rekey(now);
        self.previous = Some(Box::new(Previous {
            session: old,
            expires: deadline(now, REKEYED_SA_LINGER),
        }));
    }

    /// Our CHILD SA rekey in flight gave way (to an IKE SA rekey, a REDIRECT): again, as soon
    /// as the window is free.
    fn retry_child_rekey(&mut self, now: Instant) {
        if let Ours::ChildRekey(r) = mem::replace(&mut self.ours, Ours::Plain)
            && let Some(c) = self.children.iter_mut().find(|c| c.spi_in == r.old.spi_in)
        {
            c.rekey_at = Some(now);
        }
    }

    /// Drops the IKE SA a rekey replaced, if any, keeping its last exchange for a
    /// retransmission.
    fn retire_previous(&mut self, out: &mut Output) {
        if let Some(mut p) = self.previous.take() {
            self.retired = p.session.take_last();
            out.event(Event::IkeSaRetired {
                spi_r: p.session.sa.our_spi(),
            });
        }
    }

    /// Ends the IKE SA: every CHILD SA goes with it (RFC 7296 §1.4.1: "Deleting an IKE SA
    /// implicitly closes any remaining Child SAs negotiated under it"). Returns the last
    /// exchange for retransmissions.
    fn close(&mut self, out: &mut Output, reason: DeleteReason) -> Cache {
        for c in self.children.drain(..) {
            out.event(Event::ChildSaDeleted {
                spi_in: c.spi_in,
                spi_out: c.spi_out,
            });
        }
        self.retire_previous(out);
        out.event(Event::IkeSaDeleted {
            spi: self.current.sa.our_spi(),
            reason,
        });
        self.current.take_last()
    }

    /// Deletes the IKE SA from our side: one INFORMATIONAL request with a Delete payload for
    /// it (RFC 7296 §1.4.1), not waited for (a lost DELETE leaves the peer to its own
    /// liveness checks).
    pub(crate) fn delete(&mut self, out: &mut Output, now: Instant) -> Cache {
        // A request in flight gives way: the window holds one.
        self.abandon_request();
        self.request(out, &[delete_ike()], now);
        self.close(out, DeleteReason::LocalDeleted)
    }

    /// Redirects the peer to `gateway` (RFC 5685 §5): an INFORMATIONAL request with
    /// N(REDIRECT) naming it, without nonce data ("the Nonce Data field ... MUST NOT be
    /// included" outside IKE_SA_INIT). Only for a peer that announced N(REDIRECT_SUPPORTED)
    /// (or N(REDIRECTED_FROM)): §3, "The gateway MUST NOT send the REDIRECT notification ...
    /// if the VPN client has not indicated support". A request of ours in flight gives way.
    pub(crate) fn redirect(
        &mut self,
        out: &mut Output,
        now: Instant,
        gateway: &GatewayId,
    ) -> Result<(), Error> {
        if !self.redirect_supported {
            return Err(Error::WrongState("the peer did not announce REDIRECT_SUPPORTED"));
        }
        self.abandon_request();
        self.retry_child_rekey(now);
        let data = encode_redirect(gateway, None);
        let payloads = [Payload::Notify(Notify::new(NotifyType::REDIRECT, &data))];
        let datagram = self
            .current
            .start_request(
                ExchangeType::INFORMATIONAL,
                &payloads,
                now,
                &self.config.retransmit,
            )?
            .ok_or(Error::WrongState("no Message ID left"))?;
        out.send(self.local, self.remote, datagram);
        Ok(())
    }

    /// The data plane saw authenticated ESP traffic from the peer: that proves it alive (RFC
    /// 7296 §2.4: "Receipt of a fresh cryptographically protected message on an IKE SA or
    /// any of its Child SAs ensures liveness of the IKE SA and all of its Child SAs").
    pub(crate) fn handle_child_traffic(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Makes the CHILD SA `spi_in` due for a rekey now; false when there is nothing to rekey
    /// (no such SA, the peer rekeyed it already, or our rekey of it is in flight).
    pub(crate) fn mark_rekey_due(&mut self, spi_in: u32, now: Instant) -> bool {
        rekey::mark_due(&mut self.children, &self.ours, spi_in, now)
    }

    /// The deadline of each timer.
    pub(crate) fn timers(&self) -> TimerTable {
        TimerTable::established(
            &self.current,
            self.previous.as_ref().map(|p| (&p.session, p.expires)),
            &self.children,
            self.ike_rekey_at,
            self.last_heard,
            self.config.dpd_interval,
            match self.mid_sync {
                MidSync::Due(at) => Some(at),
                _ => None,
            },
        )
    }

    /// Runs the timers due at `now`: retransmissions (and giving up), the replaced SA's
    /// expiry, rekeys, the liveness check.
    pub(crate) fn handle_timeout(
        &mut self,
        out: &mut Output,
        now: Instant,
        entropy: &mut dyn Entropy,
    ) -> Next {
        let policy = self.config.retransmit;
        if self.previous.as_ref().is_some_and(|p| now >= p.expires) {
            self.retire_previous(out);
        }
        // Our DELETE of the IKE SA our rekey replaced is retransmitted like any request
        // (RFC 7296 §2.1); once the retransmissions are spent the old SA goes (its CHILD SAs
        // live on in the new one).
        if let Some(p) = self.previous.as_mut() {
            match p.session.on_timer(now, &policy) {
                Retry::Idle => {}
                Retry::Resend(datagram) => out.send(self.local, self.remote, datagram),
                Retry::GiveUp => self.retire_previous(out),
            }
        }
        // A sync request the peer does not answer (it refuses one that would take back a
        // Message ID it has processed) is given up after a few tries, not the SA with it.
        if let MidSync::InFlight(_) = self.mid_sync
            && self.current.pending_retransmits() >= Some(SYNC_TRIES)
            && self.current.pending_deadline().is_some_and(|d| now >= d)
        {
            self.abandon_request();
            out.event(Event::MessageIdSync {
                requested: true,
                next: None,
            });
        }
        match self.current.on_timer(now, &policy) {
            Retry::Idle => {}
            Retry::Resend(datagram) => out.send(self.local, self.remote, datagram),
            Retry::GiveUp => return Next::Close(self.close(out, DeleteReason::DeadPeer)),
        }
        if matches!(self.mid_sync, MidSync::Due(at) if now >= at) && self.current.can_start_request() {
            self.start_mid_sync(out, now, entropy);
        }
        // RFC 7296 §2.8: the IKE SA and CHILD SAs at their soft lifetime are rekeyed by this
        // side (see [`rekey`]); a rekey request proves liveness as well as an empty one.
        if let Some(datagram) = rekey::start_ike_due(
            &mut self.current,
            &mut self.ike_rekey_at,
            &mut self.ours,
            &self.config.ike_proposals,
            &policy,
            now,
            entropy,
        ) {
            out.send(self.local, self.remote, datagram);
        }
        let config = Arc::clone(&self.config);
        let p = rekey_params(&config, self.udp_encap(self.local));
        if let Some(datagram) = rekey::start_due(
            &mut self.current,
            &mut self.children,
            &mut self.ours,
            &p,
            now,
            entropy,
        ) {
            out.send(self.local, self.remote, datagram);
        }
        if let Some(interval) = self.config.dpd_interval
            && self.current.can_start_request()
            && self.last_heard.checked_add(interval).is_some_and(|t| now >= t)
        {
            // RFC 7296 §1.4: "An INFORMATIONAL request with no payloads (other than the empty
            // Encrypted payload required by the syntax) is commonly used as a check for
            // liveness."
            self.request(out, &[], now);
        }
        Next::Stay
    }
}

impl Established {
    /// Drops our request in flight on the IKE SA in use; a sync request goes back to due.
    fn abandon_request(&mut self) {
        self.current.abandon_request();
        if let MidSync::InFlight(_) = self.mid_sync {
            self.mid_sync = MidSync::Supported;
        }
    }

    /// Sends our RFC 6311 sync request (a restored copy's counters, §4.2).
    fn start_mid_sync(&mut self, out: &mut Output, now: Instant, entropy: &mut dyn Entropy) {
        let mut nonce = [0; mid_sync::NONCE_LEN];
        if entropy.fill(&mut nonce).is_err() {
            return;
        }
        match self.current.start_sync(nonce, now, &self.config.retransmit) {
            Ok(Some(datagram)) => {
                self.mid_sync = MidSync::InFlight(nonce);
                out.send(self.local, self.remote, datagram);
            }
            // A request of ours is in flight (tried again when it is done) ...
            Ok(None) if self.current.pending_deadline().is_some() => {}
            // ... or the counters are used up, or sealing failed: the catch-up window it is.
            _ => {
                self.mid_sync = MidSync::Supported;
                out.event(Event::MessageIdSync {
                    requested: true,
                    next: None,
                });
            }
        }
    }

    /// The verified answer to our sync request: the counters both ends use from now on, if
    /// it carries our nonce.
    fn mid_sync_answered(
        &mut self,
        out: &mut Output,
        inner: &[Payload<'_>],
        nonce: [u8; mid_sync::NONCE_LEN],
    ) {
        self.mid_sync = MidSync::Supported;
        let next = SyncData::find(inner)
            .filter(|d| d.nonce == nonce)
            .map(|d| self.current.synced(d.recv, d.send));
        out.event(Event::MessageIdSync {
            requested: true,
            next,
        });
    }

    /// A request with Message ID zero on the IKE SA in use, when both ends announced RFC
    /// 6311: if it holds only sync notifies, it is the peer's sync request (it failed over to
    /// a copy of its own): answered, out of the window. `false` for any other request, which
    /// the caller handles as usual.
    fn peer_mid_sync(&mut self, out: &mut Output, d: &Incoming<'_>) -> Result<bool, Error> {
        let opened = self.current.sa.open(d.bytes)?;
        let inner =
            payload::decode_inner_chain(opened.first_inner, &opened.plain).map_err(Error::MalformedInner)?;
        if !mid_sync::is_sync_request(&inner) {
            return Ok(false);
        }
        let request = SyncData::find(&inner).ok_or(Error::Unexpected("invalid IKEV2_MESSAGE_ID_SYNC"))?;
        let (response, counters) = self.current.answer_sync(request)?;
        out.send(d.local, d.remote, response);
        self.last_heard = d.now;
        self.local = d.local;
        self.remote = d.remote;
        out.event(Event::MessageIdSync {
            requested: false,
            next: Some(counters),
        });
        Ok(true)
    }
}

/// The session a message is on: the IKE SA in use, or the one a rekey replaced.
fn pick<'a>(
    current: &'a mut Session,
    previous: &'a mut Option<Box<Previous>>,
    is_current: bool,
) -> Result<&'a mut Session, Error> {
    if is_current {
        return Ok(current);
    }
    previous
        .as_mut()
        .map(|p| &mut p.session)
        .ok_or(Error::Unexpected("SPIs of another IKE SA"))
}

/// What our CHILD SA rekeys are checked against.
fn rekey_params(config: &Config, udp_encap: bool) -> rekey::Params<'_> {
    rekey::Params {
        esp: &config.esp_proposals,
        local: &config.local_subnet,
        remote: &config.remote_subnet,
        lifetime: config.child_lifetime,
        udp_encap,
        retransmit: &config.retransmit,
    }
}
