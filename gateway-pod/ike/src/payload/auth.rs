//! Authentication payload (RFC 7296 section 3.8).

use crate::message::codepoints::AuthMethod;

codepoint_and_data! {
    /// AUTH payload.
    Auth, "AUTH" {
        /// Auth Method.
        method: AuthMethod(u8), reserved 3,
        /// Authentication Data (verified by the crypto layer).
        data,
    }
}
