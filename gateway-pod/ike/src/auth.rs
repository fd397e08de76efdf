//! Pre-shared key authentication of the IKE SA (RFC 7296 §2.15).

use concentrator_crypto::util::constant_time_eq;
use concentrator_crypto::{Prf, SecretBytes};

/// RFC 7296 §2.15: "the string "Key Pad for IKEv2" is 17 ASCII characters without null
/// termination".
pub const KEY_PAD: &[u8] = b"Key Pad for IKEv2";

/// `<SignedOctets>` of RFC 7296 §2.15 for one side: "the concatenation of [the first
/// message], the peer's nonce and the value prf(SK_p, IDx')", where `first_message` is the
/// whole IKE_SA_INIT message this side sent, `peer_nonce` the other side's Nonce Data and
/// `id_body` the ID payload body ("IDx' is the ID payload body, excluding the fixed header").
pub fn signed_octets(
    prf: Prf,
    first_message: &[u8],
    peer_nonce: &[u8],
    sk_p: &[u8],
    id_body: &[u8],
) -> Vec<u8> {
    let mac_id = prf.compute(sk_p, &[id_body]);
    [first_message, peer_nonce, mac_id.expose()].concat()
}

/// The PSK AUTH value: `AUTH = prf( prf(Shared Secret, "Key Pad for IKEv2"), <InitiatorSignedOctets>)`
/// (RFC 7296 §2.15).
pub fn psk_auth(prf: Prf, psk: &[u8], signed_octets: &[u8]) -> SecretBytes {
    let key = prf.compute(psk, &[KEY_PAD]);
    prf.compute(key.expose(), &[signed_octets])
}

/// Whether `received` is the PSK AUTH value for `signed_octets`, compared in constant time.
pub fn verify_psk_auth(prf: Prf, psk: &[u8], signed_octets: &[u8], received: &[u8]) -> bool {
    constant_time_eq(psk_auth(prf, psk, signed_octets).expose(), received)
}

#[cfg(test)]
mod tests {
    use concentrator_crypto::PrfAlg;

    use super::*;

    #[test]
    fn auth_is_the_nested_prf_of_the_signed_octets() {
        let prf = Prf::new(PrfAlg::HmacSha256);
        let octets = signed_octets(prf, b"init", b"nonce", b"skp", &[2, 0, 0, 0, b'a']);
        assert_eq!(octets.len(), 4 + 5 + 32);
        assert_eq!(&octets[..9], b"initnonce");
        assert_eq!(&octets[9..], prf.compute(b"skp", &[&[2, 0, 0, 0, b'a']]).expose());
        let auth = psk_auth(prf, b"secret", &octets);
        let by_hand = prf.compute(prf.compute(b"secret", &[KEY_PAD]).expose(), &[&octets]);
        assert_eq!(auth.expose(), by_hand.expose());
        assert!(verify_psk_auth(prf, b"secret", &octets, auth.expose()));
    }

    #[test]
    fn rejects_wrong_psk_and_truncated_auth() {
        let prf = Prf::new(PrfAlg::HmacSha384);
        let octets = signed_octets(prf, b"init", b"nonce", b"skp", b"id");
        let auth = psk_auth(prf, b"secret", &octets);
        assert_eq!(auth.len(), 48);
        assert!(!verify_psk_auth(prf, b"Secret", &octets, auth.expose()));
        assert!(!verify_psk_auth(prf, b"secret", &octets, &auth.expose()[..47]));
    }
}
