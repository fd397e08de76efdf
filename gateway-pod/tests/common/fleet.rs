//! A fleet of gateway pods configured for many sites: one base eroute and one egroup whose
//! sites are rows of each pod's embedded store (as in `egroup_sites.rs`), no site in the
//! configuration. Shared by the fleet tests.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use concentrator_e2e::fleet::sites::{SITE_DOMAIN, peer_id};
use concentrator_e2e::fleet::{Affinity, Fleet, FleetOptions};
use concentrator_e2e::topology::{GW_ID, GW_LAN, site_lan};
use concentrator_e2e::{ids, scratch};

/// The egroup (and base eroute) name.
pub(crate) const EGROUP: &str = "branches";

/// `n` sites numbered from 1, each with a random PSK.
pub(crate) fn psks(n: usize) -> Vec<(usize, String)> {
    (1..=n).map(|i| (i, ids::random_hex(24))).collect()
}

/// Writes the base eroute (responder: the pods never initiate, so nothing leaves a pod
/// outside a flow a site opened) and the egroup into `dir`.
pub(crate) fn write_egroup_config(dir: &Path) -> Result<()> {
    write_egroup_config_as(dir, "Responder")
}

/// [`write_egroup_config`] with the base eroute's `role` (`Both`: the pods may initiate
/// toward the sites whose rows carry a peer address).
#[allow(dead_code)] // Not every test binary that includes this module initiates.
pub(crate) fn write_egroup_config_as(dir: &Path, role: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(format!("{EGROUP}.yaml")),
        format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: {EGROUP}\n\
             spec:\n  localSubnet: {GW_LAN}\n  remoteSubnet: 10.1.0.0/16\n\
             \x20 peerId: \"*.{SITE_DOMAIN}\"\n  localId: {GW_ID}\n  role: {role}\n\
             \x20 ike:\n    proposals: [aes128gcm16-prfsha256-x25519, aes256-sha256-x25519]\n\
             ---\napiVersion: vpn.concentrator.io/v1alpha1\nkind: Egroup\nmetadata:\n  name: {EGROUP}\n\
             spec:\n  eroute: {EGROUP}\n  remoteSubnetPrefix: 24\n  maxDynamicEroutes: 10000\n\
             \x20 database:\n    timeout: 2s\n"
        ),
    )?;
    Ok(())
}

/// Writes a static responder eroute `name` for site `n` (its LAN, its identity) with its
/// PSK as a Secret into `dir`.
#[allow(dead_code)] // Not every test binary that includes this module has static eroutes.
pub(crate) fn write_static_eroute(dir: &Path, name: &str, n: usize, psk: &str) -> Result<()> {
    let secret = dir.join("secrets").join(name);
    std::fs::create_dir_all(&secret)?;
    std::fs::write(secret.join("psk"), psk)?;
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: {name}\n\
             spec:\n  localSubnet: {GW_LAN}\n  remoteSubnet: {}\n  peerId: {}\n  localId: {GW_ID}\n\
             \x20 pskSecretRef:\n    name: {name}\n    key: psk\n  role: Responder\n",
            site_lan(n),
            peer_id(n)
        ),
    )?;
    Ok(())
}

/// Writes the sites' rows (no peer address: a pod never dials a site) as CSV and imports
/// them into the embedded store in `data_dir` with `concentrator-gateway sites import`.
pub(crate) fn import_sites(data_dir: &Path, sites: &[(usize, String)]) -> Result<()> {
    let mut csv = String::from("peer_id,psk,remote_subnet\n");
    for (n, psk) in sites {
        csv.push_str(&format!("{},{psk},{}\n", peer_id(*n), site_lan(*n)));
    }
    let file = data_dir.join("sites.csv");
    std::fs::write(&file, csv)?;
    let (data, file) = (data_dir.to_str().context("path")?, file.to_str().context("path")?);
    let mut cmd = std::process::Command::new(super::gateway_bin());
    cmd.args(["--data-dir", data, "sites", "import", file]);
    concentrator_e2e::process::run(&mut cmd, concentrator_e2e::process::COMMAND_TIMEOUT)
        .with_context(|| format!("importing sites into {}", data_dir.display()))?;
    Ok(())
}

