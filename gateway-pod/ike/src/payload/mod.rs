//! Payloads (RFC 7296 sections 3.2 to 3.16, RFC 7383 section 2.5) and the payload chain.
//!
//! Each payload type decodes from its body (the bytes after the generic payload header) with
//! `decode(body)`, which must consume the body exactly, and encodes its body with
//! `encode(&self, out)`. [`decode_chain`] and [`encode_chain`] handle the generic headers.

/// Defines a payload whose body is a fixed header, one codepoint then `$reserved` reserved
/// octets (sent as zero, ignored on receipt), followed by opaque data for the layer above:
/// the struct, its `decode` and its `encode`.
macro_rules! codepoint_and_data {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $(#[$kind_meta:meta])*
            $kind:ident: $codepoint:ident($int:ty), reserved $reserved:literal,
            $(#[$data_meta:meta])*
            $data:ident,
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name<'a> {
            $(#[$kind_meta])*
            pub $kind: $codepoint,
            $(#[$data_meta])*
            pub $data: &'a [u8],
        }

        impl<'a> $name<'a> {
            #[doc = concat!("Decodes the body of a ", $what, " payload.")]
            pub fn decode(body: &'a [u8]) -> Result<Self, $crate::message::error::InvalidMessage> {
                use $crate::message::reader::OrTruncated;
                let mut r = $crate::message::reader::Reader::new(body);
                let $kind = $codepoint(<$int>::from_be_bytes(r.array().or_truncated($what)?));
                r.take($reserved).or_truncated($what)?;
                Ok(Self {
                    $kind,
                    $data: r.rest(),
                })
            }

            /// Appends the body.
            pub fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.$kind.0.to_be_bytes());
                out.extend_from_slice(&[0; $reserved]);
                out.extend_from_slice(self.$data);
            }
        }
    };
}

mod auth;
mod cert;
mod cp;
mod delete;
mod eap;
mod id;
mod ke;
mod nonce;
mod notify;
mod sa;
mod sk;
mod ts;
mod vendor;

pub use auth::Auth;
pub use cert::{Cert, CertReq};
pub use cp::{CfgAttribute, Cp};
pub use delete::Delete;
pub use eap::Eap;
pub use id::Identity;
pub use ke::Ke;
pub use nonce::{NONCE_LEN, Nonce};
pub use notify::Notify;
pub use sa::{Attribute, AttributeValue, Proposal, Sa, Transform};
pub use sk::{Sk, Skf};
pub use ts::{TrafficSelector, Ts, TsRange};
pub use vendor::Vendor;

use crate::message::codepoints::PayloadType;
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader, with_u16_len};

/// The critical bit of the generic payload header.
const CRITICAL: u8 = 0x80;

