//! The initiator's established phase: the peer's requests (INFORMATIONAL, CREATE_CHILD_SA),
//! the responses to ours (liveness checks, rekeys, DELETE), IKE SA rekeys by either side
//! and the IKE SA they replaced.

use super::*;

impl Initiator {
    /// A datagram on the established IKE SA; `Some` when the SA is gone (with the exchange
    /// that ended it, for retransmissions).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn established(
        &mut self,
        s: &mut Established,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        entropy: &mut dyn Entropy,
    ) -> Result<Option<Cache>, Error> {
        let (h, _) =
            Header::peek(datagram).ok_or(Error::Malformed(InvalidMessage::Truncated("IKE header")))?;
        if s.previous.as_ref().is_some_and(|p| p.session.sa.matches(&h)) {
            return self.previous_sa(s, now, local, remote, &h, datagram);
        }
        if !s.session.sa.matches(&h) {
            return Err(Error::Unexpected("SPIs of another IKE SA"));
        }
        // RFC 7296 §3.1, I flag: "MUST be cleared in messages sent by the original
        // responder"; it "changes to reflect who initiated the last rekey of the IKE SA".
        if h.flags.contains(Flags::INITIATOR) == s.session.sa.is_initiator() {
            return Err(Error::Unexpected(
                "message of the peer with the wrong Initiator flag",
            ));
        }
        if h.flags.contains(Flags::RESPONSE) {
            // RFC 7296 §2.2: matched to our request by Message ID. The answer to a liveness
            // check or a DELETE only has to verify; the answer to a CHILD SA rekey installs
            // the new SA and deletes the old one.
            if !s.session.answers_pending(&h) {
                return Err(Error::Unexpected("response to no request of ours"));
            }
            let opened = s.session.sa.open(datagram)?;
            s.session.complete_request();
            s.last_heard = now;
            let ours = mem::replace(&mut s.ours, rekey::Ours::Plain);
            if let rekey::Ours::IkeRekey(r) = ours {
                let inner =
                    payload::decode_inner_chain(opened.first_inner, &opened.plain).unwrap_or_default();
                // A refused or unusable IKE SA rekey leaves the old SA (RFC 7296 §2.21.3), to
                // be tried again later.
                match r.complete(&inner, &s.session.sa, &self.config.ike_proposals) {
                    Ok(sa) => self.we_rekeyed(s, sa, now, entropy),
                    Err(_) => s.ike_rekey_at = Some(rekey::retry_at(now, entropy)),
                }
            } else if let rekey::Ours::ChildRekey(r) = ours {
                let config = Arc::clone(&self.config);
                let p = self.rekey_params(&config);
                let inner =
                    payload::decode_inner_chain(opened.first_inner, &opened.plain).unwrap_or_default();
                let mut changes = Vec::new();
                // A failed rekey leaves the old SA, to be tried again later.
                if let Ok(Some(d)) = rekey::finish(
                    &r,
                    &inner,
                    &mut s.session,
                    &mut s.children,
                    &p,
                    now,
                    entropy,
                    &mut changes,
                ) {
                    self.send(d);
                }
                self.report(changes);
            }
            return Ok(None);
        }
        match s.session.window(h.message_id, datagram) {
            Window::New => {}
            Window::Retransmitted(response) => {
                // RFC 7296 §2.11: responses go where the request came from.
                let payload = response.to_vec();
                self.transmits.push_back(Transmit {
                    local,
                    remote,
                    payload,
                });
                return Ok(None);
            }
            Window::Drop(why) => return Err(Error::Unexpected(why)),
        }
        let opened = s.session.sa.open(datagram)?;
        s.last_heard = now;
        let exchange = opened.header.exchange;
        let respond = |me: &mut Self, session: &mut Session, inner: &[Payload<'_>]| -> Result<(), Error> {
            let response = session.respond(exchange, h.message_id, datagram, inner)?;
            me.transmits.push_back(Transmit {
                local,
                remote,
                payload: response,
            });
            Ok(())
        };
        let inner = match payload::decode_inner_chain(opened.first_inner, &opened.plain) {
            Ok(inner) => inner,
            Err(e) => {
                // Authenticated, so answered (RFC 7296 §3.10.1: INVALID_SYNTAX "only for and
                // in an encrypted packet if the Message ID and cryptographic checksum were
                // valid").
                let notify = NotifyType::INVALID_SYNTAX;
                respond(self, &mut s.session, &[Payload::Notify(Notify::new(notify, &[]))])?;
                self.events.push_back(Event::RequestRefused {
                    exchange,
                    error: Error::MalformedInner(e),
                });
                return Ok(None);
            }
        };
        if exchange == ExchangeType::CREATE_CHILD_SA {
            match self.create_child(s, now, &inner, entropy) {
                Ok(create_child::Created::Ike(n)) => {
                    // The response belongs to the old IKE SA and is sealed with its keys.
                    respond(self, &mut s.session, &n.payloads())?;
                    self.peer_rekeyed(s, n.into_sa(), now, entropy);
                }
                Ok(create_child::Created::Child(c)) => {
                    respond(self, &mut s.session, &c.payloads())?;
                    if let Some(old) = c.child.replaces {
                        rekey::peer_rekeyed(
                            &mut s.children,
                            &mut s.ours,
                            old,
                            c.child.spi_in,
                            &c.lowest_nonce,
                        );
                    }
                    let child = c.into_child();
                    s.children.push(ChildRef {
                        spi_in: child.spi_in,
                        spi_out: child.spi_out,
                        rekey_at: rekey::soft_deadline(now, child.lifetime, entropy),
                        replaced: false,
                    });
                    self.events.push_back(Event::ChildSaInstalled(Box::new(child)));
                }
                Err(e) => {
                    let (notify, protocol, spi, data) = refusal(&e);
                    let n = Notify {
                        protocol,
                        spi: &spi,
                        notify_type: notify,
                        data: &data,
                    };
                    respond(self, &mut s.session, &[Payload::Notify(n)])?;
                    self.events
                        .push_back(Event::RequestRefused { exchange, error: e });
                }
            }
            return Ok(None);
        }
        if exchange != ExchangeType::INFORMATIONAL {
            // IKE_SA_INIT and IKE_AUTH are over; other exchange types are not ours to take.
            let notify = NotifyType::INVALID_SYNTAX;
            respond(self, &mut s.session, &[Payload::Notify(Notify::new(notify, &[]))])?;
            self.events.push_back(Event::RequestRefused {
                exchange,
                error: Error::Unexpected("an exchange not taken on an established IKE SA"),
            });
            return Ok(None);
        }
        // RFC 5685 §5: a REDIRECT in an INFORMATIONAL request on the established SA. We answer
        // it (empty), delete this IKE SA (not waited for) and close; the caller connects to
        // the new gateway.
        let redirect = inner.iter().find_map(|p| match p {
            Payload::Notify(n) if n.notify_type == NotifyType::REDIRECT => decode_redirect(n.data).ok(),
            _ => None,
        });
        if let Some((gateway, _)) =
            redirect.filter(|_| self.config.redirect_supported || self.config.redirected_from.is_some())
        {
            respond(self, &mut s.session, &[])?;
            s.session.abandon_request();
            self.request(&mut s.session, &[delete_ike()], now);
            self.redirected_to = Some(gateway);
            return Ok(Some(self.close_established(s, DeleteReason::Redirected)));
        }
        // Applied to a copy, kept once the response is sealed.
        let mut remaining = s.children.clone();
        let info = informational::process(&inner, &mut remaining);
        let ours: Vec<u32> = info.deleted.iter().map(|c| c.spi_in).collect();
        // RFC 7296 §1.4.1: "The response to a request that deletes the IKE SA is an empty
        // INFORMATIONAL response"; deleted CHILD SAs are answered with "Delete payloads for
        // the paired SAs going in the other direction"; a liveness check gets an empty one.
        let payloads = if info.delete_ike || ours.is_empty() {
            Vec::new()
        } else {
            vec![Payload::Delete(Delete {
                protocol: ProtocolId::ESP,
                spis: ours,
            })]
        };
        respond(self, &mut s.session, &payloads)?;
        s.children = remaining;
        for notify_type in info.errors {
            self.events.push_back(Event::PeerError { notify_type });
        }
        for c in info.deleted {
            self.events.push_back(Event::ChildSaDeleted {
                spi_in: c.spi_in,
                spi_out: c.spi_out,
            });
        }
        if info.delete_ike {
            return Ok(Some(self.close_established(s, DeleteReason::PeerDeleted)));
        }
        Ok(None)
    }

    /// A CREATE_CHILD_SA request of the peer: a new or rekeyed CHILD SA (RFC 7296 §1.3.1,
    /// §1.3.3, optionally with PFS), evaluated by the responder's code against our proposals
    /// and subnets. For the keys it does not matter that we initiated the IKE SA: §2.17 takes
    /// "the initiator" of the exchange, here the peer, so its direction is our inbound.
    fn create_child(
        &self,
        s: &Established,
        now: Instant,
        inner: &[Payload<'_>],
        entropy: &mut dyn Entropy,
    ) -> Result<create_child::Created, Error> {
        let config = &self.config;
        // RFC 7296 §1.3.2: an IKE SA rekey carries IKE proposals and no REKEY_SA. Unless
        // configured to follow it, it is refused: "A minimal implementation [...] may refuse
        // all CREATE_CHILD_SA requests within an IKE SA" (§1.3).
        let rekey_sa = inner
            .iter()
            .any(|p| matches!(p, Payload::Notify(n) if n.notify_type == NotifyType::REKEY_SA));
        let ike_proposals = inner.iter().any(
            |p| matches!(p, Payload::Sa(sa) if sa.proposals.iter().all(|p| p.protocol == ProtocolId::IKE)),
        );
        if ike_proposals && !rekey_sa && !config.accept_ike_rekey {
            return Err(Error::NoAdditionalSas);
        }
        // RFC 7296 §2.25: TEMPORARY_FAILURE while our own IKE SA rekey is in flight (see the
        // responder's answer to the same collision).
        if ike_proposals && !rekey_sa && matches!(s.ours, rekey::Ours::IkeRekey(_)) {
            return Err(Error::TemporaryFailure);
        }
        let cx = create_child::Context {
            ike_proposals: &config.ike_proposals,
            esp_proposals: &config.esp_proposals,
            local_subnet: config.local_subnet,
            remote_subnet: config.remote_subnet,
            child_lifetime: config.child_lifetime,
            sa: &s.session.sa,
            children: &s.children,
            now,
            udp_encap: self.nat_detected || self.floated,
        };
        create_child::process(&cx, inner, entropy)
    }

    /// The peer rekeyed the IKE SA into `sa` (RFC 7296 §1.3.2, §2.18): we carry on as the new
    /// one, with every CHILD SA (§2.8), and keep the old one until the peer deletes it ("the
    /// initiator deletes the old IKE SA") or it is replaced again.
    fn peer_rekeyed(&mut self, s: &mut Established, sa: IkeSa, now: Instant, entropy: &mut dyn Entropy) {
        let mut old = mem::replace(&mut s.session, Session::new(sa, None));
        // Our request in flight on the old SA is moot; a CHILD SA rekey of ours is tried again
        // on the new one.
        old.abandon_request();
        if let rekey::Ours::ChildRekey(r) = mem::replace(&mut s.ours, rekey::Ours::Plain)
            && let Some(c) = s.children.iter_mut().find(|c| c.spi_in == r.old.spi_in)
        {
            c.rekey_at = Some(now);
        }
        s.previous = Some(Previous {
            session: old,
            expires: deadline(now, REKEYED_SA_LINGER),
        });
        s.ike_rekey_at = self
            .config
            .ike_lifetime
            .and_then(|l| rekey::soft_deadline(now, l, entropy));
    }

    /// Our rekey of the IKE SA made `sa` (RFC 7296 §1.3.2): it carries on with every CHILD
    /// SA, and we delete the old one (§2.8: "After the new equivalent IKE SA is created, the
    /// initiator deletes the old IKE SA"), keeping it until the peer answers.
    fn we_rekeyed(&mut self, s: &mut Established, sa: IkeSa, now: Instant, entropy: &mut dyn Entropy) {
        let mut old = mem::replace(&mut s.session, Session::new(sa, None));
        self.request(&mut old, &[delete_ike()], now);
        s.previous = Some(Previous {
            session: old,
            expires: deadline(now, REKEYED_SA_LINGER),
        });
        s.ike_rekey_at = self
            .config
            .ike_lifetime
            .and_then(|l| rekey::soft_deadline(now, l, entropy));
    }

    /// A message on the IKE SA a rekey replaced: the answer to our DELETE of it, or the peer's
    /// requests there (its DELETE, answered and then the SA is gone; a CREATE_CHILD_SA,
    /// refused: RFC 7296 §2.8, the old SA is only there to be deleted).
    fn previous_sa(
        &mut self,
        s: &mut Established,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        h: &Header,
        datagram: &[u8],
    ) -> Result<Option<Cache>, Error> {
        let Some(Previous { session: old, .. }) = s.previous.as_mut() else {
            return Err(Error::Unexpected("SPIs of another IKE SA"));
        };
        if h.flags.contains(Flags::INITIATOR) == old.sa.is_initiator() {
            return Err(Error::Unexpected(
                "message of the peer with the wrong Initiator flag",
            ));
        }
        if h.flags.contains(Flags::RESPONSE) {
            if !old.answers_pending(h) {
                return Err(Error::Unexpected("response to no request of ours"));
            }
            old.sa.open(datagram)?;
            s.previous = None;
            s.last_heard = now;
            return Ok(None);
        }
        match old.window(h.message_id, datagram) {
            Window::New => {}
            Window::Retransmitted(response) => {
                let payload = response.to_vec();
                self.transmits.push_back(Transmit {
                    local,
                    remote,
                    payload,
                });
                return Ok(None);
            }
            Window::Drop(why) => return Err(Error::Unexpected(why)),
        }
        let opened = old.sa.open(datagram)?;
        s.last_heard = now;
        let inner = payload::decode_inner_chain(opened.first_inner, &opened.plain).unwrap_or_default();
        let delete = inner
            .iter()
            .any(|p| matches!(p, Payload::Delete(d) if d.protocol == ProtocolId::IKE));
        let exchange = opened.header.exchange;
        let no_more = [Payload::Notify(Notify::new(NotifyType::NO_ADDITIONAL_SAS, &[]))];
        let answer: &[Payload<'_>] = if exchange == ExchangeType::INFORMATIONAL {
            &[]
        } else {
            &no_more
        };
        let response = old.respond(exchange, h.message_id, datagram, answer)?;
        self.transmits.push_back(Transmit {
            local,
            remote,
            payload: response,
        });
        if delete {
            s.previous = None;
        }
        Ok(None)
    }

    /// Retransmits our DELETE of the IKE SA a rekey replaced, and forgets that SA once the
    /// retransmissions are spent (nothing more can be done for it: its CHILD SAs live on
    /// in the new one) or it lingered long enough.
    pub(super) fn previous_timeout(&mut self, s: &mut Established, now: Instant, policy: &Retransmit) {
        let Some(p) = s.previous.as_mut() else {
            return;
        };
        match p.session.on_timer(now, policy) {
            Retry::Resend(d) => self.send(d),
            Retry::GiveUp => s.previous = None,
            Retry::Idle if now >= p.expires => s.previous = None,
            Retry::Idle => {}
        }
    }

    /// What our CHILD SA rekeys are checked against.
    pub(super) fn rekey_params<'c>(&self, config: &'c Config) -> rekey::Params<'c> {
        rekey::Params {
            esp: &config.esp_proposals,
            local: &config.local_subnet,
            remote: &config.remote_subnet,
            lifetime: config.child_lifetime,
            udp_encap: self.nat_detected || self.floated,
            retransmit: &config.retransmit,
        }
    }

    /// Reports changes to the CHILD SAs made by our rekeys.
    fn report(&mut self, changes: Vec<rekey::ChildChange>) {
        for c in changes {
            self.events.push_back(match c {
                rekey::ChildChange::Installed(child) => Event::ChildSaInstalled(child),
                rekey::ChildChange::Deleted(c) => Event::ChildSaDeleted {
                    spi_in: c.spi_in,
                    spi_out: c.spi_out,
                },
            });
        }
    }

    /// Ends the established IKE SA with its CHILD SAs (RFC 7296 §1.4.1: "Deleting an IKE SA
    /// implicitly closes any remaining Child SAs negotiated under it"); returns its last
    /// exchange for retransmissions.
    pub(super) fn close_established(&mut self, s: &mut Established, reason: DeleteReason) -> Cache {
        for c in s.children.drain(..) {
            self.events.push_back(Event::ChildSaDeleted {
                spi_in: c.spi_in,
                spi_out: c.spi_out,
            });
        }
        self.events.push_back(Event::IkeSaDeleted {
            spi: self.spi_i,
            reason,
        });
        s.session.take_last()
    }
}

/// The notify answering a CREATE_CHILD_SA request we refuse: type, protocol and SPI (RFC 7296
/// §3.10: "the SPI is included only with INVALID_SELECTORS, REKEY_SA, and
/// CHILD_SA_NOT_FOUND"), and data (§3.10.1: the accepted group for INVALID_KE_PAYLOAD). A
/// failure without a notify of its own is answered NO_PROPOSAL_CHOSEN, as the responder
/// does: the peer's window only moves on with an answer.
fn refusal(e: &Error) -> (NotifyType, ProtocolId, Vec<u8>, Vec<u8>) {
    let notify = e.notify().unwrap_or(NotifyType::NO_PROPOSAL_CHOSEN);
    match *e {
        Error::InvalidKe { selected, .. } => (
            notify,
            ProtocolId::NONE,
            Vec::new(),
            selected.to_be_bytes().to_vec(),
        ),
        Error::ChildSaNotFound { protocol, spi } => {
            (notify, protocol, spi.to_be_bytes().to_vec(), Vec::new())
        }
        _ => (notify, ProtocolId::NONE, Vec::new(), Vec::new()),
    }
}
