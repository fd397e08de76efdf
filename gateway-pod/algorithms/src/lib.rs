//! The IKEv2/ESP algorithms the concentrator implements, and proposal strings in strongSwan's
//! syntax (`aes128gcm16-prfsha256-x25519`, `aes256-sha256-modp2048`, `aes128gcm16-esn`)
//! parsed into them. Each token is one algorithm; a proposal may name several of a kind.
//!
//! A crate of its own below everything that uses these types: the CRDs parse proposals with
//! it, and the IKE engine, the crypto and the data plane negotiate and run them, without the
//! sans-IO core depending on the Kubernetes schema crates.

use std::fmt;

/// A proposal string that cannot be used: the field it came from and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ProposalError {
    /// Where the proposal was given, e.g. `spec.ike.proposals[0]`.
    pub field: String,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
}

impl ProposalError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Encryption algorithm (IKEv2 transform type 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encryption {
    /// ENCR_AES_CBC with a 128 or 256 bit key.
    AesCbc { key_bits: u16 },
    /// ENCR_AES_GCM_16 (16 byte ICV) with a 128 or 256 bit key.
    AesGcm16 { key_bits: u16 },
    /// ENCR_CHACHA20_POLY1305.
    ChaCha20Poly1305,
}

impl Encryption {
    /// IANA transform ID.
    pub fn transform_id(self) -> u16 {
        match self {
            Self::AesCbc { .. } => 12,
            Self::AesGcm16 { .. } => 20,
            Self::ChaCha20Poly1305 => 28,
        }
    }

    /// Key length attribute, if the transform carries one.
    pub fn key_bits(self) -> Option<u16> {
        match self {
            Self::AesCbc { key_bits } | Self::AesGcm16 { key_bits } => Some(key_bits),
            Self::ChaCha20Poly1305 => None,
        }
    }

    /// Combined-mode ciphers carry their own integrity check.
    pub fn is_aead(self) -> bool {
        !matches!(self, Self::AesCbc { .. })
    }
}

/// Integrity algorithm (transform type 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Integrity {
    HmacSha256_128,
    HmacSha384_192,
    HmacSha512_256,
}

impl Integrity {
    /// IANA transform ID.
    pub fn transform_id(self) -> u16 {
        match self {
            Self::HmacSha256_128 => 12,
            Self::HmacSha384_192 => 13,
            Self::HmacSha512_256 => 14,
        }
    }

    /// The PRF strongSwan derives from this integrity algorithm when none is configured.
    pub fn matching_prf(self) -> Prf {
        match self {
            Self::HmacSha256_128 => Prf::HmacSha256,
            Self::HmacSha384_192 => Prf::HmacSha384,
            Self::HmacSha512_256 => Prf::HmacSha512,
        }
    }
}

/// Pseudo-random function (transform type 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prf {
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

impl Prf {
    /// IANA transform ID.
    pub fn transform_id(self) -> u16 {
        match self {
            Self::HmacSha256 => 5,
            Self::HmacSha384 => 6,
            Self::HmacSha512 => 7,
        }
    }
}

/// Diffie-Hellman group (transform type 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DhGroup {
    Modp2048,
    Modp3072,
    Ecp256,
    Ecp384,
    Curve25519,
}

impl DhGroup {
    /// IANA group number.
    pub fn number(self) -> u16 {
        match self {
            Self::Modp2048 => 14,
            Self::Modp3072 => 15,
            Self::Ecp256 => 19,
            Self::Ecp384 => 20,
            Self::Curve25519 => 31,
        }
    }
}

/// Extended sequence numbers (transform type 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Esn {
    No,
    Yes,
}

/// One IKE SA proposal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IkeProposal {
    pub encryption: Vec<Encryption>,
    /// Empty for AEAD proposals.
    pub integrity: Vec<Integrity>,
    pub prf: Vec<Prf>,
    pub dh: Vec<DhGroup>,
}

/// One ESP (CHILD SA) proposal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EspProposal {
    pub encryption: Vec<Encryption>,
    /// Empty for AEAD proposals.
    pub integrity: Vec<Integrity>,
    /// PFS groups for CREATE_CHILD_SA; empty means no PFS.
    pub dh: Vec<DhGroup>,
    pub esn: Vec<Esn>,
}

