//! The IKEv2 Encrypted (SK) payload: RFC 7296 §3.14 for AES-CBC + HMAC, RFC 5282 for
//! AES-GCM-16 and RFC 7634 for ChaCha20-Poly1305.
//!
//! An SK payload body (after its 4-byte generic payload header) is
//!
//! ```text
//! IV | encrypted( inner payloads | Padding | Pad Length ) | ICV
//! ```
//!
//! The codec lays the message out and hands over the whole message buffer plus `body_start`,
//! the offset of the IV (just after the SK generic header). What is authenticated:
//! - AEAD: the associated data is the message from the IKE header through the SK generic
//!   payload header, i.e. `message[..body_start]` (RFC 5282; RFC 7634 §3), and the ICV is
//!   the 16-byte tag;
//! - CBC: the ICV is the truncated HMAC over the message from the IKE header through the end
//!   of the encrypted data, i.e. `message[..len - icv_len]` (RFC 7296 §3.14).
//!
//! The IKE header's Length and the SK payload's Payload Length must be final before
//! [`SkCipher::seal`], since both are authenticated.

use std::ops::Range;

use aws_lc_rs::cipher::{
    AES_128, AES_256, DecryptingKey, DecryptionContext, EncryptingKey, EncryptionContext, UnboundCipherKey,
};
use aws_lc_rs::rand;
use concentrator_algorithms::{Encryption, Integrity};

use crate::aead::{self, AeadSecret, IvCounter};
use crate::error::{CryptoError, PacketError};
use crate::keymat::{SecretBytes, cipher_key_len};
use crate::prf::{IntegKey, integ_icv_len};

const AES_BLOCK: usize = 16;

/// The SK payload cipher of one direction (SK_ei + SK_ai, or SK_er + SK_ar), with the framing
/// rules: IV length, ICV length, block size and padding. A sender keeps one per direction it
/// sends in (sealing advances its IV counter), a receiver one per direction it receives in.
///
/// An AEAD cipher keeps only its key bytes and builds AWS-LC's context per message
/// ([`AeadSecret`]): an IKE SA protects a message every half minute or so, and a context kept
/// per direction would be most of an idle tunnel's memory.
pub struct SkCipher {
    inner: Inner,
}

enum Inner {
    Aead { key: AeadSecret, ivs: IvCounter },
    // Boxed: the AES key schedules are large and the AEAD variant is the common one.
    Cbc(Box<CbcKeys>),
}

struct CbcKeys {
    encr: Encryption,
    enc: EncryptingKey,
    dec: DecryptingKey,
    integ: IntegKey,
    /// SK_e and SK_a as derived, for [`SkCipher::keymat`] (the contexts do not give them
    /// back).
    sk_e: SecretBytes,
    sk_a: SecretBytes,
}

impl std::fmt::Debug for SkCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SkCipher")
            .field("encr", &self.encryption())
            .finish_non_exhaustive()
    }
}

impl SkCipher {
    /// A cipher from the negotiated transforms and keys: `sk_e` is SK_ei or SK_er exactly as
    /// derived (cipher key, plus the 4-byte salt for AEAD), `sk_a` SK_ai or SK_ar (empty for
    /// AEAD). `integ` must be `None` for AEAD ciphers and `Some` for AES-CBC.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for a bad transform combination,
    /// [`CryptoError::KeyLength`] for keys of the wrong length.
    pub fn new(
        encr: Encryption,
        integ: Option<Integrity>,
        sk_e: &[u8],
        sk_a: &[u8],
    ) -> Result<Self, CryptoError> {
        let inner = match (encr, integ) {
            (Encryption::AesCbc { .. }, Some(integ)) => {
                let k = cipher_key_len(encr)?;
                if sk_e.len() != k {
                    return Err(CryptoError::KeyLength {
                        what: "SK_e",
                        expected: k,
                        got: sk_e.len(),
                    });
                }
                let alg = if k == 16 { &AES_128 } else { &AES_256 };
                let unbound = || UnboundCipherKey::new(alg, sk_e).map_err(|_| CryptoError::Internal);
                Inner::Cbc(Box::new(CbcKeys {
                    encr,
                    enc: EncryptingKey::cbc(unbound()?).map_err(|_| CryptoError::Internal)?,
                    dec: DecryptingKey::cbc(unbound()?).map_err(|_| CryptoError::Internal)?,
                    integ: IntegKey::new(integ, sk_a)?,
                    sk_e: SecretBytes::from_slice(sk_e),
                    sk_a: SecretBytes::from_slice(sk_a),
                }))
            }
            (Encryption::AesCbc { .. }, None) => {
                return Err(CryptoError::Unsupported("AES-CBC without integrity transform"));
            }
            (_, Some(_)) => {
                return Err(CryptoError::Unsupported(
                    "integrity transform with an AEAD cipher",
                ));
            }
            (_, None) => {
                if !sk_a.is_empty() {
                    return Err(CryptoError::KeyLength {
                        what: "SK_a (AEAD)",
                        expected: 0,
                        got: sk_a.len(),
                    });
                }
                Inner::Aead {
                    key: AeadSecret::new(encr, sk_e)?,
                    ivs: IvCounter::new(),
                }
            }
        };
        Ok(Self { inner })
    }

