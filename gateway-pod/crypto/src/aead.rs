//! AES-GCM-16 (128/256) and ChaCha20-Poly1305 with the IPsec nonce layout, shared by the IKE
//! SK payload ([`crate::SkCipher`]) and the ESP data plane.
//!
//! The nonce is `salt (4 bytes, from the key material) || IV (8 bytes, carried in the packet)`
//! for both ciphers (RFC 4106 and RFC 5282 for GCM, RFC 7634 §2 for ChaCha20-Poly1305), and
//! the ICV is 16 bytes.

use std::sync::OnceLock;

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use concentrator_algorithms::Encryption;

use crate::error::{CryptoError, PacketError};
use crate::keymat::{DirectionKeys, SALT_LEN, SecretBytes, cipher_key_len, key_and_salt};

/// Length of the explicit IV carried in each packet.
pub const IV_LEN: usize = 8;
/// Length of the ICV (authentication tag) of every supported AEAD.
pub const TAG_LEN: usize = 16;

/// An AEAD key with its salt, and no cipher context: each seal or open builds AWS-LC's
/// context (key schedule and GHASH tables, about 0.6 KB for AES-GCM) and drops it after the
/// call. For keys that protect a message now and then: the IKE SA's SK payload (IKE_AUTH,
/// then a liveness check every half minute or so, rekeys), where a cached context would
/// cost every idle tunnel its size for the one microsecond a message takes to seal; the
/// context costs about as much to build as to seal one short message. Per-packet keys (ESP)
/// use [`AeadKey`], which keeps its context once built.
pub struct AeadSecret {
    encr: Encryption,
    /// The cipher key (wiped on drop), of which the first `len` bytes are used.
    material: zeroize::Zeroizing<[u8; MAX_KEY_LEN]>,
    len: u8,
    salt: [u8; SALT_LEN],
}

/// The longest AEAD key (AES-256, ChaCha20).
const MAX_KEY_LEN: usize = 32;

impl std::fmt::Debug for AeadSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AeadSecret")
            .field("encr", &self.encr)
            .finish_non_exhaustive()
    }
}

impl Drop for AeadSecret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.salt);
    }
}

impl AeadSecret {
    /// A key from `keymat = key || salt` as taken from KEYMAT or SK_e (20 bytes for
    /// AES-128-GCM, 36 for AES-256-GCM and ChaCha20-Poly1305).
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for a non-AEAD transform, [`CryptoError::KeyLength`] for
    /// key material of the wrong length.
    pub fn new(encr: Encryption, keymat: &[u8]) -> Result<Self, CryptoError> {
        algorithm(encr)?;
        let k = cipher_key_len(encr)?;
        if keymat.len() != k + SALT_LEN {
            return Err(CryptoError::KeyLength {
                what: "AEAD key + salt",
                expected: k + SALT_LEN,
                got: keymat.len(),
            });
        }
        let (key, salt) = keymat.split_at(k);
        let mut material = zeroize::Zeroizing::new([0; MAX_KEY_LEN]);
        material
            .get_mut(..k)
            .ok_or(CryptoError::Unsupported("AEAD key longer than 32 bytes"))?
            .copy_from_slice(key);
        let mut s = [0; SALT_LEN];
        s.copy_from_slice(salt);
        Ok(Self {
            encr,
            material,
            len: u8::try_from(k).map_err(|_| CryptoError::Internal)?,
            salt: s,
        })
    }

    /// The transform.
    pub fn encryption(&self) -> Encryption {
        self.encr
    }

    /// `key || salt`, the form [`Self::new`] takes (to hand the key to another process).
    pub fn keymat(&self) -> SecretBytes {
        let key = self.material.get(..usize::from(self.len)).unwrap_or_default();
        let mut keymat = SecretBytes::zeroed(key.len() + SALT_LEN);
        let out = keymat.bytes_mut();
        out[..key.len()].copy_from_slice(key);
        out[key.len()..].copy_from_slice(&self.salt);
        keymat
    }

