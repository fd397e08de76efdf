//! Decoding errors and the one function deciding which notify, if any, answers them.

use super::codepoints::{NotifyType, PayloadType};
use InvalidMessage::*;

/// Why a datagram is not a well-formed IKEv2 message. Cheap to copy and to count; the context
/// strings name the structure that was being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    /// The input ended inside the named structure.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A length field of the named structure is impossible (shorter than its own header, or
    /// not what the structure's type requires).
    #[error("bad length in {0}")]
    BadLength(&'static str),
    /// The named structure is followed by bytes its length does not account for.
    #[error("trailing bytes after {0}")]
    TrailingBytes(&'static str),
    /// A field of the named structure holds a value the RFC forbids.
    #[error("invalid value in {0}")]
    InvalidValue(&'static str),
    /// The IKE header's length field does not match the datagram.
    #[error("IKE header length {header} but datagram of {datagram} bytes")]
    LengthMismatch {
        /// The header's Length field.
        header: u32,
        /// The datagram's length.
        datagram: usize,
    },
    /// The initiator's SPI is zero.
    #[error("zero initiator SPI")]
    ZeroInitiatorSpi,
    /// The header's major version is not 2.
    #[error("unsupported major version {0}")]
    InvalidMajorVersion(u8),
    /// A payload of an unknown type had the critical bit set.
    #[error("unsupported critical payload {0}")]
    UnsupportedCriticalPayload(PayloadType),
    /// An SK or SKF payload was followed by more payloads, or was found inside one.
    #[error("misplaced encrypted payload")]
    MisplacedEncrypted,
}

/// The notify an IKE endpoint answers `err` with, or `None` when the message is dropped
/// silently.
///
/// The engine still decides whether to answer at all: RFC 7296 section 3.10.1 allows
/// INVALID_SYNTAX only "for and in an encrypted packet if the Message ID and cryptographic
/// checksum were valid", so an unprotected message with bad syntax is dropped.
pub fn notify_for(err: &InvalidMessage) -> Option<NotifyType> {
    match *err {
        // RFC 7296 section 2.5: "If an endpoint receives a message with a higher major version
        // number, it MUST drop the message and SHOULD send an unauthenticated Notify message of
        // type INVALID_MAJOR_VERSION containing the highest (closest) version number it
        // supports." A lower major version is IKEv1, which would not understand the answer.
        InvalidMajorVersion(major) if major > super::codepoints::MAJOR_VERSION => {
            Some(NotifyType::INVALID_MAJOR_VERSION)
        }
        InvalidMajorVersion(_) | ZeroInitiatorSpi => None,
        UnsupportedCriticalPayload(_) => Some(NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD),
        Truncated(_)
        | BadLength(_)
        | TrailingBytes(_)
        | InvalidValue(_)
        | LengthMismatch { .. }
        | MisplacedEncrypted => Some(NotifyType::INVALID_SYNTAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_for_each_kind() {
        assert_eq!(
            notify_for(&InvalidMajorVersion(3)),
            Some(NotifyType::INVALID_MAJOR_VERSION)
        );
        assert_eq!(notify_for(&InvalidMajorVersion(1)), None);
        assert_eq!(notify_for(&ZeroInitiatorSpi), None);
        assert_eq!(
            notify_for(&UnsupportedCriticalPayload(PayloadType(99))),
            Some(NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD)
        );
        assert_eq!(notify_for(&Truncated("SA")), Some(NotifyType::INVALID_SYNTAX));
        assert_eq!(Truncated("SA").to_string(), "truncated SA");
    }
}
