//! The responder's established phase: the peer's requests (INFORMATIONAL, CREATE_CHILD_SA
//! for new, rekeyed CHILD SAs and IKE SA rekeys), the responses to ours, retired IKE SAs and
//! the timers (liveness checks, rekeys, retransmissions).

use super::*;

impl Responder {
    /// A datagram on an established IKE SA (or the one a rekey replaced).
    pub(super) fn handle_established(
        &mut self,
        s: &mut Established,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        entropy: &mut dyn Entropy,
    ) -> Result<Next, Error> {
        // Bitwise copies of requests answered by state that is gone (RFC 7296 §2.1): the
        // IKE_SA_INIT request, the DELETE of a retired IKE SA.
        let cached = [&s.init, &s.retired]
            .into_iter()
            .flatten()
            .find(|(req, _)| req.as_slice() == datagram)
            .map(|(_, resp)| resp.clone());
        if let Some(response) = cached {
            self.send(local, remote, response);
            return Ok(Next::Stay);
        }
        let (h, _) =
            Header::peek(datagram).ok_or(Error::Malformed(InvalidMessage::Truncated("IKE header")))?;
        let Established {
            current,
            previous,
            children,
            ours,
            local: peer_local,
            remote: peer_remote,
            last_heard,
            ..
        } = s;
        let (session, is_current) = if current.sa.matches(&h) {
            (current, true)
        } else {
            match previous {
                Some(p) if p.session.sa.matches(&h) => (&mut p.session, false),
                _ => return Err(Error::Unexpected("SPIs of another IKE SA")),
            }
        };
        // RFC 7296 §3.1, I flag: "This bit MUST be set in messages sent by the original
        // initiator of the IKE SA and MUST be cleared in messages sent by the original
        // responder"; "This bit changes to reflect who initiated the last rekey of the IKE
        // SA": the peer, unless we rekeyed this one.
        if h.flags.contains(Flags::INITIATOR) == session.sa.is_initiator() {
            return Err(Error::Unexpected("message with the wrong Initiator flag"));
        }
        if h.flags.contains(Flags::RESPONSE) {
            if !is_current {
                // The answer to our DELETE of an IKE SA we rekeyed: it is gone now.
                if !session.answers_pending(&h) {
                    return Err(Error::Unexpected("response to no request of ours"));
                }
                let _ = session.sa.open(datagram)?;
                session.complete_request();
                *last_heard = now;
                self.retire_previous(s);
                return Ok(Next::Stay);
            }
            let udp_encap = session.sa.nat_detected || peer_local.port() == 4500;
            let (to_local, to_remote) = (*peer_local, *peer_remote);
            let rekeyed = self.handle_response(
                session, children, ours, &h, datagram, now, udp_encap, entropy, to_local, to_remote,
            )?;
            *last_heard = now;
            match rekeyed {
                Some(Ok(sa)) => self.we_rekeyed(s, sa, now, entropy),
                Some(Err(_)) => s.ike_rekey_at = Some(rekey::retry_at(now, entropy)),
                None => {}
            }
            return Ok(Next::Stay);
        }
        let Some(outcome) = self.handle_request(
            session, is_current, children, ours, now, local, remote, &h, datagram, entropy,
        )?
        else {
            return Ok(Next::Stay);
        };
        // Authenticated: the peer is alive, and our requests go where it is now.
        *last_heard = now;
        *peer_local = local;
        *peer_remote = remote;
        Ok(match outcome {
            Outcome::Answered => Next::Stay,
            Outcome::DeleteIke if is_current => {
                Next::Close(self.close_established(s, DeleteReason::PeerDeleted))
            }
            Outcome::DeleteIke => {
                self.retire_previous(s);
                Next::Stay
            }
            Outcome::Rekeyed(sa) => {
                self.rekeyed(s, *sa, now, entropy);
                Next::Stay
            }
        })
    }

