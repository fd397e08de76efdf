//! Egroups over the users' own site tables in a real MariaDB: their own column names, with
//! and without the optional address columns. Sites of a table with only the three mandatory
//! columns plus the peer address connect, and the head-end reaches an idle one by initiating
//! (the address comes from the row); the same with a table of all five columns. An
//! egroup that names a column its table lacks is a configuration error: `--check` and the
//! gateway's start say so naming the table and the column, its sites are refused with the
//! `schema` reason (never `unreachable`), and the other egroups' sites are unaffected.
//!
//! As non-root every test prints SKIP and passes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::gateway::Gateway;
use concentrator_e2e::mariadb::{self, MariaDb};
use concentrator_e2e::netns::{self, Netns, Wan, addr};
use concentrator_e2e::strongswan::{self, Charon, Connection};
use concentrator_e2e::topology::{GW_ADDR, GW_HOST, GW_ID, GW_LAN};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq, scratch, tools};
use concentrator_gateway::sitedb::SiteStore;

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");
const TIMEOUT: Duration = Duration::from_secs(30);

/// A site: the egroup it belongs to (its peer-ID domain and the second octet of its subnet)
/// and its number.
#[derive(Clone, Copy)]
struct SiteId {
    egroup: &'static str,
    octet: u8,
    n: u8,
}

impl SiteId {
    const fn new(egroup: &'static str, octet: u8, n: u8) -> Self {
        Self { egroup, octet, n }
    }
    fn peer_id(self) -> String {
        format!("site{}.{}.example", self.n, self.egroup)
    }
    fn wan(self) -> String {
        format!("192.0.2.{}", u16::from(self.octet) * 10 + u16::from(self.n))
    }
    fn lan(self) -> String {
        format!("10.{}.{}.0/24", self.octet, self.n)
    }
    fn host(self) -> String {
        format!("10.{}.{}.1", self.octet, self.n)
    }
    fn psk(self) -> String {
        format!("psk-of-{}", self.peer_id())
    }
}

const MIN_1: SiteId = SiteId::new("min", 1, 1);
const MIN_2: SiteId = SiteId::new("min", 1, 2);
const FULL_1: SiteId = SiteId::new("full", 3, 1);
const FULL_2: SiteId = SiteId::new("full", 3, 2);
const BROKEN_1: SiteId = SiteId::new("broken", 4, 1);

/// The two tables, in the users' own shapes.
async fn fill(db: &MariaDb) -> Result<()> {
    let store = SiteStore::open_url(&db.url(), Duration::from_secs(5)).await?;
    let SiteStore::MySql(p) = &store else {
        anyhow::bail!("not MySQL")
    };
    for ddl in [
        "CREATE TABLE branch_min (ident VARCHAR(255) PRIMARY KEY, secret VARBINARY(255), \
         lan VARCHAR(64), wan VARCHAR(64))",
        "CREATE TABLE branch_full (ident VARCHAR(255) PRIMARY KEY, secret VARBINARY(255), \
         lan VARCHAR(64), wan VARCHAR(64), wan_backup VARCHAR(64))",
    ] {
        sqlx::query(ddl).execute(p).await?;
    }
    for s in [MIN_1, MIN_2, BROKEN_1] {
        sqlx::query("INSERT INTO branch_min VALUES (?, ?, ?, ?)")
            .bind(s.peer_id())
            .bind(s.psk())
            .bind(s.lan())
            .bind(s.wan())
            .execute(p)
            .await?;
    }
    for s in [FULL_1, FULL_2] {
        sqlx::query("INSERT INTO branch_full VALUES (?, ?, ?, ?, ?)")
            .bind(s.peer_id())
            .bind(s.psk())
            .bind(s.lan())
            .bind(s.wan())
            .bind("192.0.2.250")
            .execute(p)
            .await?;
    }
    store.close().await;
    Ok(())
}

