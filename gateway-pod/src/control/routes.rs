//! Routes to the TUN device: the kernel sends a site's traffic to us.
//!
//! The IKE task keeps the count of CHILD SAs (and traps) per subnet in [`Routes`] and only
//! queues a change when a subnet gains its first holder or loses its last. The changes are
//! made over netlink by a task of their own, so that the task that owns all IKE state never
//! waits for the kernel (it used to run `ip route` through a blocking process per route).
//! One channel and one consumer: the changes for a subnet reach the kernel in the order the
//! IKE task made them.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

/// A change for the installer task.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// `ip route replace NET dev TUN`.
    Replace(IpNet),
    /// `ip route del NET dev TUN`.
    Delete(IpNet),
}

impl Change {
    fn net(self) -> IpNet {
        match self {
            Self::Replace(net) | Self::Delete(net) => net,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Replace(_) => "replace",
            Self::Delete(_) => "del",
        }
    }
}

/// The routes the IKE task holds, counted per subnet; the kernel's side runs on the installer
/// task.
pub(super) struct Routes {
    /// Holders (CHILD SAs, traps) per routed subnet: the route goes when the last one does.
    held: HashMap<IpNet, usize>,
    /// The subnets held as every eroute's sites in a fleet ([`Self::route_sites`]).
    sites: Vec<IpNet>,
    changes: mpsc::UnboundedSender<Change>,
    installer: JoinHandle<()>,
}

impl Routes {
    /// Starts the installer task for routes to the device `tun_name`.
    pub(super) fn start(tun_name: String) -> Self {
        let (changes, rx) = mpsc::unbounded_channel();
        Self {
            held: HashMap::new(),
            sites: Vec::new(),
            changes,
            installer: tokio::spawn(install(tun_name, rx)),
        }
    }

    /// One more holder of `net`: routed to the TUN device with the first.
    pub(super) fn hold(&mut self, net: IpNet) {
        let n = self.held.entry(net).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.send(Change::Replace(net));
        }
    }

    /// One holder of `net` fewer: the route goes with the last.
    pub(super) fn release(&mut self, net: IpNet) {
        if let Entry::Occupied(mut n) = self.held.entry(net) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
                self.send(Change::Delete(net));
            }
        }
    }

    /// Holds `nets` (sorted) as the sites' subnets from now on, the new ones before the
    /// former ones go, so a subnet in both keeps its route throughout. True if they changed.
    pub(super) fn route_sites(&mut self, nets: Vec<IpNet>) -> bool {
        if nets == self.sites {
            return false;
        }
        for net in &nets {
            self.hold(*net);
        }
        for net in std::mem::replace(&mut self.sites, nets) {
            self.release(net);
        }
        true
    }

    /// Removes every route still held and waits until the installer has made the changes.
    pub(super) async fn shutdown(self) {
        let Self {
            held,
            changes,
            sites: _,
            installer,
        } = self;
        for net in held.into_keys() {
            let _ = changes.send(Change::Delete(net));
        }
        // The installer ends once the channel is empty and closed.
        drop(changes);
        if let Err(e) = installer.await {
            tracing::warn!(error = %e, "route installer failed");
        }
    }

    fn send(&self, change: Change) {
        if self.changes.send(change).is_err() {
            tracing::warn!(?change, "route installer gone: route not changed");
        }
    }
}

/// The installer task: makes each change in turn until the IKE task closes the channel.
/// Failures are logged and the next change goes on.
async fn install(tun_name: String, mut changes: mpsc::UnboundedReceiver<Change>) {
    let mut netlink = None;
    while let Some(change) = changes.recv().await {
        let (net, verb) = (change.net(), change.verb());
        if netlink.is_none() {
            match Netlink::open(&tun_name).await {
                Ok(n) => netlink = Some(n),
                Err(e) => {
                    tracing::warn!(%net, verb, error = %e, "route change failed");
                    continue;
                }
            }
        }
        if let Some(n) = &netlink
            && let Err(e) = n.apply(change).await
        {
            tracing::warn!(%net, verb, error = %e, "route change failed");
        }
    }
    if let Some(n) = netlink {
        n.connection.abort();
    }
}

