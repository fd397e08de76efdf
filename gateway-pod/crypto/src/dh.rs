//! Diffie-Hellman key exchange for the IKEv2 KE payload: groups 14 and 15 (MODP, RFC 3526),
//! 19 and 20 (ECP, RFC 5903) and 31 (Curve25519, RFC 8031).
//!
//! Public values are produced in the exact Key Exchange Data encoding of each group, and the
//! peer's value is validated before use; a bad value is an error, never a panic.

use aws_lc_rs::agreement::{self, ECDH_P256, ECDH_P384, PrivateKey, UnparsedPublicKey, X25519};
use concentrator_algorithms::DhGroup;

use crate::error::CryptoError;
use crate::keymat::SecretBytes;

#[allow(unsafe_code)]
mod modp;

/// One side's ephemeral key pair for one IKE_SA_INIT or CREATE_CHILD_SA exchange.
pub struct KeyExchange {
    group: DhGroup,
    inner: Inner,
}

enum Inner {
    Modp(modp::ModpKey),
    Ec(PrivateKey),
}

impl std::fmt::Debug for KeyExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyExchange")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

fn ec_alg(group: DhGroup) -> Option<&'static agreement::Algorithm> {
    match group {
        DhGroup::Ecp256 => Some(&ECDH_P256),
        DhGroup::Ecp384 => Some(&ECDH_P384),
        DhGroup::Curve25519 => Some(&X25519),
        DhGroup::Modp2048 | DhGroup::Modp3072 => None,
    }
}

/// Length of the Key Exchange Data (the public value) of `group`: the prime length for MODP
/// (256 / 384), x || y for ECP (64 / 96), 32 for Curve25519.
pub fn public_len(group: DhGroup) -> usize {
    match group {
        DhGroup::Modp2048 => 256,
        DhGroup::Modp3072 => 384,
        DhGroup::Ecp256 => 64,
        DhGroup::Ecp384 => 96,
        DhGroup::Curve25519 => 32,
    }
}

/// Length of the shared secret g^ir of `group`.
pub fn shared_len(group: DhGroup) -> usize {
    match group {
        DhGroup::Ecp256 => 32,
        DhGroup::Ecp384 => 48,
        g => public_len(g),
    }
}

impl KeyExchange {
    /// A fresh random private key for `group`.
    ///
    /// # Errors
    /// [`CryptoError::Internal`] if the random generator or AWS-LC fails.
    pub fn generate(group: DhGroup) -> Result<Self, CryptoError> {
        let inner = match ec_alg(group) {
            Some(alg) => Inner::Ec(PrivateKey::generate(alg).map_err(|_| CryptoError::Internal)?),
            None => Inner::Modp(modp::ModpKey::generate(modp_group(group))?),
        };
        Ok(Self { group, inner })
    }

    /// A key pair from a known private key, for known-answer tests: the big-endian scalar
    /// (ECP, 32 / 48 bytes), the 32-byte X25519 scalar, or the big-endian MODP exponent.
    ///
    /// # Errors
    /// [`CryptoError::InvalidPublicValue`] if the key is rejected (wrong length, out of range).
    pub fn from_private_key(group: DhGroup, private: &[u8]) -> Result<Self, CryptoError> {
        let bad = CryptoError::InvalidPublicValue {
            group: group.number(),
        };
        let inner = match ec_alg(group) {
            Some(alg) => Inner::Ec(PrivateKey::from_private_key(alg, private).map_err(|_| bad)?),
            None => Inner::Modp(modp::ModpKey::from_exponent(modp_group(group), private)?),
        };
        Ok(Self { group, inner })
    }

    /// The private key in the form [`Self::from_private_key`] takes, to carry a key exchange
    /// in flight to another process (an IKE SA snapshot). Zeroized on drop.
    ///
    /// # Errors
    /// [`CryptoError::Internal`] if AWS-LC cannot serialize the key.
    pub fn private_key(&self) -> Result<SecretBytes, CryptoError> {
        use aws_lc_rs::encoding::{AsBigEndian, Curve25519SeedBin, EcPrivateKeyBin};
        match &self.inner {
            Inner::Modp(k) => Ok(k.exponent()),
            Inner::Ec(k) if self.group == DhGroup::Curve25519 => {
                let seed: Curve25519SeedBin<'_> = k.as_be_bytes().map_err(|_| CryptoError::Internal)?;
                Ok(SecretBytes::from_slice(seed.as_ref()))
            }
            Inner::Ec(k) => {
                let scalar: EcPrivateKeyBin<'_> = k.as_be_bytes().map_err(|_| CryptoError::Internal)?;
                Ok(SecretBytes::from_slice(scalar.as_ref()))
            }
        }
    }

