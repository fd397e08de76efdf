//! Certificate and Certificate Request payloads (RFC 7296 sections 3.6 and 3.7), opaque here.

use crate::message::codepoints::CertEncoding;
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader};

/// CERT payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cert<'a> {
    /// Cert Encoding.
    pub encoding: CertEncoding,
    /// Certificate Data.
    pub data: &'a [u8],
}

/// CERTREQ payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertReq<'a> {
    /// Cert Encoding.
    pub encoding: CertEncoding,
    /// Certification Authority (for X.509: concatenated SHA-1 hashes of trusted CA keys).
    pub authority: &'a [u8],
}

fn decode<'a>(body: &'a [u8], what: &'static str) -> Result<(CertEncoding, &'a [u8]), InvalidMessage> {
    let mut r = Reader::new(body);
    Ok((CertEncoding(r.u8().or_truncated(what)?), r.rest()))
}

impl<'a> Cert<'a> {
    /// Decodes a CERT payload body.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let (encoding, data) = decode(body, "CERT")?;
        Ok(Self { encoding, data })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.encoding.0);
        out.extend_from_slice(self.data);
    }
}

impl<'a> CertReq<'a> {
    /// Decodes a CERTREQ payload body.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let (encoding, authority) = decode(body, "CERTREQ")?;
        Ok(Self { encoding, authority })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.encoding.0);
        out.extend_from_slice(self.authority);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::testing::body;

    #[test]
    fn round_trip_and_truncation() {
        let cert = Cert {
            encoding: CertEncoding::X509_SIGNATURE,
            data: &[0x30, 0x82],
        };
        assert_eq!(Cert::decode(&body(|o| cert.encode(o))), Ok(cert));
        let req = CertReq {
            encoding: CertEncoding::X509_SIGNATURE,
            authority: &[1; 20],
        };
        assert_eq!(CertReq::decode(&body(|o| req.encode(o))), Ok(req));
        assert_eq!(Cert::decode(&[]), Err(InvalidMessage::Truncated("CERT")));
        assert_eq!(CertReq::decode(&[]), Err(InvalidMessage::Truncated("CERTREQ")));
    }
}
