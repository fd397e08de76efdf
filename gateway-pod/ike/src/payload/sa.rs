//! Security Association payload: proposals, transforms, attributes (RFC 7296 section 3.3).

use super::len_u8;
use crate::message::codepoints::{AttributeType, ProtocolId, TransformId, TransformType};
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader, with_u16_len};

/// Last Substructure value of a proposal followed by another one.
const MORE_PROPOSALS: u8 = 2;
/// Last Substructure value of a transform followed by another one.
const MORE_TRANSFORMS: u8 = 3;
/// The AF bit: the attribute is in Type/Value format.
const AF_TV: u16 = 0x8000;

/// SA payload: proposals from most to least preferred (the responder's holds one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sa<'a> {
    /// The proposals, never empty.
    pub proposals: Vec<Proposal<'a>>,
}

/// One proposal: a protocol and the transforms offered for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal<'a> {
    /// Proposal Num.
    pub number: u8,
    /// IKE, AH or ESP.
    pub protocol: ProtocolId,
    /// The sender's inbound SPI (empty for an initial IKE SA negotiation).
    pub spi: &'a [u8],
    /// The transforms.
    pub transforms: Vec<Transform<'a>>,
}

/// One transform: an algorithm of one type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transform<'a> {
    /// ENCR, PRF, INTEG, DH or ESN.
    pub transform_type: TransformType,
    /// The algorithm, in the namespace of `transform_type`.
    pub id: TransformId,
    /// Attributes (in practice only the key length).
    pub attributes: Vec<Attribute<'a>>,
}

/// A transform attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attribute<'a> {
    /// Attribute type, without the AF bit.
    pub attribute_type: AttributeType,
    /// Value, in TV or TLV format.
    pub value: AttributeValue<'a>,
}

/// An attribute value. RFC 7296 section 3.3.5, Attribute Format: "If the AF bit is zero (0),
/// then the attribute uses TLV format; if the AF bit is one (1), the TV format (with two-byte
/// value) is used."
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttributeValue<'a> {
    /// Type/Value: a two-byte value.
    Tv(u16),
    /// Type/Length/Value.
    Tlv(&'a [u8]),
}

impl<'a> Sa<'a> {
    /// Decodes an SA payload body.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let mut proposals: Vec<Proposal<'a>> = Vec::new();
        loop {
            let (more, mut sub) = substructure(&mut r, MORE_PROPOSALS, "proposal")?;
            let proposal = Proposal::decode(&mut sub)?;
            // RFC 7296 section 3.3: "Each structure MUST have a proposal number one (1) greater
            // than the previous structure."
            if let Some(prev) = proposals.last()
                && prev.number.checked_add(1) != Some(proposal.number)
            {
                return Err(InvalidMessage::InvalidValue("proposal number"));
            }
            proposals.push(proposal);
            if !more {
                break;
            }
        }
        // RFC 7296 section 3.3: "When parsing an SA, an implementation MUST check that the
        // total Payload Length is consistent with the payload's internal lengths and counts."
        r.finish("last proposal")?;
        Ok(Self { proposals })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for (i, p) in self.proposals.iter().enumerate() {
            let more = i + 1 < self.proposals.len();
            out.extend_from_slice(&[if more { MORE_PROPOSALS } else { 0 }, 0]);
            with_u16_len(out, 2, |out| p.encode(out));
        }
    }
}

/// Reads the 4-octet head shared by proposals and transforms (Last Substructure, RESERVED,
/// Length) and returns whether another one follows and a reader over the rest.
fn substructure<'a>(
    r: &mut Reader<'a>,
    more_value: u8,
    what: &'static str,
) -> Result<(bool, Reader<'a>), InvalidMessage> {
    let last = r.u8().or_truncated(what)?;
    // RFC 7296 section 3.3.1: Last Substructure "has a value of 0 if this was the last
    // Proposal Substructure, and a value of 2 if there are more Proposal Substructures";
    // section 3.3.2: 0 for the last transform, 3 if there are more.
    let more = match last {
        0 => false,
        v if v == more_value => true,
        _ => return Err(InvalidMessage::InvalidValue(what)),
    };
    let _reserved = r.u8().or_truncated(what)?;
    let len = r.u16().or_truncated(what)?;
    let body_len = usize::from(len)
        .checked_sub(4)
        .ok_or(InvalidMessage::BadLength(what))?;
    Ok((more, r.sub(body_len).or_truncated(what)?))
}

