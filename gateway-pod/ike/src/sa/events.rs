//! What an IKE SA hands out, in either role and phase ([`Output`]): the datagrams to send and
//! the queue of events, which also keeps what each CHILD SA it reported installed was
//! installed with: a snapshot of the IKE SA carries its CHILD SAs' keys and selectors, which
//! the data plane took from the event.

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::{ChildSa, Event, Transmit};

/// An event that may install or delete a CHILD SA.
pub(crate) trait ChildEvent {
    /// The CHILD SA it installs.
    fn installed(&self) -> Option<&ChildSa>;
    /// The `spi_in` of the CHILD SA it deletes.
    fn deleted(&self) -> Option<u32>;
}

/// The events not yet polled, and the CHILD SAs installed and not deleted.
pub(crate) struct Events<E> {
    queue: VecDeque<E>,
    installed: Vec<ChildSa>,
}

impl<E: ChildEvent> Events<E> {
    /// A queue for an IKE SA restored with `installed`.
    pub(crate) fn restored(installed: Vec<ChildSa>) -> Self {
        Self {
            queue: VecDeque::new(),
            installed,
        }
    }

    pub(crate) fn push_back(&mut self, e: E) {
        if let Some(c) = e.installed() {
            // Exactly one more: a Vec's first growth makes room for four CHILD SAs, where an
            // IKE SA holds one or two (three quarters of a KiB per tunnel for nothing).
            self.installed.reserve_exact(1);
            self.installed.push(c.clone());
        }
        if let Some(spi_in) = e.deleted() {
            self.installed.retain(|c| c.spi_in != spi_in);
            self.installed.shrink_to_fit();
        }
        self.queue.push_back(e);
    }

    pub(crate) fn pop_front(&mut self) -> Option<E> {
        let e = self.queue.pop_front();
        free_if_drained(&mut self.queue);
        e
    }

    /// The installed CHILD SA whose inbound SPI is `spi_in`.
    pub(crate) fn child(&self, spi_in: u32) -> Option<&ChildSa> {
        self.installed.iter().find(|c| c.spi_in == spi_in)
    }
}

/// The datagrams and events an IKE SA has not handed out yet; both roles own one, and the
/// established phase ([`super::established`]) writes to it without knowing the role.
pub(crate) struct Output {
    transmits: VecDeque<Transmit>,
    pub(crate) events: Events<Event>,
}

impl Output {
    pub(crate) fn new() -> Self {
        Self::restored(Vec::new())
    }

    /// The output of an IKE SA restored with `installed`.
    pub(crate) fn restored(installed: Vec<ChildSa>) -> Self {
        Self {
            transmits: VecDeque::new(),
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
        let t = self.transmits.pop_front();
        free_if_drained(&mut self.transmits);
        t
    }

    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// An IKE SA's queues are empty nearly all its life, between a few bursts (establishment,
/// rekeys): a drained queue gives its buffer back rather than keep it per tunnel.
fn free_if_drained<T>(queue: &mut VecDeque<T>) {
    if queue.is_empty() && queue.capacity() > 0 {
        *queue = VecDeque::new();
    }
}
