//! SPIs in our shards: the randomness the IKE engine draws from, with every SPI it
//! allocates written into a shard this pod owns (and may allocate in), so that any member
//! routes the SA's packets to us from the SPI alone.

use concentrator_crypto::{CryptoError, DhGroup, KeyExchange};
use concentrator_ike::responder::{Entropy, SystemEntropy};

use concentrator_fleet::Shard;

use super::view::SharedView;

/// The gateway's [`Entropy`]: the system's, and SPIs in our shards in a fleet, or in the
/// shards of one IKE worker of several (`control::workers`).
#[derive(Clone, Debug, Default)]
pub struct GatewayEntropy {
    view: Option<SharedView>,
    /// (this worker, of how many): standalone with several IKE workers, a new IKE SA's SPIs
    /// go in a shard of this worker's.
    worker: Option<(usize, usize)>,
}

impl GatewayEntropy {
    /// Standalone (`None`) or in the fleet `view` describes.
    pub fn new(view: Option<SharedView>) -> Self {
        Self { view, worker: None }
    }

    /// For IKE worker `w` of `n` (standalone: a fleet runs one worker).
    pub fn for_worker(self, w: usize, n: usize) -> Self {
        Self {
            worker: (n > 1 && self.view.is_none()).then_some((w, n)),
            ..self
        }
    }
}

impl Entropy for GatewayEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), CryptoError> {
        SystemEntropy.fill(buf)
    }

    fn key_exchange(&mut self, group: DhGroup) -> Result<KeyExchange, CryptoError> {
        SystemEntropy.key_exchange(group)
    }

    fn spi(&mut self, buf: &mut [u8], near: Option<u64>) -> Result<(), CryptoError> {
        SystemEntropy.fill(buf)?;
        let Some(view) = &self.view else {
            return self.worker_spi(buf, near);
        };
        let shard = match near {
            // Every SPI of an IKE SA in the shard of its first: the shard is taken over (and
            // handed over) with the whole IKE SA in it.
            Some(spi) => Shard::of_ike_spi(spi),
            None => {
                let mut pick = [0u8; 8];
                SystemEntropy.fill(&mut pick)?;
                // No shard to allocate in (not joined yet, or every shard of ours is being
                // moved): no SA can be started here, and the engine refuses it.
                view.pick_shard(u64::from_be_bytes(pick))
                    .ok_or(CryptoError::Internal)?
            }
        };
        match buf.len() {
            8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(buf);
                let spi = shard
                    .ike_spi(u64::from_be_bytes(b))
                    .ok_or(CryptoError::Internal)?;
                buf.copy_from_slice(&spi.to_be_bytes());
            }
            4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(buf);
                // A reserved value (below 256): zero, which the engine draws again (the value
                // as drawn would lie in another shard).
                match shard.esp_spi(u32::from_be_bytes(b)) {
                    Some(spi) => buf.copy_from_slice(&spi.to_be_bytes()),
                    None => buf.fill(0),
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl GatewayEntropy {
    /// Standalone: an IKE SPI (freshly drawn in `buf`) in a shard of this worker's, or, for a
    /// later SA of an IKE SA, in the shard of its first (so that every IKE SA, rekeyed or
    /// not, stays in its worker); an inbound ESP SPI in the shard of its IKE SA (so that the
    /// data plane's events about it reach that worker alone).
    fn worker_spi(&self, buf: &mut [u8], near: Option<u64>) -> Result<(), CryptoError> {
        let Some((w, n)) = self.worker else {
            return Ok(());
        };
        if let (Ok(b), Some(near)) = (<[u8; 4]>::try_from(&*buf), near) {
            match Shard::of_ike_spi(near).esp_spi(u32::from_be_bytes(b)) {
                Some(spi) => buf.copy_from_slice(&spi.to_be_bytes()),
                // Reserved (below 256): the engine draws again.
                None => buf.fill(0),
            }
            return Ok(());
        }
        let Ok(b) = <[u8; 8]>::try_from(&*buf) else {
            return Ok(());
        };
        let random = u64::from_be_bytes(b);
        let shard = match near {
            Some(spi) => Some(Shard::of_ike_spi(spi)),
            None => crate::control::shard_for_worker(w, n, random.rotate_left(17)),
        };
        let Some(shard) = shard else {
            return Ok(());
        };
        // Zero (RFC 7296: "MUST NOT be zero") only in shard 0: the engine draws again. A
        // random SPI kept instead would be routed to another worker.
        match shard.ike_spi(random) {
            Some(spi) => buf.copy_from_slice(&spi.to_be_bytes()),
            None => buf.fill(0),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use concentrator_fleet::map::{Report, plan};
    use concentrator_fleet::{MemberId, ShardMap};

    use super::*;
    use crate::cluster::View;

    #[test]
    fn every_spi_of_an_ike_sa_lands_in_the_shard_of_its_first() {
        let view = Arc::new(View::new());
        let reports: BTreeMap<_, _> = [(MemberId(0), Report::default())].into();
        let map = plan(&ShardMap::new(), &reports).unwrap();
        view.set_me(Some(MemberId(0)));
        view.apply(&map, BTreeMap::new());
        let mut e = GatewayEntropy::new(Some(view));
        for _ in 0..50 {
            let mut ike = [0u8; 8];
            e.spi(&mut ike, None).unwrap();
            let ike = u64::from_be_bytes(ike);
            let mut esp = [0u8; 4];
            e.spi(&mut esp, Some(ike)).unwrap();
            let mut rekeyed = [0u8; 8];
            e.spi(&mut rekeyed, Some(ike)).unwrap();
            let shard = Shard::of_ike_spi(ike);
            assert_eq!(Shard::of_esp_spi(u32::from_be_bytes(esp)), shard);
            assert_eq!(Shard::of_ike_spi(u64::from_be_bytes(rekeyed)), shard);
        }
    }

    #[test]
    fn each_worker_allocates_ike_spis_it_routes_to_itself() {
        for n in [2, 3, 8] {
            for w in 0..n {
                let mut e = GatewayEntropy::new(None).for_worker(w, n);
                for _ in 0..50 {
                    let mut ike = [0u8; 8];
                    e.spi(&mut ike, None).unwrap();
                    let ike = u64::from_be_bytes(ike);
                    assert_eq!(crate::control::worker_of_spi(n, ike), w);
                    let mut rekeyed = [0u8; 8];
                    e.spi(&mut rekeyed, Some(ike)).unwrap();
                    assert_eq!(crate::control::worker_of_spi(n, u64::from_be_bytes(rekeyed)), w);
                    // Its CHILD SAs' inbound SPIs: the data plane's events find the worker.
                    let mut esp = [0u8; 4];
                    e.spi(&mut esp, Some(ike)).unwrap();
                    let esp = u32::from_be_bytes(esp);
                    assert!(esp == 0 || crate::control::worker_of_esp_spi(n, esp) == w);
                }
            }
        }
        // One worker: SPIs as drawn, as before workers.
        let mut e = GatewayEntropy::new(None).for_worker(0, 1);
        let shards: std::collections::HashSet<_> = (0..200)
            .map(|_| {
                let mut ike = [0u8; 8];
                e.spi(&mut ike, None).unwrap();
                Shard::of_ike_spi(u64::from_be_bytes(ike))
            })
            .collect();
        assert!(shards.len() > 50);
    }
}
