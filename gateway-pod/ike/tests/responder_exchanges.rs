//! The responder after IKE_AUTH, against the in-process initiator of `common`: INFORMATIONAL
//! (liveness, deletes, Message ID window), CREATE_CHILD_SA (new CHILD SA, CHILD SA rekey with
//! and without PFS, IKE SA rekey, refusals), the liveness checks the responder sends, and the
//! half-open and rekeyed-SA timers. Time is virtual: every call gets an explicit instant.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use concentrator_algorithms::{DhGroup, Encryption};
use concentrator_crypto::{ChildSaKeys, KeyExchange};
use concentrator_ike::negotiate::NegotiationError;
use concentrator_ike::payload::{Delete, Ke, Nonce, Notify, Payload, Ts};
use concentrator_ike::responder::{Config, Error, Retransmit};
use concentrator_ike::{
    DeleteReason, DhGroup as WireGroup, Event, ExchangeType, Flags, Message, NotifyType, ProtocolId,
    Responder, TransformType,
};

const SECOND: Duration = Duration::from_secs(1);

fn established(config: Config) -> (Responder, Peer, Instant) {
    let mut r = Responder::new(Arc::new(config));
    let t0 = Instant::now();
    let peer = Peer::establish(&mut r, t0);
    (r, peer, t0)
}

fn delete_esp(spis: Vec<u32>) -> Payload<'static> {
    Payload::Delete(Delete {
        protocol: ProtocolId::ESP,
        spis,
    })
}

fn delete_ike() -> Payload<'static> {
    Payload::Delete(Delete {
        protocol: ProtocolId::IKE,
        spis: vec![],
    })
}

fn assert_no_transmit(r: &mut Responder) {
    assert!(r.poll_transmit().is_none());
}

// ---- INFORMATIONAL ----

#[test]
fn answers_liveness_check_and_its_retransmission_from_the_cache() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    let (request, plain) = peer.exchange(&mut r, t0, ExchangeType::INFORMATIONAL, &[]);
    assert!(plain.payloads().is_empty());
    // RFC 7296 §2.2: the response carries the request's Message ID; §3.1: no I flag from the
    // original responder.
    assert_eq!(plain.header.message_id, 2);
    assert_eq!(plain.header.flags, Flags::RESPONSE);
    let (response, _) = peer.send(&mut r, t0, &request);
    let (again, _) = peer.send(&mut r, t0, &request);
    assert_eq!(response, again, "a retransmission gets the cached bytes");
    assert!(events(&mut r).is_empty());
    // The IKE_AUTH exchange is no longer the last one: its retransmission is dropped now.
    let (local, remote) = addrs();
    assert!(matches!(
        r.handle_datagram(t0, local, remote, &peer.auth_request, &mut Counter::new(0)),
        Err(Error::Unexpected(_))
    ));
    assert_no_transmit(&mut r);
    // The next request gets the next Message ID.
    let (_, plain) = peer.exchange(&mut r, t0, ExchangeType::INFORMATIONAL, &[]);
    assert_eq!(plain.header.message_id, 3);
}

#[test]
fn answers_ike_auth_and_ike_sa_init_retransmissions_until_the_next_request() {
    let (mut r, peer, t0) = established(config_with("aes128gcm16"));
    let (local, remote) = addrs();
    for (request, response) in [
        (&peer.auth_request, &peer.auth_response),
        (&peer.init_request, &peer.init_response),
    ] {
        r.handle_datagram(t0, local, remote, request, &mut Counter::new(0))
            .unwrap();
        assert_eq!(&r.poll_transmit().unwrap().payload, response);
    }
}

#[test]
fn drops_requests_outside_the_message_id_window() {
    let (mut r, peer, t0) = established(config_with("aes128gcm16"));
    let (local, remote) = addrs();
    for id in [0, 1, 3, 1000] {
        let request = peer
            .ike
            .seal(ExchangeType::INFORMATIONAL, id, Flags::INITIATOR, &[]);
        assert!(
            matches!(
                r.handle_datagram(t0, local, remote, &request, &mut Counter::new(0)),
                Err(Error::Unexpected(_))
            ),
            "Message ID {id}"
        );
        assert_no_transmit(&mut r);
    }
    assert!(r.is_established());
}