    /// The group.
    pub fn group(&self) -> DhGroup {
        self.group
    }

    /// Our public value in the Key Exchange Data encoding of the group:
    /// - MODP: g^x mod p big-endian, left-padded with zeros to the prime length (RFC 7296 §3.4:
    ///   "The length of the Diffie-Hellman public value for MODP groups MUST be equal to the
    ///   length of the prime modulus over which the exponentiation was performed, prepending
    ///   zero bits to the value if necessary.");
    /// - ECP: x || y, each coordinate big-endian at the field length, without the 0x04
    ///   point-format octet of SEC1 (RFC 5903);
    /// - Curve25519: the 32-byte u-coordinate (RFC 8031).
    ///
    /// # Errors
    /// [`CryptoError::Internal`] if AWS-LC fails.
    pub fn public_value(&self) -> Result<Vec<u8>, CryptoError> {
        match &self.inner {
            Inner::Modp(k) => k.public_value(),
            Inner::Ec(k) => {
                let p = k.compute_public_key().map_err(|_| CryptoError::Internal)?;
                let b = p.as_ref();
                match self.group {
                    // SEC1 uncompressed point: 0x04 || x || y.
                    DhGroup::Ecp256 | DhGroup::Ecp384 => match b.split_first() {
                        Some((0x04, xy)) if xy.len() == public_len(self.group) => Ok(xy.to_vec()),
                        _ => Err(CryptoError::Internal),
                    },
                    _ => Ok(b.to_vec()),
                }
            }
        }
    }

    /// The shared secret g^ir from the peer's Key Exchange Data, in the form SKEYSEED and
    /// KEYMAT take (MODP: padded to the prime length; ECP: the x-coordinate of the shared point,
    /// RFC 5903; Curve25519: the 32-byte X25519 output, RFC 8031).
    ///
    /// # Errors
    /// [`CryptoError::PublicValueLength`] for data of the wrong length,
    /// [`CryptoError::InvalidPublicValue`] for a value that fails validation (MODP: 0, 1, p-1
    /// or >= p; ECP: not a point on the curve; Curve25519: all-zero shared secret).
    pub fn compute_shared(&self, peer: &[u8]) -> Result<SecretBytes, CryptoError> {
        let group = self.group.number();
        let expected = public_len(self.group);
        if peer.len() != expected {
            return Err(CryptoError::PublicValueLength {
                group,
                expected,
                got: peer.len(),
            });
        }
        let bad = CryptoError::InvalidPublicValue { group };
        match &self.inner {
            Inner::Modp(k) => k.shared_secret(peer),
            Inner::Ec(k) => {
                let alg = ec_alg(self.group).ok_or(CryptoError::Internal)?;
                let sec1;
                let encoded: &[u8] = match self.group {
                    DhGroup::Ecp256 | DhGroup::Ecp384 => {
                        // Back to SEC1 form for AWS-LC, which rejects points that are not on
                        // the curve (the IKEv2 "Additional Diffie-Hellman Tests" update makes
                        // this check mandatory for ECP groups).
                        sec1 = [&[0x04][..], peer].concat();
                        &sec1
                    }
                    _ => peer,
                };
                let secret = agreement::agree(k, UnparsedPublicKey::new(alg, encoded), bad, |s| {
                    Ok(SecretBytes::from_slice(s))
                })?;
                if self.group == DhGroup::Curve25519 {
                    // RFC 7748 §6.1 / RFC 8031: a low-order peer point yields the all-zero
                    // output, which must be rejected. AWS-LC already refuses it; we check
                    // again, in constant time, so the guarantee does not rest on that.
                    let acc = secret.expose().iter().fold(0u8, |a, &b| a | b);
                    if acc == 0 {
                        return Err(bad);
                    }
                }
                Ok(secret)
            }
        }
    }
}

fn modp_group(group: DhGroup) -> modp::Group {
    match group {
        DhGroup::Modp3072 => modp::Group::Modp3072,
        _ => modp::Group::Modp2048,
    }
}
