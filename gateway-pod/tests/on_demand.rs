//! Sites that connect when their own traffic needs the tunnel, as strongSwan's
//! `start_action = trap` does with kernel IPsec: our gateway as the site software, with a
//! static eroute of role `Both` and the head-end's `peerAddress`. The head-end is an egroup
//! (embedded SQLite site table) with `maxDynamicEroutes: 2` that only answers (base eroute
//! role `Responder`), so only the sites' own traffic can bring their tunnels back.
//!
//! As non-root every test prints SKIP and passes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::gateway::{Gateway, metric, wait_metric};
use concentrator_e2e::netns::{self, Netns, Wan, addr};
use concentrator_e2e::topology::{GW_ADDR, GW_HOST, GW_ID, GW_LAN, site_host, site_lan, site_wan};
use concentrator_e2e::{logs, prereq, scratch, tools};

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");
const TIMEOUT: Duration = Duration::from_secs(20);

/// Site `n`: WAN address, LAN, LAN host, identity.
fn site_id(n: u8) -> String {
    format!("site{n}.sites.example")
}

/// The head-end: one base eroute that only answers, one egroup over the embedded store.
fn write_headend(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("branches.yaml"),
        format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: branches\n\
             spec:\n  localSubnet: {GW_LAN}\n  remoteSubnet: 10.1.0.0/16\n\
             \x20 peerId: \"*.sites.example\"\n  localId: {GW_ID}\n  role: Responder\n\
             ---\napiVersion: vpn.concentrator.io/v1alpha1\nkind: Egroup\nmetadata:\n  name: branches\n\
             spec:\n  eroute: branches\n  remoteSubnetPrefix: 24\n  maxDynamicEroutes: 2\n\
             \x20 database:\n    timeout: 2s\n"
        ),
    )?;
    Ok(())
}

/// Site `n`: a static eroute to the head-end, connected on demand (role `Both`).
fn write_site(dir: &Path, n: u8, psk: &str) -> Result<()> {
    std::fs::create_dir_all(dir.join("secrets/hq"))?;
    std::fs::write(dir.join("secrets/hq/psk"), psk)?;
    std::fs::write(
        dir.join("hq.yaml"),
        format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: hq\n\
             spec:\n  localSubnet: {}\n  remoteSubnet: {GW_LAN}\n  peerId: {GW_ID}\n\
             \x20 localId: {}\n  peerAddress: {GW_ADDR}\n  role: Both\n\
             \x20 pskSecretRef:\n    name: hq\n    key: psk\n",
            site_lan(n),
            site_id(n)
        ),
    )?;
    Ok(())
}