enum Token {
    Enc(Encryption),
    Integ(Integrity),
    Prf(Prf),
    Dh(DhGroup),
    Esn(Esn),
}

fn token(t: &str) -> Result<Token, String> {
    use Encryption::*;
    Ok(match t {
        "aes" | "aes128" => Token::Enc(AesCbc { key_bits: 128 }),
        "aes256" => Token::Enc(AesCbc { key_bits: 256 }),
        "aes128gcm16" | "aes128gcm128" | "aes128gcm" => Token::Enc(AesGcm16 { key_bits: 128 }),
        "aes256gcm16" | "aes256gcm128" | "aes256gcm" => Token::Enc(AesGcm16 { key_bits: 256 }),
        "chacha20poly1305" => Token::Enc(ChaCha20Poly1305),
        "sha256" | "sha2_256" => Token::Integ(Integrity::HmacSha256_128),
        "sha384" | "sha2_384" => Token::Integ(Integrity::HmacSha384_192),
        "sha512" | "sha2_512" => Token::Integ(Integrity::HmacSha512_256),
        "prfsha256" => Token::Prf(Prf::HmacSha256),
        "prfsha384" => Token::Prf(Prf::HmacSha384),
        "prfsha512" => Token::Prf(Prf::HmacSha512),
        "modp2048" => Token::Dh(DhGroup::Modp2048),
        "modp3072" => Token::Dh(DhGroup::Modp3072),
        "ecp256" => Token::Dh(DhGroup::Ecp256),
        "ecp384" => Token::Dh(DhGroup::Ecp384),
        "x25519" | "curve25519" => Token::Dh(DhGroup::Curve25519),
        "esn" => Token::Esn(Esn::Yes),
        "noesn" => Token::Esn(Esn::No),
        "aes192" | "aes192gcm16" | "aes192gcm128" | "aes192gcm" => {
            return Err(format!(
                "'{t}' is not supported: use a 128 or 256 bit key (aes128..., aes256...)"
            ));
        }
        "3des" | "des" | "md5" | "sha1" | "sha" | "prfsha1" | "prfmd5" | "modp768" | "modp1024"
        | "modp1536" => {
            return Err(format!("'{t}' is too weak and not supported"));
        }
        _ => {
            return Err(format!(
                "unknown algorithm '{t}'; supported: aes128, aes256, aes128gcm16, aes256gcm16, \
                 chacha20poly1305, sha256, sha384, sha512, prfsha256, prfsha384, prfsha512, \
                 modp2048, modp3072, ecp256, ecp384, x25519, esn, noesn"
            ));
        }
    })
}

struct Parsed {
    enc: Vec<Encryption>,
    integ: Vec<Integrity>,
    prf: Vec<Prf>,
    dh: Vec<DhGroup>,
    esn: Vec<Esn>,
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

fn parse_tokens(field: &str, s: &str) -> Result<Parsed, ProposalError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(ProposalError::new(field, "proposal must not be empty"));
    }
    let mut p = Parsed {
        enc: vec![],
        integ: vec![],
        prf: vec![],
        dh: vec![],
        esn: vec![],
    };
    for t in s.split('-') {
        match token(&t.to_ascii_lowercase()).map_err(|m| ProposalError::new(field, m))? {
            Token::Enc(x) => push_unique(&mut p.enc, x),
            Token::Integ(x) => push_unique(&mut p.integ, x),
            Token::Prf(x) => push_unique(&mut p.prf, x),
            Token::Dh(x) => push_unique(&mut p.dh, x),
            Token::Esn(x) => push_unique(&mut p.esn, x),
        }
    }
    if p.enc.is_empty() {
        return Err(ProposalError::new(
            field,
            format!("'{s}' names no encryption algorithm (e.g. aes128gcm16 or aes256)"),
        ));
    }
    let aead = p.enc.iter().filter(|e| e.is_aead()).count();
    if aead != 0 && aead != p.enc.len() {
        return Err(ProposalError::new(
            field,
            format!("'{s}' mixes AEAD and non-AEAD ciphers; put them in separate proposals"),
        ));
    }
    if aead != 0 && !p.integ.is_empty() {
        return Err(ProposalError::new(
            field,
            format!("'{s}': AEAD ciphers carry their own integrity check; remove the integrity algorithm"),
        ));
    }
    if aead == 0 && p.integ.is_empty() {
        return Err(ProposalError::new(
            field,
            format!("'{s}' needs an integrity algorithm (sha256, sha384 or sha512) with a non-AEAD cipher"),
        ));
    }
    Ok(p)
}

