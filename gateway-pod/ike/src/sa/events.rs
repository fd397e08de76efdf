//! What an IKE SA hands out, in either role and phase ([`Output`]): the datagrams to send and
//! the queue of events, which also keeps what each CHILD SA it reported installed was
//! installed with: a snapshot of the IKE SA carries its CHILD SAs' keys and selectors, which
//! the data plane took from the event.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use concentrator_algorithms::{Encryption, Esn, Integrity};
use concentrator_crypto::{DirectionKeys, SecretBytes};
use zeroize::Zeroizing;

use super::{ChildSa, Event, Transmit};
use crate::payload::{TrafficSelector, Ts};

/// An event that may install or delete a CHILD SA.
pub(crate) trait ChildEvent {
    /// The CHILD SA it installs.
    fn installed(&self) -> Option<&ChildSa>;
    /// The `spi_in` of the CHILD SA it deletes.
    fn deleted(&self) -> Option<u32>;
}

/// The events not yet polled, and the CHILD SAs installed and not deleted.
pub(crate) struct Events<E> {
    queue: Queue<E>,
    installed: Vec<InstalledChild>,
}

/// A CHILD SA as it was reported installed, kept only for a snapshot: [`ChildSa`]'s fields
/// with its keys and both lists of selectors in one zeroized block, where a `ChildSa`
/// spends ~250 bytes inline and six blocks on them, per tunnel.
struct InstalledChild {
    spi_in: u32,
    spi_out: u32,
    encryption: Encryption,
    integrity: Option<Integrity>,
    esn: Esn,
    udp_encap: bool,
    replaces: Option<u32>,
    lifetime: Duration,
    installed_at: Instant,
    /// The inbound encryption key, salt and integrity key, then the outbound ones, of the
    /// lengths in `key_lens`; then the local and the remote selectors, each as a TS payload
    /// body (RFC 7296 §3.13), of the lengths in `ts_lens`.
    blob: Zeroizing<Box<[u8]>>,
    key_lens: [u16; 6],
    ts_lens: [u16; 2],
}

impl InstalledChild {
    /// `None` for what a snapshot cannot carry either: keys longer than 64 KiB, more than
    /// 255 selectors, selectors other than address ranges (no transform or narrowing of
    /// ours makes them).
    fn new(c: &ChildSa) -> Option<Self> {
        let parts = [
            &c.inbound.encr,
            &c.inbound.salt,
            &c.inbound.integ,
            &c.outbound.encr,
            &c.outbound.salt,
            &c.outbound.integ,
        ];
        let mut key_lens = [0u16; 6];
        for (len, part) in key_lens.iter_mut().zip(parts) {
            *len = u16::try_from(part.len()).ok()?;
        }
        let mut ts = [Vec::new(), Vec::new()];
        for (body, list) in ts.iter_mut().zip([&c.ts_local, &c.ts_remote]) {
            if list.len() > usize::from(u8::MAX)
                || list.iter().any(|t| matches!(t, TrafficSelector::Other { .. }))
            {
                return None;
            }
            Ts {
                selectors: list.clone(),
            }
            .encode(body);
        }
        let ts_lens = [u16::try_from(ts[0].len()).ok()?, u16::try_from(ts[1].len()).ok()?];
        // Sized up front: growing it would leave a copy of the keys behind, unzeroized.
        let total = parts.iter().map(|p| p.len()).sum::<usize>() + ts[0].len() + ts[1].len();
        let mut blob = Vec::with_capacity(total);
        for p in parts {
            blob.extend_from_slice(p.expose());
        }
        blob.extend_from_slice(&ts[0]);
        blob.extend_from_slice(&ts[1]);
        Some(Self {
            spi_in: c.spi_in,
            spi_out: c.spi_out,
            encryption: c.encryption,
            integrity: c.integrity,
            esn: c.esn,
            udp_encap: c.udp_encap,
            replaces: c.replaces,
            lifetime: c.lifetime,
            installed_at: c.installed_at,
            // Exactly its capacity: the conversion does not reallocate.
            blob: Zeroizing::new(blob.into_boxed_slice()),
            key_lens,
            ts_lens,
        })
    }

