//! The errors of the IKE engine, one type for both roles and every exchange, and the notify
//! each one is answered with (RFC 7296 §3.10.1).

use concentrator_crypto::{CryptoError, PacketError};

use crate::message::codepoints::{ExchangeType, NotifyType, ProtocolId};
use crate::message::error::{InvalidMessage, notify_for};
use crate::payload::{Notify, Payload};

/// Why negotiation failed; each maps to the notify the responder sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// No proposal was acceptable: NO_PROPOSAL_CHOSEN.
    #[error("no acceptable proposal")]
    NoProposalChosen,
    /// The traffic selectors do not intersect the eroute's subnets: TS_UNACCEPTABLE.
    #[error("traffic selectors unacceptable")]
    TsUnacceptable,
}

/// Why a message was dropped or a negotiation failed, in either role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The datagram is not a well-formed IKE message.
    #[error("malformed message: {0}")]
    Malformed(#[from] InvalidMessage),
    /// The decrypted, authenticated inner payloads are malformed (answered).
    #[error("malformed encrypted payloads: {0}")]
    MalformedInner(InvalidMessage),
    /// A well-formed message this state does not take (dropped, state kept).
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// A required payload is missing.
    #[error("missing {0} payload")]
    MissingPayload(&'static str),
    /// Proposal or traffic selector negotiation failed.
    #[error(transparent)]
    Negotiation(#[from] NegotiationError),
    /// The KE payload is not for the selected group (`got` 0: no KE payload).
    #[error("KE payload for group {got}, selected group {selected}")]
    InvalidKe {
        /// The KE payload's group.
        got: u16,
        /// The group we selected.
        selected: u16,
    },
    /// The peer failed authentication.
    #[error("authentication failed: {0}")]
    AuthenticationFailed(&'static str),
    /// The eroute the peer's identity selects does not allow the IKE proposal chosen in
    /// IKE_SA_INIT (from the proposals of every eroute, before the identity was known).
    #[error("the IKE proposal negotiated is not one the peer's eroute allows")]
    ProposalNotAllowed,
    /// Key exchange or key derivation failed.
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    /// The SK payload did not verify or could not be built (dropped).
    #[error("SK payload: {0}")]
    Packet(#[from] PacketError),
    /// An API call not valid in the current state.
    #[error("not valid in this state: {0}")]
    WrongState(&'static str),
    /// The peer asked to rekey a CHILD SA this IKE SA does not have.
    #[error("no CHILD SA with SPI {spi:08x} ({protocol}) to rekey")]
    ChildSaNotFound {
        /// The REKEY_SA notify's protocol.
        protocol: ProtocolId,
        /// Its SPI (the peer's inbound SPI).
        spi: u32,
    },
    /// A CREATE_CHILD_SA request on an IKE SA that a rekey replaced: only its deletion is
    /// expected there.
    #[error("no more CHILD SAs on an IKE SA that was rekeyed")]
    NoAdditionalSas,
    /// A timer expired.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The peer asked to rekey the IKE SA while our own rekey of it is in flight.
    #[error("IKE SA rekey collides with ours in flight")]
    TemporaryFailure,
    /// The peer answered our request with this error notify (AUTHENTICATION_FAILED,
    /// NO_PROPOSAL_CHOSEN, TS_UNACCEPTABLE, ...).
    #[error("the peer refused {exchange}: {notify}")]
    Refused {
        /// The exchange it refused.
        exchange: ExchangeType,
        /// Its notify.
        notify: NotifyType,
    },
    /// The response picked something we did not offer or broke a rule of the protocol.
    #[error("invalid response: {0}")]
    InvalidResponse(&'static str),
    /// IKE_SA_INIT was retried `max_init_retries` times (COOKIE, INVALID_KE_PAYLOAD).
    #[error("IKE_SA_INIT retried {0} times (COOKIE, INVALID_KE_PAYLOAD) without success")]
    TooManyRetries(u32),
    /// The configuration cannot start a negotiation.
    #[error("configuration: {0}")]
    Config(&'static str),
    /// The peer redirected us (RFC 5685) elsewhere.
    #[error("redirected to another gateway")]
    Redirected,
}

impl Error {
    /// The notify of this error, if any: the one answering it, or for [`Error::Refused`] the
    /// one the peer answered with.
    pub fn notify(&self) -> Option<NotifyType> {
        match self {
            Self::Refused { notify, .. } => Some(*notify),
            Self::Malformed(e) | Self::MalformedInner(e) => notify_for(e),
            Self::MissingPayload(_) => Some(NotifyType::INVALID_SYNTAX),
            Self::Negotiation(NegotiationError::NoProposalChosen) => Some(NotifyType::NO_PROPOSAL_CHOSEN),
            Self::Negotiation(NegotiationError::TsUnacceptable) => Some(NotifyType::TS_UNACCEPTABLE),
            Self::InvalidKe { .. } => Some(NotifyType::INVALID_KE_PAYLOAD),
            // As strongSwan answers a peer whose identity finds no config for its IKE SA.
            Self::AuthenticationFailed(_) | Self::ProposalNotAllowed => {
                Some(NotifyType::AUTHENTICATION_FAILED)
            }
            // A peer public value that fails validation: the request was invalid.
            Self::Crypto(CryptoError::InvalidPublicValue { .. } | CryptoError::PublicValueLength { .. }) => {
                Some(NotifyType::INVALID_SYNTAX)
            }
            Self::ChildSaNotFound { .. } => Some(NotifyType::CHILD_SA_NOT_FOUND),
            Self::NoAdditionalSas => Some(NotifyType::NO_ADDITIONAL_SAS),
            Self::TemporaryFailure => Some(NotifyType::TEMPORARY_FAILURE),
            Self::Crypto(_)
            | Self::Unexpected(_)
            | Self::Packet(_)
            | Self::WrongState(_)
            | Self::Timeout(_)
            | Self::InvalidResponse(_)
            | Self::TooManyRetries(_)
            | Self::Config(_)
            | Self::Redirected => None,
        }
    }

    /// The Notify payload fields answering this error: type, protocol and SPI (RFC 7296
    /// §3.10: "the SPI is included only with INVALID_SELECTORS, REKEY_SA, and
    /// CHILD_SA_NOT_FOUND"), and data (§3.10.1: the accepted group for INVALID_KE_PAYLOAD,
    /// the payload type for UNSUPPORTED_CRITICAL_PAYLOAD).
    pub(crate) fn notify_fields(&self) -> Option<NotifyFields> {
        let notify_type = self.notify()?;
        let mut f = NotifyFields {
            notify_type,
            protocol: ProtocolId::NONE,
            spi: Vec::new(),
            data: Vec::new(),
        };
        match *self {
            Self::InvalidKe { selected, .. } => f.data = selected.to_be_bytes().to_vec(),
            Self::ChildSaNotFound { protocol, spi } => {
                f.protocol = protocol;
                f.spi = spi.to_be_bytes().to_vec();
            }
            Self::Malformed(InvalidMessage::UnsupportedCriticalPayload(t))
            | Self::MalformedInner(InvalidMessage::UnsupportedCriticalPayload(t)) => f.data = vec![t.0],
            _ => {}
        }
        Some(f)
    }

    /// Whether the datagram was only dropped (the negotiation goes on).
    pub(crate) fn is_drop(&self) -> bool {
        matches!(self, Self::Malformed(_) | Self::Unexpected(_) | Self::Packet(_))
    }
}

/// The owned fields of an error notify.
pub(crate) struct NotifyFields {
    pub(crate) notify_type: NotifyType,
    pub(crate) protocol: ProtocolId,
    pub(crate) spi: Vec<u8>,
    pub(crate) data: Vec<u8>,
}

impl NotifyFields {
    pub(crate) fn payload(&self) -> Payload<'_> {
        Payload::Notify(Notify {
            protocol: self.protocol,
            spi: &self.spi,
            notify_type: self.notify_type,
            data: &self.data,
        })
    }
}
