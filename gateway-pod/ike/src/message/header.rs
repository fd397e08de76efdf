//! The IKE header (RFC 7296 section 3.1).

use std::fmt;
use std::ops::BitOr;

use super::codepoints::{ExchangeType, PayloadType};
use super::error::InvalidMessage;
use super::reader::{OrTruncated, Reader};

pub use super::codepoints::MAJOR_VERSION;
/// The version byte this crate sends (major 2, minor 0); also the data of an
/// INVALID_MAJOR_VERSION notify.
pub const VERSION_BYTE: u8 = MAJOR_VERSION << 4;
/// Length of the IKE header.
pub const HEADER_LEN: usize = 28;

/// The flags octet of the IKE header. Only the I, V and R bits exist; RFC 7296 section 3.1:
/// "X - unused bits, MUST be sent as zero and MUST be ignored on receipt", so decoding masks
/// the others away.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u8);

impl Flags {
    /// No flag.
    pub const NONE: Self = Self(0);
    /// I: sent by the original initiator of the IKE SA.
    pub const INITIATOR: Self = Self(0x08);
    /// V: the sender can speak a higher major version.
    pub const VERSION: Self = Self(0x10);
    /// R: this message is a response.
    pub const RESPONSE: Self = Self(0x20);
    const ALL: u8 = 0x38;

    /// Flags from an octet, dropping the unused bits.
    pub fn from_bits(bits: u8) -> Self {
        Self(bits & Self::ALL)
    }

    /// The octet.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for Flags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::INITIATOR, "I"),
            (Self::VERSION, "V"),
            (Self::RESPONSE, "R"),
        ];
        let set: Vec<&str> = names
            .iter()
            .filter(|(b, _)| self.contains(*b))
            .map(|(_, n)| *n)
            .collect();
        write!(f, "Flags({})", set.join("|"))
    }
}

/// The IKE header.
///
/// `next_payload` and `length` describe the bytes a header was decoded from;
/// [`Message::encode`](crate::Message::encode) overwrites both from the payloads it writes. The
/// version is not a field: decoding accepts only major version 2 and ignores the minor version
/// (RFC 7296 section 3.1: implementations "MUST ignore the minor version number of received
/// messages"), encoding writes 2.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// IKE SA initiator's SPI.
    pub spi_i: u64,
    /// IKE SA responder's SPI (zero in the first message).
    pub spi_r: u64,
    /// Type of the first payload.
    pub next_payload: PayloadType,
    /// Exchange type.
    pub exchange: ExchangeType,
    /// I, V and R flags.
    pub flags: Flags,
    /// Message ID.
    pub message_id: u32,
    /// Length of the whole message, header included.
    pub length: u32,
}

impl Header {
    /// The header of a message to send. `next_payload` and `length` start at zero:
    /// [`Message::encode`](super::Message::encode) fills them in.
    pub fn new(spi_i: u64, spi_r: u64, exchange: ExchangeType, flags: Flags, message_id: u32) -> Self {
        Self {
            spi_i,
            spi_r,
            next_payload: PayloadType::NONE,
            exchange,
            flags,
            message_id,
            length: 0,
        }
    }

    /// The SPI of ours this message names, by which its IKE SA is found (RFC 7296 §3.1: the
    /// Initiator flag says who initiated the SA, or its last rekey): the responder's SPI in a
    /// message from the original initiator, else the initiator's. `None` when that SPI is
    /// zero (a new IKE_SA_INIT: no SPI of ours yet).
    pub fn our_spi(&self) -> Option<u64> {
        let ours = if self.flags.contains(Flags::INITIATOR) {
            self.spi_r
        } else {
            self.spi_i
        };
        (ours != 0).then_some(ours)
    }

    /// Reads the header fields without any check beyond length: for routing by SPI and for
    /// answering a message that [`Header::decode`] rejects (INVALID_MAJOR_VERSION needs the
    /// SPIs and message ID).
    pub fn peek(datagram: &[u8]) -> Option<(Self, u8)> {
        let mut r = Reader::new(datagram);
        let spi_i = r.u64()?;
        let spi_r = r.u64()?;
        let next_payload = PayloadType(r.u8()?);
        let version = r.u8()?;
        let header = Self {
            spi_i,
            spi_r,
            next_payload,
            exchange: ExchangeType(r.u8()?),
            flags: Flags::from_bits(r.u8()?),
            message_id: r.u32()?,
            length: r.u32()?,
        };
        Some((header, version))
    }

