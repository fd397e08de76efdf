//! Vendor ID payload (RFC 7296 section 3.12).

use crate::message::error::InvalidMessage;

/// V payload: an opaque vendor identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vendor<'a> {
    /// Vendor ID.
    pub id: &'a [u8],
}

impl<'a> Vendor<'a> {
    /// Decodes a Vendor ID payload body (anything goes).
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        Ok(Self { id: body })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.id);
    }
}
