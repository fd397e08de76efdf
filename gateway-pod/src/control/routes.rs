//! Routes to the TUN device: the kernel sends a site's traffic to us.
//!
//! The IKE task keeps the count of CHILD SAs (and traps) per subnet in [`Routes`] and only
//! changes the kernel's routes when a subnet gains its first holder or loses its last.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use ipnet::IpNet;

/// The routes the IKE task holds, counted per subnet.
pub(super) struct Routes {
    /// Holders (CHILD SAs, traps) per routed subnet: the route goes when the last one does.
    held: HashMap<IpNet, usize>,
    tun_name: String,
}

impl Routes {
    /// Routes to the device `tun_name`.
    pub(super) fn start(tun_name: String) -> Self {
        Self {
            held: HashMap::new(),
            tun_name,
        }
    }

    /// One more holder of `net`: routed to the TUN device with the first.
    pub(super) fn hold(&mut self, net: IpNet) {
        let n = self.held.entry(net).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.route("replace", net);
        }
    }

    /// One holder of `net` fewer: the route goes with the last.
    pub(super) fn release(&mut self, net: IpNet) {
        if let Entry::Occupied(mut n) = self.held.entry(net) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
                self.route("del", net);
            }
        }
    }

    /// Removes every route still held.
    pub(super) async fn shutdown(self) {
        for net in self.held.keys() {
            self.route("del", *net);
        }
    }

    /// `ip route <verb> <net> dev <tun>`: the kernel sends the site's traffic to our TUN.
    fn route(&self, verb: &str, net: IpNet) {
        let out = std::process::Command::new("ip")
            .args(["route", verb, &net.to_string(), "dev", &self.tun_name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(
                %net,
                verb,
                stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                "route change failed"
            ),
            Err(e) => tracing::warn!(%net, verb, error = %e, "cannot run ip"),
        }
    }
}
