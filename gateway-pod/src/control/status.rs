//! What the driver shows and keeps alive while tunnels are up: the admin API's tunnel table
//! and its traffic counters, the liveness the engine learns from ESP, NAT keepalives, and
//! the deletion of idle tunnels.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use concentrator_crds::eroute::ValidatedEroute;

use super::driver::Driver;
use super::events::IkeSaRecord;
use crate::tunnels::{ChildRow, TunnelRow};

/// Interval of NAT keepalives (RFC 3948 §4 suggests 20 s).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

impl Driver {
    /// Writes the tunnel of `spi_r` to the admin API's table, once it is established: a peer
    /// being refused (or still negotiating) is no tunnel. Called when the tunnel changes; its
    /// traffic the table reads from the data plane's counters itself.
    pub(super) fn publish(&self, spi_r: u64) {
        let Some(rec) = self.sas.get(&spi_r).filter(|r| r.established_at.is_some()) else {
            return;
        };
        let eroute = rec
            .eroute
            .as_ref()
            .and_then(|n| self.config.set.eroutes.get(&**n));
        self.gateway.tunnels.upsert(spi_r, tunnel(rec, eroute));
        self.gateway
            .metrics
            .tunnels
            .set(self.gateway.tunnels.len() as i64);
    }

    /// Tells the engine which peers proved alive by sending ESP (so that it does not send them
    /// liveness checks), sends NAT keepalives and deletes idle tunnels.
    pub(super) fn refresh_status(&mut self) {
        let ids: Vec<u64> = self.sas.keys().copied().collect();
        let now = Instant::now();
        let used: Vec<bool> = ids.iter().map(|id| self.track_use(*id, now)).collect();
        for (id, used) in ids.into_iter().zip(used) {
            // Only a tunnel that carried traffic since the last pass has news for the engine
            // (most of 100,000 tunnels sit idle: their liveness timers are left alone).
            if let Some(last) = self.sas.get(&id).filter(|_| used).and_then(|r| {
                r.children
                    .iter()
                    .map(|c| c.counters.last_inbound())
                    .max()
                    .flatten()
            }) {
                self.endpoint.handle_child_traffic(id, last);
            }
            self.keepalive(id, now);
        }
    }

    /// RFC 3948 §4: "NAT-keepalive packets are sent ... if no other packet has been sent in
    /// a specified time period" — one 0xFF octet to the peer's NAT-T port, so that a NAT in
    /// front of us (or of the peer) keeps the mapping while the tunnel is idle.
    fn keepalive(&mut self, id: u64, now: Instant) {
        let Some(rec) = self.sas.get_mut(&id) else {
            return;
        };
        let Some(remote) = rec.remote else {
            return;
        };
        let last_sent = rec
            .children
            .iter()
            .map(|c| c.counters.last_activity())
            .chain([rec.last_keepalive])
            .max()
            .unwrap_or(now);
        if rec.nat && rec.established_at.is_some() && keepalive_due(last_sent, now) {
            rec.last_keepalive = now;
            self.gateway.metrics.nat_keepalives.inc();
            // Behind a Service, only the member the site's flow enters through can reach it.
            if self.keepalive_via(remote) {
                return;
            }
            if let Err(e) = self.udp4500.try_send_to(&[0xff], remote) {
                tracing::debug!(%remote, error = %e, "NAT keepalive not sent");
            }
        }
    }

    /// Marks a dynamic eroute used when its tunnel carried traffic since the last pass (and
    /// says so), and deletes a tunnel idle for longer than its eroute's `inactivityTimeout`.
    fn track_use(&mut self, id: u64, now: Instant) -> bool {
        let Some(rec) = self.sas.get_mut(&id) else {
            return false;
        };
        if rec.established_at.is_none() {
            return false;
        }
        let bytes: u64 = rec
            .children
            .iter()
            .map(|c| c.counters.bytes_in.load(Relaxed) + c.counters.bytes_out.load(Relaxed))
            .sum();
        if bytes != rec.last_bytes {
            rec.last_bytes = bytes;
            rec.last_traffic = now;
            if let Some(egroup) = &rec.egroup {
                self.egroups.touch(egroup, &rec.peer_id, now);
            }
            return true;
        }
        let timeout = rec
            .eroute
            .as_ref()
            .and_then(|n| self.config.set.eroutes.get(&**n))
            .and_then(|e| e.inactivity_timeout);
        if let Some(timeout) = timeout
            && now.saturating_duration_since(rec.last_traffic) >= timeout
        {
            tracing::info!(peer_id = %rec.peer_id, ?timeout, "tunnel idle: deleted");
            self.endpoint.delete(id, now);
        }
        false
    }
}

/// The admin API's row for the tunnel of `rec`, as it and its eroute stand.
fn tunnel(rec: &IkeSaRecord, eroute: Option<&ValidatedEroute>) -> TunnelRow {
    TunnelRow {
        base_eroute: rec.eroute.clone(),
        egroup: rec.egroup.clone(),
        peer_id: Arc::clone(&rec.peer_id),
        peer_address: rec.remote,
        local_subnet: eroute.map(|e| e.local_subnet),
        established_at: rec.established_at,
        children: rec
            .children
            .iter()
            .map(|c| ChildRow {
                spi_in: c.spi_in,
                spi_out: c.spi_out,
                encryption: c.encryption,
                subnets: Arc::clone(&c.subnets),
                counters: Arc::clone(&c.counters),
            })
            .collect(),
    }
}

fn keepalive_due(last_sent: Instant, now: Instant) -> bool {
    now.saturating_duration_since(last_sent) >= KEEPALIVE_INTERVAL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_follow_twenty_idle_seconds() {
        let t = Instant::now();
        assert!(!keepalive_due(t, t + Duration::from_secs(19)));
        assert!(keepalive_due(t, t + Duration::from_secs(20)));
        // A clock that went backwards never triggers a burst.
        assert!(!keepalive_due(t + Duration::from_secs(5), t));
    }
}
