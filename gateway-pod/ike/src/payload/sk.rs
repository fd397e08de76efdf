//! Encrypted payload SK (RFC 7296 section 3.14) and Encrypted Fragment payload SKF (RFC 7383
//! section 2.5). Their bodies stay opaque here: the IV, ciphertext, padding and ICV layout
//! depends on the negotiated algorithms and belongs to the crypto layer.

use crate::message::codepoints::PayloadType;
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader};

/// SK payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sk<'a> {
    /// Type of the first payload inside (the SK payload's own next-payload field).
    pub first_inner: PayloadType,
    /// IV, ciphertext and ICV.
    pub body: &'a [u8],
}

impl Sk<'_> {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.body);
    }
}

/// SKF payload: one fragment of an SK payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Skf<'a> {
    /// Type of the first inner payload in fragment 1, zero in the others.
    pub first_inner: PayloadType,
    /// Fragment Number, from 1.
    pub fragment_number: u16,
    /// Total Fragments.
    pub total_fragments: u16,
    /// IV, ciphertext and ICV of this fragment.
    pub body: &'a [u8],
}

impl<'a> Skf<'a> {
    /// Decodes an SKF payload body; `first_inner` is its next-payload field.
    pub fn decode(first_inner: PayloadType, body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let fragment_number = r.u16().or_truncated("SKF")?;
        let total_fragments = r.u16().or_truncated("SKF")?;
        // RFC 7383 section 2.5, Fragment Number: "This field MUST be less than or equal to the
        // next field (Total Fragments). This field MUST NOT be zero." Total Fragments: "This
        // field MUST NOT be zero."
        if fragment_number == 0 || fragment_number > total_fragments {
            return Err(InvalidMessage::InvalidValue("SKF fragment number"));
        }
        Ok(Self {
            first_inner,
            fragment_number,
            total_fragments,
            body: r.rest(),
        })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.fragment_number.to_be_bytes());
        out.extend_from_slice(&self.total_fragments.to_be_bytes());
        out.extend_from_slice(self.body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::testing::{assert_prefixes_rejected, body};

    #[test]
    fn rejects_fragment_number_zero_or_above_total() {
        for bad in [[0, 0, 0, 1], [0, 2, 0, 1], [0, 1, 0, 0]] {
            assert_eq!(
                Skf::decode(PayloadType::NONE, &bad),
                Err(InvalidMessage::InvalidValue("SKF fragment number"))
            );
        }
    }

    #[test]
    fn skf_round_trip_and_truncation() {
        let skf = Skf {
            first_inner: PayloadType::IDI,
            fragment_number: 1,
            total_fragments: 3,
            body: &[5; 40],
        };
        let b = body(|o| skf.encode(o));
        assert_eq!(&b[..4], &[0, 1, 0, 3]);
        assert_eq!(Skf::decode(PayloadType::IDI, &b), Ok(skf));
        assert_prefixes_rejected(&b[..4], |b| Skf::decode(PayloadType::IDI, b));
    }
}
