//! The fleet's etcd side against a real etcd: members join with their StatefulSet ordinals,
//! one leader shares the shards, a member that dies (no word to etcd) loses its shards to
//! the others within its lease, sites are claimed by one member at a time, and an etcd
//! frozen for longer than the lease moves nothing and refuses new sites until it is back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use concentrator_e2e::etcd::{self, Etcd};
use concentrator_e2e::wait::{Probe, until_async};
use concentrator_e2e::{ids, prereq};
use concentrator_fleet::member::Load;
use concentrator_fleet::wire::FleetKey;
use concentrator_fleet::{MemberId, SHARDS, Shard};
use concentrator_gateway::cluster::{Claimed, Fleet, FleetMetrics, FleetOptions, SiteKey, View};

const TTL: Duration = Duration::from_secs(1);
const SETTLE: Duration = Duration::from_secs(20);

fn options(etcd: &Etcd, prefix: &str, name: &str) -> FleetOptions {
    let n = MemberId::from_ordinal_name(name).map_or(99, |m| m.0 as u8);
    FleetOptions {
        endpoints: vec![etcd.endpoint()],
        prefix: prefix.to_owned(),
        member: name.to_owned(),
        address: SocketAddr::from(([127, 0, 0, n + 1], 4510)),
        key: FleetKey::new(&[7; 32]).unwrap(),
        lease_ttl: TTL,
        replicas: 1,
        message_id_sync: false,
        retry: Duration::from_millis(200),
        tls: None,
        load: Arc::new(Load::default),
        admin: None,
        redirect: Default::default(),
        vip: None,
    }
}

/// Who owns how many shards, as `view` sees it.
fn owners(view: &View) -> BTreeMap<Option<MemberId>, usize> {
    let mut counts = BTreeMap::new();
    for s in Shard::all() {
        *counts.entry(view.owner(s)).or_default() += 1;
    }
    counts
}

/// Every view sees exactly `members`, each owning its share of the shards.
async fn wait_balanced(views: &[&View], members: &[u16]) -> Result<()> {
    let share = usize::from(SHARDS) / members.len();
    until_async(format!("shards shared among {members:?}"), SETTLE, || {
        for v in views {
            let counts = owners(v);
            let seen: Vec<u16> = v.members().keys().map(|m| m.0).collect();
            let fair = members.iter().all(|m| {
                counts
                    .get(&Some(MemberId(*m)))
                    .is_some_and(|n| (share..=share + 1).contains(n))
            });
            if seen != members || !fair || counts.len() != members.len() || !v.available() {
                return Ok(Probe::pending(format!(
                    "{:?} sees {seen:?} and {counts:?}",
                    v.me()
                )));
            }
        }
        Ok(Probe::Ready(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_shards_and_sites_and_outlive_etcd_pauses() -> Result<()> {
    if prereq::require(&[etcd::TOOLS]).is_skip() {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let prefix = format!("/test-{}", ids::random_hex(6));
    let start = |name: &str| Fleet::start(options(&etcd, &prefix, name), FleetMetrics::default());

    // Three pods of a StatefulSet: member IDs are their ordinals.
    let a = start("gw-0");
    let b = start("gw-1");
    let c = start("gw-2");
    wait_balanced(&[&a.view, &b.view, &c.view], &[0, 1, 2]).await?;
    for (fleet, id) in [(&a, 0), (&b, 1), (&c, 2)] {
        ensure!(fleet.view.me() == Some(MemberId(id)));
        let mine = fleet.view.pick_shard(7).expect("a member with shards allocates");
        ensure!(fleet.view.owner(mine) == Some(MemberId(id)));
    }
    // Every pod places a new site on the same member.
    let src = "192.0.2.10".parse()?;
    let placed = a.view.place(src, 0x1234);
    ensure!(placed.is_some() && placed == b.view.place(src, 0x1234) && placed == c.view.place(src, 0x1234));

    // Sites: one holder at a time.
    let site = SiteKey::new("branches", "CN=site 7/O=Example");
    ensure!(a.claims.claim(&site).await? == Claimed::Won);
    ensure!(b.claims.claim(&site).await? == Claimed::HeldBy(MemberId(0)));
    ensure!(a.claims.claim(&site).await? == Claimed::Mine);
    a.claims.release(&site).await?;
    ensure!(b.claims.claim(&site).await? == Claimed::Won);
    ensure!(c.claims.claim(&site).await? == Claimed::HeldBy(MemberId(1)));

    // gw-1 dies without a word: its shards and its claim go with its lease.
    let theirs: Vec<Shard> = Shard::all()
        .filter(|s| a.view.owner(*s) == Some(MemberId(1)))
        .collect();
    let epochs: Vec<u32> = theirs.iter().map(|s| a.view.epoch(*s)).collect();
    b.kill();
    wait_balanced(&[&a.view, &c.view], &[0, 2]).await?;
    for (s, before) in theirs.iter().zip(epochs) {
        ensure!(a.view.epoch(*s) > before, "shard {s} moved without a new epoch");
    }
    let mut won = None;
    for _ in 0..100 {
        match c.claims.claim(&site).await? {
            Claimed::HeldBy(MemberId(1)) => tokio::time::sleep(Duration::from_millis(100)).await,
            other => {
                won = Some(other);
                break;
            }
        }
    }
    ensure!(
        won == Some(Claimed::Won),
        "the claim of a dead member outlived its lease: {won:?}"
    );

    // gw-1 comes back (a new pod with the same ordinal) and gets its share again.
    let b = start("gw-1");
    wait_balanced(&[&a.view, &b.view, &c.view], &[0, 1, 2]).await?;

    // etcd frozen for three lease TTLs: the pods cannot take new sites, and nothing moves.
    let before: Vec<_> = Shard::all().map(|s| (a.view.owner(s), a.view.epoch(s))).collect();
    etcd.freeze()?;
    until_async("pods to refuse new sites while etcd is frozen", SETTLE, || {
        let available: Vec<bool> = [&a, &b, &c].iter().map(|f| f.view.available()).collect();
        Ok(if available.iter().all(|x| !x) {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{available:?}"))
        })
    })
    .await?;
    let refused = a.claims.claim(&SiteKey::new("branches", "new site")).await;
    ensure!(
        refused.is_err(),
        "a claim succeeded with etcd frozen: {refused:?}"
    );
    tokio::time::sleep(TTL * 3).await;
    etcd.thaw()?;
    wait_balanced(&[&a.view, &b.view, &c.view], &[0, 1, 2]).await?;
    let after: Vec<_> = Shard::all().map(|s| (a.view.owner(s), a.view.epoch(s))).collect();
    let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
    ensure!(moved == 0, "{moved} shards moved across an etcd pause");
    // The leases may have run out in etcd meanwhile (then the claim was made again): the
    // site is still gw-2's, not another's.
    let kept = c.claims.claim(&site).await?;
    ensure!(
        matches!(kept, Claimed::Mine | Claimed::Won),
        "the site changed hands across an etcd pause: {kept:?}"
    );

    // A pod that leaves on purpose hands its shards over at once (lease revoked).
    c.shutdown().await;
    wait_balanced(&[&a.view, &b.view], &[0, 1]).await?;
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}
