//! The responder's handshake: the IKE_SA_INIT request (proposal, KE group, NAT detection,
//! our response), the IKE_AUTH request (decrypted, its identity reported), the PSK step and
//! the IKE_AUTH response with the first CHILD SA (RFC 7296 §1.2).

use super::*;
use crate::sa::mid_sync;

impl Responder {
    /// IKE_SA_INIT request → response (RFC 7296 §1.2).
    pub(super) fn handle_init(
        &mut self,
        d: &Incoming<'_>,
        entropy: &mut dyn Entropy,
    ) -> Result<ExpectAuth, Error> {
        let (now, local, remote, datagram) = (d.now, d.local, d.remote, d.bytes);
        let msg = Message::decode(datagram)?;
        let h = msg.header;
        if h.exchange != ExchangeType::IKE_SA_INIT
            || h.flags.contains(Flags::RESPONSE)
            || !h.flags.contains(Flags::INITIATOR)
            || h.message_id != 0
            || h.spi_r != 0
        {
            return Err(Error::Unexpected("not an IKE_SA_INIT request"));
        }
        let (mut sa, mut ke, mut ni) = (None, None, None);
        let mut redirect_supported = false;
        let (mut nat_src, mut nat_dst) = (Vec::new(), Vec::new());
        for p in &msg.payloads {
            match p {
                Payload::Sa(s) => sa = Some(s),
                Payload::Ke(k) => ke = Some(k),
                Payload::Nonce(n) => ni = Some(n.data),
                // RFC 5685 §3, §4.1: a client that can be redirected says so, or names the
                // gateway that redirected it.
                Payload::Notify(n)
                    if n.notify_type == NotifyType::REDIRECT_SUPPORTED
                        || n.notify_type == NotifyType::REDIRECTED_FROM =>
                {
                    redirect_supported = true;
                }
                Payload::Notify(n) if n.notify_type == NotifyType::NAT_DETECTION_SOURCE_IP => {
                    nat_src.push(n.data);
                }
                Payload::Notify(n) if n.notify_type == NotifyType::NAT_DETECTION_DESTINATION_IP => {
                    nat_dst.push(n.data);
                }
                _ => {}
            }
        }
        let result = (|| {
            let sa = sa.ok_or(Error::MissingPayload("SA"))?;
            let ke = ke.ok_or(Error::MissingPayload("KE"))?;
            let ni = ni.ok_or(Error::MissingPayload("Ni"))?;
            let choice = select_ike(sa, &self.config.ike_proposals, ke.group.0)?;
            // RFC 7296 §3.4: "If the selected proposal uses a different Diffie-Hellman group
            // (other than NONE), the message MUST be rejected with a Notify payload of type
            // INVALID_KE_PAYLOAD." Its data is the selected group (§3.10.1).
            if ke.group.0 != choice.dh.number() {
                return Err(Error::InvalidKe {
                    got: ke.group.0,
                    selected: choice.dh.number(),
                });
            }
            Ok((choice, ke, ni))
        })();
        let (choice, ke, ni) = match result {
            Ok(v) => v,
            Err(e) => {
                // RFC 7296 §3.10.1, INVALID_SYNTAX: "This error MAY be returned only for and in
                // an encrypted packet if the Message ID and cryptographic checksum were valid";
                // nothing in IKE_SA_INIT is, so such requests are dropped silently.
                if let Some(notify) = e.notify().filter(|n| *n != NotifyType::INVALID_SYNTAX) {
                    let data = match e {
                        Error::InvalidKe { selected, .. } => selected.to_be_bytes().to_vec(),
                        _ => Vec::new(),
                    };
                    self.send(local, remote, init_error(&h, notify, &data));
                }
                return Err(e);
            }
        };
        self.init_response(
            now, local, remote, datagram, &h, choice, ke, ni, &nat_src, &nat_dst, entropy,
        )
        .map(|mut next| {
            next.init.redirect_supported = redirect_supported;
            next
        })
        .inspect_err(|e| {
            if let Some(notify) = e.notify().filter(|n| *n != NotifyType::INVALID_SYNTAX) {
                self.send(local, remote, init_error(&h, notify, &[]));
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn init_response(
        &mut self,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        h: &Header,
        choice: IkeChoice,
        ke: &Ke<'_>,
        ni: &[u8],
        nat_src: &[&[u8]],
        nat_dst: &[&[u8]],
        entropy: &mut dyn Entropy,
    ) -> Result<ExpectAuth, Error> {
        let kex = entropy.key_exchange(choice.dh)?;
        let g_ir = kex.compute_shared(ke.data)?;
        let mut nr = vec![0u8; NONCE_LEN];
        entropy.fill(&mut nr)?;
        let spi_r = u64::from_be_bytes(random_spi::<8>(entropy, 1, None)?);
        let prf = Prf::new(choice.prf);
        let keys = IkeSaKeys::from_ike_sa_init(
            prf,
            ni,
            &nr,
            g_ir.expose(),
            &h.spi_i.to_be_bytes(),
            &spi_r.to_be_bytes(),
            choice.encryption,
            choice.integrity,
        )?;
        // The request's hashes use the SPIs of its header: SPIr is still zero there.
        let peer_nat = behind_nat(nat_src.iter().copied(), h.spi_i, 0, remote).unwrap_or(false);
        let our_nat = behind_nat(nat_dst.iter().copied(), h.spi_i, 0, local).unwrap_or(false);
        let public = kex.public_value()?;
        let sa_payload = choice.to_sa();
        // Port 0 is never the port we answer from: the hash cannot match.
        let claimed_src = if self.config.force_udp_encap {
            SocketAddr::new(local.ip(), 0)
        } else {
            local
        };
        let src_hash = nat_detection_hash(h.spi_i, spi_r, claimed_src);
        let dst_hash = nat_detection_hash(h.spi_i, spi_r, remote);
        let mut payloads = vec![
            Payload::Sa(sa_payload),
            Payload::Ke(Ke {
                group: WireGroup(choice.dh.number()),
                data: &public,
            }),
            Payload::Nonce(Nonce { data: &nr }),
        ];
        // RFC 7296 §2.23: NAT detection is answered when the initiator asked for it.
        if !nat_src.is_empty() || !nat_dst.is_empty() {
            payloads.push(Payload::Notify(Notify::new(
                NotifyType::NAT_DETECTION_SOURCE_IP,
                &src_hash,
            )));
            payloads.push(Payload::Notify(Notify::new(
                NotifyType::NAT_DETECTION_DESTINATION_IP,
                &dst_hash,
            )));
        }
        let response = Message {
            header: Header::new(h.spi_i, spi_r, ExchangeType::IKE_SA_INIT, Flags::RESPONSE, 0),
            payloads,
        }
        .to_vec();
        let sa = IkeSa::new(
            h.spi_i,
            spi_r,
            prf,
            choice.encryption,
            choice.integrity,
            keys,
            peer_nat || our_nat,
        )?;
        self.send(local, remote, response.clone());
        Ok(ExpectAuth {
            sa,
            init: InitExchange {
                redirect_supported: false,
                choice,
                ni: ni.to_vec(),
                nr,
                request: datagram.to_vec(),
                response,
            },
            deadline: deadline(now, self.config.half_open_timeout),
        })
    }

    /// IKE_AUTH request: decrypt, parse, ask for the PSK.
    pub(super) fn handle_auth(
        &mut self,
        mut s: ExpectAuth,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), Error> {
        if datagram == s.init.request {
            let resp = s.init.response.clone();
            self.state = State::ExpectAuth(Box::new(s));
            self.retransmit(local, remote, &resp);
            return Ok(());
        }
        match Self::open_auth(&s, datagram) {
            // Not (yet) authenticated: dropped, the state stays.
            Err(e @ (Error::Malformed(_) | Error::Unexpected(_) | Error::Packet(_))) => {
                self.state = State::ExpectAuth(Box::new(s));
                Err(e)
            }
            Err(e) => {
                let response = Self::encrypted_error(&mut s.sa, 1, e);
                if let Some(r) = &response {
                    self.send(local, remote, r.clone());
                }
                self.fail(e, response.map(|r| Box::new(Kept::new(datagram, r))))
            }
            Ok((plain, first_inner, id)) => {
                self.out.event(Event::PeerIdentified { id });
                self.state = State::ExpectPsk(Box::new(ExpectPsk {
                    sa: s.sa,
                    init: s.init,
                    request: RequestDigest::of(datagram),
                    plain,
                    first_inner,
                    message_id: 1,
                    local,
                    remote,
                    deadline: s.deadline,
                    redirect: None,
                }));
                Ok(())
            }
        }
    }

    /// Checks the header, verifies and decrypts the SK payload, and checks the inner
    /// payloads; returns the plaintext chain and IDi.
    fn open_auth(s: &ExpectAuth, datagram: &[u8]) -> Result<(Vec<u8>, PayloadType, IdBuf), Error> {
        let msg = Message::decode(datagram)?;
        let h = msg.header;
        if h.exchange != ExchangeType::IKE_AUTH
            || h.flags.contains(Flags::RESPONSE)
            || !h.flags.contains(Flags::INITIATOR)
            || h.spi_i != s.sa.spi_i
            || h.spi_r != s.sa.spi_r
        {
            return Err(Error::Unexpected("not an IKE_AUTH request of this SA"));
        }
        // RFC 7296 §2.2: the first IKE_AUTH request has Message ID 1.
        if h.message_id != 1 {
            return Err(Error::Unexpected(
                "IKE_AUTH request with a Message ID other than 1",
            ));
        }
        let opened = s.sa.open(datagram)?;
        let plain = opened.plain;
        let sk_first_inner = opened.first_inner;
        // Authenticated now, so a malformed inner chain is answered (encrypted).
        let id = {
            let inner = payload::decode_inner_chain(sk_first_inner, &plain).map_err(Error::MalformedInner)?;
            IdBuf::new(&AuthRequest::parse(inner)?.id_i)
        };
        Ok((plain, sk_first_inner, id))
    }

    /// An encrypted response holding the error's notify, if it has one.
    fn encrypted_error(sa: &mut IkeSa, message_id: u32, e: Error) -> Option<Vec<u8>> {
        let notify = e.notify_fields()?;
        let header = sa.header(ExchangeType::IKE_AUTH, message_id, true);
        sa.seal(header, &[notify.payload()]).ok()
    }

    /// Answers [`Event::PeerIdentified`]: `psk` is the peer's pre-shared key, `None` if the
    /// peer is unknown (AUTHENTICATION_FAILED). Verifies AUTH, negotiates the CHILD SA and
    /// queues the IKE_AUTH response.
    pub fn provide_psk(
        &mut self,
        now: Instant,
        psk: Option<&[u8]>,
        entropy: &mut dyn Entropy,
    ) -> Result<(), Error> {
        let mut s = match mem::replace(&mut self.state, State::Closed(None)) {
            State::ExpectPsk(s) => s,
            other => {
                self.state = other;
                return Err(Error::WrongState("no PSK lookup pending"));
            }
        };
        let (local, remote) = (s.local, s.remote);
        if let Some(gateway) = s.redirect.take() {
            let config = Arc::clone(&self.config);
            return match Self::redirect_auth(&config, &mut s, psk, &gateway) {
                Ok(response) => {
                    // Retransmissions of the IKE_AUTH request get the same answer; the peer
                    // deletes the IKE SA or lets it go, and comes back where it was sent.
                    self.send(local, remote, response.clone());
                    self.fail(
                        Error::Redirected,
                        Some(Box::new(Kept::with_digest(s.request, response))),
                    )
                }
                Err(e) => {
                    let response = Self::encrypted_error(&mut s.sa, s.message_id, e);
                    if let Some(r) = &response {
                        self.send(local, remote, r.clone());
                    }
                    self.fail(e, response.map(|r| Box::new(Kept::with_digest(s.request, r))))
                }
            };
        }
        match self.complete_auth(now, &mut s, psk, entropy) {
            Ok((response, events, mid_sync)) => {
                self.send(local, remote, response.clone());
                let children = events
                    .iter()
                    .filter_map(|e| match e {
                        Event::ChildSaInstalled(c) => Some(ChildRef::new(c, now, entropy)),
                        _ => None,
                    })
                    .collect();
                let peer_id = events
                    .iter()
                    .find_map(|e| match e {
                        Event::IkeSaEstablished { peer_id, .. } => Some(peer_id.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| {
                        IdBuf::new(&Identity::Other {
                            id_type: crate::message::codepoints::IdType(0),
                            data: &[],
                        })
                    });
                for e in events {
                    self.out.event(e);
                }
                let ExpectPsk {
                    sa,
                    init,
                    request,
                    message_id,
                    ..
                } = *s;
                let session = Session::new(
                    sa,
                    Some(Answered {
                        message_id,
                        exchange: Kept::with_digest(request, response),
                    }),
                );
                let authenticated = Authenticated {
                    role: Role::Responder,
                    session,
                    children,
                    peer_id,
                    local,
                    remote,
                    floated: false,
                    redirect_supported: init.redirect_supported,
                    mid_sync,
                    init: Some(Box::new(Kept::new(&init.request, init.response))),
                };
                let config = Arc::clone(&self.config);
                self.state =
                    State::Established(Box::new(Established::new(config, authenticated, now, entropy)));
                Ok(())
            }
            Err(e) => {
                let response = Self::encrypted_error(&mut s.sa, s.message_id, e);
                if let Some(r) = &response {
                    self.send(local, remote, r.clone());
                }
                self.fail(e, response.map(|r| Box::new(Kept::with_digest(s.request, r))))
            }
        }
    }

    /// RFC 5685 §6: the IKE_AUTH response to an authenticated peer that we send elsewhere:
    /// IDr, AUTH and N(REDIRECT) naming `gateway` without nonce data ("MUST NOT be included"
    /// outside IKE_SA_INIT), and no CHILD SA.
    fn redirect_auth(
        config: &Config,
        s: &mut ExpectPsk,
        psk: Option<&[u8]>,
        gateway: &GatewayId,
    ) -> Result<Vec<u8>, Error> {
        let plain = mem::take(&mut s.plain);
        let inner = payload::decode_inner_chain(s.first_inner, &plain).map_err(Error::MalformedInner)?;
        let req = AuthRequest::parse(inner)?;
        let id_i = IdBuf::new(&req.id_i);
        // The peer proves the PSK before it learns anything, then we prove ours.
        let auth = Self::psk_auths(config, s, psk, &id_i, req.auth.data)?;
        let sa = &mut s.sa;
        let data = crate::redirect::encode_redirect(gateway, None);
        let payloads = [
            Payload::IdR(config.local_id.identity()),
            Payload::Auth(Auth {
                method: AuthMethod::PSK,
                data: auth.expose(),
            }),
            Payload::Notify(Notify::new(NotifyType::REDIRECT, &data)),
        ];
        let header = sa.header(ExchangeType::IKE_AUTH, s.message_id, true);
        Ok(sa.seal(header, &payloads)?)
    }

    /// RFC 7296 §2.15 for a shared key: checks the initiator's AUTH (`their_auth`, over its
    /// IKE_SA_INIT request, Nr and prf(SK_pi, IDi'), "AUTH = prf( prf(Shared Secret, "Key Pad
    /// for IKEv2"), <InitiatorSignedOctets>)", compared in constant time) and returns ours.
    fn psk_auths(
        config: &Config,
        s: &ExpectPsk,
        psk: Option<&[u8]>,
        id_i: &IdBuf,
        their_auth: &[u8],
    ) -> Result<concentrator_crypto::SecretBytes, Error> {
        let psk = psk.ok_or(Error::AuthenticationFailed("no PSK for this peer"))?;
        let (sa, init) = (&s.sa, &s.init);
        let prf = sa.prf;
        let theirs = signed_octets(prf, &init.request, &init.nr, sa.sk_pi(), id_i.body());
        if !verify_psk_auth(prf, psk, &theirs, their_auth) {
            return Err(Error::AuthenticationFailed("AUTH does not verify with the PSK"));
        }
        let ours = signed_octets(prf, &init.response, &init.ni, sa.sk_pr(), config.local_id.body());
        Ok(psk_auth(prf, psk, &ours))
    }

    fn complete_auth(
        &mut self,
        now: Instant,
        s: &mut ExpectPsk,
        psk: Option<&[u8]>,
        entropy: &mut dyn Entropy,
    ) -> Result<(Vec<u8>, Vec<Event>, bool), Error> {
        let config = Arc::clone(&self.config);
        let plain = mem::take(&mut s.plain);
        let inner = payload::decode_inner_chain(s.first_inner, &plain).map_err(Error::MalformedInner)?;
        let req = AuthRequest::parse(inner)?;
        let id_i = IdBuf::new(&req.id_i);
        let auth = Self::psk_auths(&config, s, psk, &id_i, req.auth.data)?;
        let sa = &mut s.sa;
        let (prf, init) = (sa.prf, &s.init);
        let id_r = config.local_id.identity();

        let mut events = vec![Event::IkeSaEstablished {
            spi_i: sa.spi_i,
            spi_r: sa.spi_r,
            peer_id: id_i,
            remote: s.remote,
            nat_detected: sa.nat_detected,
        }];
        let child = (|| {
            let sa_i = req.sa.as_ref().ok_or(Error::MissingPayload("SAi2"))?;
            let ts_i = req.ts_i.as_ref().ok_or(Error::MissingPayload("TSi"))?;
            let ts_r = req.ts_r.as_ref().ok_or(Error::MissingPayload("TSr"))?;
            let esp = select_esp(sa_i, &config.esp_proposals)?;
            let ts_remote = narrow(&ts_i.selectors, &config.remote_subnet)?;
            let ts_local = narrow(&ts_r.selectors, &config.local_subnet)?;
            Ok::<_, Error>((esp, ts_remote, ts_local))
        })();
        let header = sa.header(ExchangeType::IKE_AUTH, s.message_id, true);
        let mut payloads = vec![
            Payload::IdR(id_r),
            Payload::Auth(Auth {
                method: AuthMethod::PSK,
                data: auth.expose(),
            }),
        ];
        // RFC 6311 §3: support is announced by both ends in IKE_AUTH; we answer an initiator
        // that announced it (a take-over then synchronizes the Message IDs with it).
        let mid_sync = req.mid_sync && config.message_id_sync;
        if mid_sync {
            payloads.push(mid_sync::announcement());
        }
        // RFC 7296 §2.21.2: a CHILD SA failure in IKE_AUTH does not fail the IKE SA; the
        // response carries the error notify instead of SAr2/TSi/TSr.
        let response = match child {
            Err(e) => {
                let notify = e.notify().unwrap_or(NotifyType::NO_PROPOSAL_CHOSEN);
                payloads.push(Payload::Notify(Notify::new(notify, &[])));
                sa.seal(header, &payloads)?
            }
            Ok((esp, ts_remote, ts_local)) => {
                // SPIs 1..=255 are reserved by IANA (RFC 4303 §2.1).
                let spi_in = random_spi::<4>(entropy, 256, Some(sa.spi_r))?;
                payloads.push(Payload::Sa(esp.to_sa(&spi_in)));
                payloads.push(Payload::TsI(Ts {
                    selectors: ts_remote.clone(),
                }));
                payloads.push(Payload::TsR(Ts {
                    selectors: ts_local.clone(),
                }));
                let response = sa.seal(header, &payloads)?;
                // RFC 7296 §2.17: KEYMAT = prf+(SK_d, Ni | Nr) for the first CHILD SA;
                // initiator-to-responder keys first.
                let keys = ChildSaKeys::derive(
                    prf,
                    sa.sk_d(),
                    None,
                    &init.ni,
                    &init.nr,
                    esp.encryption,
                    esp.integrity,
                )?;
                events.push(Event::ChildSaInstalled(Box::new(ChildSa {
                    spi_in: u32::from_be_bytes(spi_in),
                    spi_out: esp.peer_spi,
                    encryption: esp.encryption,
                    integrity: esp.integrity,
                    esn: esp.esn,
                    inbound: keys.initiator,
                    outbound: keys.responder,
                    ts_local,
                    ts_remote,
                    lifetime: config.child_lifetime,
                    installed_at: now,
                    udp_encap: sa.nat_detected || s.local.port() == 4500,
                    replaces: None,
                })));
                response
            }
        };
        Ok((response, events, mid_sync))
    }
}

/// The payloads of an IKE_AUTH request this responder uses.
struct AuthRequest<'a> {
    id_i: Identity<'a>,
    auth: Auth<'a>,
    sa: Option<payload::Sa<'a>>,
    ts_i: Option<Ts<'a>>,
    ts_r: Option<Ts<'a>>,
    /// N(IKEV2_MESSAGE_ID_SYNC_SUPPORTED).
    mid_sync: bool,
}

impl<'a> AuthRequest<'a> {
    fn parse(inner: Vec<Payload<'a>>) -> Result<Self, Error> {
        let mid_sync = mid_sync::announced(&inner);
        let (mut id_i, mut auth, mut sa, mut ts_i, mut ts_r) = (None, None, None, None, None);
        for p in inner {
            match p {
                Payload::IdI(id) => id_i = Some(id),
                Payload::Auth(a) => auth = Some(a),
                Payload::Sa(s) => sa = Some(s),
                Payload::TsI(t) => ts_i = Some(t),
                Payload::TsR(t) => ts_r = Some(t),
                // IDr, INITIAL_CONTACT, USE_TRANSPORT_MODE, CERTREQ, CP, ...: not used yet.
                _ => {}
            }
        }
        let id_i = id_i.ok_or(Error::MissingPayload("IDi"))?;
        // No AUTH payload means the initiator wants EAP, which we do not offer.
        let auth = auth.ok_or(Error::AuthenticationFailed("no AUTH payload (EAP not supported)"))?;
        if auth.method != AuthMethod::PSK {
            return Err(Error::AuthenticationFailed("auth method is not PSK"));
        }
        Ok(Self {
            id_i,
            auth,
            sa,
            ts_i,
            ts_r,
            mid_sync,
        })
    }
}
