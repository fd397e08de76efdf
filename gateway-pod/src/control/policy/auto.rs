//! Eroutes this gateway keeps up by initiating (role `Initiator`), or connects when traffic
//! needs them (role `Both`): when to connect, backoff after failures, and REDIRECTs
//! (RFC 5685) to follow.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_crds::eroute::Role;
use concentrator_ike::redirect::GatewayId;

use crate::config::Config;
use crate::control::claims::{CLAIM_WAIT, HELD_ELSEWHERE_RECHECK, claimed_peer, eroute_site};
use crate::control::driver::Driver;
use crate::control::events::IkeSaRecord;
use crate::control::ike_config::id_from_str;

/// First and longest wait before reconnecting an eroute we keep up.
const RECONNECT_MIN: Duration = Duration::from_secs(2);
const RECONNECT_MAX: Duration = Duration::from_secs(60);
/// The IKE port of peers we initiate to.
pub(super) const IKE_PORT: u16 = 500;

/// Redirects followed in a row without an SA coming up: beyond, the eroute goes back to
/// `peerAddress` with its backoff (RFC 5685 §9: a client must guard against redirect loops).
const MAX_REDIRECTS: u32 = 5;

/// The eroutes we keep up, and the SAs we started on them (none: an IKE worker other than
/// the first, which starts no SA of its own).
#[derive(Default)]
pub(in crate::control) struct AutoConnects {
    /// By eroute name.
    eroutes: HashMap<String, AutoConnect>,
    /// The SA ids we started, to their eroute.
    initiated: HashMap<u64, String>,
}

/// An eroute this gateway keeps up by initiating (role `Initiator`).
struct AutoConnect {
    /// The SA in progress or up.
    id: Option<u64>,
    next_attempt: Instant,
    backoff: Duration,
    /// Where the next attempt goes instead of `peerAddress`: a gateway that redirected us.
    redirect: Option<Redirect>,
    /// Redirects followed since the last SA of this eroute was established.
    redirects: u32,
    /// Role `Both`: connect when traffic needs the tunnel (an acquire), like strongSwan's
    /// `start_action = trap`, rather than keeping it up.
    on_demand: bool,
    /// Traffic is waiting for the tunnel of an on-demand eroute.
    demanded: bool,
}

/// The eroutes of `config` we initiate (to a `peerAddress`, with a static key), each with
/// whether only on demand (role `Both`).
fn wanted(config: &Config) -> impl Iterator<Item = (&str, bool)> {
    config
        .set
        .eroutes
        .iter()
        .filter(|(name, e)| {
            e.role != Role::Responder && e.peer_address.is_some() && config.static_psks.contains_key(*name)
        })
        .map(|(name, e)| (name.as_str(), e.role == Role::Both))
}

impl AutoConnect {
    fn new(on_demand: bool) -> Self {
        Self {
            id: None,
            next_attempt: Instant::now(),
            backoff: RECONNECT_MIN,
            redirect: None,
            redirects: 0,
            on_demand,
            demanded: false,
        }
    }

    /// When this eroute should connect next, if it should.
    fn due_at(&self) -> Option<Instant> {
        (self.id.is_none() && (!self.on_demand || self.demanded)).then_some(self.next_attempt)
    }
}

/// A REDIRECT (RFC 5685) to follow on the next attempt.
struct Redirect {
    to: IpAddr,
    /// The gateway that sent it: named in N(REDIRECTED_FROM) (§4.1).
    from: GatewayId,
}

impl AutoConnects {
    /// The eroutes of `config` that may initiate to a `peerAddress` with a static key.
    pub(in crate::control) fn new(config: &Config) -> Self {
        Self {
            eroutes: wanted(config)
                .map(|(name, on_demand)| (name.to_owned(), AutoConnect::new(on_demand)))
                .collect(),
            initiated: HashMap::new(),
        }
    }

