//! Nonce payload (RFC 7296 section 3.9).

use std::ops::RangeInclusive;

use crate::message::error::InvalidMessage;

/// Allowed nonce sizes. RFC 7296 section 3.9: "The size of the Nonce Data MUST be between 16
/// and 256 octets, inclusive."
pub const NONCE_LEN: RangeInclusive<usize> = 16..=256;

/// Ni or Nr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nonce<'a> {
    /// Nonce Data, 16 to 256 octets.
    pub data: &'a [u8],
}

impl<'a> Nonce<'a> {
    /// Decodes a Nonce payload body.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        if !NONCE_LEN.contains(&body.len()) {
            return Err(InvalidMessage::BadLength("nonce"));
        }
        Ok(Self { data: body })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_16_to_256_octets() {
        for len in [16, 32, 256] {
            let data = vec![1; len];
            assert_eq!(Nonce::decode(&data), Ok(Nonce { data: &data }));
        }
    }

    #[test]
    fn rejects_short_and_long_nonce() {
        for len in [0, 15, 257] {
            assert_eq!(
                Nonce::decode(&vec![1; len]),
                Err(InvalidMessage::BadLength("nonce"))
            );
        }
    }
}