    /// A cipher context for this key (AWS-LC's key schedule; dropped by the caller).
    fn context(&self) -> Result<LessSafeKey, PacketError> {
        let material = self
            .material
            .get(..usize::from(self.len))
            .ok_or(PacketError::Internal)?;
        let alg = algorithm(self.encr).map_err(|_| PacketError::Internal)?;
        UnboundKey::new(alg, material)
            .map(LessSafeKey::new)
            .map_err(|_| PacketError::Internal)
    }

    fn nonce(&self, iv: &[u8; IV_LEN]) -> Nonce {
        let mut n = [0u8; 12];
        n[..SALT_LEN].copy_from_slice(&self.salt);
        n[SALT_LEN..].copy_from_slice(iv);
        Nonce::assume_unique_for_key(n)
    }

    /// As [`AeadKey::seal_in_place`], with a context built for this call.
    ///
    /// # Errors
    /// As [`AeadKey::seal_in_place`].
    pub fn seal_in_place(&self, iv: &[u8; IV_LEN], aad: &[u8], data: &mut [u8]) -> Result<(), PacketError> {
        seal_with(&self.context()?, self.nonce(iv), aad, data)
    }

    /// As [`AeadKey::open_in_place`], with a context built for this call.
    ///
    /// # Errors
    /// As [`AeadKey::open_in_place`].
    pub fn open_in_place<'a>(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        data: &'a mut [u8],
    ) -> Result<&'a mut [u8], PacketError> {
        if data.len() < TAG_LEN {
            return Err(PacketError::Malformed);
        }
        open_with(&self.context()?, self.nonce(iv), aad, data)
    }
}

/// The AWS-LC algorithm of an AEAD transform.
fn algorithm(encr: Encryption) -> Result<&'static Algorithm, CryptoError> {
    match encr {
        Encryption::AesGcm16 { key_bits: 128 } => Ok(&AES_128_GCM),
        Encryption::AesGcm16 { key_bits: 256 } => Ok(&AES_256_GCM),
        Encryption::ChaCha20Poly1305 => Ok(&CHACHA20_POLY1305),
        Encryption::AesGcm16 { .. } => Err(CryptoError::Unsupported("AES-GCM key length")),
        Encryption::AesCbc { .. } => Err(CryptoError::Unsupported("AES-CBC is not an AEAD")),
    }
}

fn seal_with(key: &LessSafeKey, nonce: Nonce, aad: &[u8], data: &mut [u8]) -> Result<(), PacketError> {
    let Some(pt_len) = data.len().checked_sub(TAG_LEN) else {
        return Err(PacketError::Malformed);
    };
    let (pt, icv) = data.split_at_mut(pt_len);
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(aad), pt)
        .map_err(|_| PacketError::Internal)?;
    icv.copy_from_slice(tag.as_ref());
    Ok(())
}

fn open_with<'a>(
    key: &LessSafeKey,
    nonce: Nonce,
    aad: &[u8],
    data: &'a mut [u8],
) -> Result<&'a mut [u8], PacketError> {
    key.open_in_place(nonce, Aad::from(aad), data)
        .map_err(|_| PacketError::IcvMismatch)
}

/// An AEAD key with its salt. Immutable and `Sync`: one per SA direction, shareable between
/// worker threads; the IV is supplied per call.
///
/// The cipher's context (AWS-LC's key schedule and GHASH tables, about 1.2 KB) is built on
/// the first seal or open, not here, and kept: a tunnel that carries no traffic keeps its 16
/// or 32 bytes of key instead, and a concentrator holds many such tunnels.
pub struct AeadKey {
    secret: AeadSecret,
    /// Built from `secret` on first use (`None`: AWS-LC refused the key, which the length
    /// checks in [`AeadSecret::new`] rule out).
    key: OnceLock<Option<LessSafeKey>>,
}

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AeadKey")
            .field("encr", &self.secret.encr)
            .finish_non_exhaustive()
    }
}

impl AeadKey {
    /// A key from `keymat = key || salt` as taken from KEYMAT or SK_e (20 bytes for
    /// AES-128-GCM, 36 for AES-256-GCM and ChaCha20-Poly1305).
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for a non-AEAD transform, [`CryptoError::KeyLength`] for
    /// key material of the wrong length.
    pub fn new(encr: Encryption, keymat: &[u8]) -> Result<Self, CryptoError> {
        Ok(Self {
            secret: AeadSecret::new(encr, keymat)?,
            key: OnceLock::new(),
        })
    }

