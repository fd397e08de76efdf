//! Small primitives the IKE engine needs without depending on aws-lc-rs itself: SHA-1 for
//! NAT detection (RFC 7296 §2.23), the system random generator, and constant-time comparison.

use aws_lc_rs::{constant_time, digest, rand};

use crate::error::CryptoError;

/// Length of a SHA-1 digest.
pub const SHA1_LEN: usize = 20;

/// SHA-1 over the concatenation of `parts`. Only for NAT_DETECTION_*_IP hashes, where
/// RFC 7296 §2.23 fixes SHA-1 ("the SHA-1 digest of the SPIs (in the order they appear in
/// the header), IP address, and port"); it is not used for anything security-relevant.
pub fn sha1(parts: &[&[u8]]) -> [u8; SHA1_LEN] {
    let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; SHA1_LEN];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Length of a SHA-256 digest.
pub const SHA256_LEN: usize = 32;

/// SHA-256 of `data`: how the engine recognises a retransmitted request without keeping
/// its bytes (RFC 7296 §2.1: a retransmission is "bitwise identical" to the original).
pub fn sha256(data: &[u8]) -> [u8; SHA256_LEN] {
    let mut out = [0u8; SHA256_LEN];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

/// Fills `buf` from the system random generator (AWS-LC).
/// # Errors
/// [`CryptoError::Internal`] if the generator fails.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    rand::fill(buf).map_err(|_| CryptoError::Internal)
}

/// Whether `a == b`, in time independent of the contents (lengths are not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    constant_time::verify_slices_are_equal(a, b).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answer() {
        // FIPS 180-2 Appendix B.1: SHA-256("abc").
        assert_eq!(
            sha256(b"abc")[..8],
            [0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea],
            "SHA-256 of abc starts ba7816bf 8f01cfea"
        );
    }

    #[test]
    fn sha1_known_answer() {
        // FIPS 180-2 appendix A.1: SHA-1("abc").
        let d = sha1(&[b"a", b"bc"]);
        assert_eq!(
            d,
            [
                0xa9, 0x99, 0x3e, 0x36, 0x47, 0x06, 0x81, 0x6a, 0xba, 0x3e, 0x25, 0x71, 0x78, 0x50, 0xc2,
                0x6c, 0x9c, 0xd0, 0xd8, 0x9d
            ]
        );
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
