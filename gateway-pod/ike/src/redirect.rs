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

use crate::Message;
use crate::message::codepoints::{ExchangeType, NotifyType};
use crate::message::error::InvalidMessage;
use crate::message::header::Flags;
use crate::payload::Payload;

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

/// What an IKE_SA_INIT request says about RFC 5685 redirects: a fleet's director reads it
/// to decide whether to answer with N(REDIRECT) or to let a member serve the site.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InitRedirect<'a> {
    /// The initiator announced N(REDIRECT_SUPPORTED).
    pub supported: bool,
    /// The initiator sent N(REDIRECTED_FROM): another gateway sent it here.
    pub redirected: bool,
    /// The gateway N(REDIRECTED_FROM) names, when its data decodes.
    pub from: Option<GatewayId>,
    /// Ni, which a REDIRECT in IKE_SA_INIT must echo.
    pub nonce: Option<&'a [u8]>,
}

impl<'a> InitRedirect<'a> {
    /// Reads `msg`'s notifies and nonce; a REDIRECTED_FROM whose data does not decode
    /// still counts as `redirected` (the initiator was sent here, whatever it wrote).
    pub fn of(msg: &Message<'a>) -> Self {
        let mut r = Self::default();
        for p in &msg.payloads {
            match p {
                Payload::Notify(n) if n.notify_type == NotifyType::REDIRECT_SUPPORTED => r.supported = true,
                Payload::Notify(n) if n.notify_type == NotifyType::REDIRECTED_FROM => {
                    r.redirected = true;
                    r.from = decode_redirected_from(n.data).ok();
                }
                Payload::Nonce(n) => r.nonce = Some(n.data),
                _ => {}
            }
        }
        r
    }

    /// Whether the initiator can be sent elsewhere now: it supports redirects, was not sent
    /// here by a redirect already, and gave the nonce the answer must carry.
    pub fn redirectable(&self) -> bool {
        self.supported && !self.redirected && self.nonce.is_some()
    }
}

/// Reads an IKE_SA_INIT request (no responder SPI, not a response) for [`InitRedirect`];
/// `None` for anything else, including what does not decode.
pub fn inspect_init(datagram: &[u8]) -> Option<InitRedirect<'_>> {
    init_redirect_of(&Message::decode(datagram).ok()?)
}

/// [`inspect_init`] of a decoded message.
pub fn init_redirect_of<'a>(msg: &Message<'a>) -> Option<InitRedirect<'a>> {
    let h = &msg.header;
    if h.exchange != ExchangeType::IKE_SA_INIT || h.spi_r != 0 || h.flags.contains(Flags::RESPONSE) {
        return None;
    }
    Some(InitRedirect::of(msg))
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

    fn init_request(notifies: &[(NotifyType, &[u8])], nonce: Option<&[u8]>) -> Vec<u8> {
        use crate::payload::{Nonce, Notify};
        let mut payloads: Vec<Payload<'_>> = notifies
            .iter()
            .map(|(t, d)| Payload::Notify(Notify::new(*t, d)))
            .collect();
        if let Some(data) = nonce {
            payloads.push(Payload::Nonce(Nonce { data }));
        }
        Message {
            header: crate::message::header::Header::new(7, 0, ExchangeType::IKE_SA_INIT, Flags::INITIATOR, 0),
            payloads,
        }
        .to_vec()
    }

    #[test]
    fn inspects_what_an_init_request_says_about_redirects() {
        let nonce = [5u8; 32];
        let fresh = init_request(&[(NotifyType::REDIRECT_SUPPORTED, &[])], Some(&nonce));
        let r = inspect_init(&fresh).unwrap();
        assert!(r.supported && !r.redirected && r.redirectable());
        assert_eq!(r.nonce, Some(&nonce[..]));

        let from = encode_redirected_from(&GatewayId::Ip("192.0.2.2".parse().unwrap()));
        let sent_here = init_request(&[(NotifyType::REDIRECTED_FROM, &from)], Some(&nonce));
        let r = inspect_init(&sent_here).unwrap();
        assert!(r.redirected && !r.redirectable());
        assert_eq!(r.from, Some(GatewayId::Ip("192.0.2.2".parse().unwrap())));

        let garbled = init_request(&[(NotifyType::REDIRECTED_FROM, &[1, 9])], Some(&nonce));
        let r = inspect_init(&garbled).unwrap();
        assert!(r.redirected && r.from.is_none());

        let plain = init_request(&[], Some(&nonce));
        assert!(!inspect_init(&plain).unwrap().redirectable());
        let no_nonce = init_request(&[(NotifyType::REDIRECT_SUPPORTED, &[])], None);
        assert!(!inspect_init(&no_nonce).unwrap().redirectable());
        assert!(inspect_init(&fresh[..20]).is_none());
        assert!(inspect_init(b"").is_none());
    }

    #[test]
    fn the_init_response_echoes_the_nonce_and_names_the_gateway() {
        let nonce = [6u8; 24];
        let fresh = init_request(&[(NotifyType::REDIRECT_SUPPORTED, &[])], Some(&nonce));
        let gw = GatewayId::Ip("192.0.2.21".parse().unwrap());
        let msg = Message::decode(&fresh).unwrap();
        let answer = crate::endpoint::init_redirect_response(&msg, &gw).unwrap();
        let answer = Message::decode(&answer).unwrap();
        assert!(answer.header.flags.contains(Flags::RESPONSE));
        assert_eq!((answer.header.spi_i, answer.header.spi_r), (7, 0));
        let Some(Payload::Notify(n)) = answer.payloads.first() else {
            panic!("no notify in {answer:?}");
        };
        assert_eq!(n.notify_type, NotifyType::REDIRECT);
        assert_eq!(decode_redirect(n.data).unwrap(), (gw.clone(), &nonce[..]));
        let plain = init_request(&[], Some(&nonce));
        assert!(crate::endpoint::init_redirect_response(&Message::decode(&plain).unwrap(), &gw).is_none());
    }
}
