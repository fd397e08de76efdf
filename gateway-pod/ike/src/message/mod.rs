//! A whole IKE message: header plus payload chain.

pub mod codepoints;
pub mod error;
pub mod header;
pub mod reader;

use codepoints::PayloadType;
use error::InvalidMessage;
use header::Header;

use crate::payload::{self, Payload};

/// An IKE message, borrowing the datagram it was decoded from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// The header; `next_payload` and `length` are recomputed by [`Message::encode`].
    pub header: Header,
    /// The payloads in order. An SK or SKF payload, if any, is the last one.
    pub payloads: Vec<Payload<'a>>,
}

impl<'a> Message<'a> {
    /// Decodes one IKE message: `datagram` is one UDP payload, without the four zero octets
    /// that precede IKE on port 4500.
    pub fn decode(datagram: &'a [u8]) -> Result<Self, InvalidMessage> {
        let (header, body) = Header::decode(datagram)?;
        let payloads = payload::decode_chain(header.next_payload, body)?;
        Ok(Self { header, payloads })
    }

    /// Appends the encoded message to `out`, filling in the header's next payload and length
    /// and every payload's next-payload field and length.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let header = Header {
            next_payload: self
                .payloads
                .first()
                .map_or(PayloadType::NONE, Payload::payload_type),
            ..self.header
        };
        header.encode(out);
        payload::encode_chain(&self.payloads, out);
        let length = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
        if let Some(field) = out.get_mut(start + 24..start + header::HEADER_LEN) {
            field.copy_from_slice(&length.to_be_bytes());
        }
    }

    /// The encoded message as a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::codepoints::*;
    use super::header::Flags;
    use super::*;
    use crate::payload::{Nonce, Notify, Sk};

    fn message() -> Message<'static> {
        Message {
            header: Header::new(1, 2, ExchangeType::INFORMATIONAL, Flags::RESPONSE, 7),
            payloads: vec![
                Payload::Nonce(Nonce { data: &[0x11; 16] }),
                Payload::Notify(Notify::new(NotifyType::COOKIE, &[1, 2, 3])),
                Payload::Sk(Sk {
                    first_inner: PayloadType::DELETE,
                    body: &[9; 24],
                }),
            ],
        }
    }

    #[test]
    fn round_trip_fills_in_chain_and_lengths() {
        let bytes = message().to_vec();
        let decoded = Message::decode(&bytes).unwrap();
        assert_eq!(decoded.header.next_payload, PayloadType::NONCE);
        assert_eq!(decoded.header.length as usize, bytes.len());
        assert_eq!(decoded.payloads, message().payloads);
        assert_eq!(decoded.to_vec(), bytes);
    }

    #[test]
    fn rejects_every_truncation() {
        let bytes = message().to_vec();
        for n in 0..bytes.len() {
            assert!(Message::decode(&bytes[..n]).is_err(), "prefix of {n}");
        }
    }

    #[test]
    fn rejects_trailing_bytes_after_the_chain() {
        let mut m = message();
        m.payloads.pop();
        let mut bytes = m.to_vec();
        bytes.extend_from_slice(&[0; 4]);
        bytes[27] += 4;
        assert_eq!(
            Message::decode(&bytes),
            Err(InvalidMessage::TrailingBytes("payload chain"))
        );
    }

    #[test]
    fn rejects_payloads_after_sk() {
        let mut m = message();
        m.payloads.swap(1, 2);
        let bytes = m.to_vec();
        assert_eq!(Message::decode(&bytes), Err(InvalidMessage::MisplacedEncrypted));
    }
}
