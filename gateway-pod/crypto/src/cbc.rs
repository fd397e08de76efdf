//! AES-CBC without padding (RFC 3602) for the ESP data plane: one key per SA direction,
//! encrypting or decrypting whole blocks in place. ESP does its own padding and integrity
//! (HMAC, [`crate::prf::IntegKey`]); this module only holds the block cipher.
//!
//! The outbound key derives each packet's IV from a per-packet nonce (the ESP sequence number)
//! instead of drawing it from the random generator; see [`CbcEncryptingKey::encrypt_with_nonce_iv`].

use aws_lc_rs::cipher::{
    AES_128, AES_256, DecryptingKey, DecryptionContext, EncryptingKey, EncryptionContext, UnboundCipherKey,
};
use concentrator_algorithms::Encryption;

use crate::error::{CryptoError, PacketError};
use crate::keymat::cipher_key_len;

/// AES block (and CBC IV) length.
pub const BLOCK_LEN: usize = 16;

fn unbound(encr: Encryption, key: &[u8]) -> Result<UnboundCipherKey, CryptoError> {
    if !matches!(encr, Encryption::AesCbc { .. }) {
        return Err(CryptoError::Unsupported("not an AES-CBC transform"));
    }
    let k = cipher_key_len(encr)?;
    if key.len() != k {
        return Err(CryptoError::KeyLength {
            what: "AES-CBC key",
            expected: k,
            got: key.len(),
        });
    }
    let alg = if k == 16 { &AES_128 } else { &AES_256 };
    UnboundCipherKey::new(alg, key).map_err(|_| CryptoError::Internal)
}

/// The encrypting half of an AES-CBC key (128 or 256 bits). Immutable and `Sync`.
pub struct CbcEncryptingKey {
    encr: Encryption,
    key: EncryptingKey,
}

impl std::fmt::Debug for CbcEncryptingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CbcEncryptingKey")
            .field("encr", &self.encr)
            .finish_non_exhaustive()
    }
}

impl CbcEncryptingKey {
    /// A key for `encr` (must be [`Encryption::AesCbc`] with 128 or 256 bits) from exactly
    /// the cipher key bytes.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for another transform or key size,
    /// [`CryptoError::KeyLength`] for a key of the wrong length.
    pub fn new(encr: Encryption, key: &[u8]) -> Result<Self, CryptoError> {
        let key = EncryptingKey::cbc(unbound(encr, key)?).map_err(|_| CryptoError::Internal)?;
        Ok(Self { encr, key })
    }

    /// The transform.
    pub fn encryption(&self) -> Encryption {
        self.encr
    }

    /// CBC-encrypts `data` (a whole number of blocks) in place under `iv`. The caller must
    /// make `iv` unpredictable (RFC 3602 §3: "The IV MUST be chosen at random, and MUST be
    /// unpredictable"); [`Self::encrypt_with_nonce_iv`] does that for it.
    ///
    /// # Errors
    /// [`PacketError::Malformed`] if `data` is not a multiple of [`BLOCK_LEN`].
    pub fn encrypt_in_place(&self, iv: &[u8; BLOCK_LEN], data: &mut [u8]) -> Result<(), PacketError> {
        if !data.len().is_multiple_of(BLOCK_LEN) {
            return Err(PacketError::Malformed);
        }
        self.key
            .less_safe_encrypt(data, EncryptionContext::Iv128((*iv).into()))
            .map(|_| ())
            .map_err(|_| PacketError::Internal)
    }

    /// Encrypts `buf[BLOCK_LEN..]` in place under the IV `E_K(nonce || 0^64)` and writes that
    /// IV into `buf[..BLOCK_LEN]`, so `buf` ends up as `IV || ciphertext`. `nonce` must never
    /// repeat under this key (ESP: the 64-bit sequence number).
    ///
    /// Why not random: NIST SP 800-38A Appendix C gives this as one of the two ways to make
    /// an unpredictable CBC IV: "apply the forward cipher function, under the same key that
    /// is used for the encryption of the plaintext, to a nonce. The nonce must be a data
    /// block that is unique to each execution of the encryption operation." It costs one AES
    /// block instead of a call into the random generator, and makes packets reproducible
    /// for known-answer tests.
    ///
    /// Both steps are one CBC pass: with a zero IV, the first output block is
    /// `E_K(0 ^ N) = E_K(N)`, which then chains into the data exactly as an IV would.
    ///
    /// # Errors
    /// [`PacketError::Malformed`] if `buf` is shorter than a block or not a multiple of
    /// [`BLOCK_LEN`].
    pub fn encrypt_with_nonce_iv(&self, nonce: u64, buf: &mut [u8]) -> Result<(), PacketError> {
        let Some(first) = buf.get_mut(..BLOCK_LEN) else {
            return Err(PacketError::Malformed);
        };
        first[..8].copy_from_slice(&nonce.to_be_bytes());
        first[8..].fill(0);
        self.encrypt_in_place(&[0; BLOCK_LEN], buf)
    }
}

/// The decrypting half of an AES-CBC key (128 or 256 bits). Immutable and `Sync`.
pub struct CbcDecryptingKey {
    encr: Encryption,
    key: DecryptingKey,
}

