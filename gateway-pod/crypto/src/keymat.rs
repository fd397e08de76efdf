//! Key derivation: SKEYSEED and SK_* for IKE_SA_INIT (RFC 7296 §2.14), the rekeyed SKEYSEED
//! (§2.18) and CHILD SA KEYMAT (§2.17).

use concentrator_algorithms::{Encryption, Integrity};
use zeroize::{Zeroize, Zeroizing};

use crate::error::CryptoError;
use crate::prf::{Prf, integ_key_len};

/// Secret key material: zeroized on drop, never printed (`Debug` shows only the length).
/// No `PartialEq`: comparing secrets must be constant-time (`aws_lc_rs::constant_time`).
#[derive(Clone)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Copies `b` into a new secret.
    pub fn from_slice(b: &[u8]) -> Self {
        Self(b.to_vec())
    }

    pub(crate) fn zeroed(len: usize) -> Self {
        Self(vec![0; len])
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes (integrity keys of AEAD transforms).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The key bytes. Handle with care: do not log or copy them into unzeroized buffers.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for SecretBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes(<{} bytes>)", self.0.len())
    }
}

/// Secret key material of at most `N` bytes held inline, without a heap block of its own:
/// for a key kept as long as an SA lives (SK_d), where a `Vec` would cost a pointer,
/// capacity and length, a block and malloc's overhead per SA. Zeroized on drop, never
/// printed (`Debug` shows only the length).
#[derive(Clone)]
pub struct InlineSecret<const N: usize> {
    bytes: [u8; N],
    len: u8,
}

impl<const N: usize> InlineSecret<N> {
    /// Copies `b`; `None` if it is longer than `N` (or 255) bytes.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        let len = u8::try_from(b.len()).ok()?;
        let mut bytes = [0; N];
        bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(Self { bytes, len })
    }

    /// The key bytes. Handle with care: do not log or copy them into unzeroized buffers.
    pub fn expose(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }

    /// A heap copy, for the APIs that take one.
    pub fn to_secret(&self) -> SecretBytes {
        SecretBytes::from_slice(self.expose())
    }
}

impl<const N: usize> Drop for InlineSecret<N> {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl<const N: usize> std::fmt::Debug for InlineSecret<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InlineSecret(<{} bytes>)", self.len)
    }
}

/// Length of the AEAD salt taken from the end of each AEAD key (RFC 4106 §8.1 and
/// RFC 5282 §7.1 for AES-GCM; RFC 7634 for ChaCha20-Poly1305): 4 bytes.
pub const SALT_LEN: usize = 4;

/// Bytes of key material an encryption transform takes from KEYMAT / SK_e: the cipher key,
/// plus the 4-byte salt for the AEAD transforms.
///
/// # Errors
/// [`CryptoError::Unsupported`] for AES key lengths other than 128 and 256 bits.
pub fn encr_keymat_len(encr: Encryption) -> Result<usize, CryptoError> {
    Ok(cipher_key_len(encr)? + if encr.is_aead() { SALT_LEN } else { 0 })
}

/// Length of the cipher key proper (no salt).
///
/// # Errors
/// [`CryptoError::Unsupported`] for AES key lengths other than 128 and 256 bits.
pub fn cipher_key_len(encr: Encryption) -> Result<usize, CryptoError> {
    match encr {
        Encryption::AesCbc { key_bits: 128 } | Encryption::AesGcm16 { key_bits: 128 } => Ok(16),
        Encryption::AesCbc { key_bits: 256 } | Encryption::AesGcm16 { key_bits: 256 } => Ok(32),
        Encryption::ChaCha20Poly1305 => Ok(32),
        Encryption::AesCbc { .. } | Encryption::AesGcm16 { .. } => Err(CryptoError::Unsupported(
            "AES key length other than 128 or 256 bits",
        )),
    }
}

/// Checks that an integrity transform is present exactly when the cipher is not an AEAD.
fn integ_len(encr: Encryption, integ: Option<Integrity>) -> Result<usize, CryptoError> {
    match (encr.is_aead(), integ) {
        (true, None) => Ok(0),
        (false, Some(i)) => Ok(integ_key_len(i)),
        (true, Some(_)) => Err(CryptoError::Unsupported(
            "integrity transform with an AEAD cipher",
        )),
        (false, None) => Err(CryptoError::Unsupported(
            "non-AEAD cipher without integrity transform",
        )),
    }
}