    /// The CHILD SA as it was reported.
    fn child_sa(&self) -> ChildSa {
        let mut at = 0;
        let mut next = |len: usize| {
            let part = self.blob.get(at..at + len).unwrap_or_default();
            at += len;
            part
        };
        let mut keys = self
            .key_lens
            .map(|len| SecretBytes::from_slice(next(usize::from(len))))
            .into_iter();
        let mut key = || keys.next().unwrap_or_else(|| SecretBytes::from_slice(&[]));
        let mut direction = || DirectionKeys {
            encr: key(),
            salt: key(),
            integ: key(),
        };
        let (inbound, outbound) = (direction(), direction());
        let (local, remote) = (
            next(usize::from(self.ts_lens[0])),
            next(usize::from(self.ts_lens[1])),
        );
        let (ts_local, ts_remote) = (selectors(local), selectors(remote));
        ChildSa {
            spi_in: self.spi_in,
            spi_out: self.spi_out,
            encryption: self.encryption,
            integrity: self.integrity,
            esn: self.esn,
            inbound,
            outbound,
            ts_local,
            ts_remote,
            lifetime: self.lifetime,
            installed_at: self.installed_at,
            udp_encap: self.udp_encap,
            replaces: self.replaces,
        }
    }
}

/// The address ranges of a TS payload body that [`InstalledChild::new`] encoded (it keeps
/// no other kind, so decoding gives back every selector it was given).
fn selectors(body: &[u8]) -> Vec<TrafficSelector<'static>> {
    let Ok(ts) = Ts::decode(body) else {
        return Vec::new();
    };
    ts.selectors
        .into_iter()
        .filter_map(|t| match t {
            TrafficSelector::V4(r) => Some(TrafficSelector::V4(r)),
            TrafficSelector::V6(r) => Some(TrafficSelector::V6(r)),
            TrafficSelector::Other { .. } => None,
        })
        .collect()
}

impl<E: ChildEvent> Events<E> {
    /// A queue for an IKE SA restored with `installed`.
    pub(crate) fn restored(installed: &[ChildSa]) -> Self {
        Self {
            queue: Queue::default(),
            installed: installed.iter().filter_map(InstalledChild::new).collect(),
        }
    }

    pub(crate) fn push_back(&mut self, e: E) {
        if let Some(c) = e.installed().and_then(InstalledChild::new) {
            // Exactly one more: a Vec's first growth makes room for four CHILD SAs, where an
            // IKE SA holds one or two (most of a KiB per tunnel for nothing).
            self.installed.reserve_exact(1);
            self.installed.push(c);
        }
        if let Some(spi_in) = e.deleted() {
            self.installed.retain(|c| c.spi_in != spi_in);
            self.installed.shrink_to_fit();
        }
        self.queue.push_back(e);
    }

    pub(crate) fn pop_front(&mut self) -> Option<E> {
        self.queue.pop_front()
    }

    /// The installed CHILD SA whose inbound SPI is `spi_in`.
    pub(crate) fn child(&self, spi_in: u32) -> Option<ChildSa> {
        self.installed
            .iter()
            .find(|c| c.spi_in == spi_in)
            .map(InstalledChild::child_sa)
    }
}

/// The datagrams and events an IKE SA has not handed out yet; both roles own one, and the
/// established phase ([`super::established`]) writes to it without knowing the role.
pub(crate) struct Output {
    transmits: Queue<Transmit>,
    pub(crate) events: Events<Event>,
}

impl Output {
    pub(crate) fn new() -> Self {
        Self::restored(&[])
    }

