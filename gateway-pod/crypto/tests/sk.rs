//! The SK (Encrypted) payload: round trips for every cipher, tampering, padding, bad lengths.

mod common;

use concentrator_crypto::keymat::encr_keymat_len;
use concentrator_crypto::prf::integ_key_len;
use concentrator_crypto::{Encryption, Integrity, PacketError, SkCipher};

fn suites() -> Vec<(Encryption, Option<Integrity>)> {
    vec![
        (Encryption::AesGcm16 { key_bits: 128 }, None),
        (Encryption::AesGcm16 { key_bits: 256 }, None),
        (Encryption::ChaCha20Poly1305, None),
        (
            Encryption::AesCbc { key_bits: 128 },
            Some(Integrity::HmacSha256_128),
        ),
        (
            Encryption::AesCbc { key_bits: 256 },
            Some(Integrity::HmacSha384_192),
        ),
        (
            Encryption::AesCbc { key_bits: 256 },
            Some(Integrity::HmacSha512_256),
        ),
    ]
}

fn pair(encr: Encryption, integ: Option<Integrity>) -> (SkCipher, SkCipher) {
    let e = vec![0x11; encr_keymat_len(encr).expect("len")];
    let a = vec![0x22; integ.map_or(0, integ_key_len)];
    (
        SkCipher::new(encr, integ, &e, &a).expect("cipher"),
        SkCipher::new(encr, integ, &e, &a).expect("cipher"),
    )
}

/// A fake message: 28-byte IKE header + 4-byte SK generic header, then the SK body.
fn build(c: &mut SkCipher, inner: &[u8]) -> (Vec<u8>, usize) {
    let body_start = 32;
    let mut m = vec![0u8; body_start + c.body_len(inner.len())];
    for (i, b) in m[..body_start].iter_mut().enumerate() {
        *b = i as u8;
    }
    let r = c.plaintext_range(body_start, inner.len());
    m[r].copy_from_slice(inner);
    c.seal(&mut m, body_start, inner.len()).expect("seal");
    (m, body_start)
}

#[test]
fn round_trip_every_cipher_and_length() {
    for (encr, integ) in suites() {
        let (mut tx, rx) = pair(encr, integ);
        for len in [0usize, 1, 14, 15, 16, 17, 100, 1200] {
            let inner: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let (mut m, bs) = build(&mut tx, &inner);
            assert_eq!(m.len() - bs, tx.body_len(len));
            let enc = bs + tx.iv_len()..m.len() - tx.icv_len();
            assert!(enc.len().is_multiple_of(tx.block_size()), "{encr:?} alignment");
            if len >= 16 {
                assert_ne!(&m[enc.start..enc.start + 16], &inner[..16], "{encr:?} encrypted");
            }
            let r = rx.open(&mut m, bs).expect("open");
            assert_eq!(&m[r], &inner[..], "{encr:?} len {len}");
        }
    }
}

#[test]
fn every_bit_flip_fails_the_icv() {
    for (encr, integ) in suites() {
        let (mut tx, rx) = pair(encr, integ);
        let (m, bs) = build(&mut tx, b"IDi AUTH SAi2 TSi TSr");
        // Header, SK generic header (AAD / ICV coverage), IV, ciphertext and ICV.
        for bit in 0..m.len() * 8 {
            let mut t = m.clone();
            t[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                rx.open(&mut t, bs),
                Err(PacketError::IcvMismatch),
                "{encr:?} bit {bit}"
            );
        }
    }
}

#[test]
fn aead_ivs_count_up_and_cbc_ivs_are_random() {
    for (encr, integ) in suites() {
        let (mut tx, _) = pair(encr, integ);
        let (a, bs) = build(&mut tx, b"x");
        let (b, _) = build(&mut tx, b"x");
        let (iva, ivb) = (&a[bs..bs + tx.iv_len()], &b[bs..bs + tx.iv_len()]);
        assert_ne!(iva, ivb, "{encr:?}: IV repeated");
        if encr.is_aead() {
            assert_eq!(iva, &[0, 0, 0, 0, 0, 0, 0, 0]);
            assert_eq!(ivb, &[0, 0, 0, 0, 0, 0, 0, 1]);
        }
    }
}