    /// A reload: eroutes that may initiate now and did not are added (due at once, or on
    /// traffic), those that went are dropped; the others keep their SA, backoff and redirect
    /// (an SA in progress or up runs on; the next attempt takes the new settings).
    pub(in crate::control) fn reconfigure(&mut self, config: &Config) {
        let mut next: HashMap<String, AutoConnect> = HashMap::new();
        for (name, on_demand) in wanted(config) {
            let mut a = self
                .eroutes
                .remove(name)
                .unwrap_or_else(|| AutoConnect::new(on_demand));
            a.on_demand = on_demand;
            next.insert(name.to_owned(), a);
        }
        self.eroutes = next;
    }

    /// Whether eroute `name` is one we keep up or connect on demand.
    pub(in crate::control) fn keeps(&self, name: &str) -> bool {
        self.eroutes.contains_key(name)
    }

    /// The names of the eroutes we keep up.
    pub(in crate::control) fn eroutes(&self) -> impl Iterator<Item = &String> {
        self.eroutes.keys()
    }

    /// When the next eroute should connect, if any should.
    pub(in crate::control) fn next_due(&self) -> Option<Instant> {
        self.eroutes.values().filter_map(AutoConnect::due_at).min()
    }

    /// The eroute SA `id` was started for, if we started it for one.
    pub(in crate::control) fn eroute_of(&self, id: u64) -> Option<&str> {
        self.initiated.get(&id).map(String::as_str)
    }

    /// SA `id` we started is up: its eroute's backoff and redirect count start over.
    pub(in crate::control) fn established(&mut self, id: u64) {
        if let Some(name) = self.initiated.get(&id)
            && let Some(a) = self.eroutes.get_mut(name)
        {
            a.backoff = RECONNECT_MIN;
            a.redirects = 0;
            a.demanded = false;
        }
    }

    /// The endpoint forgot SA `id` (it lingers a while after closing).
    pub(in crate::control) fn forget(&mut self, id: u64) {
        self.closed(id);
        self.initiated.remove(&id);
    }

    /// SA `id` of an eroute of ours closed (deleted, dead, failed): the eroute may connect
    /// again after its backoff, at once if kept up, on its next traffic if on demand.
    pub(in crate::control) fn closed(&mut self, id: u64) {
        let Some(name) = self.initiated.get(&id) else {
            return;
        };
        if let Some(a) = self.eroutes.get_mut(name)
            && a.id == Some(id)
        {
            a.id = None;
            a.demanded = false;
            a.next_attempt = Instant::now() + a.backoff;
            if a.on_demand {
                tracing::info!(eroute = %name, "tunnel is gone: connecting again when traffic needs it");
            } else {
                tracing::info!(eroute = %name, retry_in = ?a.backoff, "tunnel we keep up is gone");
            }
            a.backoff = (a.backoff * 2).min(RECONNECT_MAX);
        }
    }
}

impl Driver {
    /// Connects every eroute whose turn has come (at start, and again after its SA is gone).
    pub(in crate::control) fn connect_due(&mut self, now: Instant) {
        let due: Vec<String> = self
            .auto
            .eroutes
            .iter()
            .filter(|(_, a)| a.due_at().is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.connect(&name, now);
        }
    }

    fn connect(&mut self, name: &str, now: Instant) {
        if self.claims.is_some() {
            // In a fleet only the member that holds the eroute's claim keeps it up: the
            // attempt waits for the claim (`claimed_to_connect`), and is not made again
            // meanwhile.
            if let Some(a) = self.auto.eroutes.get_mut(name) {
                a.next_attempt = now + CLAIM_WAIT;
            }
            self.claim_to_connect(name);
            return;
        }
        self.connect_now(name, now);
    }

    /// The claim of eroute `name` (in a fleet) was decided: connect if it is ours, else
    /// look again later (the member holding it may go).
    pub(in crate::control) fn claimed_to_connect(&mut self, name: &str, ours: bool) {
        let now = Instant::now();
        if ours {
            self.connect_now(name, now);
        } else if let Some(a) = self.auto.eroutes.get_mut(name) {
            a.next_attempt = now + HELD_ELSEWHERE_RECHECK;
        }
    }

