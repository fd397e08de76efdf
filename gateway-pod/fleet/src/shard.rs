//! Shards and the SPI bits that carry them.
//!
//! Every SA of the fleet belongs to one of [`SHARDS`] shards, and each shard to one pod at a
//! time (the [`crate::map::ShardMap`]). The shard is written into the top [`SHARD_BITS`] bits
//! of every SPI a pod allocates, its IKE SPIs (64 bits) and its inbound ESP SPIs (32 bits), so
//! that any pod finds the owner of a packet from the packet alone, as Cisco ASA clusters put
//! the node in IKE SPIs and QUIC-LB the server in connection IDs. The bits left are random:
//! 54 for IKE, 22 for ESP (four million per shard, against tens of SAs per shard for a pod
//! with 100,000 tunnels).

use std::fmt;

/// How many bits of an SPI name its shard.
pub const SHARD_BITS: u32 = 10;

/// How many shards there are: fixed for the life of a fleet (pods of one fleet must agree).
pub const SHARDS: u16 = 1 << SHARD_BITS;

/// RFC 4303 §2.1: SPI values 1-255 are reserved by IANA (and 0 is for local use).
const ESP_SPI_MIN: u32 = 256;

/// One shard: `0..SHARDS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shard(u16);

impl Shard {
    /// The shard numbered `n`, if there is one.
    pub fn new(n: u16) -> Option<Self> {
        (n < SHARDS).then_some(Self(n))
    }

    /// Its number.
    pub fn get(self) -> u16 {
        self.0
    }

    /// Its number as an index.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// Every shard, in order.
    pub fn all() -> impl Iterator<Item = Self> {
        (0..SHARDS).map(Self)
    }

    /// The shard an IKE SPI of ours carries (whichever of SPIi and SPIr we allocated).
    pub fn of_ike_spi(spi: u64) -> Self {
        // The shift leaves SHARD_BITS bits: always below SHARDS.
        Self((spi >> (64 - SHARD_BITS)) as u16)
    }

    /// The shard an inbound ESP SPI of ours carries.
    pub fn of_esp_spi(spi: u32) -> Self {
        Self((spi >> (32 - SHARD_BITS)) as u16)
    }

    /// An IKE SPI in this shard from `random` bits; `None` for the one value RFC 7296 forbids
    /// (zero: "MUST NOT be zero"), for which the caller draws again.
    pub fn ike_spi(self, random: u64) -> Option<u64> {
        let spi = (u64::from(self.0) << (64 - SHARD_BITS)) | (random >> SHARD_BITS);
        (spi != 0).then_some(spi)
    }

    /// An inbound ESP SPI in this shard from `random` bits; `None` for the reserved values
    /// (below 256, possible in shard 0 only), for which the caller draws again.
    pub fn esp_spi(self, random: u32) -> Option<u32> {
        let spi = (u32::from(self.0) << (32 - SHARD_BITS)) | (random >> SHARD_BITS);
        (spi >= ESP_SPI_MIN).then_some(spi)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A set of shards, as a bitmap.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ShardSet([u64; SHARDS as usize / 64]);

impl ShardSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `s`.
    pub fn insert(&mut self, s: Shard) {
        self.0[s.index() / 64] |= 1 << (s.index() % 64);
    }

    /// Removes `s`.
    pub fn remove(&mut self, s: Shard) {
        self.0[s.index() / 64] &= !(1 << (s.index() % 64));
    }

    /// Whether `s` is in the set.
    pub fn contains(&self, s: Shard) -> bool {
        self.0[s.index() / 64] & (1 << (s.index() % 64)) != 0
    }

    /// How many shards are in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// The shards in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = Shard> + '_ {
        Shard::all().filter(|s| self.contains(*s))
    }

    /// The `n`th shard of the set in order (for picking one by a random or hashed index).
    pub fn nth(&self, n: usize) -> Option<Shard> {
        self.iter().nth(n)
    }

    /// The set as lowercase hex, 256 characters, shard 0 in the lowest bit of the last one
    /// (compact in a JSON member record and readable with `etcdctl get`).
    pub fn to_hex(&self) -> String {
        self.0.iter().rev().map(|w| format!("{w:016x}")).collect()
    }

    /// A set read back from [`Self::to_hex`]; `None` unless it is exactly that shape.
    pub fn from_hex(s: &str) -> Option<Self> {
        let words = SHARDS as usize / 64;
        if s.len() != words * 16 || !s.is_ascii() {
            return None;
        }
        let mut set = Self::new();
        for (i, chunk) in s.as_bytes().chunks(16).enumerate() {
            let chunk = std::str::from_utf8(chunk).ok()?;
            set.0[words - 1 - i] = u64::from_str_radix(chunk, 16).ok()?;
        }
        Some(set)
    }
}

impl FromIterator<Shard> for ShardSet {
    fn from_iter<I: IntoIterator<Item = Shard>>(iter: I) -> Self {
        let mut set = Self::new();
        for s in iter {
            set.insert(s);
        }
        set
    }
}

impl fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardSet({} shards)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spis_carry_their_shard_in_the_top_bits() {
        for n in [0, 1, 511, SHARDS - 1] {
            let s = Shard::new(n).unwrap();
            for random in [0u64, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
                if let Some(spi) = s.ike_spi(random) {
                    assert_eq!(Shard::of_ike_spi(spi), s);
                    assert_ne!(spi, 0);
                }
                if let Some(spi) = s.esp_spi(random as u32) {
                    assert_eq!(Shard::of_esp_spi(spi), s);
                    assert!(spi >= 256);
                }
            }
        }
        assert_eq!(Shard::new(0).unwrap().ike_spi(0), None);
        assert_eq!(Shard::new(0).unwrap().esp_spi(255 << SHARD_BITS), None);
        assert_eq!(Shard::new(0).unwrap().esp_spi(256 << SHARD_BITS), Some(256));
        assert_eq!(Shard::new(SHARDS), None);
    }

    #[test]
    fn random_bits_survive_below_the_shard() {
        let s = Shard::new(3).unwrap();
        let a = s.ike_spi(0xffff_0000_0000_0000).unwrap();
        let b = s.ike_spi(0x0000_ffff_0000_0000).unwrap();
        assert_ne!(a, b);
        assert_eq!(a >> 54, 3);
    }

    #[test]
    fn shard_sets_round_trip_through_hex() {
        let set: ShardSet = [0, 1, 63, 64, 500, SHARDS - 1]
            .into_iter()
            .filter_map(Shard::new)
            .collect();
        assert_eq!(set.len(), 6);
        let hex = set.to_hex();
        assert_eq!(hex.len(), 256);
        assert!(hex.ends_with('3'), "shards 0 and 1 are the lowest bits: {hex}");
        assert_eq!(ShardSet::from_hex(&hex), Some(set.clone()));
        assert_eq!(ShardSet::from_hex(&hex[1..]), None);
        assert_eq!(ShardSet::from_hex(&format!("g{}", &hex[1..])), None);
        let mut less = set;
        less.remove(Shard::new(500).unwrap());
        assert!(!less.contains(Shard::new(500).unwrap()));
        assert_eq!(less.nth(3), Shard::new(64));
    }
}