/// Why a route could not be changed.
#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("no device {0}")]
    NoDevice(String),
    #[error(transparent)]
    Netlink(#[from] rtnetlink::Error),
}

/// A netlink socket in the gateway's network namespace, and the TUN device's index.
struct Netlink {
    handle: Handle,
    connection: JoinHandle<()>,
    tun_index: u32,
}

impl Netlink {
    async fn open(tun_name: &str) -> Result<Self, RouteError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(RouteError::Socket)?;
        let connection = tokio::spawn(connection);
        let mut links = std::pin::pin!(handle.link().get().match_name(tun_name).execute());
        let link = links.next().await;
        match link {
            Some(Ok(link)) => Ok(Self {
                handle,
                connection,
                tun_index: link.header.index,
            }),
            other => {
                connection.abort();
                match other {
                    Some(Err(e)) => Err(e.into()),
                    _ => Err(RouteError::NoDevice(tun_name.to_owned())),
                }
            }
        }
    }

    /// Makes `change` as `ip route` would. Neither direction fails for a state that is
    /// already there, which the counts in [`Routes`] cannot know about: a replace creates the
    /// route or takes over one of the same prefix (left by a gateway that did not shut down
    /// cleanly, or made by hand), so it never fails with EEXIST as a plain add would; and a
    /// route already gone when we delete it (removed by hand, or with its device) is what we
    /// wanted, so ESRCH is no failure either.
    async fn apply(&self, change: Change) -> Result<(), RouteError> {
        match change {
            Change::Replace(net) => {
                let mut route = self.route(net);
                // As `ip route replace`: a route of ours (boot), to the device (link scope).
                route.header.protocol = RouteProtocol::Boot;
                route.header.scope = RouteScope::Link;
                Ok(self.handle.route().add(route).replace().execute().await?)
            }
            Change::Delete(net) => {
                let mut route = self.route(net);
                // As `ip route del`: whatever protocol, scope and type the route has.
                route.header.protocol = RouteProtocol::Unspec;
                route.header.scope = RouteScope::NoWhere;
                route.header.kind = RouteType::Unspec;
                match self.handle.route().del(route).execute().await {
                    Err(rtnetlink::Error::NetlinkError(e))
                        if e.to_io().raw_os_error() == Some(libc::ESRCH) =>
                    {
                        tracing::debug!(%net, "route already gone");
                        Ok(())
                    }
                    r => Ok(r?),
                }
            }
        }
    }

    /// `net` through the TUN device, in the main table.
    fn route(&self, net: IpNet) -> RouteMessage {
        match net {
            IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(self.tun_index)
                .build(),
            IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(self.tun_index)
                .build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn the_sites_routes_follow_the_configuration_beside_the_tunnels_own() {
        // No such device: the installer only logs its failures.
        let mut routes = Routes::start("no-such-tun".into());
        routes.hold("10.1.0.0/16".parse().unwrap());
        assert!(routes.route_sites(nets(&["10.1.0.0/16", "10.2.0.0/16"])));
        assert!(routes.route_sites(nets(&["10.2.0.0/16", "10.3.0.0/16"])));
        assert!(!routes.route_sites(nets(&["10.2.0.0/16", "10.3.0.0/16"])));
        let mut held: Vec<_> = routes.held.iter().map(|(n, c)| (n.to_string(), *c)).collect();
        held.sort();
        // The tunnel's route stays when the sites' one goes; the others follow the list.
        assert_eq!(
            held,
            [
                ("10.1.0.0/16".to_owned(), 1),
                ("10.2.0.0/16".to_owned(), 1),
                ("10.3.0.0/16".to_owned(), 1)
            ]
        );
        assert!(routes.route_sites(Vec::new()));
        assert_eq!(routes.held.len(), 1);
        routes.shutdown().await;
    }
}
