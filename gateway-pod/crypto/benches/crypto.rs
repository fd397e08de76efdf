//! Throughput of the ESP-oriented AEAD seal against raw aws-lc-rs, and key-exchange rates.
//! Prints ratios and rates; records nothing. Run with
//! `cargo bench -p concentrator-crypto --bench crypto`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use concentrator_crypto::aead::{TAG_LEN, esp_aad};
use concentrator_crypto::{AeadKey, DhGroup, Encryption, IvCounter, KeyExchange};

const PACKET: usize = 1400;
const RUN: Duration = Duration::from_secs(2);

/// Calls `f` repeatedly for about `RUN` and returns operations per second.
fn rate(mut f: impl FnMut()) -> f64 {
    for _ in 0..1000 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        for _ in 0..64 {
            f();
        }
        n += 64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let keymat = [0x42u8; 20];
    let ours = AeadKey::new(Encryption::AesGcm16 { key_bits: 128 }, &keymat).expect("key");
    let raw = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &keymat[..16]).expect("key"));
    let mut buf = vec![0x5au8; PACKET + TAG_LEN];
    let mut ivs = IvCounter::new();
    let mut seq = 0u64;

    let ours_rate = rate(|| {
        seq += 1;
        let (aad, n) = esp_aad(0x1234_5678, seq, false);
        let iv = ivs.next_iv().expect("iv");
        ours.seal_in_place(&iv, &aad[..n], black_box(&mut buf))
            .expect("seal");
    });
    let mut raw_buf = vec![0x5au8; PACKET];
    let mut raw_seq = 0u64;
    let raw_rate = rate(|| {
        raw_seq += 1;
        let mut nonce = [0x42u8; 12];
        nonce[4..].copy_from_slice(&raw_seq.to_be_bytes());
        let (aad, n) = esp_aad(0x1234_5678, raw_seq, false);
        let tag = raw
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..n]),
                black_box(&mut raw_buf),
            )
            .expect("seal");
        let _ = black_box(tag);
    });
    let gbps = |r: f64| r * PACKET as f64 * 8.0 / 1e9;
    println!(
        "AES-128-GCM seal, {PACKET} B: ours {ours_rate:.0} pkt/s ({:.2} Gbit/s), raw LessSafeKey {raw_rate:.0} pkt/s ({:.2} Gbit/s), ours/raw = {:.3}",
        gbps(ours_rate),
        gbps(raw_rate),
        ours_rate / raw_rate
    );

    for g in [DhGroup::Curve25519, DhGroup::Ecp256, DhGroup::Modp2048] {
        let peer = KeyExchange::generate(g)
            .expect("key")
            .public_value()
            .expect("pub");
        // One op = generate a key pair, produce its public value, compute the shared secret.
        let full = rate(|| {
            let k = KeyExchange::generate(g).expect("key");
            black_box(k.public_value().expect("pub"));
            black_box(k.compute_shared(&peer).expect("shared"));
        });
        let k = KeyExchange::generate(g).expect("key");
        let shared = rate(|| {
            black_box(k.compute_shared(&peer).expect("shared"));
        });
        println!(
            "{g:?}: {full:.0} full exchanges/s (keygen + public + shared), {shared:.0} shared-secret ops/s"
        );
    }
}
