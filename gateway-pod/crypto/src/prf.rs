//! The negotiated PRF (PRF_HMAC_SHA2_256/384/512, RFC 4868), prf+ (RFC 7296 §2.13) and the
//! truncated HMAC integrity transforms (AUTH_HMAC_SHA2_*).

use aws_lc_rs::{constant_time, hmac};
use concentrator_algorithms::{Integrity, Prf as PrfAlg};

use crate::error::CryptoError;
use crate::keymat::SecretBytes;

/// The largest PRF output (SHA-512).
pub const MAX_PRF_LEN: usize = 64;

/// A negotiated PRF. Cheap to copy: it carries only the algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prf {
    alg: PrfAlg,
}

impl Prf {
    /// The PRF for a negotiated transform.
    pub fn new(alg: PrfAlg) -> Self {
        Self { alg }
    }

    /// The transform.
    pub fn algorithm(self) -> PrfAlg {
        self.alg
    }

    fn hmac_alg(self) -> hmac::Algorithm {
        match self.alg {
            PrfAlg::HmacSha256 => hmac::HMAC_SHA256,
            PrfAlg::HmacSha384 => hmac::HMAC_SHA384,
            PrfAlg::HmacSha512 => hmac::HMAC_SHA512,
        }
    }

    /// Output length in bytes, which is also the preferred key length. RFC 7296 §2.13: "For
    /// PRFs based on the HMAC construction, the preferred key size is equal to the length of
    /// the output of the underlying hash function."
    pub fn output_len(self) -> usize {
        match self.alg {
            PrfAlg::HmacSha256 => 32,
            PrfAlg::HmacSha384 => 48,
            PrfAlg::HmacSha512 => 64,
        }
    }

    /// `prf(key, parts[0] | parts[1] | ...)`. HMAC accepts keys of any length (RFC 7296 §2.13:
    /// "It is assumed that PRFs accept keys of any length").
    pub fn compute(self, key: &[u8], parts: &[&[u8]]) -> SecretBytes {
        let key = hmac::Key::new(self.hmac_alg(), key);
        let mut ctx = hmac::Context::with_key(&key);
        for p in parts {
            ctx.update(p);
        }
        SecretBytes::from_slice(ctx.sign().as_ref())
    }

    /// `prf+(key, parts[0] | parts[1] | ...)` truncated to `len` bytes (RFC 7296 §2.13):
    ///
    /// ```text
    /// prf+ (K,S) = T1 | T2 | T3 | T4 | ...
    /// T1 = prf (K, S | 0x01)
    /// T2 = prf (K, T1 | S | 0x02)
    /// ```
    ///
    /// # Errors
    /// [`CryptoError::PrfPlusTooLong`] when `len` needs more than 255 PRF outputs.
    pub fn prf_plus(self, key: &[u8], parts: &[&[u8]], len: usize) -> Result<SecretBytes, CryptoError> {
        let block = self.output_len();
        // RFC 7296 §2.13 (text kept from RFC 4306 §2.13): "The constant concatenated to the
        // end of each string feeding the prf is a single octet. prf+ in this document is not
        // defined beyond 255 times the size of the prf output."
        if len > 255 * block {
            return Err(CryptoError::PrfPlusTooLong {
                requested: len,
                block,
            });
        }
        let key = hmac::Key::new(self.hmac_alg(), key);
        let mut out = SecretBytes::zeroed(len);
        let mut prev: Option<hmac::Tag> = None;
        let mut counter: u8 = 1;
        let mut filled = 0;
        while filled < len {
            let mut ctx = hmac::Context::with_key(&key);
            if let Some(t) = &prev {
                ctx.update(t.as_ref());
            }
            for p in parts {
                ctx.update(p);
            }
            ctx.update(&[counter]);
            let t = ctx.sign();
            let n = (len - filled).min(block);
            out.bytes_mut()[filled..filled + n].copy_from_slice(&t.as_ref()[..n]);
            filled += n;
            prev = Some(t);
            // At most 255 iterations by the check above, so this never wraps in use.
            counter = counter.wrapping_add(1);
        }
        Ok(out)
    }
}

/// A truncated HMAC integrity transform (AUTH_HMAC_SHA2_256_128 / 384_192 / 512_256).
#[derive(Clone)]
pub struct IntegKey {
    alg: Integrity,
    key: hmac::Key,
}

