//! Configuration payload (RFC 7296 section 3.15).

use crate::message::codepoints::{CfgAttributeType, CfgType};
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader};

/// The reserved bit in front of a configuration attribute type.
const RESERVED_BIT: u16 = 0x8000;

/// CP payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cp<'a> {
    /// CFG Type.
    pub cfg_type: CfgType,
    /// The attributes.
    pub attributes: Vec<CfgAttribute<'a>>,
}

/// One configuration attribute; an empty value asks for one in a CFG_REQUEST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CfgAttribute<'a> {
    /// Attribute Type (without the reserved bit).
    pub attribute_type: CfgAttributeType,
    /// Value.
    pub value: &'a [u8],
}

impl<'a> Cp<'a> {
    /// Decodes a CP payload body.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let cfg_type = CfgType(r.u8().or_truncated("CP")?);
        r.take(3).or_truncated("CP")?;
        let mut attributes = Vec::new();
        while !r.is_empty() {
            // RFC 7296 section 3.15.1, Reserved (1 bit): "This bit MUST be set to zero and MUST
            // be ignored on receipt."
            let attribute_type = CfgAttributeType(r.u16().or_truncated("CP attribute")? & !RESERVED_BIT);
            let len = r.u16().or_truncated("CP attribute")?;
            let value = r.take(usize::from(len)).or_truncated("CP attribute")?;
            attributes.push(CfgAttribute {
                attribute_type,
                value,
            });
        }
        Ok(Self { cfg_type, attributes })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.cfg_type.0, 0, 0, 0]);
        for a in &self.attributes {
            out.extend_from_slice(&(a.attribute_type.0 & !RESERVED_BIT).to_be_bytes());
            out.extend_from_slice(&u16::try_from(a.value.len()).unwrap_or(u16::MAX).to_be_bytes());
            out.extend_from_slice(a.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::testing::{assert_prefixes_rejected, body};

    #[test]
    fn round_trip_and_truncation() {
        let cp = Cp {
            cfg_type: CfgType::CFG_REPLY,
            attributes: vec![
                CfgAttribute {
                    attribute_type: CfgAttributeType::INTERNAL_IP4_ADDRESS,
                    value: &[10, 0, 0, 1],
                },
                CfgAttribute {
                    attribute_type: CfgAttributeType::INTERNAL_IP4_DNS,
                    value: &[],
                },
            ],
        };
        let b = body(|o| cp.encode(o));
        assert_eq!(b, [2, 0, 0, 0, 0, 1, 0, 4, 10, 0, 0, 1, 0, 3, 0, 0]);
        assert_eq!(Cp::decode(&b), Ok(cp));
        // Every prefix that cuts an attribute (or the fixed part) fails.
        for n in [0, 3, 5, 7, 9, 11, 13, 15] {
            assert!(Cp::decode(&b[..n]).is_err(), "{n}");
        }
        assert_prefixes_rejected(&b[..4], Cp::decode);
    }

    #[test]
    fn reserved_bit_is_ignored() {
        let cp = Cp::decode(&[1, 0, 0, 0, 0x80, 1, 0, 0]).unwrap();
        assert_eq!(
            cp.attributes[0].attribute_type,
            CfgAttributeType::INTERNAL_IP4_ADDRESS
        );
    }
}
