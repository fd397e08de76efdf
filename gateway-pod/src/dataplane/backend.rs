//! The hook for carrying CHILD SAs somewhere else than the userspace data plane: a
//! [`ChildSaBackend`] takes a negotiated CHILD SA as IKE produced it ([`ChildSaSpec`]: SPIs,
//! transforms, keys, selectors, peer, encapsulation) and carries it. [`DataplaneHandle`] is
//! the implementation every test runs; [`XfrmBackend`] marks where a kernel IPsec (XFRM)
//! backend for bare-metal nodes whose kernel has ESP would go (an `xfrmnetlink` state and
//! policy per SA). It is not implemented: the kernels of the build and test machines have no
//! ESP, so it could not be tested here. The control plane installs every CHILD SA through a
//! `dyn ChildSaBackend`, so a backend is a matter of which one the gateway starts with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use concentrator_crds::proposal::{Encryption, Integrity};
use concentrator_crypto::{CryptoError, DirectionKeys};
use concentrator_esp::sa::{Lifetime, Selector};
use concentrator_esp::{Inbound, Outbound};
use ipnet::IpNet;

use super::shared::DataplaneHandle;
use super::table::{InboundSa, OutboundSa, SaCounters};
use crate::cluster::Via;

/// One negotiated tunnel-mode CHILD SA, whatever carries it.
pub struct ChildSaSpec {
    /// Our SPI (the peer's packets carry it); names the SA.
    pub spi_in: u32,
    /// The peer's SPI (our packets carry it).
    pub spi_out: u32,
    pub encryption: Encryption,
    /// `None` for an AEAD.
    pub integrity: Option<Integrity>,
    /// Keys of the peer-to-us direction.
    pub keys_in: DirectionKeys,
    /// Keys of the us-to-peer direction.
    pub keys_out: DirectionKeys,
    pub esn: bool,
    pub replay_window: u32,
    /// Negotiated TSr (our side) and TSi (the peer's).
    pub local: Vec<Selector>,
    pub remote: Vec<Selector>,
    /// The destinations routed into the SA.
    pub subnets: Vec<IpNet>,
    /// The peer's outer address (and UDP port with `udp_encap`).
    pub peer: SocketAddr,
    /// ESP in UDP (RFC 3948) rather than plain ESP.
    pub udp_encap: bool,
    /// Volume limits (time limits are the IKE engine's).
    pub volume: Lifetime,
    /// In a fleet, the member the site's flow enters through.
    pub via: Arc<Via>,
    /// An SA taken over from another member: where its sequence numbers carry on.
    pub resume: Option<Resume>,
}

/// Where an SA taken over from another member carries on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// The old owner never sent past this sequence number (its acknowledged ceiling).
    pub sent_up_to: u64,
    /// The old owner had accepted the peer's packets up to this sequence number.
    pub received_up_to: u64,
}

/// Why a backend cannot carry an SA.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("CHILD SA keys: {0}")]
    Keys(#[from] CryptoError),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("inbound SPI {0:08x} is another CHILD SA's")]
    SpiInUse(u32),
}

/// Something that carries CHILD SAs.
pub trait ChildSaBackend: Send + Sync {
    /// Carries `spec` from now on; returns its traffic counters.
    fn install_child(&self, spec: ChildSaSpec) -> Result<Arc<SaCounters>, BackendError>;
    /// Stops carrying the CHILD SA whose inbound SPI is `spi_in`.
    fn remove_child(&self, spi_in: u32);
    /// In a fleet: packets toward `subnet` go to `member`, which holds the site's tunnel.
    fn elsewhere(&self, _subnet: IpNet, _member: concentrator_fleet::MemberId) {}
    /// In a fleet: no member holds the tunnel toward `subnet`, and we may not start one.
    fn not_held(&self, _subnet: IpNet) {}
    /// Carries out the installs and removals asked for so far (a backend may gather them:
    /// the control plane calls this once per wake-up, before it sends its IKE messages).
    fn flush(&self) {}
}

impl ChildSaBackend for DataplaneHandle {
    fn install_child(&self, spec: ChildSaSpec) -> Result<Arc<SaCounters>, BackendError> {
        if !self.carries(spec.udp_encap) {
            return Err(BackendError::Unsupported(if spec.udp_encap {
                "ESP in UDP needs the UDP socket, and this data plane has none"
            } else {
                "the peer negotiated plain ESP (no UDP encapsulation), and this gateway runs \
                 without --raw-esp"
            }));
        }
        let mut inbound = Inbound::from_keys(
            spec.spi_in,
            spec.encryption,
            spec.integrity,
            &spec.keys_in,
            spec.esn,
            spec.replay_window,
        )?;
        let mut outbound = Outbound::from_keys(
            spec.spi_out,
            spec.encryption,
            spec.integrity,
            &spec.keys_out,
            spec.esn,
        )?;
        let counters = SaCounters::with_limits(Instant::now(), spec.volume);
        if let Some(r) = spec.resume {
            inbound = inbound.resume_at(r.received_up_to);
            outbound = outbound.resume_after(r.sent_up_to);
            counters.note_inbound_seq(r.received_up_to);
        }
        let counters = Arc::new(counters.sending(outbound.counter()));
        let installed = self.defer_install(
            InboundSa {
                sa: inbound,
                local: spec.local,
                remote: spec.remote,
                counters: counters.clone(),
                via: spec.via.clone(),
            },
            OutboundSa {
                id: spec.spi_in,
                sa: outbound,
                peer: spec.peer,
                udp_encap: spec.udp_encap,
                counters: counters.clone(),
                via: spec.via,
            },
            spec.subnets,
        );
        if !installed {
            return Err(BackendError::SpiInUse(spec.spi_in));
        }
        Ok(counters)
    }