#[test]
fn drops_tampered_and_unprotected_requests_without_moving_the_window() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    let (local, remote) = addrs();
    let mut request = peer.request(ExchangeType::INFORMATIONAL, &[delete_ike()]);
    let n = request.len();
    request[n - 3] ^= 0x40;
    assert!(matches!(
        r.handle_datagram(t0, local, remote, &request, &mut Counter::new(0)),
        Err(Error::Packet(_))
    ));
    // An unencrypted Delete with the right SPIs and Message ID cannot end the SA either.
    let mut msg = Message::decode(&request).unwrap();
    msg.payloads = vec![delete_ike()];
    assert!(matches!(
        r.handle_datagram(t0, local, remote, &msg.to_vec(), &mut Counter::new(0)),
        Err(Error::Unexpected(_))
    ));
    // Nor one from another IKE SA.
    msg.header.spi_r ^= 1;
    assert!(
        r.handle_datagram(t0, local, remote, &msg.to_vec(), &mut Counter::new(0))
            .is_err()
    );
    assert_no_transmit(&mut r);
    assert!(events(&mut r).is_empty());
    assert!(r.is_established());
    // Message ID 2 is still the one expected.
    peer.ike.next_id = 2;
    let (_, plain) = peer.exchange(&mut r, t0, ExchangeType::INFORMATIONAL, &[]);
    assert_eq!(plain.header.message_id, 2);
}

#[test]
fn deletes_child_sa_and_answers_with_the_delete_of_its_pair() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    assert_eq!(r.child_spis(), [(peer.child_spi_r, ESP_SPI_I)]);
    // The SPIs a Delete names are the sender's inbound ones (RFC 7296 §3.11); an unknown one
    // is ignored.
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::INFORMATIONAL,
        &[delete_esp(vec![0xdead_beef, ESP_SPI_I])],
    );
    assert_eq!(plain.payloads(), [delete_esp(vec![peer.child_spi_r])]);
    let ev = events(&mut r);
    assert!(
        matches!(&ev[..], [Event::ChildSaDeleted { spi_in, spi_out }]
            if *spi_in == peer.child_spi_r && *spi_out == ESP_SPI_I),
        "{ev:?}"
    );
    assert!(r.child_spis().is_empty());
    assert!(r.is_established());
    // Deleting it again: nothing to delete, an empty response.
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::INFORMATIONAL,
        &[delete_esp(vec![ESP_SPI_I])],
    );
    assert!(plain.payloads().is_empty());
    assert!(events(&mut r).is_empty());
}

#[test]
fn deletes_ike_sa_with_its_children_and_answers_only_retransmissions_after() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    let spi_r = peer.ike.spi_r;
    let (request, plain) = peer.exchange(&mut r, t0, ExchangeType::INFORMATIONAL, &[delete_ike()]);
    // RFC 7296 §1.4.1: "The response to a request that deletes the IKE SA is an empty
    // INFORMATIONAL response."
    assert!(plain.payloads().is_empty());
    let ev = events(&mut r);
    assert!(
        matches!(&ev[..], [
            Event::ChildSaDeleted { spi_out: ESP_SPI_I, .. },
            Event::IkeSaDeleted { spi: s, reason: DeleteReason::PeerDeleted },
        ] if *s == spi_r),
        "{ev:?}"
    );
    assert!(r.is_closed() && !r.is_established());
    assert_eq!(r.spi_r(), None);
    assert!(r.spis_r().is_empty());
    assert_eq!(r.poll_timeout(), None);
    let (response, _) = peer.send(&mut r, t0, &request);
    let (local, remote) = addrs();
    r.handle_datagram(t0, local, remote, &request, &mut Counter::new(0))
        .unwrap();
    assert_eq!(r.poll_transmit().unwrap().payload, response);
    let other = peer.request(ExchangeType::INFORMATIONAL, &[]);
    assert!(
        r.handle_datagram(t0, local, remote, &other, &mut Counter::new(0))
            .is_err()
    );
    assert_no_transmit(&mut r);
    assert!(events(&mut r).is_empty());
}

#[test]
fn reports_error_notifies_and_answers_empty() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::INFORMATIONAL,
        &[
            Payload::Notify(Notify::new(NotifyType::INVALID_SPI, &[0, 0, 1, 0])),
            Payload::Notify(Notify::new(NotifyType::INITIAL_CONTACT, &[])),
        ],
    );
    assert!(plain.payloads().is_empty());
    let ev = events(&mut r);
    assert!(
        matches!(
            &ev[..],
            [Event::PeerError {
                notify_type: NotifyType::INVALID_SPI
            }]
        ),
        "{ev:?}"
    );
}

#[test]
fn answers_malformed_encrypted_payloads_with_invalid_syntax_and_keeps_the_sa() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    // A Notify payload whose length is shorter than its own header.
    let request = peer.ike.seal_raw(
        ExchangeType::INFORMATIONAL,
        2,
        Flags::INITIATOR,
        concentrator_ike::PayloadType::NOTIFY,
        &[0, 0, 0, 2],
    );
    let (_, plain) = peer.send(&mut r, t0, &request);
    assert_eq!(plain.notifies(), [NotifyType::INVALID_SYNTAX]);
    // An unknown payload marked critical (RFC 7296 §2.5): UNSUPPORTED_CRITICAL_PAYLOAD with
    // its type as data.
    let request = peer.ike.seal_raw(
        ExchangeType::CREATE_CHILD_SA,
        3,
        Flags::INITIATOR,
        concentrator_ike::PayloadType(200),
        &[0, 0x80, 0, 4],
    );
    let (_, plain) = peer.send(&mut r, t0, &request);
    assert_eq!(
        plain.payloads(),
        [Payload::Notify(Notify::new(
            NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD,
            &[200]
        ))]
    );
    let ev = events(&mut r);
    assert!(
        matches!(
            &ev[..],
            [
                Event::RequestRefused {
                    exchange: ExchangeType::INFORMATIONAL,
                    error: Error::MalformedInner(_)
                },
                Event::RequestRefused {
                    exchange: ExchangeType::CREATE_CHILD_SA,
                    error: Error::MalformedInner(_)
                },
            ]
        ),
        "{ev:?}"
    );
    assert!(r.is_established());
    peer.ike.next_id = 4;
    peer.exchange(&mut r, t0, ExchangeType::INFORMATIONAL, &[]);
}

