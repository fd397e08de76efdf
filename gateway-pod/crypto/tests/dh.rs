//! Key exchange: RFC 7748 (X25519) and RFC 5903 (ECP-256/384) vectors, MODP against a
//! crypto-bigint oracle, KE payload encodings and rejection of bad peer values.

mod common;

use common::h;
use concentrator_crypto::dh::{public_len, shared_len};
use concentrator_crypto::{CryptoError, DhGroup, KeyExchange};
use crypto_bigint::modular::{FixedMontyForm, FixedMontyParams};
use crypto_bigint::{Odd, U2048};

const ALL: [DhGroup; 5] = [
    DhGroup::Modp2048,
    DhGroup::Modp3072,
    DhGroup::Ecp256,
    DhGroup::Ecp384,
    DhGroup::Curve25519,
];

#[test]
fn every_group_agrees_with_itself() {
    for g in ALL {
        let a = KeyExchange::generate(g).expect("generate");
        let b = KeyExchange::generate(g).expect("generate");
        let (pa, pb) = (
            a.public_value().expect("public"),
            b.public_value().expect("public"),
        );
        assert_eq!(pa.len(), public_len(g), "{g:?} KE data length");
        let (sa, sb) = (
            a.compute_shared(&pb).expect("shared"),
            b.compute_shared(&pa).expect("shared"),
        );
        assert_eq!(sa.expose(), sb.expose(), "{g:?}");
        assert_eq!(sa.len(), shared_len(g), "{g:?} g^ir length");
        assert!(!format!("{a:?}").contains("Ec("), "Debug shows no key");
    }
}

#[test]
fn x25519_rfc7748_section_6_1() {
    let alice = KeyExchange::from_private_key(
        DhGroup::Curve25519,
        &h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"),
    )
    .expect("key");
    let bob = KeyExchange::from_private_key(
        DhGroup::Curve25519,
        &h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"),
    )
    .expect("key");
    let alice_pub = h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
    let bob_pub = h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
    let k = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    // RFC 8031: the KE data is the 32-byte public value itself.
    assert_eq!(alice.public_value().expect("pub"), alice_pub);
    assert_eq!(bob.public_value().expect("pub"), bob_pub);
    assert_eq!(alice.compute_shared(&bob_pub).expect("shared").expose(), &k[..]);
    assert_eq!(bob.compute_shared(&alice_pub).expect("shared").expose(), &k[..]);
}

#[test]
fn x25519_rejects_all_zero_shared_secret() {
    let a = KeyExchange::generate(DhGroup::Curve25519).expect("key");
    // u = 0 and u = 1 are low-order points: X25519 gives the all-zero output.
    let mut one = [0u8; 32];
    one[0] = 1;
    for low in [[0u8; 32], one] {
        assert_eq!(
            a.compute_shared(&low).unwrap_err(),
            CryptoError::InvalidPublicValue { group: 31 }
        );
    }
    assert!(matches!(
        a.compute_shared(&[9; 31]),
        Err(CryptoError::PublicValueLength { .. })
    ));
}

struct EcVector {
    group: DhGroup,
    i: &'static str,
    gi: &'static str,
    gr: &'static str,
    gir: &'static str,
}

// RFC 5903 §8.1 (256-bit) and §8.2 (384-bit random ECP groups); the 384-bit values as used
// by aws-lc-rs's own agreement tests.
const EC: [EcVector; 2] = [
    EcVector {
        group: DhGroup::Ecp256,
        i: "C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433",
        gi: "DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180\
             5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3",
        gr: "D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63\
             56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB",
        gir: "D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE",
    },
    EcVector {
        group: DhGroup::Ecp384,
        i: "099F3C7034D4A2C699884D73A375A67F7624EF7C6B3C0F160647B67414DCE655E35B538041E649EE3FAEF896783AB194",
        gi: "667842D7D180AC2CDE6F74F37551F55755C7645C20EF73E31634FE72B4C55EE6DE3AC808ACB4BDB4C88732AEE95F41AA\
             9482ED1FC0EEB9CAFC4984625CCFC23F65032149E0E144ADA024181535A0F38EEB9FCFF3C2C947DAE69B4C634573A81C",
        gr: "E558DBEF53EECDE3D3FCCFC1AEA08A89A987475D12FD950D83CFA41732BC509D0D1AC43A0336DEF96FDA41D0774A3571\
             DCFBEC7AACF3196472169E838430367F66EEBE3C6E70C416DD5F0C68759DD1FFF83FA40142209DFF5EAAD96DB9E6386C",
        gir: "11187331C279962D93D604243FD592CB9D0A926F422E47187521287E7156C5C4D603135569B9E9D09CF5D4A270F59746",
    },
];

#[test]
fn ecp_rfc5903_vectors_in_ke_payload_encoding() {
    for v in EC {
        let k = KeyExchange::from_private_key(v.group, &h(v.i)).expect("key");
        // RFC 5903: KE data is x || y, no 0x04 prefix.
        assert_eq!(k.public_value().expect("pub"), h(v.gi), "{:?} g^i", v.group);
        // The shared secret is the x-coordinate of the shared point.
        assert_eq!(
            k.compute_shared(&h(v.gr)).expect("shared").expose(),
            &h(v.gir)[..],
            "{:?}",
            v.group
        );
    }
}

