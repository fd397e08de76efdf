//! An IKE SA in the role we have in it: what the endpoint asks of either role, once.

use std::time::Instant;

use crate::error::Error;
use crate::initiator::Initiator;
use crate::responder::Responder;
use crate::sa::snapshot::{IkeSaSnapshot, Role, SnapshotError};
use crate::sa::{Entropy, Event, Incoming, Transmit};

/// An IKE SA, in the role we have in it.
#[derive(Debug)]
pub enum Sa {
    /// The peer started it.
    Responder(Responder),
    /// We started it ([`super::Endpoint::connect`]). Boxed: an initiator is twice a
    /// responder's size, and every SA of the endpoint's table (nearly all responders) would
    /// be as large as the larger variant.
    Initiator(Box<Initiator>),
}

impl Sa {
    /// Who started the SA.
    pub fn role(&self) -> Role {
        match self {
            Self::Responder(_) => Role::Responder,
            Self::Initiator(_) => Role::Initiator,
        }
    }

    /// Every IKE SPI of ours the peer's messages may carry (the SA in use and, until it
    /// is deleted, the one a rekey replaced).
    pub fn our_spis(&self) -> Vec<u64> {
        match self {
            Self::Responder(r) => r.spis_r(),
            Self::Initiator(i) => i.our_spis(),
        }
    }

    /// The CHILD SAs of the established IKE SA, as `(spi_in, spi_out)`.
    pub fn child_spis(&self) -> Vec<(u32, u32)> {
        match self {
            Self::Responder(r) => r.child_spis(),
            Self::Initiator(i) => i.child_spis(),
        }
    }

    pub(super) fn handle(&mut self, d: &Incoming<'_>, entropy: &mut dyn Entropy) -> Result<(), Error> {
        match self {
            Self::Responder(r) => r.handle(d, entropy),
            Self::Initiator(i) => i.handle(d, entropy),
        }
    }

    pub(super) fn handle_timeout(&mut self, now: Instant, entropy: &mut dyn Entropy) {
        match self {
            Self::Responder(r) => r.handle_timeout(now, entropy),
            Self::Initiator(i) => i.handle_timeout(now, entropy),
        }
    }

    pub(super) fn handle_child_traffic(&mut self, now: Instant) {
        match self {
            Self::Responder(r) => r.handle_child_traffic(now),
            Self::Initiator(i) => i.handle_child_traffic(now),
        }
    }

    pub(super) fn rekey_child(&mut self, spi_in: u32, now: Instant, entropy: &mut dyn Entropy) -> bool {
        match self {
            Self::Responder(r) => r.rekey_child(spi_in, now, entropy),
            Self::Initiator(i) => i.rekey_child(spi_in, now, entropy),
        }
    }

    pub(super) fn delete(&mut self, now: Instant) {
        match self {
            Self::Responder(r) => r.delete(now),
            Self::Initiator(i) => i.delete(now),
        }
    }

    pub(super) fn snapshot(&self, now: Instant) -> Result<IkeSaSnapshot, SnapshotError> {
        match self {
            Self::Responder(r) => r.snapshot(now),
            Self::Initiator(i) => i.snapshot(now),
        }
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Responder(r) => r.poll_timeout(),
            Self::Initiator(i) => i.poll_timeout(),
        }
    }

    pub(super) fn poll_transmit(&mut self) -> Option<Transmit> {
        match self {
            Self::Responder(r) => r.poll_transmit(),
            Self::Initiator(i) => i.poll_transmit(),
        }
    }

    pub(super) fn poll_event(&mut self) -> Option<Event> {
        match self {
            Self::Responder(r) => r.poll_event(),
            Self::Initiator(i) => i.poll_event(),
        }
    }

    /// Whether IKE_AUTH completed (a half-open SA has no state worth a snapshot).
    pub fn is_established(&self) -> bool {
        match self {
            Self::Responder(r) => r.is_established(),
            Self::Initiator(i) => i.is_established(),
        }
    }

    /// See [`Responder::forget_init_exchange`].
    pub(super) fn forget_init_exchange(&mut self) {
        match self {
            Self::Responder(r) => r.forget_init_exchange(),
            Self::Initiator(i) => i.forget_init_exchange(),
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        match self {
            Self::Responder(r) => r.is_closed(),
            Self::Initiator(i) => i.is_closed(),
        }
    }
}
