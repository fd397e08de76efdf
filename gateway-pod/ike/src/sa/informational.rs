//! INFORMATIONAL requests of the peer (RFC 7296 §1.4): liveness checks, Delete payloads and
//! error notifications.

use crate::message::codepoints::{NotifyType, ProtocolId};
use crate::payload::Payload;

use super::ChildRef;

/// What an INFORMATIONAL request asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Informational {
    /// The peer deletes the IKE SA the request came on.
    pub(crate) delete_ike: bool,
    /// The CHILD SAs the peer deleted, removed from the IKE SA's list.
    pub(crate) deleted: Vec<ChildRef>,
    /// Error notifications, for the caller to report.
    pub(crate) errors: Vec<NotifyType>,
}

/// Applies the request's Delete payloads to `children` and collects its error notifies.
///
/// RFC 7296 §3.11: a CHILD SA's Delete carries "the SPI the sending endpoint would expect in
/// inbound ESP or AH packets", which is our outbound SPI. SPIs we do not know are ignored
/// (the CHILD SA may be gone already: §1.4.1 lets both ends delete at once). We have no AH
/// SAs, so AH deletes are ignored as well.
pub(crate) fn process(inner: &[Payload<'_>], children: &mut Vec<ChildRef>) -> Informational {
    let mut out = Informational::default();
    for p in inner {
        match p {
            Payload::Delete(d) if d.protocol == ProtocolId::IKE => out.delete_ike = true,
            Payload::Delete(d) if d.protocol == ProtocolId::ESP => {
                for spi in &d.spis {
                    if let Some(i) = children.iter().position(|c| c.spi_out == *spi) {
                        out.deleted.push(children.remove(i));
                    }
                }
            }
            // RFC 7296 §1.4: "Messages in an INFORMATIONAL exchange contain zero or more
            // Notification, Delete, and Configuration payloads." Status notifies and CP
            // payloads ask nothing of us that we support.
            Payload::Notify(n) if n.notify_type.is_error() => out.errors.push(n.notify_type),
            _ => {}
        }
    }
    // A peer rekeys CHILD SAs all the SA's life: what the old ones held goes with them.
    children.shrink_to_fit();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{Delete, Notify};

    fn child(spi_in: u32, spi_out: u32) -> ChildRef {
        ChildRef {
            spi_in,
            spi_out,
            rekey_at: None,
            replaced: false,
        }
    }

    #[test]
    fn deletes_children_by_our_outbound_spi_and_ignores_unknown_ones() {
        let mut children = vec![child(1000, 0xc1), child(1001, 0xc2), child(1002, 0xc3)];
        let inner = [
            Payload::Delete(Delete {
                protocol: ProtocolId::ESP,
                spis: vec![0xc3, 0xdead, 0xc1, 0xc1],
            }),
            Payload::Delete(Delete {
                protocol: ProtocolId::AH,
                spis: vec![0xc2],
            }),
            Payload::Notify(Notify::new(NotifyType::INVALID_SPI, &[])),
            Payload::Notify(Notify::new(NotifyType::INITIAL_CONTACT, &[])),
        ];
        let out = process(&inner, &mut children);
        assert_eq!(
            out,
            Informational {
                delete_ike: false,
                deleted: vec![child(1002, 0xc3), child(1000, 0xc1)],
                errors: vec![NotifyType::INVALID_SPI],
            }
        );
        assert_eq!(children, [child(1001, 0xc2)]);
    }

    #[test]
    fn empty_request_is_a_liveness_check() {
        let mut children = vec![child(1000, 0xc1)];
        assert_eq!(process(&[], &mut children), Informational::default());
        assert_eq!(children.len(), 1);
    }

    #[test]
    fn ike_delete_is_reported() {
        let inner = [Payload::Delete(Delete {
            protocol: ProtocolId::IKE,
            spis: vec![],
        })];
        assert!(process(&inner, &mut Vec::new()).delete_ike);
    }
}