/// `SKEYSEED = prf(Ni | Nr, g^ir)` (RFC 7296 §2.14). `g_ir` is the shared secret exactly as
/// [`crate::KeyExchange::compute_shared`] returns it (MODP: padded to the modulus length).
pub fn skeyseed(prf: Prf, ni: &[u8], nr: &[u8], g_ir: &[u8]) -> SecretBytes {
    let key: Vec<u8> = [ni, nr].concat();
    prf.compute(&key, &[g_ir])
}

/// `SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)` for an IKE SA rekey (RFC 7296 §2.18).
/// `old_prf` must be the old IKE SA's PRF: "Because the rekeying exchange belongs to the old
/// IKE SA, it is the old IKE SA's PRF that is used to generate SKEYSEED." The new SA's keys
/// are then [`IkeSaKeys::derive`] with the new PRF, SPIs and nonces. There is no variant
/// without `g_ir`: "implementations MUST perform a new Diffie-Hellman exchange when rekeying
/// the IKE SA."
pub fn rekey_skeyseed(old_prf: Prf, old_sk_d: &[u8], g_ir_new: &[u8], ni: &[u8], nr: &[u8]) -> SecretBytes {
    old_prf.compute(old_sk_d, &[g_ir_new, ni, nr])
}

/// The seven IKE SA keys of RFC 7296 §2.14, in the order they are taken from prf+.
#[derive(Clone, Debug)]
pub struct IkeSaKeys {
    /// SK_d: derives CHILD SA keys (and the next SKEYSEED on rekey).
    pub sk_d: SecretBytes,
    /// SK_ai: integrity key for messages from the original initiator (empty for AEAD).
    pub sk_ai: SecretBytes,
    /// SK_ar: integrity key for messages from the original responder (empty for AEAD).
    pub sk_ar: SecretBytes,
    /// SK_ei: encryption key (+ 4-byte salt for AEAD) for messages from the initiator.
    pub sk_ei: SecretBytes,
    /// SK_er: encryption key (+ 4-byte salt for AEAD) for messages from the responder.
    pub sk_er: SecretBytes,
    /// SK_pi: for the initiator's AUTH payload.
    pub sk_pi: SecretBytes,
    /// SK_pr: for the responder's AUTH payload.
    pub sk_pr: SecretBytes,
}

impl IkeSaKeys {
    /// `{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+ (SKEYSEED, Ni | Nr |
    /// SPIi | SPIr)` (RFC 7296 §2.14). `integ` is `None` for AEAD ciphers.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for an unsupported key length or an integrity transform
    /// given with an AEAD cipher (or missing with CBC).
    #[allow(clippy::too_many_arguments)]
    pub fn derive(
        prf: Prf,
        skeyseed: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: &[u8; 8],
        spi_r: &[u8; 8],
        encr: Encryption,
        integ: Option<Integrity>,
    ) -> Result<Self, CryptoError> {
        // RFC 7296 §2.14: "The lengths of SK_d, SK_pi, and SK_pr MUST be the preferred key
        // length of the PRF agreed upon." (for HMAC PRFs, the hash output length; §2.13).
        let p = prf.output_len();
        let a = integ_len(encr, integ)?;
        let e = encr_keymat_len(encr)?;
        let lens = [p, a, a, e, e, p, p];
        let total: usize = lens.iter().sum();
        let stream = prf.prf_plus(skeyseed, &[ni, nr, spi_i, spi_r], total)?;
        let mut keys = split(stream.expose(), &lens).into_iter();
        let mut next = || keys.next().unwrap_or_else(|| SecretBytes::zeroed(0));
        Ok(Self {
            sk_d: next(),
            sk_ai: next(),
            sk_ar: next(),
            sk_ei: next(),
            sk_er: next(),
            sk_pi: next(),
            sk_pr: next(),
        })
    }

