//! EAP payload (RFC 7296 section 3.16), opaque here.

use crate::message::error::InvalidMessage;

/// EAP payload: one EAP message (code, identifier, length, type, data), handed to the EAP
/// method as is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Eap<'a> {
    /// The EAP message.
    pub message: &'a [u8],
}

impl<'a> Eap<'a> {
    /// Decodes an EAP payload body; the EAP message needs at least its 4-octet header.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        if body.len() < 4 {
            return Err(InvalidMessage::Truncated("EAP"));
        }
        Ok(Self { message: body })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.message);
    }
}
