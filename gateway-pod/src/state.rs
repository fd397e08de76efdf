//! State shared by the gateway's tasks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::tunnels::TunnelTable;

/// One gateway process.
#[derive(Debug)]
pub struct Gateway {
    /// The configuration in force: the last one a reload applied.
    current: RwLock<Arc<Config>>,
    pub tunnels: TunnelTable,
    pub metrics: Metrics,
    draining: AtomicBool,
}

impl Gateway {
    pub fn new(config: Config, metrics: Metrics) -> Self {
        metrics.eroutes.set(config.set.eroutes.len() as i64);
        metrics.egroups.set(config.set.egroups.len() as i64);
        Self {
            current: RwLock::new(Arc::new(config)),
            tunnels: TunnelTable::default(),
            metrics,
            draining: AtomicBool::new(false),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        // A panic elsewhere cannot leave an `Arc` half-written: the value is still whole.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts `config` in force (a reload that was applied).
    pub fn set_config(&self, config: Arc<Config>) {
        self.metrics.eroutes.set(config.set.eroutes.len() as i64);
        self.metrics.egroups.set(config.set.egroups.len() as i64);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
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
