//! Test support shared across the workspace, so that each helper exists once.
//!
//! * [`Counter`]: deterministic [`Entropy`] for the IKE state machines (no network, no
//!   randomness), used by `concentrator-ike`'s integration tests and its fuzz targets.
//! * [`interop`] (feature `interop`): our initiator and responder against a real strongSwan,
//!   each in a network namespace; the driver process that runs our state machine on UDP 500
//!   and 4500, and what the tests read from it. Only the e2e layer (the gateway's integration
//!   tests) enables it: the sans-IO crate's tests open no sockets.
//!
//! A dev-dependency only. It depends on `concentrator-ike`, so it serves that crate's
//! integration tests (`tests/*.rs`), not its unit tests.

use concentrator_algorithms::DhGroup;
use concentrator_crypto::{CryptoError, KeyExchange};
use concentrator_ike::responder::Entropy;

#[cfg(feature = "interop")]
pub mod interop;

/// Deterministic entropy: bytes from a counter (so that SPIs and nonces differ from one draw
/// to the next), and the same fixed private key for every key exchange.
///
/// Each constructor fixes how a count becomes a byte, so that a test keeps the exact bytes,
/// SPIs and keys it was written against.
#[derive(Clone, Copy, Debug)]
pub struct Counter {
    count: u64,
    byte: fn(u64) -> u8,
}

impl Counter {
    /// Bytes `seed + 1`, `seed + 2`, ... modulo 256 (zero included).
    pub fn new(seed: u8) -> Self {
        Self {
            count: u64::from(seed),
            // Truncation is the point: the count modulo 256.
            byte: |n| n as u8,
        }
    }

    /// Bytes 1 to 251 and over again, starting after `seed`: never zero, and a long run of
    /// them (SPIs, many nonces) does not repeat every 256 bytes.
    pub fn non_zero(seed: u64) -> Self {
        Self {
            count: seed,
            byte: |n| (n % 251) as u8 + 1,
        }
    }

    /// As [`Self::new`] with the lowest bit set: odd bytes, never zero.
    pub fn odd(seed: u8) -> Self {
        Self {
            count: u64::from(seed),
            byte: |n| n as u8 | 1,
        }
    }
}

impl Entropy for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), CryptoError> {
        for b in buf {
            self.count = self.count.wrapping_add(1);
            *b = (self.byte)(self.count);
        }
        Ok(())
    }

    fn key_exchange(&mut self, group: DhGroup) -> Result<KeyExchange, CryptoError> {
        KeyExchange::from_private_key(group, &[0x22; 32])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(mut c: Counter, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        c.fill(&mut buf).unwrap();
        buf
    }

    #[test]
    fn each_counter_keeps_its_byte_sequence() {
        assert_eq!(draw(Counter::new(0), 3), [1, 2, 3]);
        assert_eq!(draw(Counter::new(254), 3), [255, 0, 1]);
        assert_eq!(draw(Counter::non_zero(0), 3), [2, 3, 4]);
        assert_eq!(draw(Counter::non_zero(249), 3), [251, 1, 2]);
        assert_eq!(draw(Counter::odd(0), 4), [1, 3, 3, 5]);
        assert_eq!(draw(Counter::odd(254), 3), [255, 1, 1]);
    }
}
