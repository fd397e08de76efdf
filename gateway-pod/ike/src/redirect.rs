//! The notification data of RFC 5685 (redirect mechanism for IKEv2): the gateway identity in
//! N(REDIRECT) and N(REDIRECTED_FROM), and the nonce that binds a REDIRECT in IKE_SA_INIT to
//! the request it answers (an unprotected message, so the initiator checks that the nonce is
//! its own Ni before following it).
//!
//! ```text
//! REDIRECT:        GW Ident Type (1) | GW Ident Len (1) | New Responder GW Identity | Nonce Data
//! REDIRECTED_FROM: GW Ident Type (1) | GW Ident Len (1) | Original Responder GW Identity
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::message::error::InvalidMessage;

/// GW Ident Type values (RFC 5685 §10).
const IPV4: u8 = 1;
const IPV6: u8 = 2;
const FQDN: u8 = 3;

/// The gateway a REDIRECT points to (or a REDIRECTED_FROM names).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GatewayId {
    /// An address.
    Ip(IpAddr),
    /// A name the initiator resolves.
    Fqdn(String),
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(a) => a.fmt(f),
            Self::Fqdn(n) => f.write_str(n),
        }
    }
}

impl GatewayId {
    /// Appends GW Ident Type, GW Ident Len and the identity.
    fn encode(&self, out: &mut Vec<u8>) {
        let (kind, bytes): (u8, Vec<u8>) = match self {
            Self::Ip(IpAddr::V4(a)) => (IPV4, a.octets().to_vec()),
            Self::Ip(IpAddr::V6(a)) => (IPV6, a.octets().to_vec()),
            // A name longer than 255 octets cannot be carried; it is cut at a character
            // boundary rather than mis-framed (configuration validation keeps names short).
            Self::Fqdn(n) => (FQDN, n.as_bytes().iter().copied().take(255).collect()),
        };
        out.push(kind);
        out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&bytes);
    }

    /// Reads a gateway identity; returns it and the bytes after it.
    fn decode(data: &[u8]) -> Result<(Self, &[u8]), InvalidMessage> {
        let [kind, len, rest @ ..] = data else {
            return Err(InvalidMessage::Truncated("redirect gateway identity"));
        };
        let len = usize::from(*len);
        let (ident, rest) = if rest.len() >= len {
            rest.split_at(len)
        } else {
            return Err(InvalidMessage::Truncated("redirect gateway identity"));
        };
        let id = match (*kind, ident.len()) {
            (IPV4, 4) => {
                let mut a = [0u8; 4];
                a.copy_from_slice(ident);
                Self::Ip(IpAddr::V4(Ipv4Addr::from(a)))
            }
            (IPV6, 16) => {
                let mut a = [0u8; 16];
                a.copy_from_slice(ident);
                Self::Ip(IpAddr::V6(Ipv6Addr::from(a)))
            }
            (FQDN, 1..) => Self::Fqdn(
                std::str::from_utf8(ident)
                    .map_err(|_| InvalidMessage::InvalidValue("redirect gateway name is not UTF-8"))?
                    .to_owned(),
            ),
            _ => {
                return Err(InvalidMessage::InvalidValue(
                    "redirect gateway identity type or length",
                ));
            }
        };
        Ok((id, rest))
    }
}

/// N(REDIRECT) data: the new gateway and, in IKE_SA_INIT, the initiator's nonce.
pub fn encode_redirect(gateway: &GatewayId, nonce: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    gateway.encode(&mut out);
    out.extend_from_slice(nonce.unwrap_or_default());
    out
}

/// Decodes N(REDIRECT) data into the new gateway and the nonce data (empty when absent).
pub fn decode_redirect(data: &[u8]) -> Result<(GatewayId, &[u8]), InvalidMessage> {
    GatewayId::decode(data)
}

/// N(REDIRECTED_FROM) data: the gateway that redirected the initiator here.
pub fn encode_redirected_from(gateway: &GatewayId) -> Vec<u8> {
    let mut out = Vec::new();
    gateway.encode(&mut out);
    out
}

/// Decodes N(REDIRECTED_FROM) data; trailing bytes are an error.
pub fn decode_redirected_from(data: &[u8]) -> Result<GatewayId, InvalidMessage> {
    match GatewayId::decode(data)? {
        (id, []) => Ok(id),
        _ => Err(InvalidMessage::TrailingBytes("REDIRECTED_FROM")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_identity_kind() {
        for gw in [
            GatewayId::Ip("192.0.2.7".parse().unwrap()),
            GatewayId::Ip("2001:db8::7".parse().unwrap()),
            GatewayId::Fqdn("gw-2.example.net".into()),
        ] {
            let nonce = [9u8; 32];
            let data = encode_redirect(&gw, Some(&nonce));
            assert_eq!(decode_redirect(&data).unwrap(), (gw.clone(), &nonce[..]));
            let data = encode_redirect(&gw, None);
            assert_eq!(decode_redirect(&data).unwrap(), (gw.clone(), &[][..]));
            assert_eq!(decode_redirected_from(&encode_redirected_from(&gw)).unwrap(), gw);
        }
    }

    #[test]
    fn the_wire_format_is_rfc_5685s() {
        let data = encode_redirect(&GatewayId::Ip("192.0.2.7".parse().unwrap()), Some(&[0xaa, 0xbb]));
        assert_eq!(data, [1, 4, 192, 0, 2, 7, 0xaa, 0xbb]);
    }

    #[test]
    fn rejects_malformed_data_without_panicking() {
        for bad in [
            &[][..],
            &[1],
            &[1, 4, 1, 2, 3],
            &[1, 3, 1, 2, 3],
            &[2, 4, 1, 2, 3, 4],
            &[3, 0],
            &[3, 2, 0xff, 0xfe],
            &[9, 1, 0],
        ] {
            assert!(decode_redirect(bad).is_err(), "{bad:?}");
        }
        assert!(decode_redirected_from(&[1, 4, 1, 2, 3, 4, 5]).is_err());
    }
}