// ---- CREATE_CHILD_SA ----

const NI2: [u8; 32] = [0x66; 32];

/// A CREATE_CHILD_SA request for a CHILD SA with our SPI `spi`, PFS groups `groups` and an
/// optional KE payload; `rekey` names the CHILD SA it replaces.
fn child_request<'a>(
    spi: &'a [u8; 4],
    groups: &[u16],
    ke: Option<Ke<'a>>,
    rekey: Option<&'a [u8; 4]>,
) -> Vec<Payload<'a>> {
    let (ts_i, ts_r) = ts_pair();
    let mut inner = Vec::new();
    if let Some(old) = rekey {
        inner.push(Payload::Notify(Notify {
            protocol: ProtocolId::ESP,
            spi: old,
            notify_type: NotifyType::REKEY_SA,
            data: &[],
        }));
    }
    inner.push(Payload::Sa(esp_sa(spi, groups)));
    inner.push(Payload::Nonce(Nonce { data: &NI2 }));
    inner.extend(ke.map(Payload::Ke));
    inner.push(Payload::TsI(Ts {
        selectors: vec![ts_i],
    }));
    inner.push(Payload::TsR(Ts {
        selectors: vec![ts_r],
    }));
    inner
}

fn installed(r: &mut Responder) -> Box<concentrator_ike::responder::ChildSa> {
    let mut ev = events(r);
    assert_eq!(ev.len(), 1, "{ev:?}");
    match ev.pop() {
        Some(Event::ChildSaInstalled(c)) => c,
        other => panic!("{other:?}"),
    }
}

#[test]
fn creates_an_additional_child_sa_without_pfs() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    let spi = [0xc0, 0, 0, 2];
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::CREATE_CHILD_SA,
        &child_request(&spi, &[], None, None),
    );
    let inner = plain.payloads();
    let [
        Payload::Sa(sa),
        Payload::Nonce(nr),
        Payload::TsI(ts_i),
        Payload::TsR(ts_r),
    ] = &inner[..]
    else {
        panic!("{inner:?}");
    };
    let (want_i, want_r) = ts_pair();
    assert_eq!(
        (&ts_i.selectors[..], &ts_r.selectors[..]),
        (&[want_i][..], &[want_r][..])
    );
    let our_spi = u32::from_be_bytes(sa.proposals[0].spi.try_into().unwrap());
    assert!(
        sa.proposals[0]
            .transforms
            .iter()
            .all(|t| t.transform_type != TransformType::DH)
    );
    let child = installed(&mut r);
    assert_eq!(
        (child.spi_in, child.spi_out, child.replaces),
        (our_spi, 0xc000_0002, None)
    );
    assert_ne!(child.spi_in, peer.child_spi_r);
    // RFC 7296 §2.17: KEYMAT = prf+(SK_d, Ni | Nr) with this exchange's nonces.
    let keys = ChildSaKeys::derive(
        prf(),
        peer.ike.keys.sk_d.expose(),
        None,
        &NI2,
        nr.data,
        Encryption::AesGcm16 { key_bits: 128 },
        None,
    )
    .unwrap();
    assert_eq!(child.inbound.encr.expose(), keys.initiator.encr.expose());
    assert_eq!(child.outbound.salt.expose(), keys.responder.salt.expose());
    assert_eq!(r.child_spis().len(), 2);
}