impl std::fmt::Debug for IntegKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntegKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Key length of an HMAC integrity transform. RFC 7296 §2.13: "For integrity protection
/// functions based on Hashed Message Authentication Code (HMAC), the fixed key size is the
/// size of the output of the underlying hash function."
pub fn integ_key_len(alg: Integrity) -> usize {
    match alg {
        Integrity::HmacSha256_128 => 32,
        Integrity::HmacSha384_192 => 48,
        Integrity::HmacSha512_256 => 64,
    }
}

/// ICV length of an HMAC integrity transform: RFC 4868 truncates HMAC-SHA-256/384/512 to
/// 128/192/256 bits ("HMAC-SHA-256-128, HMAC-SHA-384-192, and HMAC-SHA-512-256").
pub fn integ_icv_len(alg: Integrity) -> usize {
    integ_key_len(alg) / 2
}

impl IntegKey {
    /// An integrity key; `key` must be [`integ_key_len`] bytes.
    ///
    /// # Errors
    /// [`CryptoError::KeyLength`] for a key of the wrong length.
    pub fn new(alg: Integrity, key: &[u8]) -> Result<Self, CryptoError> {
        let expected = integ_key_len(alg);
        if key.len() != expected {
            return Err(CryptoError::KeyLength {
                what: "integrity key",
                expected,
                got: key.len(),
            });
        }
        let h = match alg {
            Integrity::HmacSha256_128 => hmac::HMAC_SHA256,
            Integrity::HmacSha384_192 => hmac::HMAC_SHA384,
            Integrity::HmacSha512_256 => hmac::HMAC_SHA512,
        };
        Ok(Self {
            alg,
            key: hmac::Key::new(h, key),
        })
    }

    /// The transform.
    pub fn algorithm(&self) -> Integrity {
        self.alg
    }

    /// ICV length in bytes.
    pub fn icv_len(&self) -> usize {
        integ_icv_len(self.alg)
    }

    /// Writes the truncated HMAC of `data` into `icv` (which must be [`Self::icv_len`] long).
    ///
    /// # Errors
    /// [`crate::PacketError::Malformed`] if `icv` has the wrong length.
    pub fn sign_into(&self, data: &[u8], icv: &mut [u8]) -> Result<(), crate::PacketError> {
        if icv.len() != self.icv_len() {
            return Err(crate::PacketError::Malformed);
        }
        let tag = hmac::sign(&self.key, data);
        icv.copy_from_slice(&tag.as_ref()[..icv.len()]);
        Ok(())
    }

    /// Writes the truncated HMAC of `parts[0] | parts[1] | ...` into `icv` (which must be
    /// [`Self::icv_len`] long). For ICVs over data that is not contiguous in the packet, such
    /// as ESP with extended sequence numbers, whose high 32 bits are authenticated but not sent.
    ///
    /// # Errors
    /// [`crate::PacketError::Malformed`] if `icv` has the wrong length.
    pub fn sign_parts_into(&self, parts: &[&[u8]], icv: &mut [u8]) -> Result<(), crate::PacketError> {
        if icv.len() != self.icv_len() {
            return Err(crate::PacketError::Malformed);
        }
        let tag = self.sign_parts(parts);
        icv.copy_from_slice(&tag.as_ref()[..icv.len()]);
        Ok(())
    }

    /// Verifies a truncated ICV over `parts[0] | parts[1] | ...` in constant time.
    ///
    /// # Errors
    /// [`crate::PacketError::IcvMismatch`] if it does not verify.
    pub fn verify_parts(&self, parts: &[&[u8]], icv: &[u8]) -> Result<(), crate::PacketError> {
        let tag = self.sign_parts(parts);
        if icv.len() != self.icv_len() {
            return Err(crate::PacketError::IcvMismatch);
        }
        constant_time::verify_slices_are_equal(&tag.as_ref()[..icv.len()], icv)
            .map_err(|_| crate::PacketError::IcvMismatch)
    }

    fn sign_parts(&self, parts: &[&[u8]]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        for p in parts {
            ctx.update(p);
        }
        ctx.sign()
    }

    /// Verifies a truncated ICV over `data` in constant time.
    ///
    /// # Errors
    /// [`crate::PacketError::IcvMismatch`] if it does not verify.
    pub fn verify(&self, data: &[u8], icv: &[u8]) -> Result<(), crate::PacketError> {
        let tag = hmac::sign(&self.key, data);
        if icv.len() != self.icv_len() {
            return Err(crate::PacketError::IcvMismatch);
        }
        constant_time::verify_slices_are_equal(&tag.as_ref()[..icv.len()], icv)
            .map_err(|_| crate::PacketError::IcvMismatch)
    }
}
