//! Real messages from strongSwan 5.9.8 (captured by `tests/vectors/capture.sh`): each decodes
//! into what charon logged it sent, and re-encodes to the identical bytes.

use concentrator_ike::payload::{
    self, AttributeValue, Identity, Nonce, Notify, Proposal, Sa, TrafficSelector, Transform, Ts, TsRange,
};
use concentrator_ike::{
    DhGroup, ExchangeType, Flags, Message, NotifyType, Payload, PayloadType, ProtocolId, TransformId,
    TransformType,
};

fn hex(text: &str) -> Vec<u8> {
    let text = text.trim();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn notify_types(payloads: &[Payload<'_>]) -> Vec<NotifyType> {
    payloads
        .iter()
        .filter_map(|p| match p {
            Payload::Notify(n) => Some(n.notify_type),
            _ => None,
        })
        .collect()
}

fn round_trips(bytes: &[u8]) -> Message<'_> {
    let msg = Message::decode(bytes).unwrap();
    assert_eq!(msg.to_vec(), bytes, "re-encoding must give strongSwan's bytes");
    msg
}

#[test]
fn ike_sa_init_request() {
    let bytes = hex(include_str!("vectors/strongswan-ike-sa-init-request.hex"));
    assert_eq!(bytes.len(), 276);
    let msg = round_trips(&bytes);
    assert_eq!(msg.header.exchange, ExchangeType::IKE_SA_INIT);
    assert_eq!(msg.header.flags, Flags::INITIATOR);
    assert_eq!((msg.header.spi_r, msg.header.message_id), (0, 0));
    let types: Vec<_> = msg.payloads.iter().map(Payload::payload_type).collect();
    use PayloadType as P;
    assert_eq!(
        types,
        [
            P::SA,
            P::KE,
            P::NONCE,
            P::NOTIFY,
            P::NOTIFY,
            P::NOTIFY,
            P::NOTIFY,
            P::NOTIFY
        ]
    );

    // proposals = aes128gcm16-prfsha256-x25519, aes256-sha256-modp2048
    let Payload::Sa(Sa { proposals }) = &msg.payloads[0] else {
        panic!("SA first")
    };
    let ike = |number, transforms| Proposal {
        number,
        protocol: ProtocolId::IKE,
        spi: &[],
        transforms,
    };
    assert_eq!(
        proposals,
        &[
            ike(
                1,
                vec![
                    Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 128),
                    Transform::new(TransformType::PRF, TransformId::PRF_HMAC_SHA2_256),
                    Transform::new(TransformType::DH, TransformId(DhGroup::CURVE25519.0)),
                ]
            ),
            ike(
                2,
                vec![
                    Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_CBC, 256),
                    Transform::new(TransformType::INTEG, TransformId::AUTH_HMAC_SHA2_256_128),
                    Transform::new(TransformType::PRF, TransformId::PRF_HMAC_SHA2_256),
                    Transform::new(TransformType::DH, TransformId(DhGroup::MODP_2048.0)),
                ]
            ),
        ]
    );
    let Payload::Ke(ke) = &msg.payloads[1] else {
        panic!("KE second")
    };
    assert_eq!((ke.group, ke.data.len()), (DhGroup::CURVE25519, 32));
    let Payload::Nonce(Nonce { data }) = &msg.payloads[2] else {
        panic!("nonce third")
    };
    assert_eq!(data.len(), 32);
    assert_eq!(
        notify_types(&msg.payloads),
        [
            NotifyType::NAT_DETECTION_SOURCE_IP,
            NotifyType::NAT_DETECTION_DESTINATION_IP,
            NotifyType::IKEV2_FRAGMENTATION_SUPPORTED,
            NotifyType::SIGNATURE_HASH_ALGORITHMS,
            NotifyType::REDIRECT_SUPPORTED,
        ]
    );
    let Payload::Notify(Notify { data: nat_d, .. }) = &msg.payloads[3] else {
        panic!()
    };
    assert_eq!(nat_d.len(), 20, "SHA-1");
    let Payload::Notify(Notify { data: hashes, .. }) = &msg.payloads[6] else {
        panic!()
    };
    assert_eq!(*hashes, [0, 2, 0, 3, 0, 4, 0, 5], "SHA2-256/384/512, identity");
}