impl<'a> Proposal<'a> {
    fn decode(r: &mut Reader<'a>) -> Result<Self, InvalidMessage> {
        let number = r.u8().or_truncated("proposal")?;
        let protocol = ProtocolId(r.u8().or_truncated("proposal")?);
        let spi_size = r.u8().or_truncated("proposal")?;
        let count = r.u8().or_truncated("proposal")?;
        // RFC 7296 section 3.3.1, SPI Size: "For an initial IKE SA negotiation, this field MUST
        // be zero; the SPI is obtained from the outer header. During subsequent negotiations,
        // it is equal to the size, in octets, of the SPI of the corresponding protocol (8 for
        // IKE, 4 for ESP and AH)." Unknown protocols keep their SPI as data.
        let ok = match protocol {
            ProtocolId::IKE => matches!(spi_size, 0 | 8),
            ProtocolId::AH | ProtocolId::ESP => spi_size == 4,
            _ => true,
        };
        if !ok {
            return Err(InvalidMessage::BadLength("proposal SPI"));
        }
        let spi = r.take(usize::from(spi_size)).or_truncated("proposal SPI")?;
        let mut transforms = Vec::with_capacity(usize::from(count));
        for i in 0..count {
            let (more, mut sub) = substructure(r, MORE_TRANSFORMS, "transform")?;
            // The Last Substructure flags must agree with "# of Transforms".
            if more != (i + 1 < count) {
                return Err(InvalidMessage::InvalidValue("transform count"));
            }
            transforms.push(Transform::decode(&mut sub)?);
        }
        r.finish("proposal")?;
        Ok(Self {
            number,
            protocol,
            spi,
            transforms,
        })
    }

    /// The IDs of its Diffie-Hellman transforms (NONE, 0, included).
    pub(crate) fn dh_ids(&self) -> impl Iterator<Item = u16> + '_ {
        self.transforms
            .iter()
            .filter(|t| t.transform_type == TransformType::DH)
            .map(|t| t.id.0)
    }

    /// The proposal without its Diffie-Hellman transforms: a CREATE_CHILD_SA offer is matched
    /// as an ESP proposal of IKE_AUTH, its PFS groups apart.
    pub(crate) fn without_dh(&self) -> Self {
        Self {
            transforms: self
                .transforms
                .iter()
                .filter(|t| t.transform_type != TransformType::DH)
                .cloned()
                .collect(),
            ..self.clone()
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[
            self.number,
            self.protocol.0,
            len_u8(self.spi.len()),
            len_u8(self.transforms.len()),
        ]);
        out.extend_from_slice(self.spi);
        for (i, t) in self.transforms.iter().enumerate() {
            let more = i + 1 < self.transforms.len();
            out.extend_from_slice(&[if more { MORE_TRANSFORMS } else { 0 }, 0]);
            with_u16_len(out, 2, |out| t.encode(out));
        }
    }
}

impl<'a> Transform<'a> {
    /// A transform without attributes.
    pub fn new(transform_type: TransformType, id: TransformId) -> Self {
        Self {
            transform_type,
            id,
            attributes: Vec::new(),
        }
    }

    /// A transform with a key length attribute (TV format).
    pub fn with_key_length(transform_type: TransformType, id: TransformId, bits: u16) -> Self {
        let attribute = Attribute {
            attribute_type: AttributeType::KEY_LENGTH,
            value: AttributeValue::Tv(bits),
        };
        Self {
            transform_type,
            id,
            attributes: vec![attribute],
        }
    }

    /// The key length attribute, if present in TV format.
    pub fn key_length(&self) -> Option<u16> {
        self.attributes
            .iter()
            .find_map(|a| match (a.attribute_type, a.value) {
                (AttributeType::KEY_LENGTH, AttributeValue::Tv(bits)) => Some(bits),
                _ => None,
            })
    }

