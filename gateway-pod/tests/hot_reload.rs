//! Hot reload (issue 18): one gateway, five strongSwan sites, each on a static eroute of its
//! own, the config directory laid out as kubelet projects a ConfigMap and Secrets (visible
//! links into `..data`, a link to a hidden directory that is swapped atomically).
//!
//! While the `steady` site pings across its tunnel, one swap edits `edited` (another ESP
//! cipher), adds `added`, removes `removed` and rotates the PSK of `rotated`. Then:
//! `steady` and `edited` keep their SAs (same SPIs) and `steady` loses no packet; `removed`'s
//! site is sent a DELETE; `added`'s site connects; `rotated`'s site fails with the old key and
//! connects with the new one; a new SA of `edited` takes the new cipher. A second swap with
//! an invalid eroute is refused as a whole and counted; the config in force keeps serving.
//!
//! An `Initiator` eroute added connects at once, and removed, DELETEs its SA and connects no
//! more. An egroup's database URL, from a Secret, rotated to another site store is used for the
//! next lookups (the site's established SA runs on); the egroup removed, its site is sent a
//! DELETE.
//!
//! As non-root every test prints SKIP and passes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::gateway::Gateway;
use concentrator_e2e::netns::{self, Netns, Wan, addr};
use concentrator_e2e::ping::Ping;
use concentrator_e2e::strongswan::{self, Charon, Connection};
use concentrator_e2e::topology::{GW_ADDR, GW_HOST, GW_ID, GW_LAN, site_host, site_lan, site_wan};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq, scratch, tools};

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");
const TIMEOUT: Duration = Duration::from_secs(30);
const APPLIED: &str = "concentrator_gateway_config_reloads_total{result=\"applied\"}";
const REFUSED: &str = "concentrator_gateway_config_reloads_total{result=\"refused\"}";

/// The sites, by their number (their WAN, LAN and identity follow from it).
const STEADY: usize = 0;
const EDITED: usize = 1;
const REMOVED: usize = 2;
const ADDED: usize = 3;
const ROTATED: usize = 4;
const NAMES: [&str; 5] = ["steady", "edited", "removed", "added", "rotated"];

fn peer_id(n: usize) -> String {
    format!("site{n}.example")
}

/// One version of the config directory: the eroutes present, each with its ESP proposal and
/// PSK, and an optional line that breaks `steady`.
struct Version<'a> {
    eroutes: &'a [(usize, &'a str, &'a str)],
    broken: bool,
}

impl Version<'_> {
    /// Writes the version into `{config}/..{tag}` and makes it the one `..data` points to,
    /// as kubelet does: a new link renamed over the old one.
    fn project(&self, config: &Path, tag: &str) -> Result<()> {
        let dir = config.join(format!("..{tag}"));
        let mut yaml = String::new();
        for &(n, esp, psk) in self.eroutes {
            let name = NAMES[n];
            std::fs::create_dir_all(dir.join("secrets").join(name))?;
            std::fs::write(dir.join("secrets").join(name).join("psk"), psk)?;
            let local = if self.broken && n == STEADY {
                // Not a network address: refused with file, document and field.
                "10.2.0.1/24"
            } else {
                GW_LAN
            };
            yaml.push_str(&format!(
                "---\napiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: {name}\n\
                 spec:\n  localSubnet: {local}\n  remoteSubnet: {}\n  peerId: {}\n  localId: {GW_ID}\n\
                 \x20 pskSecretRef:\n    name: {name}\n    key: psk\n  role: Responder\n\
                 \x20 esp:\n    proposals: [{esp}]\n",
                site_lan(n),
                peer_id(n),
            ));
        }
        std::fs::write(dir.join("concentrator.yaml"), yaml)?;
        let tmp = config.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{tag}"), &tmp)?;
        std::fs::rename(&tmp, config.join("..data"))?;
        for name in ["concentrator.yaml", "secrets"] {
            let link = config.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), link)?;
            }
        }
        Ok(())
    }
}

struct Site {
    n: usize,
    ns: Netns,
    charon: Charon,
}

