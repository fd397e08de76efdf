//! Certificate and Certificate Request payloads (RFC 7296 sections 3.6 and 3.7), opaque here.

use crate::message::codepoints::CertEncoding;

codepoint_and_data! {
    /// CERT payload.
    Cert, "CERT" {
        /// Cert Encoding.
        encoding: CertEncoding(u8), reserved 0,
        /// Certificate Data.
        data,
    }
}

codepoint_and_data! {
    /// CERTREQ payload.
    CertReq, "CERTREQ" {
        /// Cert Encoding.
        encoding: CertEncoding(u8), reserved 0,
        /// Certification Authority (for X.509: concatenated SHA-1 hashes of trusted CA keys).
        authority,
    }
}