/// One payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    /// Security Association.
    Sa(Sa<'a>),
    /// Key Exchange.
    Ke(Ke<'a>),
    /// Identification - Initiator.
    IdI(Identity<'a>),
    /// Identification - Responder.
    IdR(Identity<'a>),
    /// Certificate.
    Cert(Cert<'a>),
    /// Certificate Request.
    CertReq(CertReq<'a>),
    /// Authentication.
    Auth(Auth<'a>),
    /// Nonce.
    Nonce(Nonce<'a>),
    /// Notify.
    Notify(Notify<'a>),
    /// Delete.
    Delete(Delete),
    /// Vendor ID.
    Vendor(Vendor<'a>),
    /// Traffic Selector - Initiator.
    TsI(Ts<'a>),
    /// Traffic Selector - Responder.
    TsR(Ts<'a>),
    /// Encrypted and Authenticated (always last).
    Sk(Sk<'a>),
    /// Encrypted and Authenticated Fragment (always last).
    Skf(Skf<'a>),
    /// Configuration.
    Cp(Cp<'a>),
    /// Extensible Authentication.
    Eap(Eap<'a>),
    /// A payload of a type this crate does not know, sent without the critical bit: the
    /// engine ignores it (RFC 7296 section 2.5), logs may show it.
    Unknown {
        /// Its type.
        payload_type: PayloadType,
        /// Its body.
        body: &'a [u8],
    },
}

impl Payload<'_> {
    /// The payload type, as it appears in the previous payload's next-payload field.
    pub fn payload_type(&self) -> PayloadType {
        match self {
            Self::Sa(_) => PayloadType::SA,
            Self::Ke(_) => PayloadType::KE,
            Self::IdI(_) => PayloadType::IDI,
            Self::IdR(_) => PayloadType::IDR,
            Self::Cert(_) => PayloadType::CERT,
            Self::CertReq(_) => PayloadType::CERTREQ,
            Self::Auth(_) => PayloadType::AUTH,
            Self::Nonce(_) => PayloadType::NONCE,
            Self::Notify(_) => PayloadType::NOTIFY,
            Self::Delete(_) => PayloadType::DELETE,
            Self::Vendor(_) => PayloadType::VENDOR,
            Self::TsI(_) => PayloadType::TSI,
            Self::TsR(_) => PayloadType::TSR,
            Self::Sk(_) => PayloadType::SK,
            Self::Skf(_) => PayloadType::SKF,
            Self::Cp(_) => PayloadType::CP,
            Self::Eap(_) => PayloadType::EAP,
            Self::Unknown { payload_type, .. } => *payload_type,
        }
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Self::Sa(p) => p.encode(out),
            Self::Ke(p) => p.encode(out),
            Self::IdI(p) | Self::IdR(p) => p.encode(out),
            Self::Cert(p) => p.encode(out),
            Self::CertReq(p) => p.encode(out),
            Self::Auth(p) => p.encode(out),
            Self::Nonce(p) => p.encode(out),
            Self::Notify(p) => p.encode(out),
            Self::Delete(p) => p.encode(out),
            Self::Vendor(p) => p.encode(out),
            Self::TsI(p) | Self::TsR(p) => p.encode(out),
            Self::Sk(p) => p.encode(out),
            Self::Skf(p) => p.encode(out),
            Self::Cp(p) => p.encode(out),
            Self::Eap(p) => p.encode(out),
            Self::Unknown { body, .. } => out.extend_from_slice(body),
        }
    }
}

/// Decodes the payload chain of a message: `first` is the header's next-payload field, `data`
/// everything after the header.
pub fn decode_chain(first: PayloadType, data: &[u8]) -> Result<Vec<Payload<'_>>, InvalidMessage> {
    walk(first, data, false)
}

/// Decodes the payloads inside a decrypted SK payload (or reassembled SKF fragments): `first`
/// is the SK payload's [`Sk::first_inner`].
pub fn decode_inner_chain(first: PayloadType, data: &[u8]) -> Result<Vec<Payload<'_>>, InvalidMessage> {
    walk(first, data, true)
}

fn walk(first: PayloadType, data: &[u8], inner: bool) -> Result<Vec<Payload<'_>>, InvalidMessage> {
    let mut r = Reader::new(data);
    let mut payloads = Vec::new();
    let mut this = first;
    while this != PayloadType::NONE {
        // RFC 7296 section 3.2, Figure 5: Next Payload (1), C + RESERVED (1), Payload Length (2).
        let next = PayloadType(r.u8().or_truncated("generic payload header")?);
        let critical = r.u8().or_truncated("generic payload header")? & CRITICAL != 0;
        let length = r.u16().or_truncated("generic payload header")?;
        let body_len = usize::from(length)
            .checked_sub(4)
            .ok_or(InvalidMessage::BadLength("payload"))?;
        let body = r.take(body_len).or_truncated("payload")?;
        let payload = match this {
            PayloadType::SA => Payload::Sa(Sa::decode(body)?),
            PayloadType::KE => Payload::Ke(Ke::decode(body)?),
            PayloadType::IDI => Payload::IdI(Identity::decode(body)?),
            PayloadType::IDR => Payload::IdR(Identity::decode(body)?),
            PayloadType::CERT => Payload::Cert(Cert::decode(body)?),
            PayloadType::CERTREQ => Payload::CertReq(CertReq::decode(body)?),
            PayloadType::AUTH => Payload::Auth(Auth::decode(body)?),
            PayloadType::NONCE => Payload::Nonce(Nonce::decode(body)?),
            PayloadType::NOTIFY => Payload::Notify(Notify::decode(body)?),
            PayloadType::DELETE => Payload::Delete(Delete::decode(body)?),
            PayloadType::VENDOR => Payload::Vendor(Vendor::decode(body)?),
            PayloadType::TSI => Payload::TsI(Ts::decode(body)?),
            PayloadType::TSR => Payload::TsR(Ts::decode(body)?),
            PayloadType::CP => Payload::Cp(Cp::decode(body)?),
            PayloadType::EAP => Payload::Eap(Eap::decode(body)?),
            // RFC 7296 section 3.14: "The Encrypted payload, if present in a message, MUST be
            // the last payload in the message." Its next-payload field names the first inner
            // payload, so the outer chain ends here. Section 3.1 (RFC 4306): "an Encrypted
            // payload MUST NOT contain another Encrypted payload."
            PayloadType::SK | PayloadType::SKF => {
                if inner || !r.is_empty() {
                    return Err(InvalidMessage::MisplacedEncrypted);
                }
                payloads.push(match this {
                    PayloadType::SK => Payload::Sk(Sk {
                        first_inner: next,
                        body,
                    }),
                    _ => Payload::Skf(Skf::decode(next, body)?),
                });
                break;
            }
            // RFC 7296 section 3.2, Critical: "MUST be set to zero if the sender wants the
            // recipient to skip this payload if it does not understand the payload type code
            // [...]. MUST be set to one if the sender wants the recipient to reject this entire
            // message if it does not understand the payload type." Section 2.5: the response
            // "MUST include a Notify payload UNSUPPORTED_CRITICAL_PAYLOAD".
            unknown if critical => return Err(InvalidMessage::UnsupportedCriticalPayload(unknown)),
            unknown => Payload::Unknown {
                payload_type: unknown,
                body,
            },
        };
        payloads.push(payload);
        this = next;
    }
    r.finish("payload chain")?;
    Ok(payloads)
}

/// Appends `payloads` with their generic headers: each next-payload field names the following
/// payload (an SK or SKF payload names its first inner payload instead, so it must be last),
/// the critical bit is clear (every payload this crate sends is one the base protocol defines).
pub fn encode_chain(payloads: &[Payload<'_>], out: &mut Vec<u8>) {
    for (i, payload) in payloads.iter().enumerate() {
        let next = match payload {
            Payload::Sk(sk) => sk.first_inner,
            Payload::Skf(skf) => skf.first_inner,
            _ => payloads
                .get(i + 1)
                .map_or(PayloadType::NONE, Payload::payload_type),
        };
        out.extend_from_slice(&[next.0, 0]);
        with_u16_len(out, 2, |out| payload.encode_body(out));
    }
}

/// `len` as one octet; encoders saturate, callers never build lists that long.
fn len_u8(len: usize) -> u8 {
    u8::try_from(len).unwrap_or(u8::MAX)
}

/// Test helpers shared by the payload tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The body `encode` writes.
    pub(crate) fn body(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out);
        out
    }

    /// `wire` (what `value` encodes to) starts with `header`, decodes back to `value`, and every
    /// strict prefix of `header` fails to decode.
    pub(crate) fn assert_round_trip<'a, T: std::fmt::Debug + PartialEq>(
        wire: &'a [u8],
        header: &[u8],
        value: T,
        decode: impl Fn(&'a [u8]) -> Result<T, InvalidMessage>,
    ) {
        assert_eq!(&wire[..header.len()], header);
        assert_eq!(decode(wire), Ok(value));
        assert_prefixes_rejected(&wire[..header.len()], decode);
    }

    /// Every strict prefix of `body` fails to decode (without panicking).
    pub(crate) fn assert_prefixes_rejected<'a, T: std::fmt::Debug>(
        body: &'a [u8],
        decode: impl Fn(&'a [u8]) -> Result<T, InvalidMessage>,
    ) {
        for n in 0..body.len() {
            assert!(
                decode(&body[..n]).is_err(),
                "prefix of {n} bytes decoded: {:?}",
                decode(&body[..n])
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{assert_round_trip, body};
    use super::*;
    use crate::message::codepoints::{AuthMethod, CertEncoding, DhGroup};

    /// The payloads `codepoint_and_data!` defines.
    #[test]
    fn codepoint_and_data_round_trip_and_truncation() {
        let auth = Auth {
            method: AuthMethod::PSK,
            data: &[3; 32],
        };
        assert_round_trip(&body(|o| auth.encode(o)), &[2, 0, 0, 0], auth, Auth::decode);
        let ke = Ke {
            group: DhGroup::CURVE25519,
            data: &[7; 32],
        };
        assert_round_trip(&body(|o| ke.encode(o)), &[0, 31, 0, 0], ke, Ke::decode);
        let cert = Cert {
            encoding: CertEncoding::X509_SIGNATURE,
            data: &[0x30, 0x82],
        };
        assert_round_trip(&body(|o| cert.encode(o)), &[4], cert, Cert::decode);
        let req = CertReq {
            encoding: CertEncoding::X509_SIGNATURE,
            authority: &[1; 20],
        };
        assert_round_trip(&body(|o| req.encode(o)), &[4], req, CertReq::decode);
        assert_eq!(Cert::decode(&[]), Err(InvalidMessage::Truncated("CERT")));
        assert_eq!(CertReq::decode(&[]), Err(InvalidMessage::Truncated("CERTREQ")));
    }

    #[test]
    fn skips_unknown_non_critical_payload_and_rejects_critical_one() {
        // Vendor ID, then unknown type 200 (non-critical), then nothing.
        let data = [200, 0, 0, 5, 0xaa, 0, 0, 0, 6, 1, 2];
        let payloads = decode_chain(PayloadType::VENDOR, &data).unwrap();
        assert_eq!(
            payloads,
            [
                Payload::Vendor(Vendor { id: &[0xaa] }),
                Payload::Unknown {
                    payload_type: PayloadType(200),
                    body: &[1, 2]
                },
            ]
        );
        let mut again = Vec::new();
        encode_chain(&payloads, &mut again);
        assert_eq!(again, data);

        let critical = [200, 0, 0, 5, 0xaa, 0, 0x80, 0, 6, 1, 2];
        assert_eq!(
            decode_chain(PayloadType::VENDOR, &critical),
            Err(InvalidMessage::UnsupportedCriticalPayload(PayloadType(200)))
        );
    }

    #[test]
    fn critical_bit_on_a_known_payload_is_ignored() {
        let data = [0, 0x80, 0, 5, 0xaa];
        assert_eq!(
            decode_chain(PayloadType::VENDOR, &data),
            Ok(vec![Payload::Vendor(Vendor { id: &[0xaa] })])
        );
    }

    #[test]
    fn rejects_payload_length_below_header() {
        for len in 0..4 {
            assert_eq!(
                decode_chain(PayloadType::VENDOR, &[0, 0, 0, len]),
                Err(InvalidMessage::BadLength("payload"))
            );
        }
        assert_eq!(
            decode_chain(PayloadType::VENDOR, &[0, 0, 0, 9, 1]),
            Err(InvalidMessage::Truncated("payload"))
        );
    }

    #[test]
    fn rejects_encrypted_payload_inside_encrypted_payload() {
        let data = [0, 0, 0, 4];
        assert!(decode_chain(PayloadType::SK, &data).is_ok());
        assert_eq!(
            decode_inner_chain(PayloadType::SK, &data),
            Err(InvalidMessage::MisplacedEncrypted)
        );
    }
}
