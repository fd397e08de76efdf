//! The IPsec-layout AEAD (salt || explicit IV): published vectors, round trips, tampering.

mod common;

use common::h;
use concentrator_crypto::aead::{IV_LEN, TAG_LEN, esp_aad};
use concentrator_crypto::{AeadKey, AeadSecret, Encryption, IvCounter, PacketError};

// The GCM spec's test cases 4 (AES-128) and 16 (AES-256): IV cafebabe || facedbaddecaf888
// splits into the 4-byte salt and the 8-byte explicit IV, as in RFC 4106.
const GCM_P: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
const GCM_A: &str = "feedfacedeadbeeffeedfacedeadbeefabaddad2";

fn kat(encr: Encryption, key_salt: &str, iv: &str, aad: &str, pt: &[u8], ct_tag: &str) {
    let key = AeadKey::new(encr, &h(key_salt)).expect("key");
    let iv: [u8; IV_LEN] = h(iv).try_into().expect("iv");
    let mut buf = pt.to_vec();
    buf.extend_from_slice(&[0; TAG_LEN]);
    key.seal_in_place(&iv, &h(aad), &mut buf).expect("seal");
    assert_eq!(buf, h(ct_tag), "{encr:?} seal");
    let opened = key.open_in_place(&iv, &h(aad), &mut buf).expect("open");
    assert_eq!(opened, pt, "{encr:?} open");
    // The same key without a cached context (the IKE SA's SK payload) seals and opens the
    // same bytes, and gives its key material back as it took it.
    let secret = AeadSecret::new(encr, &h(key_salt)).expect("secret");
    assert_eq!(secret.keymat().expose(), h(key_salt), "{encr:?} keymat");
    let mut buf = pt.to_vec();
    buf.extend_from_slice(&[0; TAG_LEN]);
    secret.seal_in_place(&iv, &h(aad), &mut buf).expect("seal");
    assert_eq!(buf, h(ct_tag), "{encr:?} seal without a cached context");
    let opened = secret.open_in_place(&iv, &h(aad), &mut buf).expect("open");
    assert_eq!(opened, pt, "{encr:?} open without a cached context");
    let mut short = [0u8; TAG_LEN - 1];
    assert_eq!(
        secret.open_in_place(&iv, &h(aad), &mut short),
        Err(PacketError::Malformed)
    );
}

#[test]
fn aes_gcm_spec_vectors() {
    kat(
        Encryption::AesGcm16 { key_bits: 128 },
        "feffe9928665731c6d6a8f9467308308cafebabe",
        "facedbaddecaf888",
        GCM_A,
        &h(GCM_P),
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091\
         5bc94fbc3221a5db94fae95ae7121a47",
    );
    kat(
        Encryption::AesGcm16 { key_bits: 256 },
        "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308cafebabe",
        "facedbaddecaf888",
        GCM_A,
        &h(GCM_P),
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662\
         76fc6ece0f4e1768cddf8853bb2d551b",
    );
}

#[test]
fn chacha20_poly1305_rfc8439_section_2_8_2() {
    // Nonce 07000000 || 4041424344454647: the first 4 bytes act as the RFC 7634 salt.
    kat(
        Encryption::ChaCha20Poly1305,
        "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f07000000",
        "4041424344454647",
        "50515253c0c1c2c3c4c5c6c7",
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.",
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc3ff4def08e4b7a9de576d26586cec64b6116\
         1ae10b594f09e26a7e902ecbd0600691",
    );
}

const AEADS: [(Encryption, usize); 3] = [
    (Encryption::AesGcm16 { key_bits: 128 }, 20),
    (Encryption::AesGcm16 { key_bits: 256 }, 36),
    (Encryption::ChaCha20Poly1305, 36),
];

#[test]
fn round_trip_and_every_bit_flip_fails() {
    for (encr, len) in AEADS {
        let key = AeadKey::new(encr, &vec![0x42; len]).expect("key");
        let (aad, n) = esp_aad(0x1234_5678, 7, false);
        let mut ivs = IvCounter::new();
        let iv = ivs.next_iv().expect("iv");
        let pt = b"an inner IP packet, more or less".to_vec();
        let mut sealed = [pt.clone(), vec![0; TAG_LEN]].concat();
        key.seal_in_place(&iv, &aad[..n], &mut sealed).expect("seal");
        for bit in 0..sealed.len() * 8 {
            let mut t = sealed.clone();
            t[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                key.open_in_place(&iv, &aad[..n], &mut t),
                Err(PacketError::IcvMismatch),
                "{encr:?} bit {bit}"
            );
        }
        let mut wrong_aad = aad;
        wrong_aad[7] ^= 1;
        assert_eq!(
            key.open_in_place(&iv, &wrong_aad[..n], &mut sealed.clone()),
            Err(PacketError::IcvMismatch)
        );
        let other_iv = ivs.next_iv().expect("iv");
        assert_eq!(
            key.open_in_place(&other_iv, &aad[..n], &mut sealed.clone()),
            Err(PacketError::IcvMismatch)
        );
        assert_eq!(
            key.open_in_place(&iv, &aad[..n], &mut sealed).expect("open"),
            &pt[..]
        );
        assert_eq!(
            key.open_in_place(&iv, &aad[..n], &mut [0; 15]),
            Err(PacketError::Malformed)
        );
        assert_eq!(
            key.seal_in_place(&iv, &aad[..n], &mut [0; 15]),
            Err(PacketError::Malformed)
        );
        assert!(
            AeadKey::new(encr, &vec![0; len - 1]).is_err(),
            "wrong key length refused"
        );
    }
    assert!(AeadKey::new(Encryption::AesCbc { key_bits: 128 }, &[0; 16]).is_err());
}

#[test]
fn esp_aad_layouts() {
    let (a, n) = esp_aad(0xa1b2c3d4, 0x0000_0005_0000_0009, false);
    assert_eq!(&a[..n], &h("a1b2c3d400000009")[..]);
    let (a, n) = esp_aad(0xa1b2c3d4, 0x0000_0005_0000_0009, true);
    assert_eq!(&a[..n], &h("a1b2c3d40000000500000009")[..]);
}

#[test]
fn iv_counter_never_repeats_and_ends() {
    let mut c = IvCounter::new();
    assert_eq!(c.next_iv().expect("iv"), [0; 8]);
    assert_eq!(c.next_iv().expect("iv"), [0, 0, 0, 0, 0, 0, 0, 1]);
    let mut c = IvCounter::starting_at(u64::MAX - 1);
    assert_eq!(c.next_iv().expect("iv"), (u64::MAX - 1).to_be_bytes());
    assert_eq!(c.next_iv(), Err(PacketError::IvExhausted));
    assert_eq!(c.next_iv(), Err(PacketError::IvExhausted));
}