#[test]
fn framing_lengths() {
    let (gcm, _) = pair(Encryption::AesGcm16 { key_bits: 128 }, None);
    assert_eq!(
        (gcm.iv_len(), gcm.icv_len(), gcm.block_size(), gcm.pad_len(37)),
        (8, 16, 1, 0)
    );
    assert_eq!(gcm.body_len(37), 8 + 37 + 1 + 16);
    let (cbc, _) = pair(
        Encryption::AesCbc { key_bits: 256 },
        Some(Integrity::HmacSha384_192),
    );
    assert_eq!((cbc.iv_len(), cbc.icv_len(), cbc.block_size()), (16, 24, 16));
    assert_eq!((cbc.pad_len(15), cbc.pad_len(16), cbc.pad_len(0)), (0, 15, 15));
    assert_eq!(cbc.body_len(15), 16 + 16 + 24);
}

#[test]
fn malformed_bodies_are_errors_not_panics() {
    for (encr, integ) in suites() {
        let (mut tx, rx) = pair(encr, integ);
        let (m, bs) = build(&mut tx, b"payloads");
        for cut in 0..m.len() {
            let mut t = m[..cut].to_vec();
            assert!(rx.open(&mut t, bs).is_err(), "{encr:?} cut at {cut}");
        }
        let mut t = m.clone();
        assert_eq!(rx.open(&mut t, m.len() + 1), Err(PacketError::Malformed));
        // seal refuses a buffer of the wrong size.
        let mut short = vec![0u8; bs + tx.body_len(8) - 1];
        assert_eq!(tx.seal(&mut short, bs, 8), Err(PacketError::Malformed));
    }
}

#[test]
fn cbc_pad_length_beyond_the_plaintext_is_bad_padding() {
    use aws_lc_rs::cipher::{AES_128, EncryptingKey, EncryptionContext, UnboundCipherKey};
    use aws_lc_rs::hmac;
    // Hand-made CBC SK body with a valid ICV whose decrypted Pad Length (255) points before
    // the start of the 16 decrypted bytes.
    let (sk_e, sk_a) = ([0x11u8; 16], [0x22u8; 32]);
    let bs = 32;
    let iv = [7u8; 16];
    let mut block = [0xffu8; 16];
    let enc = EncryptingKey::cbc(UnboundCipherKey::new(&AES_128, &sk_e).expect("key")).expect("cbc");
    enc.less_safe_encrypt(&mut block, EncryptionContext::Iv128(iv.into()))
        .expect("encrypt");
    let mut m = [vec![0u8; bs], iv.to_vec(), block.to_vec()].concat();
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &sk_a), &m);
    m.extend_from_slice(&tag.as_ref()[..16]);
    let rx = SkCipher::new(
        Encryption::AesCbc { key_bits: 128 },
        Some(Integrity::HmacSha256_128),
        &sk_e,
        &sk_a,
    )
    .expect("cipher");
    assert_eq!(rx.open(&mut m, bs), Err(PacketError::BadPadding));
}

#[test]
fn bad_transform_combinations() {
    let gcm = Encryption::AesGcm16 { key_bits: 128 };
    let cbc = Encryption::AesCbc { key_bits: 128 };
    assert!(SkCipher::new(gcm, Some(Integrity::HmacSha256_128), &[0; 20], &[0; 32]).is_err());
    assert!(SkCipher::new(gcm, None, &[0; 20], &[0; 1]).is_err());
    assert!(SkCipher::new(gcm, None, &[0; 16], &[]).is_err());
    assert!(SkCipher::new(cbc, None, &[0; 16], &[]).is_err());
    assert!(SkCipher::new(cbc, Some(Integrity::HmacSha256_128), &[0; 20], &[0; 32]).is_err());
    assert!(SkCipher::new(cbc, Some(Integrity::HmacSha256_128), &[0; 16], &[0; 31]).is_err());
}

#[test]
fn keymat_gives_back_the_keys_it_was_made_with() {
    for (encr, integ) in suites() {
        let e: Vec<u8> = (0..encr_keymat_len(encr).expect("len"))
            .map(|i| i as u8)
            .collect();
        let a: Vec<u8> = (0..integ.map_or(0, integ_key_len))
            .map(|i| 0x80 | i as u8)
            .collect();
        let c = SkCipher::new(encr, integ, &e, &a).expect("cipher");
        let (sk_e, sk_a) = c.keymat();
        assert_eq!((sk_e.expose(), sk_a.expose()), (&e[..], &a[..]), "{encr:?}");
    }
}

#[test]
fn a_cipher_names_its_transforms() {
    for (encr, integ) in suites() {
        let (c, _) = pair(encr, integ);
        assert_eq!((c.encryption(), c.integrity()), (encr, integ));
    }
}
