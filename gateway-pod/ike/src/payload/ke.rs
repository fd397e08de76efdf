//! Key Exchange payload (RFC 7296 section 3.4).

use crate::message::codepoints::DhGroup;
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader};

/// KE payload: the group and the sender's public value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ke<'a> {
    /// Diffie-Hellman Group Num.
    pub group: DhGroup,
    /// Key Exchange Data (its length is checked against the group by the crypto layer).
    pub data: &'a [u8],
}

impl<'a> Ke<'a> {
    /// Decodes a KE payload body.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let group = DhGroup(r.u16().or_truncated("KE")?);
        let _reserved = r.u16().or_truncated("KE")?;
        Ok(Self {
            group,
            data: r.rest(),
        })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.group.0.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(self.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::testing::{assert_prefixes_rejected, body};

    #[test]
    fn round_trip_and_truncation() {
        let ke = Ke {
            group: DhGroup::CURVE25519,
            data: &[7; 32],
        };
        let b = body(|o| ke.encode(o));
        assert_eq!(&b[..4], &[0, 31, 0, 0]);
        assert_eq!(Ke::decode(&b), Ok(ke));
        assert_prefixes_rejected(&b[..4], Ke::decode);
    }
}