#[test]
fn rekeys_a_child_sa_with_pfs_and_keeps_the_old_one_until_deleted() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16-x25519"));
    let kex = KeyExchange::from_private_key(DhGroup::Curve25519, &[0x77; 32]).unwrap();
    let public = kex.public_value().unwrap();
    let spi = [0xc0, 0, 0, 3];
    let old = ESP_SPI_I.to_be_bytes();
    let ke = Ke {
        group: WireGroup(31),
        data: &public,
    };
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::CREATE_CHILD_SA,
        &child_request(&spi, &[31], Some(ke), Some(&old)),
    );
    let inner = plain.payloads();
    let [
        Payload::Sa(sa),
        Payload::Nonce(nr),
        Payload::Ke(ke_r),
        Payload::TsI(_),
        Payload::TsR(_),
    ] = &inner[..]
    else {
        panic!("{inner:?}");
    };
    // The accepted proposal names the PFS group.
    assert!(
        sa.proposals[0]
            .transforms
            .iter()
            .any(|t| t.transform_type == TransformType::DH && t.id.0 == 31)
    );
    assert_eq!(ke_r.group, WireGroup(31));
    let child = installed(&mut r);
    assert_eq!(child.replaces, Some(peer.child_spi_r));
    assert_eq!(child.spi_out, 0xc000_0003);
    // RFC 7296 §2.17: KEYMAT = prf+(SK_d, g^ir (new) | Ni | Nr).
    let g_ir = kex.compute_shared(ke_r.data).unwrap();
    let keys = ChildSaKeys::derive(
        prf(),
        peer.ike.keys.sk_d.expose(),
        Some(g_ir.expose()),
        &NI2,
        nr.data,
        Encryption::AesGcm16 { key_bits: 128 },
        None,
    )
    .unwrap();
    assert_eq!(child.inbound.encr.expose(), keys.initiator.encr.expose());
    assert_eq!(child.outbound.encr.expose(), keys.responder.encr.expose());
    assert_eq!(r.child_spis().len(), 2, "the old CHILD SA stays until deleted");
    peer.exchange(
        &mut r,
        t0,
        ExchangeType::INFORMATIONAL,
        &[delete_esp(vec![ESP_SPI_I])],
    );
    let ev = events(&mut r);
    assert!(
        matches!(
            &ev[..],
            [Event::ChildSaDeleted {
                spi_out: ESP_SPI_I,
                ..
            }]
        ),
        "{ev:?}"
    );
    assert_eq!(r.child_spis(), [(child.spi_in, 0xc000_0003)]);
}

#[test]
fn answers_a_wrong_pfs_guess_with_invalid_ke_payload_and_accepts_the_retry() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16-x25519"));
    let kex = KeyExchange::from_private_key(DhGroup::Ecp256, &[0x77; 32]).unwrap();
    let public = kex.public_value().unwrap();
    let spi = [0xc0, 0, 0, 4];
    let ke = Ke {
        group: WireGroup(19),
        data: &public,
    };
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::CREATE_CHILD_SA,
        &child_request(&spi, &[19, 31], Some(ke), None),
    );
    // RFC 7296 §1.3: INVALID_KE_PAYLOAD names the group we selected.
    assert_eq!(
        plain.payloads(),
        [Payload::Notify(Notify::new(
            NotifyType::INVALID_KE_PAYLOAD,
            &[0, 31]
        ))]
    );
    let ev = events(&mut r);
    assert!(
        matches!(
            &ev[..],
            [Event::RequestRefused {
                exchange: ExchangeType::CREATE_CHILD_SA,
                error: Error::InvalidKe {
                    got: 19,
                    selected: 31
                }
            }]
        ),
        "{ev:?}"
    );
    // PFS proposed without any KE payload: the same answer.
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::CREATE_CHILD_SA,
        &child_request(&spi, &[31], None, None),
    );
    assert_eq!(plain.notifies(), [NotifyType::INVALID_KE_PAYLOAD]);
    let _ = events(&mut r);
    let kex = KeyExchange::from_private_key(DhGroup::Curve25519, &[0x77; 32]).unwrap();
    let public = kex.public_value().unwrap();
    let ke = Ke {
        group: WireGroup(31),
        data: &public,
    };
    peer.exchange(
        &mut r,
        t0,
        ExchangeType::CREATE_CHILD_SA,
        &child_request(&spi, &[31], Some(ke), None),
    );
    assert_eq!(installed(&mut r).spi_out, 0xc000_0004);
}