    /// The output of an IKE SA restored with `installed`.
    pub(crate) fn restored(installed: &[ChildSa]) -> Self {
        Self {
            transmits: Queue::default(),
            events: Events::restored(installed),
        }
    }

    /// Queues `payload` from `local` to `remote`.
    pub(crate) fn send(&mut self, local: SocketAddr, remote: SocketAddr, payload: Vec<u8>) {
        self.transmits.push_back(Transmit {
            local,
            remote,
            payload,
        });
    }

    pub(crate) fn event(&mut self, e: Event) {
        self.events.push_back(e);
    }

    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// A queue that is empty nearly all of an IKE SA's life, between a few bursts
/// (establishment, liveness checks, rekeys): nothing but a null pointer while empty (a
/// `VecDeque` is 32 bytes inline, and keeps its buffer), allocated for a burst and freed
/// once drained.
#[allow(
    clippy::box_collection,
    reason = "the box is the point: 8 bytes per idle SA instead of a VecDeque's 32"
)]
struct Queue<T>(Option<Box<VecDeque<T>>>);

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> Queue<T> {
    fn push_back(&mut self, t: T) {
        self.0.get_or_insert_with(Box::default).push_back(t);
    }

    fn pop_front(&mut self) -> Option<T> {
        let q = self.0.as_mut()?;
        let t = q.pop_front();
        if q.is_empty() {
            self.0 = None;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::payload::TsRange;

    fn child(encryption: Encryption, integrity: Option<Integrity>, lens: [usize; 3]) -> ChildSa {
        let key = |len: usize, fill: u8| SecretBytes::from_slice(&vec![fill; len]);
        let range = |a: u8, b: u8| {
            TrafficSelector::V4(TsRange {
                ip_proto: 0,
                start_port: 0,
                end_port: 65535,
                start: Ipv4Addr::new(10, a, 0, 0),
                end: Ipv4Addr::new(10, a, b, 255),
            })
        };
        ChildSa {
            spi_in: 0x1111,
            spi_out: 0x2222,
            encryption,
            integrity,
            esn: Esn::Yes,
            inbound: DirectionKeys {
                encr: key(lens[0], 1),
                salt: key(lens[1], 2),
                integ: key(lens[2], 3),
            },
            outbound: DirectionKeys {
                encr: key(lens[0], 4),
                salt: key(lens[1], 5),
                integ: key(lens[2], 6),
            },
            ts_local: vec![range(1, 0)],
            ts_remote: vec![range(2, 0), range(3, 7)],
            lifetime: Duration::from_secs(3600),
            installed_at: Instant::now(),
            udp_encap: true,
            replaces: Some(0x3333),
        }
    }

    #[test]
    fn an_installed_child_gives_back_what_was_reported() {
        for c in [
            child(Encryption::AesGcm16 { key_bits: 128 }, None, [16, 4, 0]),
            child(
                Encryption::AesCbc { key_bits: 256 },
                Some(Integrity::HmacSha512_256),
                [32, 0, 64],
            ),
        ] {
            let back = InstalledChild::new(&c).expect("fits").child_sa();
            assert_eq!(
                (
                    back.spi_in,
                    back.spi_out,
                    back.encryption,
                    back.integrity,
                    back.esn
                ),
                (c.spi_in, c.spi_out, c.encryption, c.integrity, c.esn)
            );
            for (a, b) in [(&back.inbound, &c.inbound), (&back.outbound, &c.outbound)] {
                assert_eq!(a.encr.expose(), b.encr.expose());
                assert_eq!(a.salt.expose(), b.salt.expose());
                assert_eq!(a.integ.expose(), b.integ.expose());
            }
            assert_eq!((back.ts_local, back.ts_remote), (c.ts_local, c.ts_remote));
            assert_eq!(
                (back.lifetime, back.installed_at, back.udp_encap, back.replaces),
                (c.lifetime, c.installed_at, c.udp_encap, c.replaces)
            );
        }
    }
}