impl Site {
    fn start(wan: &Wan, n: usize) -> Result<Self> {
        let ns = wan.host(&format!("hr{n}"), &site_wan(n), Some(&site_host(n)))?;
        let charon = Charon::start(&ns)?;
        Ok(Self { n, ns, charon })
    }

    /// Loads the site's connection with `psk`, offering both GCM key sizes (the gateway's
    /// eroute picks).
    fn load(&self, psk: &str) -> Result<()> {
        let mut c = Connection::new(
            "gw",
            addr(&site_wan(self.n)),
            addr(GW_ADDR),
            psk,
            vec![site_lan(self.n).parse()?],
            vec![GW_LAN.parse()?],
        );
        c.local_id = peer_id(self.n);
        c.remote_id = GW_ID.to_owned();
        c.esp_proposal = "aes128gcm16-aes256gcm16".to_owned();
        self.charon.load(&[c])
    }

    fn connect(&self, gateway: &Gateway) -> Result<()> {
        self.charon
            .initiate("gw")
            .with_context(|| format!("site {}: {}", NAMES[self.n], gateway.log_tail(30)))?;
        self.ping()
    }

    /// Closes its IKE SA (strongSwan refuses a second CHILD SA with the same selectors, so
    /// a new negotiation starts from none).
    fn terminate(&self) -> Result<()> {
        self.charon
            .swanctl(&["--terminate", "--ike", "gw", "--timeout", "10"])
            .map(drop)
    }

    fn ping(&self) -> Result<()> {
        self.ns
            .wait_reachable(Some(addr(&site_host(self.n))), addr(GW_HOST), TIMEOUT)
            .with_context(|| format!("site {} -> head-end", NAMES[self.n]))
    }

    /// The SPIs of its IKE SAs and their CHILD SAs, as strongSwan lists them.
    fn spis(&self) -> Result<Vec<String>> {
        let field =
            |f: &std::collections::BTreeMap<String, String>, k: &str| f.get(k).cloned().unwrap_or_default();
        Ok(self
            .charon
            .list_sas()?
            .iter()
            .flat_map(|ike| {
                let mut v = vec![
                    field(&ike.fields, "initiator-spi"),
                    field(&ike.fields, "responder-spi"),
                ];
                for c in &ike.children {
                    v.push(field(&c.fields, "spi-in"));
                    v.push(field(&c.fields, "spi-out"));
                }
                v
            })
            .collect())
    }

    /// The key sizes of its CHILD SAs.
    fn key_sizes(&self) -> Result<Vec<String>> {
        Ok(self
            .charon
            .list_sas()?
            .iter()
            .flat_map(|ike| &ike.children)
            .map(|c| c.fields.get("encr-keysize").cloned().unwrap_or_default())
            .collect())
    }
}

#[test]
fn config_changes_apply_without_touching_other_tunnels() -> Result<()> {
    config_changes_apply(&[])
}

/// The same with two IKE workers: the five sites spread over them, and each worker applies
/// the reload to its own SAs once the first has changed the shared parts.
#[test]
fn with_two_ike_workers_config_changes_apply_to_every_workers_tunnels() -> Result<()> {
    config_changes_apply(&["--ike-workers", "2"])
}

