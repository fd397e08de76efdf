//! The anti-replay window of RFC 4303 §3.4.3, with the extended-sequence-number inference of
//! its Appendix A. A ring of 64-bit words (the RFC 6479 layout): checking and sliding touch a
//! bounded number of words.
//!
//! The ring is allocated on the first packet accepted and grows with the sequence numbers,
//! up to the configured size: a tunnel that carries no traffic keeps no bitmap (512 bytes
//! for the default 4,096 packets, per tunnel), and one that carried a few hundred packets a
//! few words. Growing never loses a bit: the ring always covers every block of the window
//! that can hold a number received above the resume point (`floor`), so what it answers is
//! exactly what a full-size ring would (and a number below the ring's reach was never
//! received). Nothing is guessed: a lazily sized window that refused or accepted a packet
//! differently from the full one would either drop traffic or, worse, let a replay in.

/// Sequence numbers seen recently, for one inbound SA.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Window size in packets (a multiple of 64; 0 disables the check).
    size: u64,
    /// Highest sequence number accepted so far (full 64 bits); 0 before the first packet.
    top: u64,
    /// Every number up to here counts as received (the top another process had accepted
    /// when this one took the SA over, [`Self::resume_at`]); 0 otherwise.
    floor: u64,
    /// One bit per sequence number, word `(seq / 64) % words.len()`, covering the blocks of
    /// 64 numbers from `top / 64 - words.len() + 1` to `top / 64`. Empty until the first
    /// packet; then at least every block of the window above `floor`, at most one word more
    /// than the window needs (so sliding never clears bits still inside the window).
    words: Box<[u64]>,
    esn: bool,
}

/// Why a sequence number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Already received.
    Replayed,
    /// Left of the window: too old to tell.
    TooOld,
    /// Sequence number 0 is never sent (RFC 4303 §3.3.3: the first packet has number 1).
    Zero,
}

impl ReplayWindow {
    /// Largest window: the Eroute CRD's limit; larger requests are clamped to it.
    pub const MAX: u32 = 65536;

    /// A window of at least `size` packets (rounded up to a multiple of 64, at most
    /// [`Self::MAX`]; 0 disables it). Allocates nothing until the first packet.
    pub fn new(size: u32, esn: bool) -> Self {
        let size = u64::from(size.min(Self::MAX)).div_ceil(64) * 64;
        Self {
            size,
            top: 0,
            floor: 0,
            words: Box::default(),
            esn,
        }
    }

    /// Carries on after `top`, the highest sequence number another process accepted on the
    /// SA (taken over from a fleet replica): every number up to `top` counts as received,
    /// since which of them were is not known here.
    pub fn resume_at(&mut self, top: u64) {
        if top <= self.top {
            return;
        }
        self.top = top;
        self.floor = top;
        // The ring covered blocks around the old top; below the new one `floor` answers.
        self.words = Box::default();
    }

    /// The window size in packets.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Highest sequence number accepted.
    pub fn top(&self) -> u64 {
        self.top
    }