/// A fleet of `pods` pods behind a front with `affinity`, the egroup configured and
/// `sites` in every pod's store, the pods up and agreed on their members. The temp dir
/// holds the shared config.
pub(crate) fn start(
    pods: usize,
    affinity: Affinity,
    sites: &[(usize, String)],
) -> Result<(tempfile::TempDir, Fleet)> {
    start_with_args(pods, affinity, sites, &[])
}

/// [`start`] with more gateway arguments.
pub(crate) fn start_with_args(
    pods: usize,
    affinity: Affinity,
    sites: &[(usize, String)],
    args: &[&str],
) -> Result<(tempfile::TempDir, Fleet)> {
    let t0 = Instant::now();
    let dir = scratch::dir("fleet-config")?;
    let config = dir.path().join("config");
    write_egroup_config(&config)?;
    let mut options = FleetOptions::new(pods, affinity, super::gateway_bin(), &config);
    options.gateway_args = args.iter().map(|a| (*a).to_owned()).collect();
    let mut fleet = Fleet::new(options)?;
    for pod in fleet.pods() {
        import_sites(&pod.data_dir(), sites)?;
    }
    let built = t0.elapsed();
    fleet.start_pods()?;
    eprintln!(
        "fleet: {pods} pods ({affinity:?}) built in {built:.1?}, members agreed and shards settled after {:.1?}",
        t0.elapsed()
    );
    Ok((dir, fleet))
}

/// A site that runs our own gateway: a static eroute (role Initiator, strongSwan's default
/// proposals) from its LAN to the head-end LAN, toward the fleet's front. Its IKE starts on
/// port 500 and floats to 4500, as a strongSwan site's does.
pub(crate) struct GatewaySite {
    // Dropped before the namespace it runs in.
    _gateway: concentrator_e2e::process::Daemon,
    pub(crate) ns: concentrator_e2e::netns::Netns,
    pub(crate) dir: std::path::PathBuf,
    pub(crate) n: usize,
}

impl GatewaySite {
    /// Site number `n` (its addresses and identity, `concentrator_e2e::topology`) with
    /// `psk`, on the fleet's WAN; its files under `scratch`. Returns once the gateway serves
    /// (the tunnel comes up by itself).
    pub(crate) fn start(fleet: &Fleet, n: usize, psk: &str, scratch: &Path) -> Result<Self> {
        use concentrator_e2e::topology::{site_host, site_wan};
        let ns = fleet
            .wan()
            .host(&format!("site{n}"), &site_wan(n), Some(&site_host(n)))?;
        let dir = scratch.join(format!("site{n}-gateway"));
        let (lan, id, to) = (site_lan(n), peer_id(n), fleet.front().address().to_string());
        super::StaticEroute {
            name: "hq",
            local_subnet: &lan,
            remote_subnet: GW_LAN,
            peer_id: GW_ID,
            local_id: &id,
            initiate_to: Some(&to),
            ike: concentrator_e2e::strongswan::DEFAULT_IKE_PROPOSAL,
            esp: concentrator_e2e::strongswan::DEFAULT_ESP_PROPOSAL,
            psk,
            ..Default::default()
        }
        .write(&dir.join("config"))?;
        std::fs::create_dir_all(dir.join("data"))?;
        let gateway = super::start_gateway(&ns, &format!("site {n} gateway"), &dir, &site_wan(n), &[])?;
        Ok(Self {
            _gateway: gateway,
            ns,
            dir,
            n,
        })
    }

    /// The site's LAN host address (behind its gateway).
    pub(crate) fn host(&self) -> std::net::IpAddr {
        concentrator_e2e::netns::addr(&concentrator_e2e::topology::site_host(self.n))
    }

    /// The site's WAN address (the source the front sees).
    pub(crate) fn wan_addr(&self) -> std::net::IpAddr {
        concentrator_e2e::netns::addr(&concentrator_e2e::topology::site_wan(self.n))
    }

    /// The site's peer ID at the head-end.
    pub(crate) fn peer_id(&self) -> String {
        peer_id(self.n)
    }

    /// The last `lines` of its gateway's log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        concentrator_e2e::logs::tail(&self.dir.join("gateway.log"), lines)
    }
}
