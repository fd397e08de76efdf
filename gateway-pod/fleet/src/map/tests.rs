use super::*;

fn member(n: u16) -> MemberId {
    MemberId(n)
}

fn reports(ids: &[u16]) -> BTreeMap<MemberId, Report> {
    ids.iter().map(|n| (member(*n), Report::default())).collect()
}

/// Plans until the map settles, each member reporting the version it was last given and no
/// SA anywhere (so every marked move completes).
fn settle(mut map: ShardMap, members: &mut BTreeMap<MemberId, Report>) -> ShardMap {
    for _ in 0..10 {
        match plan(&map, members) {
            Some(next) => map = next,
            None => return map,
        }
        for r in members.values_mut() {
            r.map_version = map.version();
        }
    }
    panic!("the plan did not settle");
}

#[test]
fn a_lone_member_owns_every_shard() {
    let map = plan(&ShardMap::new(), &reports(&[4])).unwrap();
    assert_eq!(map.owned_by(member(4)).len(), usize::from(SHARDS));
    assert_eq!(map.allocatable(member(4)).len(), usize::from(SHARDS));
    assert!(Shard::all().all(|s| map.entry(s).epoch == 1));
    assert_eq!(plan(&map, &reports(&[4])), None, "a settled map stays");
}

#[test]
fn a_joining_member_gets_empty_shards_after_the_owner_has_seen_the_mark() {
    let one = plan(&ShardMap::new(), &reports(&[0])).unwrap();
    let mut members = reports(&[0, 1]);
    // The owner has not seen the marks yet: nothing moves, half is marked.
    let marked = plan(&one, &members).unwrap();
    assert_eq!(marked.owned_by(member(0)).len(), 1024);
    assert_eq!(marked.allocatable(member(0)).len(), 512);
    assert_eq!(marked.allocating_members(), vec![member(0)]);
    members.get_mut(&member(0)).unwrap().map_version = one.version();
    assert_eq!(
        plan(&marked, &members),
        None,
        "a report of an older map moves nothing"
    );

    // It has seen them and holds SAs in shards 0..10 only (marked before it said so): the
    // other marked shards move, those ten wait until they are empty.
    let occupied: ShardSet = (0..10).filter_map(Shard::new).collect();
    members.insert(
        member(0),
        Report {
            map_version: marked.version(),
            occupied: occupied.clone(),
            draining: false,
        },
    );
    let moved = plan(&marked, &members).unwrap();
    let theirs = moved.owned_by(member(1));
    assert!(theirs.iter().all(|s| !occupied.contains(s)));
    assert_eq!(theirs.len(), 502);
    assert!(
        occupied
            .iter()
            .all(|s| moved.entry(s).moving_to == Some(member(1)))
    );
    assert!(theirs.iter().all(|s| moved.entry(s).epoch == 2));
    assert_eq!(moved.allocatable(member(0)).len(), 512);
    // Marks made once the owner's SAs are known leave them alone.
    let mut members = reports(&[0, 1, 2]);
    members.insert(
        member(0),
        Report {
            map_version: moved.version(),
            occupied: occupied.clone(),
            draining: false,
        },
    );
    let third = plan(&moved, &members).unwrap();
    let marked_now: Vec<Shard> = Shard::all()
        .filter(|s| third.entry(*s).marked_at == third.version())
        .collect();
    assert!(!marked_now.is_empty());
    assert!(marked_now.iter().all(|s| !occupied.contains(*s)));
    assert_eq!(moved.allocating_members(), vec![member(0), member(1)]);
}

#[test]
fn an_occupied_shard_stays_with_its_live_owner_until_it_is_empty() {
    let one = plan(&ShardMap::new(), &reports(&[0])).unwrap();
    let all: ShardSet = Shard::all().collect();
    let mut members = reports(&[0, 1]);
    members.get_mut(&member(0)).unwrap().occupied = all.clone();
    let marked = plan(&one, &members).unwrap();
    members.get_mut(&member(0)).unwrap().map_version = marked.version();
    assert_eq!(plan(&marked, &members), None);
    // Shard 5 empties.
    let mut fewer = all;
    let five = Shard::new(5).unwrap();
    assert_eq!(marked.entry(five).moving_to, Some(member(1)));
    fewer.remove(five);
    members.get_mut(&member(0)).unwrap().occupied = fewer;
    let moved = plan(&marked, &members).unwrap();
    assert_eq!(moved.owner(five), Some(member(1)));
    assert_eq!(moved.owned_by(member(1)).len(), 1);
}

