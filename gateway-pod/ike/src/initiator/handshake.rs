//! The initiator's handshake: the IKE_SA_INIT request and its retries (COOKIE,
//! INVALID_KE_PAYLOAD, REDIRECT), the NAT-T float, the IKE_AUTH request and the checks of its
//! response that end in the IKE SA and its first CHILD SA (RFC 7296 §1.2).

use super::*;
use crate::sa::mid_sync;

impl Initiator {
    /// Builds the IKE_SA_INIT request from `s`, sends it and restarts its retransmission.
    pub(super) fn send_init(&mut self, s: &mut ExpectInit, now: Instant, policy: &Retransmit) {
        let src = nat_detection_hash(self.spi_i, 0, self.local);
        let dst = nat_detection_hash(self.spi_i, 0, self.remote);
        let config = Arc::clone(&self.config);
        let from = config.redirected_from.as_ref().map(encode_redirected_from);
        let mut payloads = Vec::with_capacity(7);
        // RFC 7296 §2.6: "include the COOKIE notification containing the received data as
        // the first payload, and all other payloads unchanged".
        if let Some(c) = &s.cookie {
            payloads.push(Payload::Notify(Notify::new(NotifyType::COOKIE, c)));
        }
        payloads.extend([
            Payload::Sa(offer::ike_sa(&self.config.ike_proposals)),
            Payload::Ke(Ke {
                group: WireGroup(s.kex.group().number()),
                data: &s.ke_public,
            }),
            Payload::Nonce(Nonce { data: &s.ni }),
            // RFC 7296 §2.23: the hashes of our address and port and of the responder's, so
            // that either side sees a NAT in between.
            Payload::Notify(Notify::new(NotifyType::NAT_DETECTION_SOURCE_IP, &src)),
            Payload::Notify(Notify::new(NotifyType::NAT_DETECTION_DESTINATION_IP, &dst)),
        ]);
        // RFC 5685 §4.1: a client redirected here names the gateway it came from, else it
        // announces that it can be redirected.
        if let Some(from) = &from {
            payloads.push(Payload::Notify(Notify::new(NotifyType::REDIRECTED_FROM, from)));
        } else if config.redirect_supported {
            payloads.push(Payload::Notify(Notify::new(NotifyType::REDIRECT_SUPPORTED, &[])));
        }
        s.request = Message {
            header: Header::new(self.spi_i, 0, ExchangeType::IKE_SA_INIT, Flags::INITIATOR, 0),
            payloads,
        }
        .to_vec();
        s.retransmits = 0;
        s.deadline = deadline(now, policy.wait(0));
        self.send(s.request.clone());
    }