#[test]
fn refuses_unacceptable_proposals_selectors_and_unknown_rekeys() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    let spi = [0xc0, 0, 0, 5];
    // PFS only, and we have no PFS group: NO_PROPOSAL_CHOSEN.
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::CREATE_CHILD_SA,
        &child_request(&spi, &[31], None, None),
    );
    assert_eq!(plain.notifies(), [NotifyType::NO_PROPOSAL_CHOSEN]);
    // Traffic selectors outside the eroute: TS_UNACCEPTABLE.
    let mut inner = child_request(&spi, &[], None, None);
    let n = inner.len();
    inner[n - 2] = Payload::TsI(Ts {
        selectors: vec![v4([10, 9, 0, 0], [10, 9, 0, 255])],
    });
    let (_, plain) = peer.exchange(&mut r, t0, ExchangeType::CREATE_CHILD_SA, &inner);
    assert_eq!(plain.notifies(), [NotifyType::TS_UNACCEPTABLE]);
    // A rekey of a CHILD SA we do not have: CHILD_SA_NOT_FOUND with its SPI (RFC 7296 §2.25).
    let missing = [0x12, 0x34, 0x56, 0x78];
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::CREATE_CHILD_SA,
        &child_request(&spi, &[], None, Some(&missing)),
    );
    assert_eq!(
        plain.payloads(),
        [Payload::Notify(Notify {
            protocol: ProtocolId::ESP,
            spi: &missing,
            notify_type: NotifyType::CHILD_SA_NOT_FOUND,
            data: &[],
        })]
    );
    // Missing nonce: INVALID_SYNTAX.
    let mut inner = child_request(&spi, &[], None, None);
    inner.retain(|p| !matches!(p, Payload::Nonce(_)));
    let (_, plain) = peer.exchange(&mut r, t0, ExchangeType::CREATE_CHILD_SA, &inner);
    assert_eq!(plain.notifies(), [NotifyType::INVALID_SYNTAX]);
    let ev = events(&mut r);
    let errors: Vec<Error> = ev
        .iter()
        .map(|e| match e {
            Event::RequestRefused { error, .. } => *error,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        errors,
        [
            Error::Negotiation(NegotiationError::NoProposalChosen),
            Error::Negotiation(NegotiationError::TsUnacceptable),
            Error::ChildSaNotFound {
                protocol: ProtocolId::ESP,
                spi: 0x1234_5678
            },
            Error::MissingPayload("Ni"),
        ]
    );
    assert_eq!(r.child_spis().len(), 1);
    assert!(r.is_established());
}

// ---- IKE SA rekey ----

const NEW_SPI_I: u64 = 0x1111_2222_3333_4444;

#[test]
fn rekeys_the_ike_sa_moves_children_and_retires_the_old_sa_on_its_delete() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    let old_spi_r = peer.ike.spi_r;
    let (mut old, _, _) = peer.rekey_ike(&mut r, t0, NEW_SPI_I);
    let new_spi_r = peer.ike.spi_r;
    assert_ne!(new_spi_r, old_spi_r);
    let ev = events(&mut r);
    assert!(
        matches!(&ev[..], [Event::IkeSaRekeyed { old_spi_r: o, new_spi_i: NEW_SPI_I, new_spi_r: n }]
            if *o == old_spi_r && *n == new_spi_r),
        "{ev:?}"
    );
    assert_eq!(r.spi_r(), Some(new_spi_r));
    assert_eq!(r.spis_r(), [new_spi_r, old_spi_r]);
    assert_eq!(r.child_spis(), [(peer.child_spi_r, ESP_SPI_I)]);

    // The new IKE SA works with the keys the initiator derived (RFC 7296 §2.18), Message IDs
    // from zero.
    let (_, plain) = peer.exchange(&mut r, t0, ExchangeType::INFORMATIONAL, &[]);
    assert_eq!(plain.header.message_id, 0);
    // So does a CHILD SA created under it (its KEYMAT comes from the new SK_d).
    let spi = [0xc0, 0, 0, 6];
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::CREATE_CHILD_SA,
        &child_request(&spi, &[], None, None),
    );
    let inner = plain.payloads();
    let Payload::Nonce(nr) = &inner[1] else {
        panic!("{inner:?}")
    };
    let keys = ChildSaKeys::derive(
        prf(),
        peer.ike.keys.sk_d.expose(),
        None,
        &NI2,
        nr.data,
        Encryption::AesGcm16 { key_bits: 128 },
        None,
    )
    .unwrap();
    let child = installed(&mut r);
    assert_eq!(child.inbound.encr.expose(), keys.initiator.encr.expose());

    // The old SA takes no new CHILD SAs (RFC 7296 §2.8)...
    let request = {
        let inner = child_request(&spi, &[], None, None);
        let id = old.next_id;
        old.next_id += 1;
        old.seal(ExchangeType::CREATE_CHILD_SA, id, Flags::INITIATOR, &inner)
    };
    let (_, plain) = peer.send_on(&old, &mut r, t0, &request);
    assert_eq!(plain.notifies(), [NotifyType::NO_ADDITIONAL_SAS]);
    assert!(matches!(
        &events(&mut r)[..],
        [Event::RequestRefused {
            error: Error::NoAdditionalSas,
            ..
        }]
    ));
    // ...and its deletion retires it, not the CHILD SAs or the new IKE SA.
    let delete = old.seal(
        ExchangeType::INFORMATIONAL,
        old.next_id,
        Flags::INITIATOR,
        &[delete_ike()],
    );
    let (response, plain) = peer.send_on(&old, &mut r, t0, &delete);
    assert!(plain.payloads().is_empty());
    let ev = events(&mut r);
    assert!(
        matches!(&ev[..], [Event::IkeSaRetired { spi_r }] if *spi_r == old_spi_r),
        "{ev:?}"
    );
    assert!(r.is_established());
    assert_eq!(r.spis_r(), [new_spi_r]);
    assert_eq!(r.child_spis().len(), 2);
    // A retransmitted DELETE of the old SA still gets its response.
    let (again, _) = peer.send_on(&old, &mut r, t0, &delete);
    assert_eq!(again, response);
    assert!(events(&mut r).is_empty());
    // The new SA carries on.
    peer.exchange(&mut r, t0, ExchangeType::INFORMATIONAL, &[]);
}

