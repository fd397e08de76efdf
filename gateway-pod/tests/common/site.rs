//! A strongSwan site and our gateway, each in its own namespace on one WAN, the gateway with
//! one static eroute for the site: what the gateway's tests against strongSwan share.

use std::time::Duration;

use anyhow::{Context, Result};
use concentrator_e2e::netns::{Netns, Wan, addr};
use concentrator_e2e::process::Daemon;
use concentrator_e2e::scratch;
use concentrator_e2e::strongswan::{Charon, ChildSa, Connection};
use concentrator_e2e::topology::{
    GW_ADDR, GW_HOST, GW_ID, GW_LAN, SITE_ADDR, SITE_HOST, SITE_ID, SITE_LAN, site_connection,
};

use super::StaticEroute;

/// How long a test waits for one thing to happen.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(20);

/// The gateway's eroute for the site, its PSK as a Secret file.
pub(crate) fn eroute<'a>(
    ike: &'a str,
    esp: &'a str,
    psk: &'a str,
    o: &GatewayOptions<'a>,
) -> StaticEroute<'a> {
    StaticEroute {
        name: "site-a",
        local_subnet: GW_LAN,
        remote_subnet: SITE_LAN,
        peer_id: SITE_ID,
        local_id: GW_ID,
        // As initiator the gateway keeps the tunnel to the site's address up itself.
        initiate_to: o.initiator.then_some(SITE_ADDR),
        ike,
        esp,
        dpd: o.dpd,
        lifetimes: o.lifetimes,
        esp_extra: o.esp_extra.unwrap_or(""),
        psk,
    }
}

/// The site (charon, started, nothing loaded) and the gateway (serving); dropped in field
/// order.
pub(crate) struct SiteGateway {
    pub(crate) wan: Wan,
    pub(crate) site: Netns,
    pub(crate) gw: Netns,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) gateway: Daemon,
    /// `None` once killed.
    pub(crate) charon: Option<Charon>,
}

/// Options of [`SiteGateway::start_with`].
#[derive(Default)]
pub(crate) struct GatewayOptions<'a> {
    /// The eroute's `ike.dpdInterval` (default 30s).
    pub(crate) dpd: Option<&'a str>,
    /// Extra command-line arguments.
    pub(crate) args: &'a [&'a str],
    /// The eroute has role Initiator and the site's address: the gateway connects.
    pub(crate) initiator: bool,
    /// The eroute's IKE and ESP lifetimes (default 4h and 1h).
    pub(crate) lifetimes: Option<(&'a str, &'a str)>,
    /// More lines of the eroute's `esp` section, each `    key: value\n`.
    pub(crate) esp_extra: Option<&'a str>,
}

impl SiteGateway {
    /// Namespaces `{tag}site` and `{tag}gw`, the gateway with [`eroute`] for `ike`, `esp` and
    /// `psk`.
    pub(crate) fn start(tag: &str, ike: &str, esp: &str, psk: &str) -> Result<Self> {
        Self::start_with(tag, ike, esp, psk, &GatewayOptions::default())
    }

    /// As [`Self::start`], with options.
    pub(crate) fn start_with(
        tag: &str,
        ike: &str,
        esp: &str,
        psk: &str,
        o: &GatewayOptions<'_>,
    ) -> Result<Self> {
        let wan = Wan::new()?;
        let site = wan.host(&format!("{tag}site"), SITE_ADDR, Some(SITE_HOST))?;
        let gw = wan.host(&format!("{tag}gw"), GW_ADDR, Some(GW_HOST))?;
        site.wait_reachable(None, addr(GW_ADDR), Duration::from_secs(5))?;
        let dir = scratch::dir("ike-gateway")?;
        eroute(ike, esp, psk, o).write(&dir.path().join("config"))?;
        let gateway = super::start_gateway(&gw, "gateway", dir.path(), GW_ADDR, o.args)?;
        let charon = Charon::start(&site)?;
        Ok(Self {
            wan,
            site,
            gw,
            dir,
            gateway,
            charon: Some(charon),
        })
    }

    /// The site's connection to the gateway, showing identity `local_id`.
    pub(crate) fn connection(&self, ike: &str, esp: &str, psk: &str, local_id: &str) -> Connection {
        let mut c = site_connection("gw", SITE_ADDR, ike, esp, psk);
        c.local_id = local_id.to_owned();
        c
    }

    /// The site's charon, while it runs.
    pub(crate) fn charon(&self) -> &Charon {
        self.charon.as_ref().expect("charon is running")
    }

    /// Kills charon (SIGKILL): the site goes silent without deleting anything.
    pub(crate) fn kill_charon(&mut self) {
        self.charon = None;
    }

    /// The tails of the gateway's and charon's logs.
    pub(crate) fn logs(&self) -> String {
        format!(
            "gateway log:\n{}\ncharon log:\n{}",
            self.gateway.log_tail(40),
            self.charon.as_ref().map(|c| c.log_tail(40)).unwrap_or_default()
        )
    }

    /// `concentrator-gateway tunnels` in the gateway namespace (admin API on its loopback).
    pub(crate) fn tunnels(&self) -> Result<String> {
        self.gw.run(super::gateway_bin(), &["tunnels"])
    }

    /// A metric value from `/metrics` of the gateway.
    pub(crate) fn metric(&self, name: &str) -> Result<f64> {
        concentrator_e2e::gateway::metric(&self.gw, name)
    }

    /// Waits until the gateway's metric `name` is `want`.
    pub(crate) fn wait_metric(&self, name: &str, want: f64) -> Result<()> {
        concentrator_e2e::gateway::wait_metric(&self.gw, name, want, TIMEOUT)
    }

    /// A ping from the site's LAN address to the gateway's crosses the tunnel.
    pub(crate) fn ping_from_site(&self) -> Result<()> {
        self.site
            .wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
            .with_context(|| self.logs())
    }

    /// A ping from the gateway's LAN address to the site's crosses the tunnel.
    pub(crate) fn ping_from_gw(&self) -> Result<()> {
        self.gw
            .wait_reachable(Some(addr(GW_HOST)), addr(SITE_HOST), TIMEOUT)
            .with_context(|| self.logs())
    }

    /// strongSwan's CHILD SA before and after a paced TCP stream of 12 s from the site's LAN
    /// (`from_site`) or the gateway's, which must arrive intact.
    pub(crate) fn paced_stream(&self, from_site: bool) -> Result<(ChildSa, ChildSa)> {
        let first = self.charon().child_sa("gw", "gw")?.context("child")?;
        let (from, src, to, dst) = if from_site {
            (&self.site, SITE_HOST, &self.gw, GW_HOST)
        } else {
            (&self.gw, GW_HOST, &self.site, SITE_HOST)
        };
        super::paced_tcp_transfer(from, src, to, dst, self.dir.path(), Duration::from_secs(12))
            .with_context(|| self.logs())?;
        let now = self
            .charon()
            .child_sa("gw", "gw")?
            .context("child after rekeys")?;
        Ok((first, now))
    }

    /// Loads `c` into charon, initiates it and waits until the site's tunnel carries a ping.
    pub(crate) fn establish(&self, c: &Connection) -> Result<()> {
        self.charon().load(std::slice::from_ref(c))?;
        self.charon().initiate(&c.name).with_context(|| self.logs())?;
        self.charon()
            .wait_established(&c.name, &c.name, TIMEOUT)
            .with_context(|| self.logs())?;
        self.ping_from_site()
    }
}
