//! Egroups in a fleet: the initiator path (the head-end LAN pings an idle site) works from
//! any pod. Three gateway pods behind the front (`concentrator_e2e::fleet`), a head-end LAN
//! bridge joined to every pod with a LAN host whose route toward each site names one pod (a
//! LAN router may pick any), and the node's SNAT for flows the pods start (in Kubernetes
//! the node masquerades pod egress). One egroup whose base eroute may initiate (`role:
//! Both`), the sites' rows carrying their WAN addresses; strongSwan sites that never
//! initiate (no start action) and accept our initiation.
//!
//! For each site in turn: the LAN host pings it through a first pod, which looks the site up
//! by subnet, wins its claim in etcd and initiates; then through each other pod, which finds
//! the site held (`fleet_claims_total{reason="held"}`) and forwards the packets to the
//! holder in plain frames (`fleet_forwarded_packets_total{kind="plain"}`), with no second
//! IKE SA. At the end the claims in etcd name the holders, a site never pinged is still
//! idle, and no pod sent anything toward the WAN outside a flow (stray).
//!
//! As non-root every test prints SKIP and passes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use concentrator_e2e::fleet::sites::{self, Site};
use concentrator_e2e::fleet::{self, Affinity, Fleet, FleetOptions, Pod};
use concentrator_e2e::netns::{self, net};
use concentrator_e2e::topology::{site_lan, site_wan};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{etcd, prereq, process, scratch, strongswan};

mod common;

use common::fleet::EGROUP;

const PODS: usize = 3;
/// Sites 1..=3 are pinged; the last one stays idle.
const SITES: usize = 4;
/// Which pod the LAN host's first ping to each pinged site goes through.
const FIRST_POD: [(usize, usize); 3] = [(1, 0), (2, 2), (3, 1)];
/// How long a site may take to answer the LAN's ping (lookup, claim, IKE, ESP).
const TIMEOUT: Duration = Duration::from_secs(40);

const FORWARDED: &str = "fleet_forwarded_packets_total";
const CLAIMS: &str = "fleet_claims_total";

