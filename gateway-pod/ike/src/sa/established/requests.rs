//! The peer's requests on an established IKE SA: INFORMATIONAL (RFC 7296 §1.4: liveness
//! checks, deletes, error notifies; RFC 5685 §5: REDIRECT) and CREATE_CHILD_SA (§1.3: new
//! and rekeyed CHILD SAs, IKE SA rekeys), each answered exactly once, or refused with the
//! error's notify.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Established, pick};
use crate::error::{Error, NotifyFields};
use crate::message::codepoints::{ExchangeType, NotifyType, ProtocolId};
use crate::message::error::InvalidMessage;
use crate::payload::{self, Delete, Payload};
use crate::redirect::{GatewayId, decode_redirect};
use crate::sa::create_child::{self, Created};
use crate::sa::events::Output;
use crate::sa::informational;
use crate::sa::rekey::{self, Ours};
use crate::sa::session::{IkeSa, Session, Window};
use crate::sa::snapshot::Role;
use crate::sa::{ChildRef, Entropy, Event, Incoming};

/// What a new request of the peer did.
pub(super) enum Outcome {
    /// Answered; nothing else changes.
    Answered,
    /// Answered; the peer deleted the IKE SA the request came on.
    DeleteIke,
    /// Answered; the IKE SA the request came on is replaced by this one.
    Rekeyed(Box<IkeSa>),
    /// Answered; the peer sent us to another gateway.
    Redirected(GatewayId),
}

/// Where and how a request is answered.
struct Reply<'a> {
    exchange: ExchangeType,
    message_id: u32,
    request: &'a [u8],
    local: SocketAddr,
    remote: SocketAddr,
}

impl Reply<'_> {
    /// Seals `payloads` as the response on `session` and sends it where the request came
    /// from (RFC 7296 §2.11).
    fn send(&self, session: &mut Session, out: &mut Output, payloads: &[Payload<'_>]) -> Result<(), Error> {
        let response = session.respond(self.exchange, self.message_id, self.request, payloads)?;
        out.send(self.local, self.remote, response);
        Ok(())
    }
}

