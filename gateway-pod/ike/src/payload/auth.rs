//! Authentication payload (RFC 7296 section 3.8).

use crate::message::codepoints::AuthMethod;
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader};

/// AUTH payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Auth<'a> {
    /// Auth Method.
    pub method: AuthMethod,
    /// Authentication Data (verified by the crypto layer).
    pub data: &'a [u8],
}

impl<'a> Auth<'a> {
    /// Decodes an AUTH payload body.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let method = AuthMethod(r.u8().or_truncated("AUTH")?);
        r.take(3).or_truncated("AUTH")?;
        Ok(Self {
            method,
            data: r.rest(),
        })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.method.0, 0, 0, 0]);
        out.extend_from_slice(self.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::testing::{assert_prefixes_rejected, body};

    #[test]
    fn round_trip_and_truncation() {
        let auth = Auth {
            method: AuthMethod::PSK,
            data: &[3; 32],
        };
        let b = body(|o| auth.encode(o));
        assert_eq!(&b[..4], &[2, 0, 0, 0]);
        assert_eq!(Auth::decode(&b), Ok(auth));
        assert_prefixes_rejected(&b[..4], Auth::decode);
    }
}