    /// SKEYSEED from the IKE_SA_INIT values, then [`Self::derive`]; SKEYSEED is dropped
    /// (zeroized) before returning.
    ///
    /// # Errors
    /// As [`Self::derive`].
    #[allow(clippy::too_many_arguments)]
    pub fn from_ike_sa_init(
        prf: Prf,
        ni: &[u8],
        nr: &[u8],
        g_ir: &[u8],
        spi_i: &[u8; 8],
        spi_r: &[u8; 8],
        encr: Encryption,
        integ: Option<Integrity>,
    ) -> Result<Self, CryptoError> {
        let seed = skeyseed(prf, ni, nr, g_ir);
        Self::derive(prf, seed.expose(), ni, nr, spi_i, spi_r, encr, integ)
    }
}

fn split(stream: &[u8], lens: &[usize]) -> Vec<SecretBytes> {
    let mut at = 0;
    lens.iter()
        .map(|&n| {
            let k = SecretBytes::from_slice(stream.get(at..at + n).unwrap_or_default());
            at += n;
            k
        })
        .collect()
}

/// The keys of one direction of a CHILD SA (one ESP SA).
#[derive(Clone, Debug)]
pub struct DirectionKeys {
    /// The cipher key (16 or 32 bytes), without the salt.
    pub encr: SecretBytes,
    /// The 4-byte AEAD salt (the last 4 bytes of the transform's key material); empty for CBC.
    pub salt: SecretBytes,
    /// The integrity key; empty for AEAD.
    pub integ: SecretBytes,
}

/// The keys of a CHILD SA: `initiator` protects traffic from the IKE SA's original initiator
/// (for the CHILD SA's creator's direction as in §2.17), `responder` the other direction.
#[derive(Clone, Debug)]
pub struct ChildSaKeys {
    /// Keys for the SA carrying data from the initiator to the responder.
    pub initiator: DirectionKeys,
    /// Keys for the SA carrying data from the responder to the initiator.
    pub responder: DirectionKeys,
}

impl ChildSaKeys {
    /// `KEYMAT = prf+(SK_d, Ni | Nr)`, or `prf+(SK_d, g^ir (new) | Ni | Nr)` with a
    /// CREATE_CHILD_SA Diffie-Hellman exchange (RFC 7296 §2.17), split into per-direction
    /// keys. Ni/Nr are the IKE_SA_INIT nonces for the first CHILD SA and the fresh
    /// CREATE_CHILD_SA nonces otherwise.
    ///
    /// # Errors
    /// As [`IkeSaKeys::derive`].
    pub fn derive(
        prf: Prf,
        sk_d: &[u8],
        g_ir_new: Option<&[u8]>,
        ni: &[u8],
        nr: &[u8],
        encr: Encryption,
        integ: Option<Integrity>,
    ) -> Result<Self, CryptoError> {
        let a = integ_len(encr, integ)?;
        let k = cipher_key_len(encr)?;
        let s = if encr.is_aead() { SALT_LEN } else { 0 };
        let g_ir = g_ir_new.unwrap_or_default();
        let stream = prf.prf_plus(sk_d, &[g_ir, ni, nr], 2 * (k + s + a))?;
        // RFC 7296 §2.17: "keying material for each Child SA MUST be taken from the expanded
        // KEYMAT using the following rules: All keys for SAs carrying data from the initiator
        // to the responder are taken before SAs going from the responder to the initiator.
        // [...] For ESP and AH, [IPSECARCH] defines the order, namely: the encryption key (if
        // any) MUST be taken from the first bits and the integrity key (if any) MUST be taken
        // from the remaining bits." The AEAD salt is part of the encryption key material and
        // follows the key (RFC 4106 §8.1, RFC 7634).
        let mut parts = split(stream.expose(), &[k, s, a, k, s, a]).into_iter();
        let mut next = || parts.next().unwrap_or_else(|| SecretBytes::zeroed(0));
        let initiator = DirectionKeys {
            encr: next(),
            salt: next(),
            integ: next(),
        };
        let responder = DirectionKeys {
            encr: next(),
            salt: next(),
            integ: next(),
        };
        Ok(Self { initiator, responder })
    }
}

/// Concatenates key and salt into one zeroizing buffer (the form SK_e and the AEAD
/// constructors take).
pub(crate) fn key_and_salt(keys: &DirectionKeys) -> Zeroizing<Vec<u8>> {
    Zeroizing::new([keys.encr.expose(), keys.salt.expose()].concat())
}
