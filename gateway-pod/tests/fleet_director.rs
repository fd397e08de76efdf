//! The VIP front's director election against a real etcd, in process: members with
//! `--fleet-vip` elect exactly one director, each publishes its redirect address in its
//! record, and when the director dies without a word to etcd another member directs within
//! the lease TTL and a second.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use concentrator_e2e::etcd::{self, Etcd};
use concentrator_e2e::wait::{Probe, until_async};
use concentrator_e2e::{ids, prereq};
use concentrator_fleet::MemberId;
use concentrator_fleet::member::Load;
use concentrator_fleet::wire::FleetKey;
use concentrator_gateway::cluster::{Fleet, FleetMetrics, FleetOptions, RedirectAddress, VipOptions};

// The default `--fleet-lease-ttl` (etcd raises TTLs under 1.5 s anyway).
const TTL: Duration = Duration::from_secs(3);
const SETTLE: Duration = Duration::from_secs(20);

fn redirect_address(n: u8) -> IpAddr {
    IpAddr::from([192, 0, 2, 20 + n])
}

fn options(etcd: &Etcd, prefix: &str, n: u8) -> FleetOptions {
    FleetOptions {
        endpoints: vec![etcd.endpoint()],
        prefix: prefix.to_owned(),
        member: format!("gw-{n}"),
        address: SocketAddr::from(([127, 0, 0, n + 1], 4510)),
        key: FleetKey::new(&[7; 32]).unwrap(),
        lease_ttl: TTL,
        // No replica probes: the director's lease ends by its TTL, the slow case.
        replicas: 0,
        message_id_sync: false,
        retry: Duration::from_millis(200),
        tls: None,
        load: Arc::new(Load::default),
        admin: None,
        redirect: RedirectAddress::Fixed(redirect_address(n)),
        vip: Some(VipOptions {
            address: IpAddr::from([192, 0, 2, 2]),
            rebalance: false,
            in_auth: false,
        }),
    }
}

/// The director every fleet in `fleets` agrees on, once there is exactly one whose gauge says
/// so and every member knows the others' redirect addresses.
async fn wait_director(fleets: &BTreeMap<u8, (Fleet, FleetMetrics)>) -> Result<MemberId> {
    until_async("one VIP director every member agrees on", SETTLE, || {
        let seen: Vec<Option<MemberId>> = fleets.values().map(|(f, _)| f.view.director()).collect();
        let gauges: i64 = fleets.values().map(|(_, m)| m.director.get()).sum();
        let addresses_known = fleets.values().all(|(f, _)| {
            let members = f.view.members();
            members.len() == fleets.len()
                && fleets.keys().all(|n| {
                    members.get(&MemberId(u16::from(*n))).and_then(|r| r.redirect)
                        == Some(redirect_address(*n))
                })
        });
        Ok(match seen.first().copied().flatten() {
            Some(d) if seen.iter().all(|s| *s == Some(d)) && gauges == 1 && addresses_known => {
                Probe::Ready(d)
            }
            _ => Probe::pending(format!(
                "directors seen {seen:?}, gauges {gauges}, addresses known {addresses_known}"
            )),
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_director_and_a_new_one_within_the_lease_after_it_dies() -> Result<()> {
    if prereq::require(&[etcd::TOOLS]).is_skip() {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let prefix = format!("/test-{}", ids::random_hex(6));
    let mut fleets: BTreeMap<u8, (Fleet, FleetMetrics)> = (0..3u8)
        .map(|n| {
            let metrics = FleetMetrics::default();
            (
                n,
                (Fleet::start(options(&etcd, &prefix, n), metrics.clone()), metrics),
            )
        })
        .collect();
    let first = wait_director(&fleets).await?;
    let dead = u8::try_from(first.0)?;
    let (fleet, _) = fleets.remove(&dead).expect("the director is one of ours");
    let killed = Instant::now();
    fleet.kill();
    let second = wait_director(&fleets).await?;
    let took = killed.elapsed();
    eprintln!("director {first} killed; member {second} directs after {took:.2?} (lease TTL {TTL:?})");
    ensure!(second != first, "the dead member {first} still directs");
    ensure!(
        took <= TTL + Duration::from_secs(1),
        "a new director took {took:.2?}, more than the lease TTL and a second"
    );
    for (_, (f, _)) in fleets {
        f.shutdown().await;
    }
    Ok(())
}
