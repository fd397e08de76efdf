//! Decodes arbitrary bytes as what one pod reads from another or from etcd (the first byte
//! picks which): a shard map, a member record, a pod-to-pod frame, a replication record.
//! Nothing panics; a map that decodes re-encodes to the same bytes; a frame opens only with
//! the fleet key, and what opens seals again and opens to the same contents; a replication
//! record opens only with its connection's key, and a message that decodes re-encodes to
//! the same bytes.
#![no_main]

use concentrator_fleet::member::MemberRecord;
use concentrator_fleet::replication::{Hello, Message, records};
use concentrator_fleet::wire::{FleetKey, Opener, Sealer};
use concentrator_fleet::{MemberId, ShardMap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(map) = ShardMap::decode(rest) {
                assert_eq!(map.encode(), rest, "a decoded map re-encodes to its bytes");
            }
        }
        1 => {
            if let Ok(r) = MemberRecord::decode(rest) {
                let again = MemberRecord::decode(&r.encode()).expect("a re-encoded record decodes");
                assert_eq!(again, r);
            }
        }
        3 => {
            // Bodies as such (what the record layer let through) ...
            if let Ok(m) = Message::decode(rest) {
                assert_eq!(&m.encode()[..], rest, "a decoded message re-encodes to its bytes");
            }
            // ... and as a sealed record of a fixed connection.
            let key = FleetKey::new(&[7; 32]).unwrap();
            let hello = |m, r| Hello {
                member: MemberId(m),
                lease: i64::from(r),
                random: [r; 16],
            };
            let (_, mut rx) = records(&key, false, &hello(2, 2), &hello(1, 1)).unwrap();
            let mut record = rest.to_vec();
            if let Ok(body) = rx.open(&mut record) {
                let _ = Message::decode(body);
            }
        }
        _ => {
            let key = FleetKey::new(&[7; 32]).unwrap();
            let mut opener = Opener::new(key.clone(), MemberId(2));
            let mut frame = rest.to_vec();
            let Ok(f) = opener.open(&mut frame) else {
                return;
            };
            let (kind, local, remote, epoch) = (f.kind, f.local, f.remote, f.epoch);
            let payload = f.payload.to_vec();
            let mut sealer = Sealer::new(&key, f.sender, [1; 16], 0).unwrap();
            let mut out = Vec::new();
            sealer.seal(kind, local, remote, epoch, &payload, &mut out).unwrap();
            let g = opener.open(&mut out).expect("a frame we sealed opens");
            assert_eq!((g.kind, g.local, g.remote, g.epoch, g.payload), (kind, local, remote, epoch, &payload[..]));
        }
    }
});