/// The head-end's site table, loaded with the product's own commands.
fn import_sites(data: &Path, csv: &Path, psks: &[(u8, String)]) -> Result<()> {
    let rows: String = psks
        .iter()
        .map(|(n, psk)| format!("{},{psk},{},{}\n", site_id(*n), site_lan(*n), site_wan(*n)))
        .collect();
    std::fs::write(csv, format!("peer_id,psk,remote_subnet,peer_address\n{rows}"))?;
    let data = data.to_str().context("path")?;
    for args in [
        vec!["--data-dir", data, "migrate"],
        vec![
            "--data-dir",
            data,
            "sites",
            "import",
            "--prefix",
            "24",
            csv.to_str().context("path")?,
        ],
    ] {
        let out = std::process::Command::new(BIN).args(&args).output()?;
        ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

struct Site {
    n: u8,
    ns: Netns,
    gateway: Gateway,
}

impl Site {
    /// Established IKE SAs of the site's gateway.
    fn established(&self) -> Result<f64> {
        metric(&self.ns, "concentrator_gateway_ike_sas_established")
    }

    /// Pings the head-end LAN from the site's LAN until it answers: the first packets are
    /// what raises the site's acquire.
    fn reach_headend(&self, headend: &Gateway) -> Result<()> {
        self.ns
            .wait_reachable(Some(addr(&site_host(self.n))), addr(GW_HOST), TIMEOUT)
            .with_context(|| {
                format!(
                    "site {}:\n{}\nhead-end:\n{}",
                    self.n,
                    self.gateway.log_tail(20),
                    headend.log_tail(20)
                )
            })
    }
}

#[test]
fn sites_connect_on_their_own_traffic_and_come_back_after_eviction() -> Result<()> {
    if prereq::require(&[netns::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let psks: Vec<(u8, String)> = (1..=2)
        .map(|n| (n, concentrator_e2e::ids::random_hex(32)))
        .collect();
    let wan = Wan::new()?;
    let gw = wan.host("odgw", GW_ADDR, Some(GW_HOST))?;
    let dir = scratch::dir("on-demand")?;
    write_headend(&dir.path().join("headend-config"))?;
    import_sites(
        &dir.path().join("headend-data"),
        &dir.path().join("sites.csv"),
        &psks,
    )?;
    let bin = Path::new(BIN);
    let headend = Gateway::start(&gw, bin, dir.path(), "headend", GW_ADDR, &[])?;
    let sites: Vec<Site> = psks
        .iter()
        .map(|(n, psk)| -> Result<Site> {
            let ns = wan.host(&format!("odsite{n}"), &site_wan(*n), Some(&site_host(*n)))?;
            let name = format!("site{n}");
            write_site(&dir.path().join(format!("{name}-config")), *n, psk)?;
            let gateway = Gateway::start(&ns, bin, dir.path(), &name, &site_wan(*n), &[])?;
            Ok(Site { n: *n, ns, gateway })
        })
        .collect::<Result<_>>()?;

    // Nothing connects before traffic needs it; the remote subnet is trapped all the same:
    // routed into the TUN device, so nothing leaves in clear.
    for s in &sites {
        ensure!(s.established()? == 0.0, "site {} connected without traffic", s.n);
        let route = s.ns.ip(&["route", "show", GW_LAN])?;
        ensure!(
            route.contains("concentrator0"),
            "site {}: no trap route: {route:?}",
            s.n
        );
    }
    ensure!(
        metric(&gw, "concentrator_gateway_ike_sas_established")? == 0.0,
        "the head-end has SAs before any traffic"
    );

    // Each site's own traffic brings its tunnel up. With 2 dynamic eroutes at most, the
    // second fills the table (fewer than 10% free), so the least recently used one goes.
    let (a, b) = (&sites[0], &sites[1]);
    a.reach_headend(&headend)?;
    ensure!(
        logs::contains(&a.gateway.log, "traffic for a tunnel that is down: connecting"),
        "site 1 did not connect on demand\n{}",
        a.gateway.log_tail(20)
    );
    b.reach_headend(&headend)?;
    // The head-end evicted site 1 with a DELETE: its tunnel is gone, its trap stays.
    wait_metric(&a.ns, "concentrator_gateway_ike_sas_established", 0.0, TIMEOUT)
        .with_context(|| format!("site 1 was not evicted\n{}", headend.log_tail(20)))?;
    ensure!(
        a.ns.ip(&["route", "show", GW_LAN])?.contains("concentrator0"),
        "site 1 lost its trap route"
    );
    // Site 1 sends traffic again: it comes back by itself, and site 2 is the one evicted.
    a.reach_headend(&headend)?;
    wait_metric(&b.ns, "concentrator_gateway_ike_sas_established", 0.0, TIMEOUT)
        .with_context(|| format!("site 2 was not evicted\n{}", headend.log_tail(20)))?;
    wait_metric(&gw, "concentrator_gateway_dynamic_eroutes", 1.0, TIMEOUT)?;
    let tunnels = gw.run(BIN, &["tunnels"])?;
    ensure!(
        tunnels.contains(&site_id(1)) && !tunnels.contains(&site_id(2)),
        "head-end tunnels:\n{tunnels}"
    );
    Ok(())
}
