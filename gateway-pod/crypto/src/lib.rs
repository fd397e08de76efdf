//! IKEv2 and ESP cryptography for the concentrator, all through aws-lc-rs (AWS-LC).
//!
//! - [`prf`]: the negotiated PRF (HMAC-SHA2) and prf+ (RFC 7296 §2.13), plus the truncated
//!   HMAC integrity transforms (RFC 4868).
//! - [`keymat`]: SKEYSEED and the seven SK_* keys (§2.14), the rekeyed SKEYSEED (§2.18) and
//!   CHILD SA KEYMAT split per direction (§2.17), in [`SecretBytes`] that zeroize on drop.
//! - [`dh`]: [`KeyExchange`] for groups 14, 15 (MODP), 19, 20 (ECP) and 31 (Curve25519), with
//!   public values in the exact KE payload encoding and peer-value validation.
//! - [`aead`]: AES-GCM-16 and ChaCha20-Poly1305 seal/open with a 4-byte salt and a caller-given
//!   8-byte explicit IV, shared by the IKE SK payload and the ESP data plane; [`IvCounter`].
//! - [`cbc`]: AES-CBC keys for ESP (RFC 3602), whole blocks in place, IVs derived from the
//!   sequence number.
//! - [`cipher`]: [`SkCipher`], the SK (Encrypted) payload of RFC 7296 §3.14 / RFC 5282 /
//!   RFC 7634, with the framing rules (IV, padding, ICV) in one place.
//! - [`util`]: SHA-1 for NAT detection, the system random generator, constant-time equality.
//!
//! Nothing here panics on peer input: every length and value that comes off the wire is
//! checked and answered with an error.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod aead;
pub mod cbc;
pub mod cipher;
pub mod dh;
mod error;
pub mod keymat;
pub mod prf;
pub mod util;

pub use aead::{AeadKey, AeadSecret, IvCounter};
pub use cipher::SkCipher;
pub use concentrator_algorithms::{DhGroup, Encryption, Integrity, Prf as PrfAlg};
pub use dh::KeyExchange;
pub use error::{CryptoError, PacketError};
pub use keymat::{ChildSaKeys, DirectionKeys, IkeSaKeys, InlineSecret, SecretBytes};
pub use prf::Prf;
