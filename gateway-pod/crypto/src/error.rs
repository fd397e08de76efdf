//! The two error types: set-up errors (keys, key exchange, derivation) and per-packet errors.

use thiserror::Error;

/// Errors from key derivation, key set-up and key exchange. Messages never contain key bytes.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// prf+ was asked for more than 255 PRF outputs (RFC 7296 §2.13).
    #[error("prf+ output of {requested} bytes exceeds 255 blocks of {block} bytes")]
    PrfPlusTooLong {
        /// Bytes requested.
        requested: usize,
        /// PRF output length.
        block: usize,
    },
    /// A transform this crate does not implement (e.g. an AES key length other than 128/256).
    #[error("unsupported transform: {0}")]
    Unsupported(&'static str),
    /// A key (or key + salt) of the wrong length for its transform.
    #[error("key material for {what} must be {expected} bytes, got {got}")]
    KeyLength {
        /// Which key.
        what: &'static str,
        /// Required length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// The peer's KE payload data has the wrong length for the group.
    #[error("key exchange data for group {group} must be {expected} bytes, got {got}")]
    PublicValueLength {
        /// IANA group number.
        group: u16,
        /// Required length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// The peer's public value failed validation (0, 1, p-1 or >= p for MODP; not on the
    /// curve for ECP) or the shared secret is degenerate (all-zero X25519 output).
    #[error("invalid peer public value for group {group}")]
    InvalidPublicValue {
        /// IANA group number.
        group: u16,
    },
    /// The system random generator or AWS-LC failed internally.
    #[error("cryptographic library failure")]
    Internal,
}

/// Per-packet failures (SK payload and ESP seal/open): fieldless, cheap to return and count.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq, Hash)]
pub enum PacketError {
    /// The buffer is shorter than IV + ICV (+ one block for CBC), or not laid out as the
    /// cipher requires (CBC ciphertext not a multiple of the block size, wrong room for the
    /// tag or padding when sealing).
    #[error("malformed or truncated encrypted data")]
    Malformed,
    /// The integrity check value (AEAD tag or HMAC ICV) did not verify.
    #[error("integrity check failed")]
    IcvMismatch,
    /// The decrypted Pad Length points before the start of the plaintext.
    #[error("bad padding")]
    BadPadding,
    /// The explicit-IV counter of this key is used up: rekey.
    #[error("IV space exhausted; rekey")]
    IvExhausted,
    /// AWS-LC failed (should not happen with valid keys).
    #[error("cryptographic library failure")]
    Internal,
}