impl std::fmt::Debug for CbcDecryptingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CbcDecryptingKey")
            .field("encr", &self.encr)
            .finish_non_exhaustive()
    }
}

impl CbcDecryptingKey {
    /// A key for `encr` (must be [`Encryption::AesCbc`] with 128 or 256 bits) from exactly
    /// the cipher key bytes.
    ///
    /// # Errors
    /// As [`CbcEncryptingKey::new`].
    pub fn new(encr: Encryption, key: &[u8]) -> Result<Self, CryptoError> {
        let key = DecryptingKey::cbc(unbound(encr, key)?).map_err(|_| CryptoError::Internal)?;
        Ok(Self { encr, key })
    }

    /// The transform.
    pub fn encryption(&self) -> Encryption {
        self.encr
    }

    /// CBC-decrypts `data` (a whole number of blocks) in place under `iv`. No padding is
    /// removed: that is the caller's framing. Authenticate `iv` and `data` first.
    ///
    /// # Errors
    /// [`PacketError::Malformed`] if `data` is not a multiple of [`BLOCK_LEN`].
    pub fn decrypt_in_place(&self, iv: &[u8; BLOCK_LEN], data: &mut [u8]) -> Result<(), PacketError> {
        if !data.len().is_multiple_of(BLOCK_LEN) {
            return Err(PacketError::Malformed);
        }
        self.key
            .decrypt(data, DecryptionContext::Iv128((*iv).into()))
            .map(|_| ())
            .map_err(|_| PacketError::Internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc3602_case_2_known_answer() {
        // RFC 3602 §4, Case #2: Encrypting 32 bytes (2 blocks) using AES-CBC with 128-bit key.
        let encr = Encryption::AesCbc { key_bits: 128 };
        let key = hex("c286696d887c9aa0611bbb3e2025a45a");
        let iv: [u8; 16] = hex("562e17996d093d28ddb3ba695a2e6f58").try_into().unwrap();
        let pt = hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
        let ct = hex("d296cd94c2cccf8a3a863028b5e1dc0a7586602d253cfff91b8266bea6d61ab1");
        let mut buf = pt.clone();
        CbcEncryptingKey::new(encr, &key)
            .unwrap()
            .encrypt_in_place(&iv, &mut buf)
            .unwrap();
        assert_eq!(buf, ct);
        CbcDecryptingKey::new(encr, &key)
            .unwrap()
            .decrypt_in_place(&iv, &mut buf)
            .unwrap();
        assert_eq!(buf, pt);
    }

    #[test]
    fn the_nonce_iv_is_the_encrypted_nonce_and_chains_into_the_data() {
        let encr = Encryption::AesCbc { key_bits: 256 };
        let key = [0x42; 32];
        let enc = CbcEncryptingKey::new(encr, &key).unwrap();
        let mut buf = [0u8; 48];
        buf[16..].copy_from_slice(&[9; 32]);
        enc.encrypt_with_nonce_iv(7, &mut buf).unwrap();
        // The IV is E_K(7 || 0^64): an ECB encryption of that block, computed independently.
        let ecb = EncryptingKey::ecb(UnboundCipherKey::new(&AES_256, &key).unwrap()).unwrap();
        let mut block = [0u8; 16];
        block[7] = 7;
        ecb.encrypt(&mut block).unwrap();
        assert_eq!(buf[..16], block);
        // And the rest is plain CBC under that IV.
        let mut data = buf[16..].to_vec();
        CbcDecryptingKey::new(encr, &key)
            .unwrap()
            .decrypt_in_place(&block, &mut data)
            .unwrap();
        assert_eq!(data, [9; 32]);
        // Distinct nonces give distinct IVs.
        let mut other = [0u8; 16];
        enc.encrypt_with_nonce_iv(8, &mut other).unwrap();
        assert_ne!(other, block);
    }

    #[test]
    fn rejects_bad_keys_and_partial_blocks() {
        assert!(matches!(
            CbcEncryptingKey::new(Encryption::AesCbc { key_bits: 128 }, &[0; 32]),
            Err(CryptoError::KeyLength { .. })
        ));
        assert!(matches!(
            CbcDecryptingKey::new(Encryption::AesGcm16 { key_bits: 128 }, &[0; 16]),
            Err(CryptoError::Unsupported(_))
        ));
        assert!(matches!(
            CbcEncryptingKey::new(Encryption::AesCbc { key_bits: 192 }, &[0; 24]),
            Err(CryptoError::Unsupported(_))
        ));
        let enc = CbcEncryptingKey::new(Encryption::AesCbc { key_bits: 128 }, &[0; 16]).unwrap();
        assert_eq!(
            enc.encrypt_in_place(&[0; 16], &mut [0; 17]),
            Err(PacketError::Malformed)
        );
        assert_eq!(
            enc.encrypt_with_nonce_iv(1, &mut [0; 15]),
            Err(PacketError::Malformed)
        );
        let dec = CbcDecryptingKey::new(Encryption::AesCbc { key_bits: 128 }, &[0; 16]).unwrap();
        assert_eq!(
            dec.decrypt_in_place(&[0; 16], &mut [0; 31]),
            Err(PacketError::Malformed)
        );
        let dbg = format!("{enc:?} {dec:?}");
        assert!(dbg.contains("AesCbc") && !dbg.contains("key:"), "{dbg}");
    }
}