    /// A response of the peer: it must answer our request in flight and verify. The answer
    /// to a liveness check or a DELETE only has to verify; the answer to a CHILD SA rekey
    /// installs the new SA and deletes the old one ([`rekey::finish`]).
    /// `Some` is the outcome of our IKE SA rekey: the new IKE SA, or why there is none.
    #[allow(clippy::too_many_arguments)]
    fn handle_response(
        &mut self,
        session: &mut Session,
        children: &mut Vec<ChildRef>,
        ours: &mut Ours,
        h: &Header,
        datagram: &[u8],
        now: Instant,
        udp_encap: bool,
        entropy: &mut dyn Entropy,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<Option<Result<IkeSa, Error>>, Error> {
        // RFC 7296 §2.2: a response is matched to its request by Message ID; anything else
        // (a duplicate, an answer to an abandoned request) is dropped.
        if !session.answers_pending(h) {
            return Err(Error::Unexpected("response to no request of ours"));
        }
        let opened = session.sa.open(datagram)?;
        session.complete_request();
        let inner = payload::decode_inner_chain(opened.first_inner, &opened.plain).unwrap_or_default();
        let r = match mem::replace(ours, Ours::Plain) {
            Ours::Plain => return Ok(None),
            Ours::ChildRekey(r) => r,
            // A refused or unusable IKE SA rekey is tried again later (RFC 7296 §2.21.3: the
            // old IKE SA is unaffected).
            Ours::IkeRekey(r) => {
                let made = r.complete(&inner, &session.sa, &self.config.ike_proposals);
                return Ok(Some(made));
            }
        };
        let config = Arc::clone(&self.config);
        let p = rekey::Params {
            esp: &config.esp_proposals,
            local: &config.local_subnet,
            remote: &config.remote_subnet,
            lifetime: config.child_lifetime,
            udp_encap,
            retransmit: &config.retransmit,
        };
        let mut changes = Vec::new();
        // A failed rekey (refused, or an answer we cannot use) leaves the old SA in place
        // and is tried again later; nothing to report to the gateway.
        if let Ok(Some(datagram)) =
            rekey::finish(&r, &inner, session, children, &p, now, entropy, &mut changes)
        {
            self.send(local, remote, datagram);
        }
        self.report(changes);
        Ok(None)
    }

    /// Our rekey of the current IKE SA made `sa` (RFC 7296 §1.3.2): it becomes the current
    /// one with every CHILD SA (§2.8: "The new IKE SA inherits all of the original IKE SA's
    /// Child SAs"), and we delete the old one (§2.8: "After the new equivalent IKE SA is
    /// created, the initiator deletes the old IKE SA"); its response retires it.
    fn we_rekeyed(&mut self, s: &mut Established, sa: IkeSa, now: Instant, entropy: &mut dyn Entropy) {
        let (new_spi_i, new_spi_r) = (sa.spi_r, sa.our_spi());
        let mut old = mem::replace(&mut s.current, Session::new(sa, None));
        self.retire_previous(s);
        let delete = [Payload::Delete(Delete {
            protocol: ProtocolId::IKE,
            spis: Vec::new(),
        })];
        if let Ok(Some(d)) =
            old.start_request(ExchangeType::INFORMATIONAL, &delete, now, &self.config.retransmit)
        {
            self.send(s.local, s.remote, d);
        }
        let old_spi_r = old.sa.our_spi();
        s.previous = Some(Previous {
            session: old,
            expires: deadline(now, REKEYED_SA_LINGER),
        });
        s.init = None;
        s.ike_rekey_at = self
            .config
            .ike_lifetime
            .and_then(|l| soft_deadline(now, l, entropy));
        self.events.push_back(Event::IkeSaRekeyed {
            old_spi_r,
            new_spi_i,
            new_spi_r,
        });
    }

    /// Reports changes to the CHILD SAs made by our rekeys.
    fn report(&mut self, changes: Vec<ChildChange>) {
        for c in changes {
            self.events.push_back(match c {
                ChildChange::Installed(child) => Event::ChildSaInstalled(child),
                ChildChange::Deleted(c) => Event::ChildSaDeleted {
                    spi_in: c.spi_in,
                    spi_out: c.spi_out,
                },
            });
        }
    }

    /// A request of the peer: answered from the cache, dropped, or processed. `None` when
    /// it was a retransmission (nothing was authenticated).
    #[allow(clippy::too_many_arguments)]
    fn handle_request(
        &mut self,
        session: &mut Session,
        is_current: bool,
        children: &mut Vec<ChildRef>,
        ours: &mut Ours,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        h: &Header,
        datagram: &[u8],
        entropy: &mut dyn Entropy,
    ) -> Result<Option<Outcome>, Error> {
        match session.window(h.message_id, datagram) {
            Window::New => {}
            Window::Retransmitted(response) => {
                let response = response.to_vec();
                self.send(local, remote, response);
                return Ok(None);
            }
            Window::Drop(why) => return Err(Error::Unexpected(why)),
        }
        let opened = session.sa.open(datagram)?;
        let (exchange, message_id) = (opened.header.exchange, opened.header.message_id);
        let reply = Reply {
            exchange,
            message_id,
            request: datagram,
            local,
            remote,
        };
        let inner = match payload::decode_inner_chain(opened.first_inner, &opened.plain) {
            Ok(inner) => inner,
            // Authenticated, so answered: RFC 7296 §3.10.1 allows INVALID_SYNTAX "only for
            // and in an encrypted packet if the Message ID and cryptographic checksum were
            // valid", and §2.5 asks for UNSUPPORTED_CRITICAL_PAYLOAD.
            Err(e) => {
                self.refuse(session, &reply, Error::MalformedInner(e))?;
                return Ok(Some(Outcome::Answered));
            }
        };
        let outcome = match exchange {
            ExchangeType::INFORMATIONAL => self.informational(session, children, &reply, &inner)?,
            // RFC 7296 §2.8: once rekeyed, the old IKE SA is only there to be deleted.
            ExchangeType::CREATE_CHILD_SA if !is_current => {
                self.refuse(session, &reply, Error::NoAdditionalSas)?;
                Outcome::Answered
            }
            ExchangeType::CREATE_CHILD_SA => {
                self.create_child_sa(session, children, ours, &reply, &inner, now, entropy)?
            }
            // IKE_SA_INIT and IKE_AUTH are over (their retransmissions were answered from
            // the cache above); other exchange types are not ours to take.
            _ => {
                let e = Error::MalformedInner(InvalidMessage::InvalidValue("exchange type"));
                self.refuse(session, &reply, e)?;
                Outcome::Answered
            }
        };
        Ok(Some(outcome))
    }

    /// An INFORMATIONAL request (RFC 7296 §1.4): deletes, error notifies, liveness checks.
    fn informational(
        &mut self,
        session: &mut Session,
        children: &mut Vec<ChildRef>,
        reply: &Reply<'_>,
        inner: &[Payload<'_>],
    ) -> Result<Outcome, Error> {
        // Applied to a copy, kept once the response is sealed: a failure changes nothing.
        let mut remaining = children.clone();
        let info = informational::process(inner, &mut remaining);
        let ours: Vec<u32> = info.deleted.iter().map(|c| c.spi_in).collect();
        // RFC 7296 §1.4.1: "The response to a request that deletes the IKE SA is an empty
        // INFORMATIONAL response." Otherwise "Normally, the response in the INFORMATIONAL
        // exchange will contain Delete payloads for the paired SAs going in the other
        // direction." An empty request (a liveness check, §1.4) gets an empty response.
        let payloads = if info.delete_ike || ours.is_empty() {
            Vec::new()
        } else {
            vec![Payload::Delete(Delete {
                protocol: ProtocolId::ESP,
                spis: ours,
            })]
        };
        let response = session.respond(
            ExchangeType::INFORMATIONAL,
            reply.message_id,
            reply.request,
            &payloads,
        )?;
        self.send(reply.local, reply.remote, response);
        *children = remaining;
        for notify_type in info.errors {
            self.events.push_back(Event::PeerError { notify_type });
        }
        for c in info.deleted {
            self.events.push_back(Event::ChildSaDeleted {
                spi_in: c.spi_in,
                spi_out: c.spi_out,
            });
        }
        Ok(if info.delete_ike {
            Outcome::DeleteIke
        } else {
            Outcome::Answered
        })
    }

    /// A CREATE_CHILD_SA request (RFC 7296 §1.3).
    #[allow(clippy::too_many_arguments)]
    fn create_child_sa(
        &mut self,
        session: &mut Session,
        children: &mut Vec<ChildRef>,
        ours: &mut Ours,
        reply: &Reply<'_>,
        inner: &[Payload<'_>],
        now: Instant,
        entropy: &mut dyn Entropy,
    ) -> Result<Outcome, Error> {
        // RFC 7296 §2.25: "TEMPORARY_FAILURE ... when a peer receives a request that cannot
        // be completed due to a temporary condition such as a rekeying operation"; a peer's
        // IKE SA rekey while ours is in flight is answered so, and the peer tries again later
        // (rather than both ends ending up on different new IKE SAs, §2.8.2).
        if matches!(ours, Ours::IkeRekey(_)) && create_child::is_ike_rekey(inner) {
            self.refuse(session, reply, Error::TemporaryFailure)?;
            return Ok(Outcome::Answered);
        }
        let config = Arc::clone(&self.config);
        let cx = create_child::Context {
            ike_proposals: &config.ike_proposals,
            esp_proposals: &config.esp_proposals,
            local_subnet: config.local_subnet,
            remote_subnet: config.remote_subnet,
            child_lifetime: config.child_lifetime,
            sa: &session.sa,
            children,
            now,
            udp_encap: session.sa.nat_detected || reply.local.port() == 4500,
        };
        match create_child::process(&cx, inner, entropy) {
            Err(e) => {
                self.refuse(session, reply, e)?;
                Ok(Outcome::Answered)
            }
            Ok(Created::Child(c)) => {
                let response = session.respond(
                    ExchangeType::CREATE_CHILD_SA,
                    reply.message_id,
                    reply.request,
                    &c.payloads(),
                )?;
                self.send(reply.local, reply.remote, response);
                if let Some(old) = c.child.replaces {
                    rekey::peer_rekeyed(children, ours, old, c.child.spi_in, &c.lowest_nonce);
                }
                children.push(ChildRef {
                    spi_in: c.child.spi_in,
                    spi_out: c.child.spi_out,
                    rekey_at: soft_deadline(now, c.child.lifetime, entropy),
                    replaced: false,
                });
                self.events
                    .push_back(Event::ChildSaInstalled(Box::new(c.into_child())));
                Ok(Outcome::Answered)
            }
            Ok(Created::Ike(n)) => {
                // The response belongs to the old IKE SA and is sealed with its keys.
                let response = session.respond(
                    ExchangeType::CREATE_CHILD_SA,
                    reply.message_id,
                    reply.request,
                    &n.payloads(),
                )?;
                self.send(reply.local, reply.remote, response);
                Ok(Outcome::Rekeyed(Box::new(n.into_sa())))
            }
        }
    }

    /// Answers a request with the error's notify and reports it; the IKE SA stays.
    fn refuse(&mut self, session: &mut Session, reply: &Reply<'_>, error: Error) -> Result<(), Error> {
        // The peer's window only moves on with an answer, so even an error without a notify
        // of its own (an internal failure) is answered: NO_PROPOSAL_CHOSEN, "not this time",
        // as for a CHILD SA refused in IKE_AUTH.
        let fields = error.notify_fields().unwrap_or(NotifyFields {
            notify_type: NotifyType::NO_PROPOSAL_CHOSEN,
            protocol: ProtocolId::NONE,
            spi: Vec::new(),
            data: Vec::new(),
        });
        let response = session.respond(
            reply.exchange,
            reply.message_id,
            reply.request,
            &[fields.payload()],
        )?;
        self.send(reply.local, reply.remote, response);
        self.events.push_back(Event::RequestRefused {
            exchange: reply.exchange,
            error,
        });
        Ok(())
    }

    /// The peer rekeyed the current IKE SA into `sa`.
    fn rekeyed(&mut self, s: &mut Established, sa: IkeSa, now: Instant, entropy: &mut dyn Entropy) {
        let (new_spi_i, new_spi_r) = (sa.spi_i, sa.spi_r);
        s.ike_rekey_at = self
            .config
            .ike_lifetime
            .and_then(|l| soft_deadline(now, l, entropy));
        let mut old = mem::replace(&mut s.current, Session::new(sa, None));
        // A liveness check in flight on the old SA is moot: the rekey request just proved the
        // peer alive, and the old SA is about to go.
        old.abandon_request();
        if let Ours::ChildRekey(r) = mem::replace(&mut s.ours, Ours::Plain)
            && let Some(c) = s.children.iter_mut().find(|c| c.spi_in == r.old.spi_in)
        {
            // Our CHILD SA rekey went with the old IKE SA: again, on the new one.
            c.rekey_at = Some(now);
        }
        // A second rekey before the peer deleted the SA the first one replaced: that one goes.
        self.retire_previous(s);
        let old_spi_r = old.sa.our_spi();
        s.previous = Some(Previous {
            session: old,
            expires: deadline(now, REKEYED_SA_LINGER),
        });
        // IKE_SA_INIT was the first IKE SA's; its retransmissions are long over.
        s.init = None;
        self.events.push_back(Event::IkeSaRekeyed {
            old_spi_r,
            new_spi_i,
            new_spi_r,
        });
    }

    /// Drops the IKE SA a rekey replaced, if any, keeping its last exchange for a
    /// retransmission.
    fn retire_previous(&mut self, s: &mut Established) {
        if let Some(mut p) = s.previous.take() {
            s.retired = p.session.take_last();
            self.events.push_back(Event::IkeSaRetired {
                spi_r: p.session.sa.our_spi(),
            });
        }
    }

    /// Ends the IKE SA: every CHILD SA goes with it (RFC 7296 §1.4.1: "Deleting an IKE SA
    /// implicitly closes any remaining Child SAs negotiated under it"). Returns the last
    /// exchange for retransmissions.
    pub(super) fn close_established(&mut self, s: &mut Established, reason: DeleteReason) -> Cache {
        for c in s.children.drain(..) {
            self.events.push_back(Event::ChildSaDeleted {
                spi_in: c.spi_in,
                spi_out: c.spi_out,
            });
        }
        self.retire_previous(s);
        self.events.push_back(Event::IkeSaDeleted {
            spi: s.current.sa.our_spi(),
            reason,
        });
        s.current.take_last()
    }

    pub(super) fn established_timeout(
        &mut self,
        s: &mut Established,
        now: Instant,
        entropy: &mut dyn Entropy,
    ) -> Next {
        if s.previous.as_ref().is_some_and(|p| now >= p.expires) {
            self.retire_previous(s);
        }
        // Our DELETE of the IKE SA our rekey replaced is retransmitted like any request
        // (RFC 7296 §2.1); once the retransmissions are spent the old SA goes (its CHILD SAs
        // live on in the new one).
        if let Some(p) = s.previous.as_mut() {
            match p.session.on_timer(now, &self.config.retransmit) {
                Retry::Idle => {}
                Retry::Resend(datagram) => self.send(s.local, s.remote, datagram),
                Retry::GiveUp => self.retire_previous(s),
            }
        }
        match s.current.on_timer(now, &self.config.retransmit) {
            Retry::Idle => {}
            Retry::Resend(datagram) => self.send(s.local, s.remote, datagram),
            Retry::GiveUp => return Next::Close(self.close_established(s, DeleteReason::DeadPeer)),
        }
        // RFC 7296 §2.8: a CHILD SA at its soft lifetime is rekeyed by this side (see
        // [`crate::sa::rekey`]); a rekey request proves liveness as well as an empty one.
        let config = Arc::clone(&self.config);
        let p = rekey::Params {
            esp: &config.esp_proposals,
            local: &config.local_subnet,
            remote: &config.remote_subnet,
            lifetime: config.child_lifetime,
            udp_encap: s.current.sa.nat_detected || s.local.port() == 4500,
            retransmit: &config.retransmit,
        };
        if let Some(datagram) = rekey::start_ike_due(
            &mut s.current,
            &mut s.ike_rekey_at,
            &mut s.ours,
            &config.ike_proposals,
            &config.retransmit,
            now,
            entropy,
        ) {
            self.send(s.local, s.remote, datagram);
        }
        if let Some(datagram) =
            rekey::start_due(&mut s.current, &mut s.children, &mut s.ours, &p, now, entropy)
        {
            self.send(s.local, s.remote, datagram);
        }
        if let Some(interval) = self.config.dpd_interval
            && s.current.can_start_request()
            && s.last_heard.checked_add(interval).is_some_and(|t| now >= t)
        {
            // RFC 7296 §1.4: "An INFORMATIONAL request with no payloads (other than the empty
            // Encrypted payload required by the syntax) is commonly used as a check for
            // liveness."
            if let Ok(Some(datagram)) =
                s.current
                    .start_request(ExchangeType::INFORMATIONAL, &[], now, &self.config.retransmit)
            {
                self.send(s.local, s.remote, datagram);
            }
        }
        Next::Stay
    }
}

/// Where and how a request is answered.
struct Reply<'a> {
    exchange: ExchangeType,
    message_id: u32,
    request: &'a [u8],
    local: SocketAddr,
    remote: SocketAddr,
}
