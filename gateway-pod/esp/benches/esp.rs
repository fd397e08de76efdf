//! ESP seal rate at 1400 B through `Outbound::seal` (header, padding, trailer, AAD, IV) vs the
//! raw aws-lc-rs AES-128-GCM seal of the same bytes: how much the packet framing costs. The
//! same for AES-128-CBC + HMAC-SHA-256-128 against a raw aws-lc-rs CBC encryption + HMAC of
//! the same bytes (the IV derivation, E_K(seq), is the one block the framing adds).
//!
//! Then one SA's open rate on 1 and 2 threads, its whole `Inbound` behind a lock vs a
//! `SharedInbound`.
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
use concentrator_esp::packet::sealed_len;
use concentrator_esp::{Inbound, Outbound, SharedInbound};

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

    shared_open(&inner);
}

/// One SA's packets opened by 1 and 2 threads at once: with the whole `Inbound` behind one
/// lock (as the data plane shared it before) and as a [`SharedInbound`] (the lock held only
/// for the window's check and update), in the same run. Each thread opens every other
/// packet of a pre-sealed batch (a copy of it: the open is in place); a fresh SA per round.
fn shared_open(inner: &[u8]) {
    const BATCH: usize = 40_000;
    const ROUNDS: usize = 10;
    let key = || AeadKey::new(Encryption::AesGcm16 { key_bits: 128 }, &[7; 20]).unwrap();
    let tx = Outbound::new(1, key(), false);
    let packets: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| {
            let mut b = vec![0u8; sealed_len(inner.len())];
            let n = tx.seal(inner, 4, &mut b).unwrap();
            b.truncate(n);
            b
        })
        .collect();
    // The window covers the whole batch: a thread running ahead never makes the other's
    // packets too old.
    let fresh = || Inbound::new(1, key(), false, 1 << 17);
    let run = |threads: usize, open: &(dyn Fn(&mut [u8]) -> bool + Sync)| -> f64 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for i in 0..threads {
                let packets = &packets;
                s.spawn(move || {
                    let mut buf = vec![0u8; packets[0].len()];
                    for p in packets.iter().skip(i).step_by(threads) {
                        buf.copy_from_slice(p);
                        assert!(open(&mut buf), "a packet did not open");
                    }
                });
            }
        });
        BATCH as f64 / t.elapsed().as_secs_f64()
    };
    let mut rates = [[0.0; 2]; 2];
    for _ in 0..ROUNDS {
        for (v, threads) in [(0, 1), (0, 2), (1, 1), (1, 2)] {
            let r = if v == 0 {
                let sa = std::sync::Mutex::new(fresh());
                run(threads, &|b| sa.lock().unwrap().open(b).is_ok())
            } else {
                let sa: SharedInbound = fresh().into_shared();
                run(threads, &|b| sa.open(b).is_ok())
            };
            rates[v][threads - 1] += r / ROUNDS as f64;
        }
    }
    for (v, what) in [(0, "Mutex<Inbound>  "), (1, "SharedInbound   ")] {
        println!(
            "esp open, one SA, {what}: 1 thread {:>9.0} pkt/s, 2 threads {:>9.0} pkt/s ({:.2}x)",
            rates[v][0],
            rates[v][1],
            rates[v][1] / rates[v][0]
        );
    }
    println!(
        "esp open, one SA, 2 threads, SharedInbound / Mutex<Inbound>: {:.2}x",
        rates[1][1] / rates[0][1]
    );
}