/// Parses an IKE proposal such as `aes128gcm16-prfsha256-x25519` or `aes256-sha256-modp2048`.
pub fn parse_ike(field: &str, s: &str) -> Result<IkeProposal, ProposalError> {
    let mut p = parse_tokens(field, s)?;
    if !p.esn.is_empty() {
        return Err(ProposalError::new(
            field,
            format!("'{s}': esn/noesn only apply to ESP proposals"),
        ));
    }
    if p.dh.is_empty() {
        return Err(ProposalError::new(
            field,
            format!("'{s}' names no Diffie-Hellman group (e.g. x25519, ecp256 or modp2048)"),
        ));
    }
    if p.prf.is_empty() {
        // What strongSwan does: derive the PRF from the integrity algorithm, or offer the
        // SHA-2 family for AEAD proposals.
        p.prf = if p.integ.is_empty() {
            vec![Prf::HmacSha256, Prf::HmacSha384, Prf::HmacSha512]
        } else {
            p.integ.iter().map(|i| i.matching_prf()).collect()
        };
    }
    Ok(IkeProposal {
        encryption: p.enc,
        integrity: p.integ,
        prf: p.prf,
        dh: p.dh,
    })
}

/// Parses an ESP proposal such as `aes128gcm16`, `aes256-sha256-modp2048` (PFS) or
/// `aes128gcm16-esn`.
pub fn parse_esp(field: &str, s: &str) -> Result<EspProposal, ProposalError> {
    let mut p = parse_tokens(field, s)?;
    if !p.prf.is_empty() {
        return Err(ProposalError::new(
            field,
            format!("'{s}': a PRF only applies to IKE proposals"),
        ));
    }
    if p.esn.is_empty() {
        p.esn.push(Esn::No);
    }
    Ok(EspProposal {
        encryption: p.enc,
        integrity: p.integ,
        dh: p.dh,
        esn: p.esn,
    })
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AesCbc { key_bits } => write!(f, "aes{key_bits}"),
            Self::AesGcm16 { key_bits } => write!(f, "aes{key_bits}gcm16"),
            Self::ChaCha20Poly1305 => f.write_str("chacha20poly1305"),
        }
    }
}

impl fmt::Display for Integrity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HmacSha256_128 => "sha256",
            Self::HmacSha384_192 => "sha384",
            Self::HmacSha512_256 => "sha512",
        })
    }
}

impl fmt::Display for Prf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HmacSha256 => "prfsha256",
            Self::HmacSha384 => "prfsha384",
            Self::HmacSha512 => "prfsha512",
        })
    }
}

impl fmt::Display for DhGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Modp2048 => "modp2048",
            Self::Modp3072 => "modp3072",
            Self::Ecp256 => "ecp256",
            Self::Ecp384 => "ecp384",
            Self::Curve25519 => "x25519",
        })
    }
}

impl fmt::Display for Esn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::No => "noesn",
            Self::Yes => "esn",
        })
    }
}

fn join(f: &mut fmt::Formatter<'_>, parts: &[&dyn fmt::Display]) -> fmt::Result {
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            f.write_str("-")?;
        }
        write!(f, "{p}")?;
    }
    Ok(())
}

/// The canonical strongSwan spelling, with defaults filled in (`aes128gcm16-prfsha256-x25519`).
impl fmt::Display for IkeProposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<&dyn fmt::Display> = Vec::new();
        parts.extend(self.encryption.iter().map(|x| x as &dyn fmt::Display));
        parts.extend(self.integrity.iter().map(|x| x as &dyn fmt::Display));
        parts.extend(self.prf.iter().map(|x| x as &dyn fmt::Display));
        parts.extend(self.dh.iter().map(|x| x as &dyn fmt::Display));
        join(f, &parts)
    }
}