    fn decode(r: &mut Reader<'a>) -> Result<Self, InvalidMessage> {
        let transform_type = TransformType(r.u8().or_truncated("transform")?);
        let _reserved = r.u8().or_truncated("transform")?;
        let id = TransformId(r.u16().or_truncated("transform")?);
        let mut attributes = Vec::new();
        while !r.is_empty() {
            let raw = r.u16().or_truncated("transform attribute")?;
            let attribute_type = AttributeType(raw & !AF_TV);
            let value = if raw & AF_TV != 0 {
                AttributeValue::Tv(r.u16().or_truncated("transform attribute")?)
            } else {
                let len = r.u16().or_truncated("transform attribute")?;
                AttributeValue::Tlv(r.take(usize::from(len)).or_truncated("transform attribute")?)
            };
            attributes.push(Attribute {
                attribute_type,
                value,
            });
        }
        Ok(Self {
            transform_type,
            id,
            attributes,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.transform_type.0, 0]);
        out.extend_from_slice(&self.id.0.to_be_bytes());
        for a in &self.attributes {
            let ty = a.attribute_type.0 & !AF_TV;
            match a.value {
                AttributeValue::Tv(v) => {
                    out.extend_from_slice(&(ty | AF_TV).to_be_bytes());
                    out.extend_from_slice(&v.to_be_bytes());
                }
                AttributeValue::Tlv(v) => {
                    out.extend_from_slice(&ty.to_be_bytes());
                    out.extend_from_slice(&u16::try_from(v.len()).unwrap_or(u16::MAX).to_be_bytes());
                    out.extend_from_slice(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::testing::{assert_prefixes_rejected, body};

    fn ike_sa() -> Sa<'static> {
        Sa {
            proposals: vec![
                Proposal {
                    number: 1,
                    protocol: ProtocolId::IKE,
                    spi: &[],
                    transforms: vec![
                        Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 128),
                        Transform::new(TransformType::PRF, TransformId::PRF_HMAC_SHA2_256),
                        Transform::new(TransformType::DH, TransformId(31)),
                    ],
                },
                Proposal {
                    number: 2,
                    protocol: ProtocolId::ESP,
                    spi: &[1, 2, 3, 4],
                    transforms: vec![Transform {
                        transform_type: TransformType(99),
                        id: TransformId(7),
                        attributes: vec![Attribute {
                            attribute_type: AttributeType(300),
                            value: AttributeValue::Tlv(&[5, 6, 7]),
                        }],
                    }],
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let b = body(|o| ike_sa().encode(o));
        let sa = Sa::decode(&b).unwrap();
        assert_eq!(sa, ike_sa());
        assert_eq!(sa.proposals[0].transforms[0].key_length(), Some(128));
        assert_eq!(sa.proposals[0].transforms[1].key_length(), None);
        assert_eq!(body(|o| sa.encode(o)), b);
    }

    #[test]
    fn rfc_byte_layout() {
        // One IKE proposal, one ENCR AES-CBC-256 transform: RFC 7296 figures 6, 8 and 9.
        let sa = Sa {
            proposals: vec![Proposal {
                number: 1,
                protocol: ProtocolId::IKE,
                spi: &[],
                transforms: vec![Transform::with_key_length(
                    TransformType::ENCR,
                    TransformId::ENCR_AES_CBC,
                    256,
                )],
            }],
        };
        let expected = [
            0, 0, 0, 20, 1, 1, 0, 1, // proposal: last, len 20, #1, IKE, no SPI, 1 transform
            0, 0, 0, 12, 1, 0, 0, 12, // transform: last, len 12, ENCR, AES-CBC
            0x80, 14, 1, 0, // key length 256 (TV)
        ];
        assert_eq!(body(|o| sa.encode(o)), expected);
        assert_eq!(Sa::decode(&expected), Ok(sa));
    }

    #[test]
    fn rejects_truncated_sa() {
        assert_prefixes_rejected(&body(|o| ike_sa().encode(o)), Sa::decode);
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut b = body(|o| ike_sa().encode(o));
        b.push(0);
        assert_eq!(
            Sa::decode(&b),
            Err(InvalidMessage::TrailingBytes("last proposal"))
        );
    }

    #[test]
    fn rejects_bad_last_substructure_flags() {
        let good = body(|o| ike_sa().encode(o));
        let mut b = good.clone();
        b[0] = 0; // first proposal claims to be the last
        assert_eq!(
            Sa::decode(&b),
            Err(InvalidMessage::TrailingBytes("last proposal"))
        );
        let mut b = good.clone();
        b[0] = 3;
        assert_eq!(Sa::decode(&b), Err(InvalidMessage::InvalidValue("proposal")));
        let mut b = good;
        b[8] = 0; // first transform claims to be the last of three
        assert_eq!(
            Sa::decode(&b),
            Err(InvalidMessage::InvalidValue("transform count"))
        );
    }

    #[test]
    fn rejects_non_consecutive_proposal_numbers() {
        let mut sa = ike_sa();
        sa.proposals[1].number = 3;
        assert_eq!(
            Sa::decode(&body(|o| sa.encode(o))),
            Err(InvalidMessage::InvalidValue("proposal number"))
        );
        sa.proposals.truncate(1);
        sa.proposals[0].number = 5; // a responder echoes the chosen number
        assert_eq!(Sa::decode(&body(|o| sa.encode(o))), Ok(sa));
    }

    #[test]
    fn rejects_spi_size_not_matching_protocol() {
        let mut sa = ike_sa();
        sa.proposals[1].spi = &[1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(
            Sa::decode(&body(|o| sa.encode(o))),
            Err(InvalidMessage::BadLength("proposal SPI"))
        );
        sa.proposals[1].protocol = ProtocolId::IKE;
        assert!(Sa::decode(&body(|o| sa.encode(o))).is_ok());
    }

    #[test]
    fn rejects_impossible_lengths() {
        assert_eq!(
            Sa::decode(&[0, 0, 0, 3]),
            Err(InvalidMessage::BadLength("proposal"))
        );
        assert_eq!(
            Sa::decode(&[0, 0, 0, 9, 1, 1, 0, 0]),
            Err(InvalidMessage::Truncated("proposal"))
        );
        assert_eq!(Sa::decode(&[]), Err(InvalidMessage::Truncated("proposal")));
        // A TLV attribute longer than its transform.
        let b = [0, 0, 0, 20, 1, 1, 0, 1, 0, 0, 0, 12, 1, 0, 0, 12, 0, 14, 0, 9];
        assert_eq!(
            Sa::decode(&b),
            Err(InvalidMessage::Truncated("transform attribute"))
        );
    }
}