    /// The IKE_SA_INIT response: a retry (`None`, the request was sent again) or the
    /// IKE_AUTH request sent and its state.
    #[allow(clippy::too_many_lines)]
    pub(super) fn init_response(
        &mut self,
        s: &mut ExpectInit,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        entropy: &mut dyn Entropy,
    ) -> Result<Option<Box<ExpectAuth>>, Error> {
        let config = Arc::clone(&self.config);
        let msg = Message::decode(datagram)?;
        let h = msg.header;
        if h.exchange != ExchangeType::IKE_SA_INIT
            || !h.flags.contains(Flags::RESPONSE)
            || h.flags.contains(Flags::INITIATOR)
            || h.message_id != 0
            || h.spi_i != self.spi_i
        {
            return Err(Error::Unexpected("not a response to our IKE_SA_INIT request"));
        }
        let (mut sa, mut ke, mut nr, mut cookie, mut invalid_ke, mut error) =
            (None, None, None, None, None, None);
        let mut redirect = None;
        let (mut nat_src, mut nat_dst) = (Vec::new(), Vec::new());
        for p in &msg.payloads {
            match p {
                Payload::Sa(x) => sa = Some(x),
                Payload::Ke(k) => ke = Some(k),
                Payload::Nonce(n) => nr = Some(n.data),
                Payload::Notify(n) => match n.notify_type {
                    NotifyType::COOKIE => cookie = Some(n.data),
                    NotifyType::INVALID_KE_PAYLOAD => invalid_ke = Some(n.data),
                    NotifyType::REDIRECT => redirect = Some(n.data),
                    NotifyType::NAT_DETECTION_SOURCE_IP => nat_src.push(n.data),
                    NotifyType::NAT_DETECTION_DESTINATION_IP => nat_dst.push(n.data),
                    t if t.is_error() => error = error.or(Some(t)),
                    _ => {}
                },
                _ => {}
            }
        }
        if let Some(data) = redirect {
            // RFC 5685 §4.1: the response is unprotected, so the REDIRECT must carry our Ni
            // ("the VPN client MUST verify that the nonce ... is the same as the nonce it sent"),
            // and one we did not ask for is not followed.
            let (gateway, nonce) = decode_redirect(data)?;
            if !config.redirect_supported && config.redirected_from.is_none() {
                return Err(Error::Unexpected("REDIRECT without REDIRECT_SUPPORTED"));
            }
            if nonce != s.ni.as_slice() {
                return Err(Error::Unexpected("REDIRECT with a nonce other than ours"));
            }
            self.redirected_to = Some(gateway);
            return Err(Error::Redirected);
        }
        if let Some(c) = cookie {
            if !COOKIE_LEN.contains(&c.len()) {
                return Err(Error::Unexpected("COOKIE of other than 1 to 64 octets"));
            }
            // RFC 7296 §2.6: "If the IKE_SA_INIT response includes the COOKIE notification,
            // the initiator MUST then retry the IKE_SA_INIT request".
            Self::count_retry(s, &config)?;
            s.cookie = Some(c.to_vec());
            self.send_init(s, now, &config.retransmit);
            return Ok(None);
        }
        if let Some(data) = invalid_ke {
            // RFC 7296 §1.2: "If the initiator guesses wrong, the responder will respond with a
            // Notify payload of type INVALID_KE_PAYLOAD indicating the selected group. In this
            // case, the initiator MUST retry the IKE_SA_INIT with the corrected Diffie-Hellman
            // group." Only a group we offered, and not the one just refused.
            let refused = Error::Refused {
                exchange: ExchangeType::IKE_SA_INIT,
                notify: NotifyType::INVALID_KE_PAYLOAD,
            };
            let wanted = <[u8; 2]>::try_from(data)
                .map(u16::from_be_bytes)
                .map_err(|_| refused)?;
            let group = dh_group(wanted)
                .filter(|g| *g != s.kex.group())
                .filter(|g| config.ike_proposals.iter().any(|p| p.dh.contains(g)))
                .ok_or(refused)?;
            Self::count_retry(s, &config)?;
            s.kex = entropy.key_exchange(group)?;
            s.ke_public = s.kex.public_value()?;
            self.send_init(s, now, &config.retransmit);
            return Ok(None);
        }
        if let Some(notify) = error {
            // RFC 7296 §2.21.1 lets an initiator wait on after an unprotected error, in case
            // it was forged; a responder that refuses our proposals would answer the same to
            // every retransmission, so we give up at once, as strongSwan does.
            return Err(Error::Refused {
                exchange: ExchangeType::IKE_SA_INIT,
                notify,
            });
        }
        // RFC 7296 §3.1, Responder's SPI: zero only "in the first message of an initial IKE
        // exchange (including repeats of that message including a cookie)".
        if h.spi_r == 0 {
            return Err(Error::Unexpected("IKE_SA_INIT response without SPIr"));
        }
        let sa = sa.ok_or(Error::MissingPayload("SAr1"))?;
        let ke = ke.ok_or(Error::MissingPayload("KEr"))?;
        let nr = nr.ok_or(Error::MissingPayload("Nr"))?;
        let choice = offer::check_ike(sa, &config.ike_proposals, s.kex.group())?;
        // RFC 7296 §3.4: the KE payload's group "MUST match the Diffie-Hellman group
        // specified in the accepted proposal".
        if ke.group.0 != choice.dh.number() {
            return Err(Error::InvalidResponse(
                "KE payload for another group than the SA's",
            ));
        }
        let g_ir = s.kex.compute_shared(ke.data)?;
        let prf = Prf::new(choice.prf);
        let keys = IkeSaKeys::from_ike_sa_init(
            prf,
            &s.ni,
            nr,
            g_ir.expose(),
            &self.spi_i.to_be_bytes(),
            &h.spi_r.to_be_bytes(),
            choice.encryption,
            choice.integrity,
        )?;
        // RFC 7296 §2.23: the responder's hashes cover the SPIs of its header and the
        // addresses as it saw them: its own (the source of this datagram) and ours (where the
        // datagram arrived). A mismatch means a NAT rewrote one of them.
        let peer_nat = behind_nat(nat_src.iter().copied(), self.spi_i, h.spi_r, remote).unwrap_or(false);
        let our_nat = behind_nat(nat_dst.iter().copied(), self.spi_i, h.spi_r, local).unwrap_or(false);
        let nat_detected = peer_nat || our_nat;
        let ike = IkeSa::new_initiator(
            self.spi_i,
            h.spi_r,
            prf,
            choice.encryption,
            choice.integrity,
            keys,
            nat_detected,
        )?;
        let mut session = Session::for_initiator(ike);
        // SPIs 1..=255 are reserved by IANA (RFC 4303 §2.1).
        let spi_bytes = random_spi::<4>(entropy, 256, Some(h.spi_i))?;
        let psk = self.psk.as_ref().ok_or(Error::WrongState("PSK gone"))?;
        // RFC 7296 §2.15: the initiator signs its first message (the IKE_SA_INIT request that
        // was answered, with the cookie if any), Nr and prf(SK_pi, IDi').
        let octets = signed_octets(prf, &s.request, nr, session.sa.sk_pi(), config.local_id.body());
        let auth = psk_auth(prf, psk.expose(), &octets);
        let mut inner = vec![Payload::IdI(config.local_id.identity())];
        // RFC 7296 §1.2: "The initiator might also send its view of who the responder is
        // with the optional IDr payload"; a responder with several identities picks by it.
        if let Some(id) = &config.remote_id {
            inner.push(Payload::IdR(id.identity()));
        }
        inner.extend([
            Payload::Auth(Auth {
                method: AuthMethod::PSK,
                data: auth.expose(),
            }),
            Payload::Sa(offer::esp_sa(&config.esp_proposals, &spi_bytes)),
            Payload::TsI(Ts {
                selectors: vec![offer::selector(&config.local_subnet)],
            }),
            Payload::TsR(Ts {
                selectors: vec![offer::selector(&config.remote_subnet)],
            }),
        ]);
        // RFC 6311 §3: a fleet member that takes the SA over synchronizes Message IDs with a
        // responder that announces support in its answer.
        if config.message_id_sync {
            inner.push(mid_sync::announcement());
        }
        let request = session
            .start_request(ExchangeType::IKE_AUTH, &inner, now, &config.retransmit)?
            .ok_or(Error::WrongState("a request is in flight"))?;
        self.nat_detected = nat_detected;
        if nat_detected || config.nat_t.force {
            self.local = SocketAddr::new(self.local.ip(), config.nat_t.local_port);
            self.remote = SocketAddr::new(self.remote.ip(), config.nat_t.remote_port);
            self.floated = true;
        }
        self.send(request);
        Ok(Some(Box::new(ExpectAuth {
            session,
            ni: mem::take(&mut s.ni),
            nr: nr.to_vec(),
            init_response: datagram.to_vec(),
            spi_in: u32::from_be_bytes(spi_bytes),
            peer_authenticated: false,
        })))
    }

