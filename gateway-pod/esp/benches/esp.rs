//! ESP seal rate at 1400 B through `Outbound::seal` (header, padding, trailer, AAD, IV) vs the
//! raw aws-lc-rs AES-128-GCM seal of the same bytes: how much the packet framing costs. The
//! same for AES-128-CBC + HMAC-SHA-256-128 against a raw aws-lc-rs CBC encryption + HMAC of
//! the same bytes (the IV derivation, E_K(seq), is the one block the framing adds).
//!
//! `cargo bench -p concentrator-esp --bench esp`

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::cipher::{AES_128, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::hmac;
use concentrator_algorithms::{Encryption, Integrity};
use concentrator_crypto::aead::AeadKey;
use concentrator_crypto::{DirectionKeys, SecretBytes};
use concentrator_esp::Outbound;
use concentrator_esp::packet::sealed_len;

const LEN: usize = 1400;
const RUN: Duration = Duration::from_secs(2);

fn rate(mut f: impl FnMut()) -> f64 {
    for _ in 0..1000 {
        f();
    }
    let (t, mut n) = (Instant::now(), 0u64);
    while t.elapsed() < RUN {
        for _ in 0..1000 {
            f();
        }
        n += 1000;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let inner = vec![0x45u8; LEN];
    let mut tx = Outbound::new(
        1,
        AeadKey::new(Encryption::AesGcm16 { key_bits: 128 }, &[7; 20]).unwrap(),
        false,
    );
    let mut out = vec![0u8; sealed_len(LEN)];
    let ours = rate(|| {
        // Stay clear of the 32-bit sequence limit in long runs.
        if tx.last_seq() > u64::from(u32::MAX) - 2_000_000 {
            tx = Outbound::new(
                1,
                AeadKey::new(Encryption::AesGcm16 { key_bits: 128 }, &[7; 20]).unwrap(),
                false,
            );
        }
        black_box(tx.seal(black_box(&inner), 4, &mut out).unwrap());
    });

    let raw_key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7; 16]).unwrap());
    let mut buf = vec![0u8; LEN + 2];
    let mut ctr = 0u64;
    let raw = rate(|| {
        ctr += 1;
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&ctr.to_be_bytes());
        buf[..LEN].copy_from_slice(&inner);
        let tag = raw_key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(&[0u8; 8]), &mut buf)
            .unwrap();
        let _ = black_box(tag);
    });
    let gbit = |pps: f64| pps * LEN as f64 * 8.0 / 1e9;
    println!(
        "esp seal (ours, 1400 B inner): {:>10.0} pkt/s  {:>6.2} Gbit/s",
        ours,
        gbit(ours)
    );
    println!(
        "raw AES-128-GCM seal (1402 B): {:>10.0} pkt/s  {:>6.2} Gbit/s",
        raw,
        gbit(raw)
    );
    println!("ratio ours/raw: {:.3}", ours / raw);

    let cbc = Encryption::AesCbc { key_bits: 128 };
    let sha = Some(Integrity::HmacSha256_128);
    let keys = DirectionKeys {
        encr: SecretBytes::from_slice(&[7; 16]),
        salt: SecretBytes::from_slice(&[]),
        integ: SecretBytes::from_slice(&[8; 32]),
    };
    let fresh = || Outbound::from_keys(1, cbc, sha, &keys, false).unwrap();
    let mut tx = fresh();
    let ours_cbc = rate(|| {
        if tx.last_seq() > u64::from(u32::MAX) - 2_000_000 {
            tx = fresh();
        }
        black_box(tx.seal(black_box(&inner), 4, &mut out).unwrap());
    });

    // The same work without the framing: CBC over inner + padding + trailer (1408 B) under a
    // fixed IV, then HMAC-SHA-256 over header, IV and ciphertext.
    let enc = EncryptingKey::cbc(UnboundCipherKey::new(&AES_128, &[7; 16]).unwrap()).unwrap();
    let mac = hmac::Key::new(hmac::HMAC_SHA256, &[8; 32]);
    let mut buf = vec![0u8; 8 + 16 + 1408];
    let raw_cbc = rate(|| {
        buf[24..24 + LEN].copy_from_slice(&inner);
        enc.less_safe_encrypt(&mut buf[24..], EncryptionContext::Iv128([1; 16].into()))
            .unwrap();
        black_box(hmac::sign(&mac, &buf));
    });
    println!(
        "esp seal aes128-cbc+hmac-sha256 (ours, 1400 B inner): {:>10.0} pkt/s  {:>6.2} Gbit/s",
        ours_cbc,
        gbit(ours_cbc)
    );
    println!(
        "raw AES-128-CBC + HMAC-SHA-256 (1408 B):            {:>10.0} pkt/s  {:>6.2} Gbit/s",
        raw_cbc,
        gbit(raw_cbc)
    );
    println!("ratio ours/raw (cbc): {:.3}", ours_cbc / raw_cbc);
}
