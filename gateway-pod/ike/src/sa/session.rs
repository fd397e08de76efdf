//! One IKE SA after IKE_SA_INIT: its keys and SPIs ([`IkeSa`]), and once established its two
//! Message ID windows ([`Session`]).
//!
//! RFC 7296 §2.2: "Each endpoint in the IKE Security Association maintains two "current"
//! Message IDs: the next one to be used for a request it initiates and the next one it expects
//! to see in a request from the other end." Both windows have size 1 (§2.3: we never send
//! SET_WINDOW_SIZE, so the peer keeps one request in flight, and we do the same).

use std::time::Instant;

use concentrator_algorithms::{Encryption, Integrity};
use concentrator_crypto::{CryptoError, IkeSaKeys, InlineSecret, PacketError, Prf, SecretBytes, SkCipher};

use super::Retransmit;
use super::mid_sync::{NONCE_LEN, SyncData};
use super::snapshot::{Exchange, PendingRequest, RequestDigest, SessionSnapshot, SnapshotError};
use crate::Message;
use crate::error::Error;
use crate::message::codepoints::{ExchangeType, PayloadType};
use crate::message::header::{Flags, Header};
use crate::payload::{self, Payload, Sk};

/// The keys and SPIs of one IKE SA. The responder is always its responder: the peer started it
/// with IKE_SA_INIT or, for a rekeyed SA, with the CREATE_CHILD_SA request that made it (RFC
/// 7296 §3.1, the I flag "changes to reflect who initiated the last rekey of the IKE SA"), so
/// SK_ei/SK_ai open what the peer sends and SK_er/SK_ar seal ours. The initiator
/// ([`crate::initiator`]) builds its SA with [`IkeSa::new_initiator`], the other way round.
pub(crate) struct IkeSa {
    pub(crate) spi_i: u64,
    pub(crate) spi_r: u64,
    pub(crate) prf: Prf,
    /// SK_d (at most 64 bytes: the output of HMAC-SHA-512), inline: it lives as long as
    /// the SA. SK_e and SK_a are in `rx` and `tx`, not kept twice.
    sk_d: InlineSecret<64>,
    /// SK_pi and SK_pr: only IKE_AUTH uses them, so they go once the SA is established
    /// ([`Self::forget_auth_keys`]). Boxed: absent for nearly all of the SA's life.
    auth: Option<Box<AuthKeys>>,
    /// SK_ei/SK_ai: opens the initiator's messages.
    rx: SkCipher,
    /// SK_er/SK_ar: seals ours.
    tx: SkCipher,
    pub(crate) nat_detected: bool,
    /// We are the original initiator: our messages carry the I flag.
    initiator: bool,
}

/// The keys of the AUTH payloads (RFC 7296 §2.15).
struct AuthKeys {
    sk_pi: SecretBytes,
    sk_pr: SecretBytes,
}

/// A message of this IKE SA whose ICV verified, with its decrypted inner payload chain.
pub(crate) struct Opened {
    pub(crate) header: Header,
    pub(crate) first_inner: PayloadType,
    pub(crate) plain: Vec<u8>,
}

