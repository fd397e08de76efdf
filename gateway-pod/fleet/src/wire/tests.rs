use super::*;

fn key(b: u8) -> FleetKey {
    FleetKey::new(&[b; 32]).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn sealed(sealer: &mut Sealer, kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    sealer
        .seal(
            kind,
            addr("10.0.0.5:4500"),
            addr("[2001:db8::7]:61000"),
            42,
            payload,
            &mut out,
        )
        .unwrap();
    out
}

#[test]
fn frames_round_trip_between_members_with_the_fleet_key() {
    let mut a = Sealer::new(&key(1), MemberId(1), [7; 16], 0).unwrap();
    let mut b = Opener::new(key(1), MemberId(2));
    for (kind, payload) in [
        (Kind::Ingress, &b"esp packet"[..]),
        (Kind::Egress, &[][..]),
        (Kind::Plain, &b"\x45 head-end packet"[..]),
    ] {
        let mut frame = sealed(&mut a, kind, payload);
        assert_eq!(frame.len(), OVERHEAD + payload.len());
        assert!(
            !frame.windows(2).any(|w| w == [0xfd, 0xe8]),
            "the site's port is sealed"
        );
        let f = b.open(&mut frame).unwrap();
        assert_eq!(
            f,
            Frame {
                kind,
                sender: MemberId(1),
                local: addr("10.0.0.5:4500"),
                remote: addr("[2001:db8::7]:61000"),
                epoch: 42,
                payload,
            }
        );
    }
    assert_eq!(b.keys.len(), 1, "one derived key per sender incarnation");
}

#[test]
fn nonces_never_repeat_within_a_lane() {
    let mut a = Sealer::new(&key(1), MemberId(1), [7; 16], 3).unwrap();
    let one = sealed(&mut a, Kind::Ingress, b"x");
    let two = sealed(&mut a, Kind::Ingress, b"x");
    assert_ne!(one, two);
    assert_eq!(&one[24..36], &[0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&two[24..36], &[0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1]);
    a.counter = u64::MAX;
    let mut out = Vec::new();
    let r = a.seal(
        Kind::Egress,
        addr("1.1.1.1:1"),
        addr("2.2.2.2:2"),
        0,
        b"",
        &mut out,
    );
    assert_eq!(r, Err(WireError::Exhausted));
}

#[test]
fn frames_of_another_fleet_key_or_altered_are_refused_and_not_remembered() {
    let mut stranger = Sealer::new(&key(9), MemberId(1), [7; 16], 0).unwrap();
    let mut b = Opener::new(key(1), MemberId(2));
    let mut frame = sealed(&mut stranger, Kind::Ingress, b"hello");
    assert_eq!(b.open(&mut frame), Err(WireError::Authentication));
    assert!(b.keys.is_empty());

    let mut a = Sealer::new(&key(1), MemberId(1), [7; 16], 0).unwrap();
    let good = sealed(&mut a, Kind::Ingress, b"hello");
    // Any bit of the header, the payload, the sealed metadata or the tag.
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        let r = b.open(&mut bad);
        assert!(r.is_err(), "byte {i} altered and accepted");
    }
    let mut ok = good.clone();
    assert!(b.open(&mut ok).is_ok());
}

#[test]
fn malformed_frames_get_clear_errors() {
    let mut b = Opener::new(key(1), MemberId(2));
    assert_eq!(b.open(&mut [0u8; 10]), Err(WireError::Truncated(10)));
    let mut a = Sealer::new(&key(1), MemberId(1), [7; 16], 0).unwrap();
    let good = sealed(&mut a, Kind::Ingress, b"p");
    let mut bad = good.clone();
    bad[0] = b'X';
    assert_eq!(b.open(&mut bad), Err(WireError::Magic));
    let mut bad = good.clone();
    bad[4] = 9;
    assert_eq!(b.open(&mut bad), Err(WireError::Kind(9)));
    let mut mine = Opener::new(key(1), MemberId(1));
    let mut own = good;
    assert_eq!(mine.open(&mut own), Err(WireError::FromSelf));
}

#[test]
fn short_fleet_keys_are_refused_and_keys_never_print() {
    assert_eq!(FleetKey::new(&[1; 31]).map(|_| ()), Err(KeyError(31)));
    let k = key(0xab);
    assert_eq!(format!("{k:?}"), "FleetKey(..)");
    let s = Sealer::new(&k, MemberId(1), [0xcd; 16], 0).unwrap();
    let printed = format!("{s:?} {:?}", Opener::new(k, MemberId(2)));
    assert!(!printed.contains("ab") && !printed.contains("171"), "{printed}");
}