#[test]
fn ike_sa_init_response() {
    let bytes = hex(include_str!("vectors/strongswan-ike-sa-init-response.hex"));
    let msg = round_trips(&bytes);
    assert_eq!(msg.header.flags, Flags::RESPONSE);
    assert_ne!(msg.header.spi_r, 0);
    let Payload::Sa(sa) = &msg.payloads[0] else {
        panic!("SA first")
    };
    assert_eq!(sa.proposals.len(), 1);
    assert_eq!(sa.proposals[0].transforms[0].key_length(), Some(128));
    // CHILDLESS_IKEV2_SUPPORTED and MULTIPLE_AUTH_SUPPORTED have no name here: still data.
    assert_eq!(
        notify_types(&msg.payloads)[4..],
        [NotifyType(16418), NotifyType(16404)]
    );
}

#[test]
fn ike_auth_request_outer_and_inner() {
    let bytes = hex(include_str!("vectors/strongswan-ike-auth-request.hex"));
    let msg = round_trips(&bytes);
    assert_eq!(msg.header.exchange, ExchangeType::IKE_AUTH);
    assert_eq!(msg.header.message_id, 1);
    let [Payload::Sk(sk)] = &msg.payloads[..] else {
        panic!("one SK payload")
    };
    assert_eq!(sk.first_inner, PayloadType::IDI);

    let plain = hex(include_str!("vectors/strongswan-ike-auth-request-plain.hex"));
    let inner = payload::decode_inner_chain(sk.first_inner, &plain).unwrap();
    let mut again = Vec::new();
    payload::encode_chain(&inner, &mut again);
    assert_eq!(again, plain);

    // [ IDi N(INIT_CONTACT) IDr AUTH SA TSi TSr N(MOBIKE_SUP) N(NO_ADD_ADDR) N(MULT_AUTH)
    //   N(EAP_ONLY) N(MSG_ID_SYN_SUP) ]
    assert_eq!(inner[0], Payload::IdI(Identity::Fqdn(b"site-a.example.com")));
    assert_eq!(inner[2], Payload::IdR(Identity::Rfc822(b"gw@example.com")));
    let Payload::IdI(id) = &inner[0] else { panic!() };
    assert_eq!(id.to_string(), "site-a.example.com");
    let Payload::Auth(auth) = &inner[3] else {
        panic!("AUTH")
    };
    assert_eq!((auth.method.0, auth.data.len()), (2, 32));
    let Payload::Sa(sa) = &inner[4] else { panic!("SA") };
    let esp = &sa.proposals[0];
    assert_eq!((esp.protocol, esp.spi.len()), (ProtocolId::ESP, 4));
    assert_eq!(esp.transforms[0].attributes[0].value, AttributeValue::Tv(128));
    assert_eq!(
        esp.transforms[1],
        Transform::new(TransformType::ESN, TransformId::ESN_NO)
    );
    let range = |a, b| {
        TrafficSelector::V4(TsRange {
            ip_proto: 0,
            start_port: 0,
            end_port: 65535,
            start: a,
            end: b,
        })
    };
    assert_eq!(
        inner[5],
        Payload::TsI(Ts {
            selectors: vec![range([10, 1, 0, 0].into(), [10, 1, 0, 255].into())]
        })
    );
    assert_eq!(
        inner[6],
        Payload::TsR(Ts {
            selectors: vec![range([10, 2, 0, 0].into(), [10, 2, 0, 255].into())]
        })
    );
    assert_eq!(notify_types(&inner)[0], NotifyType::INITIAL_CONTACT);
}

#[test]
fn ike_auth_response_and_informational() {
    let bytes = hex(include_str!("vectors/strongswan-ike-auth-response.hex"));
    let msg = round_trips(&bytes);
    let [Payload::Sk(sk)] = &msg.payloads[..] else {
        panic!("one SK payload")
    };
    let plain = hex(include_str!("vectors/strongswan-ike-auth-response-plain.hex"));
    let inner = payload::decode_inner_chain(sk.first_inner, &plain).unwrap();
    assert_eq!(inner[0], Payload::IdR(Identity::Rfc822(b"gw@example.com")));
    assert_eq!(notify_types(&inner).last(), Some(&NotifyType::TS_UNACCEPTABLE));

    let bytes = hex(include_str!("vectors/strongswan-informational-request.hex"));
    let msg = round_trips(&bytes);
    assert_eq!(msg.header.exchange, ExchangeType::INFORMATIONAL);
}

#[test]
fn every_strict_prefix_of_a_real_message_is_rejected() {
    let bytes = hex(include_str!("vectors/strongswan-ike-sa-init-request.hex"));
    for n in 0..bytes.len() {
        assert!(Message::decode(&bytes[..n]).is_err());
    }
}