fn config_changes_apply(args: &[&str]) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PING]]).is_skip() {
        return Ok(());
    }
    let wan = Wan::new()?;
    let gw = wan.host("hrgw", GW_ADDR, Some(GW_HOST))?;
    let dir = scratch::dir("hot-reload")?;
    let config = dir.path().join("gw-config");
    std::fs::create_dir_all(&config)?;
    Version {
        eroutes: &[
            (STEADY, "aes128gcm16", "steady-key"),
            (EDITED, "aes128gcm16", "edited-key"),
            (REMOVED, "aes128gcm16", "removed-key"),
            (ROTATED, "aes128gcm16", "old-key"),
        ],
        broken: false,
    }
    .project(&config, "v1")?;
    let gateway = Gateway::start(&gw, Path::new(BIN), dir.path(), "gw", GW_ADDR, args)?;
    let metric = |name: &str, want: f64| {
        concentrator_e2e::gateway::wait_metric(&gw, name, want, TIMEOUT).with_context(|| gateway.log_tail(30))
    };

    let sites: Vec<Site> = (0..NAMES.len())
        .map(|n| Site::start(&wan, n))
        .collect::<Result<_>>()?;
    let psks = ["steady-key", "edited-key", "removed-key", "added-key", "old-key"];
    for s in &sites {
        s.load(psks[s.n])?;
    }
    for n in [STEADY, EDITED, REMOVED, ROTATED] {
        sites[n].connect(&gateway)?;
    }
    ensure!(
        sites[ADDED].charon.initiate("gw").is_err(),
        "a site without an eroute yet is refused"
    );
    ensure!(
        sites[EDITED].key_sizes()? == ["128"],
        "the edited eroute starts on AES-128"
    );
    let before = [sites[STEADY].spis()?, sites[EDITED].spis()?];

    let pinging = Duration::from_secs(40);
    let ping_started = std::time::Instant::now();
    let ping = Ping::start(
        &sites[STEADY].ns,
        addr(&site_host(STEADY)),
        addr(GW_HOST),
        Duration::from_millis(100),
        pinging,
        &dir.path().join("ping-steady.log"),
    )?;

    // One swap: edited, added, removed, rotated.
    let v2: &[(usize, &str, &str)] = &[
        (STEADY, "aes128gcm16", "steady-key"),
        (EDITED, "aes256gcm16", "edited-key"),
        (ADDED, "aes128gcm16", "added-key"),
        (ROTATED, "aes128gcm16", "new-key"),
    ];
    Version {
        eroutes: v2,
        broken: false,
    }
    .project(&config, "v2")?;
    metric(APPLIED, 1.0)?;
    metric(REFUSED, 0.0)?;

    // The removed eroute's site is told, and its tunnel is gone here too.
    let removed = &sites[REMOVED];
    wait::until("the removed site to receive a DELETE", TIMEOUT, || {
        let log = removed.charon.log_path();
        Ok(
            if logs::contains(log, "received DELETE for IKE_SA") || logs::contains(log, "deleting IKE_SA") {
                Probe::Ready(())
            } else {
                Probe::pending(removed.charon.log_tail(5))
            },
        )
    })
    .with_context(|| gateway.log_tail(30))?;
    wait::until("the removed site to hold no SA", TIMEOUT, || {
        let up = removed
            .charon
            .list_sas()?
            .iter()
            .any(|sa| sa.state == "ESTABLISHED");
        Ok(if up {
            Probe::pending("still up")
        } else {
            Probe::Ready(())
        })
    })?;
    wait::until("the gateway to drop the removed site's tunnel", TIMEOUT, || {
        let table = gw.run(BIN, &["tunnels"])?;
        Ok(if table.contains(&peer_id(REMOVED)) {
            Probe::pending(table)
        } else {
            Probe::Ready(())
        })
    })?;
    ensure!(
        removed.charon.initiate("gw").is_err(),
        "the removed eroute's site is refused"
    );

    // Untouched and edited tunnels kept their SAs.
    ensure!(
        [sites[STEADY].spis()?, sites[EDITED].spis()?] == before,
        "SAs changed: {before:?}"
    );
    sites[EDITED].ping()?;

    // The new eroute takes its site; the rotated key is the only one accepted.
    sites[ADDED].connect(&gateway)?;
    let rotated = &sites[ROTATED];
    rotated.terminate()?;
    ensure!(
        rotated.charon.initiate("gw").is_err(),
        "the old PSK still authenticates:\n{}",
        gateway.log_tail(30)
    );
    rotated.charon.wait_logged("AUTHENTICATION_FAILED", TIMEOUT)?;
    metric(
        "concentrator_gateway_ike_failures_total{reason=\"authentication_failed\"}",
        1.0,
    )?;
    rotated.load("new-key")?;
    rotated.connect(&gateway)?;

    // A new SA of the edited eroute takes its new cipher.
    let edited = &sites[EDITED];
    edited.terminate()?;
    edited.charon.initiate("gw")?;
    wait::until("the edited site's SAs to be AES-256 only", TIMEOUT, || {
        let sizes = edited.key_sizes()?;
        Ok(if sizes == ["256"] {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{sizes:?}"))
        })
    })?;
    edited.ping()?;

    // An invalid version (that would also remove `added`) is refused as a whole.
    Version {
        eroutes: &v2[..2].iter().chain(&v2[3..]).copied().collect::<Vec<_>>(),
        broken: true,
    }
    .project(&config, "v3")?;
    metric(REFUSED, 1.0)?;
    ensure!(
        logs::contains(&gateway.log, "concentrator.yaml (document")
            && logs::contains(&gateway.log, "Eroute 'steady': spec.localSubnet"),
        "the refusal names file, document and field:\n{}",
        gateway.log_tail(20)
    );
    metric(APPLIED, 1.0)?;
    let added = &sites[ADDED];
    added.terminate()?;
    added
        .charon
        .initiate("gw")
        .context("the configuration in force still accepts the added site")?;
    added.ping()?;

    // Else the ping would not have spanned every change.
    ensure!(
        ping_started.elapsed() < pinging,
        "the changes took longer than the ping ran ({pinging:?})"
    );
    let stats = ping.finish()?;
    ensure!(
        stats.lost() == 0,
        "the steady site lost packets: {stats}\n{}",
        gateway.log_tail(40)
    );
    ensure!(
        sites[STEADY].spis()? == before[0],
        "the steady site's SAs changed"
    );
    Ok(())
}

