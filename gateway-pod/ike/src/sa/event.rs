//! What an IKE SA reports, in either role.

use std::net::SocketAddr;

use super::events::ChildEvent;
use super::{ChildSa, DeleteReason, IdBuf};
use crate::error::Error;
use crate::message::codepoints::{ExchangeType, NotifyType};

/// What an IKE SA reports, in either role ([`crate::Responder::poll_event`],
/// [`crate::Initiator::poll_event`]).
#[derive(Debug)]
pub enum Event {
    /// Responder: the IKE_AUTH request named the peer: look up its PSK and call
    /// [`crate::Responder::provide_psk`].
    PeerIdentified {
        /// IDi.
        id: IdBuf,
    },
    /// The peer is authenticated (as responder: our IKE_AUTH response is queued).
    IkeSaEstablished {
        /// Initiator's SPI.
        spi_i: u64,
        /// Responder's SPI.
        spi_r: u64,
        /// The peer's authenticated identity.
        peer_id: IdBuf,
        /// The peer's IKE address and port (after a float to 4500, that one).
        remote: SocketAddr,
        /// A NAT was detected between the peers.
        nat_detected: bool,
    },
    /// A CHILD SA was negotiated: the first one in IKE_AUTH, or a new or rekeyed one in
    /// CREATE_CHILD_SA ([`ChildSa::replaces`]).
    ChildSaInstalled(Box<ChildSa>),
    /// A CHILD SA is gone: the peer deleted it (our response deletes its pair, RFC 7296
    /// §1.4.1), or its IKE SA went away. Remove both directions from the data plane.
    ChildSaDeleted {
        /// Our SPI.
        spi_in: u32,
        /// The peer's SPI.
        spi_out: u32,
    },
    /// The IKE SA was rekeyed (by the peer, or by us at the configured `ike_lifetime`): the
    /// SA carries on as the new one, with every CHILD SA. Route `new_spi_r` to it too:
    /// `old_spi_r` stays valid until [`Event::IkeSaRetired`].
    IkeSaRekeyed {
        /// Our SPI of the replaced IKE SA.
        old_spi_r: u64,
        /// The peer's SPI of the new IKE SA (its SPIi when the peer rekeyed, its SPIr when
        /// we did).
        new_spi_i: u64,
        /// Our SPI of the new IKE SA (its SPIr when the peer rekeyed, its SPIi when we did).
        new_spi_r: u64,
    },
    /// The IKE SA that a rekey replaced is gone (the peer deleted it, or
    /// [`super::REKEYED_SA_LINGER`] passed): stop routing `spi_r` to this SA. Its CHILD SAs
    /// live on under the new IKE SA.
    IkeSaRetired {
        /// Our SPI of the retired IKE SA.
        spi_r: u64,
    },
    /// The IKE SA is gone, and with it every CHILD SA (each reported with
    /// [`Event::ChildSaDeleted`] before this). The SA is closed.
    IkeSaDeleted {
        /// Our SPI of the IKE SA.
        spi: u64,
        /// Why.
        reason: DeleteReason,
    },
    /// A request of the peer on the established IKE SA was refused: the response carries the
    /// error's notify (e.g. NO_PROPOSAL_CHOSEN, TS_UNACCEPTABLE, INVALID_KE_PAYLOAD,
    /// NO_ADDITIONAL_SAS) and the IKE SA stays as it was.
    RequestRefused {
        /// The request's exchange.
        exchange: ExchangeType,
        /// Why.
        error: Error,
    },
    /// The peer reported an error in an INFORMATIONAL request (e.g. INVALID_SPI for an ESP
    /// packet with an SPI it does not know). Nothing is done about it; worth a log line.
    PeerError {
        /// The notify type.
        notify_type: NotifyType,
    },
    /// RFC 6311: the IKE SA's Message ID counters were synchronized with the peer, at our
    /// request after a restore from a copy (`requested`) or at the peer's. `next` is our next
    /// request's Message ID and the peer's; `None` when our request's answer could not be
    /// used (the SA carries on, taking the peer's next request within a catch-up window).
    MessageIdSync {
        /// We asked.
        requested: bool,
        /// (ours, the peer's) next request Message IDs.
        next: Option<(u32, u32)>,
    },
    /// The negotiation ended with this error (the response, if any, is queued); the SA is
    /// closed.
    Failed(Error),
}

impl ChildEvent for Event {
    fn installed(&self) -> Option<&ChildSa> {
        match self {
            Self::ChildSaInstalled(c) => Some(c),
            _ => None,
        }
    }

    fn deleted(&self) -> Option<u32> {
        match self {
            Self::ChildSaDeleted { spi_in, .. } => Some(*spi_in),
            _ => None,
        }
    }
}
