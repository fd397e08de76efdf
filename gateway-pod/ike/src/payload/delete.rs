//! Delete payload (RFC 7296 section 3.11).

use crate::message::codepoints::ProtocolId;
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader};

/// D payload: delete the IKE SA (`protocol` IKE, no SPIs) or the Child SAs with these inbound
/// SPIs of the sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    /// IKE, AH or ESP.
    pub protocol: ProtocolId,
    /// The SPIs (always empty for IKE).
    pub spis: Vec<u32>,
}

impl Delete {
    /// Decodes a Delete payload body.
    pub fn decode(body: &[u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let protocol = ProtocolId(r.u8().or_truncated("delete")?);
        let spi_size = r.u8().or_truncated("delete")?;
        let count = r.u16().or_truncated("delete")?;
        // RFC 7296 section 3.11, Protocol ID: "Must be 1 for an IKE SA, 2 for AH, or 3 for ESP."
        // SPI Size: "It MUST be zero for IKE (SPI is in message header) or four for AH and ESP."
        let spis = match (protocol, spi_size) {
            // The count of an IKE delete is meaningless (no SPIs follow); it is not kept.
            (ProtocolId::IKE, 0) => Vec::new(),
            (ProtocolId::AH | ProtocolId::ESP, 4) => (0..count)
                .map(|_| r.u32().or_truncated("delete SPI"))
                .collect::<Result<_, _>>()?,
            (ProtocolId::IKE | ProtocolId::AH | ProtocolId::ESP, _) => {
                return Err(InvalidMessage::BadLength("delete SPI"));
            }
            _ => return Err(InvalidMessage::InvalidValue("delete protocol")),
        };
        r.finish("delete")?;
        Ok(Self { protocol, spis })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let spi_size = if self.protocol == ProtocolId::IKE { 0 } else { 4 };
        let spis: &[u32] = if spi_size == 0 { &[] } else { &self.spis };
        out.extend_from_slice(&[self.protocol.0, spi_size]);
        out.extend_from_slice(&u16::try_from(spis.len()).unwrap_or(u16::MAX).to_be_bytes());
        for spi in spis {
            out.extend_from_slice(&spi.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::testing::{assert_prefixes_rejected, body};

    #[test]
    fn round_trip_child_and_ike() {
        let d = Delete {
            protocol: ProtocolId::ESP,
            spis: vec![1, 0xdeadbeef],
        };
        let b = body(|o| d.encode(o));
        assert_eq!(b, [3, 4, 0, 2, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(Delete::decode(&b), Ok(d));
        assert_prefixes_rejected(&b, Delete::decode);

        let ike = Delete {
            protocol: ProtocolId::IKE,
            spis: vec![],
        };
        assert_eq!(body(|o| ike.encode(o)), [1, 0, 0, 0]);
        assert_eq!(Delete::decode(&[1, 0, 0, 0]), Ok(ike.clone()));
        assert_eq!(Delete::decode(&[1, 0, 0, 5]), Ok(ike));
    }

    #[test]
    fn rejects_bad_spi_size_protocol_and_trailing_bytes() {
        assert_eq!(
            Delete::decode(&[1, 8, 0, 0]),
            Err(InvalidMessage::BadLength("delete SPI"))
        );
        assert_eq!(
            Delete::decode(&[3, 8, 0, 0]),
            Err(InvalidMessage::BadLength("delete SPI"))
        );
        assert_eq!(
            Delete::decode(&[9, 4, 0, 0]),
            Err(InvalidMessage::InvalidValue("delete protocol"))
        );
        assert_eq!(
            Delete::decode(&[3, 4, 0, 0, 1]),
            Err(InvalidMessage::TrailingBytes("delete"))
        );
        assert_eq!(
            Delete::decode(&[1, 0, 0, 0, 1]),
            Err(InvalidMessage::TrailingBytes("delete"))
        );
    }
}
