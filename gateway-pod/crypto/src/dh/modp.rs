//! MODP groups 14 and 15 (RFC 3526) on AWS-LC's bignums. This module is the only `unsafe`
//! code in the crate: no safe aws-lc-rs API offers finite-field Diffie-Hellman. The primes
//! come from AWS-LC (`BN_get_rfc3526_prime_2048/3072`), the generator is 2, and every
//! exponentiation with a secret exponent is `BN_mod_exp_mont_consttime`.

use std::cmp::Ordering;
use std::ptr::{self, NonNull};

use aws_lc_sys as sys;

use crate::error::CryptoError;
use crate::keymat::SecretBytes;

/// A MODP group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Group {
    /// Group 14, 2048-bit MODP.
    Modp2048,
    /// Group 15, 3072-bit MODP.
    Modp3072,
}

impl Group {
    /// Prime length in bytes.
    pub(super) fn len(self) -> usize {
        match self {
            Self::Modp2048 => 256,
            Self::Modp3072 => 384,
        }
    }

    fn number(self) -> u16 {
        match self {
            Self::Modp2048 => 14,
            Self::Modp3072 => 15,
        }
    }

    fn invalid(self) -> CryptoError {
        CryptoError::InvalidPublicValue { group: self.number() }
    }

    /// Bits of our random exponents: the upper end of the exponent sizes RFC 3526 §8 gives
    /// for each group's strength (2048-bit: 220-320, 3072-bit: 260-420 bits), which is also
    /// at least twice the strength, as NIST SP 800-56A asks of safe-prime groups. A full
    /// prime-length exponent buys nothing more against the discrete logarithm (the group's
    /// own strength is the limit) and costs 6-7x the time in every exponentiation.
    fn exponent_bits(self) -> i32 {
        match self {
            Self::Modp2048 => 320,
            Self::Modp3072 => 448,
        }
    }
}

/// An owned `BIGNUM`, cleared (`BN_clear_free`) on drop.
struct Bn(NonNull<sys::BIGNUM>);

impl Bn {
    fn from_raw(p: *mut sys::BIGNUM) -> Result<Self, CryptoError> {
        NonNull::new(p).map(Self).ok_or(CryptoError::Internal)
    }

    fn new() -> Result<Self, CryptoError> {
        // Safety: BN_new has no preconditions; it returns NULL on allocation failure, which
        // from_raw turns into an error.
        Self::from_raw(unsafe { sys::BN_new() })
    }

    fn word(w: u64) -> Result<Self, CryptoError> {
        let b = Self::new()?;
        // Safety: b owns a valid BIGNUM allocated by BN_new.
        if unsafe { sys::BN_set_word(b.0.as_ptr(), w) } != 1 {
            return Err(CryptoError::Internal);
        }
        Ok(b)
    }

    fn prime(group: Group) -> Result<Self, CryptoError> {
        // Safety: with a NULL argument these functions allocate and return a new BIGNUM
        // holding the RFC 3526 prime (or NULL on allocation failure), which we then own.
        let p = unsafe {
            match group {
                Group::Modp2048 => sys::BN_get_rfc3526_prime_2048(ptr::null_mut()),
                Group::Modp3072 => sys::BN_get_rfc3526_prime_3072(ptr::null_mut()),
            }
        };
        Self::from_raw(p)
    }

    fn from_be(bytes: &[u8]) -> Result<Self, CryptoError> {
        // Safety: bytes is a live slice of bytes.len() readable bytes; with a NULL `ret`
        // BN_bin2bn allocates a new BIGNUM (NULL on failure), which we then own.
        Self::from_raw(unsafe { sys::BN_bin2bn(bytes.as_ptr(), bytes.len(), ptr::null_mut()) })
    }

    /// Big-endian, left-padded with zeros to `len` bytes.
    fn to_be_padded(&self, len: usize) -> Result<SecretBytes, CryptoError> {
        let mut out = SecretBytes::zeroed(len);
        let buf = out.bytes_mut();
        // Safety: buf is a live, writable buffer of exactly `len` bytes and self owns a valid
        // BIGNUM; BN_bn2bin_padded writes at most `len` bytes and returns 0 if the value does
        // not fit.
        if unsafe { sys::BN_bn2bin_padded(buf.as_mut_ptr(), len, self.0.as_ptr()) } != 1 {
            return Err(CryptoError::Internal);
        }
        Ok(out)
    }

    fn cmp(&self, other: &Self) -> Ordering {
        // Safety: both own valid BIGNUMs. BN_cmp is not constant-time; it is only used on
        // public values (the peer's KE data, the prime) and on our freshly drawn exponent's
        // range.
        unsafe { sys::BN_cmp(self.0.as_ptr(), other.0.as_ptr()) }.cmp(&0)
    }
}

impl Drop for Bn {
    fn drop(&mut self) {
        // Safety: self.0 was allocated by AWS-LC and is owned only by this value; it is
        // freed exactly once here. BN_clear_free zeroes the limbs before freeing.
        unsafe { sys::BN_clear_free(self.0.as_ptr()) }
    }
}

/// An owned `BN_CTX` (scratch space for AWS-LC's bignum operations).
struct Ctx(NonNull<sys::BN_CTX>);

impl Ctx {
    fn new() -> Result<Self, CryptoError> {
        // Safety: BN_CTX_new has no preconditions; NULL on allocation failure.
        NonNull::new(unsafe { sys::BN_CTX_new() })
            .map(Self)
            .ok_or(CryptoError::Internal)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // Safety: allocated by BN_CTX_new, owned only by this value, freed once.
        unsafe { sys::BN_CTX_free(self.0.as_ptr()) }
    }
}

