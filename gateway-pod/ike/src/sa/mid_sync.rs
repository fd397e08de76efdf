//! RFC 6311 Message ID synchronization: after a take-over, the process that carries an IKE SA
//! on from a copy may be a few exchanges behind the peer. Both ends announce
//! N(IKEV2_MESSAGE_ID_SYNC_SUPPORTED) in IKE_AUTH (§3); then the new owner sends one
//! INFORMATIONAL request with Message ID zero holding N(IKEV2_MESSAGE_ID_SYNC) with a nonce
//! and its two counters, and the peer answers with the same nonce and the counters both will
//! use (§4.2, each the larger of the two views).
//!
//! The notify's data is the 4-octet nonce, the next Message ID the sender will use in a
//! request (EXPECTED_SEND_REQ_MESSAGE_ID) and the next one it expects in a request of the
//! other end (EXPECTED_RECV_REQ_MESSAGE_ID), both 32-bit big-endian.

use std::time::Instant;

use crate::message::codepoints::NotifyType;
use crate::payload::{Notify, Payload};

/// The nonce's length: 4 octets, as strongSwan writes and reads it.
pub(crate) const NONCE_LEN: usize = 4;

/// The data of an N(IKEV2_MESSAGE_ID_SYNC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SyncData {
    pub(crate) nonce: [u8; NONCE_LEN],
    /// The Message ID of the sender's next request.
    pub(crate) send: u32,
    /// The Message ID the sender expects in the other end's next request.
    pub(crate) recv: u32,
}

impl SyncData {
    pub(crate) fn encode(&self) -> [u8; NONCE_LEN + 8] {
        let mut b = [0; NONCE_LEN + 8];
        b[..NONCE_LEN].copy_from_slice(&self.nonce);
        b[NONCE_LEN..NONCE_LEN + 4].copy_from_slice(&self.send.to_be_bytes());
        b[NONCE_LEN + 4..].copy_from_slice(&self.recv.to_be_bytes());
        b
    }

    /// Reads the notify's data: exactly a nonce and two counters.
    pub(crate) fn decode(data: &[u8]) -> Option<Self> {
        let b: &[u8; NONCE_LEN + 8] = data.try_into().ok()?;
        let (nonce, rest) = b.split_at(NONCE_LEN);
        let (send, recv) = rest.split_at(4);
        Some(Self {
            nonce: nonce.try_into().ok()?,
            send: u32::from_be_bytes(send.try_into().ok()?),
            recv: u32::from_be_bytes(recv.try_into().ok()?),
        })
    }

    /// The N(IKEV2_MESSAGE_ID_SYNC) of `encoded`.
    pub(crate) fn payload(encoded: &[u8]) -> Payload<'_> {
        Payload::Notify(Notify::new(NotifyType::IKEV2_MESSAGE_ID_SYNC, encoded))
    }

    /// The first N(IKEV2_MESSAGE_ID_SYNC) of `inner` that decodes.
    pub(crate) fn find(inner: &[Payload<'_>]) -> Option<Self> {
        inner.iter().find_map(|p| match p {
            Payload::Notify(n) if n.notify_type == NotifyType::IKEV2_MESSAGE_ID_SYNC => Self::decode(n.data),
            _ => None,
        })
    }
}

/// Whether the decrypted payloads of a Message ID zero INFORMATIONAL are a sync request:
/// the sync notify and nothing else (strongSwan's test too; a liveness check or a DELETE with
/// Message ID zero is an ordinary request).
pub(crate) fn is_sync_request(inner: &[Payload<'_>]) -> bool {
    !inner.is_empty()
        && inner.iter().all(|p| {
            matches!(p, Payload::Notify(n)
                if n.notify_type == NotifyType::IKEV2_MESSAGE_ID_SYNC
                    || n.notify_type == NotifyType::IPSEC_REPLAY_COUNTER_SYNC)
        })
}

/// Whether the IKE_AUTH payloads announce RFC 6311 support.
pub(crate) fn announced(inner: &[Payload<'_>]) -> bool {
    inner.iter().any(
        |p| matches!(p, Payload::Notify(n) if n.notify_type == NotifyType::IKEV2_MESSAGE_ID_SYNC_SUPPORTED),
    )
}

/// Our announcement, for the IKE_AUTH request (initiator) or response (responder).
pub(crate) fn announcement() -> Payload<'static> {
    Payload::Notify(Notify::new(NotifyType::IKEV2_MESSAGE_ID_SYNC_SUPPORTED, &[]))
}

/// Where an IKE SA stands with RFC 6311.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MidSync {
    /// One end did not announce support: a restored SA relies on the catch-up window.
    Unsupported,
    /// Both ends announced support; nothing to do.
    Supported,
    /// Restored from a copy: a sync request is due from then, as soon as no request of ours
    /// is in flight.
    Due(Instant),
    /// Our sync request with this nonce is in flight.
    InFlight([u8; NONCE_LEN]),
}

impl MidSync {
    pub(crate) fn supported(self) -> bool {
        self != Self::Unsupported
    }

    pub(crate) fn from_announced(announced: bool) -> Self {
        if announced {
            Self::Supported
        } else {
            Self::Unsupported
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_round_trips_and_refuses_other_lengths() {
        let d = SyncData {
            nonce: [1, 2, 3, 4],
            send: 7,
            recv: 0x0102_0304,
        };
        let e = d.encode();
        assert_eq!(&e[4..8], &[0, 0, 0, 7]);
        assert_eq!(SyncData::decode(&e), Some(d));
        assert_eq!(SyncData::decode(&e[..11]), None);
        assert_eq!(SyncData::decode(&[0; 13]), None);
        assert_eq!(SyncData::decode(&[]), None);
    }

    #[test]
    fn only_sync_notifies_make_a_sync_request() {
        let e = SyncData {
            nonce: [9; 4],
            send: 1,
            recv: 2,
        }
        .encode();
        assert!(is_sync_request(&[SyncData::payload(&e)]));
        assert!(!is_sync_request(&[]));
        assert!(!is_sync_request(&[
            SyncData::payload(&e),
            Payload::Notify(Notify::new(NotifyType::INITIAL_CONTACT, &[]))
        ]));
        assert_eq!(SyncData::find(&[SyncData::payload(&e)]).map(|d| d.recv), Some(2));
    }
}