impl Established {
    /// A request of the peer: answered from the cache, dropped, or processed. `None` when
    /// it was a retransmission (nothing was authenticated).
    pub(super) fn handle_request(
        &mut self,
        out: &mut Output,
        is_current: bool,
        d: &Incoming<'_>,
        entropy: &mut dyn Entropy,
    ) -> Result<Option<Outcome>, Error> {
        let (now, local, remote, datagram) = (d.now, d.local, d.remote, d.bytes);
        let session = pick(&mut self.current, &mut self.previous, is_current)?;
        match session.window(d.header.message_id, datagram) {
            Window::New => {}
            Window::Retransmitted(response) => {
                out.send(local, remote, response.to_vec());
                return Ok(None);
            }
            Window::Drop(why) => return Err(Error::Unexpected(why)),
        }
        let opened = session.sa.open(datagram)?;
        let reply = Reply {
            exchange: opened.header.exchange,
            message_id: opened.header.message_id,
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
                refuse(session, out, &reply, Error::MalformedInner(e))?;
                return Ok(Some(Outcome::Answered));
            }
        };
        let outcome = match reply.exchange {
            ExchangeType::INFORMATIONAL => self.informational(out, is_current, &reply, &inner)?,
            // RFC 7296 §2.8: once rekeyed, the old IKE SA is only there to be deleted.
            ExchangeType::CREATE_CHILD_SA if !is_current => {
                refuse(session, out, &reply, Error::NoAdditionalSas)?;
                Outcome::Answered
            }
            ExchangeType::CREATE_CHILD_SA => self.create_child_sa(out, &reply, &inner, now, entropy)?,
            // IKE_SA_INIT and IKE_AUTH are over (their retransmissions were answered from
            // the cache); other exchange types are not ours to take.
            _ => {
                let e = Error::MalformedInner(InvalidMessage::InvalidValue("exchange type"));
                refuse(session, out, &reply, e)?;
                Outcome::Answered
            }
        };
        Ok(Some(outcome))
    }

    /// Whether a REDIRECT of the peer is followed: only on an SA we initiated, and announced
    /// support for redirects on (RFC 5685 §3).
    fn follows_redirects(&self) -> bool {
        self.role == Role::Initiator
            && (self.config.redirect_supported || self.config.redirected_from.is_some())
    }

    /// An INFORMATIONAL request (RFC 7296 §1.4): deletes, error notifies, liveness checks,
    /// and REDIRECT (RFC 5685 §5).
    fn informational(
        &mut self,
        out: &mut Output,
        is_current: bool,
        reply: &Reply<'_>,
        inner: &[Payload<'_>],
    ) -> Result<Outcome, Error> {
        let follows_redirects = self.follows_redirects();
        let session = pick(&mut self.current, &mut self.previous, is_current)?;
        let redirect = inner.iter().find_map(|p| match p {
            Payload::Notify(n) if n.notify_type == NotifyType::REDIRECT => decode_redirect(n.data).ok(),
            _ => None,
        });
        if let Some((gateway, _)) = redirect.filter(|_| follows_redirects) {
            reply.send(session, out, &[])?;
            return Ok(Outcome::Redirected(gateway));
        }
        // Applied to a copy, kept once the response is sealed: a failure changes nothing.
        let mut remaining = self.children.clone();
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
        reply.send(session, out, &payloads)?;
        self.children = remaining;
        for notify_type in info.errors {
            out.event(Event::PeerError { notify_type });
        }
        for c in info.deleted {
            out.event(Event::ChildSaDeleted {
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

    /// A CREATE_CHILD_SA request on the IKE SA in use (RFC 7296 §1.3): a new or rekeyed
    /// CHILD SA (optionally with PFS), or an IKE SA rekey. The keys take "the initiator" of
    /// the exchange, here the peer, whichever role we have in the IKE SA (§2.17).
    fn create_child_sa(
        &mut self,
        out: &mut Output,
        reply: &Reply<'_>,
        inner: &[Payload<'_>],
        now: Instant,
        entropy: &mut dyn Entropy,
    ) -> Result<Outcome, Error> {
        if create_child::is_ike_rekey(inner) {
            // An SA we initiated follows the peer's IKE SA rekeys only when configured to
            // (see [`crate::Config::accept_ike_rekey`]): "A minimal implementation [...] may
            // refuse all CREATE_CHILD_SA requests within an IKE SA" (§1.3).
            if self.role == Role::Initiator && !self.config.accept_ike_rekey {
                refuse(&mut self.current, out, reply, Error::NoAdditionalSas)?;
                return Ok(Outcome::Answered);
            }
            // RFC 7296 §2.25: "TEMPORARY_FAILURE ... when a peer receives a request that
            // cannot be completed due to a temporary condition such as a rekeying operation";
            // a peer's IKE SA rekey while ours is in flight is answered so, and the peer tries
            // again later (rather than both ends ending up on different new IKE SAs, §2.8.2).
            if matches!(self.ours, Ours::IkeRekey(_)) {
                refuse(&mut self.current, out, reply, Error::TemporaryFailure)?;
                return Ok(Outcome::Answered);
            }
        }
        let config = &self.config;
        let cx = create_child::Context {
            ike_proposals: &config.ike_proposals,
            esp_proposals: &config.esp_proposals,
            local_subnet: config.local_subnet,
            remote_subnet: config.remote_subnet,
            child_lifetime: config.child_lifetime,
            sa: &self.current.sa,
            children: &self.children,
            now,
            udp_encap: self.udp_encap(reply.local),
        };
        match create_child::process(&cx, inner, entropy) {
            Err(e) => {
                refuse(&mut self.current, out, reply, e)?;
                Ok(Outcome::Answered)
            }
            Ok(Created::Child(c)) => {
                reply.send(&mut self.current, out, &c.payloads())?;
                if let Some(old) = c.child.replaces {
                    rekey::peer_rekeyed(
                        &mut self.children,
                        &mut self.ours,
                        old,
                        c.child.spi_in,
                        &c.lowest_nonce,
                    );
                }
                let child = c.into_child();
                // Exactly one more: a Vec's first growth makes room for four.
                self.children.reserve_exact(1);
                self.children.push(ChildRef::new(&child, now, entropy));
                out.event(Event::ChildSaInstalled(Box::new(child)));
                Ok(Outcome::Answered)
            }
            Ok(Created::Ike(n)) => {
                // The response belongs to the old IKE SA and is sealed with its keys.
                reply.send(&mut self.current, out, &n.payloads())?;
                Ok(Outcome::Rekeyed(Box::new(n.into_sa())))
            }
        }
    }
}

/// Answers a request with the error's notify and reports it; the IKE SA stays.
fn refuse(session: &mut Session, out: &mut Output, reply: &Reply<'_>, error: Error) -> Result<(), Error> {
    // The peer's window only moves on with an answer, so even an error without a notify of
    // its own (an internal failure) is answered: NO_PROPOSAL_CHOSEN, "not this time", as for
    // a CHILD SA refused in IKE_AUTH.
    let fields = error.notify_fields().unwrap_or(NotifyFields {
        notify_type: NotifyType::NO_PROPOSAL_CHOSEN,
        protocol: ProtocolId::NONE,
        spi: Vec::new(),
        data: Vec::new(),
    });
    reply.send(session, out, &[fields.payload()])?;
    out.event(Event::RequestRefused {
        exchange: reply.exchange,
        error,
    });
    Ok(())
}