#[test]
fn shards_of_a_member_that_is_gone_are_shared_at_once() {
    let mut members = reports(&[0, 1, 2]);
    let three = settle(ShardMap::new(), &mut members);
    for m in 0..3 {
        let n = three.owned_by(member(m)).len();
        assert!((341..=342).contains(&n), "member {m} owns {n}");
    }
    let gone = three.owned_by(member(1));
    members.remove(&member(1));
    let two = plan(&three, &members).unwrap();
    assert!(
        gone.iter()
            .all(|s| two.owner(s).is_some() && two.owner(s) != Some(member(1)))
    );
    assert!(gone.iter().all(|s| two.entry(s).epoch > three.entry(s).epoch));
    assert_eq!(
        two.owned_by(member(0)).len() + two.owned_by(member(2)).len(),
        1024
    );
    // Each goes to its replica (where its SAs were copied), and the replicas of one
    // member's shards are spread over the others.
    let live = [member(0), member(2)];
    assert!(gone.iter().all(|s| two.owner(s) == replica(s, member(1), &live)));
    let (a, b) = (two.owned_by(member(0)).len(), two.owned_by(member(2)).len());
    assert!(a.abs_diff(b) <= 80, "{a} vs {b}");
    // Shards that stayed with their owner keep their epoch.
    let kept = three.owned_by(member(0));
    assert!(kept.iter().all(|s| two.entry(s).epoch == three.entry(s).epoch));
}

#[test]
fn the_replica_is_another_member_and_mostly_stays_when_members_come_and_go() {
    let four: Vec<MemberId> = (0..4).map(member).collect();
    let three: Vec<MemberId> = (0..3).map(member).collect();
    assert_eq!(replica(Shard::new(0).unwrap(), member(0), &[member(0)]), None);
    let mut same = 0;
    for s in Shard::all() {
        let r4 = replica(s, member(0), &four).unwrap();
        assert_ne!(r4, member(0));
        let r3 = replica(s, member(0), &three).unwrap();
        if r4 != member(3) {
            assert_eq!(r3, r4, "a member leaving moves only its own replicas");
            same += 1;
        }
    }
    assert!((600..=770).contains(&same), "{same}");
}

#[test]
fn a_draining_member_gets_nothing_and_gives_its_shards_away() {
    let mut members = reports(&[0, 1]);
    let two = settle(ShardMap::new(), &mut members);
    members.get_mut(&member(1)).unwrap().draining = true;
    let drained = settle(two, &mut members);
    assert_eq!(drained.owned_by(member(1)).len(), 0);
    assert_eq!(drained.owned_by(member(0)).len(), 1024);
    // All draining: the shards stay where they are (nobody else can take them).
    members.get_mut(&member(0)).unwrap().draining = true;
    assert_eq!(plan(&drained, &members), None);
}

#[test]
fn a_draining_members_occupied_shards_are_marked_to_their_replicas_and_move_once_handed_over() {
    let mut members = reports(&[0, 1, 2]);
    let three = settle(ShardMap::new(), &mut members);
    let mine = three.owned_by(member(2));
    // Member 2 holds SAs everywhere it owns, and starts draining.
    let r = members.get_mut(&member(2)).unwrap();
    r.occupied = mine.clone();
    r.draining = true;
    let marked = plan(&three, &members).unwrap();
    let accepting = [member(0), member(1)];
    for s in mine.iter() {
        let e = marked.entry(s);
        assert_eq!(
            e.owner,
            Some(member(2)),
            "shard {s} moved before it was handed over"
        );
        assert_eq!(e.moving_to, replica(s, member(2), &accepting), "shard {s}");
    }
    // Handed over (reported empty after seeing the marks): all of them move, each to the
    // member that was marked.
    let r = members.get_mut(&member(2)).unwrap();
    r.map_version = marked.version();
    r.occupied = ShardSet::new();
    let moved = plan(&marked, &members).unwrap();
    assert!(moved.owned_by(member(2)).is_empty());
    for s in mine.iter() {
        assert_eq!(moved.owner(s), marked.entry(s).moving_to);
        assert!(moved.entry(s).epoch > marked.entry(s).epoch);
    }
}

#[test]
fn a_member_that_stops_draining_keeps_the_shards_it_has_not_handed_over() {
    let mut members = reports(&[0, 1]);
    let two = settle(ShardMap::new(), &mut members);
    let mine = two.owned_by(member(1));
    let r = members.get_mut(&member(1)).unwrap();
    r.occupied = mine.clone();
    r.draining = true;
    let marked = plan(&two, &members).unwrap();
    assert!(mine.iter().all(|s| marked.entry(s).moving_to == Some(member(0))));
    members.get_mut(&member(1)).unwrap().draining = false;
    let kept = plan(&marked, &members).unwrap();
    assert_eq!(kept.owned_by(member(1)), mine);
    assert_eq!(kept.allocatable(member(1)), mine, "every mark taken back");
}

#[test]
fn with_nobody_left_every_shard_is_unowned() {
    let mut members = reports(&[0]);
    let one = settle(ShardMap::new(), &mut members);
    let none = plan(&one, &BTreeMap::new()).unwrap();
    assert!(Shard::all().all(|s| none.owner(s).is_none()));
}