#[test]
fn answers_a_retransmitted_ike_rekey_on_the_old_sa_from_the_cache() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    let (old, request, _) = peer.rekey_ike(&mut r, t0, NEW_SPI_I);
    let _ = events(&mut r);
    let (local, remote) = addrs();
    r.handle_datagram(t0, local, remote, &request, &mut Counter::new(0))
        .unwrap();
    let t = r.poll_transmit().unwrap();
    let plain = old.open(&t.payload);
    assert_eq!(plain.header.exchange, ExchangeType::CREATE_CHILD_SA);
    assert!(events(&mut r).is_empty(), "no second rekey");
    assert_eq!(r.spis_r().len(), 2);
}

#[test]
fn rejects_ike_rekey_with_another_ke_group_or_without_ke() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    let kex = KeyExchange::from_private_key(DhGroup::Ecp256, &[0x44; 32]).unwrap();
    let public = kex.public_value().unwrap();
    let spi = NEW_SPI_I.to_be_bytes();
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::CREATE_CHILD_SA,
        &[
            Payload::Sa(ike_sa(&spi)),
            Payload::Nonce(Nonce { data: &NI2 }),
            Payload::Ke(Ke {
                group: WireGroup(19),
                data: &public,
            }),
        ],
    );
    assert_eq!(
        plain.payloads(),
        [Payload::Notify(Notify::new(
            NotifyType::INVALID_KE_PAYLOAD,
            &[0, 31]
        ))]
    );
    let (_, plain) = peer.exchange(
        &mut r,
        t0,
        ExchangeType::CREATE_CHILD_SA,
        &[Payload::Sa(ike_sa(&spi)), Payload::Nonce(Nonce { data: &NI2 })],
    );
    assert_eq!(plain.notifies(), [NotifyType::INVALID_KE_PAYLOAD]);
    assert_eq!(r.spis_r(), [peer.ike.spi_r]);
}

#[test]
fn retires_a_rekeyed_ike_sa_the_peer_never_deletes() {
    let (mut r, mut peer, t0) = established(config_with("aes128gcm16"));
    let old_spi_r = peer.ike.spi_r;
    peer.rekey_ike(&mut r, t0, NEW_SPI_I);
    let _ = events(&mut r);
    let due = r.poll_timeout().unwrap();
    assert_eq!(due, t0 + concentrator_ike::responder::REKEYED_SA_LINGER);
    r.handle_timeout(due - SECOND, &mut Counter::new(0));
    assert!(events(&mut r).is_empty());
    r.handle_timeout(due, &mut Counter::new(0));
    let ev = events(&mut r);
    assert!(
        matches!(&ev[..], [Event::IkeSaRetired { spi_r }] if *spi_r == old_spi_r),
        "{ev:?}"
    );
    assert_eq!(r.spis_r(), [peer.ike.spi_r]);
    // Only the CHILD SA's soft lifetime is left.
    assert!(r.poll_timeout().unwrap() >= t0 + Config::DEFAULT_CHILD_LIFETIME * 85 / 100);
}

// ---- liveness checks ----

fn with_dpd(interval: Duration) -> Config {
    Config {
        dpd_interval: Some(interval),
        ..config_with("aes128gcm16")
    }
}

#[test]
fn sends_a_liveness_check_when_the_peer_is_quiet_and_takes_its_answer() {
    let (mut r, peer, t0) = established(with_dpd(10 * SECOND));
    assert_eq!(r.poll_timeout(), Some(t0 + 10 * SECOND));
    r.handle_timeout(t0 + 9 * SECOND, &mut Counter::new(0));
    assert_no_transmit(&mut r);
    let t1 = t0 + 10 * SECOND;
    r.handle_timeout(t1, &mut Counter::new(0));
    let t = r.poll_transmit().expect("a liveness check");
    assert_eq!((t.local, t.remote), addrs());
    let msg = Message::decode(&t.payload).unwrap();
    // Our first request: Message ID 0, neither I (we are the original responder) nor R.
    assert_eq!(msg.header.exchange, ExchangeType::INFORMATIONAL);
    assert_eq!(msg.header.flags, Flags::NONE);
    assert_eq!(msg.header.message_id, 0);
    assert!(peer.ike.open(&t.payload).payloads().is_empty());
    // Its retransmission is due, not another check.
    assert_eq!(r.poll_timeout(), Some(t1 + 2 * SECOND));
    let response = peer.ike.seal(
        ExchangeType::INFORMATIONAL,
        0,
        Flags::INITIATOR | Flags::RESPONSE,
        &[],
    );
    let (local, remote) = addrs();
    let t2 = t1 + SECOND;
    r.handle_datagram(t2, local, remote, &response, &mut Counter::new(0))
        .unwrap();
    assert_eq!(r.poll_timeout(), Some(t2 + 10 * SECOND));
    // A duplicate of the response is dropped.
    assert!(
        r.handle_datagram(t2, local, remote, &response, &mut Counter::new(0))
            .is_err()
    );
    // The next check uses the next Message ID.
    r.handle_timeout(t2 + 10 * SECOND, &mut Counter::new(0));
    let t = r.poll_transmit().unwrap();
    assert_eq!(Message::decode(&t.payload).unwrap().header.message_id, 1);
    assert!(events(&mut r).is_empty());
}

