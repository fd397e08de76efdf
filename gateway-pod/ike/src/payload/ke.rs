//! Key Exchange payload (RFC 7296 section 3.4).

use crate::message::codepoints::DhGroup;

codepoint_and_data! {
    /// KE payload: the group and the sender's public value.
    Ke, "KE" {
        /// Diffie-Hellman Group Num.
        group: DhGroup(u16), reserved 2,
        /// Key Exchange Data (its length is checked against the group by the crypto layer).
        data,
    }
}
