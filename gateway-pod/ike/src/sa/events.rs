//! The queue of events a role reports, which also keeps what each CHILD SA it reported
//! installed was installed with: a snapshot of the IKE SA carries its CHILD SAs' keys and
//! selectors, which the data plane took from the event.

use std::collections::VecDeque;

use super::ChildSa;

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
    pub(crate) fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            installed: Vec::new(),
        }
    }

    /// A queue for an IKE SA restored with `installed`.
    pub(crate) fn restored(installed: Vec<ChildSa>) -> Self {
        Self {
            queue: VecDeque::new(),
            installed,
        }
    }

    pub(crate) fn push_back(&mut self, e: E) {
        if let Some(c) = e.installed() {
            self.installed.push(c.clone());
        }
        if let Some(spi_in) = e.deleted() {
            self.installed.retain(|c| c.spi_in != spi_in);
        }
        self.queue.push_back(e);
    }

    pub(crate) fn extend(&mut self, events: impl IntoIterator<Item = E>) {
        for e in events {
            self.push_back(e);
        }
    }

    pub(crate) fn pop_front(&mut self) -> Option<E> {
        self.queue.pop_front()
    }

    /// The installed CHILD SA whose inbound SPI is `spi_in`.
    pub(crate) fn child(&self, spi_in: u32) -> Option<&ChildSa> {
        self.installed.iter().find(|c| c.spi_in == spi_in)
    }
}