/// `base^exp mod m` in constant time with respect to `exp`. Requires `0 <= base < m` and an
/// odd `m` (both hold: the RFC 3526 primes are odd, and callers reduce the base).
fn mod_exp_consttime(base: &Bn, exp: &Bn, m: &Bn) -> Result<Bn, CryptoError> {
    let r = Bn::new()?;
    let ctx = Ctx::new()?;
    // Safety: r, base, exp, m and ctx are valid and owned for the whole call; r is distinct
    // from the inputs; base < m and m is odd as required; a NULL `mont` makes AWS-LC build
    // the Montgomery context itself.
    let ok = unsafe {
        sys::BN_mod_exp_mont_consttime(
            r.0.as_ptr(),
            base.0.as_ptr(),
            exp.0.as_ptr(),
            m.0.as_ptr(),
            ctx.0.as_ptr(),
            ptr::null(),
        )
    };
    if ok != 1 {
        return Err(CryptoError::Internal);
    }
    Ok(r)
}

/// Our private exponent, kept as big-endian bytes (zeroized on drop) so the key is `Send`
/// and `Sync` without unsafe impls; it becomes a `BIGNUM` only for the length of a call.
pub(super) struct ModpKey {
    group: Group,
    x: SecretBytes,
}

impl ModpKey {
    /// The private exponent, big-endian, as [`Self::from_exponent`] takes it.
    pub(super) fn exponent(&self) -> SecretBytes {
        SecretBytes::from_slice(self.x.expose())
    }

    /// A random exponent of exactly [`Group::exponent_bits`] bits (the top bit set, so that
    /// every exponentiation with it takes the same time); far below p - 1.
    pub(super) fn generate(group: Group) -> Result<Self, CryptoError> {
        let x = Bn::new()?;
        // Safety: x owns a valid BIGNUM; BN_rand fills it from AWS-LC's CSPRNG with
        // `exponent_bits` random bits, the top one forced to 1.
        if unsafe {
            sys::BN_rand(
                x.0.as_ptr(),
                group.exponent_bits(),
                sys::BN_RAND_TOP_ONE,
                sys::BN_RAND_BOTTOM_ANY,
            )
        } != 1
        {
            return Err(CryptoError::Internal);
        }
        // Exactly the exponent's bytes: AWS-LC's constant-time exponentiation walks every
        // word the BIGNUM holds, and leading zero bytes would give it the prime's length.
        let bytes = usize::try_from(group.exponent_bits()).map_err(|_| CryptoError::Internal)? / 8;
        Ok(Self {
            group,
            x: x.to_be_padded(bytes)?,
        })
    }

    /// A known exponent (tests): 1 <= x < p.
    pub(super) fn from_exponent(group: Group, x: &[u8]) -> Result<Self, CryptoError> {
        if x.is_empty() || x.len() > group.len() {
            return Err(group.invalid());
        }
        let xb = Bn::from_be(x)?;
        let one = Bn::word(1)?;
        if xb.cmp(&one) == Ordering::Less || xb.cmp(&Bn::prime(group)?) != Ordering::Less {
            return Err(group.invalid());
        }
        Ok(Self {
            group,
            x: xb.to_be_padded(group.len())?,
        })
    }

    /// g^x mod p, padded to the prime length.
    pub(super) fn public_value(&self) -> Result<Vec<u8>, CryptoError> {
        let p = Bn::prime(self.group)?;
        let g = Bn::word(2)?;
        let x = Bn::from_be(self.x.expose())?;
        let y = mod_exp_consttime(&g, &x, &p)?;
        Ok(y.to_be_padded(self.group.len())?.expose().to_vec())
    }

    /// peer^x mod p, padded to the prime length, after checking 1 < peer < p - 1. `peer` has
    /// already been checked to be exactly the prime length.
    pub(super) fn shared_secret(&self, peer: &[u8]) -> Result<SecretBytes, CryptoError> {
        let p = Bn::prime(self.group)?;
        let y = Bn::from_be(peer)?;
        let one = Bn::word(1)?;
        let pm1 = Bn::prime(self.group)?;
        // Safety: pm1 owns a valid BIGNUM (a copy of p).
        if unsafe { sys::BN_sub_word(pm1.0.as_ptr(), 1) } != 1 {
            return Err(CryptoError::Internal);
        }
        // Reject 0, 1, p - 1 (the elements of order 1 and 2, which would confine the shared
        // secret to {1, p - 1}) and anything >= p, which is not a group element.
        if y.cmp(&one) != Ordering::Greater || y.cmp(&pm1) != Ordering::Less {
            return Err(self.group.invalid());
        }
        let x = Bn::from_be(self.x.expose())?;
        let z = mod_exp_consttime(&y, &x, &p)?;
        if z.cmp(&one) != Ordering::Greater {
            return Err(self.group.invalid());
        }
        z.to_be_padded(self.group.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_exponents_have_exactly_the_groups_exponent_bits() {
        for group in [Group::Modp2048, Group::Modp3072] {
            let bits = usize::try_from(group.exponent_bits()).unwrap();
            let a = ModpKey::generate(group).unwrap();
            let b = ModpKey::generate(group).unwrap();
            assert_ne!(a.x.expose(), b.x.expose());
            for k in [&a, &b] {
                let x = k.x.expose();
                assert_eq!(x.len() * 8, bits, "{group:?}");
                assert!(x[0] & 0x80 != 0, "{group:?}: top bit not set");
            }
        }
    }
}
