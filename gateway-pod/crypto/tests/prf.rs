//! PRF (HMAC-SHA2), prf+ and the truncated integrity transforms.

mod common;

use common::h;
use concentrator_crypto::prf::{IntegKey, integ_icv_len};
use concentrator_crypto::{CryptoError, Integrity, PacketError, Prf, PrfAlg};

// RFC 4231 §4.2 (test case 1) and §4.3 (test case 2).
const TC1_KEY: &str = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";
const TC1_DATA: &[u8] = b"Hi There";
const TC2_KEY: &[u8] = b"Jefe";
const TC2_DATA: &[u8] = b"what do ya want for nothing?";

#[test]
fn rfc4231_vectors_through_prf() {
    let cases = [
        (
            PrfAlg::HmacSha256,
            1,
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        ),
        (
            PrfAlg::HmacSha384,
            1,
            "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59cfaea9ea9076ede7f4af152e8b2fa9cb6",
        ),
        (
            PrfAlg::HmacSha512,
            1,
            "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cdedaa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
        ),
        (
            PrfAlg::HmacSha256,
            2,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
        (
            PrfAlg::HmacSha384,
            2,
            "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e8e2240ca5e69e2c78b3239ecfab21649",
        ),
        (
            PrfAlg::HmacSha512,
            2,
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
        ),
    ];
    for (alg, tc, want) in cases {
        let prf = Prf::new(alg);
        let out = if tc == 1 {
            prf.compute(&h(TC1_KEY), &[TC1_DATA])
        } else {
            prf.compute(TC2_KEY, &[&TC2_DATA[..10], &TC2_DATA[10..]])
        };
        assert_eq!(out.expose(), &h(want)[..], "{alg:?} test case {tc}");
        assert_eq!(out.len(), prf.output_len());
    }
}

#[test]
fn prf_plus_follows_the_rfc7296_definition() {
    for alg in [PrfAlg::HmacSha256, PrfAlg::HmacSha384, PrfAlg::HmacSha512] {
        let prf = Prf::new(alg);
        let (k, s1, s2) = (b"key".as_slice(), b"seed-".as_slice(), b"part".as_slice());
        let s = [s1, s2].concat();
        let b = prf.output_len();
        let out = prf.prf_plus(k, &[s1, s2], 3 * b - 5).expect("prf+");
        // T1 = prf(K, S | 0x01); T2 = prf(K, T1 | S | 0x02); T3 = prf(K, T2 | S | 0x03)
        let t1 = prf.compute(k, &[&s, &[1]]);
        let t2 = prf.compute(k, &[t1.expose(), &s, &[2]]);
        let t3 = prf.compute(k, &[t2.expose(), &s, &[3]]);
        let want = [t1.expose(), t2.expose(), &t3.expose()[..b - 5]].concat();
        assert_eq!(out.expose(), &want[..], "{alg:?}");
        // A shorter request is a prefix.
        let short = prf.prf_plus(k, &[&s], 7).expect("prf+");
        assert_eq!(short.expose(), &want[..7]);
    }
}

#[test]
fn prf_plus_is_bounded_at_255_blocks() {
    let prf = Prf::new(PrfAlg::HmacSha256);
    let max = prf
        .prf_plus(b"k", &[b"s"], 255 * 32)
        .expect("255 blocks are defined");
    assert_eq!(max.len(), 255 * 32);
    // The last block is T255 = prf(K, T254 | S | 0xff).
    assert_eq!(
        prf.prf_plus(b"k", &[b"s"], 255 * 32 + 1).unwrap_err(),
        CryptoError::PrfPlusTooLong {
            requested: 255 * 32 + 1,
            block: 32
        }
    );
    assert_eq!(prf.prf_plus(b"k", &[b"s"], 0).expect("empty").len(), 0);
}

#[test]
fn integrity_truncates_as_rfc4868() {
    // RFC 4868: HMAC-SHA-256-128, HMAC-SHA-384-192, HMAC-SHA-512-256, with keys the size of
    // the hash output; the ICV is the left-most bits of the full HMAC.
    for (alg, prf) in [
        (Integrity::HmacSha256_128, PrfAlg::HmacSha256),
        (Integrity::HmacSha384_192, PrfAlg::HmacSha384),
        (Integrity::HmacSha512_256, PrfAlg::HmacSha512),
    ] {
        let key = vec![0x0b; Prf::new(prf).output_len()];
        let k = IntegKey::new(alg, &key).expect("key");
        let full = Prf::new(prf).compute(&key, &[b"Hi There"]);
        let mut icv = vec![0; integ_icv_len(alg)];
        assert_eq!(icv.len() * 2, full.len());
        k.sign_into(b"Hi There", &mut icv).expect("sign");
        assert_eq!(&icv[..], &full.expose()[..icv.len()]);
        k.verify(b"Hi There", &icv).expect("verifies");
        icv[3] ^= 0x10;
        assert_eq!(k.verify(b"Hi There", &icv), Err(PacketError::IcvMismatch));
        assert!(IntegKey::new(alg, &key[1..]).is_err(), "short key refused");
    }
}

#[test]
fn rfc4231_truncated_test_case_5() {
    // RFC 4231 §4.6: HMAC-SHA-256 truncated to 128 bits.
    let key = vec![0x0c; 20];
    let full = Prf::new(PrfAlg::HmacSha256).compute(&key, &[b"Test With Truncation"]);
    assert_eq!(&full.expose()[..16], &h("a3b6167473100ee06e0c796c2955552b")[..]);
}

#[test]
fn secrets_never_print() {
    let out = Prf::new(PrfAlg::HmacSha256).compute(b"k", &[b"d"]);
    let dbg = format!("{out:?}");
    assert_eq!(dbg, "SecretBytes(<32 bytes>)");
}

#[test]
fn integrity_over_parts_equals_integrity_over_their_concatenation() {
    for alg in [
        Integrity::HmacSha256_128,
        Integrity::HmacSha384_192,
        Integrity::HmacSha512_256,
    ] {
        let k = IntegKey::new(alg, &vec![0x5a; integ_icv_len(alg) * 2]).expect("key");
        let mut whole = vec![0; integ_icv_len(alg)];
        k.sign_into(b"SPI|seq|IV|ciphertext|hi", &mut whole)
            .expect("sign");
        let parts: [&[u8]; 3] = [b"SPI|seq|", b"IV|ciphertext", b"|hi"];
        let mut split = vec![0; integ_icv_len(alg)];
        k.sign_parts_into(&parts, &mut split).expect("sign");
        assert_eq!(whole, split);
        k.verify_parts(&parts, &split).expect("verifies");
        split[0] ^= 1;
        assert_eq!(k.verify_parts(&parts, &split), Err(PacketError::IcvMismatch));
        assert_eq!(
            k.verify_parts(&parts, &whole[1..]),
            Err(PacketError::IcvMismatch),
            "a short ICV is a mismatch"
        );
        assert_eq!(
            k.sign_parts_into(&parts, &mut [0; 3]),
            Err(PacketError::Malformed)
        );
    }
}