    /// SK_e and SK_a exactly as [`Self::new`] took them (SK_a empty for an AEAD): to hand
    /// the IKE SA to another process.
    pub fn keymat(&self) -> (SecretBytes, SecretBytes) {
        match &self.inner {
            Inner::Aead { key, .. } => (key.keymat(), SecretBytes::from_slice(&[])),
            Inner::Cbc(k) => (k.sk_e.clone(), k.sk_a.clone()),
        }
    }

    /// How many AEAD nonces sealing used (0 for AES-CBC, whose IVs are random).
    pub fn ivs_used(&self) -> u64 {
        match &self.inner {
            Inner::Aead { ivs, .. } => ivs.used(),
            _ => 0,
        }
    }

    /// Seals on with AEAD nonces from `next` (a key carried on by another process, which
    /// must never repeat one the first used); nothing for AES-CBC.
    pub fn resume_ivs_at(&mut self, next: u64) {
        if let Inner::Aead { ivs, .. } = &mut self.inner {
            *ivs = IvCounter::starting_at(next);
        }
    }

    /// The encryption transform.
    pub fn encryption(&self) -> Encryption {
        match &self.inner {
            Inner::Aead { key, .. } => key.encryption(),
            Inner::Cbc(k) => k.encr,
        }
    }

    /// The integrity transform (`None` for an AEAD).
    pub fn integrity(&self) -> Option<Integrity> {
        match &self.inner {
            Inner::Aead { .. } => None,
            Inner::Cbc(k) => Some(k.integ.algorithm()),
        }
    }

    /// Length of the IV at the start of the body: 16 for AES-CBC, 8 for the AEADs.
    pub fn iv_len(&self) -> usize {
        match self.inner {
            Inner::Aead { .. } => aead::IV_LEN,
            Inner::Cbc(_) => AES_BLOCK,
        }
    }

    /// Length of the ICV at the end of the body: the truncated HMAC length for CBC
    /// (16/24/32), 16 for the AEADs.
    pub fn icv_len(&self) -> usize {
        match &self.inner {
            Inner::Aead { .. } => aead::TAG_LEN,
            Inner::Cbc(k) => integ_icv_len(k.integ.algorithm()),
        }
    }

    /// Alignment of `inner payloads | Padding | Pad Length`: 16 for CBC, 1 for the AEADs
    /// (no alignment is required for the AEAD modes, RFC 5282).
    pub fn block_size(&self) -> usize {
        match self.inner {
            Inner::Aead { .. } => 1,
            Inner::Cbc(_) => AES_BLOCK,
        }
    }

    /// Padding bytes (not counting the Pad Length byte) that [`Self::seal`] adds after
    /// `plaintext_len` bytes of inner payloads: the minimum that aligns payloads, Padding and
    /// Pad Length to the block size (RFC 7296 §3.14 recommends the minimum).
    pub fn pad_len(&self, plaintext_len: usize) -> usize {
        let b = self.block_size();
        (b - (plaintext_len + 1) % b) % b
    }

    /// Length of the SK payload body (IV through ICV) for `plaintext_len` bytes of inner
    /// payloads. The SK Payload Length is this + 4.
    pub fn body_len(&self, plaintext_len: usize) -> usize {
        self.iv_len() + plaintext_len + self.pad_len(plaintext_len) + 1 + self.icv_len()
    }

    /// Where the codec writes the inner payloads before [`Self::seal`]: the offset range in
    /// the message for a body starting at `body_start`.
    pub fn plaintext_range(&self, body_start: usize, plaintext_len: usize) -> Range<usize> {
        let s = body_start + self.iv_len();
        s..s + plaintext_len
    }