    fn connect_now(&mut self, name: &str, now: Instant) {
        // The configuration outlives this call; holding it apart from `self` lets the
        // helpers below take `&mut self`.
        let config = Arc::clone(&self.config);
        let Some(e) = config.set.eroutes.get(name) else {
            return;
        };
        let Some(psk) = config.static_psks.get(name) else {
            return;
        };
        let redirect = self.auto.eroutes.get_mut(name).and_then(|a| a.redirect.take());
        let Some(remote) = redirect
            .as_ref()
            .map(|r| r.to)
            .or_else(|| e.peer_address.as_deref().and_then(|a| a.parse::<IpAddr>().ok()))
            .map(|ip| SocketAddr::new(ip, IKE_PORT))
        else {
            tracing::warn!(eroute = %name, "peerAddress is not an IP address: cannot initiate");
            self.auto.eroutes.remove(name);
            return;
        };
        // A concrete peer ID is required of the responder; a pattern accepts any.
        let remote_id = e
            .peer_id
            .as_deref()
            .filter(|p| !p.contains(['*', '?']))
            .map(id_from_str);
        let mut config = self.configs.initiator(name, e, e.remote_subnet, remote_id);
        config.redirected_from = redirect.map(|r| r.from);
        let local = self.configs.local_addr();
        match self.endpoint.connect(
            Arc::new(config),
            psk.expose(),
            local,
            remote,
            now,
            &mut self.entropy,
        ) {
            Ok(id) => {
                tracing::info!(eroute = %name, %remote, "initiating");
                self.auto.initiated.insert(id, name.to_owned());
                let peer_id = e.peer_id.clone().unwrap_or_else(|| remote.ip().to_string());
                let site = self.claims.as_ref().map(|_| eroute_site(name, &claimed_peer(e)));
                let rec = IkeSaRecord {
                    eroute: Some(self.names.get(name)),
                    remote: Some(remote),
                    site,
                    ..IkeSaRecord::new(peer_id, now)
                };
                self.sas.insert(id, rec);
                if let Some(a) = self.auto.eroutes.get_mut(name) {
                    a.id = Some(id);
                }
            }
            Err(err) => {
                tracing::warn!(eroute = %name, error = %err, "cannot initiate");
                if let Some(a) = self.auto.eroutes.get_mut(name) {
                    a.next_attempt = now + a.backoff;
                    a.backoff = (a.backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
    }

    /// Traffic toward `dst` found no SA: if a static eroute of ours toward it is down,
    /// connect it (at once, or when its backoff after a failure ends). False if no eroute
    /// of ours is down toward `dst`.
    pub(in crate::control) fn demand(&mut self, dst: IpAddr, now: Instant) -> bool {
        let config = Arc::clone(&self.config);
        let ours = self.auto.eroutes.iter_mut().find(|(name, a)| {
            a.id.is_none()
                && config
                    .set
                    .eroutes
                    .get(*name)
                    .is_some_and(|e| e.remote_subnet.contains(&dst))
        });
        let Some((name, a)) = ours else {
            return false;
        };
        if !a.demanded {
            tracing::info!(eroute = %name, %dst, "traffic for a tunnel that is down: connecting");
        }
        a.demanded = true;
        if a.next_attempt <= now {
            let name = name.clone();
            self.connect(&name, now);
        }
        true
    }

    /// SA `id` of an eroute we keep up was redirected (RFC 5685: in IKE_SA_INIT, IKE_AUTH
    /// or an INFORMATIONAL of the established SA): the next attempt goes to the gateway
    /// named, at once. Only that attempt: when the SA there goes, the eroute returns to its
    /// `peerAddress` (in a fleet the virtual address, where a director picks a gateway
    /// again; the one we were sent to may be gone by then).
    pub(in crate::control) fn follow_redirect(&mut self, id: u64) {
        let Some(initiator) = self.endpoint.initiator(id) else {
            return;
        };
        let (Some(to), from) = (initiator.redirected_to().cloned(), initiator.path().1.ip()) else {
            return;
        };
        let Some(name) = self.auto.initiated.get(&id).cloned() else {
            return;
        };
        let Some(a) = self.auto.eroutes.get_mut(&name) else {
            return;
        };
        let to = match to {
            GatewayId::Ip(ip) if a.redirects < MAX_REDIRECTS => ip,
            GatewayId::Ip(ip) => {
                tracing::warn!(eroute = %name, to = %ip, redirects = a.redirects, "too many redirects in a row: back to peerAddress");
                self.gateway.metrics.count_ike_failure("redirect_loop");
                a.redirects = 0;
                return;
            }
            GatewayId::Fqdn(n) => {
                // Resolving would block the control loop; a fleet redirects to pod addresses.
                tracing::warn!(eroute = %name, to = %n, "redirected to a name: not followed, back to peerAddress");
                self.gateway.metrics.count_ike_failure("redirect_to_name");
                return;
            }
        };
        tracing::info!(eroute = %name, %from, %to, "redirected: connecting to the gateway named");
        a.redirects += 1;
        a.redirect = Some(Redirect {
            to,
            from: GatewayId::Ip(from),
        });
        // The old SA lingers in the endpoint (answering retransmissions); the eroute need
        // not wait for it.
        if a.id == Some(id) {
            a.id = None;
        }
        a.next_attempt = Instant::now();
        a.backoff = RECONNECT_MIN;
        a.demanded = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::config;

    fn eroute(subnet: &str, role: &str) -> String {
        format!(
            "localSubnet: 10.0.0.0/16\nremoteSubnet: {subnet}\npeerId: hq\npeerAddress: 192.0.2.9\n\
             role: {role}\npskSecretRef: {{name: k, key: psk}}\n"
        )
    }

    #[test]
    fn a_reload_keeps_the_sas_and_backoff_of_eroutes_that_stay() {
        let (a, b) = (
            eroute("172.16.0.0/24", "Initiator"),
            eroute("172.17.0.0/24", "Initiator"),
        );
        let old = config(&[("a", &a), ("b", &b)], &[], &[("a", "k"), ("b", "k")]);
        let mut auto = AutoConnects::new(&old);
        let up = auto.eroutes.get_mut("a").unwrap();
        up.id = Some(7);
        up.backoff = RECONNECT_MAX;
        auto.initiated.insert(7, "a".into());
        auto.eroutes.get_mut("b").unwrap().id = Some(8);
        auto.initiated.insert(8, "b".into());

        let (a2, c) = (
            eroute("172.16.0.0/24", "Both"),
            eroute("172.18.0.0/24", "Initiator"),
        );
        let new = config(&[("a", &a2), ("c", &c)], &[], &[("a", "k"), ("c", "k")]);
        auto.reconfigure(&new);
        let mut names: Vec<_> = auto.eroutes().cloned().collect();
        names.sort();
        assert_eq!(names, ["a", "c"]);
        let kept = &auto.eroutes["a"];
        assert_eq!(
            (kept.id, kept.backoff, kept.on_demand),
            (Some(7), RECONNECT_MAX, true)
        );
        assert!(
            auto.eroutes["c"].due_at().is_some(),
            "a new Initiator eroute connects at once"
        );
        assert!(!auto.keeps("b"));
        // The SA of the removed eroute closing later (after its DELETE) brings nothing back.
        auto.closed(8);
        auto.forget(8);
        assert!(!auto.keeps("b") && auto.next_due() == auto.eroutes["c"].due_at());
        auto.closed(7);
        assert_eq!(auto.eroutes["a"].id, None, "a's own SA closing is seen");
    }
}