/// Three egroups, each with its own base eroute: `min` over the four-column table (no
/// backup address column, left unnamed), `full` over the five-column table with every
/// column named, and `broken` over the four-column table naming a backup column it lacks.
fn write_config(dir: &Path, url: &str) -> Result<()> {
    // A URL with a password comes from a Secret (an inline one is refused).
    std::fs::create_dir_all(dir.join("secrets/sitedb"))?;
    std::fs::write(dir.join("secrets/sitedb/url"), url)?;
    let mut yaml = String::new();
    for (egroup, octet, role, table, backup) in [
        ("min", 1, "Both", "branch_min", ""),
        (
            "full",
            3,
            "Both",
            "branch_full",
            "      backupPeerAddress: wan_backup\n",
        ),
        (
            "broken",
            4,
            "Responder",
            "branch_min",
            "      backupPeerAddress: wan_backup\n",
        ),
    ] {
        yaml.push_str(&format!(
            "---\napiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: {egroup}\n\
             spec:\n  localSubnet: {GW_LAN}\n  remoteSubnet: 10.{octet}.0.0/16\n\
             \x20 peerId: \"*.{egroup}.example\"\n  localId: {GW_ID}\n  role: {role}\n\
             ---\napiVersion: vpn.concentrator.io/v1alpha1\nkind: Egroup\nmetadata:\n  name: {egroup}\n\
             spec:\n  eroute: {egroup}\n  remoteSubnetPrefix: 24\n  database:\n    urlSecretRef: {{name: sitedb, key: url}}\n\
             \x20   timeout: 2s\n    table: {table}\n    columns:\n      peerId: ident\n      psk: secret\n\
             \x20     remoteSubnet: lan\n      peerAddress: wan\n{backup}"
        ));
    }
    std::fs::write(dir.join("egroups.yaml"), yaml)?;
    Ok(())
}

fn site(wan_net: &Wan, s: SiteId) -> Result<(Netns, Charon)> {
    let ns = wan_net.host(&format!("et{}{}", s.octet, s.n), &s.wan(), Some(&s.host()))?;
    let charon = Charon::start(&ns)?;
    let mut c = Connection::new(
        "gw",
        addr(&s.wan()),
        addr(GW_ADDR),
        &s.psk(),
        vec![s.lan().parse()?],
        vec![GW_LAN.parse()?],
    );
    c.local_id = s.peer_id();
    c.remote_id = GW_ID.to_owned();
    charon.load(&[c])?;
    Ok((ns, charon))
}

