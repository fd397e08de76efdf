//! strongSwan sites in front of a fleet: one namespace and one charon per site on the WAN,
//! each addressing the front with strongSwan's defaults (IKE from port 500, floating to 4500
//! when NAT is detected, which it is: the pod behind the front sees its own address where
//! the site wrote the front's).
//!
//! Site `n` (1, 2, ...) follows [`crate::topology`]: WAN 192.0.2.{10 + n}, LAN 10.1.{n}.0/24
//! (its own address 10.1.{n}.1 on `lo`), identity `site{n}.sites.example.com`, and asks for
//! the head-end LAN [`GW_LAN`] behind the gateway identity [`GW_ID`].

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, Wan, addr, net};
use crate::strongswan::{Charon, CharonOptions, Connection};
use crate::topology::{GW_ID, GW_LAN, site_host, site_lan, site_wan};

/// The domain of the sites' identities (an Egroup's `peerId: "*.sites.example.com"`).
pub const SITE_DOMAIN: &str = "sites.example.com";

/// The name of the site's connection (and its child) in charon.
pub const CONNECTION: &str = "gw";

/// Site `n`'s IKE identity, `site{n}.sites.example.com`.
pub fn peer_id(n: usize) -> String {
    format!("site{n}.{SITE_DOMAIN}")
}

/// One site: its namespace and its charon, the connection loaded, not initiated.
#[derive(Debug)]
pub struct Site {
    n: usize,
    psk: String,
    connection: Connection,
    // Dropped before the namespace it runs in.
    charon: Charon,
    ns: Netns,
}

/// How a site departs from strongSwan's defaults (none by default).
#[derive(Clone, Debug, Default)]
pub struct SiteOptions {
    /// Lines for charon's `strongswan.conf` section (e.g. `retransmit_tries = 2`).
    pub charon: Vec<String>,
    /// Lines for the connection (e.g. `dpd_delay = 1s`).
    pub connection: Vec<String>,
    /// Lines for its child (e.g. `dpd_action = restart`).
    pub child: Vec<String>,
    /// The IKE proposal instead of the default (AES-GCM).
    pub ike_proposal: Option<String>,
}

impl SiteOptions {
    /// Dead peer detection every second, a dead peer noticed after ~3 s, and the tunnel
    /// started again then: sites that find out on their own when the gateway lost them.
    pub fn quick_dpd() -> Self {
        Self {
            charon: [
                "retransmit_timeout = 1.0",
                "retransmit_base = 1.0",
                "retransmit_tries = 2",
            ]
            .map(str::to_owned)
            .to_vec(),
            connection: vec!["dpd_delay = 1s".to_owned()],
            child: vec!["dpd_action = restart".to_owned()],
            ike_proposal: None,
        }
    }
}

impl Site {
    /// Site `n` on `wan`, its connection to the gateway at `front` with `psk` loaded.
    pub fn start(wan: &Wan, front: IpAddr, n: usize, psk: &str) -> Result<Self> {
        Self::start_with(wan, front, n, psk, &SiteOptions::default())
    }

    /// [`Self::start`] with `options`.
    pub fn start_with(wan: &Wan, front: IpAddr, n: usize, psk: &str, options: &SiteOptions) -> Result<Self> {
        let ns = wan.host(&format!("site{n}"), &site_wan(n), Some(&site_host(n)))?;
        let charon = Charon::start_with(
            &ns,
            &CharonOptions {
                extra_settings: options.charon.clone(),
                ..CharonOptions::default()
            },
        )?;
        let mut connection = Connection::new(
            CONNECTION,
            addr(&site_wan(n)),
            front,
            psk,
            vec![net(&site_lan(n))],
            vec![net(GW_LAN)],
        );
        connection.local_id = peer_id(n);
        connection.remote_id = GW_ID.to_owned();
        connection.extra = options.connection.clone();
        if let Some(p) = &options.ike_proposal {
            connection.ike_proposal.clone_from(p);
        }
        connection.child_extra = options.child.clone();
        charon.load(std::slice::from_ref(&connection))?;
        Ok(Self {
            n,
            psk: psk.to_owned(),
            connection,
            charon,
            ns,
        })
    }

    /// The site's number.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The site's IKE identity.
    pub fn peer_id(&self) -> String {
        peer_id(self.n)
    }

    /// The site's PSK.
    pub fn psk(&self) -> &str {
        &self.psk
    }

    /// The site's namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The site's charon.
    pub fn charon(&self) -> &Charon {
        &self.charon
    }

    /// The connection loaded into charon.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The site's WAN address.
    pub fn wan_addr(&self) -> IpAddr {
        addr(&site_wan(self.n))
    }

    /// The site's own address on its LAN.
    pub fn host(&self) -> IpAddr {
        addr(&site_host(self.n))
    }

    /// Initiates the connection; charon reports within 10 s whether it is up.
    pub fn initiate(&self) -> Result<()> {
        self.charon
            .initiate(CONNECTION)
            .with_context(|| format!("site {}", self.n))
    }

    /// Drops whatever IKE SA charon has for the connection, without waiting for the peer
    /// (a failed or pending attempt), so that the next [`Self::initiate`] starts afresh.
    pub fn reset(&self) -> Result<()> {
        let out = crate::process::output(
            self.charon.swanctl_command().args([
                "--terminate",
                "--ike",
                CONNECTION,
                "--force",
                "--timeout",
                "2",
            ]),
            crate::process::COMMAND_TIMEOUT,
        )?;
        // "no matching IKE_SAs" is fine: nothing to drop.
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !text.contains("no matching") {
            bail!("swanctl --terminate in site {}: {text}", self.n);
        }
        Ok(())
    }

    /// Whether charon has the connection's IKE SA ESTABLISHED with its child INSTALLED.
    pub fn is_established(&self) -> Result<bool> {
        Ok(self.charon.list_sas()?.iter().any(|s| {
            s.name == CONNECTION
                && s.state == "ESTABLISHED"
                && s.children.iter().any(|c| c.state == "INSTALLED")
        }))
    }

    /// Waits until a ping from the site's LAN address reaches `to` through the tunnel.
    pub fn wait_ping(&self, to: IpAddr, timeout: Duration) -> Result<()> {
        self.ns
            .wait_reachable(Some(self.host()), to, timeout)
            .with_context(|| format!("site {} -> {to}", self.n))
    }

    /// The tail of charon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.charon.log_tail(lines)
    }
}

/// Starts sites `(n, psk)` of `sites` on `wan` toward `front`, `threads` at a time.
pub fn start_all(wan: &Wan, front: IpAddr, sites: &[(usize, String)], threads: usize) -> Result<Vec<Site>> {
    start_all_with(wan, front, sites, threads, &SiteOptions::default())
}

/// [`start_all`] with `options` for every site.
pub fn start_all_with(
    wan: &Wan,
    front: IpAddr,
    sites: &[(usize, String)],
    threads: usize,
    options: &SiteOptions,
) -> Result<Vec<Site>> {
    in_parallel(sites, threads, |(n, psk)| {
        Site::start_with(wan, front, *n, psk, options)
    })
}

/// `f` on every item, on at most `threads` threads, results in item order; the first error
/// (by item order) wins.
pub fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let per = items.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|chunk| {
                let f = &f;
                scope.spawn(move || chunk.iter().map(f).collect::<Vec<Result<R>>>())
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            match h.join() {
                Ok(results) => out.extend(results),
                Err(_) => bail!("a worker thread panicked"),
            }
        }
        out.into_iter().collect()
    })
}
