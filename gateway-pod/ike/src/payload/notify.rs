//! Notify payload (RFC 7296 section 3.10).

use super::len_u8;
use crate::message::codepoints::{NotifyType, ProtocolId};
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader};

/// N payload: an error or status, optionally about the Child SA with `spi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notify<'a> {
    /// Protocol ID (AH or ESP when `spi` names a Child SA, otherwise zero).
    pub protocol: ProtocolId,
    /// SPI (empty for notifications about the IKE SA or no SA).
    pub spi: &'a [u8],
    /// Notify Message Type.
    pub notify_type: NotifyType,
    /// Notification Data.
    pub data: &'a [u8],
}

impl<'a> Notify<'a> {
    /// A notify without SPI (protocol zero).
    pub fn new(notify_type: NotifyType, data: &'a [u8]) -> Self {
        Self {
            protocol: ProtocolId::NONE,
            spi: &[],
            notify_type,
            data,
        }
    }

    /// Decodes a Notify payload body.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        // RFC 7296 section 3.10, Protocol ID: "If the SPI field is empty, this field MUST be
        // sent as zero and MUST be ignored on receipt." Kept as is: the engine ignores it.
        let protocol = ProtocolId(r.u8().or_truncated("notify")?);
        let spi_size = r.u8().or_truncated("notify")?;
        let notify_type = NotifyType(r.u16().or_truncated("notify")?);
        let spi = r.take(usize::from(spi_size)).or_truncated("notify SPI")?;
        Ok(Self {
            protocol,
            spi,
            notify_type,
            data: r.rest(),
        })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.protocol.0, len_u8(self.spi.len())]);
        out.extend_from_slice(&self.notify_type.0.to_be_bytes());
        out.extend_from_slice(self.spi);
        out.extend_from_slice(self.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::testing::{assert_prefixes_rejected, body};

    #[test]
    fn round_trip_with_and_without_spi() {
        let n = Notify::new(NotifyType::NAT_DETECTION_SOURCE_IP, &[9; 20]);
        let b = body(|o| n.encode(o));
        assert_eq!(&b[..4], &[0, 0, 0x40, 0x04]);
        assert_eq!(Notify::decode(&b), Ok(n));

        let rekey = Notify {
            protocol: ProtocolId::ESP,
            spi: &[0xc0, 0, 0, 1],
            notify_type: NotifyType::REKEY_SA,
            data: &[],
        };
        let b = body(|o| rekey.encode(o));
        assert_eq!(b, [3, 4, 0x40, 0x09, 0xc0, 0, 0, 1]);
        assert_eq!(Notify::decode(&b), Ok(rekey));
        assert_prefixes_rejected(&b, Notify::decode);
    }
}
