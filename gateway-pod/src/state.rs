//! State shared by the gateway's tasks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

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
    /// Stopping (SIGTERM): a drain can no longer be cancelled.
    stopping: AtomicBool,
    /// Exit once drained (a Drain call asked for it).
    exit_when_drained: AtomicBool,
    /// `/readyz`: not ready while draining, so the front sends no new flow here.
    readiness: OnceLock<Arc<AtomicBool>>,
    /// Woken when the process should stop (drained, and asked to exit then).
    stop: tokio::sync::Notify,
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
            stopping: AtomicBool::new(false),
            exit_when_drained: AtomicBool::new(false),
            readiness: OnceLock::new(),
            stop: tokio::sync::Notify::new(),
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

    /// The flag behind `/readyz` (set once, when the metrics server starts).
    pub fn set_readiness(&self, ready: Arc<AtomicBool>) {
        let _ = self.readiness.set(ready);
    }

    /// Stops accepting new sites and reports not ready; in a fleet the driver hands the
    /// tunnels over to the other members. Returns how many tunnels remain.
    pub fn start_drain(&self, exit_when_drained: bool) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        if exit_when_drained {
            self.exit_when_drained.store(true, Ordering::Relaxed);
        }
        if let Some(r) = self.readiness.get() {
            r.store(false, Ordering::Relaxed);
        }
        self.drain_progress()
    }

    /// The process is stopping: it drains, and no cancel brings it back.
    pub fn stop_draining_for_good(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.start_drain(false);
    }

    /// Takes new sites again (what was handed over stays where it went); false, and
    /// nothing done, when the process is stopping.
    pub fn cancel_drain(&self) -> bool {
        if self.stopping.load(Ordering::Relaxed) {
            return false;
        }
        self.draining.store(false, Ordering::Relaxed);
        self.exit_when_drained.store(false, Ordering::Relaxed);
        if let Some(r) = self.readiness.get() {
            r.store(true, Ordering::Relaxed);
        }
        self.metrics.drain_state.set(0);
        true
    }

    /// Updates the drain state from the tunnels left (0 active, 1 draining, 2 drained);
    /// returns how many remain. Drained and asked to, it has the process stop.
    pub fn drain_progress(&self) -> usize {
        let remaining = self.tunnels.len();
        self.metrics.tunnels.set(remaining as i64);
        if !self.is_draining() {
            return remaining;
        }
        self.metrics.drain_state.set(if remaining == 0 { 2 } else { 1 });
        if remaining == 0 && self.exit_when_drained.load(Ordering::Relaxed) {
            self.stop.notify_one();
        }
        remaining
    }

    /// Whether draining is done (draining, and no tunnel left).
    pub fn is_drained(&self) -> bool {
        self.is_draining() && self.tunnels.is_empty()
    }

    /// Resolves when the process should stop on its own (drained after a Drain call that
    /// asked to exit).
    pub async fn stop_requested(&self) {
        self.stop.notified().await;
    }
}