/// Imports one row for site `n` with `psk` into the SQLite store at `db`, with the product's
/// own command.
fn import_site(db: &Path, n: usize, psk: &str) -> Result<()> {
    let csv = db.with_extension("csv");
    std::fs::write(
        &csv,
        format!(
            "peer_id,psk,remote_subnet\n{},{psk},{}\n",
            peer_id(n),
            site_lan(n)
        ),
    )?;
    let url = format!("sqlite:{}", db.display());
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["--site-db", &url, "sites", "import"]).arg(&csv);
    concentrator_e2e::process::run(&mut cmd, concentrator_e2e::process::COMMAND_TIMEOUT)?;
    Ok(())
}

#[test]
fn a_rotated_database_url_and_a_removed_egroup_apply_live() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let wan = Wan::new()?;
    let gw = wan.host("hrdbgw", GW_ADDR, Some(GW_HOST))?;
    let dir = scratch::dir("hot-reload-db")?;
    let (db_a, db_b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    import_site(&db_a, 1, "key-in-a")?;
    import_site(&db_b, 1, "key-in-b")?;
    let config = dir.path().join("gw-config");
    std::fs::create_dir_all(config.join("secrets/sites-db"))?;
    std::fs::write(
        config.join("secrets/sites-db/url"),
        format!("sqlite:{}", db_a.display()),
    )?;
    let egroup = format!(
        "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: branches\n\
         spec:\n  localSubnet: {GW_LAN}\n  remoteSubnet: 10.1.0.0/16\n  peerId: \"*.example\"\n\
         \x20 localId: {GW_ID}\n  role: Responder\n\
         ---\napiVersion: vpn.concentrator.io/v1alpha1\nkind: Egroup\nmetadata:\n  name: branches\n\
         spec:\n  eroute: branches\n  remoteSubnetPrefix: 24\n\
         \x20 database:\n    urlSecretRef: {{name: sites-db, key: url}}\n"
    );
    std::fs::write(config.join("branches.yaml"), &egroup)?;
    // A static eroute that stays: the egroup's removal must leave the file valid.
    std::fs::create_dir_all(config.join("secrets/hq"))?;
    std::fs::write(config.join("secrets/hq/psk"), "hq-key")?;
    std::fs::write(
        config.join("hq.yaml"),
        format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: hq\n\
             spec:\n  localSubnet: {GW_LAN}\n  remoteSubnet: 172.16.0.0/24\n  peerId: hq.example.org\n\
             \x20 pskSecretRef: {{name: hq, key: psk}}\n  role: Responder\n"
        ),
    )?;
    let gateway = Gateway::start(&gw, Path::new(BIN), dir.path(), "gw", GW_ADDR, &[])?;
    let metric = |name: &str, want: f64| {
        concentrator_e2e::gateway::wait_metric(&gw, name, want, TIMEOUT).with_context(|| gateway.log_tail(30))
    };
    let site = Site::start(&wan, 1)?;
    site.load("key-in-a")?;
    site.connect(&gateway)?;
    let before = site.spis()?;

    // The Secret now names the other store, written in place as a standalone user would.
    std::fs::write(
        config.join("secrets/sites-db/url"),
        format!("sqlite:{}", db_b.display()),
    )?;
    metric(APPLIED, 1.0)?;
    ensure!(site.spis()? == before, "the site's SA changed");
    site.ping()?;
    site.terminate()?;
    ensure!(
        site.charon.initiate("gw").is_err(),
        "the key of the former store still authenticates"
    );
    site.load("key-in-b")?;
    site.connect(&gateway)?;
    metric("concentrator_gateway_dynamic_eroutes{egroup=\"branches\"}", 1.0)?;

    // The egroup and its eroute removed: the site is told, the gateway holds nothing of it.
    std::fs::remove_file(config.join("branches.yaml"))?;
    metric(APPLIED, 2.0)?;
    wait::until("the egroup's site to hold no SA", TIMEOUT, || {
        let up = site.charon.list_sas()?.iter().any(|sa| sa.state == "ESTABLISHED");
        Ok(if up {
            Probe::pending("still up")
        } else {
            Probe::Ready(())
        })
    })
    .with_context(|| gateway.log_tail(30))?;
    metric("concentrator_gateway_ike_sas_established", 0.0)?;
    metric("concentrator_gateway_egroups", 0.0)?;
    metric("concentrator_gateway_dynamic_eroutes{egroup=\"branches\"}", 0.0)?;
    Ok(())
}

