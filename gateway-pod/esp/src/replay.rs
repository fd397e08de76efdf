//! The anti-replay window of RFC 4303 §3.4.3, with the extended-sequence-number inference of
//! its Appendix A. A ring of 64-bit words (the RFC 6479 layout): checking and sliding touch a
//! bounded number of words and never allocate.

/// Sequence numbers seen recently, for one inbound SA.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Window size in packets (a multiple of 64; 0 disables the check).
    size: u64,
    /// Highest sequence number accepted so far (full 64 bits); 0 before the first packet.
    top: u64,
    /// One bit per sequence number, word `(seq / 64) % words.len()`. One word more than the
    /// window needs, so sliding never clears bits still inside the window.
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
    /// [`Self::MAX`]; 0 disables it).
    pub fn new(size: u32, esn: bool) -> Self {
        let size = u64::from(size.min(Self::MAX)).div_ceil(64) * 64;
        let words = if size == 0 { 0 } else { size / 64 + 1 };
        Self {
            size,
            top: 0,
            words: vec![0; words as usize].into_boxed_slice(),
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
        self.words.fill(u64::MAX);
    }

    /// The window size in packets.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Highest sequence number accepted.
    pub fn top(&self) -> u64 {
        self.top
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
        let (word, bit) = self.slot(seq);
        if self.words[word] & bit != 0 {
            Err(Refused::Replayed)
        } else {
            Ok(())
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
        if seq > self.top {
            let n = self.words.len() as u64;
            let (old_block, new_block) = (self.top / 64, seq / 64);
            // Clear the words the window slides over, at most the whole ring.
            let steps = (new_block - old_block).min(n);
            for i in 1..=steps {
                let w = ((old_block + i) % n) as usize;
                self.words[w] = 0;
            }
            self.top = seq;
        }
        let (word, bit) = self.slot(seq);
        self.words[word] |= bit;
        Ok(())
    }

    fn slot(&self, seq: u64) -> (usize, u64) {
        let n = self.words.len() as u64;
        (((seq / 64) % n) as usize, 1u64 << (seq % 64))
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
}