fn skip() -> bool {
    prereq::require(&[netns::TOOLS, strongswan::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip()
}

/// The sites' rows with their WAN addresses (where a pod initiates to), imported into the
/// embedded store in `data_dir` with the product's own command.
fn import_sites(data_dir: &Path, psks: &[(usize, String)]) -> Result<()> {
    let mut csv = String::from("peer_id,psk,remote_subnet,peer_address\n");
    for (n, psk) in psks {
        csv.push_str(&format!(
            "{},{psk},{},{}\n",
            sites::peer_id(*n),
            site_lan(*n),
            site_wan(*n)
        ));
    }
    let file = data_dir.join("sites.csv");
    std::fs::write(&file, csv)?;
    let (data, file) = (data_dir.to_str().context("path")?, file.to_str().context("path")?);
    let mut cmd = std::process::Command::new(common::gateway_bin());
    cmd.args(["--data-dir", data, "sites", "import", file]);
    process::run(&mut cmd, process::COMMAND_TIMEOUT)
        .with_context(|| format!("importing sites into {}", data_dir.display()))?;
    Ok(())
}

/// The fleet (LAN bridge, pod egress), its config dir, and the idle sites.
fn start() -> Result<(tempfile::TempDir, Fleet, Vec<Site>)> {
    let dir = scratch::dir("fleet-init-config")?;
    let config = dir.path().join("config");
    // The base eroute may initiate: with the rows' peer addresses, traffic from the
    // head-end toward a site without a tunnel starts IKE to it.
    common::fleet::write_egroup_config_as(&config, "Both")?;
    let psks = common::fleet::psks(SITES);
    let options = FleetOptions::new(PODS, Affinity::client_ip(), common::gateway_bin(), &config).initiating();
    let mut fleet = Fleet::new(options)?;
    for pod in fleet.pods() {
        import_sites(&pod.data_dir(), &psks)?;
    }
    fleet.start_pods()?;
    // Loaded, never initiated: each site only answers.
    let started = sites::start_all(fleet.wan(), fleet.front().address(), &psks, SITES)?;
    Ok((dir, fleet, started))
}

/// Sum of pod `pod`'s samples of `name` whose labels include every `k="v"` of `labels` (in
/// any order).
fn labelled(pod: &Pod, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(pod
        .samples(name)?
        .iter()
        .filter(|(k, _)| labels.iter().all(|(l, v)| k.contains(&format!("{l}=\"{v}\""))))
        // Not `sum()`: an empty f64 sum is -0, which reads oddly in the report.
        .fold(0.0, |a, (_, v)| a + v))
}

/// One pod's counters the test reads before and after a ping.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counters {
    plain_sent: f64,
    plain_received: f64,
    won: f64,
    held: f64,
}

impl Counters {
    fn of(pod: &Pod) -> Result<Self> {
        let plain = |d| labelled(pod, FORWARDED, &[("kind", "plain"), ("direction", d)]);
        let claims = |r| labelled(pod, CLAIMS, &[("reason", r)]);
        Ok(Self {
            plain_sent: plain("sent")?,
            plain_received: plain("received")?,
            won: claims("won")?,
            held: claims("held")?,
        })
    }

    fn all(fleet: &Fleet) -> Result<Vec<Self>> {
        fleet.pods().iter().map(Self::of).collect()
    }
}

/// The tails of site `s`'s charon log and of every pod's log.
fn logs(fleet: &Fleet, s: &Site) -> String {
    format!("{}\n{}", s.log_tail(30), fleet.log_tails(30))
}

/// Points the LAN host's route to site `s`'s LAN at pod `via` and pings the site's LAN
/// address from the LAN host until it answers (the first packets may be lost while the
/// tunnel comes up). Returns how long that took.
fn ping_site_via(fleet: &Fleet, s: &Site, via: usize) -> Result<Duration> {
    let lan = fleet.lan()?;
    lan.route_via(net(&site_lan(s.n())), via)?;
    ensure!(
        lan.route_to(s.host())? == Some(via),
        "the LAN host's route to {} does not go through gw-{via}",
        s.host()
    );
    let t0 = Instant::now();
    lan.host()
        .wait_reachable(Some(lan.host_addr()), s.host(), TIMEOUT)
        .with_context(|| format!("LAN host -> site {} via gw-{via}\n{}", s.n(), logs(fleet, s)))?;
    Ok(t0.elapsed())
}

/// The one pod whose tunnel table lists site `s`.
fn holder(fleet: &Fleet, s: &Site) -> Result<usize> {
    let owners = fleet.owners_of(&s.peer_id())?;
    match owners[..] {
        [one] => Ok(one),
        _ => bail!(
            "site {} is listed by pods {owners:?}, not by exactly one\n{}",
            s.n(),
            logs(fleet, s)
        ),
    }
}

/// How many IKE SAs site `s`'s charon has for its connection (a second pod initiating
/// would make two).
fn site_ike_sas(s: &Site) -> Result<usize> {
    Ok(s.charon()
        .list_sas()?
        .iter()
        .filter(|sa| sa.name == sites::CONNECTION)
        .count())
}

/// The members the claims in etcd for site `s` name (one claim expected).
fn claimed_by(fleet: &Fleet, s: &Site) -> Result<Vec<Option<usize>>> {
    fleet
        .claims()?
        .into_iter()
        .filter(|c| c.peer_id == s.peer_id())
        .map(|c| {
            ensure!(
                c.scope == format!("egroup/{EGROUP}"),
                "site {} claimed in scope {:?}",
                s.n(),
                c.scope
            );
            Ok(c.member)
        })
        .collect()
}

/// Waits until the claims in etcd for site `s` name exactly pod `pod`.
fn wait_claimed_by(fleet: &Fleet, s: &Site, pod: usize) -> Result<()> {
    wait::until(
        format!("site {}'s claim to name gw-{pod}", s.n()),
        TIMEOUT,
        || {
            let held = claimed_by(fleet, s)?;
            Ok(if held == [Some(pod)] {
                Probe::Ready(())
            } else {
                Probe::pending(format!("claims of site {}: {held:?}", s.n()))
            })
        },
    )
    .with_context(|| fleet.log_tails(20))
}

/// The first ping to idle site `s` goes through pod `first`: that pod wins the claim,
/// initiates (through the node's SNAT), and holds the only tunnel. Returns the holder.
fn first_ping(fleet: &Fleet, s: &Site, first: usize, up_before: usize) -> Result<usize> {
    ensure!(
        site_ike_sas(s)? == 0 && claimed_by(fleet, s)?.is_empty(),
        "site {} was not idle before the LAN sent it traffic",
        s.n()
    );
    let before = Counters::all(fleet)?;
    let egress_before = fleet.egress_flows()?;
    let took = ping_site_via(fleet, s, first)?;
    let own = holder(fleet, s)?;
    let after = Counters::all(fleet)?;
    eprintln!(
        "site {} answered the LAN through gw-{first} after {took:.1?}; held by gw-{own}",
        s.n()
    );
    // Nobody held the site and only this pod had traffic for it: it is the one to win.
    ensure!(
        own == first,
        "site {}: the LAN's traffic entered gw-{first} but gw-{own} holds the tunnel\n{}",
        s.n(),
        logs(fleet, s)
    );
    ensure!(
        after[first].won > before[first].won,
        "gw-{first} brought site {} up without winning its claim (claims won {} -> {})",
        s.n(),
        before[first].won,
        after[first].won
    );
    ensure!(
        site_ike_sas(s)? == 1,
        "site {} has {} IKE SAs",
        s.n(),
        site_ike_sas(s)?
    );
    ensure!(
        s.is_established()?,
        "site {} answered but charon has no installed child\n{}",
        s.n(),
        s.log_tail(30)
    );
    let egress = fleet.egress_flows()?;
    ensure!(
        egress > egress_before,
        "site {} came up but no flow went out through the node's SNAT ({egress_before} -> \
         {egress}): who initiated?\n{}",
        s.n(),
        logs(fleet, s)
    );
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == (up_before + 1) as f64)
        .with_context(|| fleet.log_tails(30))?;
    wait_claimed_by(fleet, s, own)?;
    Ok(own)
}

