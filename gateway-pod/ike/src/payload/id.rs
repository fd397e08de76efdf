//! Identification payloads IDi and IDr (RFC 7296 section 3.5).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::message::codepoints::IdType;
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader};

/// An identity as carried in IDi/IDr. The textual types are kept as bytes: RFC 7296 says they
/// are ASCII without terminators, but a peer's claim is matched, not trusted, and
/// [`fmt::Display`] escapes anything unprintable for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity<'a> {
    /// ID_IPV4_ADDR.
    Ipv4(Ipv4Addr),
    /// ID_FQDN, e.g. `site-a.example.com`.
    Fqdn(&'a [u8]),
    /// ID_RFC822_ADDR, e.g. `gw@example.com`.
    Rfc822(&'a [u8]),
    /// ID_IPV6_ADDR.
    Ipv6(Ipv6Addr),
    /// ID_DER_ASN1_DN: a DER-encoded distinguished name (not parsed here).
    DerAsn1Dn(&'a [u8]),
    /// ID_KEY_ID: opaque octets.
    KeyId(&'a [u8]),
    /// Any other type, opaque.
    Other {
        /// ID Type.
        id_type: IdType,
        /// Identification Data.
        data: &'a [u8],
    },
}

impl<'a> Identity<'a> {
    /// The ID Type.
    pub fn id_type(&self) -> IdType {
        match self {
            Self::Ipv4(_) => IdType::IPV4_ADDR,
            Self::Fqdn(_) => IdType::FQDN,
            Self::Rfc822(_) => IdType::RFC822_ADDR,
            Self::Ipv6(_) => IdType::IPV6_ADDR,
            Self::DerAsn1Dn(_) => IdType::DER_ASN1_DN,
            Self::KeyId(_) => IdType::KEY_ID,
            Self::Other { id_type, .. } => *id_type,
        }
    }

    /// Decodes an IDi or IDr payload body.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let id_type = IdType(r.u8().or_truncated("ID")?);
        r.take(3).or_truncated("ID")?;
        let data = r.rest();
        Ok(match id_type {
            IdType::IPV4_ADDR => Self::Ipv4(
                <[u8; 4]>::try_from(data)
                    .map_err(|_| InvalidMessage::BadLength("ID_IPV4_ADDR"))?
                    .into(),
            ),
            IdType::IPV6_ADDR => Self::Ipv6(
                <[u8; 16]>::try_from(data)
                    .map_err(|_| InvalidMessage::BadLength("ID_IPV6_ADDR"))?
                    .into(),
            ),
            IdType::FQDN => Self::Fqdn(data),
            IdType::RFC822_ADDR => Self::Rfc822(data),
            IdType::DER_ASN1_DN => Self::DerAsn1Dn(data),
            IdType::KEY_ID => Self::KeyId(data),
            id_type => Self::Other { id_type, data },
        })
    }

    /// Appends the body. This is also the input of the AUTH computation (RFC 7296 section
    /// 2.15: the ID payload "excluding the fixed header").
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.id_type().0, 0, 0, 0]);
        match self {
            Self::Ipv4(a) => out.extend_from_slice(&a.octets()),
            Self::Ipv6(a) => out.extend_from_slice(&a.octets()),
            Self::Fqdn(d)
            | Self::Rfc822(d)
            | Self::DerAsn1Dn(d)
            | Self::KeyId(d)
            | Self::Other { data: d, .. } => out.extend_from_slice(d),
        }
    }
}

fn hex(f: &mut fmt::Formatter<'_>, data: &[u8]) -> fmt::Result {
    data.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

impl fmt::Display for Identity<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ipv4(a) => a.fmt(f),
            Self::Ipv6(a) => a.fmt(f),
            Self::Fqdn(d) | Self::Rfc822(d) => d.escape_ascii().fmt(f),
            Self::DerAsn1Dn(d) => {
                f.write_str("dn:")?;
                hex(f, d)
            }
            Self::KeyId(d) => {
                f.write_str("keyid:")?;
                hex(f, d)
            }
            Self::Other { id_type, data } => {
                write!(f, "{id_type}:")?;
                hex(f, data)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::testing::body;

    #[test]
    fn round_trip_every_kind() {
        let ids = [
            Identity::Ipv4(Ipv4Addr::new(192, 0, 2, 1)),
            Identity::Fqdn(b"site-a.example.com"),
            Identity::Rfc822(b"gw@example.com"),
            Identity::Ipv6("2001:db8::1".parse().unwrap()),
            Identity::DerAsn1Dn(&[0x30, 0]),
            Identity::KeyId(&[1, 2]),
            Identity::Other {
                id_type: IdType::NULL,
                data: &[],
            },
        ];
        for id in ids {
            let b = body(|o| id.encode(o));
            assert_eq!(b[0], id.id_type().0);
            assert_eq!(Identity::decode(&b), Ok(id));
        }
    }

    #[test]
    fn display_for_logs() {
        assert_eq!(
            Identity::Ipv4(Ipv4Addr::new(192, 0, 2, 1)).to_string(),
            "192.0.2.1"
        );
        assert_eq!(Identity::Fqdn(b"a.example\n\0").to_string(), "a.example\\n\\x00");
        assert_eq!(Identity::KeyId(&[0xab, 1]).to_string(), "keyid:ab01");
        assert_eq!(
            Identity::Other {
                id_type: IdType(200),
                data: &[1]
            }
            .to_string(),
            "IdType(200):01"
        );
    }

    #[test]
    fn rejects_truncated_id_and_bad_address_lengths() {
        for n in 0..4 {
            assert_eq!(
                Identity::decode(&[2, 0, 0, 0][..n]),
                Err(InvalidMessage::Truncated("ID"))
            );
        }
        assert_eq!(
            Identity::decode(&[1, 0, 0, 0, 1, 2, 3]),
            Err(InvalidMessage::BadLength("ID_IPV4_ADDR"))
        );
        assert_eq!(
            Identity::decode(&[1, 0, 0, 0, 1, 2, 3, 4, 5]),
            Err(InvalidMessage::BadLength("ID_IPV4_ADDR"))
        );
        assert_eq!(
            Identity::decode(&[5, 0, 0, 0, 1]),
            Err(InvalidMessage::BadLength("ID_IPV6_ADDR"))
        );
    }
}
