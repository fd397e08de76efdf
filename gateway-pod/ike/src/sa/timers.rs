//! The timers of an IKE SA: a fieldless [`Timer`] per kind and a [`TimerTable`] of their
//! deadlines, the next of which is the SA's `poll_timeout` (the quinn habit). Both roles build
//! the same table for an established SA ([`TimerTable::established`]).

use std::time::{Duration, Instant};

use super::ChildRef;
use super::rekey::next_rekey;
use super::session::Session;

/// What a deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Timer {
    /// IKE_SA_INIT retransmission or the half-open limit, before the SA is established.
    Handshake,
    /// Retransmission of our request in flight on the IKE SA in use.
    Retransmit,
    /// Retransmission of our request on the IKE SA a rekey replaced, or its expiry.
    Previous,
    /// The soft lifetime of the IKE SA or of a CHILD SA: this side rekeys it.
    Rekey,
    /// A liveness check is due (RFC 7296 §2.4).
    Dpd,
    /// A restored copy asks the peer for its Message ID counters (RFC 6311).
    MidSync,
}

impl Timer {
    /// One past the last: the table's size.
    const COUNT: usize = Self::MidSync as usize + 1;
}

/// A deadline per [`Timer`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TimerTable([Option<Instant>; Timer::COUNT]);

impl TimerTable {
    pub(crate) fn set(&mut self, timer: Timer, at: Option<Instant>) {
        self.0[timer as usize] = at;
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }

    /// An established SA's timers: our request in flight, the replaced IKE SA (its request
    /// in flight or its expiry), and, while no request of ours is in flight, the next rekey,
    /// the liveness check `dpd` after the peer was last heard and a due RFC 6311 sync.
    pub(crate) fn established(
        current: &Session,
        previous: Option<(&Session, Instant)>,
        children: &[ChildRef],
        ike_rekey_at: Option<Instant>,
        last_heard: Instant,
        dpd: Option<Duration>,
        mid_sync: Option<Instant>,
    ) -> Self {
        let idle = current.can_start_request();
        let mut t = Self::default();
        t.set(Timer::Retransmit, current.pending_deadline());
        t.set(
            Timer::Previous,
            previous.map(|(p, expires)| p.pending_deadline().map_or(expires, |d| d.min(expires))),
        );
        t.set(
            Timer::Rekey,
            next_rekey(children)
                .into_iter()
                .chain(ike_rekey_at)
                .min()
                .filter(|_| idle),
        );
        t.set(
            Timer::Dpd,
            dpd.filter(|_| idle).and_then(|i| last_heard.checked_add(i)),
        );
        t.set(Timer::MidSync, mid_sync.filter(|_| idle));
        t
    }
}