    /// Decodes and checks the header of `datagram` (one UDP payload, without the four zero
    /// octets of port 4500), returning it and the payload bytes behind it.
    pub fn decode(datagram: &[u8]) -> Result<(Self, &[u8]), InvalidMessage> {
        let (header, version) = Self::peek(datagram).or_truncated("IKE header")?;
        // RFC 7296 section 2.5: "If an endpoint receives a message with a higher major version
        // number, it MUST drop the message". Lower ones are IKEv1, which this crate does not
        // speak either.
        if version >> 4 != MAJOR_VERSION {
            return Err(InvalidMessage::InvalidMajorVersion(version >> 4));
        }
        // RFC 7296 section 3.1, Initiator's SPI: "This value MUST NOT be zero."
        if header.spi_i == 0 {
            return Err(InvalidMessage::ZeroInitiatorSpi);
        }
        // RFC 7296 section 3.1, Length: "Length of the total message (header + payloads) in
        // octets." One IKE message per datagram, so it must cover the datagram exactly.
        if usize::try_from(header.length).ok() != Some(datagram.len()) {
            return Err(InvalidMessage::LengthMismatch {
                header: header.length,
                datagram: datagram.len(),
            });
        }
        let payloads = datagram.get(HEADER_LEN..).or_truncated("IKE header")?;
        Ok((header, payloads))
    }

    /// Appends the 28 header octets, with `next_payload` and `length` as they are.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.spi_i.to_be_bytes());
        out.extend_from_slice(&self.spi_r.to_be_bytes());
        out.extend_from_slice(&[self.next_payload.0, VERSION_BYTE, self.exchange.0, self.flags.0]);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            spi_i: 0x0102030405060708,
            spi_r: 0,
            next_payload: PayloadType::SA,
            exchange: ExchangeType::IKE_SA_INIT,
            flags: Flags::INITIATOR,
            message_id: 0,
            length: 28,
        }
    }

    fn bytes() -> Vec<u8> {
        let mut out = Vec::new();
        header().encode(&mut out);
        out
    }

    #[test]
    fn round_trip() {
        let b = bytes();
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(b[17], 0x20, "version 2.0");
        assert_eq!(Header::decode(&b), Ok((header(), &[][..])));
    }

    #[test]
    fn rejects_truncated_header() {
        let b = bytes();
        for n in 0..HEADER_LEN {
            assert_eq!(
                Header::decode(&b[..n]),
                Err(InvalidMessage::Truncated("IKE header"))
            );
        }
    }

    #[test]
    fn rejects_other_major_versions_and_ignores_the_minor() {
        let mut b = bytes();
        b[17] = 0x30;
        assert_eq!(Header::decode(&b), Err(InvalidMessage::InvalidMajorVersion(3)));
        b[17] = 0x10;
        assert_eq!(Header::decode(&b), Err(InvalidMessage::InvalidMajorVersion(1)));
        b[17] = 0x21;
        assert_eq!(Header::decode(&b).map(|(h, _)| h), Ok(header()));
        assert_eq!(Header::peek(&b).map(|(_, v)| v), Some(0x21));
    }

    #[test]
    fn rejects_zero_initiator_spi() {
        let mut b = bytes();
        b[..8].fill(0);
        assert_eq!(Header::decode(&b), Err(InvalidMessage::ZeroInitiatorSpi));
    }

    #[test]
    fn rejects_length_not_matching_the_datagram() {
        let mut b = bytes();
        b.push(0);
        assert_eq!(
            Header::decode(&b),
            Err(InvalidMessage::LengthMismatch {
                header: 28,
                datagram: 29
            })
        );
        b[27] = 200;
        assert!(matches!(
            Header::decode(&b),
            Err(InvalidMessage::LengthMismatch { .. })
        ));
    }

    #[test]
    fn unused_flag_bits_are_ignored() {
        let mut b = bytes();
        b[19] = 0xff;
        let (h, _) = Header::decode(&b).unwrap();
        assert_eq!(h.flags, Flags::INITIATOR | Flags::VERSION | Flags::RESPONSE);
        assert_eq!(format!("{:?}", h.flags), "Flags(I|V|R)");
    }
}