    fn count_retry(s: &mut ExpectInit, config: &Config) -> Result<(), Error> {
        if s.retries >= config.max_init_retries {
            return Err(Error::TooManyRetries(s.retries));
        }
        s.retries += 1;
        Ok(())
    }

    /// A datagram while IKE_AUTH is in flight.
    pub(super) fn auth_response(
        &mut self,
        mut s: Box<ExpectAuth>,
        now: Instant,
        h: &Header,
        datagram: &[u8],
        entropy: &mut dyn Entropy,
    ) -> Result<(), Error> {
        // RFC 7296 §2.2: a response is matched to our request by Message ID (and here
        // exchange); a late IKE_SA_INIT response or anything else is dropped.
        let opened = if !s.session.sa.matches(h)
            || !h.flags.contains(Flags::RESPONSE)
            || !s.session.answers_pending(h)
        {
            Err(Error::Unexpected("not the response to our IKE_AUTH request"))
        } else {
            s.session.sa.open(datagram)
        };
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                self.state = State::ExpectAuth(s);
                return Err(e);
            }
        };
        s.session.complete_request();
        // Authenticated by its ICV from here: every failure is final.
        let result = payload::decode_inner_chain(opened.first_inner, &opened.plain)
            .map_err(Error::MalformedInner)
            .and_then(|inner| self.complete_auth(&mut s, now, &inner));
        match result {
            Ok(child) => {
                self.psk = None;
                let ExpectAuth { session, .. } = *s;
                let (child, peer_id, mid_sync) = child;
                self.out.event(Event::IkeSaEstablished {
                    spi_i: self.spi_i,
                    spi_r: session.sa.spi_r,
                    peer_id: peer_id.clone(),
                    remote: self.remote,
                    nat_detected: self.nat_detected,
                });
                let authenticated = Authenticated {
                    role: Role::Initiator,
                    session,
                    children: vec![ChildRef::new(&child, now, entropy)],
                    peer_id,
                    local: self.local,
                    remote: self.remote,
                    floated: self.floated,
                    redirect_supported: false,
                    mid_sync,
                    init: None,
                };
                self.out.event(Event::ChildSaInstalled(Box::new(child)));
                let config = Arc::clone(&self.config);
                self.state =
                    State::Established(Box::new(Established::new(config, authenticated, now, entropy)));
                Ok(())
            }
            Err(e) => {
                // RFC 7296 §2.21.2: the peer is told of an AUTH failure on our side in a
                // separate INFORMATIONAL exchange; an IKE SA that authenticated but cannot
                // carry its CHILD SA is deleted (see the module docs). Neither is waited for.
                let inner = if s.peer_authenticated {
                    Some(delete_ike())
                } else if matches!(e, Error::AuthenticationFailed(_)) {
                    Some(Payload::Notify(Notify::new(
                        NotifyType::AUTHENTICATION_FAILED,
                        &[],
                    )))
                } else {
                    None
                };
                if let Some(p) = inner {
                    self.request(&mut s.session, &[p], now);
                }
                self.fail(e)
            }
        }
    }

    /// The authenticated IKE_AUTH response: the responder's identity and AUTH, then the
    /// CHILD SA it chose.
    fn complete_auth(
        &mut self,
        s: &mut ExpectAuth,
        now: Instant,
        inner: &[Payload<'_>],
    ) -> Result<(ChildSa, IdBuf, bool), Error> {
        let config = Arc::clone(&self.config);
        let (mut id_r, mut auth, mut sa, mut ts_i, mut ts_r, mut error) =
            (None, None, None, None, None, None);
        let mut redirect = None;
        for p in inner {
            match p {
                Payload::Notify(n) if n.notify_type == NotifyType::REDIRECT => redirect = Some(n.data),
                Payload::IdR(id) => id_r = Some(id),
                Payload::Auth(a) => auth = Some(a),
                Payload::Sa(x) => sa = Some(x),
                Payload::TsI(t) => ts_i = Some(t),
                Payload::TsR(t) => ts_r = Some(t),
                Payload::Notify(n) if n.notify_type.is_error() => error = error.or(Some(n.notify_type)),
                _ => {}
            }
        }
        // RFC 7296 §2.21.2: "If the failure is related to creating the IKE SA (for example,
        // an AUTHENTICATION_FAILED Notify error message is returned), the IKE SA is not
        // created" — the response then has the notify and no AUTH.
        let Some(auth) = auth else {
            return Err(
                error.map_or(Error::MissingPayload("AUTH"), |notify| Error::Refused {
                    exchange: ExchangeType::IKE_AUTH,
                    notify,
                }),
            );
        };
        let id_r = IdBuf::new(id_r.ok_or(Error::MissingPayload("IDr"))?);
        if config.remote_id.as_ref().is_some_and(|want| *want != id_r) {
            return Err(Error::AuthenticationFailed(
                "IDr is not the configured peer identity",
            ));
        }
        if auth.method != AuthMethod::PSK {
            return Err(Error::AuthenticationFailed("auth method is not PSK"));
        }
        let psk = self.psk.as_ref().ok_or(Error::WrongState("PSK gone"))?;
        let ike = &s.session.sa;
        let prf = ike.prf;
        // RFC 7296 §2.15: the responder signs its IKE_SA_INIT response, Ni and prf(SK_pr,
        // IDr'); "AUTH = prf( prf(Shared Secret, "Key Pad for IKEv2"), <...SignedOctets>)".
        let theirs = signed_octets(prf, &s.init_response, &s.ni, ike.sk_pr(), id_r.body());
        if !verify_psk_auth(prf, psk.expose(), &theirs, auth.data) {
            return Err(Error::AuthenticationFailed("AUTH does not verify with the PSK"));
        }
        s.peer_authenticated = true;
        // RFC 5685 §6: a gateway may redirect in the IKE_AUTH response, after authenticating
        // itself; the client then deletes this IKE SA (done by the caller of this function,
        // as for every failure after authentication) and goes to the new gateway.
        if let Some(data) = redirect.filter(|_| config.redirect_supported || config.redirected_from.is_some())
        {
            let (gateway, _) = decode_redirect(data).map_err(Error::MalformedInner)?;
            self.redirected_to = Some(gateway);
            return Err(Error::Redirected);
        }
        // RFC 7296 §2.21.2: a CHILD SA refused in IKE_AUTH leaves the IKE SA up and the
        // response carries the error instead of SAr2, TSi and TSr.
        if let Some(notify) = error {
            return Err(Error::Refused {
                exchange: ExchangeType::IKE_AUTH,
                notify,
            });
        }
        let sa = sa.ok_or(Error::MissingPayload("SAr2"))?;
        let ts_i = ts_i.ok_or(Error::MissingPayload("TSi"))?;
        let ts_r = ts_r.ok_or(Error::MissingPayload("TSr"))?;
        let esp = offer::check_esp(sa, &config.esp_proposals)?;
        let ts_local = offer::check_ts(&ts_i.selectors, &config.local_subnet)?;
        let ts_remote = offer::check_ts(&ts_r.selectors, &config.remote_subnet)?;
        // RFC 7296 §2.17: KEYMAT = prf+(SK_d, Ni | Nr) for the first CHILD SA, "All keys for
        // SAs carrying data from the initiator to the responder are taken before SAs going
        // from the responder to the initiator": ours outbound.
        let keys = ChildSaKeys::derive(prf, ike.sk_d(), None, &s.ni, &s.nr, esp.encryption, esp.integrity)?;
        let child = ChildSa {
            spi_in: s.spi_in,
            spi_out: esp.peer_spi,
            encryption: esp.encryption,
            integrity: esp.integrity,
            esn: esp.esn,
            inbound: keys.responder,
            outbound: keys.initiator,
            ts_local,
            ts_remote,
            lifetime: config.child_lifetime,
            installed_at: now,
            udp_encap: self.nat_detected || self.floated,
            replaces: None,
        };
        Ok((child, id_r, config.message_id_sync && mid_sync::announced(inner)))
    }
}