#[test]
fn ecp_rejects_points_off_the_curve() {
    for v in EC {
        let k = KeyExchange::from_private_key(v.group, &h(v.i)).expect("key");
        let mut bad = h(v.gr);
        let last = bad.len() - 1;
        bad[last] ^= 1; // y no longer matches x
        let n = v.group.number();
        assert_eq!(
            k.compute_shared(&bad).unwrap_err(),
            CryptoError::InvalidPublicValue { group: n }
        );
        assert_eq!(
            k.compute_shared(&vec![0; bad.len()]).unwrap_err(),
            CryptoError::InvalidPublicValue { group: n }
        );
        // A SEC1 uncompressed point (with 0x04) is not the IKE encoding: wrong length.
        let sec1 = [&[4u8][..], &h(v.gr)].concat();
        assert!(matches!(
            k.compute_shared(&sec1),
            Err(CryptoError::PublicValueLength { .. })
        ));
    }
}

/// RFC 3526 §3, the 2048-bit MODP group (group 14) prime.
const MODP2048_P: &str = "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD\
EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED\
EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F\
83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B\
E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510\
15728E5A8AACAA68FFFFFFFFFFFFFFFF";

fn oracle_pow(base: &U2048, exp: &U2048) -> Vec<u8> {
    let p = U2048::from_be_hex(MODP2048_P);
    let params = FixedMontyParams::new_vartime(Odd::new(p).expect("odd prime"));
    FixedMontyForm::new(base, &params)
        .pow(exp)
        .retrieve()
        .to_be_bytes()
        .to_vec()
}

#[test]
fn modp2048_matches_crypto_bigint_oracle() {
    let a = KeyExchange::generate(DhGroup::Modp2048).expect("key");
    let b = KeyExchange::generate(DhGroup::Modp2048).expect("key");
    let (pa, pb) = (a.public_value().expect("pub"), b.public_value().expect("pub"));
    let shared = a.compute_shared(&pb).expect("shared");
    // Known exponents through from_private_key, checked against crypto-bigint.
    for x in [&[2u8][..], &[0x01, 0x00, 0x01], &[0x5a; 256][..]] {
        let k = KeyExchange::from_private_key(DhGroup::Modp2048, x).expect("exponent");
        let mut xp = vec![0u8; 256 - x.len()];
        xp.extend_from_slice(x);
        let exp = U2048::from_be_slice(&xp);
        assert_eq!(
            k.public_value().expect("pub"),
            oracle_pow(&U2048::from_u64(2), &exp),
            "g^x"
        );
        let peer = U2048::from_be_slice(&pb);
        assert_eq!(
            k.compute_shared(&pb).expect("shared").expose(),
            &oracle_pow(&peer, &exp)[..],
            "y^x"
        );
    }
    // Small exponent: g^2 = 4, left-padded to 256 bytes (RFC 7296 §3.4).
    let k = KeyExchange::from_private_key(DhGroup::Modp2048, &[2]).expect("exponent");
    let p4 = k.public_value().expect("pub");
    assert_eq!(p4.len(), 256);
    assert_eq!(p4[255], 4);
    assert!(p4[..255].iter().all(|&b| b == 0));
    assert_eq!(shared.len(), 256);
    let _ = pa;
}

#[test]
fn modp_rejects_degenerate_peer_values() {
    let p = h(MODP2048_P);
    let minus = |k: u8| {
        let mut v = p.clone();
        let last = v.len() - 1;
        v[last] -= k;
        v
    };
    let a = KeyExchange::generate(DhGroup::Modp2048).expect("key");
    let mut one = vec![0u8; 256];
    one[255] = 1;
    for (what, bad) in [
        ("0", vec![0u8; 256]),
        ("1", one),
        ("p-1", minus(1)),
        ("p", p.clone()),
        ("2^2048-1", vec![0xff; 256]),
    ] {
        assert_eq!(
            a.compute_shared(&bad).unwrap_err(),
            CryptoError::InvalidPublicValue { group: 14 },
            "{what}"
        );
    }
    // p - 2 is a valid element.
    a.compute_shared(&minus(2)).expect("p-2 accepted");
    assert!(matches!(
        a.compute_shared(&p[1..]),
        Err(CryptoError::PublicValueLength {
            expected: 256,
            got: 255,
            ..
        })
    ));
    assert!(matches!(
        a.compute_shared(&[]),
        Err(CryptoError::PublicValueLength { .. })
    ));
    // Group 15 checks its own length and range.
    let b = KeyExchange::generate(DhGroup::Modp3072).expect("key");
    assert!(matches!(
        b.compute_shared(&[7; 256]),
        Err(CryptoError::PublicValueLength { expected: 384, .. })
    ));
    assert_eq!(
        b.compute_shared(&[0; 384]).unwrap_err(),
        CryptoError::InvalidPublicValue { group: 15 }
    );
    assert_eq!(
        b.compute_shared(&[0xff; 384]).unwrap_err(),
        CryptoError::InvalidPublicValue { group: 15 }
    );
}

#[test]
fn a_private_key_exported_and_imported_agrees_with_the_original() {
    for group in [
        DhGroup::Modp2048,
        DhGroup::Modp3072,
        DhGroup::Ecp256,
        DhGroup::Ecp384,
        DhGroup::Curve25519,
    ] {
        let ours = KeyExchange::generate(group).unwrap();
        let peer = KeyExchange::generate(group).unwrap();
        let again = KeyExchange::from_private_key(group, ours.private_key().unwrap().expose()).unwrap();
        assert_eq!(
            again.public_value().unwrap(),
            ours.public_value().unwrap(),
            "{group:?}"
        );
        let peer_public = peer.public_value().unwrap();
        assert_eq!(
            again.compute_shared(&peer_public).unwrap().expose(),
            ours.compute_shared(&peer_public).unwrap().expose(),
            "{group:?}"
        );
        assert!(
            !format!("{:?}", ours.private_key().unwrap())
                .contains(&format!("{:?}", ours.private_key().unwrap().expose()))
        );
    }
}