/// The LAN pings site `s` (held by `own`) through pod `via`, another pod: `via` finds the
/// site held and forwards the packets to `own` in plain frames; no second IKE SA appears.
fn ping_through_another_pod(fleet: &Fleet, s: &Site, own: usize, via: usize, up: usize) -> Result<()> {
    let before = Counters::all(fleet)?;
    let took = ping_site_via(fleet, s, via)?;
    let after = Counters::all(fleet)?;
    eprintln!(
        "site {} (held by gw-{own}) answered the LAN through gw-{via} after {took:.1?}; \
         plain sent by gw-{via} {} -> {}, received by gw-{own} {} -> {}",
        s.n(),
        before[via].plain_sent,
        after[via].plain_sent,
        before[own].plain_received,
        after[own].plain_received
    );
    let owners = fleet.owners_of(&s.peer_id())?;
    ensure!(
        owners == [own],
        "after traffic through gw-{via}, site {} is listed by pods {owners:?} (held by gw-{own} \
         before)\n{}",
        s.n(),
        logs(fleet, s)
    );
    ensure!(
        site_ike_sas(s)? == 1,
        "site {} has {} IKE SAs after traffic through gw-{via}\n{}",
        s.n(),
        site_ike_sas(s)?,
        s.log_tail(30)
    );
    ensure!(
        after[via].won == before[via].won,
        "gw-{via} won a claim for a site gw-{own} holds"
    );
    ensure!(
        after[via].held > before[via].held,
        "gw-{via} did not ask etcd who holds site {} (claims held {} -> {})",
        s.n(),
        before[via].held,
        after[via].held
    );
    ensure!(
        after[via].plain_sent > before[via].plain_sent,
        "gw-{via} forwarded no plain frame, yet the ping through it was answered\n{}",
        fleet.log_tails(20)
    );
    ensure!(
        after[own].plain_received > before[own].plain_received,
        "gw-{own} (the holder) received no plain frame from gw-{via}\n{}",
        fleet.log_tails(20)
    );
    let established = fleet.metric_sum("ike_sas_established")?;
    ensure!(
        established == up as f64,
        "{established} IKE SAs over the pods with {up} sites up"
    );
    wait_claimed_by(fleet, s, own)
}

#[test]
fn the_head_end_lan_reaches_idle_sites_through_any_pod() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let t0 = Instant::now();
    let (_config, fleet, started) = start()?;
    eprintln!(
        "fleet of {PODS} pods and {SITES} idle sites up after {:.1?}",
        t0.elapsed()
    );
    ensure!(
        fleet.metric_sum("ike_sas_established")? == 0.0 && fleet.claims()?.is_empty(),
        "tunnels or claims before any traffic:\n{:?}\n{}",
        fleet.claims()?,
        fleet.log_tails(20)
    );

    let mut holders = Vec::new();
    for (up, &(n, first)) in FIRST_POD.iter().enumerate() {
        let s = &started[n - 1];
        let own = first_ping(&fleet, s, first, up)?;
        for via in (0..PODS).filter(|&p| p != own) {
            ping_through_another_pod(&fleet, s, own, via, up + 1)?;
        }
        holders.push((s, own));
    }

    // The other direction through each held tunnel: a site's LAN reaches the LAN host (the
    // replies take whichever pod the LAN host's route names now).
    let lan_host = fleet.lan()?.host_addr();
    for (s, _) in &holders {
        s.wait_ping(lan_host, TIMEOUT).with_context(|| logs(&fleet, s))?;
    }

    // The fleet as etcd tells it: one claim per site brought up, naming its holder, and
    // none for the site that never had traffic, which is still idle.
    let claims = fleet.claims()?;
    for (s, own) in &holders {
        ensure!(
            claimed_by(&fleet, s)? == [Some(*own)],
            "site {}: claims {claims:?}, held by gw-{own}",
            s.n()
        );
        ensure!(holder(&fleet, s)? == *own, "site {} moved", s.n());
    }
    ensure!(
        claims.len() == holders.len(),
        "{} claims for {} sites brought up: {claims:?}",
        claims.len(),
        holders.len()
    );
    let idle = &started[SITES - 1];
    ensure!(
        site_ike_sas(idle)? == 0 && fleet.owners_of(&idle.peer_id())?.is_empty(),
        "site {} connected without traffic toward it",
        idle.n()
    );
    fleet.wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == holders.len() as f64)?;
    let stray = fleet.front().stray_packets()?;
    ensure!(
        stray == 0,
        "pods sent {stray} packets toward the WAN on pod0 outside a flow the front DNAT'd\n{}",
        fleet.front().ruleset()
    );
    eprintln!(
        "holders {:?}; flows the pods started through the node's SNAT: {}; total {:.1?}",
        holders.iter().map(|(s, o)| (s.n(), *o)).collect::<Vec<_>>(),
        fleet.egress_flows()?,
        t0.elapsed()
    );
    Ok(())
}