#[test]
fn retransmits_the_liveness_check_with_backoff_then_deletes_the_sa() {
    let (mut r, peer, t0) = established(with_dpd(10 * SECOND));
    let start = t0 + 10 * SECOND;
    r.handle_timeout(start, &mut Counter::new(0));
    let first = r.poll_transmit().unwrap().payload;
    // Retransmissions 2, 6, 14, 30 and 62 s after the request, bitwise identical.
    let policy = Retransmit::default();
    let mut at = start;
    for n in 0..policy.tries {
        at += policy.wait(n);
        assert_eq!(r.poll_timeout(), Some(at));
        r.handle_timeout(at - Duration::from_millis(1), &mut Counter::new(0));
        assert_no_transmit(&mut r);
        r.handle_timeout(at, &mut Counter::new(0));
        assert_eq!(r.poll_transmit().unwrap().payload, first, "retransmission {n}");
    }
    assert_eq!(at - start, Duration::from_secs(62));
    // A response with a bad ICV does not count.
    let mut bad = peer.ike.seal(
        ExchangeType::INFORMATIONAL,
        0,
        Flags::INITIATOR | Flags::RESPONSE,
        &[],
    );
    let n = bad.len();
    bad[n - 1] ^= 1;
    let (local, remote) = addrs();
    assert!(
        r.handle_datagram(at, local, remote, &bad, &mut Counter::new(0))
            .is_err()
    );
    let give_up = start + policy.give_up_after();
    assert_eq!(give_up - start, Duration::from_secs(126));
    assert_eq!(r.poll_timeout(), Some(give_up));
    r.handle_timeout(give_up, &mut Counter::new(0));
    assert_no_transmit(&mut r);
    let ev = events(&mut r);
    assert!(
        matches!(
            &ev[..],
            [
                Event::ChildSaDeleted {
                    spi_out: ESP_SPI_I,
                    ..
                },
                Event::IkeSaDeleted {
                    reason: DeleteReason::DeadPeer,
                    ..
                },
            ]
        ),
        "{ev:?}"
    );
    assert!(r.is_closed());
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn requests_and_child_traffic_postpone_the_liveness_check() {
    let (mut r, mut peer, t0) = established(with_dpd(10 * SECOND));
    r.handle_child_traffic(t0 + 8 * SECOND);
    assert_eq!(r.poll_timeout(), Some(t0 + 18 * SECOND));
    // Older traffic reports do not move it back.
    r.handle_child_traffic(t0 + 5 * SECOND);
    assert_eq!(r.poll_timeout(), Some(t0 + 18 * SECOND));
    peer.exchange(&mut r, t0 + 15 * SECOND, ExchangeType::INFORMATIONAL, &[]);
    assert_eq!(r.poll_timeout(), Some(t0 + 25 * SECOND));
    // A request that does not verify proves nothing.
    let mut bad = peer.request(ExchangeType::INFORMATIONAL, &[]);
    bad[40] ^= 1;
    let (local, remote) = addrs();
    assert!(
        r.handle_datagram(t0 + 20 * SECOND, local, remote, &bad, &mut Counter::new(0))
            .is_err()
    );
    assert_eq!(r.poll_timeout(), Some(t0 + 25 * SECOND));
}

#[test]
fn abandons_a_liveness_check_in_flight_when_the_ike_sa_is_rekeyed() {
    let (mut r, mut peer, t0) = established(with_dpd(10 * SECOND));
    r.handle_timeout(t0 + 10 * SECOND, &mut Counter::new(0));
    let _ = r.poll_transmit().unwrap();
    let t1 = t0 + 11 * SECOND;
    peer.rekey_ike(&mut r, t1, NEW_SPI_I);
    let _ = events(&mut r);
    // Next: a check on the new SA 10 s after the rekey (before the old SA's expiry).
    assert_eq!(r.poll_timeout(), Some(t1 + 10 * SECOND));
    r.handle_timeout(t1 + 10 * SECOND, &mut Counter::new(0));
    let t = r.poll_transmit().unwrap();
    let plain = peer.ike.open(&t.payload);
    assert_eq!((plain.header.message_id, plain.header.flags), (0, Flags::NONE));
}

// ---- half-open expiry ----

#[test]
fn half_open_sa_expires_after_ike_sa_init() {
    let mut r = Responder::new(config());
    let kex = KeyExchange::from_private_key(DhGroup::Curve25519, &[0x33; 32]).unwrap();
    let public = kex.public_value().unwrap();
    let request = Message {
        header: concentrator_ike::Header {
            spi_i: SPI_I,
            spi_r: 0,
            next_payload: concentrator_ike::PayloadType::NONE,
            exchange: ExchangeType::IKE_SA_INIT,
            flags: Flags::INITIATOR,
            message_id: 0,
            length: 0,
        },
        payloads: vec![
            Payload::Sa(ike_sa(&[])),
            Payload::Ke(Ke {
                group: WireGroup(31),
                data: &public,
            }),
            Payload::Nonce(Nonce { data: &NI }),
        ],
    }
    .to_vec();
    let (local, remote) = addrs();
    let t0 = Instant::now();
    r.handle_datagram(t0, local, remote, &request, &mut Counter::new(0))
        .unwrap();
    let _ = r.poll_transmit().unwrap();
    assert_eq!(r.poll_timeout(), Some(t0 + Config::DEFAULT_HALF_OPEN_TIMEOUT));
    r.handle_timeout(t0 + 29 * SECOND, &mut Counter::new(0));
    assert!(!r.is_closed());
    r.handle_timeout(t0 + 30 * SECOND, &mut Counter::new(0));
    assert!(r.is_closed());
    let ev = events(&mut r);
    assert!(matches!(&ev[..], [Event::Failed(Error::Timeout(_))]), "{ev:?}");
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn half_open_sa_expires_while_the_psk_lookup_hangs() {
    let mut r = Responder::new(Arc::new(Config {
        half_open_timeout: 5 * SECOND,
        ..config_with("aes128gcm16")
    }));
    let t0 = Instant::now();
    let _peer = Peer::until_psk(&mut r, t0);
    assert_eq!(r.poll_timeout(), Some(t0 + 5 * SECOND));
    r.handle_timeout(t0 + 5 * SECOND, &mut Counter::new(0));
    assert!(r.is_closed());
    let ev = events(&mut r);
    assert!(matches!(&ev[..], [Event::Failed(Error::Timeout(_))]), "{ev:?}");
    // The lookup answering late finds nothing to complete.
    assert_eq!(
        r.provide_psk(t0 + 6 * SECOND, Some(PSK), &mut Counter::new(0)),
        Err(Error::WrongState("no PSK lookup pending"))
    );
    assert_no_transmit(&mut r);
}

#[test]
fn established_sa_has_only_the_rekey_timer_without_liveness_checks() {
    let (r, _, t0) = established(config_with("aes128gcm16"));
    // RFC 7296 §2.8: the CHILD SA is rekeyed by us at 85 % to 95 % of its lifetime.
    let due = r.poll_timeout().unwrap();
    let life = Config::DEFAULT_CHILD_LIFETIME;
    assert!(
        due >= t0 + life * 85 / 100 && due <= t0 + life * 95 / 100,
        "{:?}",
        due - t0
    );
    let (r, _, _) = established(Config {
        child_lifetime: Duration::ZERO,
        ..config_with("aes128gcm16")
    });
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn refuses_an_eroute_that_does_not_allow_the_proposal_chosen_in_ike_sa_init() {
    use concentrator_algorithms::parse_ike;
    // IKE_SA_INIT was answered from every eroute's proposals; the identity then selects one.
    let mut r = Responder::new(Arc::new(Config {
        ike_proposals: vec![
            parse_ike("a", "aes256-sha256-modp2048").unwrap(),
            parse_ike("b", "aes128gcm16-prfsha256-x25519").unwrap(),
        ],
        ..config_with("aes128gcm16")
    }));
    let t0 = Instant::now();
    let _peer = Peer::until_psk(&mut r, t0);
    let chosen = r.ike_choice().expect("chosen in IKE_SA_INIT");
    assert_eq!(chosen.dh, DhGroup::Curve25519);
    let other = Config {
        ike_proposals: vec![parse_ike("a", "aes256-sha256-modp2048").unwrap()],
        ..config_with("aes256gcm16")
    };
    assert_eq!(r.set_config(Arc::new(other)), Err(Error::ProposalNotAllowed));
    // The old configuration stays; the refusal answers AUTHENTICATION_FAILED.
    assert_eq!(r.config().esp_proposals, config_with("aes128gcm16").esp_proposals);
    assert_eq!(
        Error::ProposalNotAllowed.notify(),
        Some(NotifyType::AUTHENTICATION_FAILED)
    );
    let allowing = Config {
        ike_proposals: vec![parse_ike("b", "aes128gcm16-prfsha256-x25519").unwrap()],
        ..config_with("aes256gcm16")
    };
    assert_eq!(r.set_config(Arc::new(allowing)), Ok(()));
}
