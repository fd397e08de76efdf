//! The operator scales a fleet in, 3 pods to 2, with no tunnel lost: the operator's own
//! scale-in step (`concentrator_operator::fleet::scale_in`) drives three real gateway pods
//! through their admin APIs over mutual TLS, from inside the pod network as the operator's
//! pod would. The test stands in for Kubernetes: it drops the leaving pod's endpoint from the
//! kube-proxy-like front once the pod reports not ready, and once the operator lowers the
//! replica count it stops that pod with SIGTERM, as the StatefulSet controller would. Every
//! strongSwan site pings through its tunnel all along: its traffic pauses for less than a
//! second, it keeps its IKE SA, and the stopped pod sends no DELETE.
//!
//! `FLEET_E2E_SCALE_IN_SITES` sets the number of sites (default 30). As non-root the test
//! prints SKIP and passes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_e2e::fleet::{self, sites};
use concentrator_e2e::netns::{self, addr};
use concentrator_e2e::ping::Ping;
use concentrator_e2e::pki::ADMIN_SERVER_NAME;
use concentrator_e2e::topology::GW_HOST;
use concentrator_e2e::{etcd, prereq, strongswan};
use concentrator_operator::fleet::admin::GrpcFleetAdmin;
use concentrator_operator::fleet::scale::Step;
use concentrator_operator::fleet::scale_in::{Outcome, ScaleIn};
use concentrator_proto::tls::{AdminTls, ClientTls};

mod common;

use common::fleet_sites::{TIMEOUT, fleet_of, ike_spis, logs};

const PODS: usize = 3;
const PING_EVERY: Duration = Duration::from_millis(20);
const PINGING: Duration = Duration::from_secs(14);
const MAX_GAP: Duration = Duration::from_secs(1);
/// The operator's requeue while a pod drains, shortened.
const ROUND_EVERY: Duration = Duration::from_millis(200);

fn skip() -> bool {
    prereq::require(&[netns::TOOLS, strongswan::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip()
}

fn site_count() -> usize {
    std::env::var("FLEET_E2E_SCALE_IN_SITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

#[test]
fn the_operator_scales_three_pods_to_two_without_losing_a_tunnel() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let n = site_count();
    let (_config, mut fleet, started, owners) = fleet_of(PODS, 1, n, &sites::SiteOptions::default(), &[])?;
    let leaving = PODS - 1;
    let held = owners.iter().filter(|o| **o == leaving).count();
    let spis_before: Vec<String> = started.iter().map(ike_spis).collect::<Result<_>>()?;
    let pings: Vec<Ping> = started
        .iter()
        .map(|s| {
            let log = fleet.dir().join(format!("ping-site{}.log", s.n()));
            Ping::start(s.ns(), s.host(), addr(GW_HOST), PING_EVERY, PINGING, &log)
        })
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_secs(3));

    // The operator, in the pod network, with a client certificate of the fleet's CA.
    let tls = ClientTls {
        files: AdminTls::load(&fleet.pod(0).admin_tls_dir())?,
        server_name: ADMIN_SERVER_NAME.into(),
    };
    let admin =
        GrpcFleetAdmin::new(Some(tls)).locating(|_, _, o| format!("{}:50051", fleet::pod_ip(o as usize)));
    let (tx, rx) = std::sync::mpsc::channel::<Outcome>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<bool>();
    let operator = fleet.pod(0).ns().spawn_inside(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let Ok(rt) = rt else { return };
        rt.block_on(async move {
            let mut scale_in = ScaleIn::default();
            // Each round as a reconcile would run it (3 replicas, 2 wanted), until told to stop.
            while go_rx.recv().unwrap_or(false) {
                let out = scale_in
                    .round(
                        &admin,
                        ("vpn", "edge"),
                        PODS as u32,
                        Step::Drain(leaving as u32),
                        Duration::from_secs(60),
                        Instant::now(),
                    )
                    .await;
                if tx.send(out).is_err() {
                    return;
                }
            }
        });
    })?;

    let t0 = Instant::now();
    let mut endpoint_dropped = false;
    let scaled = loop {
        ensure!(t0.elapsed() < TIMEOUT, "scale-in did not finish in {TIMEOUT:?}");
        go_tx.send(true)?;
        let out = rx.recv_timeout(TIMEOUT).context("the operator's round")?;
        eprintln!("+{:.1?}: {out:?}", t0.elapsed());
        match out {
            Outcome::Replicas { n, scaled_in: true } => break n,
            Outcome::Draining { .. } => {}
            other => anyhow::bail!("scale-in went {other:?}\n{}", fleet.log_tails(30)),
        }
        // kube-proxy drops an endpoint whose readiness probe fails.
        if !endpoint_dropped && !fleet.pod(leaving).ready() {
            fleet.front().remove_endpoint(leaving)?;
            endpoint_dropped = true;
        }
        std::thread::sleep(ROUND_EVERY);
    };
    go_tx.send(false)?;
    drop(operator.join());
    ensure!(scaled == (PODS - 1) as u32, "the operator set {scaled} replicas");
    ensure!(endpoint_dropped, "the leaving pod never reported not ready");
    eprintln!(
        "gw-{leaving} (held {held} of {n} tunnels) drained; the operator scaled in after {:.1?}",
        t0.elapsed()
    );
    // The StatefulSet removes the pod: SIGTERM. Drained, it stops at once, without a DELETE.
    let stopping = Instant::now();
    fleet.terminate_pod(leaving)?;
    let status = fleet.wait_pod_exit(leaving, Duration::from_secs(10))?;
    ensure!(status.success(), "gw-{leaving} exited with {status}");
    eprintln!("gw-{leaving} stopped {:.1?} after SIGTERM", stopping.elapsed());
    let log = concentrator_e2e::logs::tail(&fleet.pod(leaving).log_path(), 100_000);
    ensure!(
        !log.contains("IKE DELETE sent"),
        "the drained pod sent IKE DELETEs"
    );

    let results: Vec<_> = pings
        .into_iter()
        .map(Ping::finish_with_gap)
        .collect::<Result<_>>()?;
    let largest = results.iter().map(|(_, g)| *g).max().unwrap_or_default();
    eprintln!("largest traffic gap over {n} sites: {largest:?}");
    for ((s, (st, gap)), before) in started.iter().zip(&results).zip(&spis_before) {
        ensure!(
            st.received > 0 && *gap <= MAX_GAP,
            "site {} had a gap of {gap:?} (at most {MAX_GAP:?}): {st}\n{}",
            s.n(),
            logs(&fleet, s)
        );
        ensure!(&ike_spis(s)? == before, "site {} negotiated a new IKE SA", s.n());
    }
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    Ok(())
}
