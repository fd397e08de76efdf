//! Writes the seeds of the `fleet` fuzz target (gateway-pod/ike/fuzz/seeds/fleet): one valid
//! shard map, member record, frame and replication record, each behind the byte that selects its decoder.
//! Regenerate after a codec change: `cargo test -p concentrator-fleet --test fuzz_seeds -- --ignored`.

use std::collections::BTreeMap;
use std::path::Path;

use concentrator_fleet::map::{Report, plan};
use concentrator_fleet::member::{Load, MemberRecord};
use concentrator_fleet::replication::{Hello, Message, Sequences, records};
use concentrator_fleet::wire::{FleetKey, Kind, Sealer};
use concentrator_fleet::{MemberId, Shard, ShardMap, ShardSet};

#[test]
#[ignore = "writes the fuzz seeds"]
fn write_fleet_fuzz_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ike/fuzz/seeds/fleet");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, which: u8, bytes: &[u8]| {
        let mut seed = vec![which];
        seed.extend_from_slice(bytes);
        std::fs::write(dir.join(name), seed).unwrap();
    };

    let reports: BTreeMap<_, _> = [0, 1].map(|n| (MemberId(n), Report::default())).into();
    let map = plan(&ShardMap::new(), &reports).unwrap();
    write("map", 0, &map.encode());

    let record = MemberRecord {
        name: "gw-1".into(),
        address: "10.0.0.2:4510".parse().unwrap(),
        load: Load {
            tunnels: 10,
            ..Load::default()
        },
        map_version: 3,
        occupied: [Shard::new(5).unwrap()]
            .into_iter()
            .collect::<ShardSet>()
            .to_hex(),
        admin: None,
        redirect: Some("192.0.2.21".parse().unwrap()),
    };
    write("member", 1, &record.encode());

    let key = FleetKey::new(&[7; 32]).unwrap();
    let mut sealer = Sealer::new(&key, MemberId(1), [9; 16], 0).unwrap();
    let mut frame = Vec::new();
    sealer
        .seal(
            Kind::Ingress,
            "10.0.0.5:4500".parse().unwrap(),
            "192.0.2.7:61000".parse().unwrap(),
            4,
            b"\0\0\0\0ike message",
            &mut frame,
        )
        .unwrap();
    write("frame", 2, &frame);

    // A replication record as the fuzz target's fixed connection reads it (client 1 to
    // server 2, leases and random bytes 1 and 2).
    let (c, s) = (
        Hello {
            member: MemberId(1),
            lease: 1,
            random: [1; 16],
        },
        Hello {
            member: MemberId(2),
            lease: 2,
            random: [2; 16],
        },
    );
    let (mut tx, _) = records(&key, true, &c, &s).unwrap();
    let message = Message::Sequences(vec![Sequences {
        spi_in: 0x0040_0001,
        ceiling: 65536,
        top: 12,
    }]);
    let mut record = Vec::new();
    tx.seal(&message.encode(), &mut record).unwrap();
    write("replication", 3, &record[4..]);
}