#[test]
fn egroups_over_tables_of_their_own_shape_and_a_missing_column_named_as_such() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, mariadb::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let db = MariaDb::start()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(fill(&db))?;
    // The server's unix socket: the namespaces share the file system, not the loopback.
    let url = format!(
        "mysql://{}:{}@localhost/{}?socket={}",
        mariadb::USER,
        db.password(),
        mariadb::DATABASE,
        db.socket_path().display()
    );
    let dir = scratch::dir("egroup-tables")?;
    let config = dir.path().join("gw-config");
    write_config(&config, &url)?;

    // --check reads the tables: the broken egroup is a configuration error naming the
    // table and the column, the others fit.
    let check = std::process::Command::new(BIN)
        .args(["--config-dir", config.to_str().context("path")?, "--check"])
        .args([
            "--data-dir",
            dir.path().join("check-data").to_str().context("path")?,
        ])
        .output()?;
    let (out, err) = (
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr),
    );
    ensure!(
        check.status.code() == Some(2),
        "--check: {:?}\n{out}\n{err}",
        check.status
    );
    ensure!(
        err.contains("egroup broken")
            && err.contains("'branch_min'")
            && err.contains("no column 'wan_backup' (spec.database.columns.backupPeerAddress)"),
        "--check stderr: {err}"
    );
    ensure!(
        out.contains("egroup min: site table 'branch_min' fits")
            && out.contains("egroup full: site table 'branch_full' fits"),
        "--check stdout: {out}"
    );
    ensure!(
        !format!("{out}{err}").contains(db.password()),
        "--check shows the password"
    );

    let wan_net = Wan::new()?;
    let gw = wan_net.host("etgw", GW_ADDR, Some(GW_HOST))?;
    let gateway = Gateway::start(&gw, Path::new(BIN), dir.path(), "gw", GW_ADDR, &[])?;
    let said_at_start = "site table does not fit the Egroup";
    wait::until("the gateway to name the missing column", TIMEOUT, || {
        Ok(if logs::contains(&gateway.log, said_at_start) {
            Probe::Ready(())
        } else {
            Probe::pending(gateway.log_tail(10))
        })
    })?;
    let metric = |name: &str| concentrator_e2e::gateway::metric(&gw, name);

    // The responder path on both healthy tables; the sites stay up while the others run.
    let mut up = Vec::new();
    for s in [MIN_1, FULL_1] {
        let (ns, charon) = site(&wan_net, s)?;
        charon.initiate("gw").with_context(|| {
            format!(
                "{}: {}\n{}",
                s.peer_id(),
                charon.log_tail(20),
                gateway.log_tail(20)
            )
        })?;
        ns.wait_reachable(Some(addr(&s.host())), addr(GW_HOST), TIMEOUT)
            .with_context(|| format!("{} -> head-end", s.peer_id()))?;
        gw.wait_reachable(Some(addr(GW_HOST)), addr(&s.host()), TIMEOUT)
            .with_context(|| format!("head-end -> {}", s.peer_id()))?;
        up.push((ns, charon));
    }
    // The initiator path, on both tables: an idle site is reached by the head-end at the
    // address in its row.
    for s in [MIN_2, FULL_2] {
        let (ns, charon) = site(&wan_net, s)?;
        gw.wait_reachable(Some(addr(GW_HOST)), addr(&s.host()), TIMEOUT)
            .with_context(|| format!("head-end -> idle {}\n{}", s.peer_id(), gateway.log_tail(30)))?;
        ns.wait_reachable(Some(addr(&s.host())), addr(GW_HOST), TIMEOUT)?;
        up.push((ns, charon));
    }

    // The broken egroup's site is refused, counted as a schema failure.
    let (_broken_ns, broken) = site(&wan_net, BROKEN_1)?;
    let _ = broken.initiate("gw");
    broken
        .wait_logged("AUTHENTICATION_FAILED", TIMEOUT)
        .with_context(|| gateway.log_tail(30))?;
    let failures = |egroup: &str, reason: &str| {
        metric(&format!(
            "concentrator_gateway_egroup_lookup_failures_total{{egroup=\"{egroup}\",reason=\"{reason}\"}}"
        ))
    };
    ensure!(failures("broken", "schema")? >= 1.0, "{}", gateway.log_tail(30));
    for egroup in ["broken", "min", "full"] {
        for reason in ["unreachable", "malformed", "query"] {
            ensure!(failures(egroup, reason)? == 0.0, "{egroup} counted {reason}");
        }
    }
    ensure!(
        logs::contains(&gateway.log, "no column 'wan_backup'"),
        "the column is named in the log"
    );
    let text = std::fs::read_to_string(&gateway.log)?;
    ensure!(
        text.matches(said_at_start).count() == 1,
        "the configuration error is logged once:\n{text}"
    );
    ensure!(
        !text.contains(db.password()),
        "the gateway log shows the password"
    );

    concentrator_e2e::gateway::wait_metric(&gw, "concentrator_gateway_ike_sas_established", 4.0, TIMEOUT)?;
    let tunnels = gw.run(BIN, &["tunnels"])?;
    for s in [MIN_1, MIN_2, FULL_1, FULL_2] {
        ensure!(
            tunnels.contains(&s.peer_id()),
            "{} missing from:\n{tunnels}",
            s.peer_id()
        );
    }
    ensure!(!tunnels.contains(&BROKEN_1.peer_id()), "{tunnels}");
    Ok(())
}