#[test]
fn an_initiator_eroute_connects_when_added_and_stays_down_when_removed() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let wan = Wan::new()?;
    let gw = wan.host("hrigw", GW_ADDR, Some(GW_HOST))?;
    let dir = scratch::dir("hot-reload-init")?;
    let config = dir.path().join("gw-config");
    std::fs::create_dir_all(config.join("secrets/out"))?;
    std::fs::write(config.join("secrets/out/psk"), "out-key")?;
    let eroute = |name: &str, role: &str, n: usize| {
        format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: {name}\n\
             spec:\n  localSubnet: {GW_LAN}\n  remoteSubnet: {}\n  peerId: {}\n  localId: {GW_ID}\n\
             \x20 peerAddress: {}\n  pskSecretRef: {{name: out, key: psk}}\n  role: {role}\n",
            site_lan(n),
            peer_id(n),
            site_wan(n)
        )
    };
    std::fs::write(config.join("hq.yaml"), eroute("hq", "Responder", 6))?;
    let gateway = Gateway::start(&gw, Path::new(BIN), dir.path(), "gw", GW_ADDR, &[])?;
    let metric = |name: &str, want: f64| {
        concentrator_e2e::gateway::wait_metric(&gw, name, want, TIMEOUT).with_context(|| gateway.log_tail(30))
    };
    let site = Site::start(&wan, 5)?;
    site.load("out-key")?;

    std::fs::write(config.join("out.yaml"), eroute("out", "Initiator", 5))?;
    metric(APPLIED, 1.0)?;
    site.charon
        .wait_established("gw", "gw", TIMEOUT)
        .with_context(|| gateway.log_tail(30))?;
    site.ping()?;

    std::fs::remove_file(config.join("out.yaml"))?;
    metric(APPLIED, 2.0)?;
    wait::until("the site to hold no SA", TIMEOUT, || {
        let up = site.charon.list_sas()?.iter().any(|sa| sa.state == "ESTABLISHED");
        Ok(if up {
            Probe::pending("still up")
        } else {
            Probe::Ready(())
        })
    })
    .with_context(|| gateway.log_tail(30))?;
    // Nothing to wait for here, only an absence to observe: a gateway still keeping the
    // eroute up would connect again after its 2 s backoff, well within this window.
    let window = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < window {
        ensure!(
            site.charon.list_sas()?.is_empty(),
            "the removed eroute connected again:\n{}",
            gateway.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