    /// The cipher's context, built on first use.
    fn key(&self) -> Result<&LessSafeKey, PacketError> {
        self.key
            .get_or_init(|| self.secret.context().ok())
            .as_ref()
            .ok_or(PacketError::Internal)
    }

    /// A key for one direction of a CHILD SA.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn from_direction(encr: Encryption, keys: &DirectionKeys) -> Result<Self, CryptoError> {
        Self::new(encr, &key_and_salt(keys))
    }

    /// The transform.
    pub fn encryption(&self) -> Encryption {
        self.secret.encr
    }

    /// Encrypts `data[..len - 16]` in place and writes the 16-byte ICV into the last 16 bytes
    /// of `data`. `iv` must never repeat under this key (use an [`IvCounter`]); `aad` is the
    /// associated data (ESP: SPI || sequence number, or SPI || seq_hi || seq_lo with ESN).
    ///
    /// # Errors
    /// [`PacketError::Malformed`] if `data` is shorter than the ICV.
    pub fn seal_in_place(&self, iv: &[u8; IV_LEN], aad: &[u8], data: &mut [u8]) -> Result<(), PacketError> {
        if data.len() < TAG_LEN {
            return Err(PacketError::Malformed);
        }
        seal_with(self.key()?, self.secret.nonce(iv), aad, data)
    }

    /// Decrypts `data = ciphertext || ICV` in place and returns the plaintext (the first
    /// `len - 16` bytes).
    ///
    /// # Errors
    /// [`PacketError::Malformed`] if `data` is shorter than the ICV,
    /// [`PacketError::IcvMismatch`] if the ICV does not verify (nothing is returned then).
    pub fn open_in_place<'a>(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        data: &'a mut [u8],
    ) -> Result<&'a mut [u8], PacketError> {
        if data.len() < TAG_LEN {
            return Err(PacketError::Malformed);
        }
        open_with(self.key()?, self.secret.nonce(iv), aad, data)
    }
}

/// ESP associated data (RFC 4106; RFC 7634 §2.1 "AAD Construction"): SPI || sequence number (8 bytes), or
/// with extended sequence numbers SPI || high 32 bits || low 32 bits (12 bytes). Returns the
/// buffer and the number of bytes used.
pub fn esp_aad(spi: u32, seq: u64, esn: bool) -> ([u8; 12], usize) {
    let mut a = [0u8; 12];
    a[..4].copy_from_slice(&spi.to_be_bytes());
    if esn {
        a[4..8].copy_from_slice(&((seq >> 32) as u32).to_be_bytes());
        a[8..12].copy_from_slice(&(seq as u32).to_be_bytes());
        (a, 12)
    } else {
        a[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        (a, 8)
    }
}

/// Explicit IVs for one AEAD key: a counter, never random, so an IV cannot repeat under the
/// key (a repeated GCM or ChaCha20-Poly1305 nonce reveals the authentication key). This is the
/// counter nonce of RFC 5116 §3.2 with the salt as its fixed field: "The Counter part SHOULD
/// be equal to zero for the first nonce, and increment by one for each successive nonce that
/// is generated." Keep exactly one counter per key and never reset it while the key lives.
#[derive(Debug, Default)]
pub struct IvCounter {
    next: u64,
}

impl IvCounter {
    /// A counter starting at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// A counter resuming at `next` (after a takeover, jump ahead by a safe margin).
    pub fn starting_at(next: u64) -> Self {
        Self { next }
    }

    /// How many IVs were handed out.
    pub fn used(&self) -> u64 {
        self.next
    }

    /// The next IV.
    ///
    /// # Errors
    /// [`PacketError::IvExhausted`] after 2^64 - 1 IVs: the key must be replaced.
    pub fn next_iv(&mut self) -> Result<[u8; IV_LEN], PacketError> {
        let v = self.next;
        self.next = v.checked_add(1).ok_or(PacketError::IvExhausted)?;
        Ok(v.to_be_bytes())
    }
}
