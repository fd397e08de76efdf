//! State shared by the gateway's tasks.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::tunnels::TunnelTable;

/// One gateway process.
#[derive(Debug)]
pub struct Gateway {
    pub config: Config,
    pub tunnels: TunnelTable,
    pub metrics: Metrics,
    draining: AtomicBool,
}

impl Gateway {
    pub fn new(config: Config, metrics: Metrics) -> Self {
        metrics.eroutes.set(config.set.eroutes.len() as i64);
        metrics.egroups.set(config.set.egroups.len() as i64);
        Self {
            config,
            tunnels: TunnelTable::default(),
            metrics,
            draining: AtomicBool::new(false),
        }
    }

    /// While draining, new sites are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops accepting new sites; returns how many tunnels remain.
    pub fn start_drain(&self) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let remaining = self.tunnels.len();
        self.metrics.tunnels.set(remaining as i64);
        self.metrics.drain_state.set(if remaining == 0 { 2 } else { 1 });
        remaining
    }
}