/// The canonical strongSwan spelling, with defaults filled in (`aes128gcm16-noesn`).
impl fmt::Display for EspProposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<&dyn fmt::Display> = Vec::new();
        parts.extend(self.encryption.iter().map(|x| x as &dyn fmt::Display));
        parts.extend(self.integrity.iter().map(|x| x as &dyn fmt::Display));
        parts.extend(self.dh.iter().map(|x| x as &dyn fmt::Display));
        parts.extend(self.esn.iter().map(|x| x as &dyn fmt::Display));
        join(f, &parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_canonical_and_reparses() {
        for (ike, want) in [
            ("aes128gcm16-prfsha256-x25519", "aes128gcm16-prfsha256-x25519"),
            ("aes256-sha256-modp2048", "aes256-sha256-prfsha256-modp2048"),
            (
                "AES128GCM-curve25519",
                "aes128gcm16-prfsha256-prfsha384-prfsha512-x25519",
            ),
        ] {
            let p = parse_ike("f", ike).unwrap();
            assert_eq!(p.to_string(), want);
            assert_eq!(parse_ike("f", want).unwrap(), p);
        }
        let p = parse_esp("f", "aes256-sha384-ecp384-esn").unwrap();
        assert_eq!(p.to_string(), "aes256-sha384-ecp384-esn");
        assert_eq!(
            parse_esp("f", "chacha20poly1305").unwrap().to_string(),
            "chacha20poly1305-noesn"
        );
    }

    #[test]
    fn parses_the_issue_matrix() {
        let p = parse_ike("f", "aes128gcm16-prfsha256-x25519").unwrap();
        assert_eq!(p.encryption, vec![Encryption::AesGcm16 { key_bits: 128 }]);
        assert_eq!(p.prf, vec![Prf::HmacSha256]);
        assert_eq!(p.dh, vec![DhGroup::Curve25519]);
        assert!(p.integrity.is_empty());

        let p = parse_ike("f", "aes256gcm16-prfsha384-ecp384").unwrap();
        assert_eq!(p.dh[0].number(), 20);
        let p = parse_ike("f", "chacha20poly1305-prfsha256-x25519").unwrap();
        assert_eq!(p.encryption[0].transform_id(), 28);

        let p = parse_ike("f", "aes256-sha256-modp2048").unwrap();
        assert_eq!(p.encryption[0].key_bits(), Some(256));
        assert_eq!(p.integrity, vec![Integrity::HmacSha256_128]);
        assert_eq!(p.prf, vec![Prf::HmacSha256], "PRF derived from integrity");
        assert_eq!(p.dh, vec![DhGroup::Modp2048]);

        let p = parse_ike("f", "aes128-sha256-ecp256").unwrap();
        assert_eq!(p.dh[0].number(), 19);
    }

    #[test]
    fn esp_defaults_to_noesn_and_allows_pfs() {
        let p = parse_esp("f", "aes128gcm16").unwrap();
        assert_eq!(p.esn, vec![Esn::No]);
        assert!(p.dh.is_empty());
        let p = parse_esp("f", "aes256-sha384-modp3072-esn-noesn").unwrap();
        assert_eq!(p.dh, vec![DhGroup::Modp3072]);
        assert_eq!(p.esn, vec![Esn::Yes, Esn::No]);
    }

    #[test]
    fn rejects_unknown_algorithm_naming_it() {
        let e = parse_ike("spec.ike.proposals[0]", "aes999-sha256-x25519").unwrap_err();
        assert_eq!(e.field, "spec.ike.proposals[0]");
        assert!(e.message.contains("'aes999'"), "{e}");
    }

    #[test]
    fn rejects_ike_without_dh() {
        let e = parse_ike("f", "aes128gcm16-prfsha256").unwrap_err();
        assert!(e.message.contains("Diffie-Hellman"), "{e}");
    }

    #[test]
    fn rejects_cbc_without_integrity_and_gcm_with_integrity() {
        assert!(
            parse_esp("f", "aes128")
                .unwrap_err()
                .message
                .contains("integrity")
        );
        assert!(
            parse_esp("f", "aes128gcm16-sha256")
                .unwrap_err()
                .message
                .contains("AEAD")
        );
        assert!(parse_esp("f", "aes128gcm16-aes128-sha256").is_err());
    }

    #[test]
    fn rejects_weak_and_misplaced() {
        assert!(
            parse_ike("f", "aes128-sha1-modp1024")
                .unwrap_err()
                .message
                .contains("weak")
        );
        assert!(parse_esp("f", "aes128gcm16-prfsha256").is_err());
        assert!(parse_ike("f", "aes128gcm16-x25519-esn").is_err());
        assert!(parse_ike("f", "").is_err());
    }
}