    /// Encrypts the SK payload in place. Before the call, `message` is the complete message:
    /// headers and earlier payloads, the SK generic header ending at `body_start`, the inner
    /// payloads at [`Self::plaintext_range`], and room up to `body_start +
    /// body_len(plaintext_len)` == `message.len()`. Writes the IV, Padding, Pad Length and
    /// ICV. AEAD IVs come from this cipher's counter; CBC IVs are random.
    ///
    /// # Errors
    /// [`PacketError::Malformed`] if `message` is not laid out as above,
    /// [`PacketError::IvExhausted`] when the AEAD IV counter is used up (rekey the IKE SA),
    /// [`PacketError::Internal`] if the random generator fails.
    pub fn seal(
        &mut self,
        message: &mut [u8],
        body_start: usize,
        plaintext_len: usize,
    ) -> Result<(), PacketError> {
        let body_len = self.body_len(plaintext_len);
        if body_start.checked_add(body_len) != Some(message.len()) {
            return Err(PacketError::Malformed);
        }
        let iv_len = self.iv_len();
        let icv_len = self.icv_len();
        let pad = self.pad_len(plaintext_len);
        let pt_end = body_start + iv_len + plaintext_len;
        // Padding "MAY contain any value chosen by the sender"; we send zeros.
        message[pt_end..pt_end + pad].fill(0);
        message[pt_end + pad] = pad as u8; // pad < 16
        let enc_range = body_start + iv_len..message.len() - icv_len;
        match &mut self.inner {
            Inner::Aead { key, ivs } => {
                let iv = ivs.next_iv()?;
                message[body_start..body_start + iv_len].copy_from_slice(&iv);
                let (aad, body) = message.split_at_mut(body_start);
                key.seal_in_place(&iv, aad, &mut body[iv_len..])
            }
            Inner::Cbc(k) => {
                let CbcKeys { enc, integ, .. } = &**k;
                // RFC 3602 (AES-CBC for IPsec): "The IV MUST
                // be chosen at random, and MUST be unpredictable."
                let mut iv = [0u8; AES_BLOCK];
                rand::fill(&mut iv).map_err(|_| PacketError::Internal)?;
                message[body_start..body_start + AES_BLOCK].copy_from_slice(&iv);
                enc.less_safe_encrypt(&mut message[enc_range], EncryptionContext::Iv128(iv.into()))
                    .map_err(|_| PacketError::Internal)?;
                let (signed, icv) = message.split_at_mut(message.len() - icv_len);
                integ.sign_into(signed, icv)
            }
        }
    }

    /// Verifies and decrypts the SK payload of `message` in place (the body runs from
    /// `body_start` to the end of `message`) and returns the range of the inner payloads in
    /// `message` (Padding and Pad Length removed). Nothing is decrypted if the ICV fails.
    ///
    /// # Errors
    /// [`PacketError::Malformed`] for a body too short or (CBC) not block-aligned,
    /// [`PacketError::IcvMismatch`] if the ICV does not verify,
    /// [`PacketError::BadPadding`] if Pad Length exceeds the decrypted data.
    pub fn open(&self, message: &mut [u8], body_start: usize) -> Result<Range<usize>, PacketError> {
        let iv_len = self.iv_len();
        let icv_len = self.icv_len();
        let body_len = message
            .len()
            .checked_sub(body_start)
            .ok_or(PacketError::Malformed)?;
        // At least the Pad Length byte must be encrypted.
        let enc_len = body_len
            .checked_sub(iv_len + icv_len)
            .ok_or(PacketError::Malformed)?;
        if enc_len == 0 || !enc_len.is_multiple_of(self.block_size()) {
            return Err(PacketError::Malformed);
        }
        let enc_start = body_start + iv_len;
        match &self.inner {
            Inner::Aead { key, .. } => {
                let mut iv = [0u8; aead::IV_LEN];
                iv.copy_from_slice(&message[body_start..enc_start]);
                let (aad, body) = message.split_at_mut(body_start);
                key.open_in_place(&iv, aad, &mut body[iv_len..])?;
            }
            Inner::Cbc(k) => {
                let CbcKeys { dec, integ, .. } = &**k;
                // Integrity first, over everything up to the ICV; decrypt only after it holds.
                let (signed, icv) = message.split_at(message.len() - icv_len);
                integ.verify(signed, icv)?;
                let mut iv = [0u8; AES_BLOCK];
                iv.copy_from_slice(&message[body_start..enc_start]);
                dec.decrypt(
                    &mut message[enc_start..enc_start + enc_len],
                    DecryptionContext::Iv128(iv.into()),
                )
                .map_err(|_| PacketError::Internal)?;
            }
        }
        let pad_len_at = enc_start + enc_len - 1;
        let pad = usize::from(message[pad_len_at]);
        if pad + 1 > enc_len {
            return Err(PacketError::BadPadding);
        }
        Ok(enc_start..pad_len_at - pad)
    }
}
