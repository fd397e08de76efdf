//! IANA codepoints as newtypes with named constants (the quinn/rustls habit): a value this crate
//! has no name for is still a valid value, printed as `Type(123)`.
//!
//! Numbers from RFC 7296 section 3 and the IANA "IKEv2 Parameters" registry (RFC 5685 for
//! redirect, RFC 7383 for fragmentation, RFC 7427 for signature hashes).

use std::fmt;

/// The major version this crate speaks.
pub const MAJOR_VERSION: u8 = 2;

macro_rules! codepoint {
    ($(#[$meta:meta])* $name:ident($ty:ty) { $($(#[$cmeta:meta])* $konst:ident = $value:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub $ty);

        impl $name {
            $($(#[$cmeta])* pub const $konst: Self = Self($value);)*

            /// The registry name, if this crate knows the value.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $(Self::$konst => Some(stringify!($konst)),)*
                    _ => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "{}({})", stringify!($name), self.0),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

codepoint! {
    /// Exchange type of the IKE header (RFC 7296 section 3.1).
    ExchangeType(u8) {
        /// IKE_SA_INIT.
        IKE_SA_INIT = 34,
        /// IKE_AUTH.
        IKE_AUTH = 35,
        /// CREATE_CHILD_SA.
        CREATE_CHILD_SA = 36,
        /// INFORMATIONAL.
        INFORMATIONAL = 37,
    }
}

codepoint! {
    /// Payload type, as found in "Next Payload" fields (RFC 7296 section 3.2).
    PayloadType(u8) {
        /// No next payload: the end of the chain.
        NONE = 0,
        /// Security Association.
        SA = 33,
        /// Key Exchange.
        KE = 34,
        /// Identification - Initiator.
        IDI = 35,
        /// Identification - Responder.
        IDR = 36,
        /// Certificate.
        CERT = 37,
        /// Certificate Request.
        CERTREQ = 38,
        /// Authentication.
        AUTH = 39,
        /// Nonce.
        NONCE = 40,
        /// Notify.
        NOTIFY = 41,
        /// Delete.
        DELETE = 42,
        /// Vendor ID.
        VENDOR = 43,
        /// Traffic Selector - Initiator.
        TSI = 44,
        /// Traffic Selector - Responder.
        TSR = 45,
        /// Encrypted and Authenticated.
        SK = 46,
        /// Configuration.
        CP = 47,
        /// Extensible Authentication.
        EAP = 48,
        /// Encrypted and Authenticated Fragment (RFC 7383).
        SKF = 53,
    }
}

codepoint! {
    /// Notify message type (RFC 7296 section 3.10.1; below 16384 errors, above status).
    NotifyType(u16) {
        /// The message had a critical payload of an unknown type.
        UNSUPPORTED_CRITICAL_PAYLOAD = 1,
        /// A message arrived for an IKE SPI the recipient does not know.
        INVALID_IKE_SPI = 4,
        /// The major version is higher than the recipient supports.
        INVALID_MAJOR_VERSION = 5,
        /// A type, length or value was out of range.
        INVALID_SYNTAX = 7,
        /// A message ID outside the window.
        INVALID_MESSAGE_ID = 9,
        /// An ESP or AH packet arrived with an unknown SPI.
        INVALID_SPI = 11,
        /// None of the proposals was acceptable.
        NO_PROPOSAL_CHOSEN = 14,
        /// The KE payload's group is not the one selected; data: the accepted group.
        INVALID_KE_PAYLOAD = 17,
        /// Authentication failed.
        AUTHENTICATION_FAILED = 24,
        /// Only one pair of traffic selectors is acceptable.
        SINGLE_PAIR_REQUIRED = 34,
        /// No more Child SAs on this IKE SA.
        NO_ADDITIONAL_SAS = 35,
        /// No internal address could be assigned.
        INTERNAL_ADDRESS_FAILURE = 36,
        /// The responder requires a CP payload.
        FAILED_CP_REQUIRED = 37,
        /// The traffic selectors are unacceptable.
        TS_UNACCEPTABLE = 38,
        /// An ESP/AH packet did not match the SA's selectors.
        INVALID_SELECTORS = 39,
        /// A transient failure (simultaneous rekey); retry later.
        TEMPORARY_FAILURE = 43,
        /// The Child SA to rekey does not exist.
        CHILD_SA_NOT_FOUND = 44,
        /// This is the first IKE SA between these identities.
        INITIAL_CONTACT = 16384,
        /// The sender accepts this many requests in flight.
        SET_WINDOW_SIZE = 16385,
        /// More traffic selectors would have been acceptable.
        ADDITIONAL_TS_POSSIBLE = 16386,
        /// IP compression is supported.
        IPCOMP_SUPPORTED = 16387,
        /// Hash of the sender's address and port (NAT detection).
        NAT_DETECTION_SOURCE_IP = 16388,
        /// Hash of the recipient's address and port (NAT detection).
        NAT_DETECTION_DESTINATION_IP = 16389,
        /// A stateless cookie to echo.
        COOKIE = 16390,
        /// Transport mode is requested.
        USE_TRANSPORT_MODE = 16391,
        /// HTTP certificate lookup is supported.
        HTTP_CERT_LOOKUP_SUPPORTED = 16392,
        /// This CREATE_CHILD_SA rekeys the SA with the given SPI.
        REKEY_SA = 16393,
        /// TFC padding is not supported.
        ESP_TFC_PADDING_NOT_SUPPORTED = 16394,
        /// Non-first fragments are also sent.
        NON_FIRST_FRAGMENTS_ALSO = 16395,
        /// Redirect is supported (RFC 5685).
        REDIRECT_SUPPORTED = 16406,
        /// Go to another gateway (RFC 5685).
        REDIRECT = 16407,
        /// This connection was redirected from a gateway (RFC 5685).
        REDIRECTED_FROM = 16408,
        /// RFC 6311 Message ID synchronization is supported (IKE_AUTH).
        IKEV2_MESSAGE_ID_SYNC_SUPPORTED = 16420,
        /// RFC 6311 replay counter synchronization is supported (IKE_AUTH).
        IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED = 16421,
        /// RFC 6311: nonce and both Message ID counters, in an INFORMATIONAL with ID zero.
        IKEV2_MESSAGE_ID_SYNC = 16422,
        /// RFC 6311: the sender's outbound ESP replay counters.
        IPSEC_REPLAY_COUNTER_SYNC = 16423,
        /// IKE fragmentation is supported (RFC 7383).
        IKEV2_FRAGMENTATION_SUPPORTED = 16430,
        /// Hash algorithms for digital signatures (RFC 7427).
        SIGNATURE_HASH_ALGORITHMS = 16431,
    }
}

impl NotifyType {
    /// Whether this is an error type (RFC 7296 section 3.10.1: 0..=16383).
    pub fn is_error(self) -> bool {
        self.0 < 16384
    }
}

codepoint! {
    /// Transform type (RFC 7296 section 3.3.2).
    TransformType(u8) {
        /// Encryption algorithm.
        ENCR = 1,
        /// Pseudorandom function.
        PRF = 2,
        /// Integrity algorithm.
        INTEG = 3,
        /// Diffie-Hellman group (key exchange method).
        DH = 4,
        /// Extended sequence numbers.
        ESN = 5,
    }
}

/// Transform ID: its meaning depends on the [`TransformType`], so the constants below are
/// prefixed by type and several share a value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug)]
pub struct TransformId(pub u16);

impl TransformId {
    /// ENCR: AES in CBC mode (key length attribute required).
    pub const ENCR_AES_CBC: Self = Self(12);
    /// ENCR: AES-GCM with a 16-octet ICV (key length attribute required).
    pub const ENCR_AES_GCM_16: Self = Self(20);
    /// ENCR: ChaCha20-Poly1305 (RFC 7634).
    pub const ENCR_CHACHA20_POLY1305: Self = Self(28);
    /// PRF: HMAC-SHA2-256.
    pub const PRF_HMAC_SHA2_256: Self = Self(5);
    /// PRF: HMAC-SHA2-384.
    pub const PRF_HMAC_SHA2_384: Self = Self(6);
    /// PRF: HMAC-SHA2-512.
    pub const PRF_HMAC_SHA2_512: Self = Self(7);
    /// INTEG: HMAC-SHA2-256-128.
    pub const AUTH_HMAC_SHA2_256_128: Self = Self(12);
    /// INTEG: HMAC-SHA2-384-192.
    pub const AUTH_HMAC_SHA2_384_192: Self = Self(13);
    /// INTEG: HMAC-SHA2-512-256.
    pub const AUTH_HMAC_SHA2_512_256: Self = Self(14);
    /// ESN: no extended sequence numbers.
    pub const ESN_NO: Self = Self(0);
    /// ESN: extended sequence numbers.
    pub const ESN_YES: Self = Self(1);

    /// The Diffie-Hellman group this ID names when the transform type is [`TransformType::DH`].
    pub fn dh_group(self) -> DhGroup {
        DhGroup(self.0)
    }
}

codepoint! {
    /// Diffie-Hellman group (transform type 4 IDs; the KE payload's group field).
    DhGroup(u16) {
        /// 1024-bit MODP.
        MODP_1024 = 2,
        /// 2048-bit MODP.
        MODP_2048 = 14,
        /// 3072-bit MODP.
        MODP_3072 = 15,
        /// 4096-bit MODP.
        MODP_4096 = 16,
        /// NIST P-256.
        ECP_256 = 19,
        /// NIST P-384.
        ECP_384 = 20,
        /// NIST P-521.
        ECP_521 = 21,
        /// X25519 (RFC 8031).
        CURVE25519 = 31,
        /// X448 (RFC 8031).
        CURVE448 = 32,
    }
}

codepoint! {
    /// Transform attribute type, without the AF bit (RFC 7296 section 3.3.5).
    AttributeType(u16) {
        /// Key length in bits (TV format).
        KEY_LENGTH = 14,
    }
}

codepoint! {
    /// Identification type (RFC 7296 section 3.5).
    IdType(u8) {
        /// An IPv4 address.
        IPV4_ADDR = 1,
        /// A fully-qualified domain name.
        FQDN = 2,
        /// An RFC 822 (email) address.
        RFC822_ADDR = 3,
        /// An IPv6 address.
        IPV6_ADDR = 5,
        /// A DER-encoded X.500 distinguished name.
        DER_ASN1_DN = 9,
        /// A DER-encoded X.500 GeneralName.
        DER_ASN1_GN = 10,
        /// Opaque octets.
        KEY_ID = 11,
        /// No identity (RFC 7619).
        NULL = 13,
    }
}

codepoint! {
    /// Authentication method (RFC 7296 section 3.8, RFC 7427).
    AuthMethod(u8) {
        /// RSA digital signature (PKCS#1 v1.5).
        RSA_SIG = 1,
        /// Shared key message integrity code (pre-shared key).
        PSK = 2,
        /// DSS digital signature.
        DSS_SIG = 3,
        /// ECDSA with SHA-256 on P-256.
        ECDSA_256 = 9,
        /// ECDSA with SHA-384 on P-384.
        ECDSA_384 = 10,
        /// ECDSA with SHA-512 on P-521.
        ECDSA_521 = 11,
        /// NULL authentication (RFC 7619).
        NULL = 13,
        /// Generic digital signature (RFC 7427).
        DIGITAL_SIGNATURE = 14,
    }
}

codepoint! {
    /// Security protocol ID (RFC 7296 section 3.3.1; 0 in a Notify without SPI).
    ProtocolId(u8) {
        /// No protocol (Notify payloads without an SPI).
        NONE = 0,
        /// IKE.
        IKE = 1,
        /// AH.
        AH = 2,
        /// ESP.
        ESP = 3,
    }
}

codepoint! {
    /// Traffic selector type (RFC 7296 section 3.13.1).
    TsType(u8) {
        /// An IPv4 address range.
        IPV4_ADDR_RANGE = 7,
        /// An IPv6 address range.
        IPV6_ADDR_RANGE = 8,
    }
}

codepoint! {
    /// Configuration payload type (RFC 7296 section 3.15).
    CfgType(u8) {
        /// A request.
        CFG_REQUEST = 1,
        /// A reply.
        CFG_REPLY = 2,
        /// Set values.
        CFG_SET = 3,
        /// Acknowledge a set.
        CFG_ACK = 4,
    }
}

codepoint! {
    /// Configuration attribute type, without the reserved bit (RFC 7296 section 3.15.1).
    CfgAttributeType(u16) {
        /// An IPv4 address on the internal network.
        INTERNAL_IP4_ADDRESS = 1,
        /// The internal IPv4 netmask.
        INTERNAL_IP4_NETMASK = 2,
        /// An IPv4 DNS server.
        INTERNAL_IP4_DNS = 3,
        /// An IPv4 NetBIOS name server.
        INTERNAL_IP4_NBNS = 4,
        /// An IPv4 DHCP server.
        INTERNAL_IP4_DHCP = 6,
        /// The application version string.
        APPLICATION_VERSION = 7,
        /// An IPv6 address and prefix length on the internal network.
        INTERNAL_IP6_ADDRESS = 8,
        /// An IPv6 DNS server.
        INTERNAL_IP6_DNS = 10,
        /// An IPv6 DHCP server.
        INTERNAL_IP6_DHCP = 12,
        /// A protected IPv4 subnet.
        INTERNAL_IP4_SUBNET = 13,
        /// The attribute types the sender supports.
        SUPPORTED_ATTRIBUTES = 14,
        /// A protected IPv6 subnet.
        INTERNAL_IP6_SUBNET = 15,
    }
}

codepoint! {
    /// Certificate encoding (RFC 7296 section 3.6).
    CertEncoding(u8) {
        /// PKCS #7 wrapped X.509 certificate.
        PKCS7_X509 = 1,
        /// X.509 certificate - signature.
        X509_SIGNATURE = 4,
        /// Certificate revocation list.
        CRL = 7,
        /// Raw RSA key.
        RAW_RSA_KEY = 11,
        /// Hash and URL of an X.509 certificate.
        HASH_URL_X509_CERT = 12,
        /// Hash and URL of an X.509 bundle.
        HASH_URL_X509_BUNDLE = 13,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_print_their_name_and_unknown_ones_their_number() {
        assert_eq!(PayloadType::SKF.to_string(), "SKF");
        assert_eq!(format!("{:?}", PayloadType(99)), "PayloadType(99)");
        assert_eq!(NotifyType(16407), NotifyType::REDIRECT);
        assert!(NotifyType::INVALID_SYNTAX.is_error());
        assert!(!NotifyType::COOKIE.is_error());
        assert_eq!(TransformId(31).dh_group(), DhGroup::CURVE25519);
    }
}