impl IkeSa {
    /// The SA as its original responder sees it (the responder, or the peer started the
    /// rekey that made it): SK_ei/SK_ai open the peer's messages, SK_er/SK_ar seal ours.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        spi_i: u64,
        spi_r: u64,
        prf: Prf,
        encryption: Encryption,
        integrity: Option<Integrity>,
        keys: IkeSaKeys,
        nat_detected: bool,
    ) -> Result<Self, CryptoError> {
        Self::with_role(
            spi_i,
            spi_r,
            prf,
            encryption,
            integrity,
            keys,
            nat_detected,
            false,
        )
    }

    /// The SA as its original initiator sees it: SK_er/SK_ar open the peer's messages,
    /// SK_ei/SK_ai seal ours, and our messages carry the I flag.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_initiator(
        spi_i: u64,
        spi_r: u64,
        prf: Prf,
        encryption: Encryption,
        integrity: Option<Integrity>,
        keys: IkeSaKeys,
        nat_detected: bool,
    ) -> Result<Self, CryptoError> {
        Self::with_role(spi_i, spi_r, prf, encryption, integrity, keys, nat_detected, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn with_role(
        spi_i: u64,
        spi_r: u64,
        prf: Prf,
        encryption: Encryption,
        integrity: Option<Integrity>,
        keys: IkeSaKeys,
        nat_detected: bool,
        initiator: bool,
    ) -> Result<Self, CryptoError> {
        let initiators = SkCipher::new(encryption, integrity, keys.sk_ei.expose(), keys.sk_ai.expose())?;
        let responders = SkCipher::new(encryption, integrity, keys.sk_er.expose(), keys.sk_ar.expose())?;
        let (rx, tx) = if initiator {
            (responders, initiators)
        } else {
            (initiators, responders)
        };
        let sk_d = InlineSecret::from_slice(keys.sk_d.expose()).ok_or(CryptoError::KeyLength {
            what: "SK_d",
            expected: 64,
            got: keys.sk_d.len(),
        })?;
        let IkeSaKeys { sk_pi, sk_pr, .. } = keys;
        Ok(Self {
            spi_i,
            spi_r,
            prf,
            sk_d,
            auth: Some(Box::new(AuthKeys { sk_pi, sk_pr })),
            rx,
            tx,
            nat_detected,
            initiator,
        })
    }

    /// SK_d.
    pub(crate) fn sk_d(&self) -> &[u8] {
        self.sk_d.expose()
    }

    /// SK_pi: signs the initiator's AUTH payload (empty once established).
    pub(crate) fn sk_pi(&self) -> &[u8] {
        self.auth.as_ref().map_or(&[], |a| a.sk_pi.expose())
    }

    /// SK_pr: signs the responder's AUTH payload (empty once established).
    pub(crate) fn sk_pr(&self) -> &[u8] {
        self.auth.as_ref().map_or(&[], |a| a.sk_pr.expose())
    }

    /// Drops SK_pi and SK_pr: IKE_AUTH is over, and nothing else uses them.
    pub(crate) fn forget_auth_keys(&mut self) {
        self.auth = None;
    }

    /// The seven keys, as a snapshot carries them: SK_pi and SK_pr empty once forgotten.
    pub(crate) fn keys(&self) -> IkeSaKeys {
        let ((sk_ei, sk_ai), (sk_er, sk_ar)) = if self.initiator {
            (self.tx.keymat(), self.rx.keymat())
        } else {
            (self.rx.keymat(), self.tx.keymat())
        };
        let empty = || SecretBytes::from_slice(&[]);
        IkeSaKeys {
            sk_d: self.sk_d.to_secret(),
            sk_ai,
            sk_ar,
            sk_ei,
            sk_er,
            sk_pi: self.auth.as_ref().map_or_else(empty, |a| a.sk_pi.clone()),
            sk_pr: self.auth.as_ref().map_or_else(empty, |a| a.sk_pr.clone()),
        }
    }

    /// Whether we are this SA's initiator (we started it, or the rekey that made it).
    /// AEAD nonces our sealing key used (see [`SessionSnapshot::sealed`]).
    pub(crate) fn sealed(&self) -> u64 {
        self.tx.ivs_used()
    }

    pub(crate) fn is_initiator(&self) -> bool {
        self.initiator
    }

    /// Our SPI of this SA.
    pub(crate) fn our_spi(&self) -> u64 {
        if self.initiator { self.spi_i } else { self.spi_r }
    }

    /// Whether a header carries this SA's SPIs.
    pub(crate) fn matches(&self, h: &Header) -> bool {
        h.spi_i == self.spi_i && h.spi_r == self.spi_r
    }

    /// A header of ours: the I flag only on the original initiator's side (RFC 7296 §3.1:
    /// "This bit MUST be set in messages sent by the original initiator of the IKE SA and
    /// MUST be cleared in messages sent by the original responder"), R set on responses.
    pub(crate) fn header(&self, exchange: ExchangeType, message_id: u32, response: bool) -> Header {
        let role = if self.initiator {
            Flags::INITIATOR
        } else {
            Flags::NONE
        };
        let response = if response { Flags::RESPONSE } else { Flags::NONE };
        Header::new(self.spi_i, self.spi_r, exchange, role | response, message_id)
    }

    /// An encrypted message holding `inner` (RFC 7296 §3.14).
    pub(crate) fn seal(&mut self, header: Header, inner: &[Payload<'_>]) -> Result<Vec<u8>, PacketError> {
        let mut plain = Vec::new();
        payload::encode_chain(inner, &mut plain);
        let body_len = self.tx.body_len(plain.len());
        let room = vec![0u8; body_len];
        let msg = Message {
            header,
            payloads: vec![Payload::Sk(Sk {
                first_inner: inner.first().map_or(PayloadType::NONE, Payload::payload_type),
                body: &room,
            })],
        };
        let mut out = msg.to_vec();
        let body_start = out.len() - body_len;
        let range = self.tx.plaintext_range(body_start, plain.len());
        out.get_mut(range)
            .ok_or(PacketError::Malformed)?
            .copy_from_slice(&plain);
        self.tx.seal(&mut out, body_start, plain.len())?;
        Ok(out)
    }

    /// Decodes `datagram`, verifies its SK payload and decrypts it. RFC 7296 §3.14: the ICV
    /// is checked before anything is decrypted, and a message that fails it is dropped; an
    /// unprotected message is dropped too (anyone who saw the SPIs could have sent it).
    pub(crate) fn open(&self, datagram: &[u8]) -> Result<Opened, Error> {
        let msg = Message::decode(datagram)?;
        let sk = match msg.payloads.last() {
            Some(Payload::Sk(sk)) => *sk,
            Some(Payload::Skf(_)) => return Err(Error::Unexpected("IKE fragmentation is not supported")),
            _ => return Err(Error::Unexpected("message without SK payload")),
        };
        // The SK body is a sub-slice at the end of the datagram (decoding borrows it).
        let body_start = datagram
            .len()
            .checked_sub(sk.body.len())
            .ok_or(Error::Packet(PacketError::Malformed))?;
        let mut buf = datagram.to_vec();
        let range = self.rx.open(&mut buf, body_start)?;
        let plain = buf.get(range).unwrap_or_default().to_vec();
        Ok(Opened {
            header: msg.header,
            first_inner: sk.first_inner,
            plain,
        })
    }
}

/// A request of the peer, known by its digest, and our response to it: what answers a
/// retransmission of the request once the state that answered it has moved on.
///
/// RFC 7296 §2.1: "A retransmission from the initiator MUST be bitwise identical to the
/// original request", and "The responder MUST never retransmit a response unless it
/// receives a retransmission of the request." Recognising the request takes no more than
/// its SHA-256 (a peer that found two requests with one digest would only get our response
/// again); the response is kept whole, since it must go out as it went the first time.
pub(crate) struct Kept {
    request: RequestDigest,
    /// A boxed slice: kept all the SA's life (the IKE_AUTH response until the peer's next
    /// request), without spare capacity.
    response: Box<[u8]>,
}

impl Kept {
    pub(crate) fn new(request: &[u8], response: Vec<u8>) -> Self {
        Self::with_digest(RequestDigest::of(request), response)
    }

    /// For a request digested already.
    pub(crate) fn with_digest(request: RequestDigest, response: Vec<u8>) -> Self {
        Self {
            request,
            response: response.into_boxed_slice(),
        }
    }

    /// Our response, if `datagram` is the request it answered.
    pub(crate) fn answer(&self, datagram: &[u8]) -> Option<&[u8]> {
        self.request.matches(datagram).then_some(&self.response)
    }

    /// As a snapshot holds it.
    pub(crate) fn snapshot(&self) -> Exchange {
        Exchange {
            request: self.request,
            response: self.response.to_vec(),
        }
    }

    /// From a snapshot.
    pub(crate) fn restore(e: Exchange) -> Self {
        Self {
            request: e.request,
            response: e.response.into_boxed_slice(),
        }
    }
}

/// A request of the peer and our response to it.
pub(crate) struct Answered {
    pub(crate) message_id: u32,
    pub(crate) exchange: Kept,
}

/// Our request in flight.
pub(crate) struct Pending {
    message_id: u32,
    exchange: ExchangeType,
    datagram: Vec<u8>,
    /// Retransmissions sent so far.
    retransmits: u32,
    /// When to retransmit, or give up.
    deadline: Instant,
}

/// How a request of the peer fits the window.
pub(crate) enum Window<'a> {
    /// The next request: process it.
    New,
    /// The request we answered last, again: resend this response.
    Retransmitted(&'a [u8]),
    /// Anything else: drop it.
    Drop(&'static str),
}

/// What a timer did to our request in flight.
pub(crate) enum Retry {
    /// Nothing due.
    Idle,
    /// Send this datagram again.
    Resend(Vec<u8>),
    /// Every retransmission went unanswered: the peer is dead (RFC 7296 §2.1: the initiator
    /// retransmits "until it either receives a corresponding response or deems the IKE SA to
    /// have failed").
    GiveUp,
}

/// An IKE SA a rekey replaced: it answers the peer until one side deleted it. Our DELETE of
/// it is retransmitted like any request (RFC 7296 §2.1); if the peer never answers, or never
/// deletes the SA it replaced, the SA goes after [`super::REKEYED_SA_LINGER`].
pub(crate) struct Previous {
    pub(crate) session: Session,
    pub(crate) expires: Instant,
}

impl Previous {
    /// As data, with the time until it expires.
    pub(crate) fn snapshot(&self, now: Instant) -> (SessionSnapshot, std::time::Duration) {
        (
            self.session.snapshot(now),
            self.expires.saturating_duration_since(now),
        )
    }

    /// What [`Self::snapshot`] took, on a clock where it is `now`.
    pub(crate) fn restore(
        (session, expires): (SessionSnapshot, std::time::Duration),
        now: Instant,
    ) -> Result<Self, SnapshotError> {
        Ok(Self {
            session: Session::restore(session, now)?,
            expires: super::deadline(now, expires),
        })
    }
}

/// An established IKE SA and its Message ID windows.
pub(crate) struct Session {
    pub(crate) sa: IkeSa,
    /// The Message ID the peer's next request carries. `u64` so that after a request with
    /// ID 2^32-1 nothing matches any more: RFC 7296 §2.2, "In the unlikely event that
    /// Message IDs grow too large to fit in 32 bits, the IKE SA MUST be closed or rekeyed."
    rx_next: u64,
    /// RFC 7296 §2.2: "The responder MUST remember each response until it receives a request
    /// whose sequence number is larger than or equal to the sequence number in the response
    /// plus its window size." With a window of 1 that is the last one.
    last: Option<Answered>,
    /// The Message ID of our next request (ours count from zero, RFC 7296 §2.2).
    tx_next: u64,
    /// Boxed: an SA has a request in flight for a second or so every half minute.
    pending: Option<Box<Pending>>,
    /// Restored from a copy that may be a few exchanges behind the process that answered
    /// the peer last (a fleet member that died before its replica heard of its last
    /// answers): the peer's next request is taken with any Message ID up to
    /// [`CATCH_UP`] above the expected one, once it authenticates.
    catching_up: bool,
}

/// How far above the expected Message ID a restored session takes the peer's next request.
const CATCH_UP: u64 = 16;

/// How far above the copy's nonce count a restored IKE SA seals.
const SEALED_MARGIN: u64 = 1 << 34;

/// A counter as the 32 bits of a Message ID; past them (the IKE SA is used up) the last one.
fn clamp(id: u64) -> u32 {
    u32::try_from(id).unwrap_or(u32::MAX)
}

impl Session {
    /// A session whose peer has sent requests up to `last` (the IKE_AUTH exchange for the
    /// first IKE SA; nothing for a rekeyed one, whose counters start at zero: RFC 7296 §2.18,
    /// "The new IKE SA MUST reset its message counters to 0").
    pub(crate) fn new(sa: IkeSa, last: Option<Answered>) -> Self {
        let rx_next = last.as_ref().map_or(0, |a| u64::from(a.message_id) + 1);
        Self {
            sa,
            rx_next,
            last,
            tx_next: 0,
            pending: None,
            catching_up: false,
        }
    }

    /// The session of an IKE SA we initiated, right after IKE_SA_INIT: that request used
    /// Message ID 0, so our next one (IKE_AUTH) is 1, and the peer's first request will carry
    /// 0 (RFC 7296 §2.2: each end counts its own requests).
    pub(crate) fn for_initiator(sa: IkeSa) -> Self {
        Self {
            sa,
            rx_next: 0,
            last: None,
            tx_next: 1,
            pending: None,
            catching_up: false,
        }
    }

    /// Where a request with `message_id` stands. A retransmission must be "bitwise identical
    /// to the original request" (RFC 7296 §2.1), so only an identical datagram is answered
    /// from the cache, and nothing is recomputed: "The responder MUST never retransmit a
    /// response unless it receives a retransmission of the request."
    pub(crate) fn window(&self, message_id: u32, datagram: &[u8]) -> Window<'_> {
        let id = u64::from(message_id);
        if id == self.rx_next || (self.catching_up && id > self.rx_next && id - self.rx_next <= CATCH_UP) {
            return Window::New;
        }
        match &self.last {
            Some(a) if a.message_id == message_id => match a.exchange.answer(datagram) {
                Some(response) => Window::Retransmitted(response),
                None => Window::Drop("request differs from the one answered with its Message ID"),
            },
            _ if id < self.rx_next => Window::Drop("request with an old Message ID"),
            _ => Window::Drop("request beyond the Message ID window"),
        }
    }

    /// Seals our response to the request `message_id`, caches it with the request and moves
    /// the window on; returns the datagram to send.
    pub(crate) fn respond(
        &mut self,
        exchange: ExchangeType,
        message_id: u32,
        request: &[u8],
        inner: &[Payload<'_>],
    ) -> Result<Vec<u8>, PacketError> {
        let header = self.sa.header(exchange, message_id, true);
        let response = self.sa.seal(header, inner)?;
        self.last = Some(Answered {
            message_id,
            exchange: Kept::new(request, response.clone()),
        });
        self.rx_next = u64::from(message_id) + 1;
        self.catching_up = false;
        Ok(response)
    }

    /// Takes the last request and our response, to answer its retransmission once this
    /// session is gone.
    pub(crate) fn take_last(&mut self) -> Option<Box<Kept>> {
        self.last.take().map(|a| Box::new(a.exchange))
    }

    /// How often the request in flight was retransmitted.
    pub(crate) fn pending_retransmits(&self) -> Option<u32> {
        self.pending.as_ref().map(|p| p.retransmits)
    }

    /// When the request in flight is due for retransmission or abandonment.
    pub(crate) fn pending_deadline(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.deadline)
    }

    /// Whether another request may start (none in flight and Message IDs left).
    pub(crate) fn can_start_request(&self) -> bool {
        self.pending.is_none() && self.tx_next <= u64::from(u32::MAX)
    }

    /// Seals a request of ours holding `inner` and puts it in flight; `None` when a request
    /// is already in flight or the Message IDs are used up.
    pub(crate) fn start_request(
        &mut self,
        exchange: ExchangeType,
        inner: &[Payload<'_>],
        now: Instant,
        policy: &Retransmit,
    ) -> Result<Option<Vec<u8>>, PacketError> {
        if !self.can_start_request() {
            return Ok(None);
        }
        let Ok(message_id) = u32::try_from(self.tx_next) else {
            return Ok(None);
        };
        let header = self.sa.header(exchange, message_id, false);
        let datagram = self.sa.seal(header, inner)?;
        self.tx_next += 1;
        self.pending = Some(Box::new(Pending {
            message_id,
            exchange,
            datagram: datagram.clone(),
            retransmits: 0,
            deadline: now + policy.wait(0),
        }));
        Ok(Some(datagram))
    }

    /// Whether a response header answers our request in flight (same exchange and Message
    /// ID). The caller verifies the ICV before calling [`Self::complete_request`].
    pub(crate) fn answers_pending(&self, h: &Header) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.message_id == h.message_id && p.exchange == h.exchange)
    }

    /// The request in flight got its response.
    pub(crate) fn complete_request(&mut self) {
        self.pending = None;
    }

    /// Drops the request in flight unanswered (its IKE SA was rekeyed away).
    pub(crate) fn abandon_request(&mut self) {
        self.pending = None;
    }

    /// Whether the peer can answer a sync request on this IKE SA safely. Not with an AEAD:
    /// strongSwan derives its AEAD nonces for IKE from the Message ID and refuses to seal a
    /// second message with one it used (and destroys its IKE SA): the sync answer has ID zero,
    /// so either it repeats the answer to our first request, or the answer to our next one
    /// (ID zero again, as the sync leaves the counters where they are) repeats it. Moving our
    /// counter past zero in the sync makes strongSwan reset its task queue instead, which
    /// leaves a request it has in flight unsent. With AES-CBC its IVs are random.
    pub(crate) fn sync_is_safe(&self) -> bool {
        !self.sa.tx.encryption().is_aead()
    }

    /// Our RFC 6311 sync request with `nonce`: the counters this copy has, in an
    /// INFORMATIONAL request with Message ID zero (§4.2) put in flight without taking a
    /// Message ID; `None` when a request is in flight or a counter is past 32 bits.
    pub(crate) fn start_sync(
        &mut self,
        nonce: [u8; NONCE_LEN],
        now: Instant,
        policy: &Retransmit,
    ) -> Result<Option<Vec<u8>>, PacketError> {
        // Exactly the copy's counters: our requests are replicated before they are sent, so
        // our next ID is the owner's. (A value above the peer's own makes strongSwan reset its
        // task queue, which leaves a request it had in flight unsent until its next task.)
        let (Ok(send), Ok(recv)) = (u32::try_from(self.tx_next), u32::try_from(self.rx_next)) else {
            return Ok(None);
        };
        if self.pending.is_some() {
            return Ok(None);
        }
        let data = SyncData { nonce, send, recv }.encode();
        let header = self.sa.header(ExchangeType::INFORMATIONAL, 0, false);
        let datagram = self.sa.seal(header, &[SyncData::payload(&data)])?;
        self.pending = Some(Box::new(Pending {
            message_id: 0,
            exchange: ExchangeType::INFORMATIONAL,
            datagram: datagram.clone(),
            retransmits: 0,
            deadline: now + policy.wait(0),
        }));
        Ok(Some(datagram))
    }

    /// The peer's answer to our sync request: its next request carries `peer_next`, and it
    /// expects `our_next` in ours. Neither counter goes back: an ID we may have used is
    /// never used again, and a request we may have processed is never processed again.
    pub(crate) fn synced(&mut self, our_next: u32, peer_next: u32) -> (u32, u32) {
        self.tx_next = self.tx_next.max(u64::from(our_next));
        self.rx_next = self.rx_next.max(u64::from(peer_next));
        self.catching_up = false;
        (clamp(self.tx_next), clamp(self.rx_next))
    }

    /// The peer's sync request (§4.2, as the peer that did not fail over): refused when it
    /// would take back a request ID we already processed; otherwise both counters move to
    /// the larger view and the response says so. Returns the sealed response, with Message
    /// ID zero and kept out of the window (the request is outside it too), and the counters.
    pub(crate) fn answer_sync(&mut self, request: SyncData) -> Result<(Vec<u8>, (u32, u32)), Error> {
        if u64::from(request.send) < self.rx_next {
            return Err(Error::Unexpected(
                "IKEV2_MESSAGE_ID_SYNC with a Message ID below the one expected",
            ));
        }
        self.rx_next = u64::from(request.send);
        self.tx_next = self.tx_next.max(u64::from(request.recv));
        self.catching_up = false;
        let counters = (clamp(self.tx_next), clamp(self.rx_next));
        let data = SyncData {
            nonce: request.nonce,
            send: counters.0,
            recv: counters.1,
        }
        .encode();
        let header = self.sa.header(ExchangeType::INFORMATIONAL, 0, true);
        let response = self.sa.seal(header, &[SyncData::payload(&data)])?;
        Ok((response, counters))
    }

    /// Retransmits the request in flight when its timer is due (exponential back-off), or
    /// gives up after the last retransmission's wait.
    pub(crate) fn on_timer(&mut self, now: Instant, policy: &Retransmit) -> Retry {
        let Some(p) = &mut self.pending else {
            return Retry::Idle;
        };
        if now < p.deadline {
            return Retry::Idle;
        }
        if p.retransmits >= policy.tries {
            return Retry::GiveUp;
        }
        p.retransmits += 1;
        p.deadline = now + policy.wait(p.retransmits);
        Retry::Resend(p.datagram.clone())
    }
}

impl Session {
    /// This session as data, deadlines relative to `now`.
    pub(crate) fn snapshot(&self, now: Instant) -> SessionSnapshot {
        let sa = &self.sa;
        SessionSnapshot {
            spi_i: sa.spi_i,
            spi_r: sa.spi_r,
            initiator: sa.initiator,
            prf: sa.prf.algorithm(),
            encryption: sa.tx.encryption(),
            integrity: sa.tx.integrity(),
            keys: sa.keys(),
            nat_detected: sa.nat_detected,
            sealed: sa.sealed(),
            rx_next: self.rx_next,
            last: self.last.as_ref().map(|a| (a.message_id, a.exchange.snapshot())),
            tx_next: self.tx_next,
            pending: self.pending.as_ref().map(|p| PendingRequest {
                message_id: p.message_id,
                exchange: p.exchange,
                datagram: p.datagram.clone(),
                retransmits: p.retransmits,
                due_in: p.deadline.saturating_duration_since(now),
            }),
        }
    }

    /// A session from [`Self::snapshot`], on a clock where it is `now`.
    pub(crate) fn restore(s: SessionSnapshot, now: Instant) -> Result<Self, SnapshotError> {
        let prf = Prf::new(s.prf);
        let new = if s.initiator {
            IkeSa::new_initiator
        } else {
            IkeSa::new
        };
        let mut sa = new(
            s.spi_i,
            s.spi_r,
            prf,
            s.encryption,
            s.integrity,
            s.keys,
            s.nat_detected,
        )
        .map_err(|_| SnapshotError::Keys("IKE SA keys do not fit its algorithms"))?;
        // Restored SAs are established: IKE_AUTH is over.
        sa.forget_auth_keys();
        // The owner may have sealed more after the copy was taken (its answers are not
        // replicated before they are sent): start above anything one IKE SA can seal (2^32
        // requests and as many responses; a retransmission is not sealed again).
        let resume = s
            .sealed
            .checked_add(SEALED_MARGIN)
            .ok_or(SnapshotError::InvalidValue("sealed"))?;
        sa.tx.resume_ivs_at(resume);
        // A window beyond the 32-bit Message IDs means "closed or rekeyed" (RFC 7296 §2.2);
        // anything past that is not a state this crate produces.
        let limit = u64::from(u32::MAX) + 1;
        if s.rx_next > limit || s.tx_next > limit {
            return Err(SnapshotError::InvalidValue("message id"));
        }
        Ok(Self {
            sa,
            rx_next: s.rx_next,
            last: s.last.map(|(message_id, e)| Answered {
                message_id,
                exchange: Kept::restore(e),
            }),
            tx_next: s.tx_next,
            pending: s.pending.map(|p| {
                Box::new(Pending {
                    message_id: p.message_id,
                    exchange: p.exchange,
                    datagram: p.datagram,
                    retransmits: p.retransmits,
                    deadline: super::deadline(now, p.due_in),
                })
            }),
            catching_up: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_exchange_answers_only_a_bitwise_copy_of_its_request() {
        let request: Vec<u8> = (0..239u8).collect();
        let kept = Kept::new(&request, vec![7; 212]);
        assert_eq!(kept.answer(&request), Some(&[7u8; 212][..]));
        let mut flipped = request.clone();
        flipped[100] ^= 0x01;
        assert_eq!(kept.answer(&flipped), None, "one bit differs");
        assert_eq!(kept.answer(&request[..238]), None, "one byte shorter");
        let mut longer = request.clone();
        longer.push(0);
        assert_eq!(kept.answer(&longer), None, "one byte longer");
        // What a snapshot carries answers the same.
        let restored = Kept::restore(kept.snapshot());
        assert_eq!(restored.answer(&request), Some(&[7u8; 212][..]));
        assert_eq!(restored.answer(&flipped), None);
    }
}