    /// Bytes of bitmap held now (it grows with the traffic, up to the window's size).
    pub fn bitmap_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// The full sequence number a packet carrying `low` (the 32 bits on the wire) stands for:
    /// with ESN, the high half is inferred from the window (RFC 4303 Appendix A.2.2).
    pub fn infer(&self, low: u32) -> u64 {
        if !self.esn {
            return u64::from(low);
        }
        let (th, tl) = ((self.top >> 32) as u32, self.top as u32);
        let w = self.size.clamp(1, 1 << 31) as u32;
        let bottom = tl.wrapping_sub(w - 1);
        let high = if tl >= w - 1 {
            // Window within one subspace: below it means the next subspace.
            if low >= bottom { th } else { th.wrapping_add(1) }
        } else if low >= bottom && th > 0 {
            // Window spans two subspaces: high numbers belong to the previous one (which
            // exists only once the first 2^32 numbers are behind us).
            th - 1
        } else {
            th
        };
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Would `seq` be accepted? Call before the integrity check, to drop replays cheaply;
    /// the window only moves in [`ReplayWindow::accept`], after the ICV verified.
    pub fn check(&self, seq: u64) -> Result<(), Refused> {
        if seq == 0 {
            return Err(Refused::Zero);
        }
        if self.size == 0 || seq > self.top {
            return Ok(());
        }
        if self.top - seq >= self.size {
            return Err(Refused::TooOld);
        }
        if seq <= self.floor {
            return Err(Refused::Replayed);
        }
        // Below the ring's reach (or no ring yet): never received, see the module docs.
        match self.slot(seq) {
            Some((word, bit)) if self.words.get(word).is_some_and(|w| w & bit != 0) => Err(Refused::Replayed),
            _ => Ok(()),
        }
    }

    /// Records `seq` as received (after its ICV verified). Checks again, so a packet that
    /// raced another copy of itself through decryption is still refused once.
    pub fn accept(&mut self, seq: u64) -> Result<(), Refused> {
        self.check(seq)?;
        if self.size == 0 {
            self.top = self.top.max(seq);
            return Ok(());
        }
        let top = self.top.max(seq);
        self.make_room(top);
        if seq > self.top {
            let n = self.words.len() as u64;
            let (old_block, new_block) = (self.top / 64, seq / 64);
            // Clear the words the window slides over, at most the whole ring.
            let steps = (new_block - old_block).min(n);
            for i in 1..=steps {
                if let Some(w) = self.words.get_mut(((old_block + i) % n) as usize) {
                    *w = 0;
                }
            }
            self.top = seq;
        }
        if let Some((word, bit)) = self.slot(seq)
            && let Some(w) = self.words.get_mut(word)
        {
            *w |= bit;
        }
        Ok(())
    }

    /// Grows the ring, if needed, to cover every block of the window at `top` that holds
    /// numbers above `floor`, keeping every bit it has (each block moves to its place in the
    /// larger ring). Doubles, so a tunnel reaches the full size in a few steps.
    fn make_room(&mut self, top: u64) {
        let full = self.size / 64 + 1;
        let lowest = top
            .saturating_add(1)
            .saturating_sub(self.size)
            .max(self.floor.saturating_add(1))
            .max(1);
        let needed = (top / 64).saturating_sub(lowest / 64).saturating_add(1).min(full);
        let have = self.words.len() as u64;
        if have >= needed {
            return;
        }
        let n = needed.max(have.saturating_mul(2)).max(2).min(full);
        let mut words = vec![0u64; n as usize].into_boxed_slice();
        // The blocks the old ring covers, relative to the current top.
        let top_block = self.top / 64;
        for block in top_block.saturating_sub(have.saturating_sub(1))..=top_block {
            if let (Some(from), Some(to)) = (
                self.words.get((block % have.max(1)) as usize),
                words.get_mut((block % n) as usize),
            ) {
                *to = *from;
            }
        }
        self.words = words;
    }

    fn slot(&self, seq: u64) -> Option<(usize, u64)> {
        let n = self.words.len() as u64;
        if n == 0 {
            return None;
        }
        // Blocks below the ring's reach are not in it: their words hold newer blocks.
        let block = seq / 64;
        if block + n <= self.top / 64 {
            return None;
        }
        Some(((block % n) as usize, 1u64 << (seq % 64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_window_refuses_everything_up_to_its_top() {
        let mut w = ReplayWindow::new(128, false);
        w.accept(5).unwrap();
        w.resume_at(1000);
        assert_eq!(w.top(), 1000);
        for s in [1000, 999, 950, 873] {
            assert_eq!(w.check(s), Err(Refused::Replayed), "{s}");
        }
        assert_eq!(w.check(1), Err(Refused::TooOld));
        assert_eq!(w.accept(1001), Ok(()));
        // Sliding on clears what leaves the window, not what is still in it.
        assert_eq!(w.accept(1100), Ok(()));
        assert_eq!(w.check(1050), Ok(()));
        assert_eq!(w.check(1001), Err(Refused::Replayed));
        // Never backwards.
        w.resume_at(10);
        assert_eq!(w.top(), 1100);
    }

    #[test]
    fn accepts_in_order_and_refuses_replays() {
        let mut w = ReplayWindow::new(64, false);
        for s in 1..=200 {
            assert_eq!(w.accept(s), Ok(()));
            assert_eq!(w.check(s), Err(Refused::Replayed));
        }
        assert_eq!(w.check(0), Err(Refused::Zero));
    }

    #[test]
    fn accepts_reordering_inside_the_window_only() {
        let mut w = ReplayWindow::new(4096, false);
        w.accept(5000).unwrap();
        assert_eq!(
            w.accept(5000 - 4095),
            Ok(()),
            "the oldest number still in the window"
        );
        assert_eq!(w.check(5000 - 4096), Err(Refused::TooOld));
        assert_eq!(w.accept(4999), Ok(()));
        assert_eq!(w.accept(4999), Err(Refused::Replayed));
        assert_eq!(w.accept(6000), Ok(()));
        assert_eq!(
            w.check(4999),
            Err(Refused::Replayed),
            "still inside 4096 of 6000: remembered"
        );
    }

    #[test]
    fn sliding_far_clears_old_bits() {
        let mut w = ReplayWindow::new(128, false);
        for s in 1..=128 {
            w.accept(s).unwrap();
        }
        w.accept(1_000_000).unwrap();
        for s in 1_000_000 - 127..1_000_000 {
            assert_eq!(w.check(s), Ok(()), "{s} was never received");
        }
    }

    #[test]
    fn matches_a_naive_model() {
        // Pseudo-random arrival order against a set-based reference.
        let mut w = ReplayWindow::new(256, false);
        let mut seen = std::collections::BTreeSet::new();
        let mut top = 0u64;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let seq = (top + 40).saturating_sub(x % 400).max(1);
            let want = if top >= seq && top - seq >= 256 {
                Err(Refused::TooOld)
            } else if seen.contains(&seq) {
                Err(Refused::Replayed)
            } else {
                Ok(())
            };
            assert_eq!(w.accept(seq), want, "seq {seq} top {top}");
            if want.is_ok() {
                seen.insert(seq);
                top = top.max(seq);
            }
        }
    }

    #[test]
    fn esn_infers_the_high_half_across_the_wrap() {
        let mut w = ReplayWindow::new(64, true);
        let near_wrap = 0xffff_fff0u64;
        w.accept(near_wrap).unwrap();
        // A packet just past the 32-bit wrap arrives with a small low half.
        assert_eq!(w.infer(5), (1 << 32) | 5);
        // A late packet from before the wrap keeps the old high half.
        assert_eq!(w.infer(0xffff_ffe0), 0xffff_ffe0);
        w.accept((1 << 32) | 5).unwrap();
        // Now the window spans both subspaces.
        assert_eq!(w.infer(0xffff_fff8), 0xffff_fff8);
        assert_eq!(w.infer(6), (1 << 32) | 6);
        assert_eq!(w.check(0xffff_fff0), Err(Refused::Replayed));
    }

    #[test]
    fn without_esn_the_high_half_is_zero() {
        let mut w = ReplayWindow::new(64, false);
        w.accept(0xffff_fff0).unwrap();
        assert_eq!(w.infer(5), 5);
    }

    #[test]
    fn huge_sizes_are_clamped() {
        assert_eq!(
            ReplayWindow::new(u32::MAX, true).size(),
            u64::from(ReplayWindow::MAX)
        );
    }

    #[test]
    fn size_zero_disables_the_check() {
        let mut w = ReplayWindow::new(0, false);
        w.accept(10).unwrap();
        assert_eq!(w.accept(10), Ok(()));
        assert_eq!(w.check(0), Err(Refused::Zero));
    }

    #[test]
    fn an_idle_window_holds_no_bitmap_and_grows_with_traffic_to_its_size() {
        let mut w = ReplayWindow::new(4096, false);
        assert_eq!(w.bitmap_bytes(), 0, "no packet, no bitmap");
        assert_eq!(w.check(7), Ok(()));
        w.accept(1).unwrap();
        assert_eq!(w.bitmap_bytes(), 16, "a first packet takes two words");
        for s in 2..=300 {
            w.accept(s).unwrap();
        }
        assert!(w.bitmap_bytes() <= 64, "300 packets: {} bytes", w.bitmap_bytes());
        for s in 301..=20_000 {
            w.accept(s).unwrap();
        }
        assert_eq!(
            w.bitmap_bytes(),
            (4096 / 64 + 1) * 8,
            "never more than the full ring"
        );
        // A resumed window has no bitmap either until its next packet.
        w.resume_at(1_000_000);
        assert_eq!(w.bitmap_bytes(), 0);
        assert_eq!(w.check(999_999), Err(Refused::Replayed));
    }

    #[test]
    fn a_resumed_window_takes_numbers_between_its_floor_and_a_later_top() {
        let mut w = ReplayWindow::new(128, false);
        w.resume_at(1000);
        w.accept(1010).unwrap();
        // 1005 was never received (above what the other process had accepted).
        assert_eq!(w.accept(1005), Ok(()));
        assert_eq!(w.accept(1005), Err(Refused::Replayed));
        assert_eq!(w.check(1000), Err(Refused::Replayed), "up to the floor: received");
    }

    /// The growing ring against a set of every number received: sizes from one word to
    /// the default, steps that grow and slide it (small ones, jumps of a few blocks, jumps
    /// past the whole window), late and replayed numbers, a resume in the middle.
    #[test]
    fn a_growing_window_answers_as_a_full_one() {
        for size in [64u32, 128, 960, 4096] {
            let mut w = ReplayWindow::new(size, false);
            let size = u64::from(size);
            let (mut seen, mut top, mut floor) = (std::collections::BTreeSet::new(), 0u64, 0u64);
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ size;
            for i in 0..40_000u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i == 20_000 {
                    top += 5000;
                    floor = top;
                    w.resume_at(top);
                }
                let seq = match x % 16 {
                    // A jump: a few blocks, or past the whole window.
                    0 => top + 1 + (x >> 8) % (3 * size),
                    // Late or replayed, inside the window or just left of it.
                    1..=6 => top.saturating_sub((x >> 8) % (size + 64)).max(1),
                    _ => top + 1 + (x >> 8) % 8,
                };
                let want = if seq > top {
                    Ok(())
                } else if top - seq >= size {
                    Err(Refused::TooOld)
                } else if seq <= floor || seen.contains(&seq) {
                    Err(Refused::Replayed)
                } else {
                    Ok(())
                };
                assert_eq!(w.accept(seq), want, "size {size}, seq {seq}, top {top}, step {i}");
                if want.is_ok() {
                    seen.insert(seq);
                    top = top.max(seq);
                }
                assert!(w.bitmap_bytes() as u64 <= (size / 64 + 1) * 8);
            }
        }
    }
}