    fn remove_child(&self, spi_in: u32) {
        self.defer_remove(spi_in);
    }

    fn flush(&self) {
        Self::flush(self);
    }

    fn elsewhere(&self, subnet: IpNet, member: concentrator_fleet::MemberId) {
        Self::elsewhere(self, subnet, member);
    }

    fn not_held(&self, subnet: IpNet) {
        Self::not_held(self, subnet);
    }
}

/// The kernel's IPsec (XFRM) as a backend: not implemented (see the module docs).
pub struct XfrmBackend;

impl ChildSaBackend for XfrmBackend {
    fn install_child(&self, _spec: ChildSaSpec) -> Result<Arc<SaCounters>, BackendError> {
        Err(BackendError::Unsupported(
            "the kernel XFRM backend is not implemented (no kernel ESP to test it against)",
        ))
    }

    fn remove_child(&self, _spi_in: u32) {}
}

#[cfg(test)]
mod tests {
    use concentrator_crypto::SecretBytes;

    use super::*;

    fn spec(encryption: Encryption, integrity: Option<Integrity>) -> ChildSaSpec {
        let keys = || DirectionKeys {
            encr: SecretBytes::from_slice(&[0x11; 16]),
            salt: SecretBytes::from_slice(if encryption.is_aead() { &[0x33; 4] } else { &[] }),
            integ: SecretBytes::from_slice(&[]),
        };
        ChildSaSpec {
            spi_in: 0xa1,
            spi_out: 0xb1,
            encryption,
            integrity,
            keys_in: keys(),
            keys_out: keys(),
            esn: false,
            replay_window: 64,
            local: Vec::new(),
            remote: Vec::new(),
            subnets: vec!["10.2.0.0/24".parse().unwrap()],
            peer: "192.0.2.2:4500".parse().unwrap(),
            udp_encap: true,
            volume: Lifetime::default(),
            via: Arc::default(),
            resume: None,
        }
    }

    #[test]
    fn a_second_child_sa_with_an_inbound_spi_in_use_is_refused() {
        let (handle, mut rx) = DataplaneHandle::detached();
        let gcm = Encryption::AesGcm16 { key_bits: 128 };
        assert!(handle.install_child(spec(gcm, None)).is_ok());
        // Another SA drawing the same SPI would replace the first in the data plane.
        assert!(matches!(
            handle.install_child(spec(gcm, None)),
            Err(BackendError::SpiInUse(0xa1))
        ));
        // A taken-over SA as well (its adoption never installs an SA held here).
        let resumed = ChildSaSpec {
            resume: Some(Resume {
                sent_up_to: 10,
                received_up_to: 20,
            }),
            ..spec(gcm, None)
        };
        assert!(matches!(
            handle.install_child(resumed),
            Err(BackendError::SpiInUse(0xa1))
        ));
        // Once removed, the SPI may be drawn again.
        handle.remove_child(0xa1);
        assert!(handle.install_child(spec(gcm, None)).is_ok());
        ChildSaBackend::flush(&handle);
        assert_eq!(rx.installs(), 2);
    }

    #[test]
    fn the_userspace_backend_takes_what_it_can_carry_and_xfrm_nothing() {
        let (handle, mut rx) = DataplaneHandle::detached();
        let gcm = Encryption::AesGcm16 { key_bits: 128 };
        assert!(handle.install_child(spec(gcm, None)).is_ok());
        assert_eq!(rx.installs(), 0, "gathered until the flush");
        ChildSaBackend::flush(&handle);
        assert_eq!(rx.installs(), 1, "one install reached the worker");
        let cbc_without_integrity = spec(Encryption::AesCbc { key_bits: 128 }, None);
        assert!(matches!(
            handle.install_child(cbc_without_integrity),
            Err(BackendError::Keys(_))
        ));
        assert_eq!(rx.installs(), 0);
        // Plain ESP without a raw socket is refused, not sent in UDP the peer would drop.
        let plain = ChildSaSpec {
            udp_encap: false,
            ..spec(gcm, None)
        };
        assert!(matches!(
            handle.install_child(plain),
            Err(BackendError::Unsupported(_))
        ));
        assert_eq!(rx.installs(), 0);
        assert!(matches!(
            XfrmBackend.install_child(spec(gcm, None)),
            Err(BackendError::Unsupported(_))
        ));
    }
}