/// Random joins, departures, drains and occupancy: the invariants hold after every step.
#[test]
fn random_histories_keep_the_invariants() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut map = ShardMap::new();
    let mut members: BTreeMap<MemberId, Report> = BTreeMap::new();
    for _ in 0..400 {
        match rand(6) {
            0 => {
                members.insert(member(rand(8) as u16), Report::default());
            }
            1 => {
                let id = member(rand(8) as u16);
                members.remove(&id);
            }
            2 => {
                if let Some(r) = members.get_mut(&member(rand(8) as u16)) {
                    r.draining = !r.draining;
                }
            }
            _ => {
                for (id, r) in &mut members {
                    // A member sees the map and holds SAs in a random part of what it owns.
                    r.map_version = map.version();
                    r.occupied = map.owned_by(*id).iter().filter(|_| rand(3) == 0).collect();
                }
            }
        }
        let Some(next) = plan(&map, &members) else {
            continue;
        };
        assert_eq!(next.version(), map.version() + 1);
        for s in Shard::all() {
            let (before, after) = (map.entry(s), next.entry(s));
            if let Some(owner) = after.owner {
                assert!(
                    members.contains_key(&owner),
                    "shard {s} given to a member that is gone"
                );
            }
            if before.owner != after.owner {
                assert!(
                    after.epoch > before.epoch,
                    "shard {s} changed owner without a new epoch"
                );
                if let Some(old) = before.owner.filter(|o| members.contains_key(o)) {
                    // A live owner loses a shard only after seeing the mark and emptying it.
                    let r = &members[&old];
                    assert_eq!(
                        before.moving_to, after.owner,
                        "shard {s} moved where it was not marked to"
                    );
                    assert!(r.map_version >= before.marked_at && !r.occupied.contains(s));
                }
            }
            if let Some(b) = after.moving_to {
                assert!(members.get(&b).is_some_and(|r| !r.draining));
                assert!(after.owner.is_some());
            }
        }
        if members.values().any(|r| !r.draining) {
            assert!(
                Shard::all().all(|s| next.owner(s).is_some()),
                "a shard is left unowned"
            );
        }
        map = next;
    }
}

#[test]
fn the_codec_round_trips_and_refuses_what_it_does_not_read() {
    let mut members = reports(&[0, 2]);
    let map = settle(ShardMap::new(), &mut members);
    members.insert(member(7), Report::default());
    let map = plan(&map, &members).unwrap();
    let bytes = map.encode();
    assert_eq!(bytes.len(), HEADER_LEN + ENTRY_LEN * 1024);
    assert_eq!(ShardMap::decode(&bytes), Ok(map));

    assert_eq!(
        ShardMap::decode(&bytes[..10]),
        Err(MapError::Length(10, bytes.len()))
    );
    assert_eq!(
        ShardMap::decode(&bytes[..bytes.len() - 1]),
        Err(MapError::Length(bytes.len() - 1, bytes.len()))
    );
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(ShardMap::decode(&bad), Err(MapError::Magic));
    let mut bad = bytes.clone();
    bad[4] = 9;
    assert_eq!(ShardMap::decode(&bad), Err(MapError::Version(9)));
    let mut bad = bytes.clone();
    bad[13..15].copy_from_slice(&512u16.to_be_bytes());
    assert_eq!(ShardMap::decode(&bad), Err(MapError::Shards(512)));
    let mut edited = bytes;
    edited[HEADER_LEN + ENTRY_LEN * 3..][..2].copy_from_slice(&u16::MAX.to_be_bytes());
    edited[HEADER_LEN + ENTRY_LEN * 3 + 6..][..2].copy_from_slice(&MemberId::MAX.to_be_bytes());
    let edited = ShardMap::decode(&edited).unwrap();
    let three = Shard::new(3).unwrap();
    assert_eq!(edited.owner(three), None);
    assert_eq!(edited.entry(three).moving_to, Some(MemberId(MemberId::MAX)));
}

#[test]
fn the_replicas_are_the_best_ranked_others_and_the_first_is_the_replica() {
    let four: Vec<MemberId> = (0..4).map(member).collect();
    for s in Shard::all() {
        let two = replicas(s, member(0), &four, 2);
        assert_eq!(two.len(), 2);
        assert_eq!(two.first().copied(), replica(s, member(0), &four));
        assert!(!two.contains(&member(0)) && two[0] != two[1]);
        // The first one gone, the second is who the leader picks among the live ones.
        let live: Vec<MemberId> = four.iter().copied().filter(|m| *m != two[0]).collect();
        assert_eq!(replica(s, member(0), &live), Some(two[1]));
    }
    assert_eq!(replicas(Shard::new(0).unwrap(), member(0), &four, 9).len(), 3);
    assert!(replicas(Shard::new(0).unwrap(), member(0), &four, 0).is_empty());
}
